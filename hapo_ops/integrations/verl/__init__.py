"""HAPO in verl (0.9.x), by configuration: estimators, the actor loss, an engine and a rollout.

Source: HAPO, arXiv 2509.16591. This package is the entry point of verl's plugin group
``verl.plugins`` (``hapo_ops = "hapo_ops.integrations.verl"``): ``import verl`` imports it in
every process and :func:`register` (run at import) registers the advantage estimators
``hapo_tlga`` / ``hapo_tlga_released`` and the actor-loss dispatcher; where
``VERL_ENGINE_VENDOR=hapo`` it also imports :mod:`~hapo_ops.integrations.verl.engine`, which
registers HAPO's engine (and :mod:`~hapo_ops.integrations.verl.megatron_engine` where
megatron-core is installed). See :mod:`hapo_ops.integrations.verl.loss`.

Modules, each importing only those above it:

- :mod:`~hapo_ops.integrations.verl.settings`: the ``hapo_*`` defaults and checks, read
  from a verl configuration;
- :mod:`~hapo_ops.integrations.verl.wire`: the per-sample statistics row
  (``hapo_rollout_stats``) and its one encoder/decoder;
- :mod:`~hapo_ops.integrations.verl.board`: the Ray actor that carries the statistics from
  the engine to the rollout;
- :mod:`~hapo_ops.integrations.verl.loss`: estimators, :class:`HAPOPolicyLossConfig`,
  :func:`hapo_loss` and the loss dispatcher;
- :mod:`~hapo_ops.integrations.verl.engine`: HAPO's FSDP engine (exact T = 1 entropy,
  per-token temperature);
- :mod:`~hapo_ops.integrations.verl.megatron_engine`: the same for verl's Megatron strategy,
  on the tensor-parallel vocabulary shards (imported where megatron-core is installed);
- :mod:`~hapo_ops.integrations.verl.rollout`: the agent-loop manager and agent loop that
  carry the statistics into vLLM requests, and the ``rollout/hapo/*`` metrics.
"""

from hapo_ops.integrations.verl.loss import (ESTIMATORS, VERL_PPO_LOSS, HAPOPolicyLossConfig,
                                             check_loss_inputs, compute_hapo_tlga_advantage,
                                             compute_hapo_tlga_released_advantage,
                                             dispatch_ppo_loss, group_ids_from_index, hapo_loss,
                                             install_loss_dispatcher, loss_inputs,
                                             micro_batch_stats, policy_loss_kwargs,
                                             policy_loss_metrics, register,
                                             register_advantage_estimators, set_global_batch_info,
                                             verl_extra_terms)

import importlib.util as _importlib_util
import logging as _logging
import os as _os

from hapo_ops.integrations.verl.settings import ENGINE_VENDOR as _ENGINE_VENDOR

register()
if _os.environ.get("VERL_ENGINE_VENDOR", "") == _ENGINE_VENDOR:
    # this process builds its language-model engine from the vendor key "hapo"
    try:
        from hapo_ops.integrations.verl import engine  # noqa: F401  (registers the engine)

        if _importlib_util.find_spec("megatron") is not None and (
                _importlib_util.find_spec("megatron.core") is not None):
            # and its Megatron engine, where megatron-core is installed
            from hapo_ops.integrations.verl import megatron_engine  # noqa: F401
    except Exception:
        _logging.getLogger(__name__).error(
            "hapo_ops: VERL_ENGINE_VENDOR=hapo but HAPO's verl engine could not be registered",
            exc_info=True)
        raise

__all__ = [
    "ESTIMATORS",
    "HAPOPolicyLossConfig",
    "VERL_PPO_LOSS",
    "check_loss_inputs",
    "compute_hapo_tlga_advantage",
    "compute_hapo_tlga_released_advantage",
    "dispatch_ppo_loss",
    "group_ids_from_index",
    "hapo_loss",
    "install_loss_dispatcher",
    "loss_inputs",
    "micro_batch_stats",
    "policy_loss_kwargs",
    "policy_loss_metrics",
    "register",
    "register_advantage_estimators",
    "set_global_batch_info",
    "verl_extra_terms",
]
