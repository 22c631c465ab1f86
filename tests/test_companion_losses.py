"""Clip-Cov, KL-Cov, GSPO and CISPO against plain float64 references written from the papers'
formulas (Clip-Cov / KL-Cov: arXiv 2505.22617 and its official conventions; GSPO: arXiv
2507.18071; CISPO: arXiv 2506.13585), none of which calls the library: aggregation, the
covariance, the candidates and the choice of tokens (Clip-Cov's seeded hash keys and the
token-order tie rule, KL-Cov's top-k) are re-implemented here. Also: selections on the radix
path (compiled) against the eager one, boundaries, bad input, torch.compile, and
data-parallel runs on gloo (one group per world size for the session).

Comparisons are made in float64 with the tolerances of the dtype the loss returns."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from hapo_ops.rl.companion_losses import (cispo_policy_loss, clip_cov_policy_loss,
                                       gspo_policy_loss, kl_cov_policy_loss)
from hapo_ops.rl.losses import AGGREGATION_MODES
import hapo_ops
from distributed_harness import run_ranks

SETTINGS = dict(derandomize=True, deadline=None, max_examples=25)
F64 = torch.float64
LOSSES = {
    "clip_cov": functools.partial(clip_cov_policy_loss, seed=0),
    "kl_cov": kl_cov_policy_loss,
    "gspo": gspo_policy_loss,
    "cispo": cispo_policy_loss,
}


# --------------------------------------------------------------------------- helpers


def assert_elementwise(got, want, atol, rtol):
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    assert not torch.isnan(got).any() and not torch.isnan(want).any()
    bad = (got - want).abs() > atol + rtol * want.abs()
    assert not bad.any(), (got[bad], want[bad])


def tol(dtype):
    return (2e-6, 2e-5) if dtype != F64 else (1e-12, 1e-10)


def make_batch(seed, B, L, dtype=torch.float32, per_token_adv=False, density=0.75, spread=0.4):
    """(logprobs leaf, old, advantages, mask) with NaN/inf garbage at masked positions."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, generator=g, dtype=F64) * 3
    lp = old + torch.randn(B, L, generator=g, dtype=F64) * spread
    adv = torch.randn((B, L) if per_token_adv else (B,), generator=g, dtype=F64)
    mask = torch.rand(B, L, generator=g) < density
    lp, old, adv = lp.to(dtype), old.to(dtype), adv.to(dtype)
    lp[~mask] = float("nan")
    old[~mask] = float("inf")
    if per_token_adv:
        adv[~mask] = float("-inf")
    return lp.requires_grad_(True), old, adv, mask


def ref_inputs(lp, old, adv, mask, clamp=20.0):
    """float64 leaf logp, (lp, old, token advantages, log ratio, ratio) zeroed off the mask."""
    m = mask.bool()
    zero = torch.zeros((), dtype=F64)
    leaf = lp.detach().double().requires_grad_(True)
    lp64 = torch.where(m, leaf, zero)
    old64 = torch.where(m, old.double(), zero)
    a = adv.double()
    a = a if a.shape == m.shape else a[:, None].expand_as(m)
    a = torch.where(m, a, zero)
    log_ratio = (lp64 - old64).clamp(-clamp, clamp)
    return leaf, lp64, old64, a, log_ratio, log_ratio.exp()


def ref_aggregate(per_token, mask, agg):
    """The five aggregation modes from their formulas (float64); no valid token gives 0.

    token-mean Σℓ/Σm; token-sum Σℓ; seq-mean-token-sum Σ_i Σ_t ℓ / #rows with a token;
    seq-mean-token-mean Σ_i (Σ_t ℓ / L_i) / #rows with a token (rows with L_i = 0 add 0);
    seq-mean-token-sum-norm Σℓ / L (the padded length, Dr. GRPO)."""
    m = mask.bool()
    x = torch.where(m, per_token, torch.zeros((), dtype=F64))
    lengths = m.sum(-1)
    n, rows = int(m.sum()), int((lengths > 0).sum())
    if agg == "token-mean":
        return x.sum() / n if n else x.sum()
    if agg == "token-sum":
        return x.sum()
    if agg == "seq-mean-token-sum":
        return x.sum() / rows if rows else x.sum()
    if agg == "seq-mean-token-mean":
        per_row = x.sum(-1) / lengths.clamp_min(1).double()
        return per_row.sum() / rows if rows else per_row.sum()
    assert agg == "seq-mean-token-sum-norm"
    return x.sum() / m.shape[-1]


def ref_cov(a, lp64, m):
    """Centred covariance with means over the valid tokens (float64, detached)."""
    n = m.sum().double().clamp_min(1)
    zero = torch.zeros((), dtype=F64)
    a_bar = torch.where(m, a, zero).sum() / n
    lp_bar = torch.where(m, lp64.detach(), zero).sum() / n
    return (a - a_bar) * (lp64.detach() - lp_bar)


def ref_k3(r, log_ratio, m):
    """approx_kl: mean over valid tokens of (r - 1) - log r."""
    n = int(m.sum())
    k3 = torch.where(m, (r - 1) - log_ratio, torch.zeros((), dtype=F64)).sum()
    return k3 / n if n else k3


def ref_selection_size(n, fraction):
    """max(⌊fraction · n⌋, 1) tokens (0 with no valid token)."""
    return max(math.floor(n * fraction), 1) if n else 0


def ref_ppo(a, r, el, eh):
    return torch.maximum(-a * r, -a * torch.clamp(r, 1 - el, 1 + eh))


def check_against(out, leaf, lp, ref_per_token, mask, agg):
    """per-token values, the aggregated loss and the gradient against the reference, with
    the tolerances of the dtype the loss returns."""
    m = mask.bool()
    atol, rtol = tol(out.per_token.dtype)
    ref_per_token = torch.where(m, ref_per_token, torch.zeros((), dtype=F64))
    assert_elementwise(out.per_token.detach(), ref_per_token.detach(), atol, rtol)
    ref_loss = ref_aggregate(ref_per_token, m, agg)
    assert_elementwise(out.loss.detach(), ref_loss.detach(), atol, rtol)
    (grad,) = torch.autograd.grad(out.loss, lp)
    (ref_grad,) = torch.autograd.grad(ref_loss, leaf, allow_unused=True)
    ref_grad = torch.zeros_like(leaf) if ref_grad is None else ref_grad
    assert torch.isfinite(grad).all()
    atol, rtol = tol(grad.dtype)
    assert_elementwise(grad, ref_grad, atol, rtol)


def check_metrics(out, mask, *, clip_low, clip_high, approx_kl, selected):
    """The scalar outputs against reference values (floats or float64 tensors)."""
    atol, rtol = tol(out.per_token.dtype)
    for got, want in [(out.clip_frac_low, clip_low), (out.clip_frac_high, clip_high),
                      (out.approx_kl, approx_kl), (out.selected_frac, selected)]:
        assert_elementwise(got.detach(), torch.as_tensor(want, dtype=F64), atol, rtol)
    assert float(out.dual_clip_frac) == 0.0                 # none of these has a dual clip


def masked_fraction(flags, m):
    n = int(m.sum())
    return float((flags & m).sum()) / n if n else 0.0


batch_args = dict(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 4), L=st.integers(1, 6),
                  dtype=st.sampled_from([torch.float32, F64]), per_token_adv=st.booleans(),
                  agg=st.sampled_from(AGGREGATION_MODES))


# --------------------------------------------------------------------------- KL-Cov


def ref_kl_cov_choice(cov, m, fraction):
    """The k = max(⌊fraction·n⌋, 1) valid tokens with the largest covariance, compared in
    float32; ties go to the earlier token (row-major order)."""
    cov32 = cov.float()
    chosen = torch.zeros_like(m)
    ranked = sorted((-float(cov32.view(-1)[i]), i) for i in range(m.numel()) if m.view(-1)[i])
    for _, i in ranked[:ref_selection_size(int(m.sum()), fraction)]:
        chosen.view(-1)[i] = True
    return chosen


def ref_kl_cov(lp, old, adv, mask, fraction=2e-4, coef=1.0):
    """ℓ = −A·r, plus β·|log r| on the chosen top-covariance tokens (no ratio clip)."""
    leaf, lp64, old64, a, log_ratio, r = ref_inputs(lp, old, adv, mask)
    m = mask.bool()
    chosen = ref_kl_cov_choice(ref_cov(a, lp64, m), m, fraction)
    per_token = -a * r + torch.where(chosen, coef * log_ratio.abs(), torch.zeros((), dtype=F64))
    return leaf, per_token, chosen, ref_k3(r.detach(), log_ratio.detach(), m)


@settings(**SETTINGS)
@given(**batch_args, fraction=st.sampled_from([2e-4, 0.1, 0.25, 0.5, 1.0]),
       coef=st.sampled_from([0.0, 1.0, 2.5]))
def test_kl_cov_matches_reference(seed, B, L, dtype, per_token_adv, agg, fraction, coef):
    lp, old, adv, mask = make_batch(seed, B, L, dtype, per_token_adv)
    out = kl_cov_policy_loss(lp, old, adv, mask, cov_fraction=fraction, kl_coef=coef, agg=agg)
    leaf, ref_per_token, chosen, k3 = ref_kl_cov(lp, old, adv, mask, fraction, coef)
    check_against(out, leaf, lp, ref_per_token, mask, agg)
    check_metrics(out, mask, clip_low=0.0, clip_high=0.0, approx_kl=k3,
                  selected=masked_fraction(chosen, mask.bool()))


def test_kl_cov_worked_example_ties_and_selection_size():
    lp = torch.tensor([[-0.5, -3.0], [-0.2, -4.0]], requires_grad=True)
    old = torch.tensor([[-0.7, -3.0], [-0.2, -3.5]])
    out = kl_cov_policy_loss(lp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2),
                             cov_fraction=0.25)
    # Cov = (1.425, -1.075, -1.725, 2.075): only (1, 1) is penalised, by |log r| = 0.5.
    want = torch.tensor([[-math.exp(0.2), -1.0], [1.0, math.exp(-0.5) + 0.5]])
    assert torch.allclose(out.per_token, want)
    assert float(out.selected_frac) == 0.25 and float(out.dual_clip_frac) == 0.0
    # Ties: every token has the same covariance (A - 0)(log π + 2) = 1 -> the first k in
    # token order; k = max(⌊fraction · 8⌋, 1).
    lp = torch.tensor([[-1.0, -3.0, -1.0, -3.0]]).repeat(2, 1)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]]).repeat(2, 1)
    mask = torch.ones(2, 4)
    for fraction, k in [(0.1, 1), (0.25, 2), (0.2499, 1), (0.5, 4), (1.0, 8)]:
        out = kl_cov_policy_loss(lp, lp - 0.5, adv, mask, cov_fraction=fraction)
        penalised = out.per_token != -adv * math.exp(0.5)
        assert int(penalised.sum()) == k, fraction
        assert torch.equal(penalised.view(-1), torch.arange(8) < k)   # earliest first
        assert float(out.selected_frac) == k / 8 and float(out.dual_clip_frac) == 0.0
    # Empty batch: no NaN, zero loss.
    out = kl_cov_policy_loss(lp, lp, adv, torch.zeros(2, 4))
    assert float(out.loss.detach()) == 0.0 and float(out.selected_frac) == 0.0


# --------------------------------------------------------------------------- Clip-Cov


def ref_hash_keys(seed, B, L):
    """Clip-Cov's documented seeded keys, in plain Python integers: the 32-bit
    xor-shift-multiply mixer "lowbias32" (C. Wellons) h(x), and
    key = h(h(h(seed ^ 0x9E3779B9) ^ row) ^ column) >> 8, an integer in [0, 2^24)."""
    m32 = 0xFFFFFFFF

    def h(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & m32
        x ^= x >> 15
        x = (x * 0x846CA68B) & m32
        return x ^ (x >> 16)

    base = h((seed & m32) ^ 0x9E3779B9)
    return [[h(h(base ^ row) ^ column) >> 8 for column in range(L)] for row in range(B)]


def ref_clip_cov_parts(lp, old, adv, mask, lb, ub, el, eh):
    """(leaf, PPO per-token loss, Clip-Cov candidates, ratio, log ratio, A) as the paper and
    the official code define them: valid tokens not held by the ratio clip with
    c_lb < Cov < c_ub."""
    leaf, lp64, old64, a, log_ratio, r = ref_inputs(lp, old, adv, mask)
    m = mask.bool()
    unclipped, clipped = -a * r, -a * torch.clamp(r, 1 - el, 1 + eh)
    held = clipped.detach() > unclipped.detach()
    cov = ref_cov(a, lp64, m)
    candidates = m & ~held & (cov > lb) & (cov < ub)
    return leaf, torch.maximum(unclipped, clipped), candidates, r.detach(), log_ratio.detach(), a


def ref_clip_cov_choice(candidates, m, fraction, keys):
    """min(max(⌊fraction·n⌋, 1), #candidates) candidates with the smallest keys; equal keys
    in token order (row-major)."""
    B, L = m.shape
    ranked = sorted((keys[i][t], i * L + t) for i in range(B) for t in range(L)
                    if candidates[i, t])
    chosen = torch.zeros_like(m)
    for _, flat in ranked[:ref_selection_size(int(m.sum()), fraction)]:
        chosen.view(-1)[flat] = True
    return chosen


def ref_clip_cov(lp, old, adv, mask, fraction, bounds, eps, seed):
    """(leaf, per-token loss, chosen, candidates, metrics) of Clip-Cov with seeded keys."""
    leaf, ppo, candidates, r, log_ratio, a = ref_clip_cov_parts(lp, old, adv, mask, *bounds,
                                                                *eps)
    m = mask.bool()
    chosen = ref_clip_cov_choice(candidates, m, fraction, ref_hash_keys(seed, *m.shape))
    per_token = torch.where(chosen, torch.zeros((), dtype=F64), ppo)
    metrics = dict(clip_low=masked_fraction((a < 0) & (r < 1 - eps[0]), m),
                   clip_high=masked_fraction((a > 0) & (r > 1 + eps[1]), m),
                   approx_kl=ref_k3(r, log_ratio, m), selected=masked_fraction(chosen, m))
    return leaf, per_token, chosen, candidates, metrics


@settings(**SETTINGS)
@given(**batch_args, fraction=st.sampled_from([2e-4, 0.2, 0.5, 1.0]),
       bounds=st.sampled_from([(1.0, 5.0), (0.05, 2.0), (-100.0, 100.0), (-1.0, 0.1)]),
       eps=st.sampled_from([(1.0, 1.0), (0.2, 0.28), (0.0, 0.0)]), key_seed=st.integers(0, 99))
def test_clip_cov_matches_reference(seed, B, L, dtype, per_token_adv, agg, fraction, bounds,
                                    eps, key_seed):
    lp, old, adv, mask = make_batch(seed, B, L, dtype, per_token_adv, spread=0.6)
    out = clip_cov_policy_loss(lp, old, adv, mask, cov_fraction=fraction, cov_bounds=bounds,
                               eps_low=eps[0], eps_high=eps[1], seed=key_seed, agg=agg)
    leaf, ref_per_token, chosen, candidates, metrics = ref_clip_cov(
        lp, old, adv, mask, fraction, bounds, eps, key_seed)
    check_against(out, leaf, lp, ref_per_token, mask, agg)
    check_metrics(out, mask, **metrics)
    if fraction == 1.0:
        assert torch.equal(chosen, candidates)               # full selection


def test_clip_cov_generator_choice_properties():
    """``generator=`` keys are drawn, not hashed: the choice is checked by its properties
    (exact count, only candidates, reproducible), and the loss against the reference on the
    chosen set."""
    for trial in range(6):
        lp, old, adv, mask = make_batch(40 + trial, 4, 6, spread=0.6)
        kw = dict(cov_fraction=0.3, cov_bounds=(0.01, 5.0), eps_low=0.2, eps_high=0.28,
                  agg="seq-mean-token-mean")
        out = clip_cov_policy_loss(lp, old, adv, mask,
                                   generator=torch.Generator().manual_seed(trial), **kw)
        again = clip_cov_policy_loss(lp, old, adv, mask,
                                     generator=torch.Generator().manual_seed(trial), **kw)
        assert torch.equal(out.per_token, again.per_token)
        leaf, ppo, candidates, *_ = ref_clip_cov_parts(lp, old, adv, mask, 0.01, 5.0, 0.2, 0.28)
        m = mask.bool()
        chosen = m & (out.per_token.detach() == 0) & (ppo.detach() != 0)
        k = min(ref_selection_size(int(m.sum()), 0.3), int(candidates.sum()))
        assert int(chosen.sum()) == k and not (chosen & ~candidates).any()
        assert math.isclose(float(out.selected_frac), k / int(m.sum()), rel_tol=1e-6)
        check_against(out, leaf, lp, torch.where(chosen, torch.zeros((), dtype=F64), ppo),
                      mask, "seq-mean-token-mean")

def test_clip_cov_skips_tokens_the_ratio_clip_holds():
    # Two responses, A = +1 / -1; every token's covariance is exactly 1.
    lp = torch.tensor([[-1.0, -1.0], [-3.0, -3.0]])
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 2)
    # Row 0 (A > 0) moved up by 0.5: r = e^0.5 > 1 + 0.28: the PPO clip holds it.
    old = lp - torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    kw = dict(cov_fraction=1.0, cov_bounds=(0.5, 2.0), eps_low=0.2, eps_high=0.28, seed=0)
    out = clip_cov_policy_loss(lp, old, adv, mask, **kw)
    assert out.per_token[0].tolist() == pytest.approx([-1.28, -1.28])   # still the clip
    assert out.per_token[1].tolist() == [0.0, 0.0]                      # cut
    assert float(out.selected_frac) == 0.5
    # Wide clip: nothing is held, every token is a candidate and, with fraction 1, cut.
    out = clip_cov_policy_loss(lp, old, adv, mask, **{**kw, "eps_high": 1.0})
    assert out.per_token.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    # Boundary of the clip test: r exactly 1 + eps_high (eps = 0, r = 1) is not held.
    out = clip_cov_policy_loss(lp, lp, adv, mask, **{**kw, "eps_low": 0.0, "eps_high": 0.0})
    assert float(out.selected_frac) == 1.0


def test_clip_cov_bounds_are_strict():
    lp = torch.tensor([[-1.0, -1.0], [-3.0, -3.0]])
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 2)       # Cov = 1 exactly
    for bounds, cut in [((1.0, 5.0), 0.0), ((0.999, 5.0), 1.0), ((0.0, 1.0), 0.0),
                        ((0.0, 1.001), 1.0)]:
        out = clip_cov_policy_loss(lp, lp, adv, mask, cov_fraction=1.0, cov_bounds=bounds,
                                   seed=0)
        assert float(out.selected_frac) == cut, bounds


def test_clip_cov_random_choice_is_seeded_uniform_and_exact():
    B, L = 2, 5
    lp = torch.tensor([[-1.0] * L, [-3.0] * L]).requires_grad_(True)
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(B, L)       # 10 candidates (Cov = 1)
    kw = dict(cov_fraction=0.3, cov_bounds=(0.5, 2.0))           # k = 3
    cut_of = lambda out: out.per_token.detach() == 0             # noqa: E731
    first = cut_of(clip_cov_policy_loss(lp, lp.detach(), adv, mask, seed=5, **kw))
    again = cut_of(clip_cov_policy_loss(lp, lp.detach(), adv, mask, seed=5, **kw))
    assert torch.equal(first, again) and int(first.sum()) == 3
    counts = torch.zeros(B, L)
    for seed in range(300):
        cut = cut_of(clip_cov_policy_loss(lp, lp.detach(), adv, mask, seed=seed, **kw))
        assert int(cut.sum()) == 3
        counts += cut
    assert ((counts / 300 - 0.3).abs() < 0.1).all(), counts       # about uniform
    # The generator path: reproducible for a seeded generator, exact count.
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    a = cut_of(clip_cov_policy_loss(lp, lp.detach(), adv, mask, generator=g1, **kw))
    b = cut_of(clip_cov_policy_loss(lp, lp.detach(), adv, mask, generator=g2, **kw))
    assert torch.equal(a, b) and int(a.sum()) == 3
    # Cut tokens get no gradient; the others the PPO gradient -A * r = -A.
    out = clip_cov_policy_loss(lp, lp.detach(), adv, mask, seed=5, agg="token-sum", **kw)
    (grad,) = torch.autograd.grad(out.loss, lp)
    assert torch.equal(grad, torch.where(first, 0.0, -adv[:, None].expand(B, L)))


def test_clip_cov_empty_selections():
    lp, old, adv, mask = make_batch(1, 3, 4)
    # No valid token.
    out = clip_cov_policy_loss(lp, old, adv, torch.zeros(3, 4), seed=0)
    assert float(out.loss.detach()) == 0.0 and all(torch.isfinite(t).all() for t in out)
    # No candidate (bounds nobody meets): plain PPO.
    out = clip_cov_policy_loss(lp, old, adv, mask, cov_bounds=(1e6, 2e6), seed=0)
    assert float(out.selected_frac) == 0.0


# ------------------------------------------------- selections on the radix path (compiled)


def _selection_batches():
    """Batches of one shape (4, 6) for the radix path: random; every covariance tied (rows
    of constant log π, A = ±1: Cov = 1 at each valid token); few candidates (the log-probs
    near their mean: most |Cov| below the Clip-Cov bound, so k > #candidates); a single
    valid token; no valid token."""
    B, L = 4, 6
    batches = {"random": make_batch(5, B, L, spread=0.6)}
    lp = torch.tensor([-1.0, -3.0, -1.0, -3.0])[:, None].expand(B, L).clone()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    batches["ties"] = (lp.requires_grad_(True), lp.detach() - 0.05, adv,
                       torch.ones(B, L, dtype=torch.bool))
    g = torch.Generator().manual_seed(3)
    lp = -1.0 + 0.01 * torch.randn(B, L, generator=g)
    lp[0, :2] = torch.tensor([-3.0, 1.0])
    batches["few-candidates"] = (lp.requires_grad_(True), lp.detach() - 0.05,
                                 torch.randn(B, generator=g),
                                 torch.ones(B, L, dtype=torch.bool))
    one = torch.zeros(B, L, dtype=torch.bool)
    one[2, 3] = True
    batches["one-token"] = (*make_batch(6, B, L)[:3], one)
    batches["empty"] = (*make_batch(7, B, L)[:3], torch.zeros(B, L, dtype=torch.bool))
    return batches


RADIX_CASES = {
    "clip_cov": (functools.partial(clip_cov_policy_loss, cov_fraction=0.5,
                                   cov_bounds=(0.02, 2.0), eps_low=0.2, eps_high=0.28, seed=17),
                 lambda lp, old, adv, mask: ref_clip_cov(lp, old, adv, mask, 0.5, (0.02, 2.0),
                                                         (0.2, 0.28), 17)[:3]),
    "kl_cov": (functools.partial(kl_cov_policy_loss, cov_fraction=0.5),
               lambda lp, old, adv, mask: ref_kl_cov(lp, old, adv, mask, 0.5)[:3]),
}


@pytest.mark.parametrize("name", list(RADIX_CASES))
def test_selection_on_the_radix_path_matches_eager_and_reference(name):
    """Compiled, the selection takes the radix k-th value (as on an accelerator) instead of
    the CPU's host ``kthvalue``: same chosen tokens, values and gradients as eager and as
    the reference, with ties, k above the number of candidates, one or no valid token."""
    fn, ref = RADIX_CASES[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)
    k_above_candidates = False
    for batch_name, (lp, old, adv, mask) in _selection_batches().items():
        eager_lp = lp.detach().clone().requires_grad_(True)
        eager = fn(eager_lp, old, adv, mask)
        got = compiled(lp, old, adv, mask)
        assert torch.equal(got.per_token.detach(), eager.per_token.detach()), batch_name
        assert torch.equal(got.selected_frac, eager.selected_frac), batch_name
        assert torch.equal(got.loss.detach(), eager.loss.detach()), batch_name
        (grad,) = torch.autograd.grad(got.loss, lp, retain_graph=True)
        (eager_grad,) = torch.autograd.grad(eager.loss, eager_lp)
        assert torch.equal(grad, eager_grad), batch_name
        leaf, ref_per_token, chosen = ref(lp, old, adv, mask)
        check_against(got, leaf, lp, ref_per_token, mask, "token-mean")
        assert math.isclose(float(got.selected_frac), masked_fraction(chosen, mask.bool()),
                            abs_tol=1e-7), batch_name
        if name == "clip_cov":
            candidates = ref_clip_cov_parts(lp, old, adv, mask, 0.02, 2.0, 0.2, 0.28)[2]
            n = int(mask.sum())
            k_above_candidates |= n > 0 and ref_selection_size(n, 0.5) > int(candidates.sum())
    assert k_above_candidates or name == "kl_cov"


# --------------------------------------------------------------------------- GSPO


def ref_gspo_sequence(lp, old, adv, mask, el, eh):
    """Sequence-level GSPO: s_i = exp(mean log r) with gradient through s_i."""
    leaf, lp64, old64, a, log_ratio, _ = ref_inputs(lp, old, adv, mask)
    m = mask.bool()
    n = m.sum(-1, keepdim=True).clamp_min(1).double()
    s = torch.exp(torch.where(m, log_ratio, 0.0).sum(-1, keepdim=True) / n).expand_as(a)
    return leaf, ref_ppo(a, s, el, eh)


def ref_gspo_token(lp, old, adv, mask, el, eh):
    """GSPO-token: s_it = sg(s_i) · π_t / sg(π_t); metrics: the clip holds A < 0 below
    1 − ε_low and A > 0 above 1 + ε_high; approx_kl the token-level k3."""
    leaf, lp64, old64, a, log_ratio, r = ref_inputs(lp, old, adv, mask)
    m = mask.bool()
    n = m.sum(-1, keepdim=True).clamp_min(1).double()
    s = torch.exp(torch.where(m, log_ratio, 0.0).sum(-1, keepdim=True).detach() / n)
    s_t = s * torch.exp(lp64 - lp64.detach())
    s = s.expand_as(a)
    metrics = dict(clip_low=masked_fraction((a < 0) & (s < 1 - el), m),
                   clip_high=masked_fraction((a > 0) & (s > 1 + eh), m),
                   approx_kl=ref_k3(r.detach(), log_ratio.detach(), m), selected=0.0)
    return leaf, ref_ppo(a, s_t, el, eh), metrics


@settings(**SETTINGS)
@given(**batch_args, eps=st.sampled_from([(3e-4, 4e-4), (0.0, 0.0), (0.05, 0.1)]))
def test_gspo_matches_reference(seed, B, L, dtype, per_token_adv, agg, eps):
    lp, old, adv, mask = make_batch(seed, B, L, dtype, per_token_adv, spread=0.05)
    out = gspo_policy_loss(lp, old, adv, mask, eps_low=eps[0], eps_high=eps[1], agg=agg)
    leaf, ref, metrics = ref_gspo_token(lp, old, adv, mask, *eps)
    check_against(out, leaf, lp, ref, mask, agg)
    check_metrics(out, mask, **metrics)
    if not per_token_adv:           # one A per response: the sequence-level objective itself
        lp2 = lp.detach().clone().requires_grad_(True)
        out = gspo_policy_loss(lp2, old, adv, mask, eps_low=eps[0], eps_high=eps[1],
                               agg="seq-mean-token-mean")
        leaf, ref = ref_gspo_sequence(lp2, old, adv, mask, *eps)
        check_against(out, leaf, lp2, ref, mask, "seq-mean-token-mean")


def test_gspo_clip_boundaries_and_defaults():
    old = torch.zeros(1, 2, dtype=F64)
    adv, mask = torch.tensor([1.0], dtype=F64), torch.ones(1, 2)
    # s = 1 exactly with eps = 0: not clipped, gradient flows.
    lp = old.clone().requires_grad_(True)
    out = gspo_policy_loss(lp, old, adv, mask, eps_low=0.0, eps_high=0.0)
    assert float(out.clip_frac_high) == 0.0
    (grad,) = torch.autograd.grad(out.loss, lp)
    assert torch.allclose(grad, torch.full((1, 2), -0.5, dtype=F64))
    # Defaults 3e-4 / 4e-4: mean log ratio 3.5e-4 is inside, 4.5e-4 outside (held, no grad).
    for shift, held in [(3.5e-4, False), (4.5e-4, True)]:
        lp = (old + torch.tensor([[shift - 1e-4, shift + 1e-4]], dtype=F64)).requires_grad_(True)
        out = gspo_policy_loss(lp, old, adv, mask)
        assert float(out.clip_frac_high) == (1.0 if held else 0.0)
        (grad,) = torch.autograd.grad(out.loss, lp)
        assert bool((grad == 0).all()) == held
    # A < 0 below 1 - eps_low: held by the lower clip.
    lp = (old - 1e-3).requires_grad_(True)
    out = gspo_policy_loss(lp, old, -adv, mask)
    assert float(out.clip_frac_low) == 1.0 and float(out.clip_frac_high) == 0.0


# --------------------------------------------------------------------------- CISPO


def ref_cispo(lp, old, adv, mask, el, eh):
    """ℓ = −sg(clip(r, 1 − ε_low, 1 + ε_high))·A·log π (no lower bound with ε_low None);
    the clip fractions count clipped weights whatever the sign of A."""
    leaf, lp64, old64, a, log_ratio, r = ref_inputs(lp, old, adv, mask)
    m = mask.bool()
    r = r.detach()
    w = r.clamp(max=1 + eh)
    if el is not None:
        w = w.clamp(min=1 - el)
    metrics = dict(clip_low=0.0 if el is None else masked_fraction(r < 1 - el, m),
                   clip_high=masked_fraction(r > 1 + eh, m),
                   approx_kl=ref_k3(r, log_ratio.detach(), m), selected=0.0)
    return leaf, -w * a * lp64, metrics


@settings(**SETTINGS)
@given(**batch_args, eps=st.sampled_from([(None, 0.28), (0.2, 0.28), (None, 0.0), (0.0, 4.0)]))
def test_cispo_matches_reference(seed, B, L, dtype, per_token_adv, agg, eps):
    lp, old, adv, mask = make_batch(seed, B, L, dtype, per_token_adv, spread=0.6)
    out = cispo_policy_loss(lp, old, adv, mask, eps_low=eps[0], eps_high=eps[1], agg=agg)
    leaf, ref, metrics = ref_cispo(lp, old, adv, mask, *eps)
    check_against(out, leaf, lp, ref, mask, agg)
    check_metrics(out, mask, **metrics)


def test_cispo_keeps_gradients_of_clipped_tokens_and_boundaries():
    lp = torch.tensor([[-0.5, -2.0, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0, -1.0]])
    out = cispo_policy_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 3), agg="token-sum")
    (grad,) = torch.autograd.grad(out.loss, lp)
    # Weights: e^0.5 capped at 1.28; exactly 1 (r = 1 + eps_high with eps 0 is not clipped
    # below); e^-2 (no lower bound by default). Clipped tokens keep their gradient.
    assert torch.allclose(grad, -torch.tensor([[1.28, 1.0, math.exp(-2.0)]]))
    assert math.isclose(float(out.clip_frac_high), 1 / 3, rel_tol=1e-6)
    assert float(out.clip_frac_low) == 0.0
    out = cispo_policy_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 3), eps_low=0.2,
                            eps_high=0.0)
    assert math.isclose(float(out.clip_frac_low), 1 / 3, rel_tol=1e-6)
    assert math.isclose(float(out.clip_frac_high), 1 / 3, rel_tol=1e-6)   # r = 1: not above


# --------------------------------------------------------------------------- all four


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("agg", AGGREGATION_MODES)
def test_masked_garbage_never_leaks_and_empty_batch_is_finite(name, agg):
    lp, old, adv, mask = make_batch(11, 4, 5, per_token_adv=True)
    out = LOSSES[name](lp, old, adv, mask, agg=agg)
    assert all(torch.isfinite(t).all() for t in out)
    (grad,) = torch.autograd.grad(out.loss, lp)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    out = LOSSES[name](lp, old, adv, torch.zeros(4, 5), agg=agg)
    assert float(out.loss.detach()) == 0.0 and all(torch.isfinite(t).all() for t in out)


@pytest.mark.parametrize("name", ["gspo", "cispo"])
def test_compile_fullgraph(name):
    torch._dynamo.reset()
    lp, old, adv, mask = make_batch(2, 3, 5)
    compiled = torch.compile(LOSSES[name], fullgraph=True, backend="aot_eager")
    got, want = compiled(lp, old, adv, mask), LOSSES[name](lp, old, adv, mask)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, equal_nan=False)


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_compile_with_graph_breaks(name):
    """Not fullgraph: on CPU without a process group the selection takes the exact k-th value
    with ``kthvalue`` after reading k on the host (free there), a deliberate graph break.
    The accelerator path (radix selection) has no host read."""
    torch._dynamo.reset()
    lp, old, adv, mask = make_batch(2, 3, 5)
    kw = dict(cov_fraction=0.3, cov_bounds=(-10.0, 10.0)) if name == "clip_cov" else \
        dict(cov_fraction=0.3)
    fn = functools.partial(LOSSES[name], **kw)
    got, want = torch.compile(fn, backend="aot_eager")(lp, old, adv, mask), fn(lp, old, adv, mask)
    for a, b in zip(got, want):
        assert torch.allclose(a, b)


def test_bad_input_names_the_argument():
    lp, old, adv, mask = make_batch(0, 2, 3)
    lp = lp.detach()
    for name, fn in LOSSES.items():
        with pytest.raises(ValueError, match="agg"):
            fn(lp, old, adv, mask, agg="mean")
        with pytest.raises(ValueError, match="mask"):
            fn(lp, old, adv, torch.ones(3, 2))
        with pytest.raises(TypeError, match="weights"):
            fn(lp, old, adv, mask, weights=torch.ones(2, 3, dtype=torch.int64))
        with pytest.raises(ValueError, match="weights"):
            fn(lp, old, adv, mask, weights=torch.ones(4))
        with pytest.raises(ValueError, match="log_ratio_clamp"):
            fn(lp, old, adv, mask, log_ratio_clamp=0.0)
        with pytest.raises(TypeError, match="old_logprobs"):
            fn(lp, old.double(), adv, mask)
    for fn in (LOSSES["clip_cov"], LOSSES["kl_cov"]):
        for value in (0.0, 1.5, float("nan")):
            with pytest.raises(ValueError, match="cov_fraction"):
                fn(lp, old, adv, mask, cov_fraction=value)
        with pytest.raises(TypeError, match="group"):
            fn(lp, old, adv, mask, group="world")
    with pytest.raises(ValueError, match="cov_bounds"):
        clip_cov_policy_loss(lp, old, adv, mask, cov_bounds=(5.0, 1.0), seed=0)
    with pytest.raises(TypeError, match="cov_bounds"):
        clip_cov_policy_loss(lp, old, adv, mask, cov_bounds=1.0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        clip_cov_policy_loss(lp, old, adv, mask)
    with pytest.raises(ValueError, match="seed"):
        clip_cov_policy_loss(lp, old, adv, mask, seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="seed"):
        clip_cov_policy_loss(lp, old, adv, mask, seed=1.5)
    with pytest.raises(TypeError, match="generator"):
        clip_cov_policy_loss(lp, old, adv, mask, generator=3)
    with pytest.raises(ValueError, match="eps_low"):
        clip_cov_policy_loss(lp, old, adv, mask, eps_low=-0.1, seed=0)
    with pytest.raises(ValueError, match="kl_coef"):
        kl_cov_policy_loss(lp, old, adv, mask, kl_coef=-1.0)
    with pytest.raises(ValueError, match="eps_high"):
        gspo_policy_loss(lp, old, adv, mask, eps_high=-1e-4)
    with pytest.raises(ValueError, match="eps_low"):
        cispo_policy_loss(lp, old, adv, mask, eps_low=-0.2)
    with pytest.raises(ValueError, match="advantages"):
        cispo_policy_loss(lp, old, torch.ones(5), mask)


# --------------------------------------------------------------------------- data parallel


def _dp_inputs(world):
    """Uneven shards. Row 1 (rank 0) and the first row of rank 1 are equal, with the largest
    covariances, all tied: KL-Cov's ties span ranks 0 and 1. World 3: the last rank has no
    valid token."""
    g = torch.Generator().manual_seed(70 + world)
    rows = {2: [4, 3], 3: [3, 4, 2]}[world]
    total, length = sum(rows), 5
    old = -torch.rand(total, length, generator=g) * 3
    lp = old + torch.randn(total, length, generator=g) * 0.3
    adv = torch.randn(total, generator=g)
    mask = torch.rand(total, length, generator=g) < 0.8
    if world == 3:
        mask[-rows[-1]:] = False
    for r in (1, rows[0]):
        lp[r], old[r], adv[r], mask[r] = -0.05, -0.15, 3.0, True
    return rows, lp, old, adv, mask


DP_CASES = {
    "clip_cov": functools.partial(clip_cov_policy_loss, cov_fraction=0.2,
                                  cov_bounds=(0.02, 50.0), seed=123),
    "clip_cov-all": functools.partial(clip_cov_policy_loss, cov_fraction=1.0,
                                      cov_bounds=(-50.0, 50.0), eps_low=0.2, eps_high=0.28,
                                      seed=4),
    "kl_cov": functools.partial(kl_cov_policy_loss, cov_fraction=0.15),
    "kl_cov-first": functools.partial(kl_cov_policy_loss, cov_fraction=0.01),
    "kl_cov-ties": functools.partial(kl_cov_policy_loss, cov_fraction=0.25),
}


def _dp_worker(rank, world):
    group = dist.group.WORLD
    rows, lp, old, adv, mask = _dp_inputs(world)
    lo, hi = sum(rows[:rank]), sum(rows[:rank + 1])
    num_tokens = int(mask.sum())
    out = {}
    for name, fn in DP_CASES.items():
        mine = lp[lo:hi].clone().requires_grad_(True)
        res = fn(mine, old[lo:hi], adv[lo:hi], mask[lo:hi], group=group, num_tokens=num_tokens)
        res.loss.backward()
        out[name] = (res.per_token.detach(), res.loss.detach(), mine.grad)
    # Keys from per-rank generators: still one global choice of exactly k tokens.
    g = torch.Generator().manual_seed(1000 + rank)
    res = clip_cov_policy_loss(lp[lo:hi], old[lo:hi], adv[lo:hi], mask[lo:hi],
                               cov_fraction=0.2, cov_bounds=(0.02, 50.0), generator=g,
                               group=group)
    out["generator-cut"] = int(((res.per_token == 0) & mask[lo:hi]).sum())
    out["empty"] = clip_cov_policy_loss(lp[lo:hi], old[lo:hi], adv[lo:hi],
                                        torch.zeros_like(mask[lo:hi]), seed=0, group=group).loss
    return out


def _empty_rank_inputs():
    """World 2's inputs, with an entropy per token, for ranks 0 and 2 of a world of 3."""
    rows, lp, old, adv, mask = _dp_inputs(2)
    entropy = torch.exp(-4.0 * torch.rand(lp.shape, generator=torch.Generator().manual_seed(5)))
    return rows, lp, old, adv, mask, entropy


def _empty_rank_worker(rank, world, empty_shape):
    """Rank 1 of 3 holds an empty batch, (0, L) or (B, 0), and still joins every
    collective; ranks 0 and 2 hold world 2's shards."""
    group = dist.group.WORLD
    rows, *tensors = _empty_rank_inputs()
    if rank == 1:
        lp, old, entropy = (torch.zeros(empty_shape) for _ in range(3))
        adv, mask = torch.zeros(empty_shape[:1]), torch.ones(empty_shape, dtype=torch.bool)
    else:
        mine = slice(0, rows[0]) if rank == 0 else slice(rows[0], None)
        lp, old, adv, mask, entropy = (t[mine] for t in tensors)
    num_tokens = hapo_ops.global_token_count(mask, group)
    stats = hapo_ops.entropy_stats(entropy, mask, group=group)
    cases = dict(DP_CASES, hapo=lambda lp, old, adv, mask, group, **kw:
                 hapo_ops.hapo_policy_loss(lp, old, adv, entropy, mask, stats=stats, **kw))
    out = {}
    for name, fn in cases.items():
        leaf = lp.clone().requires_grad_(True)
        res = fn(leaf, old, adv, mask, group=group, num_tokens=num_tokens)
        res.loss.backward()
        out[name] = (res.per_token.detach(), res.loss.detach(), leaf.grad,
                     [float(getattr(res, f)) for f in res._fields[2:-1]])
    return out


@pytest.mark.parametrize("empty_shape", [(0, 5), (2, 0)])
def test_a_rank_with_an_empty_batch_joins_the_collectives(empty_shape):
    """The reference: one process on the concatenated batch, where the empty rank's (B, 0)
    rows count as B fully masked rows (Clip-Cov's keys number rows globally)."""
    rows, lp, old, adv, mask, entropy = _empty_rank_inputs()
    results = run_ranks(_empty_rank_worker, 3, empty_shape)
    gap = empty_shape[0]
    mine = torch.cat([torch.ones(rows[0], dtype=torch.bool), torch.zeros(gap, dtype=torch.bool),
                      torch.ones(rows[1], dtype=torch.bool)])

    def padded(t):
        return torch.cat([t[:rows[0]], t.new_zeros((gap,) + t.shape[1:]), t[rows[0]:]])

    for name in list(DP_CASES) + ["hapo"]:
        full = padded(lp).requires_grad_(True)
        if name == "hapo":
            want = hapo_ops.hapo_policy_loss(full, padded(old), padded(adv), padded(entropy),
                                             padded(mask))
        else:
            want = DP_CASES[name](full, padded(old), padded(adv), padded(mask))
        want.loss.backward()
        per_token, loss, grad, metrics = results[1][name]
        assert per_token.shape == empty_shape and grad.shape == empty_shape, name
        assert not grad.any() and float(loss) == 0.0, name
        assert all(math.isfinite(m) for m in metrics), name
        got = torch.cat([results[0][name][0], results[2][name][0]])
        assert_elementwise(got, want.per_token.detach()[mine], *tol(got.dtype))
        total = results[0][name][1] + results[2][name][1]
        assert_elementwise(total, want.loss.detach(), 1e-6, 1e-5)
        assert_elementwise(torch.cat([results[0][name][2], results[2][name][2]]),
                           full.grad[mine], 1e-7, 1e-6)


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def data_parallel(request):
    world = request.param
    return _dp_inputs(world), run_ranks(_dp_worker, world)


@pytest.mark.parametrize("name", list(DP_CASES))
def test_data_parallel_matches_single_process(data_parallel, name):
    (rows, lp, old, adv, mask), results = data_parallel
    full = lp.clone().requires_grad_(True)
    want = DP_CASES[name](full, old, adv, mask)
    want.loss.backward()
    per_token = torch.cat([res[name][0] for res in results])
    assert torch.equal(per_token, want.per_token.detach())          # the same selection
    total = sum(res[name][1] for res in results)
    assert_elementwise(total, want.loss.detach(), 1e-6, 1e-5)
    assert_elementwise(torch.cat([res[name][2] for res in results]), full.grad, 1e-7, 1e-6)
    kw = DP_CASES[name].keywords
    if name.startswith("clip_cov"):
        eps = (kw.get("eps_low", 1.0), kw.get("eps_high", 1.0))
        _, ref, *_ = ref_clip_cov(lp, old, adv, mask, kw["cov_fraction"], kw["cov_bounds"], eps,
                                  kw["seed"])
    else:
        _, ref, *_ = ref_kl_cov(lp, old, adv, mask, kw["cov_fraction"])
        penalised = per_token != -adv[:, None] * (lp - old).exp()
        assert int((penalised & mask).sum()) == ref_selection_size(int(mask.sum()),
                                                                   kw["cov_fraction"])
    atol, rtol = tol(per_token.dtype)
    assert_elementwise(per_token, torch.where(mask, ref, torch.zeros((), dtype=F64)).detach(),
                       atol, rtol)


def test_data_parallel_generator_keys_and_empty(data_parallel):
    (rows, lp, old, adv, mask), results = data_parallel
    m = mask.bool()
    _, ppo, candidates, *_ = ref_clip_cov_parts(lp, old, adv, mask, 0.02, 50.0, 1.0, 1.0)
    k = min(ref_selection_size(int(m.sum()), 0.2), int(candidates.sum()))
    assert sum(res["generator-cut"] for res in results) == k
    assert all(float(res["empty"]) == 0.0 for res in results)
