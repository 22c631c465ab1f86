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
from hapo_ops._utils.collectives import ProcessGroup, all_reduce_sum, check_process_group
from hapo_ops.entropy.signal import EntropyStats, entropy_stats, normalized_entropy
from hapo_ops.rl.advantages import check_beta, redistribution_scale

AGGREGATION_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                     "seq-mean-token-sum-norm")


class PolicyLossOutput(NamedTuple):
    """Result of a clipped policy loss; every field is a tensor (no host sync), float32
    whatever the input dtype (float64 for float64 inputs).

    loss: the aggregated scalar. per_token: ℓ per token, zero outside the mask.
    clip_frac_low / clip_frac_high: fraction of valid tokens whose loss is held constant by
    the lower clip (A < 0, r < 1-ε_low) or the upper clip (A > 0, r > 1+ε_high).
    dual_clip_frac: fraction of valid tokens capped by the dual clip (A < 0, -A·c < ℓ);
    0 for losses without a dual clip.
    approx_kl: mean over valid tokens of (r - 1) - log r, the k3 estimator of
    KL(π_old ‖ π), always ≥ 0.
    selected_frac: fraction of valid tokens chosen by a token-selection rule: those cut by
    Clip-Cov or penalised by KL-Cov; 0 for the other losses.
    h_hat: the per-token normalized entropy ĥ the loss used (``hapo_policy_loss``), in the
    loss dtype, 0 outside the mask; a zero tensor shaped like ``per_token`` for the losses
    without ĥ. Detached.

    An empty batch ((0, L) or (B, 0), e.g. a data-parallel rank with nothing to train on)
    gives a loss of 0 with a zero gradient of the input's shape, empty per-token fields and
    metrics of 0; with ``group=`` such a rank still joins the collectives.
    """

    loss: torch.Tensor
    per_token: torch.Tensor
    clip_frac_low: torch.Tensor
    clip_frac_high: torch.Tensor
    approx_kl: torch.Tensor
    dual_clip_frac: torch.Tensor
    selected_frac: torch.Tensor
    h_hat: torch.Tensor


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
    h_hat = check_tensor("h_hat", h_hat, floating=True, allow_empty=True)
    eps_low = check_clip_eps("eps_low", eps_low, h_hat, lower=True)
    eps_high = check_clip_eps("eps_high", eps_high, h_hat, lower=False)
    alpha = check_float("alpha", alpha, min_value=0.0)
    return _widened_eps(h_hat, eps_low, eps_high, alpha)


def _widened_eps(h_hat: torch.Tensor, eps_low: ScalarOrTensor, eps_high: ScalarOrTensor,
                 alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε_low', ε_high') = (ε_low + ε_low·α·(-min(ĥ, 0)), ε_high + ε_high·α·max(ĥ, 0)), the
    where-form above in three passes each."""
    low = h_hat.clamp(max=0.0).mul_(-alpha * eps_low).add_(eps_low)
    high = h_hat.clamp(min=0.0).mul_(alpha * eps_high).add_(eps_high)
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
    all-masked or empty batch ((0, L), (B, 0)) gives 0, not NaN.
    """
    per_token = check_tensor("per_token", per_token, floating=True, allow_empty=True)
    valid = check_mask("mask", mask, per_token.shape, allow_empty=True)
    check_same_device("mask", valid, "per_token", per_token)
    mode = check_choice("mode", mode, AGGREGATION_MODES)
    scale = aggregation_scale(valid, mode, per_token.dtype, num_tokens=num_tokens,
                              num_sequences=num_sequences, normalizer=normalizer)
    masked = torch.where(valid, per_token, torch.zeros((), dtype=per_token.dtype,
                                                       device=per_token.device))
    return scaled_sum(masked, scale)


def aggregation_scale(valid: torch.Tensor, mode: str, dtype: torch.dtype, *,
                      num_tokens: float | torch.Tensor | None = None,
                      num_sequences: float | torch.Tensor | None = None,
                      normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """The factor s with ``aggregate_loss`` = Σ_t m·ℓ·s (see there for the modes): a 0-d
    tensor, or one per response, shape (B, 1), for seq-mean-token-mean (1 / (L_i·N_seq)).
    Every given denominator is checked (``given_denominator``), whether or not ``mode``
    uses it. It is also ∂loss/∂ℓ, the upstream gradient of every valid token."""
    mode = check_choice("mode", mode, AGGREGATION_MODES)
    ref = torch.empty((), dtype=dtype, device=valid.device)
    given = check_denominators(ref, num_tokens=num_tokens, num_sequences=num_sequences,
                               normalizer=normalizer)
    if mode == "token-sum":
        return torch.ones((), dtype=dtype, device=valid.device)
    if mode == "token-mean":
        denominator = given.get("num_tokens")
        if denominator is None:
            denominator = _default_denominator(torch.count_nonzero(valid), ref)
        return denominator.reciprocal()
    if mode == "seq-mean-token-sum-norm":
        denominator = given.get("normalizer")
        if denominator is None:
            denominator = _default_denominator(valid.shape[-1] if valid.dim() else 1, ref)
        return denominator.reciprocal()
    if valid.dim() != 2:
        raise ValueError(f"per_token must have shape (B, L) for mode {mode!r}, "
                         f"got {tuple(valid.shape)}")
    lengths = torch.count_nonzero(valid, dim=-1).unsqueeze(-1)
    denominator = given.get("num_sequences")
    if denominator is None:
        denominator = _default_denominator(torch.count_nonzero(lengths), ref)
    if mode == "seq-mean-token-sum":
        return denominator.reciprocal()
    return (lengths.clamp_min(1).to(dtype) * denominator).reciprocal()


def check_denominators(ref: torch.Tensor, *, num_tokens: float | torch.Tensor | None = None,
                       num_sequences: float | torch.Tensor | None = None,
                       normalizer: float | torch.Tensor | None = None
                       ) -> dict[str, torch.Tensor]:
    """The given denominators of ``aggregate_loss`` by name, each checked
    (``given_denominator``) and as a 0-d tensor of ``ref``'s dtype and device. A loss that
    all-reduces calls it before its first collective, so that a bad value raises on every
    rank before any rank waits on the others."""
    return {name: given_denominator(name, value, ref) for name, value in
            (("num_tokens", num_tokens), ("num_sequences", num_sequences),
             ("normalizer", normalizer)) if value is not None}


def scaled_sum(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Σ values·scale for a scale from ``aggregation_scale`` (0-d, or (B, 1) per row)."""
    if scale.dim() == 0:
        return values.sum() * scale
    return (values.sum(-1, keepdim=True) * scale).sum()


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
    group = check_process_group("group", group)
    return all_reduce_sum(_count(mask, lambda valid: valid.sum(dtype=torch.int64)), group)


def global_sequence_count(mask: torch.Tensor | Sequence[torch.Tensor],
                          group: ProcessGroup | None = None) -> torch.Tensor:
    """N_seq = Σ over ranks and micro-batches of the rows with a valid token (int64 0-d),
    the ``num_sequences`` of the sequence-mean modes of ``aggregate_loss``."""
    group = check_process_group("group", group)
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
    logprobs = check_tensor("logprobs", logprobs, floating=True, allow_empty=True)
    old_logprobs = check_tensor("old_logprobs", old_logprobs, floating=True, allow_empty=True)
    check_same_shape("old_logprobs", old_logprobs, "logprobs", logprobs)
    check_same_device("old_logprobs", old_logprobs, "logprobs", logprobs)
    if old_logprobs.dtype != logprobs.dtype:
        raise TypeError(f"old_logprobs must have the dtype of logprobs ({logprobs.dtype}), "
                        f"got {old_logprobs.dtype}")
    advantages = check_tensor("advantages", advantages, floating=True, allow_empty=True)
    check_same_device("advantages", advantages, "logprobs", logprobs)
    advantages = per_token_view("advantages", advantages, logprobs)
    valid = check_mask("mask", mask, logprobs.shape, allow_empty=True)
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


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a policy loss computes and returns in: float32 for 16-bit log-probs (a
    ratio near 1 needs more than 8 or 11 bits: GSPO's ε of 3e-4 is below bf16 resolution),
    float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def clamped_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, valid: torch.Tensor,
                      log_ratio_clamp: float) -> torch.Tensor:
    """clamp(logp - logp_old, ±log_ratio_clamp) in the loss dtype, 0 at masked positions
    (whatever they hold), with no gradient there: differentiable in ``logprobs`` (the
    companion losses), or without gradient under ``torch.no_grad`` (the fused loss). One
    new tensor, masked and clamped in place."""
    dtype = loss_dtype(logprobs.dtype)
    log_ratio = torch.sub(logprobs.to(dtype), old_logprobs.to(dtype))
    return log_ratio.masked_fill_(~valid, 0.0).clamp_(-log_ratio_clamp, log_ratio_clamp)


def masked_advantages(advantages: torch.Tensor, valid: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """A detached, in the loss dtype, 0 at masked positions (whatever they hold)."""
    zero = torch.zeros((), dtype=dtype, device=advantages.device)
    return torch.where(valid, advantages.detach().to(dtype), zero)


def ratio_and_advantages(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                         advantages: torch.Tensor, valid: torch.Tensor, log_ratio_clamp: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log r, r, A) of a policy loss in the loss dtype: the clamped log-ratio (with
    gradient), r = exp(log r) and the masked, detached advantages, all 0-safe at masked
    positions."""
    log_ratio = clamped_log_ratio(logprobs, old_logprobs, valid, log_ratio_clamp)
    return (log_ratio, log_ratio.exp(),
            masked_advantages(advantages, valid, loss_dtype(logprobs.dtype)))


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, eps_low: ScalarOrTensor,
                      eps_high: ScalarOrTensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ℓ, -A·r, -A·clip(r, 1 - ε_low, 1 + ε_high)) with ℓ = max of the two: PPO's clipped
    surrogate with decoupled bounds (arXiv 1707.06347; DAPO's clip-higher, arXiv 2503.14476)."""
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped), unclipped, clipped


# ------------------------------------------------------------------ the fused clipped loss
#
# On the valid tokens, with q the clipped ratio,
#   A > 0:  ℓ = max(-A·r, -A·clip(r, 1-ε_low, 1+ε_high)) = -A·min(r, 1+ε_high)
#   A ≤ 0:  ℓ = -A·max(r, 1-ε_low), and with the dual clip min(ℓ, -A·c) = -A·min(max(r, 1-ε_low), c)
# so ℓ = -A·q with q = min(r, 1+ε_high) or min(max(r, 1-ε_low), c): one expression. Its
# derivative in log π is -A·r = ℓ where q = r (the unclipped branch, |log r| inside the
# log-ratio clamp) and 0 elsewhere; the clip metrics are the signs of q - r. Eager torch
# needs a pass per operation; torch.compile and a GPU fuse them.


def _log_ratio_and_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                         valid: torch.Tensor, log_ratio_clamp: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(``clamped_log_ratio``, its exp), no gradient: 0 and 1 at masked positions."""
    with torch.no_grad():
        log_ratio = clamped_log_ratio(logprobs.detach(), old_logprobs.detach(), valid,
                                      log_ratio_clamp)
        return log_ratio, log_ratio.exp()


class _ClippedPolicyGradient(torch.autograd.Function):
    """(Σ s·ℓ, ℓ) with ℓ = -coef·q, as functions of the log-probs: ∂ℓ/∂log π = ℓ except
    where ``held`` (by a clip or the log-ratio clamp), 0 there. Backward is one elementwise
    expression, where(held, 0, ℓ·upstream), in the dtype of the log-probs."""

    @staticmethod
    def forward(ctx, logprobs, coef, clipped_ratio, held, scale):
        zero = torch.zeros((), dtype=coef.dtype, device=coef.device)
        per_token = torch.addcmul(zero, coef, clipped_ratio, value=-1.0)
        ctx.save_for_backward(per_token, held, scale)
        ctx.set_materialize_grads(False)
        ctx.logprobs_dtype = logprobs.dtype
        return scaled_sum(per_token, scale), per_token

    @staticmethod
    def backward(ctx, grad_loss, grad_per_token):
        per_token, held, scale = ctx.saved_tensors
        upstream = None if grad_loss is None else grad_loss * scale
        if grad_per_token is not None:
            upstream = grad_per_token if upstream is None else grad_per_token + upstream
        if upstream is None:
            return None, None, None, None, None
        grad = (per_token * upstream).masked_fill_(held, 0.0)
        return grad.to(ctx.logprobs_dtype), None, None, None, None


def _fraction(chosen: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.count_nonzero(chosen).to(count.dtype) / count


def _loss_coefficient(advantages: torch.Tensor, weights: torch.Tensor | None,
                      valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A·w in the loss dtype, detached, 0 off the mask (whatever A and w hold there)."""
    with torch.no_grad():
        advantages = advantages.detach().to(dtype)
        if weights is not None:
            advantages = advantages * weights
        return torch.where(valid, advantages, torch.zeros((), dtype=dtype,
                                                          device=advantages.device))


def _clipped_loss(logprobs: torch.Tensor, valid: torch.Tensor, invalid: torch.Tensor,
                  log_ratio: torch.Tensor, ratio: torch.Tensor, coef: torch.Tensor,
                  lower: ScalarOrTensor, upper: ScalarOrTensor, dual_clip: float | None,
                  log_ratio_clamp: float, scale: torch.Tensor, *, own_bounds: bool = False,
                  h_hat: torch.Tensor | None = None) -> PolicyLossOutput:
    """The clipped loss and its metrics from the ratio (``_log_ratio_and_ratio``), the
    coefficient A·w (``_loss_coefficient``) and the ratio bounds 1 - ε_low, 1 + ε_high: the
    one home of ``clipped_policy_loss`` and ``hapo_policy_loss``. ``log_ratio`` and
    ``ratio`` are overwritten; so are the bounds with ``own_bounds`` (full-shape tensors,
    finite off the mask, owned by the caller). ``h_hat``: the ĥ of the output (default
    zeros)."""
    dtype = ratio.dtype
    with torch.no_grad():
        positive = coef > 0
        cap = math.inf if dual_clip is None else dual_clip
        if own_bounds:
            clipped = torch.maximum(ratio, lower, out=lower).clamp_(max=cap)
            torch.where(positive, torch.minimum(ratio, upper, out=upper), clipped, out=clipped)
        elif isinstance(lower, torch.Tensor) or isinstance(upper, torch.Tensor):
            lower = torch.as_tensor(lower, device=ratio.device).to(dtype)
            upper = torch.as_tensor(upper, device=ratio.device).to(dtype)
            clipped = torch.maximum(ratio, lower).clamp_(max=cap)
            torch.where(positive, torch.minimum(ratio, upper), clipped, out=clipped)
            clipped.masked_fill_(invalid, 1.0)      # whatever the bounds hold off the mask
        else:
            clipped = ratio.clamp(min=lower, max=cap)
            torch.where(positive, ratio.clamp(max=upper), clipped, out=clipped)
        held_below = clipped < ratio    # A > 0: the upper clip; A < 0: the dual clip
        held_above = clipped > ratio    # A < 0: the lower clip
        negative = coef < 0
        count = torch.count_nonzero(valid).clamp_min(1).to(dtype)
        clip_frac_high = _fraction(held_below & positive, count)
        clip_frac_low = _fraction(held_above & negative, count)
        dual_clip_frac = (torch.zeros((), dtype=dtype, device=ratio.device) if dual_clip is None
                          else _fraction(held_below & negative, count))
        held = held_below | held_above
        # Below, ratio and log_ratio are overwritten (no longer needed; no new tensors).
        # approx_kl: mean over valid tokens of (r - 1) - log r; masked tokens add exactly 0
        # (r = 1, log r = 0); r - 1 is exact in floating point near 1.
        approx_kl = ratio.sub_(1.0).sub_(log_ratio).sum() / count
        held |= log_ratio.abs_() >= log_ratio_clamp     # no gradient past the clamp
    loss, per_token = _ClippedPolicyGradient.apply(logprobs, coef, clipped, held, scale)
    if h_hat is None:
        h_hat = torch.zeros_like(per_token)
    return PolicyLossOutput(loss, per_token, clip_frac_low, clip_frac_high, approx_kl,
                            dual_clip_frac, torch.zeros_like(clip_frac_low), h_hat)


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                        advantages: torch.Tensor, mask: torch.Tensor, *,
                        eps_low: ScalarOrTensor = 0.2, eps_high: ScalarOrTensor = 0.28,
                        dual_clip: float | None = None, log_ratio_clamp: float = 20.0,
                        weights: torch.Tensor | None = None,
                        agg: str = "token-mean", num_tokens: float | torch.Tensor | None = None,
                        num_sequences: float | torch.Tensor | None = None,
                        normalizer: float | torch.Tensor | None = None) -> PolicyLossOutput:
    """PPO clipped surrogate with decoupled (asymmetric) bounds and optional dual clip.

    r = exp(clamp(logp - logp_old, ±log_ratio_clamp)),
    ℓ = max(-A·r, -A·clip(r, 1 - ε_low, 1 + ε_high)),
    with ``dual_clip`` c > 1 and A < 0: ℓ = min(ℓ, -A·c); with ``weights`` w: ℓ·w.
    Masked positions give ℓ = 0 and zero gradient whatever they hold (NaN and inf included).
    The math is done in float32 whatever the input dtype (float64 stays float64).

    Args:
      logprobs: (..., L) float log-probs of the sampled tokens under the current policy
        (any float dtype; the gradient flows back in that dtype).
      old_logprobs: same shape and dtype, under the behaviour policy (no gradient).
      advantages: (..., L) per token, or (...,) one per response (broadcast over its tokens);
        any float dtype; detached.
      mask: (..., L) bool or numeric, 1 = valid token.
      eps_low: ε_low in [0, 1), a float or a tensor broadcastable to (..., L).
      eps_high: ε_high ≥ 0, a float or a tensor.
      dual_clip: c > 1, or None for no dual clip.
      log_ratio_clamp: bound (> 0) on |log r| before exp; a token at or beyond it gets no
        gradient.
      weights: optional float weights (..., L) per token or (...,) per response, detached,
        multiplying ℓ before aggregation (e.g. from ``rollout_correction``).
      agg, num_tokens, num_sequences, normalizer: the aggregation, see ``aggregate_loss``.

    Returns:
      ``PolicyLossOutput``: ``loss`` 0-d, ``per_token`` (..., L) (ℓ·w, 0 off the mask) and the
      0-d metrics ``clip_frac_low``, ``clip_frac_high``, ``approx_kl``, ``dual_clip_frac``
      (``selected_frac`` = 0; ``h_hat`` zeros like ``per_token``), all in float32 (float64
      for float64 inputs).

    Example:
      >>> import torch
      >>> old = torch.full((1, 4), -1.0)
      >>> logp = (old + torch.tensor([[0.0, 0.5, -0.5, 0.0]])).requires_grad_(True)
      >>> out = clipped_policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 4))
      >>> out.per_token      # r = e^0.5 is held at 1.28; r = e^-0.5 is not clipped (A > 0)
      tensor([[-1.0000, -1.2800, -0.6065, -1.0000]],
             grad_fn=<_ClippedPolicyGradientBackward>)
      >>> out.clip_frac_high
      tensor(0.2500)
      >>> out.loss.backward(); logp.grad
      tensor([[-0.2500,  0.0000, -0.1516, -0.2500]])

    References:
      Schulman et al., 2017, *Proximal Policy Optimization Algorithms*, arXiv 1707.06347;
      Ye et al., 2019, dual clip, arXiv 1912.09729; Yu et al., 2025, *DAPO* (decoupled
      ε_low / ε_high), arXiv 2503.14476.
    """
    logprobs, old_logprobs, advantages, valid = check_policy_inputs(
        logprobs, old_logprobs, advantages, mask)
    eps_low = check_clip_eps("eps_low", eps_low, logprobs, lower=True)
    eps_high = check_clip_eps("eps_high", eps_high, logprobs, lower=False)
    dual_clip = _check_dual_clip(dual_clip)
    log_ratio_clamp = check_float("log_ratio_clamp", log_ratio_clamp, min_value=0.0,
                                  min_inclusive=False)
    agg = check_choice("agg", agg, AGGREGATION_MODES)
    weights = check_loss_weights(weights, logprobs)
    scale = aggregation_scale(valid, agg, loss_dtype(logprobs.dtype), num_tokens=num_tokens,
                              num_sequences=num_sequences, normalizer=normalizer)
    invalid = ~valid
    log_ratio, ratio = _log_ratio_and_ratio(logprobs, old_logprobs, valid, log_ratio_clamp)
    coef = _loss_coefficient(advantages, weights, valid, ratio.dtype)
    return _clipped_loss(logprobs, valid, invalid, log_ratio, ratio, coef, 1.0 - eps_low,
                         1.0 + eps_high, dual_clip, log_ratio_clamp, scale)


def _check_dual_clip(dual_clip: object) -> float | None:
    if dual_clip is None:
        return None
    return check_float("dual_clip", dual_clip, min_value=1.0, min_inclusive=False)


def hapo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                     advantages: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, *,
                     stats: EntropyStats | None = None, variant: str = "paper",
                     eps_low: ScalarOrTensor = 0.2, eps_high: ScalarOrTensor = 0.2,
                     alpha: float = 1.0, beta: float = 1.0, quantile: float = 0.8,
                     dual_clip: float | None = 10.0, agg: str = "token-mean",
                     log_ratio_clamp: float = 20.0, entropy_eps: float = 1e-8,
                     weights: torch.Tensor | None = None,
                     num_tokens: float | torch.Tensor | None = None,
                     num_sequences: float | torch.Tensor | None = None,
                     normalizer: float | torch.Tensor | None = None) -> PolicyLossOutput:
    """The HAPO policy loss: entropy-adaptive clipping and advantage redistribution.

    In this order, everything but the ratio under no-grad:
      1. ĥ = normalized_entropy(entropy, stats)   (stats from this call's entropy and mask
         unless given, with ``quantile``);
      2. (ε_low', ε_high') = adaptive_clip_bounds(ĥ, eps_low, eps_high, alpha);
      3. A' = redistribute_advantages(A, ĥ, r, eps_low=ε_low', eps_high=ε_high', beta)
         (bit for bit: both multiply by ``redistribution_scale``);
      4. ℓ = the clipped loss of ``clipped_policy_loss`` with A', ε_low', ε_high' and the
         dual clip, times ``weights``.
    With α = β = 0 this is ``clipped_policy_loss`` with the base ε. ``variant="released"``
    reproduces the public reference code's ĥ (its sign slip below the pivot). ĥ is float32;
    the loss math is float32 whatever the input dtype (float64 stays float64).

    Args:
      logprobs: (..., L) float log-probs of the sampled tokens under the current policy
        (any float dtype; the gradient flows back in that dtype).
      old_logprobs: same shape and dtype, under the behaviour policy (no gradient).
      advantages: (..., L) per token or (...,) per response; detached.
      entropy: (..., L) float token entropies H (nats, at temperature 1); detached.
      mask: (..., L) bool or numeric, 1 = valid token.
      stats: ``EntropyStats`` from ``entropy_stats`` (e.g. over every data-parallel rank);
        default: from this call's entropy and mask.
      variant: "paper" or "released".
      eps_low: base ε_low in [0, 1) (float or tensor); eps_high: base ε_high ≥ 0.
      alpha: α ≥ 0, how far ĥ widens the bounds; beta: β in [0, 1], the
        redistribution strength (β ≤ 1 keeps every advantage's sign).
      quantile: q in [0, 1] of the entropy pivot (when ``stats`` is None).
      dual_clip: c > 1 or None; log_ratio_clamp: bound on |log r| (> 0).
      entropy_eps: floor of H before the log.
      weights: optional (..., L) or (...,) float weights on ℓ, detached.
      agg, num_tokens, num_sequences, normalizer: see ``aggregate_loss``.

    Returns:
      ``PolicyLossOutput`` as ``clipped_policy_loss`` (fractions over the adaptive bounds;
      ``dual_clip_frac`` the dual clip's; ``selected_frac`` = 0; ``h_hat`` the ĥ of step 1,
      0 off the mask), float32 (float64 inputs: float64).

    Example:
      >>> import torch
      >>> entropy = torch.exp(torch.tensor([[-3.0, -2.0, -1.0, 0.0, 1.0]]))  # ĥ = -1 … 1
      >>> old = torch.full((1, 5), -0.5)
      >>> logp = (old + torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.6931]])).requires_grad_(True)
      >>> out = hapo_policy_loss(logp, old, torch.tensor([1.0]), entropy, torch.ones(1, 5),
      ...                        quantile=0.5)
      >>> out.per_token   # A' = 0, 0.5, 1, 1, 2; the last ratio (2) held at 1 + 0.4
      tensor([[ 0.0000, -0.5000, -1.0000, -1.0000, -2.8000]],
             grad_fn=<_ClippedPolicyGradientBackward>)

    References:
      HAPO, arXiv 2509.16591, §3.3 (advantage redistribution) and §3.4 (adaptive clipping);
      PPO, arXiv 1707.06347; dual clip, arXiv 1912.09729.
    """
    logprobs, old_logprobs, advantages, valid = check_policy_inputs(
        logprobs, old_logprobs, advantages, mask)
    entropy = check_tensor("entropy", entropy, floating=True, allow_empty=True)
    check_same_shape("entropy", entropy, "logprobs", logprobs)
    check_same_device("entropy", entropy, "logprobs", logprobs)
    variant = check_variant(variant)
    eps_low = check_clip_eps("eps_low", eps_low, logprobs, lower=True)
    eps_high = check_clip_eps("eps_high", eps_high, logprobs, lower=False)
    alpha = check_float("alpha", alpha, min_value=0.0)
    beta = check_beta(beta)
    dual_clip = _check_dual_clip(dual_clip)
    log_ratio_clamp = check_float("log_ratio_clamp", log_ratio_clamp, min_value=0.0,
                                  min_inclusive=False)
    agg = check_choice("agg", agg, AGGREGATION_MODES)
    weights = check_loss_weights(weights, logprobs)
    dtype = loss_dtype(logprobs.dtype)
    scale = aggregation_scale(valid, agg, dtype, num_tokens=num_tokens,
                              num_sequences=num_sequences, normalizer=normalizer)
    invalid = ~valid
    with torch.no_grad():
        entropy = entropy.detach()
        if stats is None:
            stats = entropy_stats(entropy, valid, quantile=quantile, eps=entropy_eps)
        # ĥ is float32 (see log_entropy); 0 off the mask, whatever the entropy holds there
        h_hat = normalized_entropy(entropy, stats, variant=variant, eps=entropy_eps)
        h_hat = h_hat.to(dtype).masked_fill_(invalid, 0.0)
        # ε' themselves (not the ratio bounds 1 ∓ ε'), so that the neutral zone's edges
        # 1 ∓ ε'/2 are those of redistribute_advantages with adaptive_clip_bounds' ε'
        widened_low, widened_high = _widened_eps(h_hat, eps_low, eps_high, alpha)
        log_ratio, ratio = _log_ratio_and_ratio(logprobs, old_logprobs, valid,
                                                log_ratio_clamp)
        coef = _loss_coefficient(advantages, weights, valid, dtype)
        coef.mul_(redistribution_scale(h_hat, ratio, eps_low=widened_low,
                                       eps_high=widened_high, beta=beta))
        lower = widened_low.neg_().add_(1.0)     # in place: ε' are not needed again
        upper = widened_high.add_(1.0)
        if isinstance(eps_low, torch.Tensor) or isinstance(eps_high, torch.Tensor):
            lower.masked_fill_(invalid, 1.0)     # whatever tensor ε hold off the mask
            upper.masked_fill_(invalid, 1.0)
    return _clipped_loss(logprobs, valid, invalid, log_ratio, ratio, coef, lower, upper,
                         dual_clip, log_ratio_clamp, scale, own_bounds=True, h_hat=h_hat)
