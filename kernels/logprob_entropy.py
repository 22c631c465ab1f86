"""Fused per-token log-prob and entropy kernels over logits rows (forward and backward).

Forward (``_logprob_entropy_fwd_kernel``): one program per row streams the row once in
``BLOCK_V`` blocks into the per-row statistics of ``_common`` (one exp2 and a handful of
FMAs per element, every term non-negative), then writes logp, H and the per-row state
(M, log1p(rest)) from which the backward rebuilds log p_v without the rounding of a large
log-sum-exp. With ``ROW_STATISTICS`` it writes the raw statistics instead (one
vocabulary shard: combined across ranks by ``hapo_ops.vocab.row_statistics.combine_parts``).

Backward (``_logprob_entropy_bwd_kernel``): one read of the row and one write of the gradient
(into a new tensor, or in place over the logits):

    ∂/∂z_v = [g_lp·(1[v=y] - p_v) - g_H·p_v·(ln p_v + H)] / T.

``SHARDED`` keeps -g_lp·p_v on rows whose label another shard holds (the caller zeroes g_lp
where logp has no gradient).

Addresses are int64 (N·V passes 2^31 at 16k × 152k). Rows are addressed through two
strides (``_common.row_layout``), so a slice such as ``logits[:, :-1]`` needs no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hapo_ops.kernels._common import (LN2, LOG2E, NEG_LARGE, KernelConfig, RowLayout,
                                      addressable_rows, finish_row, mask_logprob, pick_config,
                                      row_layout, row_pointer, row_scales, row_statistics_above,
                                      saturate, temperature_args)


@triton.jit
def _logprob_entropy_fwd_kernel(
    logits_ptr, labels_ptr, temperature_ptr, logp_ptr, entropy_ptr, state_ptr, threshold_ptr,
    vocab, inner_rows, stride_outer, stride_inner, ignore_index, scalar_inv_temperature,
    HAS_TEMPERATURE_TENSOR: tl.constexpr, BLOCK_V: tl.constexpr,
    ROW_STATISTICS: tl.constexpr = False, HAS_THRESHOLD: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = row_pointer(logits_ptr, row, inner_rows, stride_outer, stride_inner)
    inv_t, scale = row_scales(temperature_ptr, row, row >= 0, scalar_inv_temperature,
                              HAS_TEMPERATURE_TENSOR)
    threshold = NEG_LARGE
    if HAS_THRESHOLD:  # a truncated distribution: only the entries z ≥ θ count
        threshold = tl.load(threshold_ptr + row)
    row_max, rest, spread = row_statistics_above(row_ptr, vocab, scale, threshold, BLOCK_V,
                                                 HAS_THRESHOLD)
    label = tl.load(labels_ptr + row).to(tl.int64)
    in_range = (label >= 0) & (label < vocab)
    label_logit = saturate(tl.load(row_ptr + tl.where(in_range, label, 0)))
    label_logit = tl.where(label_logit < threshold, NEG_LARGE, label_logit)
    if ROW_STATISTICS:
        # The columns of hapo_ops.vocab.row_statistics.RowStatistics, spread in nats.
        tl.store(state_ptr + 4 * row, row_max)
        tl.store(state_ptr + 4 * row + 1, rest)
        tl.store(state_ptr + 4 * row + 2, spread * LN2)
        tl.store(state_ptr + 4 * row + 3, label_logit)
    else:
        logp, entropy, log_norm = finish_row(row_max, rest, spread, label_logit, inv_t)
        tl.store(logp_ptr + row, mask_logprob(logp, label, vocab, ignore_index))
        tl.store(entropy_ptr + row, entropy)
        tl.store(state_ptr + 2 * row, row_max)
        tl.store(state_ptr + 2 * row + 1, log_norm)


@triton.jit
def _logprob_entropy_bwd_kernel(
    logits_ptr, grad_ptr, labels_ptr, temperature_ptr, state_ptr, entropy_ptr,
    grad_logp_ptr, grad_entropy_ptr, threshold_ptr,
    vocab, inner_rows, stride_outer, stride_inner, grad_stride_outer, grad_stride_inner,
    ignore_index, scalar_inv_temperature,
    HAS_TEMPERATURE_TENSOR: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, SHARDED: tl.constexpr = False,
    HAS_THRESHOLD: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = row_pointer(logits_ptr, row, inner_rows, stride_outer, stride_inner)
    grad_row_ptr = row_pointer(grad_ptr, row, inner_rows, grad_stride_outer, grad_stride_inner)
    inv_t, scale = row_scales(temperature_ptr, row, row >= 0, scalar_inv_temperature,
                              HAS_TEMPERATURE_TENSOR)
    row_max = tl.load(state_ptr + 2 * row)
    log2_norm = tl.load(state_ptr + 2 * row + 1) * LOG2E
    entropy = tl.load(entropy_ptr + row)
    g_entropy = 0.0
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row).to(tl.float32) * inv_t
    g_logp = 0.0
    label = tl.load(labels_ptr + row).to(tl.int64)
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + row).to(tl.float32) * inv_t
        if not SHARDED:
            label_ok = (label != ignore_index) & (label >= 0) & (label < vocab)
            g_logp = tl.where(label_ok, g_logp, 0.0)
    threshold = NEG_LARGE
    if HAS_THRESHOLD:
        threshold = tl.load(threshold_ptr + row)
    lanes = tl.arange(0, BLOCK_V)
    for start in range(0, vocab, BLOCK_V):
        offsets = start + lanes
        in_row = offsets < vocab
        z = saturate(tl.load(row_ptr + offsets, mask=in_row, other=float("-inf")))
        if HAS_THRESHOLD:
            z = tl.where(z < threshold, NEG_LARGE, z)
        log2_p = (z - row_max) * scale - log2_norm
        p = tl.exp2(log2_p)
        grad = tl.zeros([BLOCK_V], tl.float32)
        if HAS_GRAD_ENTROPY:
            grad -= g_entropy * (p * (log2_p * LN2 + entropy))
        if HAS_GRAD_LOGP:
            grad += g_logp * (tl.where(offsets == label, 1.0, 0.0) - p)
        tl.store(grad_row_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _launch_forward(logits, labels, temperature, scalar_temperature, ignore_index, outputs,
                    config, row_stats, threshold=None):
    logits, layout = addressable_rows(logits)
    n_rows = labels.numel()
    if n_rows == 0:
        return
    vocab = logits.shape[-1]
    config = config or pick_config(vocab, logits.dtype, "forward")
    logp, entropy, state = outputs
    temp, inv_t, has_temp = temperature_args(temperature, scalar_temperature, state)
    _logprob_entropy_fwd_kernel[(n_rows,)](
        logits, labels, temp, logp, entropy, state,
        threshold if threshold is not None else state,
        vocab, layout.inner_rows, layout.stride_outer, layout.stride_inner, ignore_index, inv_t,
        HAS_TEMPERATURE_TENSOR=has_temp, BLOCK_V=config.block_v, ROW_STATISTICS=row_stats,
        HAS_THRESHOLD=threshold is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def logprob_entropy_forward(logits: torch.Tensor, labels: torch.Tensor,
                            temperature: torch.Tensor | None, scalar_temperature: float,
                            ignore_index: int, *, config: KernelConfig | None = None,
                            threshold: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, H, state): logp and H flat float32 (N,), state (N, 2) = (M, log1p(rest)).

    logits (..., V) with a contiguous last dim; labels (N,) integer; temperature None (use
    ``scalar_temperature``) or (N,) float32; ``threshold`` None or (N,) float32 θ: the
    truncated distribution over the entries z ≥ θ (logp -inf for a label below θ).
    """
    n_rows = labels.numel()
    outputs = tuple(torch.empty(shape, dtype=torch.float32, device=logits.device)
                    for shape in ((n_rows,), (n_rows,), (n_rows, 2)))
    _launch_forward(logits, labels, temperature, scalar_temperature, ignore_index, outputs,
                    config, row_stats=False, threshold=threshold)
    return outputs


def logprob_entropy_row_statistics(logits: torch.Tensor, labels: torch.Tensor,
                                   temperature: torch.Tensor | None, scalar_temperature: float,
                                   *, config: KernelConfig | None = None,
                                   threshold: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 4) float32 columns of ``hapo_ops.vocab.row_statistics.RowStatistics`` (M, rest,
    spread in nats, label logit: meaningful where 0 ≤ label < V), for vocabulary shards;
    over the entries z ≥ ``threshold`` (N,) when given."""
    stats = torch.empty((labels.numel(), 4), dtype=torch.float32, device=logits.device)
    _launch_forward(logits, labels, temperature, scalar_temperature, 0, (stats, stats, stats),
                    config, row_stats=True, threshold=threshold)
    return stats


def logprob_entropy_backward(logits: torch.Tensor, labels: torch.Tensor,
                             temperature: torch.Tensor | None, scalar_temperature: float,
                             state: torch.Tensor, entropy: torch.Tensor,
                             grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                             ignore_index: int, *, inplace: bool = False,
                             config: KernelConfig | None = None,
                             sharded: bool = False,
                             threshold: torch.Tensor | None = None) -> torch.Tensor:
    """∂L/∂logits in the logits dtype: a new contiguous tensor or (``inplace``) the logits
    buffer itself (any layout: rows two strides cannot address are written through a copy).

    ``sharded``: ``logits`` is one vocabulary shard, ``labels`` are shard-local (outside
    [0, V) when another shard holds the label) and ``grad_logp`` is already zero where logp
    has no gradient; -g_lp·p_v then applies to every row, +g_lp only at a label in [0, V).
    ``threshold`` (N,): the gradient of the truncated distribution over the entries z ≥ θ
    (the caller zeroes g_lp where the label lies below θ).
    """
    if inplace and row_layout(logits) is None:
        # Rows two strides cannot address (a transposed or permuted tensor): the same
        # gradient, computed out of place and copied into the logits buffer.
        return logits.copy_(logprob_entropy_backward(
            logits, labels, temperature, scalar_temperature, state, entropy, grad_logp,
            grad_entropy, ignore_index, config=config, sharded=sharded, threshold=threshold))
    logits, layout = addressable_rows(logits)
    vocab = logits.shape[-1]
    n_rows = labels.numel()
    if inplace:
        grad, grad_layout = logits, layout
    else:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        # Contiguous rows, addressed with the logits' two-level row split.
        grad_layout = RowLayout(layout.inner_rows, layout.inner_rows * vocab, vocab)
    if n_rows == 0:
        return grad
    config = config or pick_config(vocab, logits.dtype, "backward")
    temp, inv_t, has_temp = temperature_args(temperature, scalar_temperature, entropy)
    _logprob_entropy_bwd_kernel[(n_rows,)](
        logits, grad, labels, temp, state, entropy,
        grad_logp if grad_logp is not None else entropy,
        grad_entropy if grad_entropy is not None else entropy,
        threshold if threshold is not None else entropy,
        vocab, layout.inner_rows, layout.stride_outer, layout.stride_inner,
        grad_layout.stride_outer, grad_layout.stride_inner, ignore_index, inv_t,
        HAS_TEMPERATURE_TENSOR=has_temp, HAS_GRAD_LOGP=grad_logp is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None, BLOCK_V=config.block_v, SHARDED=sharded,
        HAS_THRESHOLD=threshold is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return grad


__all__ = ["logprob_entropy_backward", "logprob_entropy_forward",
           "logprob_entropy_row_statistics"]
