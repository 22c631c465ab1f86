"""Fused adaptive-temperature sampling kernel (HAPO, arXiv 2509.16591, §3.1).

One program per row, two reads of the row, O(B) outputs (nothing of size B×V is written):

1. T = 1 pass: the row's entropy H with the statistics of the log-prob kernel
   (``_common.row_statistics``, same block size and order, so H is bitwise the value of
   ``token_entropy``); then, from the ``EntropyStats`` scalars, ℓ = ln(max(H, ε)),
   ĥ = clamp((ℓ - m)/max(ℓ_max - m, ε) or the variant's branch below m, -1, 1) and
   T = T_base·(1 + τ·ĥ), the formula of ``adaptive_temperature``.
2. Sampling pass at that T, Gumbel-max (equivalently an exponential race):
   token = argmax_v (z_v - M)·log2(e)/T - log2(E_v), E_v ~ Exp(1) i.i.d., while
   ``_common.accumulate_block`` folds the same loads into the normaliser at T, so that the
   behaviour log-prob comes out of this pass (bitwise the value of
   ``token_logprobs(..., temperature=T)``).

Random numbers: counter-based Philox4x32-10 (``tl.philox``), key = the 64-bit seed,
counter = (v // 4, 0, row_id low, row_id high); vocabulary entry v takes output v % 4.
A draw therefore depends only on (seed, row_id, v): not on the batch a row sits in, its
position, the block size or the launch. E = -ln(1 - w) with w = (k + 1/2)·2^-23 from the top
23 bits (w strictly inside (0, 1), so E is finite and positive), through a series for small
w: no accuracy is lost where E is tiny, which is where a token wins. Entries at -inf (or
below -1e30) get the key -inf and are never drawn while the row has a finite entry.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hapo_ops.kernels._common import (LOG2E, NEG_LARGE, KernelConfig, accumulate_block,
                                      addressable_rows, finish_row, pick_config, row_pointer,
                                      row_statistics, saturate)


@triton.jit
def _adaptive_temperature(entropy, stats_ptr, base_temperature, tau, eps,
                          HAS_STATS: tl.constexpr, PAPER: tl.constexpr):
    """T = T_base·(1 + τ·ĥ) with ĥ of ``normalized_entropy`` (same ``eps``), in fp32."""
    temperature = tl.full([], base_temperature, tl.float32)
    if HAS_STATS:
        pivot = tl.load(stats_ptr)
        log_max = tl.load(stats_ptr + 1)
        log_min = tl.load(stats_ptr + 2)
        ell = tl.log(tl.maximum(entropy, eps))
        above = (ell - pivot) / tl.maximum(log_max - pivot, eps)
        if PAPER:
            gap = ell - pivot
        else:
            gap = pivot - ell
        below = gap / tl.maximum(pivot - log_min, eps)
        h_hat = tl.where(ell > pivot, above, below)
        h_hat = tl.minimum(tl.maximum(h_hat, -1.0), 1.0)
        temperature = base_temperature * (1.0 + tau * h_hat)
    return temperature


@triton.jit
def _exponential_log2(bits):
    """log2(E), E = -ln(1 - w) ~ Exp(1), w = (bits >> 9 + 1/2)·2^-23 ∈ (0, 1); a Taylor
    series (relative error < w^7/8) where w < 0.05, so small E keeps full precision."""
    w = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    series = w * (1.0 + w * (0.5 + w * (1.0 / 3.0 + w * (0.25 + w * (0.2 + w * (1.0 / 6.0
                                                                               + w / 7.0))))))
    exponential = tl.where(w < 0.05, series, -tl.log(1.0 - w))
    return tl.log2(exponential)


@triton.jit
def _random_bits(seed, start, row_lo, row_hi, BLOCK_V: tl.constexpr):
    """BLOCK_V Philox outputs for vocabulary entries start … start + BLOCK_V - 1: entry v is
    output v % 4 of the counter (v // 4, 0, row_lo, row_hi) (``start`` divisible by 4)."""
    quads = (start // 4 + tl.arange(0, BLOCK_V // 4)).to(tl.uint32)
    zero = quads * 0
    r0, r1, r2, r3 = tl.philox(seed, quads, zero, zero + row_lo, zero + row_hi)
    return tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK_V])


@triton.jit
def _adaptive_sample_kernel(
    logits_ptr, stats_ptr, seed_ptr, row_ids_ptr,
    tokens_ptr, temperature_ptr, logp_ptr, entropy_ptr,
    vocab, inner_rows, stride_outer, stride_inner, base_temperature, tau, eps,
    HAS_STATS: tl.constexpr, PAPER: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = row_pointer(logits_ptr, row, inner_rows, stride_outer, stride_inner)

    # Pass 1: the T = 1 entropy (the log-prob kernel's statistics), then the row's temperature.
    row_max, rest_1, spread_1 = row_statistics(row_ptr, vocab, LOG2E, BLOCK_V)
    _, entropy, _ = finish_row(row_max, rest_1, spread_1, row_max, 1.0)
    temperature = _adaptive_temperature(entropy, stats_ptr, base_temperature, tau, eps,
                                        HAS_STATS, PAPER)

    # Pass 2: Gumbel-max at T and the normaliser at T, from the same loads; the statistics
    # accumulate exactly as the log-prob kernel's do, so logp is bitwise its value at T.
    inv_t = 1.0 / temperature
    scale = inv_t * LOG2E
    seed = tl.load(seed_ptr)
    row_id = tl.load(row_ids_ptr + row).to(tl.int64)
    row_lo = (row_id & 0xFFFFFFFF).to(tl.uint32)
    row_hi = ((row_id >> 32) & 0xFFFFFFFF).to(tl.uint32)
    lanes = tl.arange(0, BLOCK_V)
    running_max = tl.full([], NEG_LARGE, tl.float32)
    rest = tl.zeros([BLOCK_V], tl.float32)
    spread = tl.zeros([BLOCK_V], tl.float32)
    ties = tl.zeros([BLOCK_V], tl.float32)
    best_key = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK_V], tl.int32)
    z_next = tl.load(row_ptr + lanes, mask=lanes < vocab, other=float("-inf"))
    for start in range(0, vocab, BLOCK_V):
        z = saturate(z_next)
        offsets = start + BLOCK_V + lanes
        z_next = tl.load(row_ptr + offsets, mask=offsets < vocab, other=float("-inf"))
        running_max, rest, spread, ties = accumulate_block(z, scale, running_max, rest, spread,
                                                           ties)
        log2_e = _exponential_log2(_random_bits(seed, start, row_lo, row_hi, BLOCK_V))
        key = tl.where(z <= NEG_LARGE, float("-inf"), (z - row_max) * scale - log2_e)
        better = key > best_key
        best_key = tl.where(better, key, best_key)
        best_index = tl.where(better, start + lanes, best_index)
    top = tl.max(best_key, axis=0)
    token = tl.min(tl.where(best_key == top, best_index, 2147483647), axis=0).to(tl.int64)
    rest_total = tl.sum(rest, axis=0) + (tl.sum(ties, axis=0) - 1.0)
    logp, _, _ = finish_row(running_max, rest_total, tl.sum(spread, axis=0),
                            saturate(tl.load(row_ptr + token)), inv_t)

    # A row with no distribution (all -inf) or a NaN logit: token 0 and NaN elsewhere, as
    # the torch path (sampling.py) documents.
    undefined = entropy != entropy
    nan = float("nan")
    tl.store(tokens_ptr + row, tl.where(undefined, 0, token))
    tl.store(temperature_ptr + row, tl.where(undefined, nan, temperature))
    tl.store(logp_ptr + row, tl.where(undefined, nan, logp))
    tl.store(entropy_ptr + row, entropy)


def adaptive_sample_forward(logits: torch.Tensor, stats: torch.Tensor | None,
                            seed: torch.Tensor, row_ids: torch.Tensor, *,
                            base_temperature: float, tau: float, paper: bool, eps: float,
                            config: KernelConfig | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens int64, temperature, logp, entropy float32), each (B,), from logits (B, V).

    stats: None or (3,) float32 (pivot, log_max, log_min) on the logits' device; seed: (1,)
    int64 on that device (read in-kernel: no host sync); row_ids: (B,) int64 RNG row
    identities; eps: the floor of H and of the scales in ĥ (``normalized_entropy``'s eps).
    """
    logits, layout = addressable_rows(logits)
    n_rows, vocab = logits.shape
    device = logits.device
    tokens = torch.empty(n_rows, dtype=torch.int64, device=device)
    temperature, logp, entropy = (torch.empty(n_rows, dtype=torch.float32, device=device)
                                  for _ in range(3))
    if n_rows == 0:
        return tokens, temperature, logp, entropy
    config = config or pick_config(vocab, logits.dtype, "sample")
    _adaptive_sample_kernel[(n_rows,)](
        logits, stats if stats is not None else temperature, seed, row_ids,
        tokens, temperature, logp, entropy,
        vocab, layout.inner_rows, layout.stride_outer, layout.stride_inner,
        float(base_temperature), float(tau), float(eps),
        HAS_STATS=stats is not None, PAPER=paper, BLOCK_V=config.block_v,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return tokens, temperature, logp, entropy


__all__ = ["adaptive_sample_forward"]
