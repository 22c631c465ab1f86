"""Policy losses of the methods HAPO is compared with: Clip-Cov, KL-Cov, GSPO and CISPO.

Each returns :class:`hapo_ops.rl.losses.PolicyLossOutput` and aggregates like
:func:`hapo_ops.rl.losses.clipped_policy_loss` (``agg``, ``num_tokens``, ``num_sequences``,
``normalizer``); masked positions give ℓ = 0 and zero gradient whatever they hold. Every
loss also takes ``weights`` (per token (..., L) or per response (...,), detached; e.g. from
``rollout_correction``) that multiply the per-token loss after clipping and selection, and
computes in float32 whatever the input dtype (float64 stays float64).

Clip-Cov and KL-Cov (Cui et al., *The Entropy Mechanism of Reinforcement Learning for
Reasoning Language Models*, arXiv 2505.22617) act on the few tokens whose centred
covariance Cov_t = (A_t − Ā)·(log π_t − mean log π) is large. With ``group=`` (data
parallel) the means, the token count and the selection cover every rank's tokens, exactly
as one process would on the concatenated batch: means are one all-reduce of three numbers;
selections are radix selections with all-reduced 256-bin histograms plus one all-gather of
an int per rank for the tie order. No per-token value is gathered; no host sync on
accelerators. Every argument is checked before the first collective, so that a bad one
raises before any communication.

Selection rules (both exact in count):
  - ordering keys are compared in float32 (covariances rounded to float32);
  - ties at the selection threshold are taken in token order: rank order, then row-major
    position within a rank (the order of the concatenated batch).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch

from hapo_ops._utils.segments import ACCUMULATE_DTYPE
from hapo_ops._utils.selection import kth_smallest
from hapo_ops._utils.validation import ScalarOrTensor, check_choice, check_float
from hapo_ops._utils.collectives import (ProcessGroup, all_reduce_sum, check_process_group,
                                  exclusive_prefix_sum)
from hapo_ops.rl.losses import (AGGREGATION_MODES, PolicyLossOutput, aggregate_loss,
                                check_clip_eps, check_denominators, check_loss_weights,
                                check_policy_inputs,
                                clamped_log_ratio, clipped_surrogate, masked_advantages,
                                loss_dtype, masked_mean, ratio_and_advantages)

_M32 = 0xFFFFFFFF
_KEY_BITS = 24          # random keys are integers below 2^24: exact in float32


# ------------------------------------------------------------------------------ helpers


def _finish(per_token: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor | None,
            agg: str, num_tokens, num_sequences, normalizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per_token): weights applied, masked positions zeroed, then aggregated."""
    if weights is not None:  # 0 off the mask: NaN weights there must not reach the gradient
        per_token = per_token * torch.where(valid, weights.to(per_token.dtype), 0.0)
    per_token = torch.where(valid, per_token, torch.zeros((), dtype=per_token.dtype,
                                                          device=per_token.device))
    loss = aggregate_loss(per_token, valid, agg, num_tokens=num_tokens,
                          num_sequences=num_sequences, normalizer=normalizer)
    return loss, per_token


def _check_common(log_ratio_clamp: float, agg: str, group: object) -> tuple[float, ProcessGroup | None]:
    log_ratio_clamp = check_float("log_ratio_clamp", log_ratio_clamp, min_value=0.0,
                                  min_inclusive=False)
    check_choice("agg", agg, AGGREGATION_MODES)
    return log_ratio_clamp, check_process_group("group", group)


class _CovarianceInputs(NamedTuple):
    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    valid: torch.Tensor
    weights: torch.Tensor | None
    group: ProcessGroup | None
    cov_fraction: float
    log_ratio_clamp: float


def _check_covariance_inputs(logprobs, old_logprobs, advantages, mask, cov_fraction,
                             log_ratio_clamp, agg, group, weights, num_tokens, num_sequences,
                             normalizer) -> _CovarianceInputs:
    """The arguments Clip-Cov and KL-Cov share, checked (given denominators included):
    each loss checks its own too before ``_ratio_and_covariance``'s first collective, so
    that a bad argument raises on every rank and none is left waiting in an all-reduce."""
    logprobs, old_logprobs, advantages, valid = check_policy_inputs(
        logprobs, old_logprobs, advantages, mask)
    cov_fraction = check_float("cov_fraction", cov_fraction, min_value=0.0,
                               min_inclusive=False, max_value=1.0)
    log_ratio_clamp, group = _check_common(log_ratio_clamp, agg, group)
    weights = check_loss_weights(weights, logprobs)
    check_denominators(torch.empty((), dtype=loss_dtype(logprobs.dtype),
                                   device=logprobs.device),
                       num_tokens=num_tokens, num_sequences=num_sequences,
                       normalizer=normalizer)
    return _CovarianceInputs(logprobs, old_logprobs, advantages, valid, weights, group,
                             cov_fraction, log_ratio_clamp)


def _ratio_and_covariance(inputs: _CovarianceInputs
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor]:
    """(log r, r, masked advantages, Cov_t, global valid-token count): the ratio (float32
    math for 16-bit inputs) and each token's centred covariance; the first collective."""
    log_ratio, ratio, adv = ratio_and_advantages(inputs.logprobs, inputs.old_logprobs,
                                                 inputs.advantages, inputs.valid,
                                                 inputs.log_ratio_clamp)
    with torch.no_grad():
        cov, count = _centred_covariance(adv, inputs.logprobs, inputs.valid, inputs.group)
    return log_ratio, ratio, adv, cov, count


def _k3(ratio: torch.Tensor, log_ratio: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens of (r − 1) − log r (k3 estimate of KL(π_old ‖ π), ≥ 0)."""
    return masked_mean((ratio - 1.0) - log_ratio, valid)


def _centred_covariance(advantages: torch.Tensor, logprobs: torch.Tensor, valid: torch.Tensor,
                        group: ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Cov_t = (A_t − Ā)(log π_t − mean log π) in float64, global valid-token count).

    Means over the valid tokens of every rank (one all-reduce of [ΣA, Σlog π, n]).
    """
    zero = torch.zeros((), dtype=ACCUMULATE_DTYPE, device=logprobs.device)
    adv = torch.where(valid, advantages.detach().to(ACCUMULATE_DTYPE), zero)
    logp = torch.where(valid, logprobs.detach().to(ACCUMULATE_DTYPE), zero)
    totals = all_reduce_sum(torch.stack([adv.sum(), logp.sum(), valid.sum().to(ACCUMULATE_DTYPE)]),
                            group)
    count = totals[2].clamp_min(1.0)
    return (adv - totals[0] / count) * (logp - totals[1] / count), totals[2]


def _selection_size(count: torch.Tensor, fraction: float) -> torch.Tensor:
    """max(⌊fraction · n⌋, 1) as an int64 0-d tensor (n a float64 token count)."""
    return torch.floor(count * fraction).to(torch.int64).clamp_min(1)


def _select_smallest(values: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor,
                     group: ProcessGroup | None) -> torch.Tensor:
    """Exactly min(k, #candidates) candidates with the smallest ``values`` (float32, no NaN
    or -0.0 among candidates), over every rank of ``group``; ties at the threshold are
    taken in token order (rank, then flattened position). Returns a bool mask like values."""
    reduce_counts = None if group is None else functools.partial(all_reduce_sum, group=group)
    flat, chosen = values.reshape(-1), candidates.reshape(-1)
    count = chosen.sum(dtype=torch.int64)
    if reduce_counts is not None:
        count = reduce_counts(count)
    k = torch.minimum(k, count)
    threshold = kth_smallest(flat, chosen, k.clamp_min(1), reduce_counts)
    below = chosen & (flat < threshold)
    tied = chosen & (flat == threshold)
    n_below = below.sum(dtype=torch.int64)
    if reduce_counts is not None:
        n_below = reduce_counts(n_below)
    before = exclusive_prefix_sum(tied.sum(dtype=torch.int64), group, device=flat.device)
    order = tied.to(torch.int64).cumsum(0) + before        # 1-based rank among the ties
    take = tied & (order <= k - n_below)
    return ((below | take) & (k > 0)).reshape(values.shape)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x · constant) mod 2^32 for x in [0, 2^32), without int64 overflow."""
    high = ((x >> 16) * constant) & _M32
    return ((high << 16) + (x & 0xFFFF) * constant) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mixer (xor-shift-multiply; constants of C. Wellons'
    "lowbias32")."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _random_keys(shape: torch.Size, device: torch.device, seed: int | torch.Tensor | None,
                 generator: torch.Generator | None, group: ProcessGroup | None
                 ) -> torch.Tensor:
    """Uniform integer keys in [0, 2^24) as float32, one per token.

    ``seed``: a counter-based hash of (seed, global row, column): no state, and the same key
    for a token whichever rank holds it (global row = rows on the ranks below + local row),
    so the choice equals the single-process one on the concatenated batch.
    ``generator``: ``torch.randint`` draws on this rank's tokens (the choice is still one
    global choice, but depends on how the batch is split).
    """
    if generator is not None:
        keys = torch.randint(0, 1 << _KEY_BITS, tuple(shape), generator=generator,
                             device=device)
        return keys.to(torch.float32)
    length = shape[-1] if len(shape) else 1
    rows = 1
    for size in shape[:-1]:
        rows *= size
    first_row = exclusive_prefix_sum(rows, group, device=device)
    row = (first_row + torch.arange(rows, device=device)).unsqueeze(-1) & _M32
    column = torch.arange(length, device=device)
    seed = torch.as_tensor(seed, dtype=torch.int64, device=device) & _M32
    hashed = _mix32(_mix32(_mix32(seed ^ 0x9E3779B9) ^ row) ^ column)
    return (hashed >> (32 - _KEY_BITS)).to(torch.float32).reshape(shape)


def _check_randomness(seed: object, generator: object) -> None:
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        if seed is not None:
            raise ValueError("pass either seed or generator, not both")
        return
    if seed is None:
        raise ValueError("seed must be given (an int, e.g. the training step, so that each "
                         "step draws a new random subset), or pass generator=")
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.dtype == torch.bool:
            raise TypeError(f"seed must be an int or a one-element integer tensor, got "
                            f"dtype {seed.dtype} and shape {tuple(seed.shape)}")
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")


def _check_bounds(bounds: object) -> tuple[float, float]:
    if not isinstance(bounds, Sequence) or isinstance(bounds, str) or len(bounds) != 2:
        raise TypeError(f"cov_bounds must be a pair (lower, upper), got {bounds!r}")
    lower = check_float("cov_bounds[0]", bounds[0])
    upper = check_float("cov_bounds[1]", bounds[1])
    if not lower < upper:
        raise ValueError(f"cov_bounds must satisfy lower < upper, got {bounds!r}")
    return lower, upper


# ------------------------------------------------------------------------------ Clip-Cov


def clip_cov_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                         advantages: torch.Tensor, mask: torch.Tensor, *,
                         cov_fraction: float = 2e-4,
                         cov_bounds: tuple[float, float] = (1.0, 5.0),
                         eps_low: ScalarOrTensor = 1.0, eps_high: ScalarOrTensor = 1.0,
                         seed: int | torch.Tensor | None = None,
                         generator: torch.Generator | None = None,
                         weights: torch.Tensor | None = None, log_ratio_clamp: float = 20.0,
                         agg: str = "token-mean", num_tokens: float | torch.Tensor | None = None,
                         num_sequences: float | torch.Tensor | None = None,
                         normalizer: float | torch.Tensor | None = None,
                         group: ProcessGroup | None = None) -> PolicyLossOutput:
    """Clip-Cov: the PPO clipped loss, with the gradient of a few high-covariance tokens cut.

    r = exp(clamp(log π − log π_old, ±log_ratio_clamp)), ℓ = max(−A·r, −A·clip(r, 1 − ε_low,
    1 + ε_high)) as in ``clipped_policy_loss``. Cov_t = (A_t − Ā)(log π_t − mean log π)
    (means over the valid tokens; log π detached). Candidates: valid tokens that the ratio
    clip does not already hold (−A·clip(r) > −A·r fails) with c_lb < Cov_t < c_ub (both
    strict). A uniformly random subset of min(max(⌊``cov_fraction``·n⌋, 1), #candidates)
    candidates (n = valid tokens) gets ℓ = 0: no gradient, no loss.

    Random choice: each token gets a random key and the candidates with the smallest keys
    are taken (ties in token order). With ``seed`` the keys hash (seed, global row, column):
    reproducible, stateless, and independent of how the batch is split over ranks; vary the
    seed every step (e.g. the step number), or the same positions are favoured every step.
    ``generator`` draws the keys instead (each rank should then seed its own).

    Defaults: those of the official code and run scripts: ``cov_fraction`` 2e-4
    (``clip_cov_ratio``), ``cov_bounds`` (1, 5) (``clip_cov_lb``, ``clip_cov_ub``), and
    ε_low = ε_high = 1 (the scripts' ratio clip: Clip-Cov takes over its role). Pass e.g.
    ε = 0.2 / 0.28 to keep a tight PPO clip too.

    Output: ``clip_frac_low`` / ``clip_frac_high`` as in ``clipped_policy_loss``;
    ``selected_frac`` the fraction of valid tokens cut by the covariance rule;
    ``dual_clip_frac`` = 0 (this loss has no dual clip); ``approx_kl`` the k3 estimate. The
    selection covers the tokens of this call (of every rank with ``group``), as the official
    code does per micro-batch.

    Args:
      logprobs, old_logprobs: (..., L) log-probs of the sampled tokens under the current
        and the behaviour policy.
      advantages: (..., L) or one per response (...,).
      mask: 1 = valid token.
      cov_fraction: in (0, 1], the fraction of valid tokens to cut.
      cov_bounds: (c_lb, c_ub), c_lb < c_ub.
      eps_low, eps_high: ratio clip ε (≥ 0; ε_low ≤ 1, the default 1 being no lower
        clip), floats or per-token tensors.
      seed / generator: randomness of the choice (exactly one). With ``seed`` the key of
        the token at (global row, column) is
        ``h(h(h(seed ^ 0x9E3779B9) ^ row) ^ column) >> 8``, h the 32-bit "lowbias32" mixer,
        so the choice does not depend on how the batch is split; with ``generator``, keys
        are drawn from it.
      weights: optional weights on ℓ, per token or per response (detached).
      log_ratio_clamp: bound on |log r| before exp.
      agg, num_tokens, num_sequences, normalizer: see ``aggregate_loss``.
      group: data-parallel process group (means, n and the choice over all ranks).

    Examples:
      >>> import torch
      >>> logp = torch.tensor([[-0.5, -3.0, -1.0], [-0.2, -4.0, -2.0]], requires_grad=True)
      >>> adv = torch.tensor([2.0, -2.0])
      >>> mask = torch.ones(2, 3)
      >>> out = clip_cov_policy_loss(logp, logp.detach(), adv, mask, cov_fraction=0.2,
      ...                            cov_bounds=(0.5, 5.0), seed=7)
      >>> out.selected_frac       # 3 candidates with 0.5 < Cov < 5; ⌊0.2·6⌋ = 1 is cut
      tensor(0.1667)

    References:
      Cui et al., 2025, *The Entropy Mechanism of Reinforcement Learning for Reasoning
      Language Models*, arXiv 2505.22617.
    """
    inputs = _check_covariance_inputs(logprobs, old_logprobs, advantages, mask, cov_fraction,
                                      log_ratio_clamp, agg, group, weights, num_tokens,
                                      num_sequences, normalizer)
    logprobs, valid, weights, group = inputs.logprobs, inputs.valid, inputs.weights, inputs.group
    eps_low = check_clip_eps("eps_low", eps_low, logprobs, lower=True, allow_one=True)
    eps_high = check_clip_eps("eps_high", eps_high, logprobs, lower=False)
    cov_lower, cov_upper = _check_bounds(cov_bounds)
    _check_randomness(seed, generator)
    log_ratio, ratio, adv, cov, count = _ratio_and_covariance(inputs)   # collectives from here

    zero = torch.zeros((), dtype=ratio.dtype, device=logprobs.device)
    lower, upper = 1.0 - eps_low, 1.0 + eps_high
    per_token, unclipped, clipped = clipped_surrogate(ratio, adv, eps_low, eps_high)
    with torch.no_grad():
        held_by_clip = clipped.detach() > unclipped.detach()
        candidates = valid & ~held_by_clip & (cov > cov_lower) & (cov < cov_upper)
        keys = _random_keys(logprobs.shape, logprobs.device, seed, generator, group)
        cut = _select_smallest(keys, candidates, _selection_size(count, inputs.cov_fraction),
                              group)
    per_token = torch.where(cut, zero, per_token)
    loss, per_token = _finish(per_token, valid, weights, agg, num_tokens, num_sequences,
                              normalizer)
    with torch.no_grad():
        r = ratio.detach()
        clip_frac_low = masked_mean(((adv < 0) & (r < lower)).to(r.dtype), valid)
        clip_frac_high = masked_mean(((adv > 0) & (r > upper)).to(r.dtype), valid)
        cut_frac = masked_mean(cut.to(r.dtype), valid)
        approx_kl = _k3(r, log_ratio.detach(), valid)
    return PolicyLossOutput(loss, per_token, clip_frac_low, clip_frac_high, approx_kl,
                            torch.zeros_like(cut_frac), cut_frac, torch.zeros_like(per_token))


# ------------------------------------------------------------------------------ KL-Cov


def kl_cov_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                       advantages: torch.Tensor, mask: torch.Tensor, *,
                       cov_fraction: float = 2e-4, kl_coef: float = 1.0,
                       weights: torch.Tensor | None = None, log_ratio_clamp: float = 20.0,
                       agg: str = "token-mean", num_tokens: float | torch.Tensor | None = None,
                       num_sequences: float | torch.Tensor | None = None,
                       normalizer: float | torch.Tensor | None = None,
                       group: ProcessGroup | None = None) -> PolicyLossOutput:
    """KL-Cov: the unclipped policy-gradient loss, plus a KL penalty on the top-covariance
    tokens.

    r = exp(clamp(log π − log π_old, ±log_ratio_clamp)); ℓ = −A·r for every valid token (no
    ratio clip), and ℓ = −A·r + β·|log π − log π_old| on the k = max(⌊``cov_fraction``·n⌋, 1)
    valid tokens with the largest Cov_t = (A_t − Ā)(log π_t − mean log π) (n = valid
    tokens, means over valid tokens, log π detached). The penalty is |log r|, the
    first-order KL surrogate of the official code (not a squared or k3 term).

    Exactly min(k, n) tokens are penalised: covariances are ranked in float32 and ties at
    the threshold go to the earlier tokens (rank order, then position). NaN covariances are
    never selected.

    Defaults: those of the official code: ``cov_fraction`` 2e-4 (``kl_cov_ratio``) and
    β = ``kl_coef`` 1 (``ppo_kl_coef``).

    Output: ``clip_frac_low`` = ``clip_frac_high`` = 0 (no clip); ``selected_frac`` holds
    the fraction of valid tokens penalised, ``dual_clip_frac`` = 0; ``approx_kl`` the k3
    estimate.

    Args:
      logprobs, old_logprobs: (..., L) log-probs of the sampled tokens.
      advantages: (..., L) or one per response (...,).
      mask: 1 = valid token.
      cov_fraction: in (0, 1].
      kl_coef: β ≥ 0.
      weights: optional weights on ℓ, per token or per response (detached).
      log_ratio_clamp: bound on |log r| (the ratio and the penalty).
      agg, num_tokens, num_sequences, normalizer: see ``aggregate_loss``.
      group: data-parallel process group (means, n and the top-k over all ranks).

    Examples:
      >>> import torch
      >>> logp = torch.tensor([[-0.5, -3.0], [-0.2, -4.0]], requires_grad=True)
      >>> old = torch.tensor([[-0.7, -3.0], [-0.2, -3.5]])
      >>> out = kl_cov_policy_loss(logp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2),
      ...                          cov_fraction=0.25)
      >>> out.per_token        # Cov = (1.43, -1.08, -1.73, 2.08): (1, 1) gets + |-0.5|
      tensor([[-1.2214, -1.0000],
              [ 1.0000,  1.1065]], grad_fn=<WhereBackward0>)

    References:
      Cui et al., 2025, *The Entropy Mechanism of Reinforcement Learning for Reasoning
      Language Models*, arXiv 2505.22617.
    """
    inputs = _check_covariance_inputs(logprobs, old_logprobs, advantages, mask, cov_fraction,
                                      log_ratio_clamp, agg, group, weights, num_tokens,
                                      num_sequences, normalizer)
    valid, weights, group = inputs.valid, inputs.weights, inputs.group
    kl_coef = check_float("kl_coef", kl_coef, min_value=0.0)
    log_ratio, ratio, adv, cov, count = _ratio_and_covariance(inputs)   # collectives from here

    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    with torch.no_grad():
        # Largest covariance first: the smallest of -Cov (+ 0.0 turns -0.0 into +0.0).
        order = -cov.to(torch.float32) + 0.0
        candidates = valid & ~torch.isnan(order)
        penalised = _select_smallest(order, candidates,
                                     _selection_size(count, inputs.cov_fraction), group)
    per_token = -adv * ratio + torch.where(penalised, kl_coef * log_ratio.abs(), zero)
    loss, per_token = _finish(per_token, valid, weights, agg, num_tokens, num_sequences,
                              normalizer)
    with torch.no_grad():
        r = ratio.detach()
        none = torch.zeros((), dtype=r.dtype, device=r.device)
        penalised_frac = masked_mean(penalised.to(r.dtype), valid)
        approx_kl = _k3(r, log_ratio.detach(), valid)
    return PolicyLossOutput(loss, per_token, none, none.clone(), approx_kl, none.clone(),
                            penalised_frac, torch.zeros_like(per_token))


# ------------------------------------------------------------------------------ GSPO


def gspo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                     advantages: torch.Tensor, mask: torch.Tensor, *,
                     eps_low: ScalarOrTensor = 3e-4, eps_high: ScalarOrTensor = 4e-4,
                     weights: torch.Tensor | None = None, log_ratio_clamp: float = 20.0,
                     agg: str = "seq-mean-token-mean",
                     num_tokens: float | torch.Tensor | None = None,
                     num_sequences: float | torch.Tensor | None = None,
                     normalizer: float | torch.Tensor | None = None) -> PolicyLossOutput:
    """GSPO: the clipped loss on the sequence-level (length-normalised) ratio.

    s_i = exp(mean over the valid tokens of response i of clamp(log π − log π_old,
    ±log_ratio_clamp)), the geometric mean of the token ratios. In the GSPO-token form
    s_{i,t} = sg(s_i) · π_t / sg(π_t) (value s_i, gradient s_i·∇log π_t) and
    ℓ_t = max(−A_t·s_{i,t}, −A_t·clip(s_{i,t}, 1 − ε_low, 1 + ε_high)). With one advantage
    per response and ``agg="seq-mean-token-mean"`` (the default: the paper's objective
    averages responses) value and gradient equal sequence-level GSPO; per-token advantages
    give GSPO-token.

    Defaults: ε_low = 3e-4, ε_high = 4e-4, the paper's ranges (sequence ratios stay much
    closer to 1 than token ratios).

    Output: ``clip_frac_low`` / ``clip_frac_high`` count valid tokens whose loss the clip
    holds (A < 0, s < 1 − ε_low / A > 0, s > 1 + ε_high); ``dual_clip_frac`` = ``selected_frac`` = 0;
    ``approx_kl`` the token-level k3 estimate.

    Examples:
      >>> import torch
      >>> old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.3, 0.0]])
      >>> logp = (old + torch.tensor([[1e-4, 3e-4, 0.0], [-1e-3, 0.0, 5.0]])).requires_grad_()
      >>> out = gspo_policy_loss(logp, old, torch.tensor([1.0, 1.0]),
      ...                        torch.tensor([[1, 1, 1], [1, 1, 0]]))
      >>> out.clip_frac_high, out.clip_frac_low      # s_0 = e^(1.3e-4): inside the band
      (tensor(0.), tensor(0.))

    References:
      Zheng et al., 2025, *Group Sequence Policy Optimization*, arXiv 2507.18071.
    """
    logprobs, old_logprobs, advantages, valid = check_policy_inputs(
        logprobs, old_logprobs, advantages, mask)
    eps_low = check_clip_eps("eps_low", eps_low, logprobs, lower=True)
    eps_high = check_clip_eps("eps_high", eps_high, logprobs, lower=False)
    log_ratio_clamp, _ = _check_common(log_ratio_clamp, agg, None)
    weights = check_loss_weights(weights, logprobs)
    if logprobs.dim() == 0:
        raise ValueError("logprobs must have shape (..., L), got a 0-d tensor")

    dtype = loss_dtype(logprobs.dtype)      # float32 math for 16-bit inputs
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    log_ratio = clamped_log_ratio(logprobs, old_logprobs, valid, log_ratio_clamp)
    lengths = valid.sum(-1, keepdim=True).clamp_min(1).to(dtype)
    sequence_log_ratio = log_ratio.sum(-1, keepdim=True).detach() / lengths
    logp = torch.where(valid, logprobs.to(dtype), zero)
    # Value s_i exactly (logp - sg(logp) is 0), gradient s_i · ∇log π_t.
    ratio = torch.exp((logp - logp.detach()) + sequence_log_ratio)
    adv = masked_advantages(advantages, valid, dtype)
    lower, upper = 1.0 - eps_low, 1.0 + eps_high
    per_token, _, _ = clipped_surrogate(ratio, adv, eps_low, eps_high)
    loss, per_token = _finish(per_token, valid, weights, agg, num_tokens, num_sequences,
                              normalizer)
    with torch.no_grad():
        s = ratio.detach()
        clip_frac_low = masked_mean(((adv < 0) & (s < lower)).to(s.dtype), valid)
        clip_frac_high = masked_mean(((adv > 0) & (s > upper)).to(s.dtype), valid)
        approx_kl = _k3(log_ratio.detach().exp(), log_ratio.detach(), valid)
    return PolicyLossOutput(loss, per_token, clip_frac_low, clip_frac_high, approx_kl,
                            torch.zeros_like(approx_kl), torch.zeros_like(approx_kl),
                            torch.zeros_like(per_token))


# ------------------------------------------------------------------------------ CISPO


def cispo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                      advantages: torch.Tensor, mask: torch.Tensor, *,
                      eps_low: ScalarOrTensor | None = None, eps_high: ScalarOrTensor = 0.28,
                      weights: torch.Tensor | None = None, log_ratio_clamp: float = 20.0,
                      agg: str = "token-mean", num_tokens: float | torch.Tensor | None = None,
                      num_sequences: float | torch.Tensor | None = None,
                      normalizer: float | torch.Tensor | None = None) -> PolicyLossOutput:
    """CISPO: REINFORCE with a clipped, stop-gradient importance weight.

    r = exp(clamp(log π − log π_old, ±log_ratio_clamp)), r̂ = clip(r, 1 − ε_low, 1 + ε_high),
    ℓ = −sg(r̂)·A·log π. Unlike the PPO clip, no token loses its gradient: a clipped weight
    only caps the token's step size (∇ℓ = −r̂·A·∇log π). The value of ℓ is not a surrogate
    of the return (it contains log π); only its gradient matters.

    Defaults: ε_low = None, no lower bound on the weight, as MiniMax-M1 trains ("we did not
    impose a lower bound"); ε_high = 0.28: the paper tunes ε_high without reporting a
    value, and 0.28 is the clip-higher bound of DAPO that ``clipped_policy_loss`` also
    uses. ``agg="token-mean"`` is the paper's normalisation (1 / Σ_i |o_i|).

    Output: ``clip_frac_low`` / ``clip_frac_high``: fraction of valid tokens whose weight
    is clipped (r < 1 − ε_low / r > 1 + ε_high, whatever the sign of A);
    ``dual_clip_frac`` = ``selected_frac`` = 0; ``approx_kl`` the k3 estimate.

    Examples:
      >>> import torch
      >>> logp = torch.tensor([[-0.5, -2.0]], requires_grad=True)
      >>> old = torch.tensor([[-1.0, -2.0]])
      >>> out = cispo_policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2))
      >>> out.per_token     # weights (1.28, 1): r = e^0.5 capped at 1 + 0.28
      tensor([[0.6400, 2.0000]], grad_fn=<WhereBackward0>)

    References:
      MiniMax, 2025, *MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
      Attention*, arXiv 2506.13585, §3.1.
    """
    logprobs, old_logprobs, advantages, valid = check_policy_inputs(
        logprobs, old_logprobs, advantages, mask)
    if eps_low is not None:
        eps_low = check_clip_eps("eps_low", eps_low, logprobs, lower=True)
    eps_high = check_clip_eps("eps_high", eps_high, logprobs, lower=False)
    log_ratio_clamp, _ = _check_common(log_ratio_clamp, agg, None)
    weights = check_loss_weights(weights, logprobs)

    dtype = loss_dtype(logprobs.dtype)      # float32 math for 16-bit inputs
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    with torch.no_grad():
        log_ratio = clamped_log_ratio(logprobs.detach(), old_logprobs.detach(), valid,
                                      log_ratio_clamp)
        ratio = log_ratio.exp()
        upper = 1.0 + eps_high
        weight = torch.minimum(ratio, torch.as_tensor(upper, dtype=ratio.dtype,
                                                      device=ratio.device))
        lower = None if eps_low is None else 1.0 - eps_low
        if lower is not None:
            weight = torch.maximum(weight, torch.as_tensor(lower, dtype=ratio.dtype,
                                                           device=ratio.device))
    adv = masked_advantages(advantages, valid, dtype)
    per_token = -weight * adv * torch.where(valid, logprobs.to(dtype), zero)
    loss, per_token = _finish(per_token, valid, weights, agg, num_tokens, num_sequences,
                              normalizer)
    with torch.no_grad():
        clip_frac_high = masked_mean((ratio > upper).to(ratio.dtype), valid)
        clip_frac_low = (torch.zeros_like(clip_frac_high) if lower is None
                         else masked_mean((ratio < lower).to(ratio.dtype), valid))
        approx_kl = _k3(ratio, log_ratio, valid)
    return PolicyLossOutput(loss, per_token, clip_frac_low, clip_frac_high, approx_kl,
                            torch.zeros_like(approx_kl), torch.zeros_like(approx_kl),
                            torch.zeros_like(per_token))


__all__ = ["clip_cov_policy_loss", "cispo_policy_loss", "gspo_policy_loss",
           "kl_cov_policy_loss"]
