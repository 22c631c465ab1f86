"""logprobs_and_entropy / token_logprobs / token_entropy: torch path and Triton kernels
(interpreter on CPU, compiled on CUDA) against float64 references. Degenerate and extreme
inputs live in test_numerical_stability.py."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hapo_ops
from conftest import HAS_CUDA, IMPL_DEVICES, TRITON_DEVICE, requires_cuda, requires_triton
from hapo_ops.reference import reference_logits_grad, reference_logprobs_and_entropy
from tolerances import GRAD_TOL, VALUE_TOL, assert_close

warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy warnings of the interpreter

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check_against_reference(logits, labels, temperature, impl, *, ignore_index=-100,
                            inplace=False, chunk_tokens=None):
    """Values and both gradients of ``impl`` on ``logits`` against float64, elementwise."""
    leaf = logits.detach().clone().requires_grad_()
    work = leaf * 1.0 if inplace else leaf  # in-place backward needs a non-leaf buffer
    logp, entropy = hapo_ops.logprobs_and_entropy(work, labels, temperature=temperature,
                                                  ignore_index=ignore_index, impl=impl,
                                                  inplace_backward=inplace,
                                                  chunk_tokens=chunk_tokens)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert logp.shape == labels.shape and entropy.shape == logits.shape[:-1]
    ref_logp, ref_entropy = reference_logprobs_and_entropy(logits, labels, temperature,
                                                           ignore_index)
    assert_close("logp", logp, ref_logp, VALUE_TOL[logits.dtype])
    assert_close("entropy", entropy, ref_entropy, VALUE_TOL[logits.dtype])

    g_logp = torch.randn(labels.shape, device=logits.device)
    g_entropy = torch.randn(labels.shape, device=logits.device)
    (logp * g_logp + entropy * g_entropy).sum().backward()
    expected = reference_logits_grad(logits, labels, g_logp, g_entropy, temperature, ignore_index)
    assert_close("grad", leaf.grad, expected, GRAD_TOL[logits.dtype])
    return logp, entropy, leaf.grad


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
    check_against_reference(logits, labels, temperature, impl)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("vocab", [50257, 151936])
def test_large_odd_vocab_few_rows(impl, device, vocab):
    torch.manual_seed(vocab)
    logits = (torch.randn(2, vocab) * 4).to(torch.bfloat16).to(device)
    labels = torch.tensor([3, vocab - 1], device=device)
    check_against_reference(logits, labels, torch.tensor([0.7, 1.3], device=device), impl)


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
    assert_close("entropy", entropy, ref_entropy, VALUE_TOL[torch.float32])


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
        assert_close(output, leaf.grad, expected, GRAD_TOL[torch.float32])


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_strided_leading_dims_need_no_copy(impl, device):
    """logits[:, :-1] of a (B, L, V) tensor: rows addressed through two strides."""
    torch.manual_seed(3)
    full = torch.randn(3, 6, 37, device=device)
    sliced = full[:, :-1]
    assert not sliced.is_contiguous()
    labels = torch.randint(0, 37, (3, 5), device=device)
    check_against_reference(sliced, labels, 0.9, impl)
    check_against_reference(full[::2, 1:], labels[:2], 1.1, impl)


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


def test_torch_path_blocks_are_invisible():
    """Any block size gives bitwise the same results (each row is reduced alone)."""
    torch.manual_seed(5)
    logits = torch.randn(37, 211)
    labels = torch.randint(0, 211, (37,))
    whole = hapo_ops.logprobs_and_entropy(logits, labels, impl="torch")
    for chunk_tokens in (1, 2, 36):
        chunked = hapo_ops.logprobs_and_entropy(logits, labels, impl="torch",
                                                chunk_tokens=chunk_tokens)
        assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    check_against_reference(logits, labels, 1.0, "torch", chunk_tokens=2)


def test_torch_path_math_stays_float32_under_cpu_autocast():
    """CPU autocast lowers some ops (``linalg.vecdot`` among them) to bfloat16; the torch
    path uses none of them, so its results under autocast are bitwise those without it (and
    the same on every thread, since autocast does not reach other threads)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(24, 5000, generator=g) * 3
    labels = torch.randint(0, 5000, (24,), generator=g)
    expected = hapo_ops.logprobs_and_entropy(logits, labels, impl="torch")
    kept = torch.randint(0, 5000, (24, 40), generator=g)
    expected_kept = hapo_ops.token_entropy(logits, impl="torch", kept_ids=kept)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hapo_ops.logprobs_and_entropy(logits, labels, impl="torch")
        got_kept = hapo_ops.token_entropy(logits, impl="torch", kept_ids=kept)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(got_kept, expected_kept)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
# Blocks: every index at once, two indices, one index, and rows inside one index.
@pytest.mark.parametrize("chunk_tokens", [None, 10, 7, 2])
@pytest.mark.parametrize("inplace", [False, True])
def test_backward_on_a_slice(impl, device, chunk_tokens, inplace):
    """``logits[:, :-1]`` (which cannot be viewed as 2-D), with and without
    ``inplace_backward``: the gradient lands in the slice of the base tensor, the last
    position gets none."""
    torch.manual_seed(11)
    base = torch.randn(3, 6, 37, device=device)
    labels = torch.randint(0, 37, (3, 5), device=device)
    leaf = base.clone().requires_grad_()
    work = leaf * 1.0 if inplace else leaf
    logp, entropy = hapo_ops.logprobs_and_entropy(work[:, :-1], labels, impl=impl,
                                                  inplace_backward=inplace,
                                                  chunk_tokens=chunk_tokens)
    g_logp, g_entropy = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    (logp * g_logp + entropy * g_entropy).sum().backward()
    expected = reference_logits_grad(base[:, :-1], labels, g_logp, g_entropy)
    assert_close("grad", leaf.grad[:, :-1], expected, GRAD_TOL[torch.float32])
    assert (leaf.grad[:, -1] == 0).all()


@requires_triton
def test_kernels_write_every_output_element():
    """Every new tensor is filled with NaN (deterministic mode fills uninitialised memory): an
    element a kernel never wrote would show."""
    from hapo_ops.kernels.logprob_entropy import (logprob_entropy_backward,
                                                  logprob_entropy_forward)

    device = TRITON_DEVICE
    torch.manual_seed(6)
    logits = torch.randn(2, 5, 300, device=device)[:, 1:]
    labels = torch.randint(0, 300, (8,), device=device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.isnan(torch.empty(3, device=device)).all()
        logp, entropy, state = logprob_entropy_forward(logits, labels, None, 1.0, -100)
        grad = logprob_entropy_backward(logits, labels, None, 1.0, state, entropy,
                                        torch.ones(8, device=device),
                                        torch.ones(8, device=device), -100)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert torch.isfinite(state).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_opcheck_and_compile_without_graph_break(impl, device):
    torch.manual_seed(7)
    logits = torch.randn(4, 9, device=device, requires_grad=True)
    labels = torch.randint(0, 9, (4,), device=device)
    temperature = torch.rand(4, device=device) + 0.5
    ops = torch.ops.hapo_ops
    for t_tensor, t_scalar in ((temperature, 1.0), (None, 0.7)):
        torch.library.opcheck(ops.logprobs_entropy,
                              (logits, labels, labels, t_tensor, t_scalar, -100, impl, False, 3))
        _, entropy, state, _ = ops.logprobs_entropy(logits.detach(), labels, labels, t_tensor,
                                                    t_scalar, -100, impl, False, 3)
        for g_logp, g_entropy in ((torch.randn(4, device=device), None),
                                  (torch.randn(4, device=device), torch.randn(4, device=device))):
            args = (logits.detach(), labels, t_tensor, t_scalar, state, entropy, g_logp,
                    g_entropy, impl, 3)
            torch.library.opcheck(ops.logprobs_entropy_backward, args)
            torch.library.opcheck(ops.logprobs_entropy_backward_,
                                  (logits.detach().clone(),) + args[1:])

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
        with pytest.raises(ValueError, match="logits"):  # no vocabulary (an empty batch is fine)
            hapo_ops.token_entropy(torch.zeros(2, 0))
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
    assert_close("logp", logp[tail], ref_logp, VALUE_TOL[torch.bfloat16])
    assert_close("entropy", entropy[tail], ref_entropy, VALUE_TOL[torch.bfloat16])
    grad = torch.autograd.grad(hapo_ops.token_entropy(logits.requires_grad_(), impl="triton")[tail].sum(),
                               logits)[0]
    expected = reference_logits_grad(logits[tail].detach(), None, None,
                                     torch.ones(4, device="cuda"))
    assert_close("grad", grad[tail], expected, GRAD_TOL[torch.bfloat16])
    assert (grad[: rows - 4] == 0).all()


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_full_vocab_matches_reference(dtype):
    torch.manual_seed(8)
    logits = (torch.randn(64, 151936, device="cuda") * 3).to(dtype)
    labels = torch.randint(0, 151936, (64,), device="cuda")
    labels[::7] = -100
    temperature = torch.rand(64, device="cuda") + 0.5
    check_against_reference(logits, labels, temperature, "triton")
    check_against_reference(logits, labels, temperature, "triton", inplace=True)




_PEAK_MEMORY_SCRIPT = """
import resource, sys, torch, hapo_ops
torch.manual_seed(0)
logits = torch.randn(512, 151936)
labels = torch.randint(0, 151936, (512,))
hapo_ops.logprobs_and_entropy(logits[:8], labels[:8], impl="torch")  # imports, allocator
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    hapo_ops.logprobs_and_entropy(logits, labels, impl="torch")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024 / (logits.numel() * logits.element_size()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB on Linux")
def test_torch_path_extra_peak_memory_is_under_a_quarter_of_the_logits():
    """Resident-set high-water above the logits (fp32, N = 512, V = 151936, no grad) in a
    fresh process: the torch path's row blocks keep it under 0.25× the logits' bytes."""
    result = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_SCRIPT], capture_output=True,
                            text=True, timeout=300, check=True)
    ratio = float(result.stdout.strip().splitlines()[-1])
    assert ratio <= 0.25, ratio
