"""The HAPO entropy signal ĥ: batch statistics of log-entropy and their normalisation.

Source: HAPO, arXiv 2509.16591, §3 (the normalised entropy that drives temperature,
clipping and advantage redistribution).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from hapo_ops._utils.selection import CountReducer, kth_smallest
from hapo_ops._utils.validation import (check_float, check_float_or_tensor, check_mask,
                                        check_same_device, check_tensor, check_variant)
from hapo_ops._utils.collectives import all_reduce_max, all_reduce_sum, check_process_group


class EntropyStats(NamedTuple):
    """Batch statistics of ℓ = ln(max(H, eps)) over the valid tokens (0-d float32 tensors).

    pivot: the nearest-rank ``quantile`` of ℓ; log_max / log_min: its extremes. A batch with
    no valid token gives pivot 0 and log_max = +inf, log_min = -inf, so that every ĥ
    computed from it is 0 (no information, no adaptation). A NaN entropy on a valid token
    makes all three NaN where it is not an error (see :func:`entropy_stats`).
    """

    pivot: torch.Tensor
    log_max: torch.Tensor
    log_min: torch.Tensor


# The statistics of a batch without valid tokens, what entropy_stats returns for it, and so
# the one "no statistics yet" value (every ĥ computed from it is 0, T = T_base): the rollout
# integrations send and store it, as plain floats, before the first training batch.
NO_ENTROPY_STATS: tuple[float, float, float] = (0.0, float("inf"), float("-inf"))


def is_no_entropy_stats(pivot: float, log_max: float, log_min: float) -> bool:
    """Whether plain-float statistics are :data:`NO_ENTROPY_STATS` (no valid token)."""
    return (pivot, log_max, log_min) == NO_ENTROPY_STATS


def check_entropy_stats(name: str, stats: object) -> tuple:
    """The one rule for a ``stats`` argument (``normalized_entropy``, ``adaptive_temperature``,
    ``hapo_policy_loss``, the vLLM helpers): an ``EntropyStats``, or a plain tuple of its
    three fields in order, (pivot, log_max, log_min), each a real number or a
    floating-point tensor. Anything else, a dict or a list included (their order or keys
    would be guessed), is a ``TypeError`` naming ``name``; build
    ``EntropyStats(**d)`` from a dict."""
    expected = "an EntropyStats or a tuple (pivot, log_max, log_min)"
    if not isinstance(stats, tuple):
        raise TypeError(f"{name} must be {expected}, got {type(stats).__name__}")
    if len(stats) != 3:
        raise TypeError(f"{name} must be {expected}, got a tuple of {len(stats)}")
    for field, value in zip(EntropyStats._fields, stats):
        if isinstance(value, torch.Tensor):
            if not value.is_floating_point():
                raise TypeError(f"{name}.{field} must be a float or a floating-point tensor, "
                                f"got dtype {value.dtype}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}.{field} must be a float or a floating-point tensor, got "
                            f"{type(value).__name__}")
    return stats


def log_entropy(entropy: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """ℓ = ln(max(H, eps)) as float32: the statistics and ĥ both use exactly these values, so
    the pivot token gets ĥ = 0 exactly whatever the entropy dtype. ``eps``: a float or a
    tensor broadcastable to ``entropy`` (one per token)."""
    dtype = torch.promote_types(entropy.dtype, torch.float32)
    if isinstance(eps, torch.Tensor):
        eps = eps.to(dtype)
    return entropy.to(dtype).clamp_min(eps).log().to(torch.float32)


def nearest_rank(count: torch.Tensor, quantile: float) -> torch.Tensor:
    """k = round(q·(n-1)) + 1 with round half to even (Python's ``round``), as int64 tensor."""
    return torch.round(quantile * (count - 1).to(torch.float64)).to(torch.int64) + 1


def entropy_stats(entropy: torch.Tensor, mask: torch.Tensor, *, quantile: float = 0.8,
                  eps: float = 1e-8, group=None, reduce_counts: CountReducer | None = None,
                  reduce_extrema: CountReducer | None = None) -> EntropyStats:
    """Pivot, max and min of ℓ = ln(max(H, eps)) over the tokens where ``mask`` is set.

    pivot = the k-th smallest ℓ, k = round(q·(n-1)) + 1 (nearest rank, round half to even);
    exact for any n (radix selection, no host sync, no 2^24 limit). No valid token (an
    all-masked or empty batch): pivot 0, log_max +inf, log_min -inf (ĥ is then 0
    everywhere).

    ``group``: a ``torch.distributed`` process group (data parallel). The statistics then
    cover the valid tokens of every rank, identical on all ranks and bitwise equal to the
    single-process result on the concatenated batch, without gathering the values: the
    token count and extrema are all-reduced once, and each of the 4 radix rounds all-reduces
    a 256-bin int64 histogram (2 KiB), about 8 KiB per call whatever the token count.
    ``reduce_counts`` (sum) / ``reduce_extrema`` (max) are the lower-level hooks ``group``
    builds (any other reduction with those semantics works).

    NaN entropies: at masked positions they are ignored (padding may hold anything). At a
    valid token a NaN means the entropy computation upstream broke; it is never dropped
    silently (dropping it would shift the quantile to the surviving tokens and hide the
    fault). On CPU tensors (outside ``torch.compile``) it raises a ``ValueError`` naming
    ``entropy``, on every rank alike with ``group`` (the NaN count is all-reduced with the
    token count, so no rank is left waiting in a collective). Where reading the count back
    would be a host sync (accelerators, compiled graphs), pivot, log_max and log_min
    become NaN instead, on every rank, so the fault shows in the logged statistics and in
    every ĥ and temperature computed from them.
    """
    if group is not None:
        if reduce_counts is not None or reduce_extrema is not None:
            raise ValueError("pass either group or reduce_counts/reduce_extrema, not both")
        group = check_process_group("group", group)
        reduce_counts = functools.partial(all_reduce_sum, group=group)
        reduce_extrema = functools.partial(all_reduce_max, group=group)
    # An empty batch is ordinary (a data-parallel rank with nothing to do): it gives the
    # no-valid-token statistics, and with a process group still joins every collective.
    entropy = check_tensor("entropy", entropy, floating=True, allow_empty=True)
    valid = check_mask("mask", mask, entropy.shape, allow_empty=True)
    check_same_device("mask", valid, "entropy", entropy)
    quantile = check_float("quantile", quantile, min_value=0.0, max_value=1.0)
    eps = check_float("eps", eps, min_value=0.0, min_inclusive=False)

    ell = log_entropy(entropy, eps)
    is_nan = torch.isnan(ell)
    nan_count = (valid & is_nan).sum(dtype=torch.int64)
    valid = valid & ~is_nan
    count = valid.sum(dtype=torch.int64)
    log_max = _max_or_minus_inf(torch.where(valid, ell, float("-inf")))
    neg_log_min = _max_or_minus_inf(torch.where(valid, -ell, float("-inf")))
    if reduce_counts is not None:
        count, nan_count = reduce_counts(torch.stack([count, nan_count])).unbind()
    if (ell.device.type == "cpu" and not torch.compiler.is_compiling()
            and int(nan_count) > 0):
        raise ValueError(f"entropy must not be NaN where mask is set; got {int(nan_count)} "
                         "NaN value(s) at valid tokens")
    if reduce_extrema is not None:
        log_max, neg_log_min = reduce_extrema(torch.stack([log_max, neg_log_min])).unbind()
    has_tokens = count > 0
    k = nearest_rank(count, quantile).clamp_min(1)
    pivot = kth_smallest(ell, valid, k, reduce_counts)
    pivot = torch.where(has_tokens, pivot, torch.zeros_like(pivot))
    log_max = torch.where(has_tokens, log_max, torch.full_like(log_max, float("inf")))
    log_min = torch.where(has_tokens, -neg_log_min, torch.full_like(log_max, float("-inf")))
    poisoned = nan_count > 0
    nan = torch.full_like(pivot, float("nan"))
    return EntropyStats(*(torch.where(poisoned, nan, value) for value in (pivot, log_max, log_min)))



def _max_or_minus_inf(values: torch.Tensor) -> torch.Tensor:
    """max of ``values`` (-inf for none), also for an empty tensor."""
    return torch.cat([values.reshape(-1), values.new_full((1,), float("-inf"))]).amax()


def normalized_entropy(entropy: torch.Tensor, stats: EntropyStats, *, variant: str = "paper",
                       eps: float | torch.Tensor = 1e-8) -> torch.Tensor:
    """ĥ ∈ [-1, 1] from each token's entropy and the batch statistics.

    ℓ = ln(max(H, eps)), m = pivot:
      ℓ > m:                 ĥ = (ℓ - m) / max(ℓ_max - m, eps)
      ℓ ≤ m, "paper":        ĥ = (ℓ - m) / max(m - ℓ_min, eps)   ∈ [-1, 0]
      ℓ ≤ m, "released":     ĥ = (m - ℓ) / max(m - ℓ_min, eps)   ∈ [0, 1]
    (the public reference code's sign slip, kept for reproduction), then clamped to [-1, 1]
    since ``stats`` may come from another batch. ``stats``: an ``EntropyStats`` or a plain
    tuple (pivot, log_max, log_min) of numbers or tensors (``check_entropy_stats``), e.g.
    one value per token. ``eps`` > 0: a float, or a tensor broadcastable to ``entropy``
    (one per token, as the vLLM processor has one per request).
    """
    entropy = check_tensor("entropy", entropy, floating=True, allow_empty=True)
    variant = check_variant(variant)
    eps = check_float_or_tensor("eps", eps, entropy, min_inclusive=False)
    check_entropy_stats("stats", stats)
    ell = log_entropy(entropy, eps)
    pivot, log_max, log_min = (torch.as_tensor(s, device=ell.device).to(ell.dtype) for s in stats)
    if isinstance(eps, torch.Tensor):
        eps = eps.to(ell.dtype)
    above = (ell - pivot) / (log_max - pivot).clamp_min(eps)
    below_gap = (ell - pivot) if variant == "paper" else (pivot - ell)
    below = below_gap / (pivot - log_min).clamp_min(eps)
    h_hat = torch.where(ell > pivot, above, below)
    return h_hat.clamp(-1.0, 1.0)
