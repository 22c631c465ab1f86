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


def test_step_metrics_read_from_transfer_queue(local_ray):
    """The manager's rollout/hapo/* metrics of a training batch stored in a real
    TransferQueue (rows come back nested; T_t over the response tokens only), and verl's
    v1 trainer's metrics method wrapped to add them."""
    import transfer_queue as tq
    from tensordict import TensorDict
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    from hapo_ops.integrations.verl.rollout import HAPOAgentLoopManager
    from hapo_ops.integrations.verl.settings import RolloutSettings
    from hapo_ops.integrations.verl.wire import encode_row

    config = _compose(DOCUMENTED_OVERRIDES + DOCUMENTED_ENGINE_AND_ROLLOUT + SMALL_RUN + [
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1"])
    manager = HAPOAgentLoopManager(config=config, llm_client=None)
    assert PPOTrainer._compute_metrics.__wrapped__ is not None
    tq.init(config.transfer_queue)
    try:
        settings = RolloutSettings(tau=0.5, base_temperature=1.0, variant="paper", eps=1e-8,
                                   quantile=0.8)
        rows = torch.stack([encode_row((0.1, 1.0, -1.0), settings, step=3, stats_step=2)] * 2)
        # whole sequences (prompt 2 + response 3 and 2 tokens); T_t of the response tokens at
        # positions [1, 4) and [1, 3) (each output scores the next token)
        temperature = torch.nested.as_nested_tensor(
            [torch.tensor([9.0, 0.7, 1.2, 1.1, 9.0]), torch.tensor([9.0, 0.9, 1.3, 9.0])],
            layout=torch.jagged)
        response_mask = torch.nested.as_nested_tensor(
            [torch.tensor([1, 1, 1]), torch.tensor([1, 1])], layout=torch.jagged)
        fields = TensorDict({"hapo_rollout_stats": rows, "hapo_token_temperature": temperature,
                             "response_mask": response_mask}, batch_size=[2])
        meta = tq.kv_batch_put(keys=["a", "b"], partition_id="train", fields=fields)
        got = manager.step_metrics(meta)
        assert got["rollout/hapo/temperature_min"] == pytest.approx(0.7)
        assert got["rollout/hapo/temperature_max"] == pytest.approx(1.3)
        assert got["rollout/hapo/temperature_mean"] == pytest.approx((0.7 + 1.2 + 1.1 + 0.9 + 1.3) / 5)
        assert got["rollout/hapo/has_stats"] == 1.0 and got["rollout/hapo/stats_age"] == 1.0
        assert got["rollout/hapo/stats_errors"] == 0.0
        tq.kv_clear(keys=["a", "b"], partition_id="train")
    finally:
        tq.close()
