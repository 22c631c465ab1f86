"""Exact k-th smallest value by radix selection over float32 bit patterns.

Why not ``torch.kthvalue`` or ``torch.quantile``: the rank k depends on how many tokens are
valid, which lives on the device; reading it back would be a host sync, and
``torch.quantile`` refuses inputs past 2^24 elements. Radix selection needs no sync, is
exact, costs four passes of elementwise work plus a 256-bin histogram each, and its only
cross-element state is that histogram: an all-reduce of it per round makes the selection
exact over many ranks (``reduce_counts``).
"""

from __future__ import annotations

from typing import Callable

import torch

RADIX_BITS = 8
RADIX_BINS = 1 << RADIX_BITS
_ROUNDS = 32 // RADIX_BITS
_SIGN = 0x80000000
_LOW32 = 0xFFFFFFFF

CountReducer = Callable[[torch.Tensor], torch.Tensor]


def float32_to_ordered_key(values: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int64 keys in [0, 2^32) whose order is the float order."""
    bits = values.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & _LOW32
    negative = (bits & _SIGN) != 0
    return torch.where(negative, bits ^ _LOW32, bits | _SIGN)


def ordered_key_to_float32(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`float32_to_ordered_key`."""
    positive = (keys & _SIGN) != 0
    bits = torch.where(positive, keys ^ _SIGN, keys ^ _LOW32)
    bits = torch.where(bits >= _SIGN, bits - (1 << 32), bits)  # back to signed int32 range
    return bits.to(torch.int32).view(torch.float32)


def kth_smallest(values: torch.Tensor, valid: torch.Tensor, k: torch.Tensor,
                 reduce_counts: CountReducer | None = None) -> torch.Tensor:
    """The k-th smallest (1-based) of ``values[valid]`` as a float32 0-d tensor.

    ``k`` is an int64 0-d tensor, clamped to [1, count] (count = number of valid values):
    k > count gives the largest valid value; no valid value gives 0. With ``reduce_counts``
    (for example an all-reduce sum across ranks) the selection runs over the union of every
    caller's values. Four rounds of ``RADIX_BITS`` bits each fix the key from its top byte
    down; the first round's histogram also gives the count (no extra reduction). CPU tensors
    without a reducer take ``kthvalue`` instead (a host read is free there), except while
    ``torch.compile`` traces (a host read would break the graph); both paths give the same
    result for every k.
    """
    if (reduce_counts is None and values.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        return _kth_smallest_on_host(values, valid, k)
    keys = float32_to_ordered_key(values.reshape(-1))
    live = valid.reshape(-1).to(torch.int64)
    prefix = torch.zeros((), dtype=torch.int64, device=keys.device)
    remaining = k.to(device=keys.device, dtype=torch.int64)
    for round_index in range(_ROUNDS):
        shift = 32 - RADIX_BITS * (round_index + 1)
        digit = (keys >> shift) & (RADIX_BINS - 1)
        if round_index:
            live = live * ((keys >> (shift + RADIX_BITS)) == prefix).to(torch.int64)
        counts = torch.zeros(RADIX_BINS, dtype=torch.int64, device=keys.device)
        counts.index_add_(0, digit, live)
        if reduce_counts is not None:
            counts = reduce_counts(counts)
        cumulative = counts.cumsum(0)
        if not round_index:
            total = cumulative[-1]
            remaining = torch.minimum(remaining, total).clamp_min(1)
        chosen = (cumulative < remaining).sum().clamp_max(RADIX_BINS - 1)
        at = chosen.reshape(1)  # gather, not indexing: no host read of the digit
        remaining = remaining - (cumulative.gather(0, at) - counts.gather(0, at)).reshape(())
        prefix = (prefix << RADIX_BITS) | chosen
    selected = ordered_key_to_float32(prefix)
    return torch.where(total > 0, selected, torch.zeros_like(selected))


def _kth_smallest_on_host(values: torch.Tensor, valid: torch.Tensor,
                          k: torch.Tensor) -> torch.Tensor:
    """The same selection on CPU tensors, where reading k back costs nothing: one
    ``kthvalue`` pass instead of four radix rounds (same exact result)."""
    selected = values.reshape(-1).to(torch.float32)[valid.reshape(-1)]
    if selected.numel() == 0:
        return torch.zeros((), dtype=torch.float32)
    rank = min(max(int(k), 1), selected.numel())
    return selected.kthvalue(rank).values
