"""One pass of the top-k/top-p threshold search (``hapo_ops.vocab.truncation``) over logits rows.

One program per row reads the row once in ``BLOCK_V`` blocks and sums, for each of the row's
``RADIX`` candidate thresholds θ_d (fp32 logits, increasing in d),

    W_d = Σ_{v: z_v ≥ θ_d} w_v,   w_v = 1                                  (counts, top-k)
                                  w_v = 2^((z_v - M)·log2(e)/T)·1[z_v ≥ lower]   (top-p mass)

as a (RADIX, BLOCK_V) comparison tile reduced per block: RADIX compare-and-select-adds per
logit, nothing written but the (N, RADIX) sums. The caller (``truncation.descend``) turns
the sums into the next D = log2(RADIX) bits of the threshold key and launches the next pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hapo_ops.kernels._common import (addressable_rows, row_pointer, row_scales,
                                      saturate, temperature_args)


@triton.jit
def _candidate_sums_kernel(
    logits_ptr, candidates_ptr, lower_ptr, row_max_ptr, temperature_ptr, out_ptr,
    vocab, inner_rows, stride_outer, stride_inner, scalar_inv_temperature,
    HAS_TEMPERATURE_TENSOR: tl.constexpr, WEIGHTED: tl.constexpr, RADIX: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = row_pointer(logits_ptr, row, inner_rows, stride_outer, stride_inner)
    digits = tl.arange(0, RADIX)
    candidates = tl.load(candidates_ptr + row * RADIX + digits)
    lanes = tl.arange(0, BLOCK_V)
    sums = tl.zeros([RADIX], tl.float32)
    scale = 0.0
    row_max = 0.0
    lower = 0.0
    if WEIGHTED:
        _, scale = row_scales(temperature_ptr, row, row >= 0, scalar_inv_temperature,
                              HAS_TEMPERATURE_TENSOR)
        row_max = tl.load(row_max_ptr + row)
        lower = tl.load(lower_ptr + row)
    for start in range(0, vocab, BLOCK_V):
        offsets = start + lanes
        in_row = offsets < vocab
        z = saturate(tl.load(row_ptr + offsets, mask=in_row, other=0.0))
        if WEIGHTED:
            weight = tl.exp2(tl.minimum((z - row_max) * scale, 0.0))
            weight = tl.where(in_row & (z >= lower), weight, 0.0)
        else:
            weight = tl.where(in_row, 1.0, 0.0)
        hit = z[None, :] >= candidates[:, None]
        sums += tl.sum(tl.where(hit, weight[None, :], 0.0), axis=1)
    tl.store(out_ptr + row * RADIX + digits, sums)


def candidate_sums(logits: torch.Tensor, candidates: torch.Tensor, lower: torch.Tensor | None,
                   row_max: torch.Tensor | None, temperature: torch.Tensor | None,
                   scalar_temperature: float, *, block_v: int = 256) -> torch.Tensor:
    """(N, R) float32 sums W_d over each row of ``logits`` (..., V) for the fp32 candidate
    thresholds ``candidates`` (N, R) (R a power of two): counts when ``row_max`` is None,
    else the masses e^((z - M)/T) of the entries ≥ ``lower`` (N,)."""
    logits, layout = addressable_rows(logits)
    n_rows, radix = candidates.shape
    out = torch.empty((n_rows, radix), dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return out
    vocab = logits.shape[-1]
    block_v = min(block_v, max(16, triton.next_power_of_2(vocab)))
    weighted = row_max is not None
    temp, inv_t, has_temp = temperature_args(temperature, scalar_temperature, out)
    _candidate_sums_kernel[(n_rows,)](
        logits, candidates.contiguous(), lower if weighted else out,
        row_max if weighted else out, temp, out,
        vocab, layout.inner_rows, layout.stride_outer, layout.stride_inner, inv_t,
        HAS_TEMPERATURE_TENSOR=has_temp, WEIGHTED=weighted, RADIX=radix, BLOCK_V=block_v,
        num_warps=4,
    )
    return out


__all__ = ["candidate_sums"]
