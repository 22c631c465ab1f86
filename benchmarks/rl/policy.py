"""The policy: a small GRU language model over the task vocabulary, trained from scratch."""

from __future__ import annotations

import torch
from torch import nn


class GRUPolicy(nn.Module):
    """Embedding -> GRU -> linear head. ``forward`` returns logits (B, L, V) and the state,
    so decoding feeds one token at a time and training runs the whole sequence."""

    def __init__(self, vocab_size: int, d_embed: int = 64, d_hidden: int = 256,
                 num_layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_embed)
        self.gru = nn.GRU(d_embed, d_hidden, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(d_hidden, vocab_size)

    def forward(self, tokens: torch.Tensor,
                state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, state = self.gru(self.embed(tokens), state)
        return self.head(hidden), state


def answer_logits(policy: GRUPolicy, prompts: torch.Tensor,
                  answers: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits (B, A, V) that predict each answer token from the prompt and
    the answer tokens before it."""
    inputs = torch.cat([prompts, answers[:, :-1]], dim=1)
    logits, _ = policy(inputs)
    return logits[:, prompts.shape[1] - 1:]   # a strided view: the ops read it in place
