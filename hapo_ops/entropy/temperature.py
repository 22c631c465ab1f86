"""Adaptive sampling temperature (HAPO, arXiv 2509.16591, §3.1)."""

from __future__ import annotations

import torch

from hapo_ops._utils.validation import check_float_or_tensor, check_tensor, check_variant
from hapo_ops.entropy.signal import EntropyStats, normalized_entropy


def adaptive_temperature(entropy: torch.Tensor, stats: EntropyStats | None, *,
                         base_temperature: float | torch.Tensor = 1.0,
                         tau: float | torch.Tensor = 0.05, variant: str = "paper",
                         eps: float | torch.Tensor = 1e-8) -> torch.Tensor:
    """T = T_base · (1 + τ·ĥ), ĥ = ``normalized_entropy(entropy, stats, variant=variant)``.

    ``entropy`` is the entropy of the raw (T = 1) next-token distribution. High-entropy
    tokens sample hotter, low-entropy ones cooler. ``stats=None`` (no training batch yet)
    gives T_base everywhere; otherwise ``stats`` is an ``EntropyStats`` or a plain tuple
    (pivot, log_max, log_min), a dict being refused (``check_entropy_stats``, the rule of
    the vLLM helpers too). |τ| < 1 keeps T > 0. ``eps`` is ``normalized_entropy``'s.
    ``base_temperature``, ``tau`` and ``eps`` are floats or tensors broadcastable to
    ``entropy`` (one per token: the vLLM processor's one per request), their values
    checked on the CPU. The result has the floating dtype of ``entropy`` promoted to at
    least float32, with or without ``stats``.
    """
    entropy = check_tensor("entropy", entropy, floating=True, allow_empty=True)
    base_temperature = check_float_or_tensor("base_temperature", base_temperature, entropy,
                                             min_inclusive=False)
    tau = check_float_or_tensor("tau", tau, entropy, min_value=-1.0, min_inclusive=False,
                                max_value=1.0, max_inclusive=False)
    variant = check_variant(variant)
    dtype = torch.promote_types(entropy.dtype, torch.float32)
    if stats is None:
        return torch.ones(entropy.shape, dtype=dtype, device=entropy.device) * base_temperature
    h_hat = normalized_entropy(entropy, stats, variant=variant, eps=eps)
    return (base_temperature * (1.0 + tau * h_hat)).to(dtype)
