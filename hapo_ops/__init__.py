"""hapo-ops: token-aware policy-optimization ops (HAPO, arXiv 2509.16591) for RL of LLMs.

Quick start::

    import hapo_ops
    logp, H = hapo_ops.logprobs_and_entropy(logits, labels)             # (B, L) each
    adv = hapo_ops.token_level_group_advantages(rewards, group_ids, mask)
    out = hapo_ops.hapo_policy_loss(logp, old_logp, adv, H, mask)
    out.loss.backward()
    stats = hapo_ops.entropy_stats(H.detach(), mask)   # for the next rollout's temperature

Every public op is a pure function exported here; each docstring gives its formula and
source. The subpackages show the layers, each importing only the ones before it:
``hapo_ops.entropy`` (the entropy signal ĥ and the temperature rule) → ``hapo_ops.vocab``
(log-prob, entropy and sampling over a vocabulary; Triton kernels in ``hapo_ops.kernels``)
→ ``hapo_ops.rl`` (advantages, losses, token selection, rollout correction) →
``hapo_ops.integrations`` (optional framework glue, never imported by the core). Shared
private utilities live in ``hapo_ops._utils``. See README.md.
"""

from hapo_ops.entropy import EntropyStats, adaptive_temperature, entropy_stats, normalized_entropy
from hapo_ops.rl import (AGGREGATION_MODES, PolicyLossOutput, adaptive_clip_bounds, aggregate_loss,
                         cispo_policy_loss, clip_cov_policy_loss, clipped_policy_loss,
                         entropy_quantile_mask, global_sequence_count, global_token_count,
                         grpo_advantages, gspo_policy_loss, hapo_policy_loss, kl_cov_policy_loss,
                         redistribute_advantages, rollout_correction, sequence_entropy_advantages,
                         token_level_group_advantages)
from hapo_ops.vocab import (SampleOutput, adaptive_temperature_sample, linear_logprobs_and_entropy,
                            logprobs_and_entropy, token_entropy, token_logprobs,
                            vocab_parallel_logprobs_and_entropy)

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
