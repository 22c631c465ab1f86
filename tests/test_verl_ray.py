"""HAPO's statistics board for verl across real Ray processes (local Ray, CPU only).

The board is the named Ray actor through which HAPO's actor engine (in a worker process)
hands the entropy statistics of a training batch to the agent-loop manager (in verl's task
runner) for the next rollout. These tests start a local Ray with two CPUs.
"""

from __future__ import annotations

import gc

import pytest
import torch

pytest.importorskip("verl")
ray = pytest.importorskip("ray")

from hapo_ops.entropy.signal import EntropyStats  # noqa: E402

from test_verl_integration import (DOCUMENTED_ENGINE_AND_ROLLOUT, DOCUMENTED_OVERRIDES,  # noqa: E402
                                   SMALL_RUN, _compose)


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@ray.remote(num_cpus=0)
class TaskRunner:
    """Stands where verl's TaskRunnerV1 stands: builds the agent-loop manager in a method
    that returns, and keeps the manager (as ``self.agent_loop_manager``) for the job."""

    def init_agent_loop_manager(self, config):
        from hapo_ops.integrations.verl.rollout import HAPOAgentLoopManager

        self.agent_loop_manager = HAPOAgentLoopManager(config=config, llm_client=None)
        gc.collect()
        return True


@ray.remote(num_cpus=0)
def publish(values):
    from hapo_ops.integrations.verl.board import publish_entropy_stats

    publish_entropy_stats(EntropyStats(*(torch.tensor(v) for v in values)), step=1)


@ray.remote(num_cpus=0)
def read():
    from hapo_ops.integrations.verl.board import latest_entropy_stats

    published = latest_entropy_stats()
    return None if published is None else (*(float(v) for v in published.stats), published.step)


def test_statistics_published_by_one_worker_are_read_by_another(local_ray):
    """The manager's constructor returns (and the method that built it), then one Ray worker
    publishes and another reads: the board is still there, and holds what was published."""
    config = _compose(DOCUMENTED_OVERRIDES + DOCUMENTED_ENGINE_AND_ROLLOUT + SMALL_RUN)
    runner = TaskRunner.remote()
    assert ray.get(runner.init_agent_loop_manager.remote(config))
    gc.collect()
    assert ray.get(read.remote()) is None  # nothing published yet
    ray.get(publish.remote((0.25, 1.5, -2.0)))
    assert ray.get(read.remote()) == (0.25, 1.5, -2.0, 1)
    ray.kill(runner)
