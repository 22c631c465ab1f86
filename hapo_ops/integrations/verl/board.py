"""The statistics board: a named Ray actor that carries the entropy statistics of the last
training batch from HAPO's engine (in an actor worker) to the agent-loop manager (in verl's
task runner), for the next rollout.

A named actor that is not detached dies with its last owner handle (handles from
``ray.get_actor`` do not count): whoever creates it with :func:`stats_board` ``(create=True)``
keeps the returned handle as long as the job (the agent-loop manager does; so does an engine
that restores statistics from a checkpoint before the manager exists). Failures are loud:
publishing without a board raises, reading failures raise (the manager logs and counts them).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from hapo_ops.entropy.signal import EntropyStats

try:
    import ray
except ImportError as exc:  # pragma: no cover - exercised only without verl (which needs ray)
    raise ImportError("hapo_ops.integrations.verl.board needs ray: pip install 'hapo-ops[verl]'") from exc

logger = logging.getLogger(__name__)

STATS_BOARD_NAME = "hapo_ops_entropy_stats"


class PublishedStats(NamedTuple):
    """Statistics on the board: the EntropyStats (0-d float32 tensors) and the training step
    whose batch gave them."""

    stats: EntropyStats
    step: int


@ray.remote(num_cpus=0)
class EntropyStatsBoard:
    """The latest training batch's entropy statistics, as (pivot, log_max, log_min, step)
    floats, or None."""

    def __init__(self) -> None:
        self.stats = None

    def put(self, stats: tuple[float, float, float, float]) -> None:
        self.stats = stats

    def get(self) -> tuple[float, float, float, float] | None:
        return self.stats


def stats_board(create: bool = False):
    """The named :class:`EntropyStatsBoard` of this Ray job (created if ``create``: keep the
    returned handle), or None when Ray is not running or the board does not exist."""
    if not ray.is_initialized():
        return None
    if create:
        return EntropyStatsBoard.options(name=STATS_BOARD_NAME, get_if_exists=True).remote()
    try:
        return ray.get_actor(STATS_BOARD_NAME)
    except ValueError:
        return None


def publish_entropy_stats(stats: EntropyStats, step: int = -1, board=None) -> None:
    """Post a training batch's statistics (and its step) for the next rollout.

    Raises RuntimeError when there is no board (Ray not running, or no
    ``HAPOAgentLoopManager`` in this job), so a rollout never silently stays at T_base.
    """
    board = stats_board() if board is None else board
    if board is None:
        raise RuntimeError(
            "hapo_ops: no entropy-statistics board to publish to (Ray not running, or no "
            "HAPOAgentLoopManager in this job: set actor_rollout_ref.rollout.agent."
            "agent_loop_manager_class=hapo_ops.integrations.verl.rollout.HAPOAgentLoopManager)")
    ray.get(board.put.remote((*(float(v) for v in stats), float(step))))


def publish_engine_stats(stats: EntropyStats, step: int, board=None) -> None:
    """What an actor engine does with its batch's statistics: :func:`publish_entropy_stats`
    inside a Ray job; outside one (the engine driven alone: no HAPO rollout to feed) an
    ERROR is logged instead. Shared by the FSDP and the Megatron engine."""
    if not ray.is_initialized():
        logger.error("hapo_ops: the entropy statistics of step %d are not published: Ray is "
                     "not running (no HAPO rollout to feed)", step)
        return
    publish_entropy_stats(stats, step, board=board)


def latest_entropy_stats(board=None) -> PublishedStats | None:
    """The statistics last published, or None (no training batch yet, or no board)."""
    board = stats_board() if board is None else board
    values = None if board is None else ray.get(board.get.remote())
    if values is None:
        return None
    return PublishedStats(EntropyStats(*(torch.tensor(v, dtype=torch.float32) for v in values[:3])),
                          int(values[3]))


__all__ = ["EntropyStatsBoard", "PublishedStats", "STATS_BOARD_NAME", "latest_entropy_stats",
           "publish_engine_stats", "publish_entropy_stats", "stats_board"]
