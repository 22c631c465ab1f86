"""Advantage estimators: GRPO, HAPO's token-level group average, and the entropy- and
ratio-aware redistribution (HAPO, arXiv 2509.16591, §3.2-3.3).

All ops are vectorised segment reductions over ``group_ids`` (no Python loop over rows or
groups, no host sync); group statistics are accumulated in float64.

Data parallel (``group=`` a process group): group ids are global, and a group's responses
may sit on different ranks. Each rank all-gathers the per-row values (group id, R_i, L_i:
O(B) numbers, nothing per token), computes the advantages of the whole batch exactly as a
single process would on the concatenation (rank order), and keeps its own rows.
"""

from __future__ import annotations

import torch

from hapo_ops._utils.segments import ACCUMULATE_DTYPE, compact_group_index, segment_sum_gather
from hapo_ops._utils.validation import (ScalarOrTensor, check_float, check_float_or_tensor,
                                  check_mask, check_same_device, check_same_shape,
                                  check_tensor, check_variant)
from hapo_ops._utils.collectives import all_gather_rows, check_process_group


def _global_rows(group, group_ids: torch.Tensor, columns: list[torch.Tensor]
                 ) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """(group ids, float64 per-row columns) of every rank's rows in rank order, and the
    offset of this rank's rows; unchanged without a group. One all-gather of (B, 1 + C)
    float64 (the int64 ids travel bit-cast, exactly), after one of the row counts (the only
    host read: the receive sizes)."""
    if group is None:
        return group_ids, columns, 0
    ids = group_ids.to(torch.int64).view(torch.float64)
    packed, offset = all_gather_rows(torch.stack([ids, *columns], dim=-1), group)
    return packed[:, 0].contiguous().view(torch.int64), list(packed[:, 1:].unbind(-1)), offset


def _check_rewards_and_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> None:
    """An empty batch (B = 0) is accepted and gives an empty result; with a process group
    such a rank still takes part in the collectives."""
    check_tensor("rewards", rewards, floating=True, allow_empty=True)
    check_tensor("group_ids", group_ids, integer=True, allow_empty=True)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (B,), got {tuple(rewards.shape)}")
    check_same_shape("group_ids", group_ids, "rewards", rewards)
    check_same_device("group_ids", group_ids, "rewards", rewards)


def _check_response_mask(mask: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    valid = check_mask("mask", mask, allow_empty=True)
    if valid.dim() != 2 or valid.shape[0] != rewards.shape[0]:
        raise ValueError(f"mask must have shape (B, L) with B = {rewards.shape[0]}, "
                         f"got {tuple(valid.shape)}")
    check_same_device("mask", valid, "rewards", rewards)
    return valid


def _output_dtype(rewards: torch.Tensor) -> torch.dtype:
    return torch.promote_types(rewards.dtype, torch.float32)


def _grpo_per_sequence(rewards: torch.Tensor, slots: torch.Tensor, normalize_std: bool,
                       eps: float) -> torch.Tensor:
    """A_i = (R_i - mean_g) / (std_g + eps), unbiased std; a group of one: mean 0, std 1."""
    r = rewards.to(ACCUMULATE_DTYPE)
    count = segment_sum_gather(torch.ones_like(r), slots)
    mean = segment_sum_gather(r, slots) / count
    singleton = count < 2
    mean = torch.where(singleton, torch.zeros_like(mean), mean)
    centered = r - mean
    if not normalize_std:
        return centered
    var = segment_sum_gather((r - mean) ** 2, slots) / (count - 1).clamp_min(1)
    std = torch.where(singleton, torch.ones_like(var), var.sqrt())
    return centered / (std + eps)


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor,
                    mask: torch.Tensor | None = None, *, normalize_std: bool = True,
                    eps: float = 1e-6, group=None) -> torch.Tensor:
    """GRPO advantages: A_i = (R_i - mean_g R) / (std_g R + eps).

    Source: DeepSeekMath (arXiv 2402.03300), §4.1. std is unbiased over the sequences of the
    group; a group of one gets mean 0 and std 1. ``normalize_std=False`` gives R_i - mean_g.
    Returns (B,), or with ``mask`` (B, L) the value broadcast over each row and zero outside
    the mask. ``group``: a process group; groups then pool rows over all ranks (module
    docstring) and each rank gets its own rows.
    """
    _check_rewards_and_groups(rewards, group_ids)
    eps = check_float("eps", eps, min_value=0.0, min_inclusive=False)
    valid = None if mask is None else _check_response_mask(mask, rewards)
    group = check_process_group("group", group)          # every check before the collectives
    ids, (r,), offset = _global_rows(group, group_ids, [rewards.to(ACCUMULATE_DTYPE)])
    advantages = _grpo_per_sequence(r, compact_group_index(ids), normalize_std, eps)
    advantages = advantages[offset:offset + rewards.shape[0]].to(_output_dtype(rewards))
    if valid is None:
        return advantages
    return torch.where(valid, advantages[:, None], torch.zeros((), dtype=advantages.dtype,
                                                                device=advantages.device))


def token_level_group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor,
                                 mask: torch.Tensor, *, normalize_std: bool = True,
                                 eps: float = 1e-6, fallback_threshold: float | None = 5.0,
                                 variant: str = "paper", group=None) -> torch.Tensor:
    """HAPO's token-level group average (TLGA): each token, not each sequence, is a sample.

    With token counts L_i = Σ_t m_it:
      μ_g = Σ_i L_i R_i / Σ_i L_i,   σ_g = sqrt(Σ_i L_i (R_i - μ_g)² / Σ_i L_i),
      A_i = (R_i - μ_g) / (σ_g + eps)    (R_i - μ_g with ``normalize_std=False``),
    broadcast over the valid tokens of row i, zero elsewhere. So Σ_i L_i A_i = 0 per group:
    the advantages of a group sum to zero over its tokens, the samples a token-mean loss
    averages. Group statistics are accumulated in float64 (exact with large reward
    offsets).

    Fallback: a group where some valid |A_i| ≥ ``fallback_threshold`` (a lone long outlier)
    takes the GRPO advantages instead (``grpo_advantages``, same ``normalize_std`` and
    ``eps``). ``variant="released"`` also counts each padding position of the group's rows
    in that test, with the value (0 - μ_g)/(σ_g + eps), as the public reference code does.
    A group with no valid token gets 0, so does a group whose rewards are all equal. An
    empty batch (B = 0) gives an empty result.

    Args:
      rewards: (B,) float, one scalar reward per response, any floating dtype.
      group_ids: (B,) integer, the prompt group of each response: any integers in any order
        (equal ids form a group; rows of a group need not be contiguous).
      mask: (B, L) bool or numeric, 1 = valid (generated) token of response i.
      normalize_std: divide by σ_g + eps (default), or return R_i - μ_g.
      eps: > 0, added to σ_g (a group of equal rewards gets exactly 0, never 0/0).
      fallback_threshold: > 0, or None to disable the GRPO fallback.
      variant: "paper" (default) or "released" (the public code's fallback test above).
      group: a ``torch.distributed`` process group; groups then pool rows over all ranks
        (module docstring; "padding" is judged against each rank's own padded length L),
        and each rank gets its own rows.

    Returns:
      (B, L) per-token advantages in the promoted dtype of ``rewards`` (at least float32),
      A_i on the valid tokens of row i, 0 elsewhere; detached from ``rewards``.

    Examples:
      >>> import torch
      >>> rewards = torch.tensor([1.0, 0.0, 1.0])
      >>> group_ids = torch.tensor([0, 0, 1])         # rows 0 and 1 answer the same prompt
      >>> mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
      >>> token_level_group_advantages(rewards, group_ids, mask)
      tensor([[ 1.4142,  1.4142,  0.0000,  0.0000],
              [-0.7071, -0.7071, -0.7071, -0.7071],
              [ 0.0000,  0.0000,  0.0000,  0.0000]])

      Group 0: μ = (2·1 + 4·0)/6 = 1/3, σ = √2/3, so 2 tokens × 1.4142 balance 4 tokens ×
      (−0.7071); group 1 has one response: μ = R, A = 0.

    References:
      HAPO, arXiv 2509.16591, §3.2 (token-level group average and its fallback);
      DeepSeekMath, arXiv 2402.03300, §4.1 (GRPO, the fallback).
    """
    _check_rewards_and_groups(rewards, group_ids)
    valid = _check_response_mask(mask, rewards)
    eps = check_float("eps", eps, min_value=0.0, min_inclusive=False)
    if fallback_threshold is not None:
        fallback_threshold = check_float("fallback_threshold", fallback_threshold,
                                         min_value=0.0, min_inclusive=False)
    variant = check_variant(variant)
    group = check_process_group("group", group)          # every check before the collectives

    lengths = valid.sum(-1).to(ACCUMULATE_DTYPE)
    padded = (lengths < valid.shape[-1]).to(ACCUMULATE_DTYPE)
    ids, (r, lengths, padded), offset = _global_rows(
        group, group_ids, [rewards.to(ACCUMULATE_DTYPE), lengths, padded])
    advantages = _token_level_per_sequence(r, compact_group_index(ids), lengths, padded > 0,
                                           normalize_std, eps, fallback_threshold, variant)
    advantages = advantages[offset:offset + rewards.shape[0]].to(_output_dtype(rewards))
    return torch.where(valid, advantages[:, None], torch.zeros((), dtype=advantages.dtype,
                                                                device=advantages.device))


def _token_level_per_sequence(r: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
                              has_padding: torch.Tensor, normalize_std: bool, eps: float,
                              fallback_threshold: float | None, variant: str) -> torch.Tensor:
    """Per-row TLGA advantage (float64, (B,)) from rewards, slots, token counts L_i and
    whether each row has padding (formulas: :func:`token_level_group_advantages`)."""
    group_tokens = segment_sum_gather(lengths, slots)
    has_tokens = group_tokens > 0
    safe_tokens = group_tokens.clamp_min(1.0)
    mean = segment_sum_gather(lengths * r, slots) / safe_tokens
    scale = torch.ones_like(mean)
    if normalize_std:
        var = segment_sum_gather(lengths * (r - mean) ** 2, slots) / safe_tokens
        scale = var.sqrt() + eps
    advantages = (r - mean) / scale

    if fallback_threshold is not None:
        triggers = (lengths > 0) & (advantages.abs() >= fallback_threshold)
        if variant == "released":
            triggers |= has_padding & ((0.0 - mean) / scale).abs().ge(fallback_threshold)
        falls_back = segment_sum_gather(triggers.to(ACCUMULATE_DTYPE), slots) > 0
        grpo = _grpo_per_sequence(r, slots, normalize_std, eps)
        advantages = torch.where(falls_back, grpo, advantages)

    return torch.where(has_tokens, advantages, torch.zeros_like(advantages))


def check_beta(value: object) -> float:
    """β, the redistribution strength: a float in [0, 1]. With ĥ ∈ [-1, 1] the scale
    1 + β·ĥ then lies in [0, 2]: it never flips the sign of an advantage (β = 3 would turn
    A = 1 at ĥ = -1 into -2)."""
    return check_float("beta", value, min_value=0.0, max_value=1.0)


def redistribute_advantages(advantages: torch.Tensor, h_hat: torch.Tensor, ratio: torch.Tensor,
                            *, eps_low: ScalarOrTensor, eps_high: ScalarOrTensor,
                            beta: float = 1.0) -> torch.Tensor:
    """Entropy- and ratio-aware advantage redistribution (HAPO §3.3).

    Neutral zone N = (1 - ε_low/2, 1 + ε_high/2) (open), per token:
      A' = A·(1 + β·ĥ)  where (ĥ > 0 and r ∉ N) or (ĥ ≤ 0 and r ∈ N),   A' = A elsewhere.
    High-entropy tokens whose ratio already moved get more credit; low-entropy tokens that
    barely moved get less. No gradient flows through the result.

    β must lie in [0, 1] and ĥ in [−1, 1] (``normalized_entropy``'s range), so that the
    scale 1 + β·ĥ never flips the sign of A (a ``ValueError`` names ``beta`` otherwise). A CPU ``h_hat`` with a finite or infinite value
    outside that range raises a ``ValueError``; on accelerators (and while
    ``torch.compile`` traces) it is not checked, since that would be a host sync. NaN
    (e.g. garbage at padding positions) is not rejected: it passes through where the
    scale applies.
    """
    advantages = check_tensor("advantages", advantages, floating=True, allow_empty=True)
    h_hat = check_tensor("h_hat", h_hat, floating=True, allow_empty=True)
    ratio = check_tensor("ratio", ratio, floating=True, allow_empty=True)
    check_same_shape("h_hat", h_hat, "advantages", advantages)
    check_same_shape("ratio", ratio, "advantages", advantages)
    check_same_device("h_hat", h_hat, "advantages", advantages)
    check_same_device("ratio", ratio, "advantages", advantages)
    eps_low = check_float_or_tensor("eps_low", eps_low, advantages)
    eps_high = check_float_or_tensor("eps_high", eps_high, advantages)
    beta = check_beta(beta)
    if h_hat.device.type == "cpu" and not torch.compiler.is_compiling():
        outside = h_hat.detach()[h_hat.detach().abs() > 1.0]
        if outside.numel():
            raise ValueError(f"h_hat must lie in [-1, 1] (the range of normalized_entropy); "
                             f"{outside.numel()} value(s) outside, e.g. {float(outside[0])}")
    with torch.no_grad():
        scale = redistribution_scale(h_hat.detach(), ratio.detach(), eps_low=eps_low,
                                     eps_high=eps_high, beta=beta)
        return advantages.detach() * scale


def redistribution_scale(h_hat: torch.Tensor, ratio: torch.Tensor, *,
                         eps_low: ScalarOrTensor, eps_high: ScalarOrTensor, beta: float,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """The factor s of HAPO's advantage redistribution (§3.3), A' = A·s, per token:

      N = (1 - ε_low/2, 1 + ε_high/2)   (open: a ratio on an edge is outside N),
      s = 1 + β·ĥ  where (ĥ > 0 and r ∉ N) or (ĥ ≤ 0 and r ∈ N),   s = 1 elsewhere.

    The one home of this formula: ``redistribute_advantages`` multiplies by it, and
    ``hapo_policy_loss`` multiplies its loss coefficient by it in place. A' = A·s is exactly
    ``where(scaled, A·(1 + β·ĥ), A)``, since A·1 = A.

    No argument checking and no gradient (call under ``torch.no_grad``); validated inputs
    are the caller's job (``redistribute_advantages`` checks them).

    Args:
      h_hat: (...) float normalized entropy ĥ in [-1, 1].
      ratio: (...) float importance ratio r, same shape as ``h_hat``.
      eps_low, eps_high: ε_low, ε_high ≥ 0, floats or tensors broadcastable to ``ratio``
        (e.g. the per-token adaptive bounds of ``adaptive_clip_bounds``).
      beta: β in [0, 1], the redistribution strength (not checked here: ``check_beta``).
      out: optional tensor the result is written into (may be ``h_hat`` itself, which then
        is overwritten); default a new tensor.

    Returns:
      s, shape and dtype of ``h_hat`` (``out`` when given).

    Example:
      >>> import torch
      >>> redistribution_scale(torch.tensor([0.5, 0.5, -0.5]), torch.tensor([1.0, 1.2, 1.0]),
      ...                      eps_low=0.2, eps_high=0.2, beta=1.0)
      tensor([1.0000, 1.5000, 0.5000])

    References:
      HAPO, arXiv 2509.16591, §3.3.
    """
    # ε/2 is exact, so each edge is 1 ∓ ε/2 rounded once, tensor ε or float
    neutral_low = (eps_low.mul(-0.5).add_(1.0) if isinstance(eps_low, torch.Tensor)
                   else 1.0 - eps_low / 2)
    neutral_high = (eps_high.mul(0.5).add_(1.0) if isinstance(eps_high, torch.Tensor)
                    else 1.0 + eps_high / 2)
    kept = (ratio > neutral_low) & (ratio < neutral_high)
    kept = kept == (h_hat > 0)                 # s = 1 where (ĥ > 0) == (r ∈ N)
    if out is None:
        out = torch.empty_like(h_hat)
    return torch.mul(h_hat, beta, out=out).add_(1.0).masked_fill_(kept, 1.0)
