"""Fused LM head + log-prob + entropy kernels: logits tiles live on chip only.

Forward (``_linear_fwd_kernel``): a program owns BLOCK_N tokens and one vocabulary *split*
(a range of V, a multiple of BLOCK_V). For each (BLOCK_N, BLOCK_V) tile it accumulates
hidden · weightᵀ over D in BLOCK_D steps with ``tl.dot`` (fp32 accumulator, tensor cores
for 2-byte dtypes), adds the bias and folds the tile into per-row running statistics
(``_common.accumulate_tile``: max in raw units, rest off the max, tie count, spread; every
term non-negative). Each (row, split) leaves the four columns of
``hapo_ops.vocab.row_statistics.RowStatistics``; the caller combines the splits exactly
(``combine_parts``, O(N·splits)). Splitting V gives the GPU enough programs at N = 8192 (64
token tiles alone would leave half an H100 idle) and lets concurrent programs share weight
tiles through L2. The split size is fixed (``SPLIT_VOCAB``, never a function of N), so a
row's result does not depend on the batch it sits in.

Backward (``linear_backward``): per chunk of tokens, ``_linear_dlogits_kernel`` recomputes the
logits tiles (a GEMM-shaped grid with the gradient as epilogue),

    dz_v = [g_lp·(1[v=y] - p_v) - g_H·p_v·(ln p_v + H)] / T,   log2 p_v = (z_v - M)·log2(e)/T - log2(1+rest),

writes dz for the chunk in the input dtype (at most ``chunk_tokens`` × V), and cuBLAS forms
d_hidden[chunk] = dz · W and d_weight += dzᵀ · h[chunk]: one recomputed GEMM plus the two
GEMMs an unfused backward does anyway, never an N×V tensor.

Vocabulary shards: ``linear_forward`` returns raw statistics (the caller combines them
across ranks); ``sharded=True`` in the backward (the ``SHARDED`` constexpr) keeps -g_lp·p_v
on rows whose label another shard holds (shard-local label -1) and the one-hot term only at
a label inside the shard.

Precision of ``tl.dot``: bf16/fp16 operands multiply exactly into fp32 accumulators. fp32
operands take ``input_precision`` from the caller (default "tf32x3": close to fp32 accuracy
on tensor cores; "ieee" is exact fp32 without tensor cores; "tf32" ~1e-3 relative). The
Triton interpreter computes bf16 dots wrongly, so under ``TRITON_INTERPRET=1`` operands are
upcast to fp32 first (``UPCAST`` constexpr). Offsets are int64 (N·V and V·D pass 2^31).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hapo_ops.kernels._common import (LN2, LOG2E, NEG_LARGE, accumulate_tile, interpreting,
                                      row_scales, saturate, temperature_args)

FP32_PRECISIONS = ("tf32x3", "ieee", "tf32")
DZ_CHUNK_BYTES = 1 << 29  # default dz buffer: 512 MiB, ~10% of bf16 logits at 16k × 152k
SPLIT_VOCAB = 16384       # vocabulary entries per forward split (see split_vocab_size)


class LinearConfig(NamedTuple):
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


def pick_linear_config(dtype: torch.dtype) -> LinearConfig:
    """Tile sizes per dtype (a rule, not yet tuned on hardware). 128×128 output tiles with
    64-deep (2-byte) or 32-deep (fp32) K steps are the usual Hopper GEMM shape that fits
    three pipeline stages in shared memory. The interpreter gets 16-wide tiles (the
    smallest ``tl.dot`` accepts) to keep tests fast."""
    if interpreting():
        return LinearConfig(16, 16, 16, 1, 1)
    block_d = 64 if dtype.itemsize <= 2 else 32
    return LinearConfig(128, 128, block_d, 8, 3)


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, dim,
                 stride_h, stride_w, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Saturated (BLOCK_N, BLOCK_V) fp32 tile of hidden[rows] · weight[cols]ᵀ (+ bias[cols]);
    lanes outside the columns hold -1e30 (no mass)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    lanes_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, dim, BLOCK_D):
        k = d0 + lanes_d
        k_ok = k < dim
        h = tl.load(hidden_ptr + rows[:, None] * stride_h + k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[None, :] * stride_w + k[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], saturate(acc), NEG_LARGE)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _linear_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, temperature_ptr, stats_ptr,
    n_rows, vocab, dim, stride_h, stride_w, split_size, scalar_inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_TEMPERATURE_TENSOR: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """stats (splits, N, 4) float32: each split's RowStatistics columns (spread in nats,
    label logit 0 where the label is outside the split)."""
    pid_n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < n_rows
    _, scale = row_scales(temperature_ptr, rows, row_ok, scalar_inv_temperature,
                          HAS_TEMPERATURE_TENSOR)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    row_max = tl.full([BLOCK_N], NEG_LARGE, tl.float32)
    rest = tl.zeros([BLOCK_N], tl.float32)
    spread = tl.zeros([BLOCK_N], tl.float32)
    ties = tl.zeros([BLOCK_N], tl.float32)
    label_logit = tl.zeros([BLOCK_N], tl.float32)
    v_start = split * split_size
    v_stop = tl.minimum(v_start + split_size, vocab)
    lanes_v = tl.arange(0, BLOCK_V).to(tl.int64)
    for v0 in range(v_start, v_stop, BLOCK_V):
        cols = v0 + lanes_v
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, cols < v_stop,
                         dim, stride_h, stride_w, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST,
                         PRECISION)
        row_max, rest, spread, ties = accumulate_tile(z, scale, row_max, rest, spread, ties)
        label_logit += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
    out = stats_ptr + (split * n_rows + rows) * 4
    tl.store(out, row_max, mask=row_ok)
    tl.store(out + 1, rest + (ties - 1.0), mask=row_ok)
    tl.store(out + 2, spread * LN2, mask=row_ok)
    tl.store(out + 3, label_logit, mask=row_ok)


@triton.jit
def _linear_dlogits_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, temperature_ptr, state_ptr, entropy_ptr,
    grad_logp_ptr, grad_entropy_ptr, dz_ptr,
    row_start, row_stop, vocab, dim, stride_h, stride_w, ignore_index, scalar_inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_TEMPERATURE_TENSOR: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, SHARDED: tl.constexpr = False,
):
    """dz for rows [row_start, row_stop) into a (row_stop - row_start, V) buffer of the input
    dtype."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rows = row_start + local
    row_ok = rows < row_stop
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    col_ok = cols < vocab
    inv_t, scale = row_scales(temperature_ptr, rows, row_ok, scalar_inv_temperature,
                              HAS_TEMPERATURE_TENSOR)
    row_max = tl.load(state_ptr + 2 * rows, mask=row_ok, other=0.0)
    log2_norm = tl.load(state_ptr + 2 * rows + 1, mask=row_ok, other=0.0) * LOG2E
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, dim,
                     stride_h, stride_w, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION)
    log2_p = (z - row_max[:, None]) * scale[:, None] - log2_norm[:, None]
    p = tl.exp2(log2_p)
    dz = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if HAS_GRAD_ENTROPY:
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        g_entropy = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0)
        dz -= g_entropy[:, None] * (p * (log2_p * LN2 + entropy[:, None]))
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + rows, mask=row_ok, other=0.0)
        if not SHARDED:
            label_ok = (labels != ignore_index) & (labels >= 0) & (labels < vocab)
            g_logp = tl.where(label_ok, g_logp, 0.0)
        dz += g_logp[:, None] * (tl.where(cols[None, :] == labels[:, None], 1.0, 0.0) - p)
    dz = tl.where(row_ok[:, None] & col_ok[None, :], dz * inv_t[:, None], 0.0)
    tl.store(dz_ptr + local[:, None] * vocab + cols[None, :],
             dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------- launchers


def _dot_args(dtype: torch.dtype, fp32_precision: str) -> tuple[bool, str | None]:
    """(UPCAST, PRECISION) for ``tl.dot`` on operands of ``dtype``."""
    return interpreting() and dtype != torch.float32, (fp32_precision if dtype == torch.float32
                                                       else None)


def split_vocab_size(vocab: int, config: LinearConfig) -> int:
    """Vocabulary entries per split: a fixed ``SPLIT_VOCAB`` (a multiple of BLOCK_V), never a
    function of the number of tokens, so that a row's result does not depend on the batch it
    sits in (batch invariance). At V = 151936 that is 10 splits: with N = 16384 (128 token
    tiles) 1280 programs, enough for any current GPU."""
    split = triton.cdiv(SPLIT_VOCAB, config.block_v) * config.block_v
    return min(split, triton.cdiv(vocab, config.block_v) * config.block_v)


def linear_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   labels: torch.Tensor, temperature: torch.Tensor | None,
                   scalar_temperature: float, fp32_precision: str = "tf32x3", *,
                   config: LinearConfig | None = None, splits: int | None = None
                   ) -> torch.Tensor:
    """(splits, N, 4) float32 RowStatistics columns of each vocabulary split, from hidden
    (N, D), weight (V, D) (last dims contiguous), labels (N,) and temperature None or (N,)
    float32."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    config = config or pick_linear_config(hidden.dtype)
    if splits:
        split_size = triton.cdiv(triton.cdiv(vocab, splits), config.block_v) * config.block_v
    else:
        split_size = split_vocab_size(vocab, config)
    splits = triton.cdiv(vocab, split_size)
    stats = torch.empty((splits, n_rows, 4), dtype=torch.float32, device=hidden.device)
    if n_rows == 0:
        return stats
    upcast, precision = _dot_args(hidden.dtype, fp32_precision)
    temp, inv_t, has_temp = temperature_args(temperature, scalar_temperature, stats)
    grid = (triton.cdiv(n_rows, config.block_n), splits)
    _linear_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else stats, labels, temp, stats,
        n_rows, vocab, dim, hidden.stride(0), weight.stride(0), split_size, inv_t,
        HAS_BIAS=bias is not None, HAS_TEMPERATURE_TENSOR=has_temp, BLOCK_N=config.block_n,
        BLOCK_V=config.block_v, BLOCK_D=config.block_d, UPCAST=upcast, PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return stats


def linear_backward(hidden, weight, bias, labels, temperature, scalar_temperature, state,
                    entropy, grad_logp, grad_entropy, ignore_index, fp32_precision="tf32x3", *,
                    want_hidden=True, want_weight=True, want_bias=True,
                    config: LinearConfig | None = None, chunk_tokens: int | None = None,
                    sharded: bool = False):
    """(grad_hidden, grad_weight, grad_bias), None where not wanted. grad_hidden comes in the
    input dtype (each row is one GEMM over all of V), grad_weight in fp32 (accumulated over
    token chunks; the input dtype when one chunk covers every token), grad_bias in fp32.

    ``chunk_tokens``: tokens per dz buffer (default: ``DZ_CHUNK_BYTES`` of dz).
    ``sharded``: ``weight`` is one vocabulary shard, ``labels`` shard-local (-1 where another
    shard holds the label), ``grad_logp`` already zero where logp has no gradient, ``state``
    the global (M, log1p(rest)); grad_hidden is then this shard's part dz_r · W_r."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    config = config or pick_linear_config(hidden.dtype)
    upcast, precision = _dot_args(hidden.dtype, fp32_precision)
    temp, inv_t, has_temp = temperature_args(temperature, scalar_temperature, entropy)
    want_bias = want_bias and bias is not None
    if chunk_tokens is None:
        chunk_tokens = DZ_CHUNK_BYTES // max(1, vocab * hidden.element_size())
        chunk_tokens = max(config.block_n, chunk_tokens // config.block_n * config.block_n)
    chunk_tokens = max(1, min(chunk_tokens, n_rows))
    dz = torch.empty((chunk_tokens, vocab), dtype=hidden.dtype, device=hidden.device)
    single = 0 < n_rows <= chunk_tokens  # an empty batch: the zero accumulators below
    grad_hidden = (torch.empty((n_rows, dim), dtype=hidden.dtype, device=hidden.device)
                   if want_hidden else None)
    grad_weight = (torch.zeros((vocab, dim), dtype=torch.float32, device=hidden.device)
                   if want_weight and not single else None)
    grad_bias = (torch.zeros(vocab, dtype=torch.float32, device=hidden.device)
                 if want_bias else None)
    for r0 in range(0, n_rows, chunk_tokens):
        r1 = min(r0 + chunk_tokens, n_rows)
        grid = (triton.cdiv(r1 - r0, config.block_n), triton.cdiv(vocab, config.block_v))
        _linear_dlogits_kernel[grid](
            hidden, weight, bias if bias is not None else entropy, labels, temp, state, entropy,
            grad_logp if grad_logp is not None else entropy,
            grad_entropy if grad_entropy is not None else entropy, dz,
            r0, r1, vocab, dim, hidden.stride(0), weight.stride(0), ignore_index, inv_t,
            HAS_BIAS=bias is not None, HAS_TEMPERATURE_TENSOR=has_temp,
            HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
            BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_D=config.block_d,
            UPCAST=upcast, PRECISION=precision, SHARDED=sharded, num_warps=config.num_warps,
            num_stages=config.num_stages)
        chunk = dz[: r1 - r0]
        if grad_hidden is not None:
            grad_hidden[r0:r1] = chunk @ weight
        if want_weight and single:
            grad_weight = chunk.T @ hidden
        elif want_weight:
            grad_weight += chunk.T @ hidden[r0:r1]
        if grad_bias is not None:
            grad_bias += chunk.sum(0, dtype=torch.float32)
    return grad_hidden, grad_weight, grad_bias


__all__ = ["DZ_CHUNK_BYTES", "FP32_PRECISIONS", "LinearConfig",
           "linear_backward", "linear_forward", "pick_linear_config"]
