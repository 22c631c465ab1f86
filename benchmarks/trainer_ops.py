"""Trainer-side HAPO ops at the size of one real RL step.

One step: 8192 responses (512 prompts × group size 16, group ids shuffled) of up to 4096
tokens with random lengths, Bernoulli(0.5) rewards, and token entropies drawn from a mixture
that puts most tokens at tiny entropies (near-deterministic) and the rest around 0.2 nats.
``--quick`` uses 1024 responses.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch

from benchmarks.common import Result, TimingConfig, log, measure, release_memory

FORWARD = "forward"
FWD_BWD = "forward+backward"
GROUP_SIZE = 16


@dataclasses.dataclass
class TrainerBatch:
    rewards: torch.Tensor        # (B,) float32 in {0, 1}
    group_ids: torch.Tensor      # (B,) int64, shuffled
    mask: torch.Tensor           # (B, L) bool
    entropy: torch.Tensor        # (B, L) float32
    old_logprobs: torch.Tensor   # (B, L) float32
    logprobs: torch.Tensor       # (B, L) float32, near old_logprobs
    advantages: torch.Tensor     # (B, L) float32

    @property
    def shape(self) -> list[int]:
        return list(self.mask.shape)


def make_batch(num_responses: int, max_len: int, device: torch.device,
               seed: int = 0) -> TrainerBatch:
    """Random inputs (drawn on the CPU for reproducibility across devices, then moved)."""
    g = torch.Generator().manual_seed(seed)
    b, length = num_responses, max_len
    lengths = torch.randint(max(1, length // 16), length + 1, (b,), generator=g)
    mask = torch.arange(length) < lengths[:, None]
    group_ids = torch.randperm(b, generator=g) // GROUP_SIZE
    rewards = torch.bernoulli(torch.full((b,), 0.5), generator=g)
    tiny = torch.rand(b, length, generator=g) < 0.6
    log_h = torch.where(tiny, -12.0 + 3.0 * torch.randn(b, length, generator=g),
                        -1.5 + torch.randn(b, length, generator=g))
    entropy = log_h.exp_()
    old_logprobs = -(torch.randn(b, length, generator=g) * 2.0 - 2.0).exp_()
    logprobs = (old_logprobs + 0.05 * torch.randn(b, length, generator=g)).clamp_max_(0.0)
    rewards, group_ids, mask, entropy, old_logprobs, logprobs = (
        t.to(device) for t in (rewards, group_ids, mask, entropy, old_logprobs, logprobs))
    import hapo_ops
    advantages = hapo_ops.token_level_group_advantages(rewards, group_ids, mask)
    batch = TrainerBatch(rewards, group_ids, mask, entropy, old_logprobs, logprobs, advantages)
    return batch


def cases(batch: TrainerBatch) -> list[tuple[str, str, Callable[[], None]]]:
    """(op, mode, call) for every timed op; calls drop their outputs."""
    import hapo_ops

    b = batch
    stats = hapo_ops.entropy_stats(b.entropy, b.mask)

    def grpo() -> None:
        hapo_ops.grpo_advantages(b.rewards, b.group_ids, b.mask)

    def token_level() -> None:
        hapo_ops.token_level_group_advantages(b.rewards, b.group_ids, b.mask)

    def entropy_stats() -> None:
        hapo_ops.entropy_stats(b.entropy, b.mask)

    def normalized() -> None:
        hapo_ops.normalized_entropy(b.entropy, stats)

    def loss_forward() -> None:
        with torch.no_grad():
            hapo_ops.hapo_policy_loss(b.logprobs, b.old_logprobs, b.advantages, b.entropy, b.mask)

    def loss_forward_backward() -> None:
        logprobs = b.logprobs.detach().requires_grad_(True)
        out = hapo_ops.hapo_policy_loss(logprobs, b.old_logprobs, b.advantages, b.entropy,
                                        b.mask)
        torch.autograd.grad(out[0], logprobs)

    return [
        ("grpo_advantages", FORWARD, grpo),
        ("token_level_group_advantages", FORWARD, token_level),
        ("entropy_stats", FORWARD, entropy_stats),
        ("normalized_entropy", FORWARD, normalized),
        ("hapo_policy_loss", FORWARD, loss_forward),
        ("hapo_policy_loss", FWD_BWD, loss_forward_backward),
    ]


def batch_size(*, quick: bool, smoke: bool) -> tuple[int, int]:
    if smoke:
        return 64, 128
    return (1024 if quick else 8192), 4096


def run(device: torch.device, config: TimingConfig, results: list[Result], *, quick: bool,
        smoke: bool, deadline: float = math.inf) -> None:
    """Append one row per timed op to ``results``."""
    num_responses, max_len = batch_size(quick=quick, smoke=smoke)
    log(f"trainer: building a batch of {num_responses} x {max_len} on {device}")
    batch = make_batch(num_responses, max_len, device)
    valid = int(batch.mask.sum())
    note = f"{valid / 1e6:.1f}M valid tokens"
    log(f"trainer: {note}")
    for op, mode, call in cases(batch):
        result = Result(suite="trainer", name=op, mode=mode, dtype="float32",
                        shape=batch.shape, note=note)
        if time.monotonic() > deadline:
            result.status, result.note = "skipped", "time budget spent"
        else:
            measure(result, call, device, config)
        log(describe(result))
        results.append(result)
    del batch
    release_memory(device)


def describe(result: Result) -> str:
    head = f"{result.name:<30} {result.mode:<18}"
    if result.status != "ok":
        return f"{head} {result.status}: {result.note}"
    memory = "" if result.extra_peak_mb is None else f"  +{result.extra_peak_mb:.0f} MB"
    return f"{head} {result.median_ms:10.3f} ms{memory}"

