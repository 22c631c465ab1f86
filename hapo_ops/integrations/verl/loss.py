"""HAPO in verl (0.9.x): advantage estimators and the whole actor loss, by configuration.

Source: HAPO, arXiv 2509.16591. Read against verl 0.9.1 (``verl.trainer.ppo.core_algos``,
``verl.workers.utils.losses.ppo_loss``, ``verl.workers.engine_workers``,
``verl.trainer.distillation.losses``).

:mod:`hapo_ops.integrations.verl` (which re-exports this module) is published as an entry
point of verl's plugin group ``verl.plugins``, so ``import verl`` loads it in every process
(driver, task runner, every Ray worker) and :func:`register` registers, in verl's own
registries and hooks:

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

import inspect
import logging
import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

import hapo_ops
from hapo_ops.entropy.signal import EntropyStats
from hapo_ops.integrations.verl.settings import (DEFAULTS, check_hapo_params, config_value,
                                                 hapo_param)

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


def _make_estimator(variant: str):
    def estimator(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                  config: Any = None, index: Any = None, **kwargs: Any
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = token_level_rewards.sum(dim=-1)
        group_ids = group_ids_from_index(index, rewards.device)
        advantages = hapo_ops.token_level_group_advantages(
            rewards, group_ids, response_mask,
            normalize_std=bool(config_value(config, "norm_adv_by_std_in_grpo", True)),
            eps=float(config_value(config, "hapo_eps", 1e-6)),
            fallback_threshold=float(config_value(config, "hapo_fallback_threshold", 5.0)),
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
    hapo_alpha: adaptive clipping strength, ≥ 0.
    hapo_beta: advantage redistribution strength, in [0, 1] (0 off, 1 full).
    hapo_quantile: pivot quantile of the entropy statistics.
    hapo_stats_scope: "dp" pools the entropy statistics of each micro-batch over the
      data-parallel ranks (exact, collective), "local" uses this rank's micro-batch only.
    hapo_entropy_eps: floor of H before the log.
    hapo_tau: adaptive temperature strength τ of the rollout, |τ| < 1 (read by the HAPO
      agent-loop manager, :mod:`hapo_ops.integrations.verl.rollout`; unused by the loss).
    """

    hapo_variant: str = DEFAULTS["hapo_variant"]
    hapo_alpha: float = DEFAULTS["hapo_alpha"]
    hapo_beta: float = DEFAULTS["hapo_beta"]
    hapo_quantile: float = DEFAULTS["hapo_quantile"]
    hapo_stats_scope: str = DEFAULTS["hapo_stats_scope"]
    hapo_entropy_eps: float = DEFAULTS["hapo_entropy_eps"]
    hapo_tau: float = DEFAULTS["hapo_tau"]

    def __post_init__(self) -> None:
        check_hapo_params(self)
        if self.loss_mode != "vanilla":
            raise ValueError("HAPOPolicyLossConfig replaces the whole policy loss: loss_mode must "
                             f"stay 'vanilla', got {self.loss_mode!r}")
        # the actor worker builds this config right before it binds its loss function
        install_loss_dispatcher()


# --------------------------------------------------------------------------- actor loss


def hapo_loss(config: Any, model_output: dict, data: Any, dp_group: Any = None
              ) -> tuple[torch.Tensor, dict]:
    """The HAPO actor loss in the shape of verl's ``set_loss_fn`` (``ppo_loss``'s place).

    ``config``: the actor config (``ActorConfig``); ``model_output``: the engine's output for
    one micro-batch, with ``log_probs`` and ``entropy`` (set
    ``actor_rollout_ref.actor.calculate_entropy=True`` so that verl computes it);
    ``data``: the micro-batch ``TensorDict`` (``old_log_probs``, ``advantages``,
    ``response_mask``, optionally ``rollout_is_weights`` and ``ref_log_prob``, and verl's
    global ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size``); ``dp_group``: the
    data-parallel group over which ``hapo_stats_scope="dp"`` pools the entropy statistics.

    Loss = dp_size · :func:`hapo_ops.hapo_policy_loss` (ĥ from this micro-batch's entropy,
    adaptive clip bounds around ``clip_ratio_low/high``, redistribution, dual clip
    ``clip_ratio_c``, ``weights=rollout_is_weights``, aggregated with ``loss_agg_mode`` over
    verl's global counts, as verl's ``agg_loss``: DDP/FSDP average gradients over ranks)
    − ``entropy_coeff``·(aggregated entropy) + ``kl_loss_coef``·(KL loss, when
    ``use_kl_loss``), as ``ppo_loss``. All of it in float32 whatever the engine's dtype (the
    casts are differentiable). With ``hapo_alpha = hapo_beta = 0`` this is verl's vanilla
    ``ppo_loss``. Returns ``(loss, metrics)`` with verl's metric names (``actor/pg_loss``,
    ``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``,
    ``actor/entropy_loss``, ``kl_loss``) plus ``actor/hapo/*``.
    """
    check_loss_inputs(config, model_output)
    inputs = loss_inputs(model_output, data)
    metric_aggregation = set_global_batch_info(config, data)
    stats = micro_batch_stats(inputs, config.policy_loss, dp_group)
    out = hapo_ops.hapo_policy_loss(
        inputs["log_prob"], inputs["old_log_prob"], inputs["advantages"], inputs["entropy"],
        inputs["mask"], stats=stats, weights=inputs.get("weights"),
        **policy_loss_kwargs(config, inputs["mask"], data))
    pg_loss = out.loss * data["dp_size"]
    metrics = policy_loss_metrics(out, inputs, stats)
    metrics["actor/pg_loss"] = _metric(pg_loss, metric_aggregation)
    loss = pg_loss + verl_extra_terms(config, inputs, metrics, metric_aggregation)
    return loss, metrics


def check_loss_inputs(config: Any, model_output: dict) -> None:
    """Refuse what :func:`hapo_loss` cannot compute: no entropy in the engine's output, or
    verl's rollout-correction bypass mode (log-probs not recomputed by the actor)."""
    if model_output.get("entropy", None) is None:
        raise ValueError("hapo_loss needs the per-token entropy: set "
                         "actor_rollout_ref.actor.calculate_entropy=True")
    rollout_correction = config_value(getattr(config, "policy_loss", None), "rollout_correction", None)
    if rollout_correction is not None and config_value(rollout_correction, "bypass_mode", False):
        raise ValueError("hapo_loss does not implement verl's rollout-correction bypass mode "
                         "(algorithm.rollout_correction.bypass_mode=True); use the decoupled mode "
                         "(old log-probs recomputed by the actor)")


def loss_inputs(model_output: dict, data: Any) -> dict:
    """The (B, L) float32 inputs of the loss from the engine's packed outputs and the
    micro-batch: ``log_prob``, ``entropy`` (differentiable casts: gradients flow back in the
    engine's dtype), ``old_log_prob``, ``advantages``, bool ``mask`` and, when present,
    ``weights`` (``rollout_is_weights``) and ``ref_log_prob``."""
    from verl.workers.utils.padding import no_padding_2_padding

    fields = ["response_mask", "old_log_probs", "advantages"]
    fields += [name for name in ("rollout_is_weights", "ref_log_prob") if name in data]
    padded = data.select(*fields).to_padded_tensor()
    inputs = {"log_prob": no_padding_2_padding(model_output["log_probs"], data).float(),
              "entropy": no_padding_2_padding(model_output["entropy"], data).float(),
              "old_log_prob": padded["old_log_probs"].float(),
              "advantages": padded["advantages"].float(),
              "mask": padded["response_mask"].to(torch.bool)}
    if "rollout_is_weights" in padded:
        inputs["weights"] = padded["rollout_is_weights"].detach().float()
    if "ref_log_prob" in padded:
        inputs["ref_log_prob"] = padded["ref_log_prob"].float()
    return inputs


def set_global_batch_info(config: Any, data: Any) -> Any:
    """Put verl's global counts into ``config.global_batch_info`` (verl's own terms aggregate
    with them, as in ``ppo_loss``); returns the aggregation of the loss metrics (SUM over
    micro-batches when the loss is scaled by global counts, MEAN otherwise)."""
    from verl.utils.metric import AggregationType

    info = config.global_batch_info
    info["dp_size"] = data["dp_size"]
    info["batch_num_tokens"] = data["batch_num_tokens"]
    info["global_batch_size"] = data["global_batch_size"]
    info["loss_scale_factor"] = config.loss_scale_factor
    if (info["dp_size"] > 1 or info["batch_num_tokens"] is not None
            or info["global_batch_size"] is not None or config.loss_scale_factor is not None):
        return AggregationType.SUM
    return AggregationType.MEAN


def micro_batch_stats(inputs: dict, policy_loss: Any, dp_group: Any = None) -> EntropyStats:
    """The entropy statistics of the micro-batch's valid tokens (no gradient), pooled over
    ``dp_group`` when ``hapo_stats_scope`` is "dp" and torch.distributed is running."""
    group = None
    if (hapo_param(policy_loss, "hapo_stats_scope") == "dp" and dp_group is not None
            and torch.distributed.is_available() and torch.distributed.is_initialized()):
        group = dp_group
    with torch.no_grad():
        return hapo_ops.entropy_stats(
            inputs["entropy"].detach(), inputs["mask"],
            quantile=float(hapo_param(policy_loss, "hapo_quantile")),
            eps=float(hapo_param(policy_loss, "hapo_entropy_eps")), group=group)


def policy_loss_kwargs(config: Any, mask: torch.Tensor, data: Any) -> dict:
    """The keyword arguments of :func:`hapo_ops.hapo_policy_loss` from the actor config:
    variant, clip bounds (``clip_ratio_low/high``, else ``clip_ratio``), α, β, quantile,
    dual clip, entropy eps, aggregation and its denominators."""
    policy_loss = config.policy_loss
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return {"variant": hapo_param(policy_loss, "hapo_variant"),
            "eps_low": float(low), "eps_high": float(high),
            "alpha": float(hapo_param(policy_loss, "hapo_alpha")),
            "beta": float(hapo_param(policy_loss, "hapo_beta")),
            "quantile": float(hapo_param(policy_loss, "hapo_quantile")),
            "dual_clip": float(config.clip_ratio_c), "agg": config.loss_agg_mode,
            "entropy_eps": float(hapo_param(policy_loss, "hapo_entropy_eps")),
            **_aggregation_kwargs(config.loss_agg_mode, mask, data["batch_num_tokens"],
                                  data["global_batch_size"], config.loss_scale_factor)}


def policy_loss_metrics(out: Any, inputs: dict, stats: EntropyStats) -> dict:
    """verl's policy-loss metrics (``actor/pg_clipfrac``, ``actor/ppo_kl``,
    ``actor/pg_clipfrac_lower``) and ``actor/hapo/*`` (clip fractions, approx_kl, the mean
    ĥ the loss used over valid tokens, the pivot), averaged over micro-batches; one host read.
    verl's ppo_kl is the mean of −log r (log r clamped to ±20 like the loss's ratio)."""
    from verl.utils.metric import AggregationType, Metric

    mask = inputs["mask"]
    with torch.no_grad():
        n_valid = mask.sum().clamp_min(1)
        log_ratio = torch.clamp(inputs["log_prob"].detach() - inputs["old_log_prob"], -20.0, 20.0)
        values = torch.stack([
            out.clip_frac_low + out.clip_frac_high,
            (-log_ratio * mask).sum() / n_valid,
            out.dual_clip_frac, out.clip_frac_low, out.clip_frac_high, out.dual_clip_frac,
            out.approx_kl, (out.h_hat * mask).sum() / n_valid, stats.pivot.float(),
        ]).tolist()
    names = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower",
             "actor/hapo/clip_frac_low", "actor/hapo/clip_frac_high", "actor/hapo/dual_clip_frac",
             "actor/hapo/approx_kl", "actor/hapo/h_hat_mean", "actor/hapo/pivot")
    return dict(Metric.from_dict(dict(zip(names, values)), aggregation=AggregationType.MEAN))


def verl_extra_terms(config: Any, inputs: dict, metrics: dict, aggregation: Any) -> torch.Tensor:
    """verl's own terms, as ``ppo_loss`` adds them: −entropy_coeff·(aggregated entropy)
    (whenever the entropy is there) and, with ``use_kl_loss``, kl_loss_coef·(KL loss);
    their metrics (``actor/entropy_loss``, ``kl_loss``, ``kl_coef``) into ``metrics``."""
    mode, mask = config.loss_agg_mode, inputs["mask"]
    entropy_loss = core_algos.agg_loss(loss_mat=inputs["entropy"], loss_mask=mask,
                                       loss_agg_mode=mode, **config.global_batch_info)
    metrics["actor/entropy_loss"] = _metric(entropy_loss, aggregation)
    extra = -config.entropy_coeff * entropy_loss
    if config.use_kl_loss:
        kld = core_algos.kl_penalty(logprob=inputs["log_prob"], ref_logprob=inputs["ref_log_prob"],
                                    kl_penalty=config.kl_loss_type)
        kl_loss = core_algos.agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=mode,
                                      **config.global_batch_info)
        extra = extra + kl_loss * config.kl_loss_coef
        metrics["kl_loss"] = _metric(kl_loss, aggregation)
        metrics["kl_coef"] = config.kl_loss_coef
    return extra


def _metric(value: torch.Tensor, aggregation: Any) -> Any:
    from verl.utils.metric import Metric

    return Metric(value=value.detach().item(), aggregation=aggregation)


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
        if namespace is None or name.startswith("hapo_ops.integrations.verl"):
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


__all__ = [
    "ESTIMATORS",
    "check_loss_inputs",
    "loss_inputs",
    "micro_batch_stats",
    "policy_loss_kwargs",
    "policy_loss_metrics",
    "set_global_batch_info",
    "verl_extra_terms",
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
