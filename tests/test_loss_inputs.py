"""What every policy loss does with its inputs: per-response and per-token ``weights``,
given denominators, 16-bit log-probs, and hyperparameters out of range.

Each loss is checked against a float64 reference (``tests/test_losses.py``) or against its
own float32 result on the same values; none of these references calls the library's
aggregation.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from hapo_ops import (adaptive_clip_bounds, aggregate_loss, cispo_policy_loss,
                      clip_cov_policy_loss, clipped_policy_loss, entropy_stats,
                      gspo_policy_loss, hapo_policy_loss, kl_cov_policy_loss,
                      normalized_entropy, redistribute_advantages)
from test_losses import ref_aggregate, ref_clipped, ref_hapo

F64 = torch.float64
MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
         "seq-mean-token-sum-norm"]


def _hapo(lp, old, adv, mask, **kw):
    entropy = torch.exp(torch.linspace(-8.0, 1.0, mask.numel(), dtype=F64)).reshape(mask.shape)
    # rounded to bfloat16 first, so that every input dtype sees the same values
    entropy = entropy.to(torch.bfloat16).to(lp.dtype)
    return hapo_policy_loss(lp, old, adv, entropy, mask, **kw)


LOSSES = {
    "clipped": functools.partial(clipped_policy_loss, dual_clip=3.0),
    "hapo": _hapo,
    "clip_cov": functools.partial(clip_cov_policy_loss, seed=0, cov_fraction=0.3,
                                  cov_bounds=(-5.0, 5.0), eps_low=0.2, eps_high=0.28),
    "kl_cov": functools.partial(kl_cov_policy_loss, cov_fraction=0.3),
    "gspo": gspo_policy_loss,
    "cispo": cispo_policy_loss,
}


def _batch(seed, B, L, dtype=F64, spread=0.3):
    """(logprobs, old_logprobs, per-response advantages, mask); rows keep a valid token."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, generator=g, dtype=F64) * 3
    lp = old + torch.randn(B, L, generator=g, dtype=F64) * spread
    adv = torch.randn(B, generator=g, dtype=F64)
    mask = torch.rand(B, L, generator=g) < 0.7
    mask[:, 0] = True
    return lp.to(dtype), old.to(dtype), adv.to(dtype), mask


def _run(fn, lp, *args, **kwargs):
    leaf = lp.detach().clone().requires_grad_(True)
    out = fn(leaf, *args, **kwargs)
    out.loss.backward()
    return out, leaf.grad


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("shape", [(3, 5), (4, 4)])  # B != L, and B == L (rows vs columns)
def test_per_response_weights_weight_rows(name, shape):
    """weights of shape (B,) mean one weight per response, like advantages of shape (B,):
    the same as weights[:, None] broadcast over the tokens, whether or not B == L."""
    B, L = shape
    lp, old, adv, mask = _batch(1, B, L)
    w = torch.linspace(0.5, 2.0, B, dtype=F64)
    got, got_grad = _run(LOSSES[name], lp, old, adv, mask, weights=w)
    want, want_grad = _run(LOSSES[name], lp, old, adv, mask, weights=w[:, None].expand(B, L))
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.per_token, want.per_token, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)
    plain, _ = _run(LOSSES[name], lp, old, adv, mask)
    scaled = torch.where(mask, plain.per_token * w[:, None], torch.zeros((), dtype=F64))
    torch.testing.assert_close(got.per_token, scaled, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("agg", MODES)
@pytest.mark.parametrize("per_response", [False, True])
def test_clipped_policy_loss_weights_match_reference(agg, per_response):
    """ℓ·w before aggregation, w detached, against the float64 reference."""
    B, L = 4, 6
    lp, old, adv, mask = _batch(2, B, L)
    g = torch.Generator().manual_seed(3)
    w = torch.rand(B if per_response else (B, L), generator=g, dtype=F64) * 2
    w_tok = w[:, None].expand(B, L) if per_response else w
    out, grad = _run(clipped_policy_loss, lp, old, adv, mask, weights=w.requires_grad_(True),
                     dual_clip=3.0, agg=agg)
    leaf = lp.detach().clone().requires_grad_(True)
    _, per_token = ref_clipped(leaf, old, adv[:, None].expand(B, L), mask, 0.2, 0.28, 3.0)
    want = ref_aggregate(per_token * w_tok.detach(), mask, agg)
    want.backward()
    torch.testing.assert_close(out.loss, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.per_token, (per_token * w_tok).detach(), rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-10, atol=1e-12)
    assert w.grad is None  # detached


@pytest.mark.parametrize("use_loss", [False, True])
def test_gradient_through_per_token_loss(use_loss):
    """per_token is differentiable too: a caller's own reduction of it (alone or with the
    aggregated loss) gets the float64 reference gradient."""
    B, L = 3, 8
    lp, old, adv, mask = _batch(12, B, L, spread=0.4)
    c = torch.linspace(-1.0, 2.0, B * L, dtype=F64).reshape(B, L)
    leaf = lp.detach().clone().requires_grad_(True)
    out = clipped_policy_loss(leaf, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-mean")
    total = (out.per_token * c).sum() + (0.5 * out.loss if use_loss else 0.0)
    total.backward()
    ref_leaf = lp.detach().clone().requires_grad_(True)
    want_loss, per_token = ref_clipped(ref_leaf, old, adv[:, None].expand(B, L), mask, 0.2,
                                       0.28, 3.0, agg="seq-mean-token-mean")
    ((per_token * c).sum() + (0.5 * want_loss if use_loss else 0.0)).backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("per_response", [False, True])
def test_hapo_policy_loss_weights_match_reference(per_response):
    B, L = 3, 7
    lp, old, adv, mask = _batch(4, B, L)
    g = torch.Generator().manual_seed(5)
    w = torch.rand(B if per_response else (B, L), generator=g, dtype=F64) * 2
    w_tok = w[:, None].expand(B, L) if per_response else w
    entropy = torch.exp(torch.randint(-16, 3, (B, L), generator=g).to(F64) / 2)
    out, grad = _run(hapo_policy_loss, lp, old, adv, entropy, mask, weights=w)
    leaf = lp.detach().clone().requires_grad_(True)
    _, per_token = ref_hapo(leaf, old, adv[:, None].expand(B, L), entropy, mask)
    want = ref_aggregate(per_token * w_tok, mask)
    want.backward()
    # ĥ is float32 whatever the input dtype: float32 tolerance
    torch.testing.assert_close(out.loss, want.detach(), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(grad, leaf.grad, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(LOSSES))
def test_weights_off_the_mask_never_leak(name):
    """NaN or inf weights at masked positions change neither the loss nor the gradient."""
    lp, old, adv, mask = _batch(8, 3, 6)
    w = torch.linspace(0.5, 1.5, 18, dtype=F64).reshape(3, 6)
    garbage = torch.where(mask, w, torch.tensor(float("nan"), dtype=F64))
    garbage[~mask & (torch.arange(6) % 2 == 0)] = float("inf")
    got, got_grad = _run(LOSSES[name], lp, old, adv, mask, weights=garbage)
    want, want_grad = _run(LOSSES[name], lp, old, adv, mask, weights=w)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.per_token, want.per_token, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["clipped", "hapo", "clip_cov", "gspo", "cispo"])
def test_tensor_eps_off_the_mask_never_leaks(name):
    """Per-token ε tensors holding NaN (ε_low, ε_high) or inf (ε_high) at masked positions
    give the loss, per-token values, metrics and gradient of ε that is finite there."""
    lp, old, adv, mask = _batch(13, 3, 6)
    eps_low = torch.linspace(0.1, 0.3, 18, dtype=F64).reshape(3, 6)
    eps_high = torch.linspace(0.2, 0.4, 18, dtype=F64).reshape(3, 6)
    nan = torch.tensor(float("nan"), dtype=F64)
    bad_low = torch.where(mask, eps_low, nan)
    bad_high = torch.where(mask, eps_high, nan)
    bad_high[~mask & (torch.arange(6) % 2 == 0)] = float("inf")
    assert (~mask).any()
    got, got_grad = _run(LOSSES[name], lp, old, adv, mask, eps_low=bad_low, eps_high=bad_high)
    want, want_grad = _run(LOSSES[name], lp, old, adv, mask, eps_low=eps_low,
                           eps_high=eps_high)
    for field in want._fields:
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0.0,
                                   atol=0.0, msg=field)
    torch.testing.assert_close(got_grad, want_grad, rtol=0.0, atol=0.0)


def test_weights_bad_input_names_the_argument():
    lp, old, adv, mask = _batch(0, 2, 3)
    for name, fn in LOSSES.items():
        with pytest.raises(TypeError, match="weights"):
            fn(lp, old, adv, mask, weights=torch.ones(2, 3, dtype=torch.int64))
        with pytest.raises(ValueError, match="weights"):
            fn(lp, old, adv, mask, weights=torch.ones(3))       # neither (B,) nor (B, L)
        with pytest.raises(ValueError, match="weights"):
            fn(lp, old, adv, mask, weights=torch.ones(1, 2, 3))


@pytest.mark.parametrize("variant", ["paper", "released"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hapo_policy_loss_is_the_composition_of_the_public_ops(variant, dtype):
    """The fused HAPO loss equals its documented steps run with the public ops: ĥ, the
    adaptive bounds, redistribute_advantages, then clipped_policy_loss."""
    B, L = 5, 11
    lp, old, adv, mask = _batch(10, B, L, dtype=dtype, spread=0.2)
    g = torch.Generator().manual_seed(11)
    entropy = torch.exp(torch.randint(-16, 3, (B, L), generator=g).to(dtype) / 2)
    kw = dict(eps_low=0.15, eps_high=0.25, dual_clip=3.0, agg="seq-mean-token-sum")
    got, got_grad = _run(hapo_policy_loss, lp, old, adv, entropy, mask, variant=variant,
                         alpha=0.7, beta=0.6, **kw)
    h_hat = normalized_entropy(entropy, entropy_stats(entropy, mask), variant=variant)
    h_hat = torch.where(mask, h_hat, 0.0).to(dtype)
    eps_low, eps_high = adaptive_clip_bounds(h_hat, eps_low=0.15, eps_high=0.25, alpha=0.7)
    ratio = torch.where(mask, lp - old, 0.0).clamp(-20.0, 20.0).exp()
    redistributed = redistribute_advantages(adv[:, None].expand(B, L), h_hat, ratio,
                                            eps_low=eps_low, eps_high=eps_high, beta=0.6)
    kw.update(eps_low=eps_low, eps_high=eps_high)
    want, want_grad = _run(clipped_policy_loss, lp, old, redistributed, mask, **kw)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for field in want._fields[:-1]:
        torch.testing.assert_close(getattr(got, field), getattr(want, field), **tol, msg=field)
    torch.testing.assert_close(got_grad, want_grad, **tol)
    # the ĥ it used is returned (bit for bit that of step 1, 0 off the mask); a loss without
    # ĥ returns zeros
    assert got._fields[-1] == "h_hat"
    assert not got.h_hat.requires_grad and got.h_hat.dtype == got.per_token.dtype
    torch.testing.assert_close(got.h_hat, h_hat, rtol=0.0, atol=0.0)
    torch.testing.assert_close(want.h_hat, torch.zeros_like(want.per_token), rtol=0.0, atol=0.0)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_every_loss_returns_h_hat_shaped_like_per_token(name, dtype):
    """The last field ``h_hat``: for the HAPO loss the ĥ it used (float32 for 16-bit inputs,
    0 off the mask, nonzero somewhere on it), for every other loss a zero tensor shaped like
    ``per_token``; detached either way."""
    lp, old, adv, mask = _batch(12, 4, 6, dtype=dtype)
    out, _ = _run(LOSSES[name], lp, old, adv, mask)
    assert out._fields[-1] == "h_hat"
    assert out.h_hat.shape == out.per_token.shape and out.h_hat.dtype == out.per_token.dtype
    assert not out.h_hat.requires_grad
    assert not out.h_hat[~mask].any()
    assert bool(out.h_hat[mask].any()) == (name == "hapo")


# --------------------------------------------------------------------------- empty batches


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_token", [False, True])
def test_an_empty_batch_gives_a_zero_loss_and_gradient(name, shape, dtype, per_token):
    """A data-parallel rank with nothing to train on: (0, L) or (B, 0) inputs give a loss of
    exactly 0, a zero gradient of the input's shape and dtype, empty per-token outputs and
    metrics of 0, with every aggregation and with weights."""
    lp, old = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    adv = torch.zeros(shape if per_token else shape[:1], dtype=dtype)
    weights = torch.ones(shape if per_token else shape[:1], dtype=dtype)
    for agg in (MODES if name != "gspo" else ["seq-mean-token-mean", "token-mean"]):
        out, grad = _run(LOSSES[name], lp, old, adv, torch.ones(shape, dtype=torch.bool),
                         agg=agg, weights=weights)
        assert out.loss.shape == () and float(out.loss.detach()) == 0.0, agg
        assert grad.shape == shape and grad.dtype == dtype and not grad.any()
        assert out.per_token.shape == shape and out.h_hat.shape == shape
        for field in out._fields[2:-1]:
            value = getattr(out, field)
            assert value.shape == () and float(value) == 0.0, (agg, field)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0,)])
def test_empty_aggregation_and_clip_bounds(shape):
    """aggregate_loss of an empty per-token loss is 0 in every mode (given denominators
    too); adaptive_clip_bounds of an empty ĥ gives empty bounds."""
    per_token = torch.zeros(shape, requires_grad=True)
    mask = torch.ones(shape)
    for mode in MODES if len(shape) == 2 else ["token-mean", "token-sum"]:
        for kw in ({}, dict(num_tokens=7, num_sequences=3, normalizer=4.0)):
            loss = aggregate_loss(per_token, mask, mode, **kw)
            loss.backward()
            assert loss.shape == () and float(loss) == 0.0, (mode, kw)
            assert per_token.grad.shape == shape and not per_token.grad.any()
    low, high = adaptive_clip_bounds(torch.zeros(shape), eps_low=0.1, eps_high=0.3, alpha=2.0)
    assert low.shape == high.shape == shape


# --------------------------------------------------------------------------- denominators


@pytest.mark.parametrize("mode,name", [("token-mean", "num_tokens"),
                                       ("seq-mean-token-sum", "num_sequences"),
                                       ("seq-mean-token-mean", "num_sequences"),
                                       ("seq-mean-token-sum-norm", "normalizer")])
def test_given_denominators_are_used_as_given(mode, name):
    """A denominator in (0, 1) divides, it is not raised to 1."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    for value in (0.5, torch.tensor(0.25), 3.0):
        got = aggregate_loss(x, mask, mode, **{name: value})
        want = ref_aggregate(x, mask, mode, **{name: float(value)})
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("mode,name", [("token-mean", "num_tokens"),
                                       ("seq-mean-token-sum", "num_sequences"),
                                       ("seq-mean-token-mean", "num_sequences"),
                                       ("seq-mean-token-sum-norm", "normalizer")])
@pytest.mark.parametrize("value", [0, 0.0, -2.0, float("nan"), float("inf"),
                                   torch.tensor(0), torch.tensor(-1.0),
                                   torch.tensor(float("nan"))])
def test_denominators_must_be_positive(mode, name, value):
    x = torch.randn(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=name):
        aggregate_loss(x, mask, mode, **{name: value})


@pytest.mark.parametrize("name", list(LOSSES))
def test_policy_losses_reject_a_zero_denominator(name):
    lp, old, adv, mask = _batch(0, 2, 3)
    with pytest.raises(ValueError, match="num_tokens"):
        LOSSES[name](lp, old, adv, mask, num_tokens=0)
    with pytest.raises(ValueError, match="num_sequences"):
        LOSSES[name](lp, old, adv, mask, agg="seq-mean-token-mean", num_sequences=0.0)


@pytest.mark.parametrize("mode", MODES)
def test_empty_mask_with_default_denominators_gives_zero(mode):
    x = torch.randn(2, 3, requires_grad=True)
    loss = aggregate_loss(x, torch.zeros(2, 3, dtype=torch.bool), mode)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros(2, 3))


# --------------------------------------------------------------------------- fully masked rows


@pytest.mark.parametrize("mode", ["seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("name", ["clipped", "gspo"])
def test_sequence_means_count_only_rows_with_a_valid_token(mode, name):
    """The default number of sequences counts rows with a valid token: a fully masked row
    (e.g. a response cut to nothing) neither adds to the sum nor to the count."""
    B, L = 5, 4
    lp, old, adv, mask = _batch(6, B, L)
    mask[1] = False
    mask[3] = False
    got = LOSSES[name](lp, old, adv, mask, agg=mode).loss
    rows = mask.any(-1)
    kept = LOSSES[name](lp[rows], old[rows], adv[rows], mask[rows], agg=mode).loss
    torch.testing.assert_close(got, kept, rtol=1e-12, atol=1e-12)
    per_token = LOSSES[name](lp, old, adv, mask, agg="token-sum").per_token
    row_values = per_token.sum(-1)
    if mode == "seq-mean-token-mean":
        row_values = row_values / mask.sum(-1).clamp_min(1)
    torch.testing.assert_close(got, row_values.sum() / 3, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- 16-bit inputs


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_16_bit_inputs_compute_in_float32(name, dtype, agg):
    """16-bit log-probs give the float32 result on the same (upcast) values: loss,
    per-token loss and metrics in float32, the gradient the float32 one in the input dtype."""
    B, L = 4, 9
    lp, old, adv, mask = _batch(7, B, L, spread=0.05)
    lp16, old16, adv16 = lp.to(dtype), old.to(dtype), adv.to(dtype)
    w = torch.linspace(0.5, 1.5, B)
    out16, grad16 = _run(LOSSES[name], lp16, old16, adv16, mask, agg=agg, weights=w.to(dtype))
    out32, grad32 = _run(LOSSES[name], lp16.float(), old16.float(), adv16.float(), mask,
                         agg=agg, weights=w.to(dtype).float())
    for field in out32._fields:
        got, want = getattr(out16, field), getattr(out32, field)
        assert got.dtype == torch.float32, field
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=field)
    assert grad16.dtype == dtype
    torch.testing.assert_close(grad16, grad32.to(dtype), rtol=0.0, atol=0.0)


def test_gspo_clip_band_survives_bf16_inputs():
    """ε = 4e-4 lies below bf16 resolution near 1: the sequence ratio must be computed in
    float32 from the bf16 log-probs, or every ratio rounds to 1 and the clip never acts."""
    old = torch.full((2, 4), -0.015625, dtype=torch.bfloat16)        # -2^-6, exact
    step = torch.tensor(2.0 ** -11, dtype=torch.bfloat16)            # 4.9e-4: above ε_high
    lp = (old + step).to(torch.bfloat16)
    assert torch.all(lp.float() - old.float() == 2.0 ** -11)
    adv = torch.tensor([1.0, 1.0], dtype=torch.bfloat16)
    mask = torch.ones(2, 4, dtype=torch.bool)
    out16 = gspo_policy_loss(lp, old, adv, mask)
    out32 = gspo_policy_loss(lp.float(), old.float(), adv.float(), mask)
    assert float(out32.clip_frac_high) == 1.0
    assert float(out16.clip_frac_high) == 1.0


# --------------------------------------------------------------------------- hyperparameters


def test_negative_alpha_is_rejected():
    h = torch.linspace(-1.0, 1.0, 5)
    with pytest.raises(ValueError, match="alpha"):
        adaptive_clip_bounds(h, alpha=-0.5)
    lp, old, adv, mask = _batch(0, 2, 5)
    with pytest.raises(ValueError, match="alpha"):
        _hapo(lp, old, adv, mask, alpha=-0.1)


@pytest.mark.parametrize("value", [1.0, 1.5, torch.tensor([0.2, 1.2, 0.1, 0.1, 0.1])])
def test_eps_low_at_or_above_one_is_rejected(value):
    """1 - ε_low is the lower ratio bound: ε_low ≥ 1 makes it 0 or negative."""
    with pytest.raises(ValueError, match="eps_low"):
        adaptive_clip_bounds(torch.zeros(5), eps_low=value)
    lp, old, adv, mask = _batch(0, 2, 5)
    for name in ("clipped", "hapo", "gspo", "cispo"):
        with pytest.raises(ValueError, match="eps_low"):
            LOSSES[name](lp, old, adv, mask, eps_low=value)


def test_clip_cov_accepts_its_default_eps_low_of_one_only():
    """Clip-Cov's official runs use ε_low = 1 (lower bound 0: no lower clip); above it the
    bound is negative."""
    lp, old, adv, mask = _batch(0, 2, 5)
    out = clip_cov_policy_loss(lp, old, adv, mask, seed=0)
    assert math.isfinite(float(out.loss))
    with pytest.raises(ValueError, match="eps_low"):
        clip_cov_policy_loss(lp, old, adv, mask, seed=0, eps_low=1.5)


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("name", ["clipped", "hapo"])
@pytest.mark.parametrize("dtype,agg", [(torch.float32, "token-mean"),
                                       (torch.bfloat16, "seq-mean-token-mean")])
def test_fused_losses_compile_with_weights_and_16_bit_inputs(name, dtype, agg):
    """The fused loss (a custom autograd.Function) traces under torch.compile(fullgraph=True)
    with weights, 16-bit log-probs and a per-response aggregation: values, metrics and the
    gradient as in eager mode."""
    lp, old, adv, mask = _batch(9, 4, 7, dtype=dtype)
    w = torch.linspace(0.5, 1.5, 4)

    def step(logp):
        return LOSSES[name](logp, old, adv, mask, weights=w, agg=agg)

    torch._dynamo.reset()
    compiled_step = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=False)
    eager, eager_grad = _run(step, lp)
    compiled, compiled_grad = _run(compiled_step, lp)
    for field in eager._fields:
        torch.testing.assert_close(getattr(compiled, field), getattr(eager, field), rtol=1e-6,
                                   atol=1e-7, msg=field)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=0.0, atol=0.0)


# --------------------------------------------------------------------------- masks


def _mask_ops():
    """(name, op of a mask) for ops across the library that take a (3, 6) token mask."""
    import hapo_ops
    lp, old, adv, _ = _batch(14, 3, 6)
    entropy = torch.exp(torch.linspace(-6.0, 1.0, 18, dtype=F64)).reshape(3, 6)
    rewards, group_ids = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0, 0, 1])
    return [
        ("aggregate_loss", lambda m: aggregate_loss(lp, m)),
        ("clipped", lambda m: clipped_policy_loss(lp, old, adv, m).loss),
        ("hapo", lambda m: hapo_policy_loss(lp, old, adv, entropy, m).loss),
        ("kl_cov", lambda m: kl_cov_policy_loss(lp, old, adv, m).loss),
        ("entropy_stats", lambda m: torch.stack(entropy_stats(entropy, m))),
        ("tlga", lambda m: hapo_ops.token_level_group_advantages(rewards, group_ids, m)),
        ("token_count", lambda m: hapo_ops.global_token_count(m)),
        ("quantile_mask", lambda m: hapo_ops.entropy_quantile_mask(entropy, m)),
    ]


@pytest.mark.parametrize("index", range(8))
def test_a_float_mask_holds_only_0_and_1(index):
    """One mask rule for every op: a float mask of 0 and 1 (and an integer mask, nonzero =
    valid) equals the bool mask; a float mask holding anything else (a weight-like 0.5,
    NaN, 2) is refused naming the mask."""
    name, op = _mask_ops()[index]
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]],
                        dtype=torch.bool)
    want = op(mask)
    for same in (mask.double(), mask.float(), mask.to(torch.int64) * 2):
        torch.testing.assert_close(op(same), want, rtol=0.0, atol=0.0, msg=name)
    for value in (0.5, float("nan"), 2.0):
        bad = mask.double()
        bad[1, 2] = value
        with pytest.raises(ValueError, match=r"mask must hold only 0 and 1"):
            op(bad)
