"""rollout_correction (TIS / MIS-IcePop) against a plain float64 reference, and its
composition with the policy losses."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hapo_ops.rl.companion_losses import (cispo_policy_loss, clip_cov_policy_loss,
                                       gspo_policy_loss, kl_cov_policy_loss)
from hapo_ops.rl.losses import clipped_policy_loss, hapo_policy_loss
from hapo_ops.rl.rollout_correction import rollout_correction

SETTINGS = dict(derandomize=True, deadline=None, max_examples=40)
F64 = torch.float64


BOUND = 20.0      # |log ρ| is clamped to 20 before exp, as verl's rollout correction


def ref_correction(old, rollout, mask, level, mode, low, high):
    """Plain-Python float64 reference of the three levels (verl's names):
    token ρ_t = exp(clamp(log ρ_t)); sequence ρ_i = exp(clamp(Σ_t log ρ_t)) (the product
    of the token ratios); geometric ρ_i = exp(clamp(Σ_t log ρ_t / L_i))."""
    B, L = old.shape
    m = mask.bool()
    w = torch.zeros(B, L, dtype=F64)
    keep = torch.zeros(B, L, dtype=torch.bool)
    clamp = lambda x: x if math.isnan(x) else min(max(x, -BOUND), BOUND)  # noqa: E731
    for i in range(B):
        logs = [float(old[i, t]) - float(rollout[i, t]) for t in range(L) if m[i, t]]
        if level == "sequence":
            seq = math.exp(clamp(math.fsum(logs)))
        elif level == "geometric":
            seq = math.exp(clamp(math.fsum(logs) / len(logs))) if logs else 1.0
        for t in range(L):
            if not m[i, t]:
                continue
            r = (seq if level != "token"
                 else math.exp(clamp(float(old[i, t]) - float(rollout[i, t]))))
            if mode == "truncate":
                v = r if high is None else min(r, high)
                v = v if low is None else max(v, low)
                w[i, t], keep[i, t] = v, True
            elif (low is None or r >= low) and (high is None or r <= high):
                w[i, t], keep[i, t] = r, True
    return w, keep


def assert_elementwise(got, want, atol, rtol):
    got, want = got.double(), want.double()
    assert not torch.isnan(got).any() and not torch.isnan(want).any()
    bad = (got - want).abs() > atol + rtol * want.abs()
    assert not bad.any(), (got[bad], want[bad])


@settings(**SETTINGS)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1),
       st.sampled_from(["token", "sequence", "geometric"]), st.sampled_from(["truncate", "mask"]),
       st.sampled_from([(None, 2.0), (0.5, 2.0), (0.8, 1.25), (None, None), (0.5, None)]),
       st.sampled_from([torch.float32, F64]))
def test_matches_reference(B, L, seed, level, mode, bounds, dtype):
    g = torch.Generator().manual_seed(seed)
    old = (-torch.rand(B, L, generator=g, dtype=F64) * 4).to(dtype)
    rollout = (old.double() + torch.randn(B, L, generator=g, dtype=F64) * 0.6).to(dtype)
    mask = torch.rand(B, L, generator=g) < 0.75
    old[~mask] = float("nan")                             # masked garbage
    rollout[~mask] = float("inf")
    low, high = bounds
    w, keep = rollout_correction(old, rollout, mask, level=level, mode=mode, low=low, high=high)
    ref_w, ref_keep = ref_correction(old, rollout, mask, level, mode, low, high)
    assert w.dtype == dtype and keep.dtype == torch.bool
    assert torch.equal(keep, ref_keep)
    atol, rtol = (1e-6, 1e-5) if dtype == torch.float32 else (1e-12, 1e-12)
    assert_elementwise(w, ref_w, atol, rtol)


def test_worked_example_and_boundaries():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    rollout = torch.tensor([[-1.0, -3.0, -0.5], [-0.1, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w, keep = rollout_correction(old, rollout, mask)                       # TIS, cap 2
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, 1.0], [1.0, math.exp(-1), 0.0]]))
    assert torch.equal(keep, mask.bool())
    w, keep = rollout_correction(old, rollout, mask, low=0.5)              # TIS, floor 0.5
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, 1.0], [1.0, 0.5, 0.0]]))
    w, keep = rollout_correction(old, rollout, mask, mode="mask", low=0.5, high=2.0)
    assert torch.equal(keep, torch.tensor([[1, 0, 1], [1, 0, 0]], dtype=torch.bool))
    assert torch.allclose(w, torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    # Geometric level: row 0 log ratios (0, 1, 0) -> exp(1/3); row 1 (0, -1) -> exp(-1/2)
    # = 0.61 < 0.7.
    w, keep = rollout_correction(old, rollout, mask, level="geometric", mode="mask", low=0.7)
    assert torch.equal(keep, torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool))
    assert torch.allclose(w[0], torch.full((3,), math.exp(1 / 3)))
    # Bounds are inclusive: a ratio of exactly 1 with low = high = 1 is kept / untouched.
    ones = torch.zeros(2, 3)
    w, keep = rollout_correction(ones, ones, torch.ones(2, 3), mode="mask", low=1.0, high=1.0)
    assert keep.all() and torch.equal(w, torch.ones(2, 3))
    # Exactly at the cap (log 2 in float64 gives ratio 2 exactly): kept, weight 2.
    at_cap = torch.tensor([[math.log(2.0)]], dtype=F64)
    w, keep = rollout_correction(at_cap, torch.zeros(1, 1, dtype=F64), torch.ones(1, 1),
                                 mode="mask", high=float(torch.tensor(math.log(2.0),
                                                                      dtype=F64).exp()))
    assert bool(keep.all()) and float(w) == float(torch.tensor(math.log(2.0), dtype=F64).exp())


def test_empty_nan_and_detached():
    old = torch.randn(2, 3, requires_grad=True)
    rollout = torch.randn(2, 3)
    w, keep = rollout_correction(old, rollout, torch.zeros(2, 3), level="sequence")
    assert not w.requires_grad and torch.equal(w, torch.zeros(2, 3)) and not keep.any()
    bad = torch.tensor([[float("nan"), 0.0]])
    w, keep = rollout_correction(bad, torch.zeros(1, 2), torch.ones(1, 2), mode="mask")
    assert keep.tolist() == [[False, True]] and w.tolist() == [[0.0, 1.0]]
    w, keep = rollout_correction(bad, torch.zeros(1, 2), torch.ones(1, 2))
    assert math.isnan(float(w[0, 0])) and keep.all()      # visible under truncate
    # Extreme mismatch: exp overflows to inf; truncated to the cap, masked out under mask.
    huge = torch.tensor([[200.0, 0.0]])
    w, _ = rollout_correction(huge, torch.zeros(1, 2), torch.ones(1, 2))
    assert w.tolist() == [[2.0, 1.0]]
    w, keep = rollout_correction(huge, torch.zeros(1, 2), torch.ones(1, 2), mode="mask")
    assert keep.tolist() == [[False, True]] and torch.isfinite(w).all()


def test_composes_with_every_loss():
    """w >= 0 per token: ℓ(A·w) = w·ℓ(A) for the PPO and HAPO losses (dual clip included),
    and ``weights=w`` scales the companion losses' per-token loss."""
    g = torch.Generator().manual_seed(3)
    B, L = 3, 5
    old = -torch.rand(B, L, generator=g) * 3
    rollout = old + torch.randn(B, L, generator=g) * 0.5
    lp = old + torch.randn(B, L, generator=g) * 0.4
    adv = torch.randn(B, L, generator=g)
    mask = torch.rand(B, L, generator=g) > 0.2
    entropy = torch.rand(B, L, generator=g)
    w, keep = rollout_correction(old, rollout, mask, mode="mask", low=0.5, high=1.5)
    plain = clipped_policy_loss(lp, old, adv, keep, dual_clip=3.0)
    scaled = clipped_policy_loss(lp, old, adv * w, keep, dual_clip=3.0)
    assert torch.allclose(scaled.per_token, w * plain.per_token, atol=1e-6)
    plain = hapo_policy_loss(lp, old, adv, entropy, keep)
    scaled = hapo_policy_loss(lp, old, adv * w, entropy, keep)
    assert torch.allclose(scaled.per_token, w * plain.per_token, atol=1e-6)
    for loss, kw in [(gspo_policy_loss, {}), (cispo_policy_loss, {}),
                     (kl_cov_policy_loss, dict(cov_fraction=0.2)),
                     (clip_cov_policy_loss, dict(cov_fraction=0.2, cov_bounds=(-9.0, 9.0),
                                                 seed=1))]:
        plain = loss(lp, old, adv, keep, agg="token-mean", **kw)
        scaled = loss(lp, old, adv, keep, weights=w, agg="token-mean", **kw)
        assert torch.allclose(scaled.per_token, w * plain.per_token, atol=1e-6), loss.__name__
        assert torch.allclose(scaled.loss, (w * plain.per_token).sum() / keep.sum())


def test_rejects_bad_input():
    a, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="level"):
        rollout_correction(a, a, m, level="tokens")
    with pytest.raises(ValueError, match="mode"):
        rollout_correction(a, a, m, mode="clip")
    with pytest.raises(ValueError, match="low"):
        rollout_correction(a, a, m, low=3.0, high=2.0)
    with pytest.raises(ValueError, match="low"):
        rollout_correction(a, a, m, low=-0.1)
    with pytest.raises(ValueError, match="high"):
        rollout_correction(a, a, m, high=0.0)
    with pytest.raises(ValueError, match="high"):
        rollout_correction(a, a, m, high=float("inf"))
    with pytest.raises(TypeError, match="high"):
        rollout_correction(a, a, m, high="2")
    with pytest.raises(ValueError, match="rollout_logprobs"):
        rollout_correction(a, torch.zeros(3, 2), m)
    with pytest.raises(TypeError, match="rollout_logprobs"):
        rollout_correction(a, torch.zeros(2, 3, dtype=torch.int64), m)
    with pytest.raises(ValueError, match="mask"):
        rollout_correction(a, a, torch.ones(2, 2))
    with pytest.raises(ValueError, match="level"):
        rollout_correction(a, a, m, level="seq")
    with pytest.raises(ValueError, match="old_logprobs"):
        rollout_correction(torch.zeros(()), torch.zeros(()), torch.ones(()), level="geometric")


def test_sequence_level_is_the_product_of_token_ratios():
    """verl's names: "sequence" is Π_t ρ_t = exp(Σ_t log ρ_t), "geometric" the geometric
    mean exp(Σ_t log ρ_t / L_i)."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]], dtype=F64)
    rollout = torch.tensor([[-1.5, -3.0, -0.5], [-0.1, -2.0, 7.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w, keep = rollout_correction(old, rollout, mask, level="sequence", high=None)
    product = [math.exp(0.5) * math.exp(1.0) * 1.0, 1.0 * math.exp(-1.0)]
    want = torch.tensor([[product[0]] * 3, [product[1]] * 2 + [0.0]], dtype=F64)
    assert torch.allclose(w, want, rtol=1e-12, atol=0) and torch.equal(keep, mask.bool())
    w, _ = rollout_correction(old, rollout, mask, level="geometric", high=None)
    geometric = [math.exp(1.5 / 3), math.exp(-1.0 / 2)]
    want = torch.tensor([[geometric[0]] * 3, [geometric[1]] * 2 + [0.0]], dtype=F64)
    assert torch.allclose(w, want, rtol=1e-12, atol=0)
    # Masked sequences: the product e^1.5 = 4.48 leaves [0.5, 2]; the geometric mean stays.
    _, keep = rollout_correction(old, rollout, mask, level="sequence", mode="mask", low=0.5)
    assert keep.tolist() == [[False] * 3, [False] * 3]
    _, keep = rollout_correction(old, rollout, mask, level="geometric", mode="mask", low=0.5)
    assert keep.tolist() == [[True] * 3, [True, True, False]]


def test_log_ratio_is_clamped_before_exp():
    """|log ρ| ≤ 20 before exp at every level (verl's bound): finite, positive weights."""
    big = math.exp(20.0)
    old = torch.tensor([[15.0, 15.0, 0.0], [-30.0, 0.0, 0.0]], dtype=F64)
    zeros, mask = torch.zeros(2, 3, dtype=F64), torch.ones(2, 3)
    w, _ = rollout_correction(old, zeros, mask, level="sequence", high=None)   # Σ = 30, -30
    assert w.tolist() == [[big] * 3, [math.exp(-20.0)] * 3]
    w, keep = rollout_correction(old, zeros, mask, level="sequence", mode="mask", high=None)
    assert keep.all() and torch.isfinite(w).all() and w[0, 0].item() == big
    w, _ = rollout_correction(old, zeros, mask, level="token", high=None)
    assert w[1, 0].item() == math.exp(-20.0) and w[0, 0].item() == math.exp(15.0)
    w, _ = rollout_correction(old * 4, zeros, mask, level="geometric", high=None)  # mean 40
    assert w[0].tolist() == [big] * 3 and w[1].tolist() == [math.exp(-20.0)] * 3


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_empty_batch(level, mode):
    """B = 0 (a data-parallel rank with nothing to do): empty weights and mask."""
    w, keep = rollout_correction(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4),
                                 level=level, mode=mode, low=0.5)
    assert w.shape == keep.shape == (0, 4) and w.dtype == torch.float32
    assert keep.dtype == torch.bool
    w, keep = rollout_correction(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(3, 0),
                                 level=level, mode=mode)
    assert w.shape == (3, 0) and keep.shape == (3, 0)


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_compiles_without_graph_breaks(level):
    """A trainer op: torch.compile(fullgraph=True) gives the eager result."""
    g = torch.Generator().manual_seed(4)
    old = -torch.rand(3, 5, generator=g) * 3
    rollout = old + torch.randn(3, 5, generator=g) * 0.3
    mask = torch.rand(3, 5, generator=g) < 0.7
    for mode in ("truncate", "mask"):
        fn = functools.partial(rollout_correction, level=level, mode=mode, low=0.5, high=2.0)
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)
        for got, want in zip(compiled(old, rollout, mask), fn(old, rollout, mask)):
            assert torch.equal(got, want)
