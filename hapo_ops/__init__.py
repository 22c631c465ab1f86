"""hapo-ops: token-aware policy-optimization ops (HAPO, arXiv 2509.16591) for RL of LLMs.

Small pure functions; each docstring gives its formula and source. See README.md.

Layers, each importing only the ones above it: ``collectives`` (reductions over a process
group) → ``row_statistics`` (the per-row algebra of log-prob and entropy) → ``truncation``
(top-k/top-p thresholds and kept sets) → the ops over a vocabulary (``logprob_entropy``,
``linear_logprob_entropy``, ``sampling``; Triton kernels of the same names in
``hapo_ops.kernels``) and the trainer ops (``entropy_signal``, ``temperature``,
``advantages``, ``losses``, ``token_selection``, ``companion_losses``,
``rollout_correction``) → ``integrations`` (optional framework glue, never imported by the
core).
"""

from hapo_ops.advantages import (grpo_advantages, redistribute_advantages,
                                 token_level_group_advantages)
from hapo_ops.companion_losses import (cispo_policy_loss, clip_cov_policy_loss,
                                       gspo_policy_loss, kl_cov_policy_loss)
from hapo_ops.entropy_signal import EntropyStats, entropy_stats, normalized_entropy
from hapo_ops.linear_logprob_entropy import linear_logprobs_and_entropy
from hapo_ops.logprob_entropy import (logprobs_and_entropy, token_entropy, token_logprobs,
                                      vocab_parallel_logprobs_and_entropy)
from hapo_ops.losses import (AGGREGATION_MODES, PolicyLossOutput, adaptive_clip_bounds,
                             aggregate_loss, clipped_policy_loss, global_sequence_count,
                             global_token_count, hapo_policy_loss)
from hapo_ops.rollout_correction import rollout_correction
from hapo_ops.sampling import SampleOutput, adaptive_temperature_sample
from hapo_ops.temperature import adaptive_temperature
from hapo_ops.token_selection import entropy_quantile_mask, sequence_entropy_advantages

__version__ = "0.1.0"

__all__ = [
    "AGGREGATION_MODES",
    "EntropyStats",
    "PolicyLossOutput",
    "SampleOutput",
    "adaptive_clip_bounds",
    "adaptive_temperature",
    "adaptive_temperature_sample",
    "aggregate_loss",
    "cispo_policy_loss",
    "clip_cov_policy_loss",
    "clipped_policy_loss",
    "entropy_quantile_mask",
    "entropy_stats",
    "global_sequence_count",
    "global_token_count",
    "grpo_advantages",
    "gspo_policy_loss",
    "hapo_policy_loss",
    "kl_cov_policy_loss",
    "linear_logprobs_and_entropy",
    "logprobs_and_entropy",
    "normalized_entropy",
    "redistribute_advantages",
    "rollout_correction",
    "sequence_entropy_advantages",
    "token_entropy",
    "token_level_group_advantages",
    "token_logprobs",
    "vocab_parallel_logprobs_and_entropy",
]
