"""Entropy-based token and response selection used by methods HAPO is compared with.

- :func:`entropy_quantile_mask`: the "forking tokens" of Wang et al., *Beyond the 80/20 Rule:
  High-Entropy Minority Tokens Drive Effective Reinforcement Learning for LLM Reasoning*
  (arXiv 2506.01939); with ``per_sequence=True`` the per-response split of Archer,
  *Stabilizing Knowledge, Promoting Reasoning: Dual-Token Constraints for RLVR*
  (arXiv 2507.08794).
- :func:`sequence_entropy_advantages`: the entropy-driven advantage of EDGE-GRPO,
  *Entropy-Driven GRPO with Guided Error Correction for Advantage Diversity*
  (arXiv 2507.21848).

Data parallel (``group=`` a ``torch.distributed`` process group): the batch statistics cover
every rank's tokens. The quantile is an exact radix selection whose only communication is an
all-reduced 256-bin histogram per round (no per-token value is gathered, no host sync on
accelerators); the EDGE-GRPO batch mean is one all-reduce of two numbers.
"""

from __future__ import annotations

import functools

import torch

from hapo_ops._utils.segments import ACCUMULATE_DTYPE
from hapo_ops._utils.selection import kth_smallest
from hapo_ops._utils.validation import check_float, check_mask, check_same_device, check_tensor
from hapo_ops._utils.collectives import ProcessGroup, all_reduce_sum, check_process_group
from hapo_ops.entropy.signal import nearest_rank


def entropy_quantile_mask(entropy: torch.Tensor, mask: torch.Tensor, *,
                          top_fraction: float = 0.2, per_sequence: bool = False,
                          group: ProcessGroup | None = None) -> torch.Tensor:
    """The valid tokens in the top ``top_fraction`` ρ of entropy: H ≥ the (1 − ρ) quantile.

    t = the k-th smallest H over the valid tokens, k = round((1 − ρ)·(n − 1)) + 1 (nearest
    rank, round half to even; n = number of valid tokens), and the result is
    ``mask & (H >= t)``. Wang et al. (arXiv 2506.01939) train on these "forking tokens"
    only (ρ = 0.2): pass the result as the loss mask and keep the normaliser over all
    tokens (``num_tokens=mask.sum()``), as the paper does.

    Ties: every token whose entropy equals t is kept, so the mask holds at least
    n − k + 1 tokens, more when values repeat at the threshold (all-equal entropies keep
    every valid token).
    Entropies are compared in float32 (the precision of the entropy kernels); NaN entropies
    count as masked. No valid token (an all-masked or empty batch): all False.

    Args:
      entropy: (..., L) per-token entropy H (nats), any floating dtype.
      mask: bool or numeric, the shape of ``entropy``; 1 = valid token.
      top_fraction: ρ in (0, 1]; ρ = 1 keeps every valid token.
      per_sequence: one threshold per response (last dimension) instead of one for the
        whole batch: the per-response entropy split of Archer (arXiv 2507.08794). Each
        response lives on one rank, so ``group`` must then be None.
      group: data-parallel process group; the quantile then covers every rank's valid
        tokens (exact, the single-process result on the concatenated batch).

    Returns:
      bool tensor, the shape of ``entropy``; False outside ``mask``.

    Examples:
      80/20 forking tokens as an extra loss mask, normaliser over all valid tokens:

      >>> import torch
      >>> from hapo_ops import clipped_policy_loss
      >>> entropy = torch.tensor([[0.1, 2.0, 0.3, 1.5], [0.05, 0.2, 3.0, 0.0]])
      >>> mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
      >>> forking = entropy_quantile_mask(entropy, mask, top_fraction=0.3)
      >>> forking
      tensor([[False,  True, False,  True],
              [False, False,  True, False]])
      >>> logp = torch.zeros(2, 4, requires_grad=True)
      >>> out = clipped_policy_loss(logp, torch.zeros(2, 4), torch.tensor([1.0, -1.0]),
      ...                           forking, num_tokens=mask.sum())

      Archer's dual-token clip: a per-response entropy split, then per-token clip bounds
      (wider for the high-entropy "reasoning" tokens, tighter for the "knowledge" ones;
      the numbers are illustrative, and Archer's KL penalty on low-entropy tokens is a
      separate term):

      >>> high = entropy_quantile_mask(entropy, mask, top_fraction=0.2, per_sequence=True)
      >>> eps = torch.where(high, 0.5, 0.2)
      >>> out = clipped_policy_loss(logp, torch.zeros(2, 4), torch.tensor([1.0, -1.0]),
      ...                           mask, eps_low=eps, eps_high=eps)

    References:
      Wang et al., 2025, arXiv 2506.01939 (80/20 forking tokens);
      Wang et al., 2025, arXiv 2507.08794 (Archer, dual-token constraints).
    """
    entropy = check_tensor("entropy", entropy, floating=True, allow_empty=True)
    valid = check_mask("mask", mask, entropy.shape, allow_empty=True)
    check_same_device("mask", valid, "entropy", entropy)
    top_fraction = check_float("top_fraction", top_fraction, min_value=0.0, min_inclusive=False,
                               max_value=1.0)
    if not isinstance(per_sequence, bool):
        raise TypeError(f"per_sequence must be a bool, got {type(per_sequence).__name__}")
    if per_sequence and group is not None:
        raise ValueError("group must be None with per_sequence=True: each response's "
                         "threshold uses only its own tokens")
    check_process_group("group", group)
    quantile = 1.0 - top_fraction
    with torch.no_grad():
        # + 0.0 turns -0.0 into +0.0, so that float comparisons and the radix order agree.
        values = entropy.detach().to(torch.float32) + 0.0
        valid = valid & ~torch.isnan(values)
        if per_sequence:
            return _per_sequence_mask(values, valid, quantile)
        reduce_counts = None if group is None else functools.partial(all_reduce_sum,
                                                                     group=group)
        count = valid.sum(dtype=torch.int64)
        if reduce_counts is not None:
            count = reduce_counts(count)
        k = nearest_rank(count, quantile).clamp_min(1)
        threshold = kth_smallest(values, valid, k, reduce_counts)
        return valid & (values >= threshold) & (count > 0)


def _per_sequence_mask(values: torch.Tensor, valid: torch.Tensor, quantile: float
                       ) -> torch.Tensor:
    """One nearest-rank threshold per row (last dim), by a sort: no loop, no host sync."""
    if values.dim() == 0:
        raise ValueError("entropy must have a token dimension with per_sequence=True, got a "
                         "0-d tensor")
    if values.shape[-1] == 0:
        return valid
    filled = torch.where(valid, values, torch.full_like(values, float("inf")))
    ordered = filled.sort(dim=-1).values
    count = valid.sum(-1, dtype=torch.int64)
    k = nearest_rank(count, quantile).clamp(1, values.shape[-1])
    threshold = ordered.gather(-1, (k - 1).unsqueeze(-1))
    return valid & (values >= threshold) & (count > 0).unsqueeze(-1)


def sequence_entropy_advantages(advantages: torch.Tensor, entropy: torch.Tensor,
                                mask: torch.Tensor, *, max_scale: float | None = None,
                                group: ProcessGroup | None = None) -> torch.Tensor:
    """EDGE-GRPO's entropy-driven advantage: Â_i = A_i · P̄ / P_i.

    P_i = mean of H over the valid tokens of response i; P̄ = the mean of P_i over the
    responses with at least one valid token (of every rank with ``group``). Confident
    (low-entropy) responses get larger advantages, uncertain ones smaller, which spreads
    the advantages of a group whose rewards are all equal after normalisation.

    Differences from the released EDGE-GRPO code, on purpose: the result is detached (the
    released code divides by a P_i that still carries gradient, so the entropy leaks into
    the policy gradient), and P_i averages the valid tokens only (the released code also
    averages the padding positions, so P_i there depends on the padded length).

    Degenerate cases, all finite: a response with P_i = 0 (no valid token, or zero entropy
    everywhere) keeps its advantage (scale 1: no information to rescale by); an empty batch
    gives an empty result. ``max_scale``
    caps P̄ / P_i (the scale is unbounded in the paper; a nearly deterministic response
    gets a huge one).

    Args:
      advantages: (...,) one per response, or (..., L) per token.
      entropy: (..., L) per-token entropy.
      mask: the shape of ``entropy``; 1 = valid token.
      max_scale: optional cap (> 0) on P̄ / P_i.
      group: data-parallel process group; P̄ then averages every rank's responses
        (one all-reduce of two numbers).

    Returns:
      Â, the shape and dtype of ``advantages``; per-token input gives 0 outside ``mask``.

    Examples:
      >>> import torch
      >>> adv = torch.tensor([1.0, -1.0])
      >>> entropy = torch.tensor([[0.2, 0.4, 9.9], [1.0, 1.4, 1.2]])
      >>> mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
      >>> sequence_entropy_advantages(adv, entropy, mask)   # P = (0.3, 1.2), P̄ = 0.75
      tensor([ 2.5000, -0.6250])

    References:
      Zhang et al., 2025, *EDGE-GRPO: Entropy-Driven GRPO with Guided Error Correction for
      Advantage Diversity*, arXiv 2507.21848.
    """
    entropy = check_tensor("entropy", entropy, floating=True, allow_empty=True)
    advantages = check_tensor("advantages", advantages, floating=True, allow_empty=True)
    valid = check_mask("mask", mask, entropy.shape, allow_empty=True)
    check_same_device("mask", valid, "entropy", entropy)
    check_same_device("advantages", advantages, "entropy", entropy)
    if entropy.dim() == 0:
        raise ValueError("entropy must have shape (..., L), got a 0-d tensor")
    per_token = advantages.shape == entropy.shape
    if not per_token and advantages.shape != entropy.shape[:-1]:
        raise ValueError(f"advantages must have shape {tuple(entropy.shape[:-1])} (one per "
                         f"response) or {tuple(entropy.shape)} (per token), got "
                         f"{tuple(advantages.shape)}")
    check_process_group("group", group)
    if max_scale is not None:
        max_scale = check_float("max_scale", max_scale, min_value=0.0, min_inclusive=False)
    with torch.no_grad():
        h = torch.where(valid, entropy.detach().to(ACCUMULATE_DTYPE),
                        torch.zeros((), dtype=ACCUMULATE_DTYPE, device=entropy.device))
        lengths = valid.sum(-1)
        mean_entropy = h.sum(-1) / lengths.clamp_min(1).to(ACCUMULATE_DTYPE)
        has_tokens = lengths > 0
        totals = torch.stack([mean_entropy.sum(), has_tokens.sum().to(ACCUMULATE_DTYPE)])
        totals = all_reduce_sum(totals, group)
        batch_mean = totals[0] / totals[1].clamp_min(1.0)
        positive = mean_entropy > 0
        scale = torch.where(positive, batch_mean / torch.where(positive, mean_entropy, 1.0),
                            torch.ones_like(mean_entropy))
        if max_scale is not None:
            scale = scale.clamp_max(max_scale)
        if not per_token:
            return (advantages.detach().to(ACCUMULATE_DTYPE) * scale).to(advantages.dtype)
        out = advantages.detach().to(ACCUMULATE_DTYPE) * scale.unsqueeze(-1)
        return torch.where(valid, out, torch.zeros_like(out)).to(advantages.dtype)


__all__ = ["entropy_quantile_mask", "sequence_entropy_advantages"]
