"""Tests for the advantage ops (formulas, vectorisation, bad input).

References below follow the formulas literally, in float64, with plain Python
loops over groups and rows.
"""

import math
from collections import defaultdict

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hapo_ops import grpo_advantages, redistribute_advantages, token_level_group_advantages

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
BAD = (ValueError, TypeError)


# --------------------------------------------------------------------------- reference


def _groups(group_ids):
    groups = defaultdict(list)
    for i, g in enumerate(group_ids):
        groups[g].append(i)
    return groups


def ref_grpo(rewards, group_ids, normalize_std=True, eps=1e-6):
    """Per-sequence GRPO advantages (B,) as a list: unbiased std over the group's
    sequences (every row of the group counts, whatever its mask); a group of one gets
    mean 0 and std 1."""
    out = [0.0] * len(rewards)
    for idx in _groups(group_ids).values():
        vals = [rewards[i] for i in idx]
        if len(vals) == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for i in idx:
            out[i] = (rewards[i] - mean) / (std + eps) if normalize_std else rewards[i] - mean
    return out


def ref_token_level(rewards, group_ids, mask, normalize_std=True, eps=1e-6, fallback_threshold=5.0, variant="paper"):
    """Returns (advantages (B, L) float64, {group: fell_back}, margin) where margin is the
    smallest distance of a checked |value| to the threshold (to keep examples off the edge)."""
    mask = mask.bool()
    B, L = mask.shape
    lengths = mask.sum(-1).tolist()
    grpo = ref_grpo(rewards, group_ids, normalize_std, eps)
    out = torch.zeros(B, L, dtype=torch.float64)
    fell_back = {}
    margin = math.inf
    for g, idx in _groups(group_ids).items():
        total = sum(lengths[i] for i in idx)
        if total == 0:
            fell_back[g] = False
            continue
        mu = sum(lengths[i] * rewards[i] for i in idx) / total
        sigma = math.sqrt(sum(lengths[i] * (rewards[i] - mu) ** 2 for i in idx) / total)

        def norm(x):
            return (x - mu) / (sigma + eps) if normalize_std else x - mu

        adv = {i: norm(rewards[i]) for i in idx}
        checked = [adv[i] for i in idx if lengths[i] > 0]
        if variant == "released" and any(lengths[i] < L for i in idx):
            checked.append(norm(0.0))  # every padding position of the group's rows
        fb = any(abs(v) >= fallback_threshold for v in checked)
        margin = min([margin] + [abs(abs(v) - fallback_threshold) for v in checked])
        fell_back[g] = fb
        for i in idx:
            a = grpo[i] if fb else adv[i]
            out[i] = torch.where(mask[i], torch.tensor(a, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    return out, fell_back, margin


def ref_redistribute(adv, h_hat, ratio, eps_low, eps_high, beta=1.0):
    adv, h, r = adv.double(), h_hat.double(), ratio.double()
    el = torch.as_tensor(eps_low, dtype=torch.float64)
    eh = torch.as_tensor(eps_high, dtype=torch.float64)
    inside = (r > 1 - el / 2) & (r < 1 + eh / 2)  # open neutral zone
    scale = ((h > 0) & ~inside) | ((h <= 0) & inside)
    return torch.where(scale, adv * (1 + beta * h), adv)


def tol(dtype):
    return (2e-5, 2e-5) if dtype == torch.float32 else (1e-9, 1e-9)


def assert_close(actual, expected, dtype):
    rtol, atol = tol(dtype)
    torch.testing.assert_close(torch.as_tensor(actual).double(), expected.double(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- strategies

# dyadic rewards: sums are exact in float32, so all-equal groups give exactly 0 variance
_REWARDS = st.sampled_from([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0])


@st.composite
def group_batches(draw, max_b=10, max_l=8):
    B = draw(st.integers(1, max_b))
    L = draw(st.integers(1, max_l))
    n_groups = draw(st.integers(1, B))
    id_style = draw(st.sampled_from(["dense", "sparse"]))
    ids = list(range(n_groups)) if id_style == "dense" else [7 * k + 3 for k in range(n_groups)]
    group_ids = draw(st.lists(st.sampled_from(ids), min_size=B, max_size=B))  # shuffled, non-contiguous
    if draw(st.booleans()) and draw(st.booleans()):
        rewards = [draw(_REWARDS)] * B  # all-equal rewards
    else:
        rewards = draw(st.lists(_REWARDS, min_size=B, max_size=B))
    rows = []
    for _ in range(B):
        kind = draw(st.sampled_from(["prefix", "prefix", "random", "empty", "full"]))
        if kind == "prefix":
            n = draw(st.integers(0, L))
            rows.append([1] * n + [0] * (L - n))
        elif kind == "random":
            rows.append(draw(st.lists(st.integers(0, 1), min_size=L, max_size=L)))
        elif kind == "empty":
            rows.append([0] * L)  # zero-length response
        else:
            rows.append([1] * L)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    mask_dtype = draw(st.sampled_from([torch.bool, dtype]))
    return (
        torch.tensor(rewards, dtype=dtype),
        torch.tensor(group_ids, dtype=torch.int64),
        torch.tensor(rows, dtype=torch.bool).to(mask_dtype),
    )


# --------------------------------------------------------------------------- grpo_advantages


@settings(max_examples=100, **SETTINGS)
@given(batch=group_batches(), normalize_std=st.booleans(), with_mask=st.booleans())
def test_grpo_advantages_matches_reference(batch, normalize_std, with_mask):
    rewards, group_ids, mask = batch
    expected = torch.tensor(ref_grpo(rewards.double().tolist(), group_ids.tolist(), normalize_std), dtype=torch.float64)
    if with_mask:
        out = grpo_advantages(rewards, group_ids, mask, normalize_std=normalize_std)
        assert out.shape == mask.shape
        assert torch.all(out[~mask.bool()] == 0)
        expected = expected[:, None] * mask.bool().double()
    else:
        out = grpo_advantages(rewards, group_ids, normalize_std=normalize_std)
        assert out.shape == rewards.shape
    assert torch.isfinite(out).all()
    assert_close(out, expected, rewards.dtype)


def test_grpo_advantages_worked_example():
    rewards = torch.tensor([1.0, 0.0, 5.0, 0.0, 1.0, 1.0, 3.0], dtype=torch.float64)
    group_ids = torch.tensor([4, 9, 2, 4, 9, 4, 4])  # groups not contiguous; group 2 is a singleton
    out = grpo_advantages(rewards, group_ids, eps=1e-300)
    # group 4: [1, 0, 1, 3] mean 1.25, unbiased var (0.0625+1.5625+0.0625+3.0625)/3 = 1.583333
    s4 = math.sqrt(4.75 / 3)
    # group 9: [0, 1] mean 0.5, unbiased std sqrt(0.5)
    s9 = math.sqrt(0.5)
    expected = torch.tensor(
        [-0.25 / s4, -0.5 / s9, 5.0, -1.25 / s4, 0.5 / s9, -0.25 / s4, 1.75 / s4], dtype=torch.float64
    )
    torch.testing.assert_close(out.double(), expected)
    # singleton with eps: mean 0, std 1 -> R / (1 + eps)
    out = grpo_advantages(rewards, group_ids, eps=1e-6)
    assert float(out[2]) == pytest.approx(5.0 / (1 + 1e-6), rel=1e-12)
    out = grpo_advantages(rewards, group_ids, normalize_std=False)
    torch.testing.assert_close(
        out.double(), torch.tensor([-0.25, -0.5, 5.0, -1.25, 0.5, -0.25, 1.75], dtype=torch.float64)
    )


def test_grpo_advantages_arbitrary_integer_ids():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5])
    base = grpo_advantages(rewards, torch.tensor([0, 1, 0, 1]))
    for ids in ([-3, 10**12, -3, 10**12], [5, -1, 5, -1]):
        torch.testing.assert_close(grpo_advantages(rewards, torch.tensor(ids)), base)
    torch.testing.assert_close(grpo_advantages(rewards, torch.tensor([0, 1, 0, 1], dtype=torch.int32)), base)


# --------------------------------------------------------------------------- token_level_group_advantages


@settings(max_examples=100, **SETTINGS)
@given(
    batch=group_batches(),
    normalize_std=st.booleans(),
    variant=st.sampled_from(["paper", "released"]),
    threshold=st.sampled_from([5.0, 5.0, 1.5, 2.0]),
)
def test_token_level_matches_reference(batch, normalize_std, variant, threshold):
    rewards, group_ids, mask = batch
    expected, fell_back, margin = ref_token_level(
        rewards.double().tolist(), group_ids.tolist(), mask, normalize_std,
        fallback_threshold=threshold, variant=variant,
    )
    assume(margin > 1e-3)
    out = token_level_group_advantages(
        rewards, group_ids, mask, normalize_std=normalize_std, fallback_threshold=threshold, variant=variant
    )
    assert out.shape == mask.shape
    assert torch.isfinite(out).all()
    assert torch.all(out[~mask.bool()] == 0)
    assert_close(out, expected, rewards.dtype)

    # Property: sum_i L_i A_i = 0 in every group that did not fall back.
    out64 = out.double()
    for g, fb in fell_back.items():
        if fb:
            continue
        rows = group_ids == g
        total = out64[rows].sum()
        scale = out64[rows].abs().sum() + 1.0
        assert abs(float(total)) <= 1e-5 * float(scale), (g, float(total))


@settings(max_examples=50, **SETTINGS)
@given(batch=group_batches(), normalize_std=st.booleans())
def test_token_level_variants_agree_when_no_row_is_padded(batch, normalize_std):
    rewards, group_ids, mask = batch
    mask = torch.ones_like(mask)  # no padding anywhere: the released check has nothing extra
    a = token_level_group_advantages(rewards, group_ids, mask, normalize_std=normalize_std, variant="paper")
    b = token_level_group_advantages(rewards, group_ids, mask, normalize_std=normalize_std, variant="released")
    torch.testing.assert_close(a, b)


def test_token_level_defaults_are_paper_and_std():
    rewards = torch.tensor([1.0, 1.0, 0.75, 0.75])
    group_ids = torch.tensor([0, 0, 0, 0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(
        token_level_group_advantages(rewards, group_ids, mask),
        token_level_group_advantages(rewards, group_ids, mask, normalize_std=True, variant="paper"),
    )


@pytest.mark.parametrize("variant", ["paper", "released"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_level_worked_example_lengths_5_5_15_15(variant, dtype):
    # rewards +1, +1, -1, -1 with lengths 5, 5, 15, 15:
    # mu = (5 + 5 - 15 - 15) / 40 = -0.5, sigma^2 = (10 * 1.5^2 + 30 * 0.5^2) / 40 = 0.75
    rewards = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=dtype)
    group_ids = torch.tensor([0, 0, 0, 0])
    lengths = [5, 5, 15, 15]
    mask = torch.tensor([[1] * n + [0] * (15 - n) for n in lengths], dtype=torch.bool)
    out = token_level_group_advantages(rewards, group_ids, mask, variant=variant).double()
    sigma = math.sqrt(0.75)
    pos, neg = 1.5 / (sigma + 1e-6), -0.5 / (sigma + 1e-6)
    assert pos == pytest.approx(1.732, abs=1e-3) and neg == pytest.approx(-0.577, abs=1e-3)
    for i, n in enumerate(lengths):
        want = pos if i < 2 else neg
        torch.testing.assert_close(out[i, :n], torch.full((n,), want, dtype=torch.float64), rtol=1e-6, atol=1e-6)
        assert torch.all(out[i, n:] == 0)
    # padding value (0 - mu)/sigma = 0.577 < 5: no fallback in either variant
    assert abs(float((out * mask).sum())) < 1e-4  # sum_i L_i A_i = 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_level_padding_check_triggers_fallback_only_for_released(dtype):
    # Group 5 (rows 0, 2, 4, 6; ids interleaved with group 8):
    #   rewards 1, 1, 0.75, 0.75 with lengths 4, 2, 4, 2 (L = 4)
    #   mu = (4 + 2 + 3 + 1.5) / 12 = 0.875, sigma = 0.125 (token-weighted, population)
    #   valid A = +-0.125 / (0.125 + 1e-6) = +-0.999992  (< 5)
    #   padding value (0 - 0.875) / (0.125 + 1e-6) = -6.99994 -> |.| >= 5
    #   released falls back to GRPO: mean 0.875, unbiased std sqrt(4 * 0.125^2 / 3) = 0.1443376
    #   -> +-0.125 / (0.1443376 + 1e-6) = +-0.8660194
    # Group 8 (rows 1, 3, 5): rewards 0, 1, 0 lengths 3, 1, 0 -> mu = 0.25, sigma = sqrt(3)/4,
    #   A = -0.25/(0.4330127+1e-6) = -0.5773490, +0.75/(...) = 1.7320469; padding value -0.577 (< 5)
    eps = 1e-6
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.75, 0.0, 0.75], dtype=dtype)
    group_ids = torch.tensor([5, 8, 5, 8, 5, 8, 5])
    lengths = [4, 3, 2, 1, 4, 0, 2]
    mask = torch.tensor([[1] * n + [0] * (4 - n) for n in lengths], dtype=torch.bool)

    tl_pos, tl_neg = 0.125 / (0.125 + eps), -0.125 / (0.125 + eps)
    g_std = math.sqrt(4 * 0.125**2 / 3)
    gr_pos, gr_neg = 0.125 / (g_std + eps), -0.125 / (g_std + eps)
    s8 = math.sqrt(3) / 4
    a8_fail, a8_ok = -0.25 / (s8 + eps), 0.75 / (s8 + eps)
    assert abs(-0.875 / (0.125 + eps)) >= 5 and abs(tl_pos) < 5

    def expected(g5_pos, g5_neg):
        per_row = [g5_pos, a8_fail, g5_pos, a8_ok, g5_neg, 0.0, g5_neg]
        return torch.tensor([[a if t < n else 0.0 for t in range(4)] for a, n in zip(per_row, lengths)], dtype=torch.float64)

    paper = token_level_group_advantages(rewards, group_ids, mask, variant="paper").double()
    released = token_level_group_advantages(rewards, group_ids, mask, variant="released").double()
    atol = 1e-6 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(paper, expected(tl_pos, tl_neg), rtol=0, atol=atol)
    torch.testing.assert_close(released, expected(gr_pos, gr_neg), rtol=0, atol=atol)
    assert gr_pos == pytest.approx(0.8660194, abs=1e-6) and tl_pos == pytest.approx(0.999992, abs=1e-6)
    # the reference agrees with the hand numbers
    ref_p, fb_p, _ = ref_token_level(rewards.double().tolist(), group_ids.tolist(), mask, variant="paper")
    ref_r, fb_r, _ = ref_token_level(rewards.double().tolist(), group_ids.tolist(), mask, variant="released")
    assert fb_p == {5: False, 8: False} and fb_r == {5: True, 8: False}
    torch.testing.assert_close(ref_p, expected(tl_pos, tl_neg))
    torch.testing.assert_close(ref_r, expected(gr_pos, gr_neg))


@pytest.mark.parametrize("variant", ["paper", "released"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_level_valid_outlier_triggers_fallback_in_both_variants(variant, dtype):
    # One short success among three long failures: lengths 1, 10, 10, 10, rewards 1, 0, 0, 0.
    # mu = 1/31, sigma = sqrt(mu (1 - mu)) -> A_success = sqrt(30) = 5.477 >= 5 -> GRPO:
    # mean 0.25, unbiased std sqrt(0.75 / 3) = 0.5 -> 0.75/0.500001 = 1.499997, -0.25/0.500001
    eps = 1e-6
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=dtype)
    group_ids = torch.tensor([1, 1, 1, 1, 2, 2])
    lengths = [1, 10, 10, 10, 10, 10]
    mask = torch.tensor([[1] * n + [0] * (10 - n) for n in lengths], dtype=torch.bool)
    out = token_level_group_advantages(rewards, group_ids, mask, variant=variant).double()
    mu = 1 / 31
    assert (1 - mu) / (math.sqrt(mu * (1 - mu)) + eps) >= 5
    pos, neg = 0.75 / (0.5 + eps), -0.25 / (0.5 + eps)
    # group 2: rewards 1, 0 equal lengths: mu 0.5 sigma 0.5 -> +-0.5/(0.5+eps), no padding
    g2 = 0.5 / (0.5 + eps)
    per_row = [pos, neg, neg, neg, g2, -g2]
    want = torch.tensor([[a if t < n else 0.0 for t in range(10)] for a, n in zip(per_row, lengths)], dtype=torch.float64)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-10)


def test_token_level_degenerate_groups():
    # group 0: no valid token at all -> 0; group 1: all-equal rewards -> 0; group 2: singleton
    rewards = torch.tensor([1.0, 3.0, 0.5, 0.5, 0.5, 2.0])
    group_ids = torch.tensor([0, 0, 1, 1, 1, 2])
    mask = torch.tensor(
        [[0, 0, 0], [0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool
    )
    for variant in ("paper", "released"):
        out = token_level_group_advantages(rewards, group_ids, mask, variant=variant)
        assert torch.isfinite(out).all()
        assert torch.all(out[:5] == 0), (variant, out)
        # singleton: mu = R, sigma = 0 -> A = 0 (paper). The released padding value
        # (0 - 2)/(0 + eps) triggers the GRPO fallback: mean 0, std 1 -> 2 / (1 + eps).
        want = 0.0 if variant == "paper" else 2.0 / (1 + 1e-6)
        torch.testing.assert_close(
            out[5].double(), torch.tensor([want, want, 0.0], dtype=torch.float64), rtol=1e-6, atol=1e-6
        )


def test_token_level_is_permutation_equivariant():
    g = torch.Generator().manual_seed(0)
    B, L = 12, 6
    rewards = torch.randint(0, 2, (B,), generator=g).double()
    group_ids = torch.arange(B) % 3
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    perm = torch.randperm(B, generator=g)
    for variant in ("paper", "released"):
        a = token_level_group_advantages(rewards, group_ids, mask, variant=variant)
        b = token_level_group_advantages(rewards[perm], group_ids[perm], mask[perm], variant=variant)
        torch.testing.assert_close(a[perm], b)


# --------------------------------------------------------------------------- redistribute_advantages


@st.composite
def redistribution_cases(draw):
    B = draw(st.integers(1, 6))
    L = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    tensor_eps = draw(st.booleans())
    beta = draw(st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0.0, 1.0))
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(B, L, generator=g, dtype=torch.float64) * 2
    adv[torch.rand(B, L, generator=g) < 0.1] = 0.0
    h = torch.rand(B, L, generator=g, dtype=torch.float64) * 2 - 1
    special = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    pick = torch.rand(B, L, generator=g) < 0.3
    h = torch.where(pick, special[torch.randint(0, 3, (B, L), generator=g)], h)
    ratio = torch.exp(torch.randn(B, L, generator=g, dtype=torch.float64) * 0.2)
    if tensor_eps:
        eps_low = (torch.rand(B, L, generator=g, dtype=torch.float64) * 0.4).to(dtype)
        eps_high = (torch.rand(B, L, generator=g, dtype=torch.float64) * 0.4).to(dtype)
    else:
        eps_low = draw(st.sampled_from([0.0, 0.1, 0.2, 0.3]))
        eps_high = draw(st.sampled_from([0.0, 0.2, 0.28, 0.4]))
    return adv.to(dtype), h.to(dtype), ratio.to(dtype), eps_low, eps_high, beta


def _away_from_neutral_edges(ratio, eps_low, eps_high):
    r = ratio.double()
    el = torch.as_tensor(eps_low, dtype=torch.float64)
    eh = torch.as_tensor(eps_high, dtype=torch.float64)
    return ((r - (1 - el / 2)).abs() > 1e-5) & ((r - (1 + eh / 2)).abs() > 1e-5)


@settings(max_examples=100, **SETTINGS)
@given(case=redistribution_cases())
def test_redistribute_matches_reference_and_never_flips_sign(case):
    adv, h, ratio, eps_low, eps_high, beta = case
    out = redistribute_advantages(adv, h, ratio, eps_low=eps_low, eps_high=eps_high, beta=beta)
    assert out.shape == adv.shape
    expected = ref_redistribute(adv, h, ratio, eps_low, eps_high, beta)
    ok = _away_from_neutral_edges(ratio, eps_low, eps_high)
    assert_close(out.double()[ok], expected[ok], adv.dtype)
    out64, adv64 = out.double(), adv.double()
    assert torch.all(out64 * adv64 >= 0), "redistribution flipped a sign"
    assert torch.all(out64.abs() <= 2 * adv64.abs() + 1e-6)
    assert torch.all(out64[adv64 == 0] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_redistribute_worked_example_and_open_neutral_zone(dtype):
    # eps_low = 0.25 -> left edge 0.875; eps_high = 0.5 -> right edge 1.25 (exact in binary)
    ratio = torch.tensor([0.875, 0.9, 1.0, 1.25, 1.3, 0.5, 0.875, 1.0, 1.25, 2.0], dtype=dtype)
    h = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, -0.5, -0.5, 0.0, 0.0], dtype=dtype)
    adv = torch.tensor([2.0, 2.0, -2.0, 2.0, -2.0, 2.0, 2.0, -2.0, 2.0, 2.0], dtype=dtype)
    out = redistribute_advantages(adv, h, ratio, eps_low=0.25, eps_high=0.5, beta=1.0)
    # h > 0: scaled by 1.5 outside the zone (edges are outside); h <= 0: scaled inside
    # (h = 0 counts as "h <= 0": scaled by 1 + 0 = 1 either way).
    want = torch.tensor([3.0, 2.0, -2.0, 3.0, -3.0, 3.0, 2.0, -1.0, 2.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(out.double(), want)
    # beta = 0 is the identity
    torch.testing.assert_close(redistribute_advantages(adv, h, ratio, eps_low=0.25, eps_high=0.5, beta=0.0), adv)
    # h = -1 and beta = 1 inside the zone zeroes the advantage (sign kept, magnitude 0)
    z = redistribute_advantages(
        torch.tensor([3.0], dtype=dtype), torch.tensor([-1.0], dtype=dtype), torch.tensor([1.0], dtype=dtype),
        eps_low=0.2, eps_high=0.2,
    )
    assert float(z) == 0.0


def test_redistribute_has_no_gradient():
    adv = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    h = (torch.rand(3, 4, dtype=torch.float64) * 2 - 1).requires_grad_()
    ratio = torch.exp(0.1 * torch.randn(3, 4, dtype=torch.float64)).requires_grad_()
    out = redistribute_advantages(adv, h, ratio, eps_low=0.2, eps_high=0.2)
    assert not out.requires_grad


# --------------------------------------------------------------------------- bad input


def _adv_inputs():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5])
    group_ids = torch.tensor([0, 0, 1, 1])
    mask = torch.ones(4, 3, dtype=torch.bool)
    return rewards, group_ids, mask


def test_grpo_rejects_bad_input():
    rewards, group_ids, mask = _adv_inputs()
    with pytest.raises(BAD, match="group_ids"):
        grpo_advantages(rewards, group_ids[:3])
    with pytest.raises(BAD, match="mask"):
        grpo_advantages(rewards, group_ids, mask[:3])
    with pytest.raises(BAD, match="eps"):
        grpo_advantages(rewards, group_ids, eps=-1e-6)
    with pytest.raises(BAD, match="group_ids"):
        grpo_advantages(rewards, group_ids.float())  # group ids must be integers


def test_token_level_rejects_bad_input():
    rewards, group_ids, mask = _adv_inputs()
    with pytest.raises(BAD, match="group_ids"):
        token_level_group_advantages(rewards, group_ids[:3], mask)
    with pytest.raises(BAD, match="mask"):
        token_level_group_advantages(rewards, group_ids, mask[:3])
    with pytest.raises(BAD, match="mask"):
        token_level_group_advantages(rewards, group_ids, torch.ones(4, dtype=torch.bool))
    with pytest.raises(BAD, match="eps"):
        token_level_group_advantages(rewards, group_ids, mask, eps=-1.0)
    with pytest.raises(BAD, match="variant"):
        token_level_group_advantages(rewards, group_ids, mask, variant="reference")


def test_redistribute_rejects_bad_input():
    adv = torch.randn(2, 3)
    h = torch.zeros(2, 3)
    r = torch.ones(2, 3)
    with pytest.raises(BAD, match="h_hat"):
        redistribute_advantages(adv, h[:, :2], r, eps_low=0.2, eps_high=0.2)
    with pytest.raises(BAD, match="ratio"):
        redistribute_advantages(adv, h, r[:1], eps_low=0.2, eps_high=0.2)
    with pytest.raises(BAD, match="eps_low"):
        redistribute_advantages(adv, h, r, eps_low=-0.1, eps_high=0.2)
    with pytest.raises(BAD, match="eps_high"):
        redistribute_advantages(adv, h, r, eps_low=0.2, eps_high=-0.1)


@pytest.mark.parametrize("beta", [3.0, 1.0 + 1e-9, -0.5, -1e-12, float("nan"), float("inf")])
def test_redistribute_rejects_beta_outside_unit_interval(beta):
    """β ∈ [0, 1]: beyond 1 the scale 1 + β·ĥ flips an advantage's sign (A = 1, ĥ = -1,
    r = 1, β = 3 would give -2); below 0 it reverses the redistribution. The error names
    beta; the ends 0 and 1 are accepted."""
    adv, h, r = torch.ones(1, 1), -torch.ones(1, 1), torch.ones(1, 1)
    with pytest.raises(ValueError, match="beta"):
        redistribute_advantages(adv, h, r, eps_low=0.2, eps_high=0.2, beta=beta)
    for ok in (0.0, 1.0):
        out = redistribute_advantages(adv, h, r, eps_low=0.2, eps_high=0.2, beta=ok)
        assert float(out) == 1.0 - ok


@pytest.mark.parametrize("bad", [1.5, -1.0001, float("inf"), float("-inf")])
def test_redistribute_rejects_h_hat_outside_unit_interval(bad):
    """ĥ ∈ [-1, 1] (so that 1 + β·ĥ ≥ 0 for β ≤ 1): anything else is an error on CPU, naming
    h_hat; the bounds themselves and NaN (garbage at padding) pass."""
    adv, r = torch.randn(2, 3), torch.ones(2, 3)
    h = torch.tensor([[0.0, 1.0, -1.0], [0.5, bad, float("nan")]])
    with pytest.raises(ValueError, match="h_hat"):
        redistribute_advantages(adv, h, r, eps_low=0.2, eps_high=0.2)
    h[1, 1] = 0.0
    out = redistribute_advantages(adv, h, r, eps_low=0.2, eps_high=0.2)
    assert torch.isfinite(out[:, :2]).all()


def test_empty_batches_give_empty_outputs():
    """B = 0 (a data-parallel rank with nothing to do) and all-masked batches: empty or zero
    outputs, no NaN."""
    empty_r, empty_ids = torch.empty(0), torch.empty(0, dtype=torch.int64)
    empty_mask = torch.empty(0, 3, dtype=torch.bool)
    assert grpo_advantages(empty_r, empty_ids).shape == (0,)
    assert grpo_advantages(empty_r, empty_ids, empty_mask).shape == (0, 3)
    for variant in ("paper", "released"):
        out = token_level_group_advantages(empty_r, empty_ids, empty_mask, variant=variant)
        assert out.shape == (0, 3) and out.dtype == torch.float32
    out = redistribute_advantages(torch.empty(0, 3), torch.empty(0, 3), torch.empty(0, 3),
                                  eps_low=0.2, eps_high=0.2)
    assert out.shape == (0, 3)
    rewards, group_ids = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1])
    none = torch.zeros(3, 4, dtype=torch.bool)
    for variant in ("paper", "released"):
        out = token_level_group_advantages(rewards, group_ids, none, variant=variant)
        assert torch.equal(out, torch.zeros(3, 4))
    assert torch.equal(grpo_advantages(rewards, group_ids, none), torch.zeros(3, 4))


def test_eps_must_be_positive_and_zero_variance_groups_stay_finite():
    """eps = 0 would give 0/0 = NaN for a group whose rewards are all equal (the most common
    group with binary rewards): it is refused, and the default gives exactly 0 there."""
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0])
    group_ids = torch.tensor([0, 0, 1, 1, 1])
    mask = torch.ones(5, 4, dtype=torch.bool)
    for op, args in ((grpo_advantages, (rewards, group_ids)),
                     (token_level_group_advantages, (rewards, group_ids, mask))):
        with pytest.raises(ValueError, match="eps"):
            op(*args, eps=0.0)
        out = op(*args)
        assert torch.isfinite(out).all()
        assert (out[:2] == 0).all()


def test_fallback_threshold_is_inclusive():
    """|A_i| exactly at the threshold triggers the GRPO fallback (the test is ≥)."""
    rewards = torch.tensor([6.0, 0.0], dtype=torch.float64)
    group_ids = torch.tensor([0, 0])
    mask = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    # Token-weighted mean (1·6 + 5·0)/6 = 1: A = 5 exactly for the first row.
    at = token_level_group_advantages(rewards, group_ids, mask, normalize_std=False,
                                      fallback_threshold=5.0)
    grpo = grpo_advantages(rewards, group_ids, mask, normalize_std=False)
    assert torch.equal(at, grpo) and at[0, 0] == 3.0
    above = token_level_group_advantages(rewards, group_ids, mask, normalize_std=False,
                                         fallback_threshold=5.0 + 1e-9)
    assert above[0, 0] == 5.0 and above[1, 0] == -1.0
