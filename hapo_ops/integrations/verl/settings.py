"""HAPO's verl settings: the hyperparameters' defaults and checks, read from verl's config.

The bottom of :mod:`hapo_ops.integrations.verl` (imports nothing of it). HAPO's
hyperparameters have one home in a verl configuration, ``actor_rollout_ref.actor.policy_loss``
(:class:`~hapo_ops.integrations.verl.HAPOPolicyLossConfig`); the rollout's base temperature
is verl's ``actor_rollout_ref.rollout.temperature``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from hapo_ops._utils.validation import VARIANTS, check_choice, check_float

#: Vendor key of HAPO's engine in verl's ``EngineRegistry`` (``VERL_ENGINE_VENDOR=hapo``).
ENGINE_VENDOR = "hapo"

#: Defaults of the ``hapo_*`` fields of ``actor.policy_loss``.
DEFAULTS = {
    "hapo_variant": "paper",
    "hapo_alpha": 1.0,
    "hapo_beta": 1.0,
    "hapo_quantile": 0.8,
    "hapo_stats_scope": "dp",
    "hapo_entropy_eps": 1e-8,
    "hapo_tau": 0.05,
}


def config_value(config: Any, key: str, default: Any) -> Any:
    """``config[key]`` of a mapping, DictConfig or dataclass; ``default`` where it is absent
    or None."""
    if config is None:
        return default
    getter = getattr(config, "get", None)
    value = getter(key, default) if getter is not None else getattr(config, key, default)
    return default if value is None else value


def hapo_param(policy_loss: Any, name: str) -> Any:
    """A ``hapo_*`` field of ``actor.policy_loss`` (a HAPOPolicyLossConfig or any mapping);
    its default (:data:`DEFAULTS`) where absent."""
    return config_value(policy_loss, name, DEFAULTS[name])


def check_hapo_params(params: Any) -> None:
    """Raise ``ValueError`` naming the ``hapo_*`` field that is out of range: variant in
    ("paper", "released"), α ≥ 0 finite, β ∈ [0, 1] (the redistribution weight of paper
    eq. 6: β = 0 off, 1 full), quantile ∈ [0, 1], scope "dp" or "local", entropy eps > 0,
    |τ| < 1 (T_t = T_base·(1 + τ·ĥ) stays positive)."""
    check_choice("hapo_variant", hapo_param(params, "hapo_variant"), VARIANTS)
    check_float("hapo_alpha", hapo_param(params, "hapo_alpha"), min_value=0.0)
    check_float("hapo_beta", hapo_param(params, "hapo_beta"), min_value=0.0, max_value=1.0)
    check_float("hapo_quantile", hapo_param(params, "hapo_quantile"), min_value=0.0, max_value=1.0)
    check_choice("hapo_stats_scope", hapo_param(params, "hapo_stats_scope"), ("dp", "local"))
    check_float("hapo_entropy_eps", hapo_param(params, "hapo_entropy_eps"), min_value=0.0,
                min_inclusive=False)
    check_float("hapo_tau", hapo_param(params, "hapo_tau"), min_value=-1.0, min_inclusive=False,
                max_value=1.0, max_inclusive=False)


class RolloutSettings(NamedTuple):
    """What the rollout and the engine need besides the statistics: τ, T_base, the variant,
    eps (the floor of H in ĥ and of the next statistics) and the pivot quantile."""

    tau: float
    base_temperature: float
    variant: str
    eps: float
    quantile: float


def rollout_settings(config: Any) -> RolloutSettings:
    """:class:`RolloutSettings` of a whole verl config: ``hapo_tau``, ``hapo_variant``,
    ``hapo_entropy_eps``, ``hapo_quantile`` from ``actor_rollout_ref.actor.policy_loss``
    (checked, defaults where absent) and T_base = ``actor_rollout_ref.rollout.temperature``."""
    policy_loss = config_value(config.actor_rollout_ref.actor, "policy_loss", {})
    check_hapo_params(policy_loss)
    return RolloutSettings(
        tau=float(hapo_param(policy_loss, "hapo_tau")),
        base_temperature=float(config.actor_rollout_ref.rollout.temperature),
        variant=str(hapo_param(policy_loss, "hapo_variant")),
        eps=float(hapo_param(policy_loss, "hapo_entropy_eps")),
        quantile=float(hapo_param(policy_loss, "hapo_quantile")))


__all__ = ["DEFAULTS", "ENGINE_VENDOR", "RolloutSettings", "check_hapo_params", "config_value",
           "hapo_param", "rollout_settings"]
