"""HAPO's rollout in verl (0.9.x): the step's statistics into every vLLM request.

Source: HAPO, arXiv 2509.16591, §3.1 (sample token t at T_t = T_base·(1 + τ·ĥ_t), ĥ from the
statistics of the previous training batch). Read against verl 0.9.1
(``verl.experimental.agent_loop``, ``verl.trainer.ppo.v1.agent_loop_tq``,
``verl.trainer.ppo.v1.trainer_base``).

The path of the statistics, each hop a verl extension point selected by configuration:

1. HAPO's actor engine (:mod:`hapo_ops.integrations.verl.engine`) computes, while verl
   computes the old log-probs of a training batch, the statistics of its exact T = 1
   entropies (all data-parallel ranks) and publishes them, with the batch's step, to the
   statistics board (:mod:`hapo_ops.integrations.verl.board`).
2. :class:`HAPOAgentLoopManager` (``actor_rollout_ref.rollout.agent.agent_loop_manager_class``)
   keeps the board for the job, and attaches the latest statistics, with τ, T_base (the
   rollout temperature), the variant, eps, the quantile, this step and the statistics'
   step, to every prompt batch it sends to the agent loops, as the non-tensor entry
   ``hapo_rollout_stats`` (one row, :mod:`hapo_ops.integrations.verl.wire`).
3. :class:`HAPOSingleTurnAgentLoop` (``agent_loop_config_path``, name
   ``hapo_single_turn_agent``) turns that row into the request's ``extra_args["hapo"]`` for
   the vLLM logits processor, with the engine's own temperature 1 (the processor applies
   T_base). verl copies every prompt entry into the trajectory, so the actor reads the very
   same row when it recomputes T_t.

At start the manager refuses a configuration that would sample off-policy without a word:
no HAPO logits processor in the vLLM engine's configuration, another rollout engine than
vLLM, or HAPO's engine not selected. Each training step it adds ``rollout/hapo/*`` metrics
to verl's logged metrics (:func:`rollout_metrics`, :func:`install_rollout_metrics`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from hapo_ops.integrations.verl.board import PublishedStats, latest_entropy_stats, stats_board
from hapo_ops.integrations.verl.settings import (ENGINE_VENDOR, RolloutSettings, config_value,
                                                 rollout_settings)
from hapo_ops.integrations.verl.wire import (ROLLOUT_STATS_KEY, TOKEN_TEMPERATURE_KEY, column,
                                             dense_stats_rows, encode_row, has_stats,
                                             row_extra_args)
from hapo_ops.integrations.vllm import EXTRA_ARGS_KEY

try:
    from verl.experimental.agent_loop.agent_loop import register
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ
    from verl.utils import tensordict_utils as tu
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError("hapo_ops.integrations.verl.rollout needs verl's v1 trainer: "
                      "pip install 'hapo-ops[verl]'") from exc

logger = logging.getLogger(__name__)

AGENT_NAME = "hapo_single_turn_agent"
#: The processor line the vLLM engine's configuration must hold (either processor class).
PROCESSOR_LINE = ("+actor_rollout_ref.rollout.engine_kwargs.vllm.logits_processors="
                  "[hapo_ops.integrations.vllm:AdaptiveTemperatureLogitsProcessor]")
ENGINE_LINE = f"+ray_kwargs.ray_init.runtime_env.env_vars.VERL_ENGINE_VENDOR={ENGINE_VENDOR}"
#: Value of ``rollout/hapo/stats_age`` when the rollout had no statistics.
NO_STATS_AGE = -1.0


def check_rollout_config(config: Any) -> None:
    """Raise ValueError naming the missing configuration line when the HAPO rollout would
    sample off-policy silently: rollout engine other than vLLM, no HAPO logits processor in
    ``actor_rollout_ref.rollout.engine_kwargs.vllm.logits_processors`` (vLLM would ignore
    ``extra_args["hapo"]`` while the trainer scores at T_t), or HAPO's engine not selected
    (``VERL_ENGINE_VENDOR=hapo`` in the workers' runtime environment or this process'
    environment: verl's engine would score at T_base what was sampled at T_t)."""
    rollout = config.actor_rollout_ref.rollout
    if config_value(rollout, "name", "vllm") != "vllm":
        raise ValueError("HAPOAgentLoopManager needs vLLM's rollout (its logits processor "
                         f"applies T_t): set actor_rollout_ref.rollout.name=vllm, got "
                         f"{rollout.name!r}")
    engine_kwargs = config_value(config_value(rollout, "engine_kwargs", {}), "vllm", {})
    processors = [str(p) for p in (config_value(engine_kwargs, "logits_processors", []) or [])]
    if not any(p.startswith("hapo_ops.integrations.vllm:AdaptiveTemperatureLogitsProcessor")
               for p in processors):
        raise ValueError("HAPOAgentLoopManager: vLLM has no HAPO logits processor, so it would "
                         "ignore the per-token temperatures the trainer scores with; add the line "
                         f"{PROCESSOR_LINE} (got logits_processors={processors})")
    env_vars = config_value(config_value(config_value(config_value(
        config, "ray_kwargs", {}), "ray_init", {}), "runtime_env", {}), "env_vars", {})
    vendor = config_value(env_vars, "VERL_ENGINE_VENDOR", os.environ.get("VERL_ENGINE_VENDOR", ""))
    if vendor != ENGINE_VENDOR:
        raise ValueError("HAPOAgentLoopManager needs HAPO's actor engine (it scores the old "
                         "log-probs at the rollout's per-token temperatures); add the line "
                         f"{ENGINE_LINE}")


def rollout_metrics(rows: torch.Tensor, temperature: torch.Tensor | None = None,
                    response_mask: torch.Tensor | None = None) -> dict[str, float]:
    """The dashboard metrics of one training batch's rollout.

    ``rows``: the batch's ``hapo_rollout_stats`` (dense or nested); ``temperature``: the
    per-token T_t the engine stored (``hapo_token_temperature``), and ``response_mask``,
    both (batch, response length) padded or nested alike. Returns
    ``rollout/hapo/has_stats`` (share of samples whose rollout had statistics: 1.0 or 0.0
    when the whole batch comes from one rollout), ``rollout/hapo/stats_age`` (mean over
    those samples of their step minus the step whose training batch gave the statistics,
    1 in verl's sync trainer; :data:`NO_STATS_AGE` when none had statistics) and, with
    ``temperature``, ``rollout/hapo/temperature_{min,mean,max}`` over the response tokens.
    """
    rows = dense_stats_rows(rows)
    with_stats = has_stats(rows)
    age = (column(rows, "step") - column(rows, "stats_step"))[with_stats]
    values = {"rollout/hapo/has_stats": with_stats.float().mean(),
              "rollout/hapo/stats_age": age.mean() if age.numel() else torch.tensor(NO_STATS_AGE)}
    if temperature is not None:
        if temperature.is_nested:
            temperature, response_mask = temperature.values(), response_mask.values()
        picked = temperature.float()[response_mask.bool()]
        if picked.numel():
            values.update({"rollout/hapo/temperature_min": picked.min(),
                           "rollout/hapo/temperature_mean": picked.mean(),
                           "rollout/hapo/temperature_max": picked.max()})
    names = list(values)
    return dict(zip(names, torch.stack([values[n].float().cpu() for n in names]).tolist()))


def attach_rollout_stats(prompts: Any, published: PublishedStats | None,
                         settings: RolloutSettings) -> Any:
    """Add the ``hapo_rollout_stats`` row (statistics, settings, the prompts' step
    ``global_steps`` and the statistics' step) to a prompt batch (``TensorDict``) as
    non-tensor data, in place; returns it."""
    step = int(tu.get_non_tensor_data(data=prompts, key="global_steps", default=0))
    row = encode_row(None if published is None else published.stats, settings, step=step,
                     stats_step=-1 if published is None else published.step)
    tu.assign_non_tensor_data(prompts, ROLLOUT_STATS_KEY, row)
    return prompts


class HAPOAgentLoopManager(AgentLoopManagerTQ):
    """verl's v1 agent-loop manager that sends each prompt batch with the latest entropy
    statistics (``actor_rollout_ref.rollout.agent.agent_loop_manager_class=`` this class).

    Keeps the statistics board for the job (``stats_board``); counts failures to read it
    (``stats_errors``: each one logged at ERROR, the rollout then at T_base) and adds
    ``rollout/hapo/*`` to every training step's metrics (:meth:`step_metrics`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_rollout_config(self.config)
        self.hapo_settings = rollout_settings(self.config)
        # A named actor that is not detached dies with its last owner handle (handles from
        # ray.get_actor do not count): this manager lives as long as the training job
        # (verl's task runner keeps it for the whole fit), so it keeps the handle.
        self.stats_board = stats_board(create=True)
        self.stats_errors = 0
        install_rollout_metrics()

    def read_stats(self):
        """The board's latest statistics (``PublishedStats``) or None; a failure to read is
        logged at ERROR, counted in ``stats_errors`` and gives None (T_base)."""
        try:
            return latest_entropy_stats(self.stats_board)
        except Exception:
            self.stats_errors += 1
            logger.error("hapo_ops: reading the entropy statistics failed (%d so far); this "
                         "rollout samples at T_base", self.stats_errors, exc_info=True)
            return None

    def generate_sequences(self, prompts):
        validate = "validate" in prompts.keys() and bool(prompts["validate"])
        if not validate:
            attach_rollout_stats(prompts, self.read_stats(), self.hapo_settings)
        return super().generate_sequences(prompts)

    def step_metrics(self, batch: Any) -> dict[str, float]:
        """``rollout/hapo/*`` of a training step's batch (a TransferQueue ``KVBatchMeta``),
        read from TransferQueue (the rows, then T_t and the response mask), plus
        ``rollout/hapo/stats_errors``; a failure to read is logged at ERROR and counted, and
        the metrics that could be read are still returned."""
        import transfer_queue as tq
        from verl.workers.utils.padding import response_from_nested

        def get(fields):
            return tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                                   select_fields=fields)

        metrics: dict[str, float] = {}
        try:
            rows = get([ROLLOUT_STATS_KEY])[ROLLOUT_STATS_KEY]
            metrics.update(rollout_metrics(rows))
            data = get([TOKEN_TEMPERATURE_KEY, "response_mask"])
            temperature = response_from_nested(data[TOKEN_TEMPERATURE_KEY], data["response_mask"])
            metrics.update(rollout_metrics(rows, temperature, data["response_mask"]))
        except Exception:
            self.stats_errors += 1
            logger.error("hapo_ops: the rollout/hapo metrics of this step could not be read "
                         "(%d failures so far)", self.stats_errors, exc_info=True)
        metrics["rollout/hapo/stats_errors"] = float(self.stats_errors)
        return metrics


def install_rollout_metrics() -> None:
    """Make verl's v1 trainer log :meth:`HAPOAgentLoopManager.step_metrics` with every
    training step (idempotent).

    verl's v1 trainer takes no metrics from its agent-loop manager; every step it calls
    ``PPOTrainer._compute_metrics(batch, metrics, ...)`` right before it logs ``metrics``,
    while the step's batch is still in TransferQueue. That method is wrapped so that, when
    the trainer's ``agent_loop_manager`` is a :class:`HAPOAgentLoopManager`, its step
    metrics are added to ``metrics`` first; verl's own computation is unchanged.
    """
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    original = PPOTrainer._compute_metrics
    if getattr(original, "__wrapped__", None) is not None:
        return

    def compute_metrics(self, batch, metrics, *args, **kwargs):
        manager = getattr(self, "agent_loop_manager", None)
        if isinstance(manager, HAPOAgentLoopManager):
            metrics.update(manager.step_metrics(batch))
        return original(self, batch, metrics, *args, **kwargs)

    compute_metrics.__wrapped__ = original
    compute_metrics.__doc__ = original.__doc__
    PPOTrainer._compute_metrics = compute_metrics


def request_sampling_params(sampling_params: dict, row: Any) -> dict:
    """``sampling_params`` of one request with HAPO's ``extra_args`` from a
    ``hapo_rollout_stats`` row (:func:`hapo_ops.integrations.verl.wire.row_extra_args`):
    temperature 1 (the processor applies T_base), T_base, τ, the variant, eps and the
    statistics (none before the first training batch). Greedy requests (temperature 0) are
    returned unchanged."""
    if float(sampling_params.get("temperature", 1.0)) == 0.0:
        return sampling_params
    params = dict(sampling_params)
    params["temperature"] = 1.0
    params["extra_args"] = {**(params.get("extra_args") or {}), **row_extra_args(row)}
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
    "ENGINE_LINE",
    "EXTRA_ARGS_KEY",
    "HAPOAgentLoopManager",
    "HAPOSingleTurnAgentLoop",
    "NO_STATS_AGE",
    "PROCESSOR_LINE",
    "attach_rollout_stats",
    "check_rollout_config",
    "install_rollout_metrics",
    "request_sampling_params",
    "rollout_metrics",
]
