"""What the examples share: a character tokenizer and a tiny random Llama, built offline.

Nothing here is downloaded: the tokenizer reads and writes the characters of ``CHARS``
(<pad> = 0, <eos> = 1) and the model is randomly initialised, so every example runs on a
CPU in seconds. To run an example on a real model, replace ``tiny_llama`` and
``char_tokenizer`` with ``AutoModelForCausalLM.from_pretrained(name)`` and
``AutoTokenizer.from_pretrained(name)``; nothing else changes.
"""

from __future__ import annotations

import torch

import hapo_ops

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


def tiny_llama(tokenizer, *, seed: int = 0):
    """A random two-layer Llama over the tokenizer's vocabulary (head_dim 32: vLLM's CPU
    attention needs at least 32). Its output layer is scaled up so that next-token entropies
    spread from near 0 to a few nats, as a trained model's do; at random initialisation they
    would all sit near ln V, and ĥ would have nothing to tell apart."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def save_pretrained(model, tokenizer, path: str) -> str:
    """Save model and tokenizer to the folder ``path`` (what vLLM and TRL's vLLM load)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def last_batch_stats(model, tokenizer, texts: list[str]) -> hapo_ops.EntropyStats:
    """The ``EntropyStats`` a training step would hand to the next rollout: statistics of the
    model's T = 1 entropies over the (non-padding) tokens of ``texts``."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits.float()
    entropy = hapo_ops.token_entropy(logits)
    return hapo_ops.entropy_stats(entropy, batch["attention_mask"].bool())


def count_a(completions, **kwargs) -> list[float]:
    """A toy reward, one float per completion: many a's, few characters."""
    return [float(c.count("a")) - 0.3 * len(c) for c in completions]
