"""Trainer ops: advantages, policy losses and their aggregation, companion losses, token
selection and rollout correction (HAPO, arXiv 2509.16591, §3.2–3.4, and the peers it is
compared with). They take per-token tensors that any trainer already has.
"""

from hapo_ops.rl.advantages import (grpo_advantages, redistribute_advantages,
                                    token_level_group_advantages)
from hapo_ops.rl.companion_losses import (cispo_policy_loss, clip_cov_policy_loss,
                                          gspo_policy_loss, kl_cov_policy_loss)
from hapo_ops.rl.losses import (AGGREGATION_MODES, PolicyLossOutput, adaptive_clip_bounds,
                                aggregate_loss, clipped_policy_loss, global_sequence_count,
                                global_token_count, hapo_policy_loss)
from hapo_ops.rl.rollout_correction import rollout_correction
from hapo_ops.rl.token_selection import entropy_quantile_mask, sequence_entropy_advantages

__all__ = ["AGGREGATION_MODES", "PolicyLossOutput", "adaptive_clip_bounds", "aggregate_loss",
           "cispo_policy_loss", "clip_cov_policy_loss", "clipped_policy_loss",
           "entropy_quantile_mask", "global_sequence_count", "global_token_count",
           "grpo_advantages", "gspo_policy_loss", "hapo_policy_loss", "kl_cov_policy_loss",
           "redistribute_advantages", "rollout_correction", "sequence_entropy_advantages",
           "token_level_group_advantages"]
