"""Segment reductions over arbitrary integer group ids, without host syncs.

Group ids may be any integers in any order. ``compact_group_index`` maps them to dense
slots in [0, B) by a stable sort (at most B groups, so B slots always suffice and no
data-dependent size is read back to the host); sums are ``index_add_`` into those slots. ``ACCUMULATE_DTYPE``: the dtype such sums are
taken in across the package.
"""

from __future__ import annotations

import torch

# The dtype every statistic over tokens, responses or groups is summed in (group means and
# variances, per-response entropy means, covariance means): float64 keeps large reward
# offsets and long sums exact enough; results go back to the caller's dtype.
ACCUMULATE_DTYPE = torch.float64


def compact_group_index(group_ids: torch.Tensor) -> torch.Tensor:
    """Dense slot index in [0, B) per element; equal ids share a slot."""
    flat = group_ids.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    slot_sorted = starts.to(torch.int64).cumsum(0) - 1
    return torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)


def segment_sum(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-slot sums of ``values`` (first dim indexed by ``index``), one slot per element."""
    out = torch.zeros((index.numel(),) + tuple(values.shape[1:]), dtype=values.dtype,
                      device=values.device)
    return out.index_add_(0, index, values)


def segment_sum_gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each element's own segment sum (``segment_sum`` gathered back per element)."""
    return segment_sum(values, index)[index]
