"""Per-row statistics of softmax(z/T): the one home of the algebra every log-prob/entropy path
shares (logits op, vocabulary shards, fused linear head, sampler; torch and Triton).

For one row of logits z (raw units) at temperature T, with M = max_v z_v:

    rest   = Σ_{v ≠ argmax} e^((z_v - M)/T)          (≥ 0; ties with M count 1 each)
    spread = Σ_v e^((z_v - M)/T) · (M - z_v)/T        (≥ 0, nats)
    label  = z_y                                      (raw units)

and then, with no subtraction of nearly equal numbers anywhere,

    logsumexp(z/T) = M/T + log1p(rest)
    H    = log1p(rest) + spread / (1 + rest)
    logp = (z_y - M)/T - log1p(rest).

The textbook H = logsumexp - E_p[z/T] cancels catastrophically in fp32 for near-deterministic
rows (40% error at H ≈ 6e-6); these sums keep full relative precision down to H ≈ 1e-38.
The max is taken and subtracted in raw logit units, *before* dividing by T, so that the
error of (z_v - M)/T is relative to the gap, not to |z| (exact at |z| ≈ 1e4 too).

Partial statistics of disjoint parts of a row (vocabulary blocks, splits, tensor-parallel
shards) combine exactly (``combine_parts``): with M = max_s m_s and c_s = e^((m_s - M)/T),

    rest   = Σ_{s: m_s = M} rest_s + (#{s: m_s = M} - 1) + Σ_{s: m_s < M} c_s (1 + rest_s)
    spread = Σ_s c_s (spread_s + (M - m_s)/T · (1 + rest_s)),

two reductions (a max, then one sum) that are either a local ``amax``/``sum`` over parts or an
all-reduce MAX/SUM over ranks. The backward of every path rebuilds
log p_v = (z_v - M)/T - log1p(rest) from the per-row *state* (M, log1p(rest)) and applies
``softmax_gradient``.

Degenerate rows (documented behaviour of every path): a NaN logit makes the row's outputs
NaN; logits are saturated to [-1e30, 1e30], so -inf entries get probability 0 and +inf
entries share the whole mass (k entries at +inf: p = 1/k each, H = ln k, the limit of those
logits growing together); a row with no finite logit and no +inf has no distribution: NaN.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Callable, NamedTuple

import torch

from hapo_ops._utils.collectives import all_reduce_max, all_reduce_sum

# Logits are held in [NEG_LARGE, POS_LARGE]: -inf becomes a finite stand-in whose weight
# e^((NEG_LARGE - M)/T) is exactly 0 and whose products with 0 stay 0 (no inf · 0 = NaN).
NEG_LARGE = -1.0e30
POS_LARGE = 1.0e30

Reduce = Callable[[torch.Tensor], torch.Tensor]


class RowStatistics(NamedTuple):
    """The per-row sums of the module docstring, each (N,) (or (S, N) for S parts):
    ``row_max`` M in raw logit units, ``rest`` and ``spread`` (nats), ``label_logit`` z_y in
    raw units (meaningful where the row's label lies in this part)."""

    row_max: torch.Tensor
    rest: torch.Tensor
    spread: torch.Tensor
    label_logit: torch.Tensor

    def stacked(self) -> torch.Tensor:
        """(N, 4) columns in field order (the layout the Triton kernels write)."""
        return torch.stack(tuple(self), dim=-1)

    @classmethod
    def from_columns(cls, columns: torch.Tensor) -> "RowStatistics":
        """From (..., 4) columns in field order."""
        return cls(*columns.unbind(-1))


def saturate(logits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits in the compute dtype, held in [NEG_LARGE, POS_LARGE]; NaN stays NaN. A new
    tensor (one block-sized temporary: a conversion is clamped in place)."""
    converted = logits.to(dtype)
    if converted is logits:
        return converted.clamp(NEG_LARGE, POS_LARGE)
    return converted.clamp_(NEG_LARGE, POS_LARGE)


def mask_below(block: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """Saturated fp32 logits of a row block (n, V) with the entries below the rows'
    ``threshold`` (n,) (the tokens a truncation drops) at NEG_LARGE, i.e. probability 0;
    ``threshold`` None masks nothing."""
    z = saturate(block)
    if threshold is not None:
        z = z.masked_fill_(z < threshold[:, None], NEG_LARGE)
    return z


def block_statistics(z: torch.Tensor, inv_temperature: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, rest, spread) of saturated logits ``z`` (n, V) at 1/T ``inv_temperature`` (n,).

    Two V-sized temporaries (the scaled gaps, then their exponentials), both in place; z is
    not modified. No op here is one that autocast lowers (``linalg.vecdot`` would run in
    bfloat16 under CPU autocast): the math is float32 whatever the caller's autocast, and
    the same on every thread (``for_each_block``).
    """
    row_max, argmax = z.max(-1, keepdim=True)
    gap = torch.sub(row_max, z).mul_(inv_temperature[:, None].to(z.dtype))  # (M - z)/T ≥ 0
    weights = torch.neg(gap).exp_()
    spread = gap.mul_(weights).sum(-1)  # Σ w·gap, the products over the gaps
    del gap
    rest = weights.scatter_(-1, argmax, 0.0).sum(-1)
    return row_max[:, 0], rest, spread


def label_logits(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_y per row, read at the label clamped into [0, V) (callers mask other labels)."""
    return z.gather(-1, labels.clamp(0, z.shape[-1] - 1)[:, None])[:, 0]


def combine_parts(parts: RowStatistics, has_label: torch.Tensor,
                  inv_temperature: torch.Tensor, *, reduce_max: Reduce, reduce_sum: Reduce
                  ) -> tuple[RowStatistics, torch.Tensor]:
    """Exact statistics of a whole row from those of its disjoint parts (module docstring).

    ``reduce_max`` combines ``row_max`` across parts and ``reduce_sum`` a (5, ...) stack of
    per-part terms: ``amax(0)`` / ``sum(1)`` over a leading parts dimension
    (``parts_reducers``), or all-reduces over the ranks holding vocabulary shards.
    ``has_label`` marks the parts holding the row's label. Returns the combined statistics
    and how many parts held the label (0: no part did).
    """
    row_max, rest, spread, label = parts
    has_label = has_label.expand_as(row_max)
    total_max = reduce_max(row_max)
    tied = row_max == total_max
    gap = (total_max - row_max) * inv_temperature                    # ≥ 0, nats
    weight = torch.exp(-gap)                                         # 0 for empty parts
    mass = 1.0 + rest
    zero = torch.zeros((), dtype=rest.dtype, device=rest.device)
    summed = reduce_sum(torch.stack([
        torch.where(tied, rest, weight * mass),
        torch.where(tied, spread, weight * (spread + gap * mass)),
        torch.where(has_label, label, zero),
        tied.to(rest.dtype),
        has_label.to(rest.dtype),
    ]))
    rest_sum, spread_sum, label_sum, n_tied, found = summed.unbind(0)
    combined = RowStatistics(total_max, rest_sum + (n_tied - 1.0), spread_sum, label_sum)
    return combined, found


def finish(stats: RowStatistics, inv_temperature: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, H, state) from whole-row statistics: logp unmasked (see ``mask_logprobs``),
    -inf where the label's probability is 0; state (N, 2) = (M, log1p(rest)), what every
    backward needs. Rows with no distribution give NaN."""
    log_norm = torch.log1p(stats.rest)
    entropy = log_norm + stats.spread / (1.0 + stats.rest)
    label_gap = stats.label_logit - stats.row_max
    logp = torch.where(label_gap <= NEG_LARGE, float("-inf"),
                       label_gap * inv_temperature - log_norm)
    no_distribution = stats.row_max <= NEG_LARGE
    entropy = torch.where(no_distribution, float("nan"), entropy)
    logp = torch.where(no_distribution, float("nan"), logp)
    return logp, entropy, torch.stack((stats.row_max, log_norm), dim=-1)


def mask_logprobs(logp: torch.Tensor, labels: torch.Tensor, label_found: torch.Tensor,
                  ignore_index: int, *, truncated: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The label rule of every op: logp 0 where ``labels == ignore_index``, NaN where the label
    is not found in the vocabulary (``label_found`` False: outside [0, V), or held by no
    shard; see ``shard_labels``). Returns (logp, rows whose logp has a gradient: found and
    not ignored). Over the whole vocabulary a label at a -inf logit has logp = -inf and
    autograd's gradient of log softmax, (1[v = y] - p_v)/T (1/T at the label); in a
    ``truncated`` distribution a label of probability 0 (outside the kept set) has logp =
    -inf and no gradient."""
    ignored = labels == ignore_index
    has_gradient = label_found & ~ignored
    if truncated:
        has_gradient &= logp != float("-inf")
    logp = torch.where(label_found, logp, float("nan"))
    logp = torch.where(ignored, 0.0, logp)
    return logp, has_gradient


def log_probabilities(z: torch.Tensor, state: torch.Tensor, inv_temperature: torch.Tensor
                      ) -> torch.Tensor:
    """log p_v = (z_v - M)/T - log1p(rest), computed in place over ``z`` (n, V), saturated
    logits the caller owns, from the rows' state (n, 2)."""
    dtype = z.dtype
    return (z.sub_(state[:, :1].to(dtype)).mul_(inv_temperature[:, None].to(dtype))
            .sub_(state[:, 1:].to(dtype)))


def softmax_gradient(log_p: torch.Tensor, entropy: torch.Tensor,
                     grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                     label_index: torch.Tensor, label_weight: torch.Tensor | None,
                     inv_temperature: torch.Tensor) -> torch.Tensor:
    """∂L/∂z for a block of rows, written over ``log_p`` (n, V) in place:

        ∂L/∂z_v = [g_lp (1[v = y] - p_v) - g_H p_v (log p_v + H)] / T.

    ``grad_logp`` (n,) multiplies -p_v on every row given (callers zero it where logp has no
    gradient, or keep it on a shard that does not hold the label); ``label_weight`` (n,) is
    the +g_lp added at column ``label_index`` (0 where the label is not in this block).
    """
    dtype = log_p.dtype
    p = log_p.exp()
    grad = log_p
    if grad_entropy is not None:  # log p is finite (saturated logits), so p = 0 gives 0
        grad.add_(entropy[:, None].to(dtype)).mul_(p).mul_(-grad_entropy[:, None].to(dtype))
    else:
        grad.zero_()
    if grad_logp is not None:
        grad.addcmul_(p, grad_logp[:, None].to(dtype), value=-1.0)
    if label_weight is not None:
        grad.scatter_add_(-1, label_index[:, None], label_weight[:, None].to(dtype))
    return grad.mul_(inv_temperature[:, None].to(dtype))


# ---------------------------------------------------------------------------------------
# Row blocks of the torch paths
# ---------------------------------------------------------------------------------------

def row_blocks(logits: torch.Tensor, chunk_tokens: int, *alike: torch.Tensor
               ) -> Iterator[tuple]:
    """(first row, (n, V) rows of ``logits``, the same rows of each of ``alike``) blocks
    covering the rows of ``logits`` (..., V) in order; ``alike`` tensors have its shape.

    Where the leading dims flatten (in every tensor), each block is a view. Otherwise (a
    slice such as ``logits[:, :-1]``, a transposed or permuted tensor) blocks are slabs of
    whole indices of the first dim: the ``logits`` rows are read through a block-sized copy,
    and the ``alike`` blocks stay views of shape (k, ..., V), so that an in-place backward
    writes into the caller's buffer (``block.copy_(rows.view(block.shape))``).
    """
    vocab = logits.shape[-1]
    tensors = (logits,) + alike
    try:
        flat = [t.view(-1, vocab) for t in tensors]
    except RuntimeError:
        yield from _slab_blocks(logits, chunk_tokens, alike)
        return
    for start in range(0, flat[0].shape[0], chunk_tokens):
        yield (start, *(rows[start:start + chunk_tokens] for rows in flat))


def _slab_blocks(logits: torch.Tensor, chunk_tokens: int, alike: tuple[torch.Tensor, ...]
                 ) -> Iterator[tuple]:
    vocab = logits.shape[-1]
    per_index = logits[0].numel() // max(vocab, 1) if logits.shape[0] else 0
    if per_index > chunk_tokens:  # one index of the first dim holds more than a block
        for index in range(logits.shape[0]):
            for start, *blocks in row_blocks(logits[index], chunk_tokens,
                                             *(t[index] for t in alike)):
                yield (index * per_index + start, *blocks)
        return
    step = max(1, chunk_tokens // max(per_index, 1))
    for first in range(0, logits.shape[0], step):
        last = min(first + step, logits.shape[0])
        yield (first * per_index, logits[first:last].reshape(-1, vocab),
               *(t[first:last] for t in alike))


# ---------------------------------------------------------------------------------------
# Vocabulary shards (tensor parallel): rank r holds the contiguous slice
# [vocab_start_r, vocab_start_r + V_r) of the vocabulary, in rank order.
# ---------------------------------------------------------------------------------------

def shard_labels(labels: torch.Tensor, vocab: int, ignore_index: int,
                 vocab_start: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(local labels, has_label) for global ``labels`` (N,) and a part of the vocabulary of
    ``vocab`` entries starting at ``vocab_start`` (the whole vocabulary: 0): has_label marks
    the labels this part holds (never ignore_index); the local label is label - vocab_start
    there and -1 elsewhere (what the backwards expect). The one rule deciding where a label
    is found: a label no part holds has no log-prob (NaN, ``mask_logprobs``)."""
    local = labels - vocab_start
    has_label = (labels != ignore_index) & (local >= 0) & (local < vocab)
    return torch.where(has_label, local, -1), has_label


def combine_vocab_shards(stats: RowStatistics, labels: torch.Tensor, has_label: torch.Tensor,
                         inv_temperature: torch.Tensor, ignore_index: int, group, *,
                         check_found: bool, truncated: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, H, state, logp_ok) of the whole vocabulary on every rank of ``group`` from this
    shard's statistics (``group`` None: the statistics are of the whole vocabulary, and the
    combination is the identity, exactly): ``combine_parts`` over the ranks (one all-reduce MAX of N values, one
    all-reduce SUM of 5·N: 24 bytes per token in fp32, independent of V), ``finish`` and
    the label rule, a label held by no shard counting as out of range (NaN; with
    ``check_found`` a ValueError on every rank, since the check follows the all-reduce).
    ``logp_ok`` (N,) marks the rows whose logp has a gradient (``mask_logprobs``, with
    ``truncated`` for a distribution over a subset of the vocabulary)."""
    combined, found = combine_parts(
        stats, has_label, inv_temperature,
        reduce_max=lambda x: all_reduce_max(x, group), reduce_sum=lambda x: all_reduce_sum(x, group))
    logp, entropy, state = finish(combined, inv_temperature)
    missing = (labels != ignore_index) & (found == 0)
    if check_found and bool(missing.any()):
        raise ValueError(f"labels must be global ids held by some vocabulary shard or equal "
                         f"ignore_index={ignore_index}; found {int(missing.sum())} in no shard")
    logp, logp_ok = mask_logprobs(logp, labels, found > 0, ignore_index, truncated=truncated)
    return logp.to(torch.float32), entropy.to(torch.float32), state, logp_ok


def parts_reducers() -> dict[str, Reduce]:
    """``combine_parts`` reducers over a leading parts dimension (splits, chunks)."""
    return {"reduce_max": lambda x: x.amax(0), "reduce_sum": lambda x: x.sum(1)}


__all__ = ["NEG_LARGE", "POS_LARGE", "RowStatistics", "block_statistics", "combine_parts",
           "combine_vocab_shards", "finish", "label_logits", "log_probabilities",
           "mask_below", "mask_logprobs", "parts_reducers", "row_blocks", "saturate",
           "shard_labels", "softmax_gradient"]
