"""Fused per-token log-prob and entropy kernels (forward and backward) over logits rows.

Forward: one program per row streams the row once in ``BLOCK_V`` blocks, the next block's
load issued before the current block is reduced. With M the running row max, each lane accumulates
rest = Σ 2^(s-M) over entries below M, ties = the count of entries equal to M, and
spread = Σ 2^(s-M)(M-s): one exp2 and a handful of FMAs per element, all terms
non-negative. A block that raises M rescales the lane sums once. The entropy
H = log1p(rest + ties - 1) + ln2·spread/(rest + ties) then has no cancellation (exact for
H ≪ 1e-6). Values are in log2 units (s = z·log2(e)/T). Only O(N) values leave the kernel:
logp, H and a per-row state (row max in log2 units, log1p(rest)) from which the backward
rebuilds log p_v = (s_v - max) - log1p(rest) without the rounding of a large lse.

Backward: one read of the row and one write of the gradient (into a new tensor, or in
place over the logits):

    ∂/∂z_v = [g_lp·(1[v=y] - p_v) - g_H·p_v·(ln p_v + H)] / T.

Vocabulary shards (``hapo_ops.distributed``): ``RAW_STATS`` makes the forward store the
row's sums (max, rest, spread, label logit) instead of logp and H, for combining across
ranks; ``SHARDED`` makes the backward keep -g_lp·p_v on rows whose label another shard holds.

Addresses are int64 (N·V passes 2^31 at 16k × 152k). Rows are addressed as
(row // inner)·stride_outer + (row % inner)·stride_inner, so a sliced 3-D tensor such as
``logits[:, :-1]`` needs no copy.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NEG_LARGE = -1.0e30  # the -inf stand-in: 2^(NEG_LARGE - m) == 0, NEG_LARGE · 0 == 0


class KernelConfig(NamedTuple):
    block_v: int
    num_warps: int
    num_stages: int = 3  # Triton's CUDA default


def pick_config(vocab: int, dtype: torch.dtype, pass_: str = "forward") -> KernelConfig:
    """Block size and warps per pass, vocabulary size and dtype.

    A rule rather than autotuning (an autotuner would re-run the in-place backward), from the
    sweep on an H200 (``benchmarks/results/``, N=16384, V=151936): the forward is fastest
    with small programs (1024-wide blocks, 2 warps for 2-byte dtypes, 4 for fp32), the
    backward with wide ones (4096-wide blocks, 16 warps). ``HAPO_OPS_KERNEL_CONFIG``
    overrides it per dtype for sweeps, e.g. ``bfloat16:1024x2,float32:1024x4``.
    """
    override = _config_override(dtype)
    if override is not None:
        return override
    itemsize = torch.empty((), dtype=dtype).element_size()
    if pass_ == "backward":
        block, warps = 4096, 16
    else:
        block, warps = 1024, (2 if itemsize <= 2 else 4)
    block = min(block, max(16, triton.next_power_of_2(vocab)))
    warps = max(1, min(warps, block // 64))
    return KernelConfig(block, warps)


def _config_override(dtype: torch.dtype) -> KernelConfig | None:
    name = str(dtype).removeprefix("torch.")
    for entry in os.environ.get("HAPO_OPS_KERNEL_CONFIG", "").split(","):
        key, _, value = entry.strip().partition(":")
        if key == name and value:
            block, _, warps = value.partition("x")
            return KernelConfig(int(block), int(warps))
    return None


@triton.jit
def _log1p(x):
    """log(1 + x) for x ≥ 0 to full fp32 relative precision, without libdevice (which the
    interpreter lacks) and without trusting a fast log near 1: a Taylor series (error below
    x^8/8 < 5e-12 relative) for x < 0.05, where log(1 + x) is small, and log(1 + x) above."""
    series = x * (1.0 - x * (0.5 - x * (1.0 / 3.0 - x * (0.25 - x * (0.2 - x * (1.0 / 6.0
                                                                                - x / 7.0))))))
    return tl.where(x < 0.05, series, tl.log(1.0 + x))


@triton.jit
def _row_pointer(base, row, inner_rows, stride_outer, stride_inner):
    return base + (row // inner_rows) * stride_outer + (row % inner_rows) * stride_inner


@triton.jit
def _row_scales(temperature_ptr, row, scalar_inv_temperature,
                HAS_TEMPERATURE_TENSOR: tl.constexpr):
    """(1/T, log2(e)/T) of a row, computed identically by forward and backward so that the
    backward's s_v - max is exactly 0 at the argmax."""
    inv_t = tl.full([], scalar_inv_temperature, tl.float32)
    if HAS_TEMPERATURE_TENSOR:
        inv_t = 1.0 / tl.load(temperature_ptr + row).to(tl.float32)
    return inv_t, inv_t * 1.4426950408889634


@triton.jit
def _scaled(z, scale):
    """s = z·log2(e)/T in fp32, with -inf (and anything below -1e30) held at -1e30. The max
    also keeps the compiler from fusing the product into a later subtraction (an FMA would
    make s - max nonzero at the argmax). NaN stays NaN (a GPU max would drop it), so a NaN
    logit gives a NaN result rather than being read as -inf."""
    return tl.maximum(z.to(tl.float32) * scale, -1.0e30, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _accumulate_block(s, row_max, rest, spread, ties):
    """Fold one block of scaled logits into the row's running statistics.

    With M the running max (a scalar), per lane: rest = Σ 2^(s-M) over entries below M,
    ties = how many entries equal M, spread = Σ 2^(s-M)·(M-s). When the block raises M, the
    old statistics are rescaled once (rare after the first blocks); the old ties become
    mass off the new max.
    """
    block_max = tl.max(s, axis=0)
    if block_max > row_max:
        shift = block_max - row_max
        factor = tl.exp2(-shift)
        at_old_max = rest + ties
        spread = factor * spread + (factor * shift) * at_old_max
        rest = factor * at_old_max
        ties = tl.zeros_like(ties)
        row_max = block_max
    d = s - row_max
    is_max = d == 0.0
    weight = tl.exp2(tl.where(is_max, float("-inf"), d))
    rest += weight
    spread -= weight * d
    ties += tl.where(is_max, 1.0, 0.0)
    return row_max, rest, spread, ties


@triton.jit
def _row_statistics(row_ptr, vocab, scale, BLOCK_V: tl.constexpr):
    """(max, rest, spread) of s = z·scale over one row (log2 units): one streaming pass in
    ``BLOCK_V`` blocks, the next block's load issued before the current one is reduced (so
    memory latency overlaps the arithmetic; bf16 carries two elements per 4 bytes), then the
    per-lane sums merged: rest = Σ_lanes rest + (ties - 1)."""
    lanes = tl.arange(0, BLOCK_V)
    row_max = tl.full([], -1.0e30, tl.float32)
    rest = tl.zeros([BLOCK_V], tl.float32)
    spread = tl.zeros([BLOCK_V], tl.float32)
    ties = tl.zeros([BLOCK_V], tl.float32)
    z_next = tl.load(row_ptr + lanes, mask=lanes < vocab, other=float("-inf"))
    for start in range(0, vocab, BLOCK_V):
        z = z_next
        offsets = start + BLOCK_V + lanes
        z_next = tl.load(row_ptr + offsets, mask=offsets < vocab, other=float("-inf"))
        row_max, rest, spread, ties = _accumulate_block(_scaled(z, scale), row_max, rest,
                                                        spread, ties)
    rest_total = tl.sum(rest, axis=0) + (tl.sum(ties, axis=0) - 1.0)
    return row_max, rest_total, tl.sum(spread, axis=0)


@triton.jit
def _entropy_from_statistics(row_max, rest_total, spread_total):
    """(H in nats, log1p(rest)) from the row sums; H is NaN for a row with no finite logit."""
    log_norm = _log1p(rest_total)
    entropy = log_norm + 0.6931471805599453 * spread_total / (1.0 + rest_total)
    return tl.where(row_max <= -1.0e30, float("nan"), entropy), log_norm


@triton.jit
def _logprob_entropy_fwd_kernel(
    logits_ptr, labels_ptr, temperature_ptr, logp_ptr, entropy_ptr, state_ptr,
    vocab, inner_rows, stride_outer, stride_inner, ignore_index, scalar_inv_temperature,
    HAS_TEMPERATURE_TENSOR: tl.constexpr, BLOCK_V: tl.constexpr, RAW_STATS: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = _row_pointer(logits_ptr, row, inner_rows, stride_outer, stride_inner)
    _, scale = _row_scales(temperature_ptr, row, scalar_inv_temperature, HAS_TEMPERATURE_TENSOR)
    row_max, rest_total, spread_total = _row_statistics(row_ptr, vocab, scale, BLOCK_V)
    label = tl.load(labels_ptr + row).to(tl.int64)
    in_range = (label >= 0) & (label < vocab)
    s_label = _scaled(tl.load(row_ptr + tl.where(in_range, label, 0)), scale)
    if RAW_STATS:
        # The row's sums before normalisation (one vocabulary shard): state is (N, 4).
        tl.store(state_ptr + 4 * row, row_max)
        tl.store(state_ptr + 4 * row + 1, rest_total)
        tl.store(state_ptr + 4 * row + 2, spread_total)
        tl.store(state_ptr + 4 * row + 3, s_label)
    else:
        entropy, log_norm = _entropy_from_statistics(row_max, rest_total, spread_total)
        no_finite_logit = row_max <= -1.0e30
        logp = (s_label - row_max) * 0.6931471805599453 - log_norm
        logp = tl.where(s_label <= -1.0e30, float("-inf"), logp)
        logp = tl.where(in_range & ~no_finite_logit, logp, float("nan"))
        logp = tl.where(label == ignore_index, 0.0, logp)
        tl.store(logp_ptr + row, logp)
        tl.store(entropy_ptr + row, entropy)
        tl.store(state_ptr + 2 * row, row_max)
        tl.store(state_ptr + 2 * row + 1, log_norm)


@triton.jit
def _logprob_entropy_bwd_kernel(
    logits_ptr, grad_ptr, labels_ptr, temperature_ptr, state_ptr, entropy_ptr,
    grad_logp_ptr, grad_entropy_ptr,
    vocab, inner_rows, stride_outer, stride_inner, grad_stride_outer, grad_stride_inner,
    ignore_index, scalar_inv_temperature,
    HAS_TEMPERATURE_TENSOR: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, SHARDED: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = _row_pointer(logits_ptr, row, inner_rows, stride_outer, stride_inner)
    grad_row_ptr = _row_pointer(grad_ptr, row, inner_rows, grad_stride_outer, grad_stride_inner)
    inv_t, scale = _row_scales(temperature_ptr, row, scalar_inv_temperature,
                               HAS_TEMPERATURE_TENSOR)
    row_max = tl.load(state_ptr + 2 * row)
    log2_norm = tl.load(state_ptr + 2 * row + 1) * 1.4426950408889634
    entropy = tl.load(entropy_ptr + row)
    g_entropy = 0.0
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row).to(tl.float32) * inv_t
    g_logp = 0.0
    label = tl.load(labels_ptr + row).to(tl.int64)
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + row).to(tl.float32) * inv_t
        if not SHARDED:
            # A vocabulary shard keeps -g·p_v for labels held by another shard (the caller
            # zeroes g for ignored rows); unsharded, a label outside [0, V) has no gradient.
            label_ok = (label != ignore_index) & (label >= 0) & (label < vocab)
            g_logp = tl.where(label_ok, g_logp, 0.0)
    lanes = tl.arange(0, BLOCK_V)
    for start in range(0, vocab, BLOCK_V):
        offsets = start + lanes
        in_row = offsets < vocab
        z = tl.load(row_ptr + offsets, mask=in_row, other=float("-inf"))
        log2_p = (_scaled(z, scale) - row_max) - log2_norm
        p = tl.exp2(log2_p)
        grad = tl.zeros([BLOCK_V], tl.float32)
        if HAS_GRAD_ENTROPY:
            surprise = log2_p * 0.6931471805599453 + entropy
            grad -= g_entropy * tl.where(p > 0.0, p * surprise, 0.0)
        if HAS_GRAD_LOGP:
            grad += g_logp * (tl.where(offsets == label, 1.0, 0.0) - p)
        tl.store(grad_row_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


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
    sizes, strides = list(logits.shape[:-1]), list(logits.stride()[:-1])
    dims = [(s, st) for s, st in zip(sizes, strides) if s != 1]  # size-1 dims have no stride
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


def _temperature_args(temperature: torch.Tensor | None, scalar_temperature: float):
    if temperature is None:
        return None, 1.0 / scalar_temperature, False
    return temperature, 1.0, True


def logprob_entropy_forward(logits: torch.Tensor, labels: torch.Tensor,
                            temperature: torch.Tensor | None, scalar_temperature: float,
                            ignore_index: int, *, out: tuple[torch.Tensor, ...] | None = None,
                            config: KernelConfig | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, H, state): logp and H flat float32 (N,), state (N, 2) for the backward.

    logits (..., V) with a contiguous last dim; labels (N,) integer; temperature None (use
    ``scalar_temperature``) or (N,) float32. ``out`` may supply the three output buffers.
    """
    logits, layout = addressable_rows(logits)
    vocab = logits.shape[-1]
    n_rows = labels.numel()
    if out is None:
        out = tuple(torch.empty(shape, dtype=torch.float32, device=logits.device)
                    for shape in ((n_rows,), (n_rows,), (n_rows, 2)))
    logp, entropy, state = out
    if n_rows == 0:
        return logp, entropy, state
    config = config or pick_config(vocab, logits.dtype)
    temp, inv_t, has_temp = _temperature_args(temperature, scalar_temperature)
    _logprob_entropy_fwd_kernel[(n_rows,)](
        logits, labels, temp if has_temp else state, logp, entropy, state,
        vocab, layout.inner_rows, layout.stride_outer, layout.stride_inner, ignore_index, inv_t,
        HAS_TEMPERATURE_TENSOR=has_temp, BLOCK_V=config.block_v, num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return logp, entropy, state


def logprob_entropy_row_stats(logits: torch.Tensor, labels: torch.Tensor,
                              temperature: torch.Tensor | None, scalar_temperature: float, *,
                              config: KernelConfig | None = None) -> torch.Tensor:
    """(N, 4) float32 per-row sums [m, rest, spread, s_y] in log2 units, before normalisation
    (the forward kernel with ``RAW_STATS``): m the row max of s = z·log2(e)/T (-1e30 for a
    row with no finite logit), rest = Σ_{v≠argmax} 2^(s_v-m), spread = Σ 2^(s_v-m)(m-s_v),
    s_y the label's s where 0 ≤ label < V (unspecified elsewhere). For vocabulary shards."""
    logits, layout = addressable_rows(logits)
    vocab = logits.shape[-1]
    n_rows = labels.numel()
    stats = torch.empty((n_rows, 4), dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return stats
    config = config or pick_config(vocab, logits.dtype)
    temp, inv_t, has_temp = _temperature_args(temperature, scalar_temperature)
    _logprob_entropy_fwd_kernel[(n_rows,)](
        logits, labels, temp if has_temp else stats, stats, stats, stats,
        vocab, layout.inner_rows, layout.stride_outer, layout.stride_inner, 0, inv_t,
        HAS_TEMPERATURE_TENSOR=has_temp, BLOCK_V=config.block_v, RAW_STATS=True,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return stats


def logprob_entropy_backward(logits: torch.Tensor, labels: torch.Tensor,
                             temperature: torch.Tensor | None, scalar_temperature: float,
                             state: torch.Tensor, entropy: torch.Tensor,
                             grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                             ignore_index: int, *, inplace: bool = False,
                             out: torch.Tensor | None = None,
                             config: KernelConfig | None = None,
                             sharded: bool = False) -> torch.Tensor:
    """∂L/∂logits in the logits dtype: a new contiguous tensor, ``out``, or (``inplace``) the
    logits buffer itself.

    ``sharded``: ``logits`` is one vocabulary shard, ``labels`` are shard-local (outside
    [0, V) when another shard holds the label) and ``grad_logp`` is already zero where logp
    has no gradient; -g_lp·p_v then applies to every row, +g_lp only at a label in [0, V).
    """
    if inplace and row_layout(logits) is None:
        raise ValueError("inplace_backward needs logits whose rows two strides can address")
    logits, layout = addressable_rows(logits)
    vocab = logits.shape[-1]
    n_rows = labels.numel()
    if inplace:
        grad, grad_layout = logits, layout
    else:
        grad = out if out is not None else torch.empty(logits.shape, dtype=logits.dtype,
                                                       device=logits.device)
        if not grad.is_contiguous() or grad.shape != logits.shape:
            raise ValueError(f"out must be a contiguous tensor of shape {tuple(logits.shape)}")
        # Contiguous rows, addressed with the logits' two-level row split.
        grad_layout = RowLayout(layout.inner_rows, layout.inner_rows * vocab, vocab)
    if n_rows == 0:
        return grad
    config = config or pick_config(vocab, logits.dtype, "backward")
    temp, inv_t, has_temp = _temperature_args(temperature, scalar_temperature)
    _logprob_entropy_bwd_kernel[(n_rows,)](
        logits, grad, labels, temp if has_temp else entropy, state, entropy,
        grad_logp if grad_logp is not None else entropy,
        grad_entropy if grad_entropy is not None else entropy,
        vocab, layout.inner_rows, layout.stride_outer, layout.stride_inner,
        grad_layout.stride_outer, grad_layout.stride_inner, ignore_index, inv_t,
        HAS_TEMPERATURE_TENSOR=has_temp, HAS_GRAD_LOGP=grad_logp is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None, BLOCK_V=config.block_v, SHARDED=sharded,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return grad


__all__ = ["KernelConfig", "LN2", "LOG2E", "NEG_LARGE", "RowLayout", "logprob_entropy_backward",
           "logprob_entropy_forward", "logprob_entropy_row_stats", "pick_config", "row_layout"]
