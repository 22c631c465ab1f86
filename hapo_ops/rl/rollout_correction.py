"""Training–inference mismatch correction between the rollout engine and the trainer.

The rollout engine (vLLM, SGLang) samples with its own kernels; the trainer recomputes the
behaviour log-probs ``old_logprobs`` with its own, and the two differ (precision, fused
kernels, MoE routing). The importance ratio ρ = π_trainer / π_rollout = exp(old − rollout)
corrects the policy gradient for that mismatch:

- truncated importance sampling (TIS; Yao et al., *Your Efficient RL Framework Secretly
  Brings You Off-Policy RL Training*, 2025): weight min(ρ, C);
- masked importance sampling (MIS; IcePop in Ling Team, *Every Step Evolves: Scaling
  Reinforcement Learning for Trillion-Scale Thinking Model*, arXiv 2510.18855): drop the
  tokens (or whole responses) whose ρ leaves [low, high], keep ρ elsewhere.
"""

from __future__ import annotations

import torch

from hapo_ops._utils.validation import (check_choice, check_float, check_mask, check_same_device,
                                  check_same_shape, check_tensor)

LEVELS = ("token", "sequence", "geometric")
MODES = ("truncate", "mask")
# Bound on |log ρ| before exp, as verl's rollout correction (``SAFETY_BOUND``): e^20 ≈ 4.9e8,
# e^-20 ≈ 2.1e-9; the weight stays finite and positive whatever the mismatch.
LOG_RATIO_BOUND = 20.0


def rollout_correction(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                       mask: torch.Tensor, *, level: str = "token", mode: str = "truncate",
                       low: float | None = None, high: float | None = 2.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights for the rollout/trainer mismatch, and the mask to train on.

    log ρ_t = old_logprobs − rollout_logprobs on the valid tokens, aggregated per ``level``
    (the names and formulas of verl's rollout correction), clamped to [−20, 20]
    (``LOG_RATIO_BOUND``) and only then exponentiated:

    - ``level="token"``: ρ_t = exp(clamp(log ρ_t));
    - ``level="sequence"``: the product of the token ratios of response i,
      ρ_i = exp(clamp(Σ_t log ρ_t)) (sum over its valid tokens), broadcast to its tokens;
    - ``level="geometric"``: their geometric mean, ρ_i = exp(clamp(Σ_t log ρ_t / L_i)),
      L_i the number of valid tokens of response i.

    - ``mode="truncate"`` (TIS): w = min(ρ, high), and max(·, low) when ``low`` is given;
      the returned mask is ``mask``.
    - ``mode="mask"`` (MIS / IcePop): tokens (``level="sequence"`` / ``"geometric"``: whole
      responses) whose ρ lies outside [low, high] (bounds inclusive, ``low=None``: no lower
      bound) leave the mask; w = ρ on the kept tokens.

    Weights are 0 outside the returned mask and carry no gradient. A NaN ratio stays NaN
    under ``truncate`` and is masked out under ``mask`` (at the sequence levels, a NaN on
    one valid token makes the whole response's ratio NaN). An empty batch or a response
    with no valid token gives weight 0 and an all-False mask there.

    Composition with the losses (w ≥ 0): pass ``weights=w`` and the returned mask to any
    policy loss (``clipped_policy_loss``, ``hapo_policy_loss`` and the companion losses);
    w may be per token (..., L) or per response (...,). It multiplies the per-token loss
    after everything that reads the advantages (the clips, HAPO's redistribution, Clip-Cov's
    and KL-Cov's covariance selection), so pass the advantages unscaled. Dropped tokens
    leave the token-mean denominator too; to keep it over every generated token pass
    ``num_tokens=mask.sum()`` of the original mask (or ``global_token_count``).

    Args:
      old_logprobs: (..., L) float trainer log-probs of the sampled tokens (the behaviour
        policy recomputed by the trainer).
      rollout_logprobs: (..., L) float, the rollout engine's log-probs of the same tokens.
      mask: (..., L) bool or numeric, 1 = valid token.
      level: "token", "sequence" (product of the token ratios) or "geometric" (their
        geometric mean).
      mode: "truncate" (TIS) or "mask" (MIS / IcePop).
      low: optional lower bound (≥ 0) on ρ.
      high: upper bound on ρ (> 0), or None for none; ``low <= high``.

    Returns:
      (weights, mask): (..., L) float weights in the promoted dtype of the log-probs (at
      least float32), and the (..., L) bool mask to use in the loss.

    Examples:
      >>> import torch
      >>> from hapo_ops import clipped_policy_loss
      >>> old = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
      >>> rollout = torch.tensor([[-1.0, -3.0, -0.5], [-0.1, -2.0, 0.0]])
      >>> mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
      >>> w, m = rollout_correction(old, rollout, mask)          # TIS, cap 2
      >>> w
      tensor([[1.0000, 2.0000, 1.0000],
              [1.0000, 0.3679, 0.0000]])
      >>> w, m = rollout_correction(old, rollout, mask, mode="mask", low=0.5, high=2.0)
      >>> m                                                      # IcePop-style
      tensor([[ True, False,  True],
              [ True, False, False]])
      >>> w, m = rollout_correction(old, rollout, mask, level="sequence", high=None)
      >>> w                                                      # e^1, e^-1 per response
      tensor([[2.7183, 2.7183, 2.7183],
              [0.3679, 0.3679, 0.0000]])
      >>> logp = old.clone().requires_grad_(True)
      >>> adv = torch.tensor([1.0, -1.0])
      >>> out = clipped_policy_loss(logp, old, adv[:, None] * w, m)

    References:
      Yao et al., 2025, *Your Efficient RL Framework Secretly Brings You Off-Policy RL
      Training* (TIS); Ling Team, 2025, arXiv 2510.18855 (IcePop); Liu, Li et al., 2025,
      *When Speed Kills Stability: Demystifying RL Collapse from the Training-Inference
      Mismatch* (token, sequence and geometric levels, as in verl).
    """
    old_logprobs = check_tensor("old_logprobs", old_logprobs, floating=True, allow_empty=True)
    rollout_logprobs = check_tensor("rollout_logprobs", rollout_logprobs, floating=True,
                                    allow_empty=True)
    check_same_shape("rollout_logprobs", rollout_logprobs, "old_logprobs", old_logprobs)
    check_same_device("rollout_logprobs", rollout_logprobs, "old_logprobs", old_logprobs)
    valid = check_mask("mask", mask, old_logprobs.shape, allow_empty=True)
    check_same_device("mask", valid, "old_logprobs", old_logprobs)
    level = check_choice("level", level, LEVELS)
    mode = check_choice("mode", mode, MODES)
    if low is not None:
        low = check_float("low", low, min_value=0.0)
    if high is not None:
        high = check_float("high", high, min_value=0.0, min_inclusive=False)
    if low is not None and high is not None and low > high:
        raise ValueError(f"low must be <= high ({high}), got {low}")
    if level != "token" and old_logprobs.dim() == 0:
        raise ValueError(f"old_logprobs must have shape (..., L) with level={level!r}, got a "
                         "0-d tensor")

    dtype = torch.promote_types(torch.promote_types(old_logprobs.dtype, rollout_logprobs.dtype),
                                torch.float32)
    with torch.no_grad():
        zero = torch.zeros((), dtype=dtype, device=old_logprobs.device)
        log_ratio = torch.where(valid, old_logprobs.detach().to(dtype)
                                - rollout_logprobs.detach().to(dtype), zero)
        if level != "token":
            log_ratio = log_ratio.sum(-1, keepdim=True)
            if level == "geometric":
                log_ratio = log_ratio / valid.sum(-1, keepdim=True).clamp_min(1).to(dtype)
            log_ratio = log_ratio.expand(valid.shape)
        ratio = log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp()
        if mode == "truncate":
            weights = ratio
            if high is not None:
                weights = weights.clamp_max(high)
            if low is not None:
                weights = weights.clamp_min(low)
            keep = valid
        else:
            inside = ~torch.isnan(ratio)
            if low is not None:
                inside = inside & (ratio >= low)
            if high is not None:
                inside = inside & (ratio <= high)
            keep = valid & inside
            weights = ratio
        weights = torch.where(keep, weights, zero)
    return weights, keep


__all__ = ["LEVELS", "LOG_RATIO_BOUND", "MODES", "rollout_correction"]
