"""Numerical stability of every log-prob/entropy path (logits op, fused linear head, sampler)
on the inputs where textbook formulas fail: near-deterministic rows, huge logits, ties at the
max, -inf, +inf and NaN entries, and a hand-written float64 reference checked against the
plain definitions."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import hapo_ops
from conftest import IMPL_DEVICES
from hapo_ops.reference import reference_logits_grad, reference_logprobs_and_entropy
from test_logprob_entropy import check_against_reference
from tolerances import GRAD_TOL, VALUE_TOL, assert_close

warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy warnings of the interpreter


def test_reference_matches_the_plain_definitions_at_moderate_entropy():
    """The float64 reference (cancellation-free form) equals -Σ p log p and log_softmax where
    those are accurate (moderate entropy), and its gradient equals autograd's."""
    torch.manual_seed(0)
    logits = torch.randn(6, 4, 50, dtype=torch.float64) * 2
    labels = torch.randint(0, 50, (6, 4))
    temperature = torch.rand(6, 4, dtype=torch.float64) + 0.5
    logp, entropy = reference_logprobs_and_entropy(logits, labels, temperature)
    log_p = torch.log_softmax(logits / temperature[..., None], -1)
    plain_entropy = -(log_p.exp() * log_p).sum(-1)
    assert (entropy > 0.1).all()
    torch.testing.assert_close(entropy, plain_entropy, rtol=1e-12, atol=0)
    torch.testing.assert_close(logp, log_p.gather(-1, labels[..., None])[..., 0], rtol=1e-12,
                               atol=0)
    z = logits.clone().requires_grad_()
    g_logp, g_entropy = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    lp = torch.log_softmax(z / temperature[..., None], -1)
    h = -(lp.exp() * lp).sum(-1)
    ((lp.gather(-1, labels[..., None])[..., 0] * g_logp) + h * g_entropy).sum().backward()
    expected = reference_logits_grad(logits, labels, g_logp, g_entropy, temperature)
    torch.testing.assert_close(expected, z.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_near_deterministic_rows_are_exact(impl, device, dtype):
    """Per-token relative error of H under 1e-5 even when H < 1e-6 (and of the argmax logp)."""
    torch.manual_seed(0)
    vocab = 517
    logits = torch.randn(6, vocab).to(dtype).to(device)
    gaps = torch.tensor([12.0, 20.0, 25.0, 32.0, 40.0, 80.0])
    logits[torch.arange(6), torch.arange(6) * 7] += gaps.to(dtype).to(device)
    labels = (torch.arange(6) * 7).to(device)
    logp, entropy = hapo_ops.logprobs_and_entropy(logits, labels, impl=impl)
    ref_logp, ref_entropy = reference_logprobs_and_entropy(logits, labels)
    assert (ref_entropy < 1e-6).sum() >= 4
    assert_close("entropy", entropy, ref_entropy, (0.0, 1e-5))
    assert_close("logp", logp, ref_logp, (0.0, 1e-5))


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_large_magnitude_logits(impl, device, dtype, temperature):
    """|z| up to 1e4 with ordinary gaps between entries: the max is subtracted in raw units
    before scaling, so logp and H keep per-token relative error ≤ 1e-6 and the gradient is
    as exact as at small magnitudes."""
    torch.manual_seed(2)
    finfo_max = 6e4 if dtype == torch.float16 else 1e4
    offsets = torch.tensor([-finfo_max, -3e3, 0.0, 2.5e3, finfo_max])[:, None]
    logits = (offsets + torch.randn(5, 300) * 3).to(dtype).to(device)
    labels = torch.randint(0, 300, (5,), device=device)
    logp, entropy, _ = check_against_reference(logits, labels, temperature, impl)
    ref_logp, ref_entropy = reference_logprobs_and_entropy(logits, labels, temperature)
    assert_close("logp", logp, ref_logp, (0.0, 1e-6))
    assert_close("entropy", entropy, ref_entropy, (0.0, 1e-6))


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_huge_magnitudes_and_minus_inf_rows(impl, device):
    torch.manual_seed(1)
    logits = torch.randn(4, 300) * 1e4
    logits[1] = float("-inf")
    logits[1, [5, 77, 299]] = torch.tensor([3.0, 2.5, -1.0])
    logits[2] = torch.finfo(torch.float32).min
    logits[2, 10] = 0.0
    labels = torch.tensor([0, 77, 10, 299])
    check_against_reference(logits.to(device), labels.to(device), 1.0, impl)
    check_against_reference(logits.to(device), labels.to(device), 1.0, impl, inplace=True)


def _autograd_float64_grad(logits, labels, temperature, g_logp, g_entropy):
    """∂L/∂z of L = Σ g_logp·log softmax(z/T)[y] + Σ g_entropy·H by autograd in float64
    (the entropy's 0·log 0 terms dropped where p = 0)."""
    z = logits.detach().double().cpu().requires_grad_()
    t = torch.as_tensor(temperature, dtype=torch.float64).cpu()
    log_p = torch.log_softmax(z / (t[..., None] if t.dim() else t), -1)
    p = log_p.exp()
    entropy = -(p * torch.where(p > 0, log_p, 0.0)).sum(-1)
    logp = log_p.gather(-1, labels.cpu()[..., None])[..., 0]
    ((g_logp.double().cpu() * logp).sum() + (g_entropy.double().cpu() * entropy).sum()).backward()
    return z.grad


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("chunk_tokens", [None, 2])
def test_a_label_at_a_minus_inf_logit_has_autograds_gradient(impl, device, inplace,
                                                             chunk_tokens):
    """logp = -inf at a label whose logit is -inf, and ∂logp/∂z = (1[v = y] - p_v)/T there,
    as autograd of log_softmax gives (1/T at the label): no special case."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(5, 37, generator=g) * 3
    labels = torch.randint(0, 37, (5,), generator=g)
    logits[[0, 2, 4], labels[[0, 2, 4]]] = float("-inf")      # the label itself at -inf
    logits[1, :5] = float("-inf")                              # -inf elsewhere only
    temperature = torch.tensor([1.0, 0.7, 1.3, 0.5, 2.0])
    g_logp, g_entropy = torch.randn(5, generator=g), torch.randn(5, generator=g)
    leaf = logits.to(device).requires_grad_()
    work = leaf * 1.0 if inplace else leaf
    logp, entropy = hapo_ops.logprobs_and_entropy(
        work, labels.to(device), temperature=temperature.to(device), impl=impl,
        inplace_backward=inplace, chunk_tokens=chunk_tokens)
    assert (logp[[0, 2, 4]] == float("-inf")).all() and torch.isfinite(logp[[1, 3]]).all()
    (g_logp.to(device) * logp + g_entropy.to(device) * entropy).sum().backward()
    want = _autograd_float64_grad(logits, labels, temperature, g_logp, g_entropy)
    assert torch.isfinite(want).all()
    assert_close("grad", leaf.grad, want, GRAD_TOL[torch.float32])
    rows = torch.tensor([0, 2, 4])
    torch.testing.assert_close(leaf.grad.cpu()[rows, labels[rows]].double(),
                               g_logp[rows].double() / temperature[rows].double())


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_at_the_max_and_late_maxima(impl, device, dtype):
    """Equal maxima in one block and across blocks, and a max that only appears in the tail:
    the tie count and block rescaling must give the exact entropy."""
    vocab = 9000  # two full 4096-blocks and a tail
    logits = torch.randn(5, vocab) * 2
    logits[0, [3, 100, 4095]] = 40.0                # ties inside the first block
    logits[1, [10, 5000, 8999]] = 40.0              # ties across blocks and in the tail
    logits[2, 8998] = 45.0                          # the max only in the tail block
    logits[3, 0] = 30.0
    logits[3, 8500] = 30.0 + 1e-3                   # a later block raises the max a little
    logits[4, :] = 1.0                              # all tied: H = ln V
    logits = logits.to(dtype).to(device)
    labels = torch.tensor([100, 8999, 8998, 0, 17], device=device)
    _, entropy, _ = check_against_reference(logits, labels, 1.0, impl)
    _, ref_entropy = reference_logprobs_and_entropy(logits, labels)
    assert_close("entropy", entropy, ref_entropy, (0.0, 1e-5))


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_row_without_finite_logit_is_nan(impl, device):
    logits = torch.full((2, 50), float("-inf"), device=device)
    logits[1, 3] = 0.5
    logp, entropy = hapo_ops.logprobs_and_entropy(logits, torch.tensor([3, 3], device=device),
                                                  impl=impl)
    assert torch.isnan(entropy[0]) and torch.isnan(logp[0])
    assert entropy[1] == 0 and logp[1] == 0


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_plus_inf_logits_share_the_mass(impl, device):
    """+inf entries are the limit of logits growing together: one of them is a point mass
    (logp 0 there, -inf elsewhere, H = 0), k of them a uniform distribution (H = ln k); the
    gradients stay finite."""
    logits = torch.randn(3, 40, device=device)
    logits[0, 5] = float("inf")
    logits[1, [2, 9, 30]] = float("inf")
    logits[2, 7] = float("inf")
    labels = torch.tensor([5, 9, 8], device=device)
    leaf = logits.clone().requires_grad_()
    logp, entropy = hapo_ops.logprobs_and_entropy(leaf, labels, impl=impl)
    assert logp[0] == 0 and entropy[0] == 0
    assert math.isclose(logp[1].item(), -math.log(3), rel_tol=1e-6)
    assert math.isclose(entropy[1].item(), math.log(3), rel_tol=1e-6)
    assert logp[2] == float("-inf") and entropy[2] == 0
    (logp[:2].sum() + entropy.sum()).backward()
    assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_nan_logit_gives_nan_not_a_silent_result(impl, device):
    logits = torch.randn(3, 40, device=device)
    logits[1, 7] = float("nan")
    logp, entropy = hapo_ops.logprobs_and_entropy(logits, torch.tensor([1, 2, 3], device=device),
                                                  impl=impl)
    assert torch.isnan(entropy[1]) and torch.isnan(logp[1])
    assert torch.isfinite(entropy[[0, 2]]).all() and torch.isfinite(logp[[0, 2]]).all()


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_linear_head_at_large_magnitudes_and_near_determinism(impl, device):
    """The fused linear head shares the statistics: exact for huge logits and H ≪ 1e-6."""
    torch.manual_seed(3)
    hidden = torch.randn(6, 16, device=device)
    weight = torch.randn(70, 16, device=device) * 0.1
    bias = torch.randn(70, device=device)
    bias[[3, 10, 20, 40, 50, 60]] += torch.tensor([1e4, 25.0, 35.0, 0.0, -1e4, 0.0],
                                                  device=device)
    labels = torch.tensor([3, 10, 20, 40, 51, 60], device=device)
    logp, entropy = hapo_ops.linear_logprobs_and_entropy(hidden, weight, labels, bias=bias,
                                                         impl=impl)
    z = hidden.double() @ weight.double().T + bias.double()
    ref_logp, ref_entropy = reference_logprobs_and_entropy(z, labels)
    assert (ref_entropy < 1e-6).sum() >= 2
    assert_close("logp", logp, ref_logp, (VALUE_TOL[torch.float32][0], 1e-5))
    assert_close("entropy", entropy, ref_entropy, (0.0, 1e-4))


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_sampler_on_degenerate_rows(impl, device):
    """Both sampler paths give the documented result on rows with no distribution or a NaN
    logit (token 0, NaN temperature, log-prob and entropy), and a +inf entry is always drawn."""
    logits = torch.randn(4, 64, device=device)
    logits[0] = float("-inf")
    logits[1, 3] = float("nan")
    logits[2, 17] = float("inf")
    stats = hapo_ops.EntropyStats(torch.tensor(-1.0), torch.tensor(1.0), torch.tensor(-5.0))
    out = hapo_ops.adaptive_temperature_sample(logits, stats, seed=3, impl=impl)
    assert out.tokens[:2].tolist() == [0, 0]
    for field in (out.temperature, out.logprobs, out.entropy):
        assert torch.isnan(field[:2].cpu()).all()
        assert torch.isfinite(field[2:].cpu()).all()
    assert out.tokens[2] == 17 and out.logprobs[2] == 0 and out.entropy[2] == 0
