"""Adaptive-temperature sampling: hapo_ops against the torch sequence a user writes.

Implementations
  hapo-triton   hapo_ops.adaptive_temperature_sample(..., impl="triton") (CUDA, or --smoke)
  hapo-torch    the row-chunked PyTorch path (impl="torch")
  torch-eager   log_softmax → entropy → adaptive_temperature → softmax(z/T) → multinomial →
                log-prob of the drawn token (several B×V fp32 tensors)

Shapes: B ∈ {256, 1024}, V = 151936, bf16 on CUDA; B = 256 (64 with --quick) on CPU.
GB/s uses a minimum-traffic model of two reads of the logits (2·B·V·itemsize): the kernel
reads every row twice (entropy pass, then sampling pass), and no sampler can do with less
than one; % of copy bandwidth compares that with ``dst.copy_(src)`` (target for the
kernel: 85%). Every row's baseline is torch-eager at the same shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from benchmarks.common import Result, TimingConfig, log, measure, release_memory, short_error

VOCAB = 151936
TAU = 0.05


def _stats(device: torch.device):
    from hapo_ops import EntropyStats
    values = (math.log(1.0), math.log(4.0), math.log(1e-3))
    return EntropyStats(*(torch.tensor(v, device=device) for v in values))


def eager_sample(logits: torch.Tensor, stats, tau: float = TAU) -> tuple[torch.Tensor, ...]:
    """What a user would write: entropy from a full softmax, divide, multinomial."""
    from hapo_ops import adaptive_temperature
    z = logits.float()
    log_p = torch.log_softmax(z, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    temperature = adaptive_temperature(entropy, stats, tau=tau)
    log_q = torch.log_softmax(z / temperature[:, None], dim=-1)
    tokens = torch.multinomial(log_q.exp(), 1)
    return tokens[:, 0], temperature, log_q.gather(-1, tokens)[:, 0], entropy


def hapo_sample(impl: str) -> Callable[[torch.Tensor, object], object]:
    from hapo_ops import adaptive_temperature_sample

    def fn(logits: torch.Tensor, stats) -> object:
        return adaptive_temperature_sample(logits, stats, tau=TAU, seed=0, impl=impl)
    return fn


BASELINE = "torch-eager"
NOTES = {
    "hapo-triton": "one kernel: entropy pass, then Gumbel-max at T; nothing B×V written",
    "hapo-torch": ("row chunks, bounded memory: the exact entropy, the race (one Exp(1) "
                   "draw per logit, as multinomial also draws) and the log-prob at T are "
                   "separate passes over cache-sized blocks, where eager materialises "
                   "several B×V fp32 tensors"),
    "torch-eager": "full softmax twice, multinomial; several B×V fp32 tensors",
}


def plan(device: torch.device, *, quick: bool, smoke: bool
         ) -> tuple[list[tuple[int, int]], torch.dtype, list[tuple[str, Callable]]]:
    """(shapes [(B, V)], dtype, [(name, fn)])."""
    impls: list[tuple[str, Callable]] = [("torch-eager", eager_sample),
                                         ("hapo-torch", hapo_sample("torch"))]
    if smoke:
        return [(16, 3000)], torch.bfloat16, [("hapo-triton", hapo_sample("triton"))] + impls
    if device.type == "cuda":
        return [(256, VOCAB), (1024, VOCAB)], torch.bfloat16, \
            [("hapo-triton", hapo_sample("triton"))] + impls
    return [(64 if quick else 256, VOCAB)], torch.bfloat16, impls


def run(device: torch.device, config: TimingConfig, results: list[Result], *, quick: bool,
        smoke: bool, copy_gbps: float | None, deadline: float = math.inf) -> None:
    """Append one row per (shape, implementation) to ``results``."""
    import time

    shapes, dtype, impls = plan(device, quick=quick, smoke=smoke)
    stats = _stats(device)
    log(f"sampler: shapes {shapes}, impls {[name for name, _ in impls]}")
    for n_rows, vocab in shapes:
        itemsize = torch.empty((), dtype=dtype).element_size()
        try:
            logits = torch.randn(n_rows, vocab, device=device).mul_(2.0).to(dtype)
        except Exception as exc:  # noqa: BLE001
            log(f"sampler inputs B={n_rows}: {short_error(exc)}")
            continue
        for name, fn in impls:
            result = Result(suite="sampler", name=name, mode="sample",
                            dtype=str(dtype).removeprefix("torch."), shape=[n_rows, vocab],
                            note=NOTES.get(name, ""),
                            baseline=None if name == BASELINE else BASELINE)
            if time.monotonic() > deadline:
                result.status, result.note = "skipped", "time budget spent"
            else:
                measure(result, lambda: fn(logits, stats), device, config)
            result.set_bandwidth(2 * n_rows * vocab * itemsize, copy_gbps)
            results.append(result)
            log(f"sampler {name:<12} B={n_rows} V={vocab}: "
                + (f"{result.median_ms:.3f} ms" if result.median_ms else result.status))
        del logits
        release_memory(device)
