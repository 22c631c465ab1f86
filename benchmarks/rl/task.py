"""The verifiable task: sort a sequence of digits, of varying length.

Prompt ``BOS d_1 … d_n =`` (left-padded with PAD to a fixed width), n uniform in
1..max_len; the answer is the n digits in ascending order followed by EOS, so responses
have 2..max_len+1 tokens and their length varies by a factor of up to 5 within a batch.
A small recurrent policy must count every digit value it has read and emit the counts in
order: short sequences are learned quickly, long ones (many repeated digits to keep
track of) slowly, so held-out accuracy keeps room to grow within the budget. Reward 1 for
an exact answer (every digit and the EOS in place), else 0.
"""

from __future__ import annotations

import torch

PAD, EQ, EOS, BOS = 10, 11, 12, 13  # tokens 0-9 are the digits
VOCAB_SIZE = 14


def prompt_width(max_len: int) -> int:
    """Tokens in a left-padded prompt: BOS, the digits and '='."""
    return max_len + 2


def answer_width(max_len: int) -> int:
    """Tokens in a padded answer: up to max_len digits and EOS."""
    return max_len + 1


def sample_sequences(n: int, max_len: int, generator: torch.Generator) -> torch.Tensor:
    """(n, max_len) int64 digit sequences; row i holds its length-many digits, then PAD.
    The length is uniform in 1..max_len."""
    lengths = torch.randint(1, max_len + 1, (n, 1), generator=generator)
    digits = torch.randint(0, 10, (n, max_len), generator=generator)
    return torch.where(torch.arange(max_len) < lengths, digits, PAD)


def keys(sequences: torch.Tensor) -> torch.Tensor:
    """(n,) int64 identity of each sequence (base 11 over its tokens, PAD included)."""
    powers = 11 ** torch.arange(sequences.shape[1], dtype=torch.long)
    return (sequences * powers).sum(dim=1)


def encode_prompts(sequences: torch.Tensor) -> torch.Tensor:
    """(n, prompt_width) prompts ``BOS digits =``, left-padded with PAD."""
    n, max_len = sequences.shape
    lengths = (sequences != PAD).sum(dim=1, keepdim=True)
    body = torch.cat([torch.full((n, 1), BOS), sequences, torch.full((n, 1), PAD)], dim=1)
    body.scatter_(1, lengths + 1, EQ)                   # '=' right after the last digit
    shift = max_len + 2 - (lengths + 2)                 # left padding of each row
    index = (torch.arange(max_len + 2) - shift) % (max_len + 2)
    return body.gather(1, index)                        # rotate right by the padding


def encode_answers(sequences: torch.Tensor) -> torch.Tensor:
    """(n, answer_width) targets: the digits in ascending order, EOS, then PAD."""
    n = sequences.shape[0]
    lengths = (sequences != PAD).sum(dim=1, keepdim=True)
    ordered = sequences.sort(dim=1).values              # PAD (10) sorts after the digits
    return torch.cat([ordered, torch.full((n, 1), PAD)], dim=1).scatter(1, lengths, EOS)


def response_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(n, L) bool: the tokens up to and including the first EOS (all if none)."""
    is_eos = (tokens == EOS).long()
    before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS tokens strictly before t
    return before == 0


def rewards(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n,) float32 binary reward: 1 where the response up to its EOS equals the target."""
    clean = torch.where(response_mask(tokens), tokens, torch.full_like(tokens, PAD))
    return (clean == targets).all(dim=1).float()
