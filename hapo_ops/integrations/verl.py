"""HAPO in verl (0.9.x): advantage estimators and the whole actor loss, by configuration.

Source: HAPO, arXiv 2509.16591. Read against verl 0.9.1 (``verl.trainer.ppo.core_algos``,
``verl.workers.utils.losses.ppo_loss``, ``verl.workers.engine_workers``,
``verl.trainer.distillation.losses``).

This module is published as an entry point of verl's plugin group ``verl.plugins``, so
``import verl`` loads it in every process (driver, task runner, every Ray worker) and it
registers, in verl's own registries and hooks:

- advantage estimators ``"hapo_tlga"`` (token-level group average, paper variant) and
  ``"hapo_tlga_released"`` (the public reference code's fallback test), selected with
  ``algorithm.adv_estimator=hapo_tlga``;
- the actor loss. verl has no configuration key for a whole custom actor loss: its actor
  worker binds the module-level function ``ppo_loss`` (``engine_workers.init_model``) right
  after it has built the actor configuration. The plugin puts :func:`dispatch_ppo_loss` in
  that place (in ``verl.workers.utils.losses`` and in every loaded module that imported
  verl's function, e.g. ``engine_workers`` and the distillation loss), which runs
  :func:`hapo_loss` when ``actor.policy_loss`` is a :class:`HAPOPolicyLossConfig` and verl's
  own ``ppo_loss`` otherwise. So
  ``actor_rollout_ref.actor.policy_loss._target_=hapo_ops.integrations.verl.HAPOPolicyLossConfig``
  alone selects the HAPO loss in every trainer mode (``sync``, ``colocate_async``,
  ``separate_async``), and distillation, which calls ``ppo_loss`` for its policy term,
  composes with it. Building a :class:`HAPOPolicyLossConfig` installs the dispatcher too (so
  a worker that skipped the plugin still gets it) and raises if it cannot.

verl loads plugins inside ``try/except`` and logs failures at debug level only; a failure
here is logged at ERROR level before it propagates, so a broken install is visible.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

import hapo_ops
from hapo_ops._utils.validation import VARIANTS, check_choice, check_float

try:
    from verl.trainer.ppo import core_algos
    from verl.workers.config import PolicyLossConfig
    from verl.workers.utils import losses as verl_losses
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError("hapo_ops.integrations.verl needs verl: pip install 'hapo-ops[verl]'") from exc

logger = logging.getLogger(__name__)

ESTIMATORS = {"hapo_tlga": "paper", "hapo_tlga_released": "released"}
# verl's own actor loss, found through ``__wrapped__`` if this module is reloaded after the
# dispatcher replaced it.
VERL_PPO_LOSS = inspect.unwrap(verl_losses.ppo_loss)


# --------------------------------------------------------------------------- advantages


def group_ids_from_index(index: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """(B,) int64 group ids from verl's ``index`` (prompt uids: any hashable values).

    Equal values get equal ids. A numpy array of strings or numbers (what verl passes:
    ``data.non_tensor_batch["uid"]``) is mapped with one ``np.unique``; an integer tensor is
    used as is; values that do not sort against each other fall back to a dict lookup.
    """
    if index is None:
        raise ValueError("index must hold the prompt uid of every response (verl passes "
                         "data.non_tensor_batch['uid']), got None")
    if isinstance(index, torch.Tensor):
        if index.dim() != 1:
            raise ValueError(f"index must have shape (B,), got {tuple(index.shape)}")
        if not index.dtype.is_floating_point and index.dtype != torch.bool:
            return index.to(device=device, dtype=torch.int64)
        index = index.cpu().numpy()
    values = np.asarray(index, dtype=object if not isinstance(index, np.ndarray) else None)
    if values.ndim != 1:
        raise ValueError(f"index must have shape (B,), got {values.shape}")
    try:
        _, inverse = np.unique(values, return_inverse=True)
    except TypeError:  # mixed types that do not sort (e.g. str and int): first-seen order
        slots: dict[Any, int] = {}
        inverse = np.fromiter((slots.setdefault(v, len(slots)) for v in values.tolist()),
                              dtype=np.int64, count=len(values))
    return torch.as_tensor(inverse.reshape(-1).astype(np.int64), device=device)


def _config_value(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    getter = getattr(config, "get", None)
    value = getter(key, default) if getter is not None else getattr(config, key, default)
    return default if value is None else value


def _make_estimator(variant: str):
    def estimator(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                  config: Any = None, index: Any = None, **kwargs: Any
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = token_level_rewards.sum(dim=-1)
        group_ids = group_ids_from_index(index, rewards.device)
        advantages = hapo_ops.token_level_group_advantages(
            rewards, group_ids, response_mask,
            normalize_std=bool(_config_value(config, "norm_adv_by_std_in_grpo", True)),
            eps=float(_config_value(config, "hapo_eps", 1e-6)),
            fallback_threshold=float(_config_value(config, "hapo_fallback_threshold", 5.0)),
            variant=variant)
        advantages = advantages.to(token_level_rewards.dtype)
        return advantages, advantages

    estimator.__name__ = ("compute_hapo_tlga_advantage" if variant == "paper"
                          else "compute_hapo_tlga_released_advantage")
    estimator.__qualname__ = estimator.__name__
    estimator.__doc__ = (
        f"HAPO token-level group-average advantages ({variant} variant) in verl's estimator "
        "contract.\n\n"
        "R_i = Σ_t token_level_rewards[i, t]; groups from ``index`` (prompt uids);\n"
        "μ_g, σ_g token-weighted over the valid tokens of the group; A_i = (R_i − μ_g)/(σ_g + eps)\n"
        "broadcast over the response tokens; GRPO fallback for groups with |A_i| ≥ threshold.\n"
        "Returns (advantages, returns), both (B, L), zero outside ``response_mask``. Read from\n"
        "``config`` (verl's ``algorithm`` section): ``norm_adv_by_std_in_grpo`` (default True) and\n"
        "the optional ``hapo_eps`` (1e-6) and ``hapo_fallback_threshold`` (5.0).")
    return estimator


compute_hapo_tlga_advantage = _make_estimator("paper")
compute_hapo_tlga_released_advantage = _make_estimator("released")
_ESTIMATOR_FNS = {"hapo_tlga": compute_hapo_tlga_advantage,
                  "hapo_tlga_released": compute_hapo_tlga_released_advantage}


def register_advantage_estimators() -> None:
    """Register ``hapo_tlga`` and ``hapo_tlga_released`` with verl (idempotent)."""
    for name, fn in _ESTIMATOR_FNS.items():
        if core_algos.ADV_ESTIMATOR_REGISTRY.get(name) is not fn:
            core_algos.ADV_ESTIMATOR_REGISTRY.pop(name, None)  # a reload of this module
            core_algos.register_adv_est(name)(fn)


# --------------------------------------------------------------------------- loss config


@dataclass
class HAPOPolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` plus the HAPO hyperparameters read by :func:`hapo_loss`.

    Select it with ``actor_rollout_ref.actor.policy_loss._target_=`` this class' path and set
    fields with ``+actor_rollout_ref.actor.policy_loss.hapo_alpha=...``. The clip bounds,
    dual clip and aggregation are verl's own actor keys: ``clip_ratio_low``,
    ``clip_ratio_high``, ``clip_ratio_c`` (HAPO's reference uses 10) and ``loss_agg_mode``.

    hapo_variant: "paper" or "released" (ĥ below the pivot, as in the reference code).
    hapo_alpha / hapo_beta: adaptive clipping / advantage redistribution strengths.
    hapo_quantile: pivot quantile of the entropy statistics.
    hapo_stats_scope: "dp" pools the entropy statistics of each micro-batch over the
      data-parallel ranks (exact, collective), "local" uses this rank's micro-batch only.
    hapo_entropy_eps: floor of H before the log.
    hapo_tau: adaptive temperature strength τ of the rollout, |τ| < 1 (read by the HAPO
      agent-loop manager, :mod:`hapo_ops.integrations.verl_rollout`; unused by the loss).
    """

    hapo_variant: str = "paper"
    hapo_alpha: float = 1.0
    hapo_beta: float = 1.0
    hapo_quantile: float = 0.8
    hapo_stats_scope: str = "dp"
    hapo_entropy_eps: float = 1e-8
    hapo_tau: float = 0.05

    def __post_init__(self) -> None:
        check_choice("hapo_variant", self.hapo_variant, VARIANTS)
        check_float("hapo_alpha", self.hapo_alpha)
        check_float("hapo_beta", self.hapo_beta)
        check_float("hapo_quantile", self.hapo_quantile, min_value=0.0, max_value=1.0)
        check_choice("hapo_stats_scope", self.hapo_stats_scope, ("dp", "local"))
        check_float("hapo_entropy_eps", self.hapo_entropy_eps, min_value=0.0, min_inclusive=False)
        check_float("hapo_tau", self.hapo_tau, min_value=-1.0, min_inclusive=False, max_value=1.0,
                    max_inclusive=False)
        if self.loss_mode != "vanilla":
            raise ValueError("HAPOPolicyLossConfig replaces the whole policy loss: loss_mode must "
                             f"stay 'vanilla', got {self.loss_mode!r}")
        # the actor worker builds this config right before it binds its loss function
        install_loss_dispatcher()


def _hapo_param(policy_loss: Any, name: str) -> Any:
    """A HAPO field of ``actor.policy_loss`` (a HAPOPolicyLossConfig, or any mapping with
    ``hapo_*`` keys); the class default where it is absent."""
    return _config_value(policy_loss, name, HAPOPolicyLossConfig.__dataclass_fields__[name].default)


# --------------------------------------------------------------------------- actor loss


def _policy_rollout_correction_check(config: Any) -> None:
    rollout_correction = _config_value(getattr(config, "policy_loss", None), "rollout_correction", None)
    if rollout_correction is not None and _config_value(rollout_correction, "bypass_mode", False):
        raise ValueError("hapo_loss does not implement verl's rollout-correction bypass mode "
                         "(algorithm.rollout_correction.bypass_mode=True); use the decoupled mode "
                         "(old log-probs recomputed by the actor)")


def hapo_loss(config: Any, model_output: dict, data: Any, dp_group: Any = None
              ) -> tuple[torch.Tensor, dict]:
    """The HAPO actor loss in the shape of verl's ``set_loss_fn`` (``ppo_loss``'s place).

    ``config``: the actor config (``ActorConfig``); ``model_output``: the engine's output for
    one micro-batch, with ``log_probs`` and ``entropy`` (set
    ``actor_rollout_ref.actor.calculate_entropy=True`` so that verl computes it);
    ``data``: the micro-batch ``TensorDict`` (``old_log_probs``, ``advantages``,
    ``response_mask``, optionally ``rollout_is_weights`` and ``ref_log_prob``, and verl's
    global ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size``).

    Loss = :func:`hapo_ops.hapo_policy_loss` (ĥ from this micro-batch's entropy, adaptive
    clip bounds around ``clip_ratio_low/high``, redistribution, dual clip ``clip_ratio_c``),
    times ``rollout_is_weights`` per token when present, aggregated with ``loss_agg_mode``
    over verl's global counts and multiplied by ``dp_size``, as verl's ``agg_loss`` does
    (DDP/FSDP average gradients over ranks); minus ``entropy_coeff`` times the aggregated
    entropy, plus ``kl_loss_coef`` times the KL loss when ``use_kl_loss``, as ``ppo_loss``.
    All of it in float32 whatever the engine's dtype (the casts are differentiable). With
    ``hapo_alpha = hapo_beta = 0`` this is verl's vanilla ``ppo_loss``.
    Returns ``(loss, metrics)`` with verl's metric names (``actor/pg_loss``,
    ``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``,
    ``actor/entropy_loss``, ``kl_loss``) plus ``actor/hapo/*``.
    """
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding

    entropy = model_output.get("entropy", None)
    if entropy is None:
        raise ValueError("hapo_loss needs the per-token entropy: set "
                         "actor_rollout_ref.actor.calculate_entropy=True")
    _policy_rollout_correction_check(config)
    # The loss math is float32 whatever the engine hands over (bf16 under FSDP mixed
    # precision): the casts are differentiable, gradients flow back in the input dtype.
    log_prob = no_padding_2_padding(model_output["log_probs"], data).float()
    entropy = no_padding_2_padding(entropy, data).float()

    dp_size = data["dp_size"]
    batch_num_tokens = data["batch_num_tokens"]
    global_batch_size = data["global_batch_size"]
    # verl's own terms below (entropy bonus, KL loss) aggregate with these, like ppo_loss
    config.global_batch_info["dp_size"] = dp_size
    config.global_batch_info["batch_num_tokens"] = batch_num_tokens
    config.global_batch_info["global_batch_size"] = global_batch_size
    config.global_batch_info["loss_scale_factor"] = config.loss_scale_factor
    if (dp_size > 1 or batch_num_tokens is not None or global_batch_size is not None
            or config.loss_scale_factor is not None):
        metric_aggregation = AggregationType.SUM
    else:
        metric_aggregation = AggregationType.MEAN

    fields = ["response_mask", "old_log_probs", "advantages"]
    for optional in ("rollout_is_weights", "ref_log_prob"):
        if optional in data:
            fields.append(optional)
    padded = data.select(*fields).to_padded_tensor()
    response_mask = padded["response_mask"].to(torch.bool)
    old_log_prob = padded["old_log_probs"].float()
    advantages = padded["advantages"].float()
    weights = padded.get("rollout_is_weights", None)

    policy_loss_cfg = config.policy_loss
    variant = _hapo_param(policy_loss_cfg, "hapo_variant")
    quantile = float(_hapo_param(policy_loss_cfg, "hapo_quantile"))
    entropy_eps = float(_hapo_param(policy_loss_cfg, "hapo_entropy_eps"))
    scope = _hapo_param(policy_loss_cfg, "hapo_stats_scope")
    group = None
    if (scope == "dp" and dp_group is not None and torch.distributed.is_available()
            and torch.distributed.is_initialized()):
        group = dp_group
    with torch.no_grad():
        stats = hapo_ops.entropy_stats(entropy.detach(), response_mask, quantile=quantile,
                                       eps=entropy_eps, group=group)

    mode = config.loss_agg_mode
    agg_kwargs = _aggregation_kwargs(mode, response_mask, batch_num_tokens, global_batch_size,
                                     config.loss_scale_factor)
    clip_ratio_low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    clip_ratio_high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    out = hapo_ops.hapo_policy_loss(
        log_prob, old_log_prob, advantages, entropy, response_mask, stats=stats, variant=variant,
        eps_low=float(clip_ratio_low), eps_high=float(clip_ratio_high),
        alpha=float(_hapo_param(policy_loss_cfg, "hapo_alpha")),
        beta=float(_hapo_param(policy_loss_cfg, "hapo_beta")), quantile=quantile,
        dual_clip=float(config.clip_ratio_c), agg=mode, entropy_eps=entropy_eps, **agg_kwargs)
    pg_loss = out.loss
    if weights is not None:
        pg_loss = hapo_ops.aggregate_loss(out.per_token * weights.detach().float(),
                                          response_mask, mode, **agg_kwargs)
    pg_loss = pg_loss * dp_size

    with torch.no_grad():
        h_hat = hapo_ops.normalized_entropy(entropy.detach(), stats, variant=variant,
                                            eps=entropy_eps)
        n_valid = response_mask.sum().clamp_min(1)
        h_hat_mean = (h_hat * response_mask).sum() / n_valid
        # verl's ppo_kl: the mean of -log r (clamped like the loss's ratio), where
        # approx_kl is the k3 estimator (r - 1) - log r
        log_ratio = torch.clamp(log_prob.detach() - old_log_prob, -20.0, 20.0)
        ppo_kl = (-log_ratio * response_mask).sum() / n_valid
    pg_metrics = {
        "actor/pg_clipfrac": (out.clip_frac_low + out.clip_frac_high).item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": out.dual_clip_frac.item(),
        "actor/hapo/clip_frac_low": out.clip_frac_low.item(),
        "actor/hapo/clip_frac_high": out.clip_frac_high.item(),
        "actor/hapo/dual_clip_frac": out.dual_clip_frac.item(),
        "actor/hapo/approx_kl": out.approx_kl.item(),
        "actor/hapo/h_hat_mean": h_hat_mean.item(),
        "actor/hapo/pivot": stats.pivot.item(),
    }
    metrics = dict(Metric.from_dict(pg_metrics, aggregation=AggregationType.MEAN))
    metrics["actor/pg_loss"] = Metric(value=pg_loss.detach().item(), aggregation=metric_aggregation)
    policy_loss = pg_loss

    # verl's own terms, as ppo_loss adds them (the entropy term whenever the entropy is there)
    entropy_loss = core_algos.agg_loss(loss_mat=entropy, loss_mask=response_mask,
                                       loss_agg_mode=mode, **config.global_batch_info)
    policy_loss = policy_loss - config.entropy_coeff * entropy_loss
    metrics["actor/entropy_loss"] = Metric(value=entropy_loss.detach().item(),
                                           aggregation=metric_aggregation)
    if config.use_kl_loss:
        kld = core_algos.kl_penalty(logprob=log_prob, ref_logprob=padded["ref_log_prob"].float(),
                                    kl_penalty=config.kl_loss_type)
        kl_loss = core_algos.agg_loss(loss_mat=kld, loss_mask=response_mask, loss_agg_mode=mode,
                                      **config.global_batch_info)
        policy_loss = policy_loss + kl_loss * config.kl_loss_coef
        metrics["kl_loss"] = Metric(value=kl_loss.detach().item(), aggregation=metric_aggregation)
        metrics["kl_coef"] = config.kl_loss_coef
    return policy_loss, metrics


def _aggregation_kwargs(mode: str, mask: torch.Tensor, batch_num_tokens: Optional[float],
                        global_batch_size: Optional[float], loss_scale_factor: Optional[float]
                        ) -> dict:
    """Denominators that make ``hapo_ops.aggregate_loss`` × dp_size equal verl's ``agg_loss``."""
    if mode == "token-mean":
        return {"num_tokens": batch_num_tokens}
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        return {"num_sequences": global_batch_size}
    if mode == "seq-mean-token-sum-norm":
        sequences = global_batch_size
        if sequences is None:
            sequences = (mask.sum(-1) > 0).sum()
        scale = mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return {"normalizer": sequences * scale}
    return {}


# --------------------------------------------------------------------------- the loss hook


def dispatch_ppo_loss(config: Any, model_output: dict, data: Any, dp_group: Any = None
                      ) -> tuple[torch.Tensor, dict]:
    """verl's ``ppo_loss`` with HAPO selectable by configuration.

    :func:`hapo_loss` when ``config.policy_loss`` is a :class:`HAPOPolicyLossConfig`, verl's
    own ``ppo_loss`` (``VERL_PPO_LOSS``) otherwise, with the same arguments and results.
    """
    if isinstance(getattr(config, "policy_loss", None), HAPOPolicyLossConfig):
        return hapo_loss(config, model_output, data, dp_group)
    return VERL_PPO_LOSS(config, model_output, data, dp_group)


dispatch_ppo_loss.__wrapped__ = VERL_PPO_LOSS


def install_loss_dispatcher() -> list[str]:
    """Put :func:`dispatch_ppo_loss` where verl's ``ppo_loss`` is looked up (idempotent).

    verl's ``verl.workers.utils.losses.ppo_loss`` is replaced, so every later
    ``from verl.workers.utils.losses import ppo_loss`` binds the dispatcher, and so is every
    module already loaded that bound verl's function under that name (``engine_workers``,
    ``trainer.distillation.losses``, recipes). Returns the names of those modules.

    Raises RuntimeError when verl's actor worker is loaded but does not look the loss up as
    ``ppo_loss`` (a verl this module was not written for): the HAPO configuration would
    otherwise be ignored silently.
    """
    patched = []
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if namespace is None or name == __name__:
            continue
        bound = namespace.get("ppo_loss", None)
        if bound is dispatch_ppo_loss:
            patched.append(name)
        elif bound is not None and inspect.unwrap(bound) is VERL_PPO_LOSS:
            namespace["ppo_loss"] = dispatch_ppo_loss
            patched.append(name)
    workers = sys.modules.get("verl.workers.engine_workers")
    if verl_losses.ppo_loss is not dispatch_ppo_loss or (
            workers is not None and vars(workers).get("ppo_loss") is not dispatch_ppo_loss):
        raise RuntimeError(
            "hapo_ops could not install its actor loss in verl: verl's actor worker does not "
            "bind verl.workers.utils.losses.ppo_loss (hapo_ops supports verl 0.9.x); "
            "HAPOPolicyLossConfig would be ignored")
    return sorted(patched)


def register() -> None:
    """Everything the plugin registers: the estimators and the loss dispatcher.

    A failure is logged at ERROR level (verl's plugin loader would log it at debug level
    only) and raised.
    """
    try:
        register_advantage_estimators()
        install_loss_dispatcher()
    except Exception:
        logger.error("hapo_ops: registering HAPO with verl failed; the HAPO estimators and "
                     "loss are NOT available", exc_info=True)
        raise
    if os.environ.get("VERL_ENGINE_VENDOR", "") == "hapo":
        # this process builds its language-model engine from the vendor key "hapo"
        from hapo_ops.integrations import verl_engine  # noqa: F401  (registers the engine)

        if importlib.util.find_spec("megatron") is not None and (
                importlib.util.find_spec("megatron.core") is not None):
            # and its Megatron engine, where megatron-core is installed
            from hapo_ops.integrations import verl_megatron  # noqa: F401


register()

__all__ = [
    "ESTIMATORS",
    "HAPOPolicyLossConfig",
    "VERL_PPO_LOSS",
    "compute_hapo_tlga_advantage",
    "compute_hapo_tlga_released_advantage",
    "dispatch_ppo_loss",
    "group_ids_from_index",
    "hapo_loss",
    "install_loss_dispatcher",
    "register",
    "register_advantage_estimators",
]
