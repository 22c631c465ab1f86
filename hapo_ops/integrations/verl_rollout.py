"""HAPO's rollout in verl (0.9.x): the step's statistics into every vLLM request.

Source: HAPO, arXiv 2509.16591, §3.1 (sample token t at T_t = T_base·(1 + τ·ĥ_t), ĥ from the
statistics of the previous training batch). Read against verl 0.9.1
(``verl.experimental.agent_loop``, ``verl.trainer.ppo.v1.agent_loop_tq``).

The path of the statistics, each hop a verl extension point selected by configuration:

1. HAPO's actor engine (:mod:`hapo_ops.integrations.verl_engine`) computes, while verl
   computes the old log-probs of a training batch, the statistics of its exact T = 1
   entropies (all data-parallel ranks) and publishes them with :func:`publish_entropy_stats`
   to a named Ray actor (:class:`EntropyStatsBoard`).
2. :class:`HAPOAgentLoopManager` (``actor_rollout_ref.rollout.agent.agent_loop_manager_class``)
   attaches the latest statistics, with τ, T_base (the rollout temperature), the variant,
   eps and the quantile, to every prompt batch it sends to the agent loops, as the
   non-tensor entry ``hapo_rollout_stats`` (as verl attaches ``global_steps``).
3. :class:`HAPOSingleTurnAgentLoop` (``agent_loop_config_path``, name
   ``hapo_single_turn_agent``) turns that entry into the request's
   ``extra_args["hapo"]`` for the vLLM logits processor
   (:func:`hapo_ops.integrations.vllm.sampling_extra_args`), with the engine's own
   temperature 1 (the processor applies T_base). verl copies every prompt entry into the
   trajectory, so the actor reads the very same row (``hapo_rollout_stats``) when it
   recomputes T_t.

HAPO's hyperparameters have one home, :class:`~hapo_ops.integrations.verl.HAPOPolicyLossConfig`
(``actor_rollout_ref.actor.policy_loss``: ``hapo_tau``, ``hapo_variant``,
``hapo_entropy_eps``, ``hapo_quantile``).
"""

from __future__ import annotations

from typing import Any

import torch

from hapo_ops.entropy.signal import EntropyStats
from hapo_ops.integrations.verl_engine import (ROLLOUT_STATS_FIELDS, ROLLOUT_STATS_KEY,
                                               rollout_stats_row, variant_of_code)
from hapo_ops.integrations.vllm import EXTRA_ARGS_KEY, sampling_extra_args

try:
    import ray
    from verl.utils import tensordict_utils as tu
    from verl.experimental.agent_loop.agent_loop import register
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError("hapo_ops.integrations.verl_rollout needs verl's v1 trainer: "
                      "pip install 'hapo-ops[verl]'") from exc

STATS_BOARD_NAME = "hapo_ops_entropy_stats"
AGENT_NAME = "hapo_single_turn_agent"


@ray.remote(num_cpus=0)
class EntropyStatsBoard:
    """The latest training batch's entropy statistics, as three floats (or None)."""

    def __init__(self) -> None:
        self.stats = None

    def put(self, stats: tuple[float, float, float]) -> None:
        self.stats = stats

    def get(self) -> tuple[float, float, float] | None:
        return self.stats


def stats_board(create: bool = False):
    """The named :class:`EntropyStatsBoard` of this Ray job (created if ``create``), or None
    when Ray is not running or the board does not exist."""
    if not ray.is_initialized():
        return None
    if create:
        return EntropyStatsBoard.options(name=STATS_BOARD_NAME, get_if_exists=True).remote()
    try:
        return ray.get_actor(STATS_BOARD_NAME)
    except ValueError:
        return None


def publish_entropy_stats(stats: EntropyStats) -> bool:
    """Post a training batch's statistics for the next rollout; False when there is no
    board (no Ray, or no :class:`HAPOAgentLoopManager` in this job)."""
    board = stats_board()
    if board is None:
        return False
    ray.get(board.put.remote(tuple(float(v) for v in stats)))
    return True


def latest_entropy_stats() -> EntropyStats | None:
    """The statistics last published, or None (no training batch yet, or no board)."""
    board = stats_board()
    values = None if board is None else ray.get(board.get.remote())
    return None if values is None else EntropyStats(*(torch.tensor(v) for v in values))


def hapo_settings(config: Any) -> dict:
    """τ, variant, eps and quantile from ``actor_rollout_ref.actor.policy_loss`` (defaults of
    :class:`~hapo_ops.integrations.verl.HAPOPolicyLossConfig` where absent) and T_base =
    ``actor_rollout_ref.rollout.temperature``."""
    from hapo_ops.integrations.verl import HAPOPolicyLossConfig

    defaults = HAPOPolicyLossConfig.__dataclass_fields__
    policy_loss = config.actor_rollout_ref.actor.get("policy_loss", {}) or {}

    def value(key):
        found = policy_loss.get(key, None)
        return defaults[key].default if found is None else found

    return {"tau": float(value("hapo_tau")), "variant": str(value("hapo_variant")),
            "eps": float(value("hapo_entropy_eps")), "quantile": float(value("hapo_quantile")),
            "base_temperature": float(config.actor_rollout_ref.rollout.temperature)}


def attach_rollout_stats(prompts: Any, stats: EntropyStats | None, settings: dict) -> Any:
    """Add the ``hapo_rollout_stats`` row (statistics and settings) to a prompt batch
    (``TensorDict``) as non-tensor data, in place; returns it."""
    tu.assign_non_tensor_data(prompts, ROLLOUT_STATS_KEY, rollout_stats_row(stats, **settings))
    return prompts


class HAPOAgentLoopManager(AgentLoopManagerTQ):
    """verl's v1 agent-loop manager that sends each prompt batch with the latest entropy
    statistics (``actor_rollout_ref.rollout.agent.agent_loop_manager_class=`` this class)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hapo_settings = hapo_settings(self.config)
        # A named actor that is not detached dies with its last owner handle (handles from
        # ray.get_actor do not count): this manager lives as long as the training job (verl's
        # task runner keeps it for the whole fit), so it keeps the handle.
        self.stats_board = stats_board(create=True)

    def generate_sequences(self, prompts):
        validate = "validate" in prompts.keys() and bool(prompts["validate"])
        if not validate:
            attach_rollout_stats(prompts, latest_entropy_stats(), self.hapo_settings)
        return super().generate_sequences(prompts)


def request_sampling_params(sampling_params: dict, row: Any) -> dict:
    """``sampling_params`` of one request with HAPO's ``extra_args`` from a
    ``hapo_rollout_stats`` row: temperature 1 (the processor applies T_base), T_base, τ,
    the variant, eps and the statistics (none before the first training batch). Greedy
    requests (temperature 0) are returned unchanged."""
    if float(sampling_params.get("temperature", 1.0)) == 0.0:
        return sampling_params
    row = torch.as_tensor(row, dtype=torch.float32).reshape(-1)
    if row.numel() != len(ROLLOUT_STATS_FIELDS):
        raise ValueError(f"{ROLLOUT_STATS_KEY} must hold {len(ROLLOUT_STATS_FIELDS)} values "
                         f"{ROLLOUT_STATS_FIELDS}, got {row.numel()}")
    fields = dict(zip(ROLLOUT_STATS_FIELDS, row.tolist()))
    variant = variant_of_code(fields["variant"])
    stats = EntropyStats(*(torch.tensor(fields[k]) for k in ("pivot", "log_max", "log_min")))
    extra = sampling_extra_args(stats, tau=fields["tau"], base_temperature=fields["base_temperature"],
                                variant=variant, eps=fields["eps"])
    params = dict(sampling_params)
    params["temperature"] = 1.0
    params["extra_args"] = {**(params.get("extra_args") or {}), **extra}
    return params


@register(AGENT_NAME)
class HAPOSingleTurnAgentLoop(SingleTurnAgentLoop):
    """verl's single-turn agent loop whose requests carry HAPO's ``extra_args`` (from the
    prompt's ``hapo_rollout_stats``; without it the request is verl's own)."""

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> Any:
        row = kwargs.get(ROLLOUT_STATS_KEY, None)
        if row is not None:
            sampling_params = request_sampling_params(sampling_params, row)
        return await super().run(sampling_params, **kwargs)


__all__ = [
    "AGENT_NAME",
    "EXTRA_ARGS_KEY",
    "EntropyStatsBoard",
    "HAPOAgentLoopManager",
    "HAPOSingleTurnAgentLoop",
    "STATS_BOARD_NAME",
    "attach_rollout_stats",
    "hapo_settings",
    "latest_entropy_stats",
    "publish_entropy_stats",
    "request_sampling_params",
    "stats_board",
]
