"""Tests for the HAPO entropy signal, the adaptive temperature and their bad input.

Every op is checked against a small, plain float64 reference written from the formulas
formulas below (Python lists / loops, no cleverness), plus properties and bad input.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hapo_ops import adaptive_temperature, entropy_stats, normalized_entropy
from hapo_ops.entropy.signal import NO_ENTROPY_STATS, is_no_entropy_stats

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
EPS = 1e-8


# --------------------------------------------------------------------------- reference


def ref_stats(entropy, mask, quantile=0.8, eps=EPS):
    """(pivot, log_max, log_min, n) over l = ln(max(H, eps)) of the valid tokens.

    Nearest-rank quantile: the k-th smallest l, k = round(q (n - 1)) + 1 (Python round).
    No valid tokens: pivot 0 (log_max / log_min are not specified; returned as 0).
    """
    h = entropy.detach().double().reshape(-1).tolist()
    m = mask.detach().reshape(-1).tolist()
    vals = sorted(math.log(max(x, eps)) for x, keep in zip(h, m) if keep)
    n = len(vals)
    if n == 0:
        return 0.0, 0.0, 0.0, 0
    k = round(quantile * (n - 1)) + 1
    return vals[k - 1], vals[-1], vals[0], n


def ref_h_hat(entropy, pivot, log_max, log_min, variant="paper", eps=EPS, n_valid=1):
    """The formulas of normalized_entropy, elementwise, float64."""
    flat = entropy.detach().double().reshape(-1).tolist()
    out = []
    for x in flat:
        if n_valid == 0:
            out.append(0.0)
            continue
        l = math.log(max(x, eps))
        if l > pivot:
            v = (l - pivot) / max(log_max - pivot, eps)
        elif variant == "paper":
            v = (l - pivot) / max(pivot - log_min, eps)
        else:  # released
            v = (pivot - l) / max(pivot - log_min, eps)
        out.append(min(1.0, max(-1.0, v)))
    return torch.tensor(out, dtype=torch.float64).reshape(entropy.shape)


def stats_values(stats):
    return float(stats.pivot), float(stats.log_max), float(stats.log_min)


def tol(dtype):
    # Nothing fixes the dtype of EntropyStats; the tolerance for float64 entropy
    # admits stats kept in float32 (|m| <= ~20 -> half an ulp ~1e-6, denominators >= 0.5).
    # Tokens whose l equals the pivot, max or min are still required to map exactly.
    return 2e-5 if dtype == torch.float32 else 5e-6


# --------------------------------------------------------------------------- strategies

# log-entropies on a grid of 0.5 nats (well separated, so that branch decisions can not
# flip between float32 and float64), duplicates allowed, plus values at or below eps.
_H_VALUES = st.one_of(
    st.integers(-24, 4).map(lambda k: math.exp(k / 2)),
    st.sampled_from([0.0, 1e-12, 1e-9]),
)


@st.composite
def entropy_batches(draw, min_valid=0):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 5 if ndim > 1 else 24)) for _ in range(ndim))
    numel = math.prod(shape)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    h = draw(st.lists(_H_VALUES, min_size=numel, max_size=numel))
    m = draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
    if sum(m) < min_valid:
        m = [True] * numel
    mask_dtype = draw(st.sampled_from([torch.bool, dtype]))
    entropy = torch.tensor(h, dtype=dtype).reshape(shape)
    mask = torch.tensor(m, dtype=torch.bool).reshape(shape).to(mask_dtype)
    return entropy, mask


quantiles = st.one_of(st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]), st.floats(0.0, 1.0))


# --------------------------------------------------------------------------- entropy_stats


def test_entropy_stats_returns_namedtuple_of_0d_tensors():
    entropy = torch.tensor([[0.5, 1.0, 2.0], [0.1, 3.0, 0.2]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    stats = entropy_stats(entropy, mask)
    assert stats._fields[:3] == ("pivot", "log_max", "log_min")
    for name in ("pivot", "log_max", "log_min"):
        v = getattr(stats, name)
        assert isinstance(v, torch.Tensor) and v.dim() == 0, name
    # 5 valid values: ln of [0.1, 0.2, 0.5, 1, 2]; k = round(0.8*4)+1 = 4 -> ln(1) = 0
    assert float(stats.pivot) == pytest.approx(0.0, abs=1e-7)
    assert float(stats.log_max) == pytest.approx(math.log(2.0), rel=1e-6)
    assert float(stats.log_min) == pytest.approx(math.log(0.1), rel=1e-6)


@settings(max_examples=100, **SETTINGS)
@given(batch=entropy_batches(), q=quantiles)
def test_entropy_stats_matches_reference(batch, q):
    entropy, mask = batch
    stats = entropy_stats(entropy, mask, quantile=q)
    pivot, lmax, lmin, n = ref_stats(entropy, mask, q)
    got = stats_values(stats)
    assert got[0] == pytest.approx(pivot, abs=1e-5)
    if n > 0:
        assert got[1] == pytest.approx(lmax, abs=1e-5)
        assert got[2] == pytest.approx(lmin, abs=1e-5)
        assert got[2] <= got[0] <= got[1]


@pytest.mark.parametrize(
    "n, q, k",
    [
        (4, 0.5, 3),  # q(n-1) = 1.5 -> round half to even -> 2 -> k = 3
        (6, 0.5, 3),  # 2.5 -> 2 -> k = 3 (not 4: Python round, not round-half-up)
        (3, 0.25, 1),  # 0.5 -> 0 -> k = 1
        (3, 0.75, 3),  # 1.5 -> 2 -> k = 3
        (5, 0.8, 4),  # 3.2 -> 3 -> k = 4
        (11, 0.8, 9),  # 8.0 -> k = 9
        (1, 0.8, 1),
        (7, 0.0, 1),
        (7, 1.0, 7),
    ],
)
def test_entropy_stats_nearest_rank_half_to_even(n, q, k):
    # ln H = 1, 2, ..., n in a shuffled order; the k-th smallest is k.
    logs = torch.randperm(n, generator=torch.Generator().manual_seed(n)).double() + 1
    entropy = torch.exp(logs)
    mask = torch.ones(n, dtype=torch.bool)
    stats = entropy_stats(entropy, mask, quantile=q)
    assert float(stats.pivot) == pytest.approx(float(k), abs=1e-9)
    assert float(stats.log_max) == pytest.approx(float(n), abs=1e-9)
    assert float(stats.log_min) == pytest.approx(1.0, abs=1e-9)


def test_entropy_stats_pools_leading_dims_and_ignores_masked_garbage():
    entropy = torch.tensor(
        [[[math.e, float("nan")], [1.0, float("inf")]], [[-5.0, math.exp(-1)], [math.exp(2), 1e30]]],
        dtype=torch.float32,
    )
    mask = torch.tensor([[[1, 0], [1, 0]], [[0, 1], [1, 0]]], dtype=torch.float32)
    stats = entropy_stats(entropy, mask, quantile=0.5)
    # valid ln H: [1, 0, -1, 2] -> sorted [-1, 0, 1, 2]; k = round(1.5)+1 = 3 -> 1
    assert float(stats.pivot) == pytest.approx(1.0, abs=1e-6)
    assert float(stats.log_max) == pytest.approx(2.0, abs=1e-6)
    assert float(stats.log_min) == pytest.approx(-1.0, abs=1e-6)


def test_entropy_stats_clamps_at_eps():
    entropy = torch.tensor([0.0, 1e-20, 1.0, math.e], dtype=torch.float64)
    mask = torch.ones(4, dtype=torch.bool)
    stats = entropy_stats(entropy, mask, quantile=0.0, eps=1e-6)
    assert float(stats.log_min) == pytest.approx(math.log(1e-6), rel=1e-7)
    assert float(stats.pivot) == pytest.approx(math.log(1e-6), rel=1e-7)
    assert float(stats.log_max) == pytest.approx(1.0, rel=1e-7)
    # the pivot token itself maps to exactly 0, whatever precision the stats are kept in
    h = normalized_entropy(entropy, stats, eps=1e-6)
    m = math.log(1e-6)
    want = torch.tensor([0.0, 0.0, -m / (1.0 - m), 1.0], dtype=torch.float64)
    torch.testing.assert_close(h.double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_no_valid_tokens_gives_pivot_zero_and_h_hat_zero(mask_dtype):
    entropy = torch.tensor([[0.0, 0.3, 2.0], [5.0, 1e-9, 1.0]])
    mask = torch.zeros(2, 3, dtype=mask_dtype)
    stats = entropy_stats(entropy, mask)
    assert float(stats.pivot) == 0.0
    for variant in ("paper", "released"):
        h = normalized_entropy(entropy, stats, variant=variant)
        assert h.shape == entropy.shape
        assert torch.all(h == 0), (variant, h)
        t = adaptive_temperature(entropy, stats, base_temperature=0.7, tau=0.05, variant=variant)
        torch.testing.assert_close(
            torch.as_tensor(t, dtype=torch.float64).expand(entropy.shape),
            torch.full(entropy.shape, 0.7, dtype=torch.float64),
        )


@pytest.mark.slow
def test_entropy_stats_quantile_beyond_2_pow_24_elements():
    """torch.quantile refuses inputs past 2**24 elements; hapo-ops puts no limit on n."""
    n_valid = 2**24 + 4097
    q = 0.8
    k = round(q * (n_valid - 1)) + 1
    # valid ln H: k-1 values of -3, one value -2 (the k-th smallest), the rest -1.
    # An off-by-one rank gives -3 or -1, an interpolating quantile something in between.
    n_masked = 3001
    n = n_valid + n_masked
    entropy = torch.empty(n, dtype=torch.float32)
    entropy[: k - 1] = math.exp(-3.0)
    entropy[k - 1] = math.exp(-2.0)
    entropy[k:n_valid] = math.exp(-1.0)
    entropy[n_valid:] = math.exp(5.0)  # masked out: larger than every valid value
    entropy[n_valid::2] = 0.0  # masked out: smaller than every valid value
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:n_valid] = True
    # interleave so the valid values are not sorted and the masked ones sit in between
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    entropy, mask = entropy[perm], mask[perm]
    del perm
    stats = entropy_stats(entropy, mask, quantile=q)
    assert float(stats.pivot) == pytest.approx(-2.0, abs=1e-5)
    assert float(stats.log_max) == pytest.approx(-1.0, abs=1e-5)
    assert float(stats.log_min) == pytest.approx(-3.0, abs=1e-5)


# --------------------------------------------------------------------------- normalized_entropy


@settings(max_examples=100, **SETTINGS)
@given(batch=entropy_batches(), q=quantiles, variant=st.sampled_from(["paper", "released"]))
def test_normalized_entropy_matches_reference(batch, q, variant):
    entropy, mask = batch
    stats = entropy_stats(entropy, mask, quantile=q)
    pivot, lmax, lmin, n = ref_stats(entropy, mask, q)
    h = normalized_entropy(entropy, stats, variant=variant)
    assert h.shape == entropy.shape
    expected = ref_h_hat(entropy, pivot, lmax, lmin, variant, n_valid=n)
    torch.testing.assert_close(h.double(), expected, rtol=0, atol=tol(entropy.dtype))


@settings(max_examples=100, **SETTINGS)
@given(batch=entropy_batches(min_valid=1), q=quantiles, variant=st.sampled_from(["paper", "released"]))
def test_normalized_entropy_range_pivot_and_extremes(batch, q, variant):
    entropy, mask = batch
    stats = entropy_stats(entropy, mask, quantile=q)
    h = normalized_entropy(entropy, stats, variant=variant).double()
    pivot, lmax, lmin, n = ref_stats(entropy, mask, q)
    assert n > 0
    lo = -1.0 if variant == "paper" else 0.0
    assert torch.all(h >= lo) and torch.all(h <= 1.0), h
    ell = torch.log(entropy.double().clamp_min(EPS))
    valid = mask.bool()
    at_pivot = valid & ((ell - pivot).abs() < 1e-4)
    assert at_pivot.any()
    assert torch.all(h[at_pivot].abs() <= 1e-6)
    if lmax > pivot + 1e-3:
        top = valid & ((ell - lmax).abs() < 1e-4)
        assert torch.allclose(h[top], torch.ones_like(h[top]), atol=1e-6)
    if lmin < pivot - 1e-3:
        bottom = valid & ((ell - lmin).abs() < 1e-4)
        want = -1.0 if variant == "paper" else 1.0
        assert torch.allclose(h[bottom], torch.full_like(h[bottom], want), atol=1e-6)
    # above the pivot both variants agree and are positive; at/below the pivot the
    # released variant is exactly the negation of the paper variant.
    other = normalized_entropy(entropy, stats, variant="released" if variant == "paper" else "paper").double()
    above = ell > pivot + 1e-4
    torch.testing.assert_close(h[above], other[above])
    torch.testing.assert_close(h[~above], -other[~above], atol=1e-6, rtol=0)


@settings(max_examples=60, **SETTINGS)
@given(
    batch_a=entropy_batches(min_valid=1),
    batch_b=entropy_batches(),
    variant=st.sampled_from(["paper", "released"]),
)
def test_normalized_entropy_with_stats_from_another_batch_is_clamped(batch_a, batch_b, variant):
    # same dtype: a float32 value and a float64 value of "the same" grid point differ by
    # 1e-8 relative, which degenerate stats (log_max == pivot) amplify by 1/eps
    assume(batch_a[0].dtype == batch_b[0].dtype)
    stats = entropy_stats(*batch_a)
    entropy = batch_b[0]
    pivot, lmax, lmin, _ = ref_stats(*batch_a)
    h = normalized_entropy(entropy, stats, variant=variant)
    expected = ref_h_hat(entropy, pivot, lmax, lmin, variant)
    torch.testing.assert_close(h.double(), expected, rtol=0, atol=tol(entropy.dtype))
    assert torch.all(h.abs() <= 1.0)


def test_normalized_entropy_worked_example():
    # ln H = [-3, -2, -1, 0, 1, 3]; q = 0.5 -> k = round(2.5)+1 = 3 -> pivot -1
    logs = torch.tensor([-3.0, -2.0, -1.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    entropy = torch.exp(logs)
    stats = entropy_stats(entropy, torch.ones(6, dtype=torch.bool), quantile=0.5)
    assert float(stats.pivot) == pytest.approx(-1.0)
    paper = normalized_entropy(entropy, stats, variant="paper")
    released = normalized_entropy(entropy, stats, variant="released")
    torch.testing.assert_close(paper, torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0], dtype=paper.dtype))
    torch.testing.assert_close(released, torch.tensor([1.0, 0.5, 0.0, 0.25, 0.5, 1.0], dtype=released.dtype))
    default = normalized_entropy(entropy, stats)
    torch.testing.assert_close(default, paper)


# --------------------------------------------------------------------------- adaptive_temperature


@settings(max_examples=80, **SETTINGS)
@given(
    batch=entropy_batches(),
    q=quantiles,
    variant=st.sampled_from(["paper", "released"]),
    base=st.floats(0.05, 3.0),
    tau=st.floats(-0.99, 0.99),
)
def test_adaptive_temperature_matches_reference(batch, q, variant, base, tau):
    entropy, mask = batch
    stats = entropy_stats(entropy, mask, quantile=q)
    pivot, lmax, lmin, n = ref_stats(entropy, mask, q)
    t = adaptive_temperature(entropy, stats, base_temperature=base, tau=tau, variant=variant)
    expected = base * (1.0 + tau * ref_h_hat(entropy, pivot, lmax, lmin, variant, n_valid=n))
    t = torch.as_tensor(t).double().expand(entropy.shape)
    torch.testing.assert_close(t, expected, rtol=0,
                               atol=base * abs(tau) * tol(entropy.dtype) + 1e-6 * base)
    # ĥ ∈ [-1, 1]: T within T_base·(1 ± |τ|), so positive for any |τ| < 1 (τ < 0 included)
    assert torch.all(t >= base * (1 - abs(tau)) - 1e-6) and torch.all(t <= base * (1 + abs(tau)) + 1e-6)
    assert torch.all(t > 0)


def test_adaptive_temperature_defaults_and_worked_example():
    logs = torch.tensor([-3.0, -2.0, -1.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    entropy = torch.exp(logs)
    stats = entropy_stats(entropy, torch.ones(6, dtype=torch.bool), quantile=0.5)
    t = adaptive_temperature(entropy, stats)  # base 1, tau 0.05, paper
    expected = 1.0 + 0.05 * torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(torch.as_tensor(t).double(), expected)
    t = adaptive_temperature(entropy, stats, base_temperature=0.6, tau=0.1, variant="released")
    expected = 0.6 * (1.0 + 0.1 * torch.tensor([1.0, 0.5, 0.0, 0.25, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(torch.as_tensor(t).double(), expected)


def test_negative_tau_inverts_the_adaptation():
    """τ < 0 is the mirror image of τ > 0 around T_base: T is lowered where ĥ > 0 (entropy
    above the pivot) and raised where ĥ < 0."""
    entropy = torch.exp(torch.tensor([-3.0, -2.0, -1.0, 0.0, 1.0, 3.0], dtype=torch.float64))
    stats = entropy_stats(entropy, torch.ones(6, dtype=torch.bool), quantile=0.5)
    h = normalized_entropy(entropy, stats)                      # [-1, -0.5, 0, 0.25, 0.5, 1]
    t = torch.as_tensor(adaptive_temperature(entropy, stats, base_temperature=0.8, tau=-0.3)).double()
    torch.testing.assert_close(t, 0.8 * (1.0 - 0.3 * h.double()))
    assert torch.all(t[h > 0] < 0.8) and torch.all(t[h < 0] > 0.8)
    torch.testing.assert_close(t[h == 0], torch.full_like(t[h == 0], 0.8))
    hotter = torch.as_tensor(adaptive_temperature(entropy, stats, base_temperature=0.8, tau=0.3)).double()
    torch.testing.assert_close(t - 0.8, -(hotter - 0.8))
    # "released": ĥ is never negative, so with τ < 0 no token samples above T_base
    released = adaptive_temperature(entropy, stats, base_temperature=0.8, tau=-0.3, variant="released")
    assert torch.all(released <= 0.8 + 1e-6) and torch.any(released < 0.79)


@pytest.mark.parametrize("tau", [1.0, -1.0, 1.5, -3.0, 1.0 - 1e-9, -(1.0 - 1e-9)])
def test_tau_that_would_let_a_temperature_reach_zero_is_refused(tau):
    """|τ| ≥ 1 makes T = T_base·(1 + τ·ĥ) ≤ 0 at ĥ = ∓1; a τ within float32 rounding of ±1
    does too, since T is computed in float32 (1 - 1e-9 rounds to 1)."""
    entropy = torch.tensor([0.01, 0.5, 3.0])
    stats = entropy_stats(entropy, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"tau must be in \(-1, 1\)"):
        adaptive_temperature(entropy, stats, tau=tau)


def test_tau_just_inside_the_bounds_keeps_every_temperature_positive():
    entropy = torch.tensor([0.01, 0.5, 3.0])            # ĥ = -1, ..., 1
    stats = entropy_stats(entropy, torch.ones(3, dtype=torch.bool))
    largest = 1.0 - 2.0 ** -24                          # the largest float32 below 1
    for tau in (largest, -largest, 0.999, -0.999):
        t = adaptive_temperature(entropy, stats, tau=tau)
        assert torch.all(t > 0) and torch.all(torch.isfinite(t)), (tau, t)


def test_adaptive_temperature_without_stats_is_base():
    # The first rollout has no training batch yet: T = T_base.
    entropy = torch.tensor([0.1, 1.0, 3.0])
    t = adaptive_temperature(entropy, None, base_temperature=0.8)
    t = torch.as_tensor(t, dtype=torch.float64).expand(entropy.shape)
    torch.testing.assert_close(t, torch.full((3,), 0.8, dtype=torch.float64))


# --------------------------------------------------------------------------- bad input

BAD = (ValueError, TypeError)


def _good():
    entropy = torch.tensor([[0.5, 1.0, 2.0], [0.1, 3.0, 0.2]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    return entropy, mask, entropy_stats(entropy, mask)


def test_entropy_stats_rejects_mask_shape_mismatch():
    entropy, mask, _ = _good()
    with pytest.raises(BAD, match="mask"):
        entropy_stats(entropy, mask[:, :2])
    with pytest.raises(BAD, match="mask"):
        entropy_stats(entropy, torch.ones(3, 2, dtype=torch.bool))


@pytest.mark.parametrize("q", [-0.1, 1.1, float("nan"), float("inf")])
def test_entropy_stats_rejects_quantile_outside_unit_interval(q):
    entropy, mask, _ = _good()
    with pytest.raises(BAD, match="quantile"):
        entropy_stats(entropy, mask, quantile=q)


def test_entropy_stats_rejects_negative_eps():
    entropy, mask, _ = _good()
    with pytest.raises(BAD, match="eps"):
        entropy_stats(entropy, mask, eps=-1e-8)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (2, 0)])
def test_entropy_stats_of_an_empty_batch_is_the_no_token_statistics(shape):
    """B = 0 (a data-parallel rank with nothing to do): pivot 0, log_max +inf, log_min -inf,
    no NaN; ĥ of an empty batch is empty."""
    stats = entropy_stats(torch.empty(shape), torch.empty(shape, dtype=torch.bool))
    assert float(stats.pivot) == 0.0
    assert float(stats.log_max) == math.inf and float(stats.log_min) == -math.inf
    assert normalized_entropy(torch.empty(shape), stats).shape == shape
    # the one "no statistics yet" value the rollout integrations send is exactly this
    assert tuple(float(v) for v in stats) == NO_ENTROPY_STATS
    assert is_no_entropy_stats(*(float(v) for v in stats))
    assert not is_no_entropy_stats(0.0, 1.0, -1.0)
    # all-masked tokens give the same statistics, and ĥ = 0 from them
    entropy = torch.rand(3, 4) + 0.1
    masked = entropy_stats(entropy, torch.zeros(3, 4, dtype=torch.bool))
    assert tuple(float(v) for v in masked) == NO_ENTROPY_STATS
    assert torch.equal(normalized_entropy(entropy, NO_ENTROPY_STATS), torch.zeros(3, 4))


def test_entropy_stats_rejects_nan_at_valid_tokens_on_cpu():
    """A NaN entropy on a valid token is an upstream fault: an error on CPU, naming
    ``entropy``; NaN at masked positions is ignored."""
    entropy = torch.tensor([[0.5, float("nan"), 2.0], [1.0, 3.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="entropy.*1 NaN"):
        entropy_stats(entropy, mask)
    clean = entropy_stats(entropy, mask.masked_fill(torch.isnan(entropy), 0))
    assert all(torch.isfinite(s) for s in clean)


def test_entropy_stats_propagates_nan_without_a_host_read():
    """Where the NaN count cannot be read back (a compiled graph; accelerators likewise),
    every statistic is NaN instead of silently dropping the token."""
    entropy = torch.tensor([[0.5, float("nan"), 2.0], [1.0, 3.0, 4.0]])
    mask = torch.ones(2, 3)
    torch._dynamo.reset()
    compiled = torch.compile(entropy_stats, fullgraph=True, backend="aot_eager", dynamic=False)
    stats = compiled(entropy, mask)
    assert all(bool(torch.isnan(s)) for s in stats)
    h = normalized_entropy(entropy, stats)
    assert torch.isnan(h).all()
    stats = compiled(entropy, mask.masked_fill(torch.isnan(entropy), 0))
    assert all(torch.isfinite(s) for s in stats)


def test_normalized_entropy_rejects_unknown_variant_and_negative_eps():
    entropy, _, stats = _good()
    with pytest.raises(BAD, match="variant"):
        normalized_entropy(entropy, stats, variant="papers")
    with pytest.raises(BAD, match="eps"):
        normalized_entropy(entropy, stats, eps=-1.0)


@pytest.mark.parametrize("base", [0.0, -1.0, float("nan"), float("inf"), float("-inf")])
def test_adaptive_temperature_rejects_bad_base_temperature(base):
    entropy, _, stats = _good()
    with pytest.raises(BAD, match="base_temperature"):
        adaptive_temperature(entropy, stats, base_temperature=base)


def test_adaptive_temperature_rejects_unknown_variant():
    entropy, _, stats = _good()
    with pytest.raises(BAD, match="variant"):
        adaptive_temperature(entropy, stats, variant="nope")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_adaptive_temperature_dtype_does_not_depend_on_stats(dtype):
    """The entropy's floating dtype promoted to at least float32, with or without stats."""
    entropy = torch.rand(5).to(dtype)
    stats = entropy_stats(entropy.float(), torch.ones(5, dtype=torch.bool))
    with_stats = adaptive_temperature(entropy, stats)
    without = adaptive_temperature(entropy, None)
    assert with_stats.dtype == without.dtype == torch.promote_types(dtype, torch.float32)


def test_one_rule_for_stats_in_adaptive_temperature_and_the_vllm_helper():
    """``stats`` is an EntropyStats or a plain tuple (pivot, log_max, log_min) of numbers or
    tensors, in adaptive_temperature as in the vLLM helper (which needs no vLLM); a dict,
    a list, a tuple of another length or with a non-number are refused by both, naming
    stats."""
    from hapo_ops import EntropyStats
    from hapo_ops.integrations.vllm import parse_sampling_args, sampling_extra_args

    entropy = torch.tensor([0.01, 0.3, 2.0])
    given = EntropyStats(*torch.tensor([-1.0, 1.0, -4.0]))
    want = adaptive_temperature(entropy, given, tau=0.3)
    for stats in (given, tuple(given), (-1.0, 1.0, -4.0), (-1, 1, -4)):
        torch.testing.assert_close(adaptive_temperature(entropy, stats, tau=0.3), want)
        args = parse_sampling_args(sampling_extra_args(stats, tau=0.3))
        torch.testing.assert_close(adaptive_temperature(entropy, args.stats(), tau=args.tau),
                                   want)
    for bad in (given._asdict(), list(given), (-1.0, 1.0), (-1.0, "1.0", -4.0),
                (-1.0, True, -4.0), (-1.0, torch.tensor(1), -4.0)):
        with pytest.raises(TypeError, match=r"stats.*(EntropyStats or a tuple|float)"):
            adaptive_temperature(entropy, bad)
        with pytest.raises(TypeError, match=r"stats.*(EntropyStats or a tuple|float)"):
            sampling_extra_args(bad)


def test_adaptive_temperature_takes_per_token_settings():
    """tau, base_temperature and eps may be tensors (one per token, as the vLLM processor
    has one per request): each token gets exactly the temperature of a call with its own
    floats; out-of-range tensor values are refused on CPU naming the argument."""
    g = torch.Generator().manual_seed(3)
    entropy = torch.rand(6, generator=g) ** 3 * 4
    stats = entropy_stats(torch.rand(50, generator=g) * 3, torch.ones(50))
    tau = torch.tensor([-0.9, -0.2, 0.0, 0.1, 0.5, 0.95])
    base = torch.tensor([0.3, 0.7, 1.0, 1.2, 2.0, 0.9])
    eps = torch.tensor([1e-8, 1e-6, 1e-3, 0.5, 1e-8, 2.0])
    for variant in ("paper", "released"):
        got = adaptive_temperature(entropy, stats, tau=tau, base_temperature=base, eps=eps,
                                   variant=variant)
        for i in range(6):
            want = adaptive_temperature(entropy[i:i + 1], stats, tau=float(tau[i]),
                                        base_temperature=float(base[i]), eps=float(eps[i]),
                                        variant=variant)
            assert torch.equal(got[i:i + 1], want), (variant, i)
    assert torch.equal(adaptive_temperature(entropy, None, base_temperature=base), base)
    for name, kwargs in (("tau", dict(tau=tau.clone().fill_(1.0))),
                         ("base_temperature", dict(base_temperature=base * 0)),
                         ("eps", dict(eps=eps * 0))):
        with pytest.raises(ValueError, match=name):
            adaptive_temperature(entropy, stats, **kwargs)
