"""The compared methods: GRPO, DAPO, HAPO (paper and released variants) and HAPO ablations.

Every method runs the same loop (same rollouts budget, PPO epochs, optimizer); only the
choices below differ. ``loss="hapo"`` is ``hapo_ops.hapo_policy_loss`` (adaptive clip
bounds, advantage redistribution, dual clip 10); ``loss="clipped"`` is
``hapo_ops.clipped_policy_loss`` with fixed bounds.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Method:
    """One policy-optimization recipe."""

    name: str
    description: str
    loss: str = "hapo"                 # "hapo" | "clipped"
    advantages: str = "token"          # "token" (token-level group average) | "grpo"
    adaptive_temperature: bool = True  # False: every token sampled at the base temperature
    variant: str = "paper"             # "paper" | "released" (sampler, advantages and loss)
    agg: str = "token-mean"
    eps_low: float = 0.2
    eps_high: float = 0.2
    alpha: float = 1.0                 # adaptive clipping strength (0 = fixed bounds)
    beta: float = 1.0                  # advantage redistribution strength (0 = off)
    dual_clip: float | None = 10.0


METHODS: tuple[Method, ...] = (
    Method("grpo", "GRPO: group-normalized advantages, clip 0.2/0.2, sequence-mean of "
           "token-means, base temperature", loss="clipped", advantages="grpo",
           adaptive_temperature=False, agg="seq-mean-token-mean", dual_clip=None),
    Method("dapo", "DAPO: group-normalized advantages, clip-higher 0.2/0.28, token-mean, "
           "base temperature (no dynamic sampling or overlong shaping)", loss="clipped",
           advantages="grpo", adaptive_temperature=False, eps_high=0.28, dual_clip=None),
    Method("hapo", "HAPO, paper variant: adaptive temperature, token-level advantages, "
           "redistribution, adaptive clipping"),
    Method("hapo-released", "HAPO, released-code variant (sign of the entropy signal "
           "below the pivot, padding in the fallback test)", variant="released"),
    Method("hapo-no-temp", "HAPO without adaptive temperature", adaptive_temperature=False),
    Method("hapo-no-token-adv", "HAPO with GRPO advantages instead of token-level ones",
           advantages="grpo"),
    Method("hapo-no-redist", "HAPO without advantage redistribution (beta = 0)", beta=0.0),
    Method("hapo-no-adaptive-clip", "HAPO without adaptive clipping (alpha = 0)", alpha=0.0),
)


def method_by_name(name: str) -> Method:
    """The method called ``name`` (ValueError listing the known names otherwise)."""
    for method in METHODS:
        if method.name == name:
            return method
    raise ValueError(f"unknown method {name!r}; expected one of "
                     f"{', '.join(m.name for m in METHODS)}")
