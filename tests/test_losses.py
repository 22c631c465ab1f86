"""Tests for clipping, the policy losses and their bad input.

References below follow the formulas literally, in float64; gradients are those of
float64 autograd through the reference.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hapo_ops import (
    adaptive_clip_bounds,
    aggregate_loss,
    clipped_policy_loss,
    entropy_stats,
    hapo_policy_loss,
)
from test_entropy_signal import ref_stats  # one float64 reference for the stats

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
BAD = (ValueError, TypeError)
MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
F64 = torch.float64


# --------------------------------------------------------------------------- reference


def ref_h_hat(entropy, pivot, log_max, log_min, variant="paper", eps=1e-8, n_valid=1):
    ell = torch.log(entropy.detach().double().clamp_min(eps))
    if n_valid == 0:
        return torch.zeros_like(ell)
    up = (ell - pivot) / max(log_max - pivot, eps)
    if variant == "paper":
        down = (ell - pivot) / max(pivot - log_min, eps)
    else:
        down = (pivot - ell) / max(pivot - log_min, eps)
    return torch.where(ell > pivot, up, down).clamp(-1.0, 1.0)


def ref_bounds(h, eps_low, eps_high, alpha):
    h = h.double()
    el = torch.where(h <= 0, eps_low * (1 - alpha * h), torch.full_like(h, eps_low))
    eh = torch.where(h > 0, eps_high * (1 + alpha * h), torch.full_like(h, eps_high))
    return el, eh


def ref_redistribute(adv, h, ratio, el, eh, beta):
    inside = (ratio > 1 - el / 2) & (ratio < 1 + eh / 2)
    scale = ((h > 0) & ~inside) | ((h <= 0) & inside)
    return torch.where(scale, adv * (1 + beta * h), adv)


def ref_aggregate(per_token, mask, mode="token-mean", num_tokens=None, num_sequences=None, normalizer=None):
    """token-mean: sum / num_tokens (default: valid tokens; 0 when there are none)
    token-sum: sum
    seq-mean-token-sum: sum_i (sum_t) / num_sequences (default: rows with a valid token)
    seq-mean-token-mean: sum_i (sum_t / L_i) / num_sequences (same default; an empty row
        adds 0)
    seq-mean-token-sum-norm: sum_i (sum_t) / normalizer (default L), as veRL's agg_loss.
    A default denominator of 0 (nothing valid) gives 0."""
    m = mask.bool()
    x = torch.where(m, per_token, torch.zeros_like(per_token))
    B, L = m.shape
    row_sum = x.sum(-1)
    row_len = m.sum(-1).to(x.dtype)
    f = lambda v: float(v) if v is not None else None  # noqa: E731
    if mode == "token-mean":
        d = f(num_tokens) if num_tokens is not None else float(row_len.sum())
        return x.sum() / d if d > 0 else x.sum() * 0.0
    if mode == "token-sum":
        return x.sum()
    rows = sum(1 for i in range(B) if m[i].any())  # responses with a valid token
    n_seq = f(num_sequences) if num_sequences is not None else max(rows, 1)
    if mode == "seq-mean-token-sum":
        return row_sum.sum() / n_seq
    if mode == "seq-mean-token-mean":
        return (row_sum / row_len.clamp_min(1)).sum() / n_seq
    if mode == "seq-mean-token-sum-norm":
        return row_sum.sum() / (f(normalizer) if normalizer is not None else L)
    raise AssertionError(mode)


def ref_clipped(lp, old, adv, mask, eps_low, eps_high, dual_clip=None, log_ratio_clamp=20.0, agg="token-mean"):
    """lp: float64 leaf (requires grad). Returns (loss, per_token)."""
    m = mask.bool()
    zero = torch.zeros((), dtype=F64)
    lp = torch.where(m, lp, zero)
    old = torch.where(m, old.double(), zero)
    adv = torch.where(m, adv.double(), zero)
    r = torch.exp(torch.clamp(lp - old, -log_ratio_clamp, log_ratio_clamp))
    el = torch.as_tensor(eps_low, dtype=F64)
    eh = torch.as_tensor(eps_high, dtype=F64)
    clipped = torch.minimum(torch.maximum(r, 1 - el), 1 + eh)
    loss = torch.maximum(-adv * r, -adv * clipped)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    per_token = torch.where(m, loss, zero)
    return ref_aggregate(per_token, m, agg), per_token


def ref_hapo_parts(entropy, mask, stats_values, variant, eps_low, eps_high, alpha, quantile):
    m = mask.bool()
    ent = torch.where(m, entropy.double(), torch.ones((), dtype=F64))  # masked garbage is irrelevant
    if stats_values is None:
        pivot, lmax, lmin, n = ref_stats(entropy, mask, quantile)
    else:
        (pivot, lmax, lmin), n = stats_values, 1
    h = ref_h_hat(ent, pivot, lmax, lmin, variant, n_valid=n)
    el, eh = ref_bounds(h, eps_low, eps_high, alpha)
    return h, el, eh


def ref_hapo(lp, old, adv, entropy, mask, *, stats_values=None, variant="paper", eps_low=0.2, eps_high=0.2,
             alpha=1.0, beta=1.0, quantile=0.8, dual_clip=10.0, agg="token-mean"):
    m = mask.bool()
    h, el, eh = ref_hapo_parts(entropy, mask, stats_values, variant, eps_low, eps_high, alpha, quantile)
    with torch.no_grad():
        zero = torch.zeros((), dtype=F64)
        lr = torch.where(m, lp.double(), zero) - torch.where(m, old.double(), zero)
        r = torch.exp(lr.clamp(-20.0, 20.0))
        adv2 = ref_redistribute(torch.where(m, adv.double(), zero), h, r, el, eh, beta)
    return ref_clipped(lp, old, adv2, mask, el, eh, dual_clip, 20.0, agg)


# --------------------------------------------------------------------------- helpers


def loss_of(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def rtol_for(dtype):
    return 2e-5 if dtype == torch.float32 else 1e-10


def check_scalar(got, want, scale, dtype):
    got, want, scale = (float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for v in (got, want, scale))
    assert math.isfinite(got)
    assert abs(got - want) <= rtol_for(dtype) * (abs(scale) + abs(want)) + 1e-12, (got, want)


def check_elementwise(got, want, dtype, where=None):
    got, want = got.detach().double(), want.detach().double()
    if where is not None:
        got, want = got[where], want[where]
    if want.numel() == 0:
        return
    rtol = 1e-4 if dtype == torch.float32 else 1e-9
    atol = rtol * 1e-2 * float(want.abs().max()) + 1e-12
    bad = (got - want).abs() > rtol * want.abs() + atol
    assert not bad.any(), f"mismatch at {bad.nonzero().tolist()[:5]}: got {got[bad][:5]} want {want[bad][:5]}"


def nudge_from_kinks(lr, kinks, margin=2e-3, step=5e-3):
    """Move log-ratios that sit within `margin` of a kink/discontinuity of the loss."""
    for _ in range(10):
        near = torch.zeros_like(lr, dtype=torch.bool)
        for k in kinks:
            near |= (lr - k).abs() < margin
        if not near.any():
            return lr
        lr = torch.where(near, lr + step, lr)
    return lr


def log_kinks(el, eh, dual_clip, clamp=20.0, neutral=False):
    el = torch.as_tensor(el, dtype=F64)
    eh = torch.as_tensor(eh, dtype=F64)
    ks = [torch.log((1 - el).clamp_min(1e-30)), torch.log(1 + eh), torch.tensor(clamp, dtype=F64),
          torch.tensor(-clamp, dtype=F64)]
    if neutral:
        ks += [torch.log(1 - el / 2), torch.log(1 + eh / 2)]
    if dual_clip is not None:
        ks.append(torch.tensor(math.log(dual_clip), dtype=F64))
    return ks


@st.composite
def loss_batches(draw):
    B = draw(st.integers(1, 6))
    L = draw(st.integers(1, 10))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    mask_dtype = draw(st.sampled_from([torch.bool, dtype]))
    agg = draw(st.sampled_from(MODES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, L, generator=g) < 0.75
    mask[torch.rand(B, generator=g) < 0.15] = False  # zero-length responses
    old = -torch.rand(B, L, generator=g, dtype=F64) * 6
    lr = torch.randn(B, L, generator=g, dtype=F64) * 0.3
    lr[torch.rand(B, L, generator=g) < 0.1] = 0.0
    far = torch.rand(B, L, generator=g) < 0.05
    lr[far] = 25.0 * torch.sign(torch.randn(int(far.sum()), generator=g, dtype=F64))
    adv = torch.randn(B, L, generator=g, dtype=F64) * 1.5
    if draw(st.booleans()):
        adv = adv[:, :1].expand(B, L).clone()  # one advantage per response, broadcast
    adv[torch.rand(B, L, generator=g) < 0.05] = 0.0
    entropy = torch.exp(torch.randint(-24, 5, (B, L), generator=g).to(F64) / 2)
    entropy[torch.rand(B, L, generator=g) < 0.1] = 0.0
    return dict(
        dtype=dtype, mask=mask.to(mask_dtype), old=old.to(dtype), lr=lr, adv=adv.to(dtype),
        entropy=entropy.to(dtype), agg=agg, seed=seed,
    )


def make_logprobs(batch, kinks):
    lr = nudge_from_kinks(batch["lr"], kinks)
    return (batch["old"].double() + lr).to(batch["dtype"])


def run_impl(fn, lp, *args, **kwargs):
    lp_impl = lp.detach().clone().requires_grad_()
    out = fn(lp_impl, *args, **kwargs)
    loss = loss_of(out)
    loss.backward()
    return out, loss, lp_impl.grad


def run_ref(fn, lp, *args, **kwargs):
    lp64 = lp.detach().double().requires_grad_()
    loss, per_token = fn(lp64, *args, **kwargs)
    loss.backward()
    return loss.detach(), per_token.detach(), lp64.grad


# --------------------------------------------------------------------------- adaptive_clip_bounds


@settings(max_examples=100, **SETTINGS)
@given(
    h=st.lists(st.floats(-1.0, 1.0) | st.sampled_from([-1.0, 0.0, 1.0]), min_size=1, max_size=30),
    eps_low=st.floats(0.0, 0.5),
    eps_high=st.floats(0.0, 0.5),
    alpha=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_adaptive_clip_bounds_matches_reference_and_never_narrows(h, eps_low, eps_high, alpha, dtype):
    h = torch.tensor(h, dtype=dtype)
    el, eh = adaptive_clip_bounds(h, eps_low=eps_low, eps_high=eps_high, alpha=alpha)
    want_l, want_h = ref_bounds(h, eps_low, eps_high, alpha)
    check_elementwise(torch.as_tensor(el).expand(h.shape), want_l, dtype)
    check_elementwise(torch.as_tensor(eh).expand(h.shape), want_h, dtype)
    tiny = 1e-6 if dtype == torch.float32 else 1e-12
    assert torch.all(torch.as_tensor(el).double() >= eps_low - tiny)
    assert torch.all(torch.as_tensor(eh).double() >= eps_high - tiny)


def test_adaptive_clip_bounds_worked_example():
    h = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=F64)
    el, eh = adaptive_clip_bounds(h)  # eps 0.2 / 0.2, alpha 1
    torch.testing.assert_close(el, torch.tensor([0.4, 0.3, 0.2, 0.2, 0.2], dtype=F64))
    torch.testing.assert_close(eh, torch.tensor([0.2, 0.2, 0.2, 0.3, 0.4], dtype=F64))
    el, eh = adaptive_clip_bounds(h.reshape(1, 5, 1), eps_low=0.1, eps_high=0.3, alpha=0.5)
    assert el.shape == eh.shape == (1, 5, 1)
    torch.testing.assert_close(el.reshape(-1), torch.tensor([0.15, 0.125, 0.1, 0.1, 0.1], dtype=F64))
    torch.testing.assert_close(eh.reshape(-1), torch.tensor([0.3, 0.3, 0.3, 0.375, 0.45], dtype=F64))


# --------------------------------------------------------------------------- clipped_policy_loss


@settings(max_examples=100, **SETTINGS)
@given(
    batch=loss_batches(),
    eps=st.sampled_from([(0.2, 0.2), (0.2, 0.28), (0.1, 0.3), (0.0, 0.0)]),
    tensor_eps=st.booleans(),
    dual_clip=st.sampled_from([None, 3.0, 10.0]),
)
def test_clipped_policy_loss_matches_reference(batch, eps, tensor_eps, dual_clip):
    dtype, mask, agg = batch["dtype"], batch["mask"], batch["agg"]
    eps_low, eps_high = eps
    if tensor_eps:
        g = torch.Generator().manual_seed(batch["seed"] + 1)
        eps_low = (0.05 + 0.25 * torch.rand(mask.shape, generator=g, dtype=F64)).to(dtype)
        eps_high = (0.05 + 0.25 * torch.rand(mask.shape, generator=g, dtype=F64)).to(dtype)
    lp = make_logprobs(batch, log_kinks(eps_low, eps_high, dual_clip))
    old, adv = batch["old"], batch["adv"]
    out, loss, grad = run_impl(
        clipped_policy_loss, lp, old, adv, mask, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, agg=agg
    )
    want, want_tok, want_grad = run_ref(ref_clipped, lp, old, adv, mask, eps_low, eps_high, dual_clip, 20.0, agg)
    assert loss.dim() == 0
    valid = mask.bool()
    scale = ref_aggregate(want_tok.abs(), mask, agg)
    check_scalar(loss, want, scale, dtype)
    assert torch.isfinite(out.per_token).all()
    check_elementwise(out.per_token, want_tok, dtype, where=valid)
    assert torch.isfinite(grad).all()
    check_elementwise(grad, want_grad, dtype)

    # properties on the implementation's own per-token values
    r = torch.exp((lp.double() - old.double()).clamp(-20, 20))
    el = torch.as_tensor(eps_low, dtype=F64)
    eh = torch.as_tensor(eps_high, dtype=F64)
    inside = valid & (r >= 1 - el) & (r <= 1 + eh)
    check_elementwise(out.per_token, -adv.double() * r, dtype, where=inside)  # = -A r inside the clip range
    if dual_clip is not None:
        neg = valid & (adv < 0)
        cap = -adv.double() * dual_clip
        assert torch.all(out.per_token.double()[neg] <= cap[neg] * (1 + 1e-5) + 1e-6)


def test_clipped_policy_loss_worked_example_and_gradient():
    r = torch.tensor([1.0, 1.5, 0.5, 0.5, 1.5, 4.0, 4.0, 1.0], dtype=F64)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -2.0, 7.0], dtype=F64)
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    old = torch.full((8,), -1.0, dtype=F64)
    lp = (old + torch.log(r)).reshape(1, 8)
    old, adv, mask = old.reshape(1, 8), adv.reshape(1, 8), mask.reshape(1, 8)
    lp[0, 7] = float("nan")  # masked garbage
    out, loss, grad = run_impl(clipped_policy_loss, lp, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    per_token = torch.tensor([-1.0, -1.28, -0.5, 0.8, 1.5, 3.0, 6.0], dtype=F64)
    torch.testing.assert_close(out.per_token[0, :7].double(), per_token)
    assert float(loss.detach()) == pytest.approx(8.52 / 7, rel=1e-12)
    want_grad = torch.tensor([[-1.0, 0.0, -0.5, 0.0, 1.5, 0.0, 0.0, 0.0]], dtype=F64) / 7
    torch.testing.assert_close(grad, want_grad)
    out = clipped_policy_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28)  # no dual clip
    assert float(out.loss) == pytest.approx(11.52 / 7, rel=1e-12)
    assert out._fields[0] == "loss"
    for name in ("loss", "per_token", "clip_frac_low", "clip_frac_high", "approx_kl"):
        assert isinstance(getattr(out, name), torch.Tensor), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_fractions_and_approx_kl(dtype):
    B, L = 3, 5
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, -1] = False
    old = -torch.rand(B, L, dtype=dtype)
    # masked positions hold the opposite extreme; they must not be counted
    out = clipped_policy_loss(old.clone(), old, torch.ones(B, L, dtype=dtype), mask)
    for name in ("clip_frac_low", "clip_frac_high", "approx_kl"):
        v = getattr(out, name)
        assert v.dim() == 0 and float(v) == pytest.approx(0.0, abs=1e-7), name
    lp = old + math.log(2.0)
    lp[:, -1] = old[:, -1] + math.log(0.1)
    adv = torch.ones(B, L, dtype=dtype)
    adv[:, -1] = -1.0
    out = clipped_policy_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert float(out.clip_frac_high) == pytest.approx(1.0)
    assert float(out.clip_frac_low) == pytest.approx(0.0)
    assert math.isfinite(float(out.approx_kl))
    lp = old + math.log(0.5)
    lp[:, -1] = old[:, -1] + math.log(10.0)
    adv = -torch.ones(B, L, dtype=dtype)
    adv[:, -1] = 1.0
    out = clipped_policy_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert float(out.clip_frac_low) == pytest.approx(1.0)
    assert float(out.clip_frac_high) == pytest.approx(0.0)
    for name in ("clip_frac_low", "clip_frac_high"):
        v = float(getattr(out, name))
        assert 0.0 <= v <= 1.0


def _batch_with_garbage(seed, B, L, dtype):
    """(generator, mask, old_logprobs, logprobs, advantages, garbage values) for the tests
    that fill masked positions with NaN/inf; every row has a valid first token."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, L, generator=g) < 0.6
    mask[:, 0] = True
    old = -torch.rand(B, L, generator=g, dtype=dtype) * 3
    lp = old + 0.3 * torch.randn(B, L, generator=g, dtype=dtype)
    adv = torch.randn(B, L, generator=g, dtype=dtype)
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    return g, mask, old, lp, adv, bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("agg", MODES)
@pytest.mark.parametrize("garbage_in", ["logprobs", "all"])
def test_clipped_policy_loss_masked_nan_inf_never_leak(dtype, agg, garbage_in):
    g, mask, old, lp, adv, bad = _batch_with_garbage(3, 4, 6, dtype)
    B, L = mask.shape
    pick = torch.randint(0, 3, (B, L), generator=g)
    lp = torch.where(mask, lp, bad[pick])
    if garbage_in == "all":
        old = torch.where(mask, old, bad[(pick + 1) % 3])
        adv = torch.where(mask, adv, bad[(pick + 2) % 3])
    for dual_clip in (None, 3.0):
        out, loss, grad = run_impl(clipped_policy_loss, lp, old, adv, mask, dual_clip=dual_clip, agg=agg)
        assert torch.isfinite(loss), (dual_clip, loss)
        assert torch.isfinite(out.per_token).all()
        assert torch.isfinite(grad).all()
        assert torch.all(grad[~mask] == 0)
        want, _, want_grad = run_ref(ref_clipped, lp, old, adv, mask, 0.2, 0.28, dual_clip, 20.0, agg)
        check_scalar(loss, want, abs(float(want)) + 1, dtype)
        check_elementwise(grad, want_grad, dtype)
        for name in ("clip_frac_low", "clip_frac_high", "approx_kl"):
            assert torch.isfinite(getattr(out, name)), name


@pytest.mark.parametrize("agg", MODES)
def test_clipped_policy_loss_no_valid_tokens_is_finite(agg):
    lp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = clipped_policy_loss(lp, torch.zeros(2, 3), torch.ones(2, 3), mask, agg=agg)
    assert torch.isfinite(out.loss) and float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert torch.isfinite(lp.grad).all() and torch.all(lp.grad == 0)
    for name in ("clip_frac_low", "clip_frac_high", "approx_kl"):
        assert torch.isfinite(getattr(out, name)), name


# --------------------------------------------------------------------------- aggregate_loss


@st.composite
def aggregate_cases(draw):
    B = draw(st.integers(1, 8))
    L = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    mask_dtype = draw(st.sampled_from([torch.bool, dtype]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, generator=g, dtype=F64).to(dtype)
    mask = torch.rand(B, L, generator=g) < 0.7
    mask[torch.rand(B, generator=g) < 0.2] = False  # zero-length rows
    cuts = sorted(set(draw(st.lists(st.integers(1, max(B - 1, 1)), max_size=4))) - {B})
    as_tensor = draw(st.booleans())
    return x, mask.to(mask_dtype), cuts, as_tensor


@settings(max_examples=60, **SETTINGS)
@given(case=aggregate_cases(), mode=st.sampled_from(MODES))
def test_aggregate_loss_is_exact_across_micro_batches(case, mode):
    x, mask, cuts, as_tensor = case
    B, L = mask.shape
    n_tok = int(mask.bool().sum()) + 3  # any global denominators, e.g. summed over ranks
    n_seq = B + 2
    norm = 2 * L + 1
    wrap = (lambda v: torch.tensor(v)) if as_tensor else (lambda v: v)
    kw = dict(num_tokens=wrap(n_tok), num_sequences=wrap(n_seq), normalizer=wrap(norm))
    full = aggregate_loss(x, mask, mode, **kw)
    assert full.dim() == 0 and torch.isfinite(full)
    bounds = [0] + cuts + [B]
    parts = [aggregate_loss(x[a:b], mask[a:b], mode, **kw) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    total = torch.stack([p.double() for p in parts]).sum()
    want = ref_aggregate(x.double(), mask, mode, n_tok, n_seq, norm)
    scale = ref_aggregate(x.double().abs(), mask, mode, n_tok, n_seq, norm)
    check_scalar(full, want, scale, x.dtype)
    check_scalar(total, want, scale, x.dtype)


@settings(max_examples=60, **SETTINGS)
@given(case=aggregate_cases(), mode=st.sampled_from(MODES))
def test_aggregate_loss_default_denominators(case, mode):
    x, mask, _, _ = case  # rows may be fully masked: they do not count as sequences
    got = aggregate_loss(x, mask, mode)
    want = ref_aggregate(x.double(), mask, mode)
    scale = ref_aggregate(x.double().abs(), mask, mode)
    check_scalar(got, want, scale, x.dtype)
    B, L = mask.shape
    rows = int(mask.bool().any(-1).sum())
    explicit = aggregate_loss(x, mask, mode, num_tokens=int(mask.bool().sum()) or None,
                              num_sequences=rows or None, normalizer=L)
    check_scalar(explicit, want, scale, x.dtype)


def test_aggregate_loss_worked_example():
    # the third response is fully masked: it is not a sequence of the sequence means
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [9.0, 9.0, 9.0, 9.0]],
                     dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    want = {
        "token-mean": 10.0 / 4,
        "token-sum": 10.0,
        "seq-mean-token-sum": (6.0 + 4.0) / 2,
        "seq-mean-token-mean": (2.0 + 4.0) / 2,
        "seq-mean-token-sum-norm": 10.0 / 4,  # divided by L = 4 (veRL: sum / normalizer)
    }
    for mode, v in want.items():
        assert float(aggregate_loss(x, mask, mode)) == pytest.approx(v), mode
    assert float(aggregate_loss(x, mask)) == pytest.approx(2.5)  # default token-mean
    assert float(aggregate_loss(x, mask, "seq-mean-token-sum-norm", normalizer=8)) == pytest.approx(10.0 / 8)
    assert float(aggregate_loss(x, mask, "token-mean", num_tokens=10)) == pytest.approx(1.0)
    assert float(aggregate_loss(x, mask, "seq-mean-token-mean", num_sequences=4)) == pytest.approx(1.5)


# --------------------------------------------------------------------------- hapo_policy_loss


def _hapo_kinks(batch, stats_values, variant, eps_low, eps_high, alpha, quantile, dual_clip):
    _, el, eh = ref_hapo_parts(batch["entropy"], batch["mask"], stats_values, variant, eps_low, eps_high, alpha, quantile)
    return log_kinks(el, eh, dual_clip, neutral=True)


@settings(max_examples=100, **SETTINGS)
@given(
    batch=loss_batches(),
    variant=st.sampled_from(["paper", "released"]),
    eps=st.sampled_from([(0.2, 0.2), (0.2, 0.28), (0.1, 0.3)]),
    alpha=st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0.0, 1.0),
    beta=st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0.0, 1.0),
    quantile=st.sampled_from([0.0, 0.5, 0.8, 1.0]),
    dual_clip=st.sampled_from([3.0, 10.0]),
    given_stats=st.booleans(),
)
def test_hapo_policy_loss_matches_reference(batch, variant, eps, alpha, beta, quantile, dual_clip, given_stats):
    dtype, mask, agg = batch["dtype"], batch["mask"], batch["agg"]
    eps_low, eps_high = eps
    old, adv, entropy = batch["old"], batch["adv"], batch["entropy"]
    stats = stats_values = None
    if given_stats:  # stats from another batch
        g = torch.Generator().manual_seed(batch["seed"] + 7)
        other = torch.exp(torch.randint(-20, 3, (7,), generator=g).to(F64) / 2).to(dtype)
        stats = entropy_stats(other, torch.ones(7, dtype=torch.bool), quantile=0.5)
        stats_values = (float(stats.pivot), float(stats.log_max), float(stats.log_min))
    lp = make_logprobs(batch, _hapo_kinks(batch, stats_values, variant, eps_low, eps_high, alpha, quantile, dual_clip))
    kw = dict(variant=variant, eps_low=eps_low, eps_high=eps_high, alpha=alpha, beta=beta, quantile=quantile,
              dual_clip=dual_clip, agg=agg)
    out, loss, grad = run_impl(hapo_policy_loss, lp, old, adv, entropy, mask, stats=stats, **kw)
    want, want_tok, want_grad = run_ref(ref_hapo, lp, old, adv, entropy, mask, stats_values=stats_values, **kw)
    assert loss.dim() == 0
    # l = ln H and h_hat may be computed in float32 whatever the input dtype (nothing fixes
    # their precision, and the log-prob/entropy op returns float32 anyway): compare
    # at float32 tolerance. Exactness in float64 is checked where h_hat can not matter
    # (test_hapo_with_alpha_beta_zero_equals_clipped_loss).
    tdt = torch.float32
    scale = ref_aggregate(want_tok.abs(), mask, agg)
    check_scalar(loss, want, scale, tdt)
    per_token = getattr(out, "per_token", None)
    if per_token is not None:
        assert torch.isfinite(per_token).all()
        check_elementwise(per_token, want_tok, tdt, where=mask.bool())
    assert torch.isfinite(grad).all()
    check_elementwise(grad, want_grad, tdt)


@settings(max_examples=60, **SETTINGS)
@given(
    batch=loss_batches(),
    variant=st.sampled_from(["paper", "released"]),
    eps=st.sampled_from([(0.2, 0.2), (0.2, 0.28), (0.1, 0.3)]),
    dual_clip=st.sampled_from([3.0, 10.0]),
)
def test_hapo_with_alpha_beta_zero_equals_clipped_loss(batch, variant, eps, dual_clip):
    # alpha = 0 makes the bounds exactly the base eps and beta = 0 the advantages exactly A,
    # whatever h_hat is: the two losses must agree to the precision of the input dtype.
    dtype, mask, agg = batch["dtype"], batch["mask"], batch["agg"]
    eps_low, eps_high = eps
    old, adv, entropy = batch["old"], batch["adv"], batch["entropy"]
    lp = make_logprobs(batch, log_kinks(eps_low, eps_high, dual_clip))
    out_h, loss_h, grad_h = run_impl(
        hapo_policy_loss, lp, old, adv, entropy, mask, variant=variant, eps_low=eps_low, eps_high=eps_high,
        alpha=0.0, beta=0.0, dual_clip=dual_clip, agg=agg,
    )
    out_c, loss_c, grad_c = run_impl(
        clipped_policy_loss, lp, old, adv, mask, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, agg=agg
    )
    scale = float(aggregate_loss(out_c.per_token.detach().abs(), mask, agg))
    check_scalar(loss_h, loss_c, scale, dtype)
    if getattr(out_h, "per_token", None) is not None:
        check_elementwise(out_h.per_token, out_c.per_token, dtype, where=mask.bool())
    check_elementwise(grad_h, grad_c, dtype)


def test_hapo_worked_example():
    # ln H = -3, -2, -1, 0, 1 (one row, all valid); q = 0.5 -> pivot -1 (k = 3)
    # paper h_hat = -1, -0.5, 0, 0.5, 1
    # bounds (0.2/0.2, alpha 1): eps_low' = 0.4, 0.3, 0.2, 0.2, 0.2; eps_high' = 0.2, 0.2, 0.2, 0.3, 0.4
    # ratios 1.0, 1.0, 1.0, 1.0, 2.0; advantages all 1 (beta 1)
    #   token 0: h <= 0, r in N (0.8, 1.1) -> A' = 1 * (1 - 1) = 0 -> loss 0
    #   token 1: h <= 0, r in N (0.85, 1.1) -> A' = 0.5 -> loss -0.5
    #   token 2: h = 0 -> A' = 1 -> loss -1
    #   token 3: h > 0, r in N (0.9, 1.15) -> A' = 1 -> loss -1
    #   token 4: h > 0, r = 2 not in N -> A' = 2; clip at 1 + 0.4 -> loss -2 * 1.4 = -2.8
    entropy = torch.exp(torch.tensor([[-3.0, -2.0, -1.0, 0.0, 1.0]], dtype=F64))
    mask = torch.ones(1, 5, dtype=torch.bool)
    old = torch.full((1, 5), -0.5, dtype=F64)
    lp = old + torch.log(torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0]], dtype=F64))
    adv = torch.ones(1, 5, dtype=F64)
    out, loss, grad = run_impl(hapo_policy_loss, lp, old, adv, entropy, mask, quantile=0.5)
    assert float(loss.detach()) == pytest.approx((0.0 - 0.5 - 1.0 - 1.0 - 2.8) / 5, rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.5, -1.0, -1.0, 0.0]], dtype=F64) / 5)
    # released: h_hat = 1, 0.5, 0, 0.5, 1 -> all tokens use the "h > 0" rules but token 2
    #   eps_high' = 0.4, 0.3, 0.2, 0.3, 0.4; tokens 0, 1, 3 in N -> A' = 1; token 4 -> -2.8
    out, loss, grad = run_impl(hapo_policy_loss, lp, old, adv, entropy, mask, quantile=0.5, variant="released")
    assert float(loss.detach()) == pytest.approx((-1.0 - 1.0 - 1.0 - 1.0 - 2.8) / 5, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["paper", "released"])
@pytest.mark.parametrize("garbage_in", ["logprobs", "all"])
def test_hapo_masked_nan_inf_never_leak(dtype, variant, garbage_in):
    g, mask, old, lp, adv, bad = _batch_with_garbage(5, 4, 7, dtype)
    B, L = mask.shape
    entropy = torch.exp(torch.randint(-20, 3, (B, L), generator=g).to(dtype) / 2)
    pick = torch.randint(0, 3, (B, L), generator=g)
    lp = torch.where(mask, lp, bad[pick])
    if garbage_in == "all":
        old = torch.where(mask, old, bad[(pick + 1) % 3])
        adv = torch.where(mask, adv, bad[(pick + 2) % 3])
        entropy = torch.where(mask, entropy, bad[pick])
    out, loss, grad = run_impl(hapo_policy_loss, lp, old, adv, entropy, mask, variant=variant)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    assert torch.all(grad[~mask] == 0)
    want, _, want_grad = run_ref(ref_hapo, lp, old, adv, entropy, mask, variant=variant)
    check_scalar(loss, want, abs(float(want)) + 1, torch.float32)  # h_hat may be float32
    check_elementwise(grad, want_grad, torch.float32)


def test_hapo_no_gradient_through_entropy_or_advantages():
    g = torch.Generator().manual_seed(11)
    B, L = 3, 5
    mask = torch.ones(B, L, dtype=torch.bool)
    old = -torch.rand(B, L, generator=g, dtype=F64)
    lp = (old + 0.2 * torch.randn(B, L, generator=g, dtype=F64)).requires_grad_()
    adv = torch.randn(B, L, generator=g, dtype=F64).requires_grad_()
    entropy = torch.rand(B, L, generator=g, dtype=F64).add(0.01).requires_grad_()
    loss = loss_of(hapo_policy_loss(lp, old, adv, entropy, mask))
    loss.backward()
    assert lp.grad is not None
    assert entropy.grad is None or torch.all(entropy.grad == 0)
    # the advantages enter the loss linearly, but only through the redistributed values
    # computed under no-grad: nothing puts a gradient requirement on them beyond finiteness
    assert adv.grad is None or torch.isfinite(adv.grad).all()


def test_hapo_no_valid_tokens_is_finite():
    lp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = hapo_policy_loss(lp, torch.zeros(2, 3), torch.ones(2, 3), torch.rand(2, 3), mask)
    loss = loss_of(out)
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0
    loss.backward()
    assert torch.all(lp.grad == 0)


# --------------------------------------------------------------------------- bad input


def _loss_inputs():
    B, L = 2, 3
    lp = -torch.rand(B, L)
    return lp, lp.clone(), torch.randn(B, L), torch.rand(B, L), torch.ones(B, L, dtype=torch.bool)


def test_adaptive_clip_bounds_rejects_negative_eps():
    h = torch.zeros(3)
    with pytest.raises(BAD, match="eps_low"):
        adaptive_clip_bounds(h, eps_low=-0.1)
    with pytest.raises(BAD, match="eps_high"):
        adaptive_clip_bounds(h, eps_high=-0.1)


def test_clipped_policy_loss_rejects_bad_input():
    lp, old, adv, _, mask = _loss_inputs()
    with pytest.raises(BAD, match="old_logprobs"):
        clipped_policy_loss(lp, old[:, :2], adv, mask)
    with pytest.raises(BAD, match="advantages"):
        clipped_policy_loss(lp, old, torch.randn(2, 4), mask)
    with pytest.raises(BAD, match="mask"):
        clipped_policy_loss(lp, old, adv, mask[:1])
    with pytest.raises(BAD, match="eps_low"):
        clipped_policy_loss(lp, old, adv, mask, eps_low=-0.2)
    with pytest.raises(BAD, match="eps_high"):
        clipped_policy_loss(lp, old, adv, mask, eps_high=-0.2)
    for c in (1.0, 0.5, -3.0):
        with pytest.raises(BAD, match="dual_clip"):
            clipped_policy_loss(lp, old, adv, mask, dual_clip=c)
    with pytest.raises(BAD, match="agg"):
        clipped_policy_loss(lp, old, adv, mask, agg="token_mean")


def test_clipped_policy_loss_rejects_dtype_mismatch():
    lp, old, adv, _, mask = _loss_inputs()
    with pytest.raises(BAD, match="old_logprobs"):
        clipped_policy_loss(lp, old.double(), adv, mask)


def test_aggregate_loss_rejects_bad_input():
    x = torch.randn(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(BAD, match="mode"):
        aggregate_loss(x, mask, "seq-mean")
    with pytest.raises(BAD, match="mask"):
        aggregate_loss(x, mask[:, :2])


def test_hapo_policy_loss_rejects_bad_input():
    lp, old, adv, ent, mask = _loss_inputs()
    with pytest.raises(BAD, match="variant"):
        hapo_policy_loss(lp, old, adv, ent, mask, variant="official")
    for q in (-0.5, 1.5):
        with pytest.raises(BAD, match="quantile"):
            hapo_policy_loss(lp, old, adv, ent, mask, quantile=q)
    with pytest.raises(BAD, match="dual_clip"):
        hapo_policy_loss(lp, old, adv, ent, mask, dual_clip=1.0)
    with pytest.raises(BAD, match="entropy"):
        hapo_policy_loss(lp, old, adv, ent[:, :2], mask)
    with pytest.raises(BAD, match="eps_low"):
        hapo_policy_loss(lp, old, adv, ent, mask, eps_low=-0.2)
    with pytest.raises(BAD, match="eps_high"):
        hapo_policy_loss(lp, old, adv, ent, mask, eps_high=-0.2)
    with pytest.raises(BAD, match="agg"):
        hapo_policy_loss(lp, old, adv, ent, mask, agg="sum")
    for beta in (3.0, 1.0 + 1e-9, -0.5):       # β ∉ [0, 1] could flip an advantage's sign
        with pytest.raises(ValueError, match="beta"):
            hapo_policy_loss(lp, old, adv, ent, mask, beta=beta)


def test_neutral_zone_edges_are_outside_and_zero_h_hat_changes_nothing():
    """N = (1 - ε_low/2, 1 + ε_high/2) is open: a ratio exactly on an edge is outside it
    (scaled when ĥ > 0), one ulp inside is inside (kept); ĥ = 0 leaves A and ε unchanged."""
    from hapo_ops import redistribute_advantages
    eps = 0.5  # edges 0.75 and 1.25, exact in binary
    ratio = torch.tensor([0.75, 1.25, math.nextafter(0.75, 1.0), math.nextafter(1.25, 1.0),
                          0.75, 1.0], dtype=torch.float64)
    h_hat = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    adv = torch.full((6,), 2.0, dtype=torch.float64)
    out = redistribute_advantages(adv, h_hat, ratio, eps_low=eps, eps_high=eps, beta=1.0)
    assert out.tolist() == [3.0, 3.0, 2.0, 2.0, 2.0, 2.0]
    below = redistribute_advantages(adv, -h_hat, ratio, eps_low=eps, eps_high=eps, beta=1.0)
    assert below.tolist() == [2.0, 2.0, 1.0, 1.0, 2.0, 2.0]
    low, high = adaptive_clip_bounds(torch.zeros(3), eps_low=0.2, eps_high=0.3, alpha=1.0)
    assert (low == 0.2).all() and (high == 0.3).all()


def _logprobs_with_exact_ratio(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 log-probs ``lp`` (old log-probs 0) with exp(lp) == target exactly where some
    lp within 16 ulps of log(target) has it, and the mask of those positions."""
    lp = torch.log(target)
    best, hit = lp.clone(), torch.zeros_like(target, dtype=torch.bool)
    for direction in (torch.full_like(lp, math.inf), torch.full_like(lp, -math.inf)):
        cand = lp.clone()
        for _ in range(16):
            ok = ~hit & (torch.exp(cand) == target)
            best, hit = torch.where(ok, cand, best), hit | ok
            cand = torch.nextafter(cand, direction)
    return best, hit


@pytest.mark.parametrize("eps_kind", ["float", "tensor"])
def test_hapo_loss_redistributes_exactly_as_redistribute_advantages_on_neutral_edges(eps_kind):
    """Ratios exactly on the float32 edges 1 - ε_low'/2 and 1 + ε_high'/2 of the widened
    bounds are outside the open neutral zone in the loss as in ``redistribute_advantages``:
    the per-token loss equals, bit for bit, ``clipped_policy_loss`` with the redistributed
    advantages and the widened bounds."""
    from hapo_ops import normalized_entropy, redistribute_advantages
    g = torch.Generator().manual_seed(7)
    B, L = 4, 64
    entropy = torch.rand(B, L, generator=g) * 3.0
    mask = torch.ones(B, L, dtype=torch.bool)
    if eps_kind == "float":
        eps_low, eps_high = 0.2, 0.28
    else:
        eps_low = 0.1 + 0.3 * torch.rand(B, L, generator=g)
        eps_high = 0.1 + 0.3 * torch.rand(B, L, generator=g)
    stats = entropy_stats(entropy, mask, quantile=0.5)
    h_hat = normalized_entropy(entropy, stats).float()
    low, high = adaptive_clip_bounds(h_hat, eps_low=eps_low, eps_high=eps_high, alpha=1.0)
    on_low = torch.arange(L).remainder(2).eq(0).expand(B, L)
    target = torch.where(on_low, 1.0 - low / 2, 1.0 + high / 2)
    lp, exact = _logprobs_with_exact_ratio(target)
    old = torch.zeros(B, L)
    ratio = torch.exp(lp - old)
    assert exact.sum() >= B * L // 2 and (ratio[exact] == target[exact]).all()
    adv = torch.randn(B, generator=g)
    kw = dict(dual_clip=10.0, log_ratio_clamp=20.0)
    got = hapo_policy_loss(lp.clone().requires_grad_(True), old, adv, entropy, mask,
                           stats=stats, eps_low=eps_low, eps_high=eps_high, alpha=1.0,
                           beta=1.0, **kw)
    redistributed = redistribute_advantages(adv[:, None].expand(B, L), h_hat, ratio,
                                            eps_low=low, eps_high=high, beta=1.0)
    # the edges are outside N: scaled where ĥ > 0, kept where ĥ ≤ 0
    edge = exact
    want_edge = torch.where(h_hat > 0, adv[:, None] * (1.0 + h_hat), adv[:, None].expand(B, L))
    assert torch.equal(redistributed[edge], want_edge[edge])
    want = clipped_policy_loss(lp.clone().requires_grad_(True), old, redistributed, mask,
                               eps_low=low, eps_high=high, **kw)
    assert torch.equal(got.per_token, want.per_token)
