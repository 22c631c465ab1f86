"""Adaptive sampling temperature (HAPO, arXiv 2509.16591, §3.1)."""

from __future__ import annotations

import torch

from hapo_ops._utils.validation import check_float_or_tensor, check_tau, check_tensor, check_variant
from hapo_ops.entropy.signal import EntropyStats, normalized_entropy


def adaptive_temperature(entropy: torch.Tensor, stats: EntropyStats | None, *,
                         base_temperature: float | torch.Tensor = 1.0,
                         tau: float | torch.Tensor = 0.05, variant: str = "paper",
                         eps: float | torch.Tensor = 1e-8) -> torch.Tensor:
    """T = T_base · (1 + τ·ĥ), ĥ = ``normalized_entropy(entropy, stats, variant=variant)``.

    ``entropy`` is the entropy of the raw (T = 1) next-token distribution. With τ > 0
    (HAPO's rule) high-entropy tokens (ĥ > 0) sample hotter and low-entropy ones (ĥ < 0)
    cooler. τ < 0 inverts the adaptation: T is lowered where ĥ > 0 and raised where ĥ < 0
    (with ``variant="released"``, whose ĥ is never negative, T ≤ T_base everywhere).
    ``stats=None`` (no training batch yet) gives T_base everywhere; otherwise ``stats`` is an
    ``EntropyStats`` or a plain tuple (pivot, log_max, log_min), a dict being refused
    (``check_entropy_stats``, the rule of the vLLM helpers too). ``eps`` is
    ``normalized_entropy``'s. ``base_temperature``, ``tau`` and ``eps`` are floats or
    tensors broadcastable to ``entropy`` (one per token: the vLLM processor's one per
    request), their values checked on the CPU. The result has the floating dtype of
    ``entropy`` promoted to at least float32, with or without ``stats``.

    Since ĥ ∈ [-1, 1], T lies in [T_base·(1 - |τ|), T_base·(1 + |τ|)]: |τ| < 1 keeps T > 0,
    and |τ| ≥ 1 (also a float τ that rounds to ±1 in float32, where T is computed) raises
    ``ValueError`` naming ``tau``.

    Examples:
      >>> stats = entropy_stats(entropy, mask)          # the last training batch
      >>> adaptive_temperature(entropy, stats, tau=0.05)   # in [0.95, 1.05]
      >>> adaptive_temperature(entropy, stats, tau=-0.05)  # the same, mirrored around 1

    References:
      HAPO, arXiv 2509.16591, §3.1 (adaptive temperature sampling).
    """
    entropy = check_tensor("entropy", entropy, floating=True, allow_empty=True)
    base_temperature = check_float_or_tensor("base_temperature", base_temperature, entropy,
                                             min_inclusive=False)
    if isinstance(tau, torch.Tensor):
        tau = check_float_or_tensor("tau", tau, entropy, min_value=-1.0, min_inclusive=False,
                                    max_value=1.0, max_inclusive=False)
    else:
        tau = check_tau("tau", tau)
    variant = check_variant(variant)
    dtype = torch.promote_types(entropy.dtype, torch.float32)
    if stats is None:
        return torch.ones(entropy.shape, dtype=dtype, device=entropy.device) * base_temperature
    h_hat = normalized_entropy(entropy, stats, variant=variant, eps=eps)
    return (base_temperature * (1.0 + tau * h_hat)).to(dtype)
