"""A character-level tokenizer built offline (no hub): the integration tests' tiny models
read and write the characters of ``CHARS``, with <pad> = 0 and <eos> = 1."""

from __future__ import annotations

CHARS = "abcdefgh "


def char_tokenizer():
    """A ``transformers.PreTrainedTokenizerFast`` over ``CHARS``, padding on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   padding_side="left")
