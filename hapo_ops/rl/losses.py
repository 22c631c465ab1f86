"""Asymmetric adaptive clipping, the clipped policy-gradient loss, loss aggregation and the
composed HAPO loss (HAPO, arXiv 2509.16591, §3.4; PPO, arXiv 1707.06347; dual clip,
arXiv 1912.09729).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from hapo_ops._utils.validation import (ScalarOrTensor, check_choice, check_float,
                                  check_float_or_tensor, check_mask, check_same_device,
                                  check_same_shape, check_tensor, check_variant)
from hapo_ops.rl.advantages import redistribute_advantages
from hapo_ops._utils.collectives import ProcessGroup, all_reduce_sum
from hapo_ops.entropy.signal import EntropyStats, entropy_stats, normalized_entropy

AGGREGATION_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                     "seq-mean-token-sum-norm")


class PolicyLossOutput(NamedTuple):
    """Result of a clipped policy loss; every field is a tensor (no host sync).

    loss: the aggregated scalar. per_token: ℓ per token, zero outside the mask.
    clip_frac_low / clip_frac_high: fraction of valid tokens whose loss is held constant by
    the lower clip (A < 0, r < 1-ε_low) or the upper clip (A > 0, r > 1+ε_high).
    dual_clip_frac: fraction of valid tokens capped by the dual clip (A < 0, -A·c < ℓ);
    0 for losses without a dual clip.
    approx_kl: mean over valid tokens of (r - 1) - log r, the k3 estimator of
    KL(π_old ‖ π), always ≥ 0.
    selected_frac: fraction of valid tokens chosen by a token-selection rule: those cut by
    Clip-Cov or penalised by KL-Cov; 0 for the other losses.
    """

    loss: torch.Tensor
    per_token: torch.Tensor
    clip_frac_low: torch.Tensor
    clip_frac_high: torch.Tensor
    approx_kl: torch.Tensor
    dual_clip_frac: torch.Tensor
    selected_frac: torch.Tensor


def check_clip_eps(name: str, value: object, ref: torch.Tensor, *, lower: bool,
                   allow_one: bool = False) -> ScalarOrTensor:
    """A ratio-clip ε: a float or a tensor broadcastable to ``ref``, ε ≥ 0; for the lower
    side (``lower=True``) also ε < 1, so that the lower ratio bound 1 - ε is positive
    (ε = 1, a bound of 0, i.e. no lower clip, only with ``allow_one``). Tensor values are
    checked on the CPU only (no host sync on accelerators, none under ``torch.compile``)."""
    value = check_float_or_tensor(name, value, ref)
    if not lower:
        return value
    limit = "<= 1" if allow_one else "< 1"
    if isinstance(value, torch.Tensor):
        if (value.device.type == "cpu" and value.numel() and not torch.compiler.is_compiling()
                and bool((value > 1.0).any() if allow_one else (value >= 1.0).any())):
            raise ValueError(f"{name} must be {limit} everywhere (1 - {name} is the lower ratio "
                             f"bound), got a maximum of {float(value.max())}")
    elif value > 1.0 or (value == 1.0 and not allow_one):
        raise ValueError(f"{name} must be {limit} (1 - {name} is the lower ratio bound), "
                         f"got {value}")
    return value


def adaptive_clip_bounds(h_hat: torch.Tensor, *, eps_low: ScalarOrTensor = 0.2,
                         eps_high: ScalarOrTensor = 0.2, alpha: float = 1.0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric adaptive clip bounds per token (HAPO §3.4).

    ε_low' = ε_low·(1 - α·ĥ) where ĥ ≤ 0, else ε_low;
    ε_high' = ε_high·(1 + α·ĥ) where ĥ > 0, else ε_high.
    Low-entropy tokens may fall further, high-entropy tokens rise further; with ĥ ∈ [-1, 1]
    and α ≥ 0 the bounds only widen. Requires 0 ≤ ε_low < 1, ε_high ≥ 0 and α ≥ 0 (a
    ValueError otherwise); the widened ε_low' may reach 1 or more, which only removes the
    lower clip of those tokens (r > 0 ≥ 1 - ε_low').
    """
    h_hat = check_tensor("h_hat", h_hat, floating=True)
    eps_low = check_clip_eps("eps_low", eps_low, h_hat, lower=True)
    eps_high = check_clip_eps("eps_high", eps_high, h_hat, lower=False)
    alpha = check_float("alpha", alpha, min_value=0.0)
    ones = torch.ones_like(h_hat)
    low = eps_low * torch.where(h_hat <= 0, 1.0 - alpha * h_hat, ones)
    high = eps_high * torch.where(h_hat > 0, 1.0 + alpha * h_hat, ones)
    return low, high


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", *,
                   num_tokens: float | torch.Tensor | None = None,
                   num_sequences: float | torch.Tensor | None = None,
                   normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a (B, L) per-token loss to a scalar.

    token-mean:              Σ m·ℓ / N_tok           (N_tok = ``num_tokens`` or Σ m)
    token-sum:               Σ m·ℓ
    seq-mean-token-sum:      Σ_i Σ_t m·ℓ / N_seq     (N_seq = ``num_sequences`` or the number
                                                      of rows with a valid token)
    seq-mean-token-mean:     Σ_i (Σ_t m·ℓ / L_i) / N_seq   (rows with L_i = 0 add 0)
    seq-mean-token-sum-norm: Σ m·ℓ / ``normalizer``  (default L, the padded length; Dr. GRPO)

    Pass the global ``num_tokens`` / ``num_sequences`` (over every micro-batch and rank of
    the optimizer step, e.g. from ``global_token_count``) and sum the per-micro-batch results:
    the total is then exactly the full-batch value, however the batch was split.

    A given denominator (number or one-element tensor) must be > 0 and is used as given
    (see ``given_denominator``: values are checked on the CPU; on an accelerator a 0 gives
    inf or NaN). A default denominator counted from an empty mask counts as 1, so an
    all-masked batch gives 0, not NaN.
    """
    per_token = check_tensor("per_token", per_token, floating=True)
    valid = check_mask("mask", mask, per_token.shape)
    check_same_device("mask", valid, "per_token", per_token)
    mode = check_choice("mode", mode, AGGREGATION_MODES)
    # every given denominator is checked, whether or not this mode uses it
    given = {name: given_denominator(name, value, per_token) for name, value in
             (("num_tokens", num_tokens), ("num_sequences", num_sequences),
              ("normalizer", normalizer)) if value is not None}
    masked = torch.where(valid, per_token, torch.zeros((), dtype=per_token.dtype,
                                                       device=per_token.device))
    if mode == "token-sum":
        return masked.sum()
    if mode == "token-mean":
        denominator = given.get("num_tokens")
        if denominator is None:
            denominator = _default_denominator(valid.sum(), per_token)
        return masked.sum() / denominator
    if mode == "seq-mean-token-sum-norm":
        denominator = given.get("normalizer")
        if denominator is None:
            denominator = _default_denominator(per_token.shape[-1], per_token)
        return masked.sum() / denominator
    if per_token.dim() != 2:
        raise ValueError(f"per_token must have shape (B, L) for mode {mode!r}, "
                         f"got {tuple(per_token.shape)}")
    row_sums = masked.sum(-1)
    lengths = valid.sum(-1)
    if mode == "seq-mean-token-mean":
        row_sums = row_sums / lengths.clamp_min(1).to(row_sums.dtype)
    denominator = given.get("num_sequences")
    if denominator is None:
        denominator = _default_denominator((lengths > 0).sum(), per_token)
    return row_sums.sum() / denominator


def given_denominator(name: str, value: float | torch.Tensor, ref: torch.Tensor
                      ) -> torch.Tensor:
    """A denominator given by the caller, as a 0-d tensor of ``ref``'s dtype and device.

    It must be a finite number > 0 and is used as given (0.5 halves nothing away, 0 is an
    error, never raised to 1). A one-element tensor is checked on the CPU (outside
    ``torch.compile``); on an accelerator its value is not read (no host sync): a
    denominator of 0 there gives an inf or NaN loss, a negative one flips its sign.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a number or a one-element real tensor, got dtype "
                            f"{value.dtype} and shape {tuple(value.shape)}")
        if value.device.type == "cpu" and not torch.compiler.is_compiling():
            number = float(value)
            if not (math.isfinite(number) and number > 0):
                raise ValueError(f"{name} must be finite and > 0, got {number}")
        return value.reshape(()).to(device=ref.device, dtype=ref.dtype)
    value = check_float(name, value, min_value=0.0, min_inclusive=False)
    return torch.tensor(value, dtype=ref.dtype, device=ref.device)


def _default_denominator(count: int | torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A count from the mask, at least 1: nothing valid gives a loss of 0, not NaN."""
    return torch.as_tensor(count, device=ref.device).clamp_min(1).to(ref.dtype)


def global_token_count(mask: torch.Tensor | Sequence[torch.Tensor],
                       group: ProcessGroup | None = None) -> torch.Tensor:
    """N_tok = Σ over ranks (and over the given micro-batch masks) of Σ m, an int64 0-d tensor.

    The denominator that makes a token-mean exact however the step is split: pass it as
    ``num_tokens`` to every micro-batch's ``aggregate_loss`` / policy loss and sum (do not
    average) the micro-batch losses; data-parallel gradient averaging then needs the
    per-rank sum, i.e. multiply by the world size if the trainer's all-reduce averages.
    A rank with no tokens (an empty mask) contributes 0 and still takes part in the
    all-reduce.
    """
    return all_reduce_sum(_count(mask, lambda valid: valid.sum(dtype=torch.int64)), group)


def global_sequence_count(mask: torch.Tensor | Sequence[torch.Tensor],
                          group: ProcessGroup | None = None) -> torch.Tensor:
    """N_seq = Σ over ranks and micro-batches of the rows with a valid token (int64 0-d),
    the ``num_sequences`` of the sequence-mean modes of ``aggregate_loss``."""
    return all_reduce_sum(_count(mask, lambda valid: valid.reshape(valid.shape[0], -1)
                                 .any(-1).sum(dtype=torch.int64)), group)


def _count(mask, count_one) -> torch.Tensor:
    masks = [mask] if isinstance(mask, torch.Tensor) else list(mask)
    if not masks:
        raise ValueError("mask must be a tensor or a non-empty sequence of tensors, got none")
    counts = [count_one(check_mask("mask", m, allow_empty=True)) for m in masks]
    return torch.stack([c.to(counts[0].device) for c in counts]).sum()


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``valid`` is set (0 when nothing is valid; no host sync)."""
    total = torch.where(valid, values, torch.zeros_like(values)).sum()
    return total / valid.sum().clamp_min(1).to(values.dtype)


def check_policy_inputs(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                        advantages: torch.Tensor, mask: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated (logprobs, old_logprobs, advantages broadcast to the token shape, bool mask)."""
    logprobs = check_tensor("logprobs", logprobs, floating=True)
    old_logprobs = check_tensor("old_logprobs", old_logprobs, floating=True)
    check_same_shape("old_logprobs", old_logprobs, "logprobs", logprobs)
    check_same_device("old_logprobs", old_logprobs, "logprobs", logprobs)
    if old_logprobs.dtype != logprobs.dtype:
        raise TypeError(f"old_logprobs must have the dtype of logprobs ({logprobs.dtype}), "
                        f"got {old_logprobs.dtype}")
    advantages = check_tensor("advantages", advantages, floating=True)
    check_same_device("advantages", advantages, "logprobs", logprobs)
    advantages = per_token_view("advantages", advantages, logprobs)
    valid = check_mask("mask", mask, logprobs.shape)
    check_same_device("mask", valid, "logprobs", logprobs)
    return logprobs, old_logprobs, advantages, valid


def per_token_view(name: str, value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value`` broadcast to the token shape (..., L) of ``ref``, as a view.

    A tensor with one dimension less than ``ref`` holds one value per response, shape
    (...,), broadcast over the tokens of its response (never along the token axis, even
    when B == L); a tensor with as many dimensions broadcasts as usual (e.g. (B, 1)); a 0-d
    tensor applies to every token.
    """
    if value.dim() == ref.dim() - 1:
        value = value.unsqueeze(-1)
    if value.dim() in (0, ref.dim()):
        try:
            return value.expand(ref.shape)
        except RuntimeError:
            pass
    raise ValueError(f"{name} must have the token shape {tuple(ref.shape)} or one value per "
                     f"response {tuple(ref.shape[:-1])}, got {tuple(value.shape)}")


def check_loss_weights(weights: torch.Tensor | None, logprobs: torch.Tensor
                       ) -> torch.Tensor | None:
    """Detached per-token weights of a policy loss, broadcast to the token shape: given per
    token (..., L) or per response (...,), like the advantages; floating point, on the
    device of ``logprobs``."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor or None, got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor, got dtype {weights.dtype}")
    check_same_device("weights", weights, "logprobs", logprobs)
    return per_token_view("weights", weights.detach(), logprobs)


def clamped_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, valid: torch.Tensor,
                      log_ratio_clamp: float) -> torch.Tensor:
    """clamp(logp - logp_old, ±log_ratio_clamp), 0 at masked positions (whatever they hold)."""
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(valid, logprobs - old_logprobs, zero)
    return log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)


def masked_advantages(advantages: torch.Tensor, valid: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """A detached, in the loss dtype, 0 at masked positions (whatever they hold)."""
    zero = torch.zeros((), dtype=dtype, device=advantages.device)
    return torch.where(valid, advantages.detach().to(dtype), zero)


def ratio_and_advantages(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                         advantages: torch.Tensor, valid: torch.Tensor, log_ratio_clamp: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log r, r, A) of a policy loss: the clamped log-ratio, r = exp(log r) and the masked,
    detached advantages, all 0-safe at masked positions."""
    log_ratio = clamped_log_ratio(logprobs, old_logprobs, valid, log_ratio_clamp)
    return log_ratio, log_ratio.exp(), masked_advantages(advantages, valid, logprobs.dtype)


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, eps_low: ScalarOrTensor,
                      eps_high: ScalarOrTensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ℓ, -A·r, -A·clip(r, 1 - ε_low, 1 + ε_high)) with ℓ = max of the two: PPO's clipped
    surrogate with decoupled bounds (arXiv 1707.06347; DAPO's clip-higher, arXiv 2503.14476)."""
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped), unclipped, clipped


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                        advantages: torch.Tensor, mask: torch.Tensor, *,
                        eps_low: ScalarOrTensor = 0.2, eps_high: ScalarOrTensor = 0.28,
                        dual_clip: float | None = None, log_ratio_clamp: float = 20.0,
                        agg: str = "token-mean", num_tokens: float | torch.Tensor | None = None,
                        num_sequences: float | torch.Tensor | None = None,
                        normalizer: float | torch.Tensor | None = None) -> PolicyLossOutput:
    """PPO clipped surrogate with decoupled (asymmetric) bounds and optional dual clip.

    r = exp(clamp(logp - logp_old, ±log_ratio_clamp)),
    ℓ = max(-A·r, -A·clip(r, 1 - ε_low, 1 + ε_high)),
    with ``dual_clip`` c > 1 and A < 0: ℓ = min(ℓ, -A·c).
    ε may be floats or per-token tensors. Masked positions give ℓ = 0 and zero gradient
    whatever they hold (NaN and inf included). ``agg`` and the denominators go to
    :func:`aggregate_loss`.
    """
    logprobs, old_logprobs, advantages, valid = check_policy_inputs(
        logprobs, old_logprobs, advantages, mask)
    eps_low = check_clip_eps("eps_low", eps_low, logprobs, lower=True)
    eps_high = check_clip_eps("eps_high", eps_high, logprobs, lower=False)
    if dual_clip is not None:
        dual_clip = check_float("dual_clip", dual_clip, min_value=1.0, min_inclusive=False)
    log_ratio_clamp = check_float("log_ratio_clamp", log_ratio_clamp, min_value=0.0,
                                  min_inclusive=False)
    check_choice("agg", agg, AGGREGATION_MODES)

    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio, ratio, adv = ratio_and_advantages(logprobs, old_logprobs, advantages, valid,
                                                 log_ratio_clamp)
    lower, upper = 1.0 - eps_low, 1.0 + eps_high
    per_token, _, _ = clipped_surrogate(ratio, adv, eps_low, eps_high)
    capped = torch.zeros_like(valid)
    if dual_clip is not None:
        cap = -adv * dual_clip
        capped = (adv < 0) & (cap < per_token)
        per_token = torch.where(capped, cap, per_token)
    per_token = torch.where(valid, per_token, zero)
    loss = aggregate_loss(per_token, valid, agg, num_tokens=num_tokens,
                          num_sequences=num_sequences, normalizer=normalizer)
    with torch.no_grad():
        r = ratio.detach()
        clip_frac_low = masked_mean(((adv < 0) & (r < lower)).to(r.dtype), valid)
        clip_frac_high = masked_mean(((adv > 0) & (r > upper)).to(r.dtype), valid)
        dual_clip_frac = masked_mean((capped & valid).to(r.dtype), valid)
        approx_kl = masked_mean((r - 1.0) - log_ratio.detach(), valid)
    return PolicyLossOutput(loss, per_token, clip_frac_low, clip_frac_high, approx_kl,
                            dual_clip_frac, torch.zeros_like(dual_clip_frac))


def hapo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                     advantages: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, *,
                     stats: EntropyStats | None = None, variant: str = "paper",
                     eps_low: float = 0.2, eps_high: float = 0.2, alpha: float = 1.0,
                     beta: float = 1.0, quantile: float = 0.8, dual_clip: float | None = 10.0,
                     agg: str = "token-mean", log_ratio_clamp: float = 20.0,
                     entropy_eps: float = 1e-8,
                     num_tokens: float | torch.Tensor | None = None,
                     num_sequences: float | torch.Tensor | None = None,
                     normalizer: float | torch.Tensor | None = None) -> PolicyLossOutput:
    """The HAPO policy loss: entropy-adaptive clipping and advantage redistribution.

    In this order, everything but the ratio under no-grad:
      1. ĥ = normalized_entropy(entropy, stats)   (stats from this call's entropy and mask
         unless given, with ``quantile``);
      2. (ε_low', ε_high') = adaptive_clip_bounds(ĥ, eps_low, eps_high, alpha);
      3. A' = redistribute_advantages(A, ĥ, r, eps_low=ε_low', eps_high=ε_high', beta);
      4. clipped_policy_loss(logp, logp_old, A', mask, ε_low', ε_high', dual_clip).
    With α = β = 0 this is ``clipped_policy_loss`` with the base ε. ``variant="released"``
    reproduces the public reference code's ĥ (its sign slip below the pivot).
    """
    logprobs, old_logprobs, advantages, valid = check_policy_inputs(
        logprobs, old_logprobs, advantages, mask)
    entropy = check_tensor("entropy", entropy, floating=True)
    check_same_shape("entropy", entropy, "logprobs", logprobs)
    check_same_device("entropy", entropy, "logprobs", logprobs)
    variant = check_variant(variant)
    with torch.no_grad():
        entropy = entropy.detach()
        if stats is None:
            stats = entropy_stats(entropy, valid, quantile=quantile, eps=entropy_eps)
        # ĥ is float32 (see log_entropy); the bounds take the precision of the loss.
        h_hat = normalized_entropy(entropy, stats, variant=variant, eps=entropy_eps)
        h_hat = h_hat.to(logprobs.dtype)
        clip_low, clip_high = adaptive_clip_bounds(h_hat, eps_low=eps_low, eps_high=eps_high,
                                                   alpha=alpha)
        log_ratio_clamp = check_float("log_ratio_clamp", log_ratio_clamp, min_value=0.0,
                                      min_inclusive=False)
        ratio = clamped_log_ratio(logprobs.detach(), old_logprobs.detach(), valid,
                                  log_ratio_clamp).exp()
        adv = redistribute_advantages(advantages.detach(), h_hat, ratio, eps_low=clip_low, eps_high=clip_high,
                                      beta=beta)
    return clipped_policy_loss(logprobs, old_logprobs, adv, valid, eps_low=clip_low,
                               eps_high=clip_high, dual_clip=dual_clip,
                               log_ratio_clamp=log_ratio_clamp, agg=agg, num_tokens=num_tokens,
                               num_sequences=num_sequences, normalizer=normalizer)
