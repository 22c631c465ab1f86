"""The entropy signal and the adaptive-temperature rule (HAPO, arXiv 2509.16591, §3.1).

``signal``: batch statistics of ln H over valid tokens and the normalised entropy
ĥ = tanh((ln H − μ)/σ). ``temperature``: T = T_base·(1 + τ·ĥ). They sit below the
vocabulary ops because the sampler applies the rule per token, and below the trainer ops,
which use ĥ for redistribution and clipping.
"""

from hapo_ops.entropy.signal import EntropyStats, entropy_stats, normalized_entropy
from hapo_ops.entropy.temperature import adaptive_temperature

__all__ = ["EntropyStats", "adaptive_temperature", "entropy_stats", "normalized_entropy"]
