"""Trainer-side HAPO ops at the size of one real RL step.

One step: 8192 responses (512 prompts × group size 16, group ids shuffled) of up to 4096
tokens with random lengths, Bernoulli(0.5) rewards, and token entropies drawn from a mixture
that puts most tokens at tiny entropies (near-deterministic) and the rest around 0.2 nats.
``--quick`` uses 1024 responses.

Baseline: the same step computed the way verl does it, through verl's own functions
(``verl.trainer.ppo.core_algos``): ``compute_grpo_outcome_advantage`` for the advantages
and ``compute_policy_loss_vanilla`` (which aggregates with ``agg_loss``) for the PPO loss,
with the same clip range (0.2) and dual clip (10). verl is optional
(``python install.py bench`` in a clone); without it those rows are reported as skipped.
``hapo_policy_loss`` does more than verl's loss (entropy statistics, normalized entropy,
per-token clip bounds, advantage redistribution, four clip fractions and the KL metric), so
its ratio to verl is the price of those extras; ``clipped_policy_loss`` is the
like-for-like comparison.

Paired ratios: on a shared CPU the load changes between rows, so each loss's
forward+backward time over verl's is also measured interleaved (loss, verl, loss, verl,
...; ``PAIRED_REPS`` pairs) and reported as the ratio of the two minima, in the row's note
and on stderr.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import Result, TimingConfig, log, measure, release_memory

FORWARD = "forward"
FWD_BWD = "forward+backward"
GROUP_SIZE = 16
VERL_ADVANTAGE = "verl compute_grpo_outcome_advantage"
VERL_LOSS = "verl compute_policy_loss_vanilla"
# op -> its verl baseline row
BASELINES = {"grpo_advantages": VERL_ADVANTAGE,
             "token_level_group_advantages": VERL_ADVANTAGE,
             "clipped_policy_loss": VERL_LOSS,
             "hapo_policy_loss": VERL_LOSS}
PAIRED_REPS = 5
NOTES = {
    "hapo_policy_loss": ("entropy stats + ĥ + clip bounds + redistribution + the fused "
                         "dual-clip loss and its metrics"),
    "clipped_policy_loss": "the like-for-like counterpart of verl's loss (dual clip 10)",
    VERL_ADVANTAGE: "Python loop over responses and groups (verl's code)",
    VERL_LOSS: "verl's clipped loss with agg_loss token-mean, clip_ratio_c=10",
}


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

    def clipped(logprobs: torch.Tensor) -> torch.Tensor:
        return hapo_ops.clipped_policy_loss(logprobs, b.old_logprobs, b.advantages, b.mask,
                                            eps_low=0.2, eps_high=0.2, dual_clip=10.0).loss

    def clipped_forward() -> None:
        with torch.no_grad():
            clipped(b.logprobs)

    def clipped_forward_backward() -> None:
        logprobs = b.logprobs.detach().requires_grad_(True)
        torch.autograd.grad(clipped(logprobs), logprobs)

    return [
        ("grpo_advantages", FORWARD, grpo),
        ("token_level_group_advantages", FORWARD, token_level),
        ("entropy_stats", FORWARD, entropy_stats),
        ("normalized_entropy", FORWARD, normalized),
        ("clipped_policy_loss", FORWARD, clipped_forward),
        ("clipped_policy_loss", FWD_BWD, clipped_forward_backward),
        ("hapo_policy_loss", FORWARD, loss_forward),
        ("hapo_policy_loss", FWD_BWD, loss_forward_backward),
    ]


def verl_missing() -> str | None:
    """Why verl's functions cannot run here, or None."""
    if importlib.util.find_spec("verl") is None:
        return 'verl not installed (python install.py bench)'
    try:
        from verl.trainer.ppo import core_algos  # noqa: F401
        from verl.workers.config import FSDPActorConfig  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - optional dependency, any failure means absent
        from benchmarks.common import short_error
        return f"verl does not import: {short_error(exc)}"
    return None


def verl_cases(batch: TrainerBatch) -> list[tuple[str, str, Callable[[], None]]]:
    """The same step through verl's own functions (called, not copied)."""
    import numpy as np
    from verl.trainer.ppo import core_algos
    from verl.workers.config import FSDPActorConfig

    b = batch
    mask = b.mask.to(b.logprobs.dtype)
    # verl's outcome reward sits on the last response token
    last = (b.mask.sum(-1) - 1).clamp_min(0)
    token_rewards = torch.zeros_like(b.logprobs)
    token_rewards[torch.arange(len(last), device=last.device), last] = b.rewards
    index = np.asarray(b.group_ids.cpu())
    config: Any = FSDPActorConfig(strategy="fsdp", rollout_n=GROUP_SIZE,
                                  ppo_micro_batch_size_per_gpu=2, loss_agg_mode="token-mean",
                                  clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2,
                                  clip_ratio_c=10.0)

    def advantage() -> None:
        core_algos.compute_grpo_outcome_advantage(token_rewards, mask, index)

    def loss(logprobs: torch.Tensor) -> torch.Tensor:
        return core_algos.compute_policy_loss_vanilla(b.old_logprobs, logprobs, b.advantages,
                                                      mask, "token-mean", config)[0]

    def loss_forward() -> None:
        with torch.no_grad():
            loss(b.logprobs)

    def loss_forward_backward() -> None:
        logprobs = b.logprobs.detach().requires_grad_(True)
        torch.autograd.grad(loss(logprobs), logprobs)

    return [(VERL_ADVANTAGE, FORWARD, advantage), (VERL_LOSS, FORWARD, loss_forward),
            (VERL_LOSS, FWD_BWD, loss_forward_backward)]


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
    all_cases = cases(batch)
    missing = verl_missing()
    if missing is None:
        all_cases += verl_cases(batch)
    else:
        log(f"trainer: verl baseline skipped: {missing}")
    for op, mode, call in all_cases:
        result = Result(suite="trainer", name=op, mode=mode, dtype="float32",
                        shape=batch.shape, note="; ".join(filter(None, (note, NOTES.get(op)))),
                        baseline=BASELINES.get(op))
        if time.monotonic() > deadline:
            result.status, result.note = "skipped", "time budget spent"
        else:
            measure(result, call, device, config)
        log(describe(result))
        results.append(result)
    if missing is None and time.monotonic() < deadline:
        _paired_ratios(all_cases, results, device)
    if missing is not None:
        results += [Result(suite="trainer", name=name, mode=mode, dtype="float32",
                           shape=batch.shape, status="skipped", note=missing)
                    for name, mode in ((VERL_ADVANTAGE, FORWARD), (VERL_LOSS, FORWARD),
                                       (VERL_LOSS, FWD_BWD))]
    del batch
    release_memory(device)


def _paired_ratios(all_cases: list[tuple[str, str, Callable[[], None]]],
                   results: list[Result], device: torch.device) -> None:
    """Forward+backward of each loss against verl's, interleaved; the ratio of the minima
    goes into the loss row's note (and stderr)."""
    from benchmarks.common import synchronize
    calls = {(op, mode): call for op, mode, call in all_cases}
    baseline = calls.get((VERL_LOSS, FWD_BWD))
    if baseline is None:
        return
    for op in ("clipped_policy_loss", "hapo_policy_loss"):
        call = calls.get((op, FWD_BWD))
        if call is None:
            continue
        best = {op: math.inf, VERL_LOSS: math.inf}
        for _ in range(PAIRED_REPS):
            for name, fn in ((op, call), (VERL_LOSS, baseline)):
                start = time.perf_counter()
                fn()
                synchronize(device)
                best[name] = min(best[name], time.perf_counter() - start)
        ratio = best[op] / best[VERL_LOSS]
        text = (f"paired min ratio to verl ({PAIRED_REPS} interleaved pairs): {ratio:.2f}x "
                f"({best[op] * 1e3:.1f} / {best[VERL_LOSS] * 1e3:.1f} ms)")
        log(f"trainer: {op} {FWD_BWD}: {text}")
        for result in results:
            if result.name == op and result.mode == FWD_BWD:
                result.note = "; ".join(filter(None, (result.note, text)))


def describe(result: Result) -> str:
    head = f"{result.name:<30} {result.mode:<18}"
    if result.status != "ok":
        return f"{head} {result.status}: {result.note}"
    memory = "" if result.extra_peak_mb is None else f"  +{result.extra_peak_mb:.0f} MB"
    return f"{head} {result.median_ms:10.3f} ms{memory}"

