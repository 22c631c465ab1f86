"""logprobs_and_entropy / token_logprobs / token_entropy: torch path and Triton kernels
(interpreter on CPU, compiled on CUDA) against float64 references."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hapo_ops
from conftest import HAS_CUDA, IMPL_DEVICES, INTERPRETING, requires_cuda
from hapo_ops import token_stats
from hapo_ops.reference import reference_logits_grad, reference_logprobs_and_entropy

warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy warnings of the interpreter

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Gradient tolerance relative to the largest |grad|: the gradient is rounded to the logits dtype.
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float64: 1e-4}


def _assert_close(name, got, expected, atol, rtol=0.0):
    got = got.double()
    assert not torch.isnan(got).any() or torch.equal(torch.isnan(got), torch.isnan(expected)), \
        f"{name}: unexpected NaN"
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got), finite), f"{name}: finiteness differs"
    err = (got[finite] - expected[finite]).abs()
    bound = atol + rtol * expected[finite].abs()
    assert (err <= bound).all(), f"{name}: max error {err.max().item():.3g}"


def _check_against_reference(logits, labels, temperature, impl, *, grad_logp_scale=1.0,
                             ignore_index=-100, inplace=False):
    """Values and both gradients of ``impl`` on ``logits`` against float64."""
    leaf = logits.detach().clone().requires_grad_()
    work = leaf * 1.0 if inplace else leaf  # in-place backward needs a non-leaf buffer
    logp, entropy = hapo_ops.logprobs_and_entropy(work, labels, temperature=temperature,
                                                  ignore_index=ignore_index, impl=impl,
                                                  inplace_backward=inplace)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert logp.shape == labels.shape and entropy.shape == logits.shape[:-1]
    ref_logp, ref_entropy = reference_logprobs_and_entropy(logits, labels, temperature,
                                                           ignore_index)
    _assert_close("logp", logp.cpu(), ref_logp.cpu(), atol=2e-5, rtol=2e-6)
    _assert_close("entropy", entropy.cpu(), ref_entropy.cpu(), atol=2e-5, rtol=1e-5)

    g_logp = torch.randn(labels.shape, device=logits.device) * grad_logp_scale
    g_entropy = torch.randn(labels.shape, device=logits.device)
    (logp * g_logp + entropy * g_entropy).sum().backward()
    expected = reference_logits_grad(logits, labels, g_logp, g_entropy, temperature, ignore_index)
    scale = expected.abs().max().clamp_min(1e-30).item()
    finite = torch.isfinite(leaf.grad.double())
    assert finite.all(), "gradient has non-finite entries"
    err = (leaf.grad.double() - expected).abs().max().item()
    assert err <= GRAD_RTOL[logits.dtype] * scale + 1e-6, f"grad error {err:.3g} (scale {scale:.3g})"


# On CUDA each new (dtype, block, flags) combination compiles a kernel: fewer examples there.
@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@settings(max_examples=12 if HAS_CUDA else 25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 5), vocab=st.sampled_from([1, 2, 7, 33, 130, 1000]),
       dtype=st.sampled_from(DTYPES), magnitude=st.sampled_from([1.0, 8.0, 30.0]),
       per_token_t=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matches_float64_reference(impl, device, rows, vocab, dtype, magnitude, per_token_t, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, 3, vocab, generator=gen) * magnitude).to(dtype).to(device)
    labels = torch.randint(0, vocab, (rows, 3), generator=gen).to(device)
    labels[0, 1] = -100
    if per_token_t:
        temperature = (torch.rand(rows, 3, generator=gen) * 1.5 + 0.3).to(device)
    else:
        temperature = float(torch.rand((), generator=gen) * 1.5 + 0.3)
    _check_against_reference(logits, labels, temperature, impl)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("vocab", [50257, 151936])
def test_large_odd_vocab_few_rows(impl, device, vocab):
    torch.manual_seed(vocab)
    logits = (torch.randn(2, vocab) * 4).to(torch.bfloat16).to(device)
    labels = torch.tensor([3, vocab - 1], device=device)
    _check_against_reference(logits, labels, torch.tensor([0.7, 1.3], device=device), impl)


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
    rel_h = ((entropy.double() - ref_entropy).abs() / ref_entropy).max().item()
    rel_lp = ((logp.double() - ref_logp).abs() / ref_logp.abs()).max().item()
    assert rel_h < 1e-5, rel_h
    assert rel_lp < 1e-5, rel_lp


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_huge_magnitudes_and_minus_inf_rows(impl, device):
    torch.manual_seed(1)
    logits = torch.randn(4, 300) * 1e4
    logits[1] = float("-inf")
    logits[1, [5, 77, 299]] = torch.tensor([3.0, 2.5, -1.0])
    logits[2] = torch.finfo(torch.float32).min
    logits[2, 10] = 0.0
    labels = torch.tensor([0, 77, 10, 299])
    _check_against_reference(logits.to(device), labels.to(device), 1.0, impl)
    _check_against_reference(logits.to(device), labels.to(device), 1.0, impl, inplace=True)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_ignore_index_gives_zero_logp_and_no_logp_gradient(impl, device):
    logits = torch.randn(5, 40, device=device, requires_grad=True)
    labels = torch.full((5,), 7, device=device)
    labels[[1, 3]] = -1
    logp = hapo_ops.token_logprobs(logits, labels, ignore_index=-1, impl=impl)
    assert logp[1] == 0 and logp[3] == 0 and (logp[[0, 2, 4]] < 0).all()
    logp.sum().backward()
    assert (logits.grad[[1, 3]] == 0).all() and (logits.grad[[0, 2, 4]] != 0).any()
    entropy = hapo_ops.token_entropy(logits.detach(), impl=impl)
    _, ref_entropy = reference_logprobs_and_entropy(logits.detach(), None)
    _assert_close("entropy", entropy, ref_entropy, atol=1e-5)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_single_output_gradients(impl, device):
    logits = torch.randn(3, 2, 50, device=device, dtype=torch.float64).float()
    labels = torch.randint(0, 50, (3, 2), device=device)
    for output in ("logp", "entropy"):
        leaf = logits.clone().requires_grad_()
        if output == "logp":
            hapo_ops.token_logprobs(leaf, labels, impl=impl).sum().backward()
            expected = reference_logits_grad(logits, labels, torch.ones(3, 2, device=device), None)
        else:
            hapo_ops.token_entropy(leaf, impl=impl).sum().backward()
            expected = reference_logits_grad(logits, None, None, torch.ones(3, 2, device=device))
        assert (leaf.grad.double() - expected).abs().max() < 1e-5


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_strided_leading_dims_need_no_copy(impl, device):
    """logits[:, :-1] of a (B, L, V) tensor: rows addressed through two strides."""
    torch.manual_seed(3)
    full = torch.randn(3, 6, 37, device=device)
    sliced = full[:, :-1]
    assert not sliced.is_contiguous()
    labels = torch.randint(0, 37, (3, 5), device=device)
    _check_against_reference(sliced, labels, 0.9, impl)
    _check_against_reference(full[::2, 1:], labels[:2], 1.1, impl)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_equals_out_of_place(impl, device, dtype):
    torch.manual_seed(4)
    logits = (torch.randn(4, 3, 129) * 3).to(dtype).to(device)
    labels = torch.randint(0, 129, (4, 3), device=device)
    temperature = torch.rand(4, 1, device=device) + 0.5
    grads = []
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_()
        work = leaf * 1.0
        logp, entropy = hapo_ops.logprobs_and_entropy(work, labels, temperature=temperature,
                                                      impl=impl, inplace_backward=inplace)
        (logp * 0.5 - entropy).sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


def test_torch_path_chunking_is_invisible(monkeypatch):
    torch.manual_seed(5)
    logits = torch.randn(37, 211)
    labels = torch.randint(0, 211, (37,))
    whole = hapo_ops.logprobs_and_entropy(logits, labels, impl="torch")
    monkeypatch.setattr(token_stats, "TORCH_CHUNK_ELEMENTS", 500)  # 2 rows per chunk
    chunked = hapo_ops.logprobs_and_entropy(logits, labels, impl="torch")
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    _check_against_reference(logits, labels, 1.0, "torch")


@pytest.mark.skipif(not (INTERPRETING or HAS_CUDA), reason="needs Triton (interpreter or CUDA)")
def test_kernels_write_every_output_element():
    """Outputs poisoned with NaN before each launch: an unwritten element would fail."""
    from hapo_ops.kernels import logprob_entropy_backward, logprob_entropy_forward

    device = "cuda" if HAS_CUDA else "cpu"
    torch.manual_seed(6)
    logits = torch.randn(2, 5, 300, device=device)[:, 1:]
    labels = torch.randint(0, 300, (8,), device=device)
    poison = [torch.full(shape, float("nan"), device=device) for shape in ((8,), (8,), (8, 2))]
    logp, entropy, state = logprob_entropy_forward(logits, labels, None, 1.0, -100, out=tuple(poison))
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all() and torch.isfinite(state).all()
    grad = torch.full(logits.shape, float("nan"), device=device)
    logprob_entropy_backward(logits, labels, None, 1.0, state, entropy, torch.ones(8, device=device),
                             torch.ones(8, device=device), -100, out=grad)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_opcheck_and_compile_without_graph_break(impl, device):
    torch.manual_seed(7)
    logits = torch.randn(4, 9, device=device, requires_grad=True)
    labels = torch.randint(0, 9, (4,), device=device)
    temperature = torch.rand(4, device=device) + 0.5
    for t_tensor, t_scalar in ((temperature, 1.0), (None, 0.7)):
        torch.library.opcheck(token_stats._logprobs_entropy_op,
                              (logits, labels, t_tensor, t_scalar, -100, impl, False))

    def loss(z, y, t):
        logp, entropy = hapo_ops.logprobs_and_entropy(z, y, temperature=t, impl=impl)
        return (logp - 0.1 * entropy).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    out = compiled(logits, labels, temperature)
    (grad_compiled,) = torch.autograd.grad(out, logits)
    (grad_eager,) = torch.autograd.grad(loss(logits, labels, temperature), logits)
    assert torch.allclose(out, loss(logits, labels, temperature))
    assert torch.allclose(grad_compiled, grad_eager)


class TestBadInput:
    def test_temperature(self):
        logits, labels = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
        for bad in (0.0, -1.0, float("inf"), float("nan")):
            with pytest.raises(ValueError, match="temperature"):
                hapo_ops.logprobs_and_entropy(logits, labels, temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            hapo_ops.logprobs_and_entropy(logits, labels, temperature=torch.tensor([1.0, 0.0]))
        with pytest.raises(ValueError, match="temperature"):
            hapo_ops.logprobs_and_entropy(logits, labels, temperature=torch.ones(3))
        with pytest.raises(TypeError, match="temperature"):
            hapo_ops.logprobs_and_entropy(logits, labels, temperature="hot")

    def test_labels(self):
        logits = torch.randn(2, 5)
        with pytest.raises(ValueError, match="labels"):
            hapo_ops.logprobs_and_entropy(logits, torch.tensor([0, 5]))
        with pytest.raises(ValueError, match="labels"):
            hapo_ops.logprobs_and_entropy(logits, torch.tensor([-2, 1]))
        with pytest.raises(ValueError, match="labels"):
            hapo_ops.logprobs_and_entropy(logits, torch.zeros(3, dtype=torch.long))
        with pytest.raises(TypeError, match="labels"):
            hapo_ops.logprobs_and_entropy(logits, torch.zeros(2))

    def test_logits_and_impl(self):
        with pytest.raises(TypeError, match="logits"):
            hapo_ops.token_entropy(torch.zeros(2, 5, dtype=torch.long))
        with pytest.raises(ValueError, match="logits"):
            hapo_ops.token_entropy(torch.zeros(0, 5))
        with pytest.raises(ValueError, match="impl"):
            hapo_ops.token_entropy(torch.zeros(2, 5), impl="cuda")
        with pytest.raises(TypeError, match="ignore_index"):
            hapo_ops.token_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long),
                                    ignore_index=1.5)


@requires_cuda
def test_cuda_out_of_range_labels_give_nan_without_validation():
    logits = torch.randn(3, 11, device="cuda")
    labels = torch.tensor([1, 11, -5], device="cuda")
    logp = hapo_ops.token_logprobs(logits, labels)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1:]).all()
    with pytest.raises(ValueError, match="labels"):
        hapo_ops.token_logprobs(logits, labels, validate=True)


@requires_cuda
def test_cuda_int64_addressing_past_2_pow_31():
    """N·V > 2^31: rows at the end of a 5 GB bf16 tensor are still right."""
    vocab, rows = 151936, 14200
    assert rows * vocab > 2**31
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    logp, entropy = hapo_ops.logprobs_and_entropy(logits, labels, impl="triton")
    tail = slice(rows - 4, rows)
    ref_logp, ref_entropy = reference_logprobs_and_entropy(logits[tail], labels[tail])
    _assert_close("logp", logp[tail], ref_logp, atol=2e-5, rtol=2e-6)
    _assert_close("entropy", entropy[tail], ref_entropy, atol=2e-5, rtol=1e-5)
    grad = torch.autograd.grad(hapo_ops.token_entropy(logits.requires_grad_(), impl="triton")[tail].sum(),
                               logits)[0]
    expected = reference_logits_grad(logits[tail].detach(), None, None,
                                     torch.ones(4, device="cuda"))
    assert (grad[tail].double() - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert (grad[: rows - 4] == 0).all()


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_full_vocab_matches_reference(dtype):
    torch.manual_seed(8)
    logits = (torch.randn(64, 151936, device="cuda") * 3).to(dtype)
    labels = torch.randint(0, 151936, (64,), device="cuda")
    labels[::7] = -100
    temperature = torch.rand(64, device="cuda") + 0.5
    _check_against_reference(logits, labels, temperature, "triton")
    _check_against_reference(logits, labels, temperature, "triton", inplace=True)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_at_the_max_and_late_maxima(impl, device, dtype):
    """Equal maxima in one block and across blocks, and a max that only appears in the tail:
    the kernel's tie count and block rescaling must give the exact entropy."""
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
    _check_against_reference(logits, labels, 1.0, impl)
    _, entropy = hapo_ops.logprobs_and_entropy(logits, labels, impl=impl)
    _, ref_entropy = reference_logprobs_and_entropy(logits, labels)
    rel = ((entropy.double() - ref_entropy).abs() / ref_entropy).max().item()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_row_without_finite_logit_is_nan(impl, device):
    logits = torch.full((2, 50), float("-inf"), device=device)
    logits[1, 3] = 0.5
    logp, entropy = hapo_ops.logprobs_and_entropy(logits, torch.tensor([3, 3], device=device),
                                                  impl=impl)
    assert torch.isnan(entropy[0]) and torch.isnan(logp[0])
    assert entropy[1] == 0 and logp[1] == 0


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_nan_logit_gives_nan_not_a_silent_result(impl, device):
    logits = torch.randn(3, 40, device=device)
    logits[1, 7] = float("nan")
    logp, entropy = hapo_ops.logprobs_and_entropy(logits, torch.tensor([1, 2, 3], device=device),
                                                  impl=impl)
    assert torch.isnan(entropy[1]) and torch.isnan(logp[1])
    assert torch.isfinite(entropy[[0, 2]]).all() and torch.isfinite(logp[[0, 2]]).all()
