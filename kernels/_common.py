"""What every Triton kernel of hapo-ops shares: constants, the per-row statistics as jit
helpers, row addressing and launch configuration.

The statistics are those of ``hapo_ops.vocab.row_statistics`` (where the algebra is derived), in
the kernels' units: with M the row max of the raw logits z and scale = log2(e)/T,

    d_v = (z_v - M)·scale  (≤ 0, log2 units),   rest = Σ_{v≠argmax} 2^d_v,   spread = -Σ 2^d_v·d_v

so that H = log1p(rest) + ln2·spread/(1 + rest) and logp = (z_y - M)/T - log1p(rest). M is
taken and subtracted in raw units before scaling (the error of d is relative to the gap,
not to |z|), and the argmax is recognised by z == M exactly. Logits are saturated to
[-1e30, 1e30] on load (``saturate``): -inf gets weight 2^(-huge) = 0 with finite products,
+inf entries share the mass; NaN stays NaN (GPU max instructions drop NaN, so the NaN
reaches the sums through d instead).
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
NEG_LARGE: tl.constexpr = tl.constexpr(-1.0e30)   # the -inf stand-in (row_statistics.NEG_LARGE)
POS_LARGE: tl.constexpr = tl.constexpr(1.0e30)

TRITON_VERSION = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def log1p(x):
    """log(1 + x) for x ≥ 0 to full fp32 relative precision, without libdevice (which the
    interpreter lacks) and without trusting a fast log near 1: a Taylor series (error below
    x^8/8 < 5e-12 relative) for x < 0.05, log(1 + x) above."""
    series = x * (1.0 - x * (0.5 - x * (1.0 / 3.0 - x * (0.25 - x * (0.2 - x * (1.0 / 6.0
                                                                                - x / 7.0))))))
    return tl.where(x < 0.05, series, tl.log(1.0 + x))


@triton.jit
def saturate(z):
    """Logits as fp32 held in [-1e30, 1e30]; NaN stays NaN."""
    return tl.clamp(z.to(tl.float32), NEG_LARGE, POS_LARGE, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def row_pointer(base, row, inner_rows, stride_outer, stride_inner):
    """Row ``row`` of a tensor whose rows sit at (row // inner)·outer + (row % inner)·inner."""
    return base + (row // inner_rows) * stride_outer + (row % inner_rows) * stride_inner


@triton.jit
def row_scales(temperature_ptr, rows, row_ok, scalar_inv_temperature,
               HAS_TEMPERATURE_TENSOR: tl.constexpr):
    """(1/T, log2(e)/T) of a row, or of a vector of rows (``row_ok`` masks the loads)."""
    inv_t = scalar_inv_temperature + 0.0 * rows.to(tl.float32)
    if HAS_TEMPERATURE_TENSOR:
        inv_t = 1.0 / tl.load(temperature_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
    return inv_t, inv_t * LOG2E


@triton.jit
def accumulate_block(z, scale, row_max, rest, spread, ties):
    """Fold one block of saturated logits (a vector) into a row's running statistics.

    ``row_max`` is a scalar in raw units; per lane: rest = Σ 2^d over entries below the max,
    ties = how many entries equal it, spread = -Σ 2^d·d. A block that raises the max
    rescales the old lane sums once (rare after the first blocks); old ties become mass
    off the new max.
    """
    block_max = tl.max(z, axis=0)
    if block_max > row_max:
        shift = (block_max - row_max) * scale
        factor = tl.exp2(-shift)
        at_old_max = rest + ties
        spread = factor * spread + (factor * shift) * at_old_max
        rest = factor * at_old_max
        ties = tl.zeros_like(ties)
        row_max = block_max
    is_max = z == row_max
    d = (z - row_max) * scale
    weight = tl.exp2(tl.where(is_max, float("-inf"), d))
    rest += weight
    spread -= weight * d
    ties += tl.where(is_max, 1.0, 0.0)
    return row_max, rest, spread, ties


@triton.jit
def accumulate_tile(z, scale, row_max, rest, spread, ties):
    """``accumulate_block`` for a (rows, columns) tile: per-row max, rest, spread and ties
    (vectors over rows; ``scale`` per row). Rows whose max rises are rescaled with
    ``tl.where`` (no per-row branch in a tile)."""
    new_max = tl.maximum(row_max, tl.max(z, axis=1))
    raised = new_max > row_max
    shift = (new_max - row_max) * scale
    factor = tl.exp2(-shift)
    at_old_max = rest + ties
    spread = tl.where(raised, factor * spread + (factor * shift) * at_old_max, spread)
    rest = tl.where(raised, factor * at_old_max, rest)
    ties = tl.where(raised, 0.0, ties)
    is_max = z == new_max[:, None]
    d = (z - new_max[:, None]) * scale[:, None]
    weight = tl.exp2(tl.where(is_max, float("-inf"), d))
    rest += tl.sum(weight, axis=1)
    spread -= tl.sum(weight * d, axis=1)
    ties += tl.sum(tl.where(is_max, 1.0, 0.0), axis=1)
    return new_max, rest, spread, ties


@triton.jit
def row_statistics(row_ptr, vocab, scale, BLOCK_V: tl.constexpr):
    """(M, rest, spread) of one row (spread in log2 units): one streaming pass in
    ``BLOCK_V`` blocks, the next block's load issued before the current one is reduced (so
    memory latency overlaps the arithmetic), then the lane sums merged:
    rest = Σ_lanes rest + (ties - 1)."""
    return row_statistics_above(row_ptr, vocab, scale, NEG_LARGE, BLOCK_V, False)


@triton.jit
def row_statistics_above(row_ptr, vocab, scale, threshold, BLOCK_V: tl.constexpr,
                         HAS_THRESHOLD: tl.constexpr):
    """``row_statistics`` of the entries z ≥ ``threshold`` (raw units; the others count as
    -inf): the statistics of a truncated distribution (``hapo_ops.vocab.truncation``). Without
    ``HAS_THRESHOLD`` the comparison is compiled out of the inner loop."""
    lanes = tl.arange(0, BLOCK_V)
    row_max = tl.full([], NEG_LARGE, tl.float32)
    rest = tl.zeros([BLOCK_V], tl.float32)
    spread = tl.zeros([BLOCK_V], tl.float32)
    ties = tl.zeros([BLOCK_V], tl.float32)
    z_next = tl.load(row_ptr + lanes, mask=lanes < vocab, other=float("-inf"))
    for start in range(0, vocab, BLOCK_V):
        z = z_next
        offsets = start + BLOCK_V + lanes
        z_next = tl.load(row_ptr + offsets, mask=offsets < vocab, other=float("-inf"))
        z = saturate(z)
        if HAS_THRESHOLD:
            z = tl.where(z < threshold, NEG_LARGE, z)
        row_max, rest, spread, ties = accumulate_block(z, scale, row_max, rest, spread, ties)
    rest_total = tl.sum(rest, axis=0) + (tl.sum(ties, axis=0) - 1.0)
    return row_max, rest_total, tl.sum(spread, axis=0)


@triton.jit
def finish_row(row_max, rest, spread, label_logit, inv_t):
    """(logp, H, log1p(rest)) from whole-row statistics (spread in log2 units) and the
    label's saturated logit; logp is -inf where the label has probability 0 and, like H, NaN
    for a row with no distribution (``row_statistics.finish``)."""
    log_norm = log1p(rest)
    entropy = log_norm + LN2 * spread / (1.0 + rest)
    label_gap = label_logit - row_max
    logp = tl.where(label_gap <= NEG_LARGE, float("-inf"), label_gap * inv_t - log_norm)
    no_distribution = row_max <= NEG_LARGE
    return (tl.where(no_distribution, float("nan"), logp),
            tl.where(no_distribution, float("nan"), entropy), log_norm)


@triton.jit
def mask_logprob(logp, label, vocab, ignore_index):
    """The label rule (``row_statistics.mask_logprobs``): 0 at ignore_index, NaN for a
    label outside [0, V)."""
    logp = tl.where((label >= 0) & (label < vocab), logp, float("nan"))
    return tl.where(label == ignore_index, 0.0, logp)


# --------------------------------------------------------------------------- launch helpers


class RowLayout(NamedTuple):
    """How (N, V) rows sit in memory: row r at (r // inner)·outer + (r % inner)·inner_stride."""

    inner_rows: int
    stride_outer: int
    stride_inner: int


def row_layout(logits: torch.Tensor) -> RowLayout | None:
    """The two-level row addressing of ``logits`` (last dim contiguous), or None if the leading
    dims cannot be expressed with two strides (the caller then copies)."""
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        return None
    dims = [(s, st) for s, st in zip(logits.shape[:-1], logits.stride()[:-1]) if s != 1]
    merged: list[tuple[int, int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == size * stride:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    if not merged:
        return RowLayout(1, 0, 0)
    if len(merged) == 1:
        return RowLayout(merged[0][0], 0, merged[0][1])
    if len(merged) == 2:
        return RowLayout(merged[1][0], merged[0][1], merged[1][1])
    return None


def addressable_rows(logits: torch.Tensor) -> tuple[torch.Tensor, RowLayout]:
    """``logits`` and its two-stride row layout, copied to contiguous memory only when its
    leading dims cannot be addressed with two strides."""
    layout = row_layout(logits)
    if layout is None:
        logits = logits.contiguous()
        layout = row_layout(logits)
    return logits, layout


def temperature_args(temperature: torch.Tensor | None, scalar_temperature: float, dummy
                     ) -> tuple[torch.Tensor, float, bool]:
    """(temperature pointer, scalar 1/T, HAS_TEMPERATURE_TENSOR) for a launch; ``dummy`` is
    any tensor standing in for an absent pointer."""
    if temperature is None:
        return dummy, 1.0 / scalar_temperature, False
    return temperature, 1.0, True


class KernelConfig(NamedTuple):
    block_v: int
    num_warps: int
    num_stages: int = 3  # Triton's CUDA default


KERNEL_PASSES = ("forward", "backward", "sample")
CONFIG_ENV = "HAPO_OPS_KERNEL_CONFIG"


def pick_config(vocab: int, dtype: torch.dtype, pass_: str) -> KernelConfig:
    """Block size, warps and stages of a one-program-per-row kernel, per pass and dtype.

    A rule rather than autotuning (an autotuner would re-run the in-place backward), from
    the sweeps on an H200 (``benchmarks/results/``, N=16384, V=151936): the forward and the
    sampler are fastest with small programs (1024-wide blocks, 2 warps for 2-byte dtypes, 4
    for fp32), the backward with wide ones (4096-wide blocks, 16 warps). The environment
    variable ``HAPO_OPS_KERNEL_CONFIG`` overrides it for sweeps, per pass and dtype
    (``*`` for any dtype), read at each launch: for example
    ``forward:bfloat16:1024x2,backward:*:4096x16x2`` (block x warps [x stages]).
    """
    if pass_ not in KERNEL_PASSES:
        raise ValueError(f"pass_ must be one of {KERNEL_PASSES}, got {pass_!r}")
    override = config_override(pass_, dtype)
    if override is not None:
        return override
    if pass_ == "backward":
        block, warps = 4096, 16
    else:
        block, warps = 1024, (2 if dtype.itemsize <= 2 else 4)
    block = min(block, max(16, triton.next_power_of_2(vocab)))
    return KernelConfig(block, max(1, min(warps, block // 64)))


def config_override(pass_: str, dtype: torch.dtype) -> KernelConfig | None:
    """The ``HAPO_OPS_KERNEL_CONFIG`` entry for this pass and dtype, if any."""
    name = str(dtype).removeprefix("torch.")
    for entry in filter(None, (e.strip() for e in os.environ.get(CONFIG_ENV, "").split(","))):
        parts = entry.split(":")
        if len(parts) != 3 or parts[0] not in KERNEL_PASSES:
            raise ValueError(f"{CONFIG_ENV} entries must read pass:dtype:BLOCKxWARPS[xSTAGES] "
                             f"with pass in {KERNEL_PASSES}, got {entry!r}")
        if parts[0] == pass_ and parts[1] in (name, "*"):
            return KernelConfig(*(int(x) for x in parts[2].split("x")))
    return None


__all__ = ["CONFIG_ENV", "KERNEL_PASSES", "KernelConfig", "LN2", "LOG2E", "NEG_LARGE",
           "POS_LARGE", "RowLayout", "TRITON_VERSION", "accumulate_block", "accumulate_tile",
           "addressable_rows", "config_override", "finish_row", "interpreting", "log1p",
           "mask_logprob", "pick_config", "row_layout", "row_pointer", "row_scales",
           "row_statistics", "row_statistics_above", "saturate", "temperature_args"]
