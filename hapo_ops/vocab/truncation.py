"""Truncated next-token distributions: what a rollout engine samples from after top-k/top-p,
rebuilt in the trainer, either replayed from the kept token set the engine returns or
recomputed from the trainer's own logits. The one home of the truncation rule (the sampler
and the logits op both use it) and of the kept-set algebra.

A truncated distribution keeps a set S of token ids per position and renormalizes:

    p_v = softmax(z/T)_v / Σ_{u∈S} softmax(z/T)_u  for v ∈ S, 0 elsewhere,
    logp = log p_y  (-inf for y ∉ S),   H = -Σ_{v∈S} p_v log p_v,

i.e. the full-vocabulary formulas of ``hapo_ops.vocab.row_statistics`` over the entries of S only
(every other logit counts as -inf), so the same ``RowStatistics`` sums, ``finish`` and
``softmax_gradient`` apply, and gradients flow only into kept entries.

Kept sets (``kept_ids``, (N, K) int64 padded with -1): negative ids are padding; an id
listed twice counts once (the set, not the list, defines the distribution); ids ≥ V raise
on CPU and are otherwise ignored (never read). Work is O(N·K): the ids are sorted per row
(to find duplicates), the K logits gathered, and the row statistics taken over (N, K).
A position whose kept set is empty has no distribution: logp and H are NaN (logp 0 where
the label is ignored) and its gradient is 0.

Recomputed truncation (``top_k``/``top_p``), with the engines' semantics: top-k first (the k
largest logits, ties with the k-th kept), then top-p on the renormalized top-k distribution
at temperature T (the smallest set of the most probable tokens whose mass reaches p, ties at
the threshold kept), at least one token always kept. Both rules keep {v : z_v ≥ θ} for a
per-row logit threshold θ, found without sorting the row: a radix descent over the
order-preserving integer keys of the fp32 logits,

    θ-key = max{t : W(t) ≥ target},   W(t) = Σ_{v: key_v ≥ t} w_v,

with w_v = 1, target = k for top-k, and w_v = e^((z_v - M)/T)·1[z_v ≥ θ_k],
target = p·W(-∞) for top-p (M the row max). Each pass reads the row once and sums w over
2^D candidate thresholds (D = 8 bits per pass in the torch path, a histogram; D = 4 in the
Triton kernel, a 16-way comparison), fixing D more bits of the key; only the bits the
input dtype carries are searched (16 for bfloat16, 19 for float16, 32 otherwise), so
bfloat16 logits take 2 passes (torch) or 4 (Triton) per rule, plus one max pass for top-p.
The per-pass sums are reductions, so vocabulary shards all-reduce them (O(N·2^D) per pass).
Kept sets are exact for top-k; for top-p, exact up to the fp32 rounding of the mass sums
where a token's strictly-more-probable mass equals p·W to within that rounding (the engines'
own fp32 cumulative sums have the same ambiguity there).

Examples:
  >>> z = torch.tensor([[2.0, 0.0, 0.0, -1.0]])
  >>> truncation_threshold(z, None, 1.0, 2, None, "torch", 1)  # top-2 keeps 2.0, both 0.0
  tensor([0.])

References:
  vLLM ``--return-sampling-mask`` / SGLang / slime / prime-rl return the kept set;
  Holtzman et al., "The Curious Case of Neural Text Degeneration" (top-p), arXiv 1904.09751;
  HAPO, arXiv 2509.16591 (behaviour log-probs at the sampling temperature).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hapo_ops._utils.blocks import block_rows, block_threads, for_each_block
from hapo_ops._utils.collectives import ProcessGroup, all_reduce_max, all_reduce_sum
from hapo_ops._utils.validation import check_tensor
from hapo_ops.vocab.row_statistics import (NEG_LARGE, POS_LARGE, RowStatistics, Reduce,
                                           block_statistics, log_probabilities, row_blocks,
                                           saturate, softmax_gradient)
from hapo_ops.vocab.token_inputs import inverse_temperature

TORCH_DIGIT_BITS = 8    # bits fixed per pass by the torch path (a 256-bin histogram)
TRITON_DIGIT_BITS = 4   # bits fixed per pass by the Triton kernel (16 comparisons per entry)

_SIGN = 1 << 31
_MAGNITUDE = 0x7FFFFFFF
# Keys of -inf and +inf (every saturated logit lies between them).
KEY_NEG_INF = 0x007FFFFF
KEY_POS_INF = 0xFF800000


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------

def check_kept_ids(kept_ids: object, token_shape: torch.Size, vocab: int,
                   device: torch.device, *, check_range: bool) -> torch.Tensor:
    """``kept_ids`` (..., K) of any integer dtype on ``device``, leading dims the token shape,
    as (N, K) int64; with ``check_range`` (a host read) every id < ``vocab``."""
    kept_ids = check_tensor("kept_ids", kept_ids, integer=True, allow_empty=True)
    if kept_ids.dim() != len(token_shape) + 1 or kept_ids.shape[:-1] != token_shape:
        raise ValueError(f"kept_ids must have shape (*logits.shape[:-1], K) = "
                         f"({', '.join(map(str, token_shape))}, K), got {tuple(kept_ids.shape)}")
    if kept_ids.device != device:
        raise ValueError(f"kept_ids must be on the device of logits ({device}), "
                         f"got {kept_ids.device}")
    kept_ids = kept_ids.to(torch.int64)
    if check_range and kept_ids.numel() and bool((kept_ids >= vocab).any()):
        raise ValueError(f"kept_ids must be token ids in [0, {vocab}) or negative padding; "
                         f"found {int((kept_ids >= vocab).sum())} ≥ {vocab}")
    n_rows = kept_ids.numel() // kept_ids.shape[-1] if kept_ids.shape[-1] else token_shape.numel()
    if kept_ids.shape[-1] == 0:  # no kept id anywhere: one padding column, every set empty
        return torch.full((n_rows, 1), -1, dtype=torch.int64, device=device)
    return kept_ids.reshape(n_rows, kept_ids.shape[-1])


def _per_token(name: str, value: torch.Tensor, token_shape: torch.Size,
               device: torch.device) -> torch.Tensor:
    if value.device != device:
        raise ValueError(f"{name} must be on the device of logits ({device}), got {value.device}")
    try:
        expanded = value.expand(token_shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to the "
                         f"token shape {tuple(token_shape)}") from None
    return expanded.reshape(-1).contiguous()


def check_top_k(top_k: object, token_shape: torch.Size, device: torch.device
                ) -> int | torch.Tensor | None:
    """None, an int ≥ 1, or an integer tensor broadcastable to the token shape (as (N,)
    int64; entries ≤ 0 disable top-k at their position, like vLLM's -1 and transformers' 0)."""
    if top_k is None:
        return None
    if isinstance(top_k, torch.Tensor):
        if top_k.is_floating_point() or top_k.is_complex() or top_k.dtype == torch.bool:
            raise TypeError(f"top_k must be an int or an integer tensor, got dtype {top_k.dtype}")
        return _per_token("top_k", top_k, token_shape, device).to(torch.int64)
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, an integer tensor or None, "
                        f"got {type(top_k).__name__}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 (None disables it), got {top_k}")
    return top_k


def check_top_p(top_p: object, token_shape: torch.Size, device: torch.device, *,
                check_values: bool) -> float | torch.Tensor | None:
    """None, a float in (0, 1], or a floating tensor broadcastable to the token shape (as
    (N,) float32; with ``check_values``, a host read, every entry in (0, 1]; elsewhere an
    entry ≤ 0 keeps only the most probable tokens and one ≥ 1 disables top-p)."""
    if top_p is None:
        return None
    if isinstance(top_p, torch.Tensor):
        if not top_p.is_floating_point():
            raise TypeError(f"top_p must be a float or a floating-point tensor, "
                            f"got dtype {top_p.dtype}")
        flat = _per_token("top_p", top_p, token_shape, device).to(torch.float32)
        if check_values and flat.numel() and not bool(((flat > 0) & (flat <= 1)).all()):
            raise ValueError("top_p must lie in (0, 1] at every position")
        return flat
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError(f"top_p must be a float, a floating tensor or None, "
                        f"got {type(top_p).__name__}")
    top_p = float(top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] (None disables it), got {top_p}")
    return top_p


def truncates(top_k: int | torch.Tensor | None, top_p: float | torch.Tensor | None) -> bool:
    """Whether checked ``top_k``/``top_p`` can drop tokens (known without reading tensors)."""
    return top_k is not None or (top_p is not None and not (isinstance(top_p, float)
                                                            and top_p >= 1.0))


# ---------------------------------------------------------------------------------------
# Order-preserving keys of fp32 logits
# ---------------------------------------------------------------------------------------

def order_keys(z: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2^32) with key(a) < key(b) ⟺ a < b for fp32 ``z`` (-0.0 taken as
    +0.0, so that equal values have equal keys)."""
    bits = (z + 0.0).view(torch.int32)
    # Negative floats: flip the magnitude bits (the arithmetic shift makes the mask).
    return (bits ^ ((bits >> 31) & _MAGNITUDE)).to(torch.int64).add_(_SIGN)


def key_logits(keys: torch.Tensor) -> torch.Tensor:
    """fp32 values of int64 ``keys`` clamped to [key(-inf), key(+inf)]: for every non-NaN
    fp32 z, z ≥ key_logits(t) ⟺ order_keys(z) ≥ t."""
    signed = keys.clamp(KEY_NEG_INF, KEY_POS_INF) - _SIGN
    bits = torch.where(signed < 0, signed ^ _MAGNITUDE, signed).to(torch.int32)
    return bits.view(torch.float32)


def significant_bits(dtype: torch.dtype) -> int:
    """Leading key bits that tell apart the fp32 values of a ``dtype`` (the rest are equal
    for every value of that dtype)."""
    return {torch.bfloat16: 16, torch.float16: 19}.get(dtype, 32)


# ---------------------------------------------------------------------------------------
# The threshold search
# ---------------------------------------------------------------------------------------

# candidate_sums(prefix (N,), shift, digit_bits, lower (N,) or None, row_max (N,) or None)
#   → (N, 2^digit_bits) float32: W_d = Σ_{v: key_v ≥ c_d} w_v on this part of the row,
#   c_d = ((prefix << digit_bits) + d) << shift; w_v = 1 (row_max None) or
#   e^((z_v - M)/T)·1[z_v ≥ lower].
CandidateSums = Callable[[torch.Tensor, int, int, torch.Tensor | None, torch.Tensor | None],
                         torch.Tensor]


def candidate_keys(prefix: torch.Tensor, shift: int, digit_bits: int) -> torch.Tensor:
    """(N, 2^D) int64 candidate keys c_d = ((prefix << D) + d) << shift."""
    digits = torch.arange(1 << digit_bits, dtype=torch.int64, device=prefix.device)
    return ((prefix[:, None] << digit_bits) + digits) << shift


def descend(sums: CandidateSums, target: Callable[[torch.Tensor], torch.Tensor], n_rows: int,
            bits: int, digit_bits: int, lower: torch.Tensor | None,
            row_max: torch.Tensor | None, device: torch.device, reduce_sum: Reduce
            ) -> torch.Tensor:
    """The largest key t (int64 (N,)) with W(t) ≥ target, to the precision of ``bits``
    leading key bits, one pass of ``sums`` per ``digit_bits``.

    ``target(W_0)`` maps the first pass's total (W at the lowest key, all entries) to the
    per-row target. A row whose target no candidate reaches (rounding, or a target above
    the row's total) takes the lowest candidate.
    """
    prefix = torch.zeros(n_rows, dtype=torch.int64, device=device)
    levels = -(-bits // digit_bits)
    goal = None
    for level in range(levels):
        shift = 32 - (level + 1) * digit_bits
        totals = reduce_sum(sums(prefix, shift, digit_bits, lower, row_max))
        if goal is None:
            goal = target(totals[:, 0])
        digits = torch.arange(totals.shape[1], device=device)
        reached = torch.where(totals >= goal[:, None], digits, 0)
        prefix = (prefix << digit_bits) + reached.amax(-1)
    return prefix << (32 - levels * digit_bits)


def thresholds(sums: CandidateSums, row_max: torch.Tensor, top_k: int | torch.Tensor | None,
               top_p: float | torch.Tensor | None, n_rows: int, dtype: torch.dtype,
               digit_bits: int, device: torch.device, reduce_sum: Reduce) -> torch.Tensor:
    """θ (N,) float32 such that the truncated distribution keeps {v : z_v ≥ θ} (module
    docstring): top-k, then top-p on the renormalized top-k distribution, θ ≤ M so that the
    most probable tokens always stay. ``row_max`` M (N,) is the (global) saturated row max."""
    bits = significant_bits(dtype)
    theta = torch.full((n_rows,), float("-inf"), dtype=torch.float32, device=device)
    if top_k is not None:
        k = torch.as_tensor(top_k, device=device).to(torch.float32).expand(n_rows)
        k = torch.where(k > 0, k, float("inf"))          # ≤ 0: no top-k at that position
        key = descend(sums, lambda total: k, n_rows, bits, digit_bits, None, None, device,
                      reduce_sum)
        theta = key_logits(key)
    if top_p is not None and not (isinstance(top_p, float) and top_p >= 1.0):
        p = torch.as_tensor(top_p, dtype=torch.float32, device=device).expand(n_rows)
        lower = theta
        key = descend(sums, lambda total: p * total, n_rows, bits, digit_bits, lower,
                      row_max, device, reduce_sum)
        theta = torch.where(p >= 1.0, lower, torch.maximum(key_logits(key), lower))
    return torch.minimum(theta, row_max)


def torch_candidate_sums(logits: torch.Tensor, chunk_tokens: int, n_rows: int,
                         inv_temperature: torch.Tensor) -> CandidateSums:
    """``CandidateSums`` of the torch path over ``logits`` (..., V) in blocks of
    ``chunk_tokens`` rows: per block, one histogram of the next D key bits over the entries
    inside the current bucket (bins 0…2^D-1), above it (bin 2^D) and below it (bin 2^D + 1),
    with W_d = above + Σ_{d' ≥ d} bin_d'. The blocks are spread over the CPU threads
    (``for_each_block``)."""
    threads = block_threads(logits.numel(), logits.device)
    rows_per_block = block_rows(n_rows, chunk_tokens, threads)

    def sums(prefix, shift, digit_bits, lower, row_max):
        radix = 1 << digit_bits
        out = torch.zeros((n_rows, radix), dtype=torch.float32, device=logits.device)

        def block_sums(item: tuple[int, torch.Tensor]) -> None:
            start, block = item
            rows = slice(start, start + block.shape[0])
            z = saturate(block)
            top = order_keys(z).bitwise_right_shift_(shift)
            bucket = top >> digit_bits
            index = top.bitwise_and_(radix - 1)
            index = index.masked_fill_(bucket > prefix[rows, None], radix)
            index = index.masked_fill_(bucket < prefix[rows, None], radix + 1)
            if row_max is None:
                weights = torch.ones((), dtype=torch.float32, device=z.device).expand(z.shape)
            else:
                weights = (z - row_max[rows, None]).mul_(inv_temperature[rows, None]).exp_()
                weights = weights.masked_fill_(z < lower[rows, None], 0.0)
            histogram = torch.zeros((block.shape[0], radix + 2), dtype=torch.float32,
                                    device=z.device).scatter_add_(-1, index, weights)
            at_or_above = histogram[:, :radix].flip(-1).cumsum(-1).flip(-1)
            out[rows] = at_or_above + histogram[:, radix:radix + 1]

        for_each_block(block_sums, row_blocks(logits, rows_per_block), logits.device, threads)
        return out

    return sums


def saturated_row_max(logits: torch.Tensor) -> torch.Tensor:
    """max_v z_v per row, (N,) float32 in [NEG_LARGE, POS_LARGE] (NaN for a NaN row): one
    reduction, no N×V temporary."""
    return logits.detach().amax(-1).reshape(-1).to(torch.float32).clamp(NEG_LARGE, POS_LARGE)


def truncation_threshold(logits: torch.Tensor, temperature: torch.Tensor | None,
                         scalar_temperature: float, top_k: int | torch.Tensor | None,
                         top_p: float | torch.Tensor | None, impl: str, chunk_tokens: int,
                         group: ProcessGroup | None = None) -> torch.Tensor:
    """θ (N,) float32 of ``thresholds`` for ``logits`` (..., V) at T (``temperature`` (N,)
    float32, or None and ``scalar_temperature``), with checked ``top_k``/``top_p``: the torch
    path's 256-bin histograms in blocks of rows, or the Triton kernel's 16-way passes. Under
    ``group`` the logits are one vocabulary shard: the row max and every pass's sums are
    all-reduced. Without a group it runs inside the ``hapo_ops::truncation_threshold``
    custom op, so that ``torch.compile`` traces through it."""
    if group is None:
        return _truncation_threshold_op(
            logits.detach(), temperature, scalar_temperature,
            top_k if isinstance(top_k, torch.Tensor) else None,
            top_k if isinstance(top_k, int) else 0,
            top_p if isinstance(top_p, torch.Tensor) else None,
            top_p if isinstance(top_p, float) else 1.0, impl, chunk_tokens)
    return _search_threshold(logits, temperature, scalar_temperature, top_k, top_p, impl,
                             chunk_tokens, group)


def _search_threshold(logits, temperature, scalar_temperature, top_k, top_p, impl,
                      chunk_tokens, group) -> torch.Tensor:
    logits = logits.detach()
    vocab = logits.shape[-1]
    n_rows = logits.numel() // max(vocab, 1)
    row_max = all_reduce_max(saturated_row_max(logits), group)
    if impl == "triton":
        from hapo_ops.kernels.truncation import candidate_sums

        def sums(prefix, shift, digit_bits, lower, rmax):
            candidates = key_logits(candidate_keys(prefix, shift, digit_bits))
            return candidate_sums(logits, candidates, lower, rmax, temperature,
                                  scalar_temperature)
        digit_bits = TRITON_DIGIT_BITS
    else:
        inv_t = inverse_temperature(temperature, scalar_temperature, n_rows, logits.device)
        # The histogram pass holds a few int64 temporaries per logit: smaller blocks.
        sums = torch_candidate_sums(logits, max(1, chunk_tokens // 8), n_rows, inv_t)
        digit_bits = TORCH_DIGIT_BITS
    return thresholds(sums, row_max, top_k, top_p, n_rows, logits.dtype, digit_bits,
                      logits.device, lambda x: all_reduce_sum(x, group))


@torch.library.custom_op("hapo_ops::truncation_threshold", mutates_args=())
def _truncation_threshold_op(logits: torch.Tensor, temperature: torch.Tensor | None,
                             scalar_temperature: float, top_k: torch.Tensor | None,
                             scalar_top_k: int, top_p: torch.Tensor | None,
                             scalar_top_p: float, impl: str, chunk_tokens: int
                             ) -> torch.Tensor:
    """θ (N,) of ``truncation_threshold``; ``scalar_top_k`` 0 and ``scalar_top_p`` 1 stand
    for None when the tensors are None."""
    k = top_k if top_k is not None else (scalar_top_k or None)
    p = top_p if top_p is not None else (scalar_top_p if scalar_top_p < 1.0 else None)
    return _search_threshold(logits, temperature, scalar_temperature, k, p, impl,
                             chunk_tokens, None)


@_truncation_threshold_op.register_fake
def _(logits, temperature, scalar_temperature, top_k, scalar_top_k, top_p, scalar_top_p, impl,
      chunk_tokens):
    n_rows = logits.numel() // max(logits.shape[-1], 1)
    return logits.new_empty((n_rows,), dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# Kept sets: O(N·K) gather, statistics and gradient
# ---------------------------------------------------------------------------------------

def shard_kept_ids(kept_ids: torch.Tensor, vocab: int, vocab_start: int | torch.Tensor = 0
                   ) -> torch.Tensor:
    """Global kept ids (N, K) in the coordinates of the part of the vocabulary of ``vocab``
    entries starting at ``vocab_start`` (the whole vocabulary: 0): id - vocab_start for the
    ids this part holds, -1 (padding) for every other id (padding, another part's, ≥ V)."""
    local = kept_ids - vocab_start
    return torch.where((kept_ids >= 0) & (local >= 0) & (local < vocab), local, -1)


def kept_entries(kept_ids: torch.Tensor, vocab: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, index, use), each (N, K), for local kept ids (``shard_kept_ids``): the ids
    sorted per row; the column each reads; and which entries count: each distinct id in
    [0, vocab) once (its first occurrence). Negative ids are padding. Entries that do not
    count take the index of the row's last counted entry (0 if none): every index is in
    range, and a scatter of identical values there (``scatter_kept``) is deterministic."""
    ids = kept_ids.sort(-1).values
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    use = first & (ids >= 0) & (ids < vocab)
    alias = last_counted(use)
    index = torch.where(use, ids, ids.gather(-1, alias).masked_fill_(~use.any(-1, True), 0))
    return ids, index, use


def last_counted(use: torch.Tensor) -> torch.Tensor:
    """(N, 1) position of each row's last counted entry (0 if none)."""
    positions = torch.arange(use.shape[-1], device=use.device)
    return (use * positions).amax(-1, keepdim=True)


def gather_kept(logits: torch.Tensor, index: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """The saturated fp32 logits of the kept entries (N, K), NEG_LARGE where ``use`` is False:
    one gather of N·K values from ``logits`` (..., V) in place (no copy of the logits)."""
    token_shape = logits.shape[:-1]
    z = logits.gather(-1, index.view(*token_shape, index.shape[-1]))
    return saturate(z.reshape(index.shape)).masked_fill_(~use, NEG_LARGE)


def kept_row_statistics(z: torch.Tensor, ids: torch.Tensor, use: torch.Tensor,
                        labels: torch.Tensor, inv_temperature: torch.Tensor
                        ) -> tuple[RowStatistics, torch.Tensor, torch.Tensor]:
    """(statistics of the kept entries, label position in K, label found) per row: the
    ``RowStatistics`` of ``block_statistics`` over the gathered (N, K) logits, with the
    label's logit where the label is a counted kept entry (NEG_LARGE elsewhere, so that
    ``finish`` gives logp = -inf)."""
    row_max, rest, spread = block_statistics(z, inv_temperature)
    position, found = label_position(ids, use, labels)
    label = torch.where(found, z.gather(-1, position[:, None])[:, 0], NEG_LARGE)
    return RowStatistics(row_max, rest, spread, label), position, found


def label_position(ids: torch.Tensor, use: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(position in K of each row's label among its counted kept entries (0 if absent),
    whether it is there), each (N,)."""
    match = use & (ids == labels[:, None])
    return match.to(torch.int32).argmax(-1).to(torch.int64), match.any(-1)


def kept_gradient(z: torch.Tensor, state: torch.Tensor, entropy: torch.Tensor,
                  grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                  label_position: torch.Tensor, label_weight: torch.Tensor | None,
                  inv_temperature: torch.Tensor) -> torch.Tensor:
    """∂L/∂z of the kept entries (N, K), over ``z`` (which the caller owns) in place:
    ``softmax_gradient`` with log p rebuilt from the rows' state; rows without a
    distribution (empty kept set) get 0."""
    log_p = log_probabilities(z, state, inv_temperature)
    grad = softmax_gradient(log_p, entropy, grad_logp, grad_entropy, label_position,
                            label_weight, inv_temperature)
    return grad.masked_fill_(~(state[:, :1] > NEG_LARGE), 0.0)


def scatter_kept(grad: torch.Tensor, index: torch.Tensor, use: torch.Tensor,
                 like: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The (..., V) gradient of ``like`` that is ``grad`` (N, K) at the kept entries and 0
    elsewhere: a new zero tensor, or ``out`` zeroed in place, then one scatter (no add: the
    entries that do not count write their alias's value, ``kept_entries``) of N·K."""
    token_shape = like.shape[:-1]
    if out is None:
        out = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    else:
        out.zero_()
    aliased = grad.gather(-1, last_counted(use)).masked_fill_(~use.any(-1, True), 0.0)
    grad = torch.where(use, grad, aliased)
    # index_put_ with one index per dim: no copy of a strided ``out``, and no float32 copy
    # of a 16-bit one (which CPU scatter kernels make).
    shape = (*token_shape, index.shape[-1])
    rows = tuple(torch.arange(size, device=index.device).view(
        [-1 if dim == axis else 1 for dim in range(len(shape))])
        for axis, size in enumerate(token_shape))
    return out.index_put_((*rows, index.view(shape)), grad.to(like.dtype).view(shape))


__all__ = ["KEY_NEG_INF", "KEY_POS_INF", "TORCH_DIGIT_BITS", "TRITON_DIGIT_BITS",
           "candidate_keys", "check_kept_ids", "check_top_k", "check_top_p", "descend",
           "gather_kept", "kept_entries", "kept_gradient", "kept_row_statistics", "key_logits",
           "label_position", "last_counted",
           "order_keys", "saturated_row_max", "scatter_kept", "shard_kept_ids",
           "significant_bits", "thresholds", "torch_candidate_sums", "truncates",
           "truncation_threshold"]
