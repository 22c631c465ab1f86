"""Adaptive sampling temperature (HAPO, arXiv 2509.16591, §3.1)."""

from __future__ import annotations

import torch

from hapo_ops._utils.validation import check_float, check_tau, check_tensor, check_variant
from hapo_ops.entropy.signal import EntropyStats, normalized_entropy


def adaptive_temperature(entropy: torch.Tensor, stats: EntropyStats | None, *,
                         base_temperature: float = 1.0, tau: float = 0.05,
                         variant: str = "paper", eps: float = 1e-8) -> torch.Tensor:
    """T = T_base · (1 + τ·ĥ), ĥ = ``normalized_entropy(entropy, stats, variant=variant)``.

    ``entropy`` is the entropy of the raw (T = 1) next-token distribution. With τ > 0
    (HAPO's rule) high-entropy tokens (ĥ > 0) sample hotter and low-entropy ones (ĥ < 0)
    cooler. τ < 0 inverts the adaptation: T is lowered where ĥ > 0 and raised where ĥ < 0
    (with ``variant="released"``, whose ĥ is never negative, T ≤ T_base everywhere).
    ``stats=None`` (no training batch yet) gives T_base everywhere. ``eps`` is
    ``normalized_entropy``'s. The result has the floating dtype of ``entropy`` promoted to
    at least float32, with or without ``stats``.

    Since ĥ ∈ [-1, 1], T lies in [T_base·(1 - |τ|), T_base·(1 + |τ|)]: |τ| < 1 keeps T > 0,
    and |τ| ≥ 1 (also a τ that rounds to ±1 in float32, where T is computed) raises
    ``ValueError`` naming ``tau``.

    Examples:
      >>> stats = entropy_stats(entropy, mask)          # the last training batch
      >>> adaptive_temperature(entropy, stats, tau=0.05)   # in [0.95, 1.05]
      >>> adaptive_temperature(entropy, stats, tau=-0.05)  # the same, mirrored around 1

    References:
      HAPO, arXiv 2509.16591, §3.1 (adaptive temperature sampling).
    """
    entropy = check_tensor("entropy", entropy, floating=True, allow_empty=True)
    base_temperature = check_float("base_temperature", base_temperature, min_value=0.0,
                                   min_inclusive=False)
    tau = check_tau("tau", tau)
    variant = check_variant(variant)
    dtype = torch.promote_types(entropy.dtype, torch.float32)
    if stats is None:
        return torch.full(entropy.shape, base_temperature, dtype=dtype, device=entropy.device)
    h_hat = normalized_entropy(entropy, stats, variant=variant, eps=eps)
    return (base_temperature * (1.0 + tau * h_hat)).to(dtype)
