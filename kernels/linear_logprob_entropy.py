"""Fused LM head + log-prob + entropy kernels: logits tiles live on chip only.

Forward (``_linear_fwd_kernel``): a program owns BLOCK_N tokens and one vocabulary *split*
(a range of V, a multiple of BLOCK_V). For each (BLOCK_N, BLOCK_V) tile it accumulates
hidden · weightᵀ over D in BLOCK_D steps with ``tl.dot`` (fp32 accumulator, tensor cores
for 2-byte dtypes), adds the bias, scales to s = z·log2(e)/T with the helpers of
``logprob_entropy`` (``_scaled``: no FMA at the argmax) and folds the tile into per-row
running statistics (``_accumulate_tile``: the 2-D form of ``_accumulate_block``, per-row max,
rest off the max, tie count, spread; every term non-negative). Each (row, split) leaves four
fp32 numbers: split max, rest (mass off one argmax), spread, and s at the label when the label
falls in the split. ``merge_splits`` combines the splits exactly in PyTorch (O(N·splits)).
Splitting V gives the GPU enough programs at N = 8192 (64 token tiles alone would leave half
an H100 idle) and lets concurrent programs share weight tiles through L2.

Backward recomputes the tiles from the per-row state (max of s, log1p(rest)) and H:

    dz_v = [g_lp·(1[v=y] - p_v) - g_H·p_v·(ln p_v + H)] / T,   log2 p_v = (s_v - max) - log2(1+rest)

and never stores an N×V tensor. Default (``BACKWARD = "chunked"``): ``_linear_dlogits_kernel``
writes dz for a bounded token chunk (≤ ``DZ_CHUNK_BYTES``) and cuBLAS forms the two gradient
GEMMs (see ``linear_backward_chunked``). The no-buffer alternative (``BACKWARD = "fused"``):
  * ``_linear_bwd_hidden_kernel``: a program per token tile loops over vocabulary tiles and
    adds dz_tile · W_tile into its own rows of an fp32 (N, D) accumulator (no atomics:
    deterministic);
  * ``_linear_bwd_weight_kernel``: a program per vocabulary tile loops over token tiles and
    adds dz_tileᵀ · h_tile into its own rows of an fp32 (V, D) accumulator, and dz summed over
    tokens into the bias gradient.
The caller casts the accumulators to the input dtypes. dz is rounded to the input dtype
before the two products (as the unfused path's bf16 logits gradient is), so 2-byte inputs
use tensor cores there too.

Vocabulary shards (``hapo_ops.distributed``): ``linear_forward(raw_stats=True)`` returns the
merged per-row sums before normalisation, to be combined across ranks; ``sharded=True`` in
the backwards (the ``SHARDED`` constexpr) keeps -g_lp·p_v on rows whose label another shard
holds (shard-local label -1) and the one-hot term only at a label inside the shard.

Precision of ``tl.dot``: bf16/fp16 operands multiply exactly into fp32 accumulators. fp32
operands take ``input_precision`` from the caller (default "tf32x3" in ``hapo_ops.linear``:
close to fp32 accuracy on tensor cores; "ieee" is exact fp32 without tensor cores; "tf32"
~1e-3 relative). The Triton interpreter computes every dot with numpy in fp32 and gets bf16
products wrong, so under ``TRITON_INTERPRET=1`` operands are upcast to fp32 first
(``UPCAST`` constexpr). Offsets are int64 throughout (N·V and V·D pass 2^31).
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hapo_ops.kernels.logprob_entropy import _scaled  # the jit helper (no FMA at the argmax)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NEG_LARGE = -1.0e30
FP32_PRECISIONS = ("tf32x3", "ieee", "tf32")
_TRITON_VERSION = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])


class LinearConfig(NamedTuple):
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pick_linear_config(dtype: torch.dtype, pass_: str = "forward") -> LinearConfig:
    """Tile sizes per pass and dtype (a rule, not tuned on hardware yet: no GPU was lent when
    this was written). 128×128 output tiles with 64-deep (2-byte) or 32-deep (fp32) K steps
    are the usual Hopper GEMM shape that fits three pipeline stages in shared memory; the
    backward's extra (BLOCK, BLOCK_D) fp32 accumulator tile asks for a smaller token tile.
    The interpreter gets 16-wide tiles (the smallest ``tl.dot`` accepts) to keep tests fast.
    """
    if interpreting():
        return LinearConfig(16, 16, 16, 1, 1)
    wide = torch.empty((), dtype=dtype).element_size() <= 2
    block_d = 64 if wide else 32
    if pass_ == "forward":
        return LinearConfig(128, 128, block_d, 8, 3)
    # Triton 3.2 aborts the process (LinearLayout::reshapeOuts assertion) compiling the fused
    # backward's second tl.dot for 2-byte dtypes with a 64-token tile on 8 warps (checked by
    # compiling for sm_90 with 3.2 to 3.6: 3.3 and later are fine); 4 warps compile there.
    warps = 4 if wide and _TRITON_VERSION < (3, 3) else 8
    return LinearConfig(64, 128, block_d, warps, 3)


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, dim,
                 stride_h, stride_w, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 tile of hidden[rows] · weight[cols]ᵀ (+ bias[cols]); rows and
    cols int64, lanes outside the masks read zeros."""
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
    return acc


@triton.jit
def _row_scale_vec(temperature_ptr, rows, row_ok, scalar_inv_temperature,
                   HAS_TEMPERATURE_TENSOR: tl.constexpr, BLOCK_N: tl.constexpr):
    """(1/T, log2(e)/T) per row, computed identically by the forward and both backwards (the
    vector form of ``_row_scales``) so that s - max is exactly 0 at the argmax."""
    inv_t = tl.full([BLOCK_N], scalar_inv_temperature, tl.float32)
    if HAS_TEMPERATURE_TENSOR:
        inv_t = 1.0 / tl.load(temperature_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
    return inv_t, inv_t * 1.4426950408889634


@triton.jit
def _accumulate_tile(s, row_max, rest, spread, ties):
    """Fold a (BLOCK_N, BLOCK_V) tile of scaled logits into per-row statistics.

    The 2-D form of ``logprob_entropy._accumulate_block`` (which keeps per-lane sums and one
    scalar max, so it cannot take a tile): per row, M = running max, rest = Σ 2^(s-M) over
    entries below M, ties = count of entries equal to M, spread = Σ 2^(s-M)(M-s). Rows whose
    max rises are rescaled (selected with ``tl.where``: no per-row branch in a tile).
    """
    tile_max = tl.max(s, axis=1)
    raised = tile_max > row_max
    new_max = tl.maximum(row_max, tile_max)
    shift = new_max - row_max
    factor = tl.exp2(-shift)
    at_old_max = rest + ties
    spread = tl.where(raised, factor * spread + (factor * shift) * at_old_max, spread)
    rest = tl.where(raised, factor * at_old_max, rest)
    ties = tl.where(raised, 0.0, ties)
    d = s - new_max[:, None]
    is_max = d == 0.0
    weight = tl.exp2(tl.where(is_max, float("-inf"), d))
    rest += tl.sum(weight, axis=1)
    spread -= tl.sum(weight * d, axis=1)
    ties += tl.sum(tl.where(is_max, 1.0, 0.0), axis=1)
    return new_max, rest, spread, ties


@triton.jit
def _grad_tile(s, row_max, log2_norm, entropy, g_logp, g_entropy, labels, cols, inv_t,
               HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr):
    """dz for a tile (fp32), from s (log2 units) and the per-row forward state."""
    log2_p = (s - row_max[:, None]) - log2_norm[:, None]
    p = tl.exp2(log2_p)
    grad = tl.zeros(s.shape, tl.float32)
    if HAS_GRAD_ENTROPY:
        surprise = log2_p * 0.6931471805599453 + entropy[:, None]
        grad -= g_entropy[:, None] * tl.where(p > 0.0, p * surprise, 0.0)
    if HAS_GRAD_LOGP:
        grad += g_logp[:, None] * (tl.where(cols[None, :] == labels[:, None], 1.0, 0.0) - p)
    return grad * inv_t[:, None]


@triton.jit
def _row_grads(state_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, labels_ptr, rows,
               row_ok, vocab, ignore_index, HAS_GRAD_LOGP: tl.constexpr,
               HAS_GRAD_ENTROPY: tl.constexpr, SHARDED: tl.constexpr):
    """Per-row backward inputs: (max, log2(1+rest), H, g_logp, g_H, label).

    SHARDED: the weight is one vocabulary shard, labels are shard-local (-1 where another
    shard holds the label) and the caller already zeroed g_logp where logp has no gradient;
    g_logp is then kept on every row (-g_lp·p applies to all of them) and the one-hot term
    of ``_grad_tile`` matches only a label inside this shard."""
    row_max = tl.load(state_ptr + 2 * rows, mask=row_ok, other=0.0)
    log2_norm = tl.load(state_ptr + 2 * rows + 1, mask=row_ok, other=0.0) * 1.4426950408889634
    entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    g_logp = tl.zeros(row_max.shape, tl.float32)
    if HAS_GRAD_LOGP:
        if SHARDED:
            g_logp = tl.load(grad_logp_ptr + rows, mask=row_ok, other=0.0)
        else:
            label_ok = row_ok & (labels != ignore_index) & (labels >= 0) & (labels < vocab)
            g_logp = tl.where(label_ok, tl.load(grad_logp_ptr + rows, mask=label_ok, other=0.0),
                              0.0)
    g_entropy = tl.zeros(row_max.shape, tl.float32)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0)
    return row_max, log2_norm, entropy, g_logp, g_entropy, labels


# --------------------------------------------------------------------------- kernels


@triton.jit
def _linear_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, temperature_ptr,
    max_ptr, rest_ptr, spread_ptr, label_s_ptr,
    n_rows, vocab, dim, stride_h, stride_w, split_size, scalar_inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_TEMPERATURE_TENSOR: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < n_rows
    _, scale = _row_scale_vec(temperature_ptr, rows, row_ok, scalar_inv_temperature,
                              HAS_TEMPERATURE_TENSOR, BLOCK_N)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    row_max = tl.full([BLOCK_N], -1.0e30, tl.float32)
    rest = tl.zeros([BLOCK_N], tl.float32)
    spread = tl.zeros([BLOCK_N], tl.float32)
    ties = tl.zeros([BLOCK_N], tl.float32)
    label_s = tl.zeros([BLOCK_N], tl.float32)
    v_start = split * split_size
    v_stop = tl.minimum(v_start + split_size, vocab)
    lanes_v = tl.arange(0, BLOCK_V).to(tl.int64)
    for v0 in range(v_start, v_stop, BLOCK_V):
        cols = v0 + lanes_v
        col_ok = cols < v_stop
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, dim,
                         stride_h, stride_w, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST,
                         PRECISION)
        s = tl.where(col_ok[None, :], _scaled(z, scale[:, None]), -1.0e30)
        row_max, rest, spread, ties = _accumulate_tile(s, row_max, rest, spread, ties)
        label_s += tl.sum(tl.where(cols[None, :] == labels[:, None], s, 0.0), axis=1)
    out = split * n_rows + rows
    tl.store(max_ptr + out, row_max, mask=row_ok)
    tl.store(rest_ptr + out, rest + (ties - 1.0), mask=row_ok)
    tl.store(spread_ptr + out, spread, mask=row_ok)
    tl.store(label_s_ptr + out, label_s, mask=row_ok)


@triton.jit
def _row_backward_terms(temperature_ptr, state_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
                        labels_ptr, rows, row_ok, vocab, ignore_index, scalar_inv_temperature,
                        HAS_TEMPERATURE_TENSOR: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr,
                        HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr,
                        SHARDED: tl.constexpr):
    """Everything the backward needs per row of a token tile:
    (1/T, log2(e)/T, row max, log2 norm, H, g_logp, g_H, labels)."""
    inv_t, scale = _row_scale_vec(temperature_ptr, rows, row_ok, scalar_inv_temperature,
                                  HAS_TEMPERATURE_TENSOR, BLOCK_N)
    row_max, log2_norm, entropy, g_logp, g_entropy, labels = _row_grads(
        state_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, labels_ptr, rows, row_ok,
        vocab, ignore_index, HAS_GRAD_LOGP, HAS_GRAD_ENTROPY, SHARDED)
    return inv_t, scale, row_max, log2_norm, entropy, g_logp, g_entropy, labels


@triton.jit
def _recomputed_grad_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, dim,
                          stride_h, stride_w, inv_t, scale, row_max, log2_norm, entropy, g_logp,
                          g_entropy, labels, HAS_BIAS: tl.constexpr,
                          HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """∂L/∂z on one (token, vocabulary) tile: the logits tile recomputed on chip, then the
    gradient formula; zero outside the matrix."""
    z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, dim,
                     stride_h, stride_w, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION)
    dz = _grad_tile(_scaled(z, scale[:, None]), row_max, log2_norm, entropy, g_logp, g_entropy,
                    labels, cols, inv_t, HAS_GRAD_LOGP, HAS_GRAD_ENTROPY)
    return tl.where(row_ok[:, None] & col_ok[None, :], dz, 0.0)


@triton.jit
def _linear_bwd_hidden_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, temperature_ptr, state_ptr, entropy_ptr,
    grad_logp_ptr, grad_entropy_ptr, grad_hidden_ptr,
    n_rows, vocab, dim, stride_h, stride_w, ignore_index, scalar_inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_TEMPERATURE_TENSOR: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, SHARDED: tl.constexpr = False,
):
    """grad_hidden (fp32, (N, D), zero-initialised, contiguous) += dz · W over all of V."""
    pid_n = tl.program_id(0).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < n_rows
    inv_t, scale, row_max, log2_norm, entropy, g_logp, g_entropy, labels = _row_backward_terms(
        temperature_ptr, state_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, labels_ptr,
        rows, row_ok, vocab, ignore_index, scalar_inv_temperature, HAS_TEMPERATURE_TENSOR,
        HAS_GRAD_LOGP, HAS_GRAD_ENTROPY, BLOCK_N, SHARDED)
    lanes_v = tl.arange(0, BLOCK_V).to(tl.int64)
    lanes_d = tl.arange(0, BLOCK_D)
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + lanes_v
        col_ok = cols < vocab
        dz = _recomputed_grad_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok,
                                   dim, stride_h, stride_w, inv_t, scale, row_max, log2_norm,
                                   entropy, g_logp, g_entropy, labels, HAS_BIAS, HAS_GRAD_LOGP,
                                   HAS_GRAD_ENTROPY, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST,
                                   PRECISION)
        dz = dz.to(weight_ptr.dtype.element_ty)  # as the unfused path's logits gradient
        if UPCAST:
            dz = dz.to(tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            k = d0 + lanes_d
            k_ok = k < dim
            w = tl.load(weight_ptr + cols[:, None] * stride_w + k[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            out = grad_hidden_ptr + rows[:, None] * dim + k[None, :]
            out_mask = row_ok[:, None] & k_ok[None, :]
            acc = tl.load(out, mask=out_mask, other=0.0)
            acc = tl.dot(dz, w, acc, input_precision=PRECISION)
            tl.store(out, acc, mask=out_mask)


@triton.jit
def _linear_bwd_weight_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, temperature_ptr, state_ptr, entropy_ptr,
    grad_logp_ptr, grad_entropy_ptr, grad_weight_ptr, grad_bias_ptr,
    n_rows, vocab, dim, stride_h, stride_w, ignore_index, scalar_inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_TEMPERATURE_TENSOR: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, WANT_WEIGHT: tl.constexpr,
    WANT_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    SHARDED: tl.constexpr = False,
):
    """grad_weight (fp32, (V, D), zeros, contiguous) += dzᵀ · h over all tokens; grad_bias
    (fp32, (V,)) = Σ_tokens dz."""
    pid_v = tl.program_id(0).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    col_ok = cols < vocab
    lanes_n = tl.arange(0, BLOCK_N).to(tl.int64)
    lanes_d = tl.arange(0, BLOCK_D)
    bias_acc = tl.zeros([BLOCK_V], tl.float32)
    for n0 in range(0, n_rows, BLOCK_N):
        rows = n0 + lanes_n
        row_ok = rows < n_rows
        inv_t, scale, row_max, log2_norm, entropy, g_logp, g_entropy, labels = (
            _row_backward_terms(
                temperature_ptr, state_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
                labels_ptr, rows, row_ok, vocab, ignore_index, scalar_inv_temperature,
                HAS_TEMPERATURE_TENSOR, HAS_GRAD_LOGP, HAS_GRAD_ENTROPY, BLOCK_N, SHARDED))
        dz = _recomputed_grad_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok,
                                   dim, stride_h, stride_w, inv_t, scale, row_max, log2_norm,
                                   entropy, g_logp, g_entropy, labels, HAS_BIAS, HAS_GRAD_LOGP,
                                   HAS_GRAD_ENTROPY, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST,
                                   PRECISION)
        if WANT_BIAS:
            bias_acc += tl.sum(dz, axis=0)
        if WANT_WEIGHT:
            dz_t = tl.trans(dz.to(hidden_ptr.dtype.element_ty))
            if UPCAST:
                dz_t = dz_t.to(tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                k = d0 + lanes_d
                k_ok = k < dim
                h = tl.load(hidden_ptr + rows[:, None] * stride_h + k[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                out = grad_weight_ptr + cols[:, None] * dim + k[None, :]
                out_mask = col_ok[:, None] & k_ok[None, :]
                acc = tl.load(out, mask=out_mask, other=0.0)
                acc = tl.dot(dz_t, h, acc, input_precision=PRECISION)
                tl.store(out, acc, mask=out_mask)
    if WANT_BIAS:
        tl.store(grad_bias_ptr + cols, bias_acc, mask=col_ok)


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
    dtype: a GEMM-shaped grid (token tiles × vocabulary tiles) with the gradient as epilogue."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rows = row_start + local
    row_ok = rows < row_stop
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    col_ok = cols < vocab
    inv_t, scale, row_max, log2_norm, entropy, g_logp, g_entropy, labels = _row_backward_terms(
        temperature_ptr, state_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, labels_ptr,
        rows, row_ok, vocab, ignore_index, scalar_inv_temperature, HAS_TEMPERATURE_TENSOR,
        HAS_GRAD_LOGP, HAS_GRAD_ENTROPY, BLOCK_N, SHARDED)
    dz = _recomputed_grad_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, dim,
                               stride_h, stride_w, inv_t, scale, row_max, log2_norm, entropy,
                               g_logp, g_entropy, labels, HAS_BIAS, HAS_GRAD_LOGP,
                               HAS_GRAD_ENTROPY, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION)
    tl.store(dz_ptr + local[:, None] * vocab + cols[None, :],
             dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------- launchers


def _dot_args(dtype: torch.dtype, fp32_precision: str) -> tuple[bool, str | None]:
    """(UPCAST, PRECISION) for ``tl.dot`` on operands of ``dtype``."""
    upcast = interpreting() and dtype != torch.float32
    precision = fp32_precision if dtype == torch.float32 else None
    return upcast, precision


def _temperature_args(temperature: torch.Tensor | None, scalar_temperature: float, dummy):
    if temperature is None:
        return dummy, 1.0 / scalar_temperature, False
    return temperature, 1.0, True


def _num_splits(n_rows: int, vocab: int, config: LinearConfig, device: torch.device) -> int:
    """Vocabulary splits so that the grid has about two programs per SM (one split on CPU)."""
    vocab_tiles = triton.cdiv(vocab, config.block_v)
    if device.type != "cuda":
        return 1
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    token_tiles = triton.cdiv(n_rows, config.block_n)
    return max(1, min(vocab_tiles, triton.cdiv(programs, token_tiles)))


def merge_splits(row_max: torch.Tensor, rest: torch.Tensor, spread: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact merge of per-split statistics (S, N) (log2 units, rest off each split's argmax)
    into (max, rest, spread) per row: the argmax split contributes its own rest, every other
    split its whole mass 2^(m_s-M)(1+rest_s); no subtraction anywhere."""
    total_max, best = row_max.max(0, keepdim=True)
    factor = torch.exp2(row_max - total_max)                      # 0 for empty splits
    mass = factor * (1.0 + rest)
    rest_total = mass.scatter(0, best, rest.gather(0, best)).sum(0)
    spread_total = (factor * (spread + (total_max - row_max) * (1.0 + rest))).sum(0)
    return total_max[0], rest_total, spread_total


def linear_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   labels: torch.Tensor, temperature: torch.Tensor | None,
                   scalar_temperature: float, ignore_index: int, fp32_precision: str = "tf32x3",
                   *, config: LinearConfig | None = None, splits: int | None = None,
                   raw_stats: bool = False):
    """(logp, H, state) from hidden (N, D), weight (V, D) (last dims contiguous), labels (N,)
    and temperature None or (N,) float32; state (N, 2) = (max of s in log2 units, log1p(rest)).

    ``raw_stats`` (one vocabulary shard, ``hapo_ops.distributed``): return instead the (N, 4)
    float32 per-row sums [m, rest, spread, s_y] in log2 units before normalisation (the
    columns of ``token_stats.row_statistics``; s_y is 0 where the label is outside [0, V))."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    config = config or pick_linear_config(hidden.dtype, "forward")
    splits = splits or _num_splits(n_rows, vocab, config, hidden.device)
    split_size = triton.cdiv(triton.cdiv(vocab, splits), config.block_v) * config.block_v
    splits = triton.cdiv(vocab, split_size)
    parts = torch.empty((4, splits, n_rows), dtype=torch.float32, device=hidden.device)
    upcast, precision = _dot_args(hidden.dtype, fp32_precision)
    temp, inv_t, has_temp = _temperature_args(temperature, scalar_temperature, parts)
    grid = (triton.cdiv(n_rows, config.block_n), splits)
    _linear_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else parts, labels, temp,
        parts[0], parts[1], parts[2], parts[3],
        n_rows, vocab, dim, hidden.stride(0), weight.stride(0), split_size, inv_t,
        HAS_BIAS=bias is not None, HAS_TEMPERATURE_TENSOR=has_temp, BLOCK_N=config.block_n,
        BLOCK_V=config.block_v, BLOCK_D=config.block_d, UPCAST=upcast, PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    row_max, rest, spread = merge_splits(parts[0], parts[1], parts[2])
    label_s = parts[3].sum(0)  # one split holds s at the label, the others 0 (exact)
    if raw_stats:
        return torch.stack((row_max, rest, spread, label_s), dim=1)
    log_norm = torch.log1p(rest)
    entropy = log_norm + LN2 * spread / (1.0 + rest)
    logp = (label_s - row_max) * LN2 - log_norm
    in_range = (labels >= 0) & (labels < vocab)
    logp = torch.where(in_range, logp, torch.full_like(logp, float("nan")))
    logp = torch.where(labels == ignore_index, torch.zeros_like(logp), logp)
    state = torch.stack((row_max, log_norm), dim=1)
    return logp, entropy, state


def linear_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    labels: torch.Tensor, temperature: torch.Tensor | None,
                    scalar_temperature: float, state: torch.Tensor, entropy: torch.Tensor,
                    grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                    ignore_index: int, fp32_precision: str = "tf32x3", *,
                    want_hidden: bool = True, want_weight: bool = True, want_bias: bool = True,
                    config: LinearConfig | None = None, sharded: bool = False
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad_hidden, grad_weight, grad_bias) as fp32 accumulators (None where not wanted);
    grad_logp / grad_entropy None or (N,) float32 contiguous.

    ``sharded``: ``weight`` is one vocabulary shard, ``labels`` shard-local (-1 where another
    shard holds the label), ``grad_logp`` already zero where logp has no gradient, ``state``
    the global (max, log1p(rest)); -g_lp·p_v applies on every row, +g_lp only at a label in
    [0, V). grad_hidden is then this shard's part dz_r · W_r (the caller sums the shards)."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    config = config or pick_linear_config(hidden.dtype, "backward")
    upcast, precision = _dot_args(hidden.dtype, fp32_precision)
    temp, inv_t, has_temp = _temperature_args(temperature, scalar_temperature, entropy)
    want_bias = want_bias and bias is not None
    common = dict(HAS_BIAS=bias is not None, HAS_TEMPERATURE_TENSOR=has_temp,
                  HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
                  BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_D=config.block_d,
                  UPCAST=upcast, PRECISION=precision, SHARDED=sharded,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    args = (hidden, weight, bias if bias is not None else entropy, labels, temp, state, entropy,
            grad_logp if grad_logp is not None else entropy,
            grad_entropy if grad_entropy is not None else entropy)
    grad_hidden = grad_weight = grad_bias = None
    if want_hidden:
        grad_hidden = torch.zeros((n_rows, dim), dtype=torch.float32, device=hidden.device)
        _linear_bwd_hidden_kernel[(triton.cdiv(n_rows, config.block_n),)](
            *args, grad_hidden, n_rows, vocab, dim, hidden.stride(0), weight.stride(0),
            ignore_index, inv_t, **common)
    if want_weight or want_bias:
        if want_weight:
            grad_weight = torch.zeros((vocab, dim), dtype=torch.float32, device=hidden.device)
        if want_bias:
            grad_bias = torch.empty(vocab, dtype=torch.float32, device=hidden.device)
        _linear_bwd_weight_kernel[(triton.cdiv(vocab, config.block_v),)](
            *args, grad_weight if want_weight else entropy,
            grad_bias if want_bias else entropy, n_rows, vocab, dim, hidden.stride(0),
            weight.stride(0), ignore_index, inv_t, WANT_WEIGHT=want_weight, WANT_BIAS=want_bias,
            **common)
    return grad_hidden, grad_weight, grad_bias


# Backward strategy. "chunked" (default): per token chunk, a GEMM-shaped kernel recomputes the
# logits tiles and writes dz (chunk × V, input dtype, at most DZ_CHUNK_BYTES), then cuBLAS
# forms d_hidden[chunk] = dz · W (fp32 accumulation inside the GEMM, over all of V at once)
# and d_weight += dzᵀ · h[chunk] (an fp32 accumulator across chunks; each chunk's product is
# rounded to the input dtype once, like the unfused path's). Cost: one recomputed GEMM plus
# the two GEMMs the unfused backward does anyway. "fused": the two kernels above, no dz
# buffer at all, but each program re-reads and re-writes its fp32 accumulator rows once per
# tile of the other dimension (O(N·V·D / BLOCK) bytes): kept as the no-buffer reference.
BACKWARD = "chunked"
DZ_CHUNK_BYTES = 1 << 29  # 512 MiB: ~10% of the bf16 logits at 16k × 152k


def linear_backward_chunked(hidden, weight, bias, labels, temperature, scalar_temperature,
                            state, entropy, grad_logp, grad_entropy, ignore_index,
                            fp32_precision="tf32x3", *, want_hidden=True, want_weight=True,
                            want_bias=True, config: LinearConfig | None = None,
                            chunk_rows: int | None = None, sharded: bool = False):
    """Same contract as :func:`linear_backward`, except that grad_hidden comes in the input
    dtype (each row is one GEMM over all of V: nothing to accumulate across chunks), and so
    does grad_weight when one chunk covers every token."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    config = config or pick_linear_config(hidden.dtype, "forward")
    upcast, precision = _dot_args(hidden.dtype, fp32_precision)
    temp, inv_t, has_temp = _temperature_args(temperature, scalar_temperature, entropy)
    want_bias = want_bias and bias is not None
    if chunk_rows is None:
        chunk_rows = DZ_CHUNK_BYTES // max(1, vocab * hidden.element_size())
        chunk_rows = max(config.block_n, chunk_rows // config.block_n * config.block_n)
    chunk_rows = min(chunk_rows, n_rows)
    dz = torch.empty((chunk_rows, vocab), dtype=hidden.dtype, device=hidden.device)
    single = chunk_rows >= n_rows
    grad_hidden = (torch.empty((n_rows, dim), dtype=hidden.dtype, device=hidden.device)
                   if want_hidden else None)
    grad_weight = (torch.zeros((vocab, dim), dtype=torch.float32, device=hidden.device)
                   if want_weight and not single else None)
    grad_bias = (torch.zeros(vocab, dtype=torch.float32, device=hidden.device)
                 if want_bias else None)
    for r0 in range(0, n_rows, chunk_rows):
        r1 = min(r0 + chunk_rows, n_rows)
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


__all__ = ["BACKWARD", "DZ_CHUNK_BYTES", "FP32_PRECISIONS", "LinearConfig", "linear_backward",
           "linear_backward_chunked", "linear_forward",
           "merge_splits", "pick_linear_config"]
