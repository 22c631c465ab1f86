"""Collectives over a ``torch.distributed`` process group, the bottom layer of hapo-ops.

Every function is pure (its input is never modified) and is the identity without a group
(``group=None``: a single process, nothing communicated). This module imports nothing else of
hapo-ops, so every op above it can reduce across ranks without pulling in another op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


def check_process_group(name: str, group: object, *, optional: bool = True
                        ) -> ProcessGroup | None:
    """``group`` as a ProcessGroup (or None when ``optional``); a TypeError naming ``name``
    otherwise."""
    if (group is None and optional) or isinstance(group, ProcessGroup):
        return group
    expected = "a torch.distributed ProcessGroup" + (" or None" if optional else "")
    raise TypeError(f"{name} must be {expected}, got {type(group).__name__}")


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: ProcessGroup | None
                ) -> torch.Tensor:
    if group is None:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=op, group=group)
    return out


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Σ over the ranks of ``group`` (a new tensor; ``tensor`` itself when group is None)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM, group)


def all_reduce_max(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Elementwise max over the ranks of ``group``."""
    return _all_reduce(tensor, dist.ReduceOp.MAX, group)


def all_gather_rows(rows: torch.Tensor, group: ProcessGroup | None = None
                    ) -> tuple[torch.Tensor, int]:
    """(the rows of every rank concatenated in rank order, offset of this rank's rows).

    Row counts may differ between ranks, and may be 0. That makes one host read
    unavoidable: the receive buffers' sizes are the other ranks' row counts (one all-gather
    of an int per rank), then one all-gather of the rows padded to the largest count.
    """
    if group is None:
        return rows, 0
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    size = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    sizes_out = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes_out, size, group=group)
    sizes = torch.cat(sizes_out).tolist()
    padded = rows.new_zeros((max(max(sizes), 1),) + tuple(rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    full = torch.cat([part[:n] for part, n in zip(gathered, sizes)])
    return full, sum(sizes[:rank])


def exclusive_prefix_sum(value: int | torch.Tensor, group: ProcessGroup | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """Σ of ``value`` over the ranks below this one (0 without a group), as an int64 0-d
    tensor: one all-gather of one int per rank, no host read. For example the global id of
    this rank's first vocabulary entry, from each rank's shard size."""
    value = torch.as_tensor(value, dtype=torch.int64, device=device).reshape(1)
    if group is None:
        return torch.zeros((), dtype=torch.int64, device=value.device)
    values = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(values, value, group=group)
    return torch.cat(values)[: dist.get_rank(group)].sum()


__all__ = ["ProcessGroup", "check_process_group", "all_gather_rows", "all_reduce_max",
           "all_reduce_sum", "exclusive_prefix_sum"]
