"""linear_logprobs_and_entropy: torch path and Triton kernels (interpreter on CPU, compiled on
CUDA) against float64 references of hidden · weightᵀ + bias, values and all three gradients.

Tolerances follow the dtype, elementwise. Values: the logits are never rounded to the input
dtype (bf16 and fp16 products are exact in fp32 and accumulate in fp32), so logp and H match
float64 of the same inputs to fp32 accuracy for every dtype. Gradients are sums over V (or N)
of products whose terms are rounded to the input dtype (the Triton path rounds dz to it
before the two GEMMs, as the unfused path's logits gradient is): their error is relative to
the terms, not to the sum, so the absolute floor scales with the gradient's RMS.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import hapo_ops
from conftest import (HAS_CUDA, IMPL_DEVICES, INTERPRETING, TRITON_DEVICE, requires_cuda,
                      requires_triton)
from hapo_ops.vocab.linear_logprob_entropy import (CHUNK_TOKENS, CHUNK_VOCAB,
                                             linear_logprobs_and_entropy)
from hapo_ops.reference import reference_logits_grad, reference_logprobs_and_entropy
from hapo_ops.vocab.row_statistics import RowStatistics, combine_parts, parts_reducers
from tolerances import VALUE_TOL, assert_close

warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy warnings of the interpreter

# Several token and vocabulary blocks even at test sizes (odd sizes: ragged ends); on the
# Triton path, dz buffers smaller than one token tile.
SMALL_BLOCKS = {"chunk_tokens": 7, "chunk_vocab": 29}
# rtol of a gradient relative to the sum of its terms' magnitudes: the logits gradient dz is
# rounded to the input dtype before the GEMMs (the Triton path, as the unfused one), each
# block's product is rounded again, and so is the output: about four roundings of 2^-8 for
# bf16 and of 2^-11 for fp16.
LINEAR_GRAD_TOL = {torch.float32: (2e-6, 1e-4), torch.bfloat16: (2e-6, 2e-2),
                   torch.float16: (2e-6, 4e-3), torch.float64: (1e-9, 1e-6)}


def _inputs(n, d, v, dtype, device, *, seed=0, bias=True, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=gen) * scale).to(dtype)
    weight = (torch.randn(v, d, generator=gen) / d ** 0.5 * 2).to(dtype)
    b = (torch.randn(v, generator=gen) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    return (hidden.to(device), weight.to(device), None if b is None else b.to(device),
            labels.to(device), gen)


def _reference(hidden, weight, bias, labels, temperature, ignore_index, g_logp, g_entropy):
    """float64 (logp, H, d_hidden, d_weight, d_bias) through the closed-form logits gradient."""
    h, w = hidden.double().reshape(-1, hidden.shape[-1]), weight.double()
    z = h @ w.T
    if bias is not None:
        z = z + bias.double()
    flat_t = temperature
    if isinstance(temperature, torch.Tensor):
        flat_t = temperature.expand(labels.shape).reshape(-1)
    flat_labels = labels.reshape(-1)
    logp, entropy = reference_logprobs_and_entropy(z, flat_labels, flat_t, ignore_index)
    dz = reference_logits_grad(z, flat_labels, None if g_logp is None else g_logp.reshape(-1),
                               None if g_entropy is None else g_entropy.reshape(-1), flat_t,
                               ignore_index)
    # Each gradient with the sum of the magnitudes of all the terms it adds up (those of dz
    # included): the scale of its rounding error.
    terms = _dz_term_magnitudes(z, flat_labels, flat_t, ignore_index, g_logp, g_entropy,
                                entropy)
    return (logp.view(labels.shape), entropy.view(labels.shape),
            ((dz @ w).view(hidden.shape), (terms @ w.abs()).view(hidden.shape)),
            (dz.T @ h, terms.T @ h.abs()), (dz.sum(0), terms.sum(0)))


def _dz_term_magnitudes(z, labels, temperature, ignore_index, g_logp, g_entropy, entropy):
    """[|g_lp|·(1[v=y] + p_v) + |g_H|·p_v·(|log p_v| + H)] / T per logit, float64."""
    t = torch.as_tensor(temperature, dtype=torch.float64).reshape(-1, 1) \
        if isinstance(temperature, torch.Tensor) else float(temperature)
    log_p = torch.log_softmax(z / t, dim=-1)
    p = log_p.exp()
    terms = torch.zeros_like(z)
    if g_entropy is not None:
        g = g_entropy.reshape(-1, 1).double().abs()
        terms += g * torch.where(p > 0, p * (log_p.abs() + entropy[:, None]), 0.0)
    if g_logp is not None:
        g = torch.where(labels == ignore_index, 0.0, g_logp.reshape(-1).double()).abs()
        terms += g[:, None] * p
        terms.scatter_add_(-1, labels.clamp_min(0)[:, None], g[:, None])
    return terms / t


def _assert_grad(name, got, expected, dtype):
    """Elementwise |got - ref| ≤ atol + rtol·Σ|terms| with the dtype's (atol, rtol):
    ``expected`` is (gradient, sum of the magnitudes of the terms it sums), the error model
    of a rounded dot product (see the module docstring)."""
    assert got is not None, f"{name}: no gradient"
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    value, magnitude = expected
    atol, rtol = LINEAR_GRAD_TOL[dtype]
    got = got.detach().double().cpu()
    value, magnitude = value.cpu(), magnitude.cpu()
    assert torch.isfinite(got).all(), f"{name}: non-finite entries"
    err = (got - value).abs()
    bad = err > atol + rtol * magnitude
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {err.numel()} elements out of "
                           f"tolerance, worst error {err.max().item():.3g}")


def _check(hidden, weight, bias, labels, impl, *, temperature=1.0, ignore_index=-100,
           grads=("logp", "entropy"), seed=0, blocks=SMALL_BLOCKS):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    logp, entropy = linear_logprobs_and_entropy(h, w, labels, bias=b, temperature=temperature,
                                                ignore_index=ignore_index, impl=impl, **blocks)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert logp.shape == labels.shape and entropy.shape == labels.shape
    gen = torch.Generator().manual_seed(seed + 1)
    g_logp = torch.randn(labels.shape, generator=gen).to(labels.device) \
        if "logp" in grads else None
    g_entropy = torch.randn(labels.shape, generator=gen).to(labels.device) \
        if "entropy" in grads else None
    ref = _reference(hidden, weight, bias, labels, temperature, ignore_index, g_logp, g_entropy)
    value_tol = (1e-9, 1e-9) if hidden.dtype == torch.float64 else VALUE_TOL[hidden.dtype]
    if hidden.dtype == torch.float64:  # fp64 math, fp32 outputs
        value_tol = VALUE_TOL[torch.float32]
    assert_close("logp", logp, ref[0], value_tol)
    assert_close("entropy", entropy, ref[1], value_tol)
    loss = sum((out * g).sum() for out, g in ((logp, g_logp), (entropy, g_entropy))
               if g is not None)
    loss.backward()
    _assert_grad("d_hidden", h.grad, ref[2], hidden.dtype)
    _assert_grad("d_weight", w.grad, ref[3], weight.dtype)
    if bias is not None:
        _assert_grad("d_bias", b.grad, ref[4], bias.dtype)


# --------------------------------------------------------------------------- values, gradients


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,v", [(5, 17, 37), (33, 48, 300)])
def test_matches_float64_reference(impl, device, dtype, n, d, v):
    hidden, weight, bias, labels, gen = _inputs(n, d, v, dtype, device, seed=n + d + v)
    labels[1] = -100
    temperature = (torch.rand(n, generator=gen) * 1.5 + 0.3).to(device)
    _check(hidden, weight, bias, labels, impl, temperature=temperature)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_float64_inputs_on_the_torch_path(impl, device):
    hidden, weight, bias, labels, _ = _inputs(9, 20, 61, torch.float64, device)
    if impl == "triton":
        with pytest.raises(TypeError, match="hidden"):
            linear_logprobs_and_entropy(hidden, weight, labels, impl=impl)
        return
    _check(hidden, weight, bias, labels, impl, temperature=0.7)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@settings(max_examples=8 if INTERPRETING or HAS_CUDA else 25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 20), d=st.integers(1, 40), v=st.integers(1, 140),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), use_bias=st.booleans(),
       per_token_t=st.booleans(), scale=st.sampled_from([0.5, 3.0, 10.0]),
       seed=st.integers(0, 2**31 - 1))
def test_random_shapes(impl, device, n, d, v, dtype, use_bias, per_token_t, scale, seed):
    hidden, weight, bias, labels, gen = _inputs(n, d, v, dtype, device, seed=seed,
                                                bias=use_bias, scale=scale)
    if per_token_t:
        temperature = (torch.rand(n, generator=gen) * 1.5 + 0.3).to(device)
    else:
        temperature = float(torch.rand((), generator=gen) * 1.5 + 0.3)
    _check(hidden, weight, bias, labels, impl, temperature=temperature, seed=seed)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_batch_shape_broadcast_temperature_and_custom_ignore_index(impl, device):
    hidden, weight, bias, labels, _ = _inputs(2 * 6, 24, 45, torch.float32, device, seed=3)
    hidden, labels = hidden.view(2, 6, 24), labels.view(2, 6)
    labels[0, 2] = labels[1, 5] = -1
    temperature = torch.tensor([[0.6], [1.4]], device=device)  # per sequence
    _check(hidden, weight, bias, labels, impl, temperature=temperature, ignore_index=-1)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("grads", [("logp",), ("entropy",)])
def test_one_output_carries_the_gradient(impl, device, grads):
    hidden, weight, bias, labels, _ = _inputs(10, 16, 50, torch.float32, device, seed=4)
    _check(hidden, weight, bias, labels, impl, grads=grads)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_frozen_head_and_all_ignored(impl, device):
    hidden, weight, _, labels, _ = _inputs(6, 16, 40, torch.float32, device, seed=5)
    labels[:] = -100
    h = hidden.clone().requires_grad_()
    logp, entropy = linear_logprobs_and_entropy(h, weight, labels, impl=impl)
    assert torch.equal(logp, torch.zeros_like(logp))
    logp.sum().backward()  # only ignored log-probs: zero gradient
    assert torch.equal(h.grad, torch.zeros_like(h))
    h.grad = None
    logp, entropy = linear_logprobs_and_entropy(h, weight, labels, impl=impl)
    entropy.sum().backward()
    ref = _reference(hidden, weight, None, labels, 1.0, -100, None, torch.ones(6))
    _assert_grad("d_hidden", h.grad, ref[2], torch.float32)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_near_deterministic_rows_are_exact(impl, device, dtype):
    """Per-token relative error of H under 1e-5 also where H < 1e-6. Inputs are multiples of
    1/4 so that the logits themselves are exact in fp32: what is tested is the statistics."""
    gen = torch.Generator().manual_seed(0)
    n, d, v = 6, 24, 83
    hidden = torch.zeros(n, d)
    weight = torch.zeros(v, d)
    hidden[:, :16] = (torch.randn(n, 16, generator=gen) * 2).round() / 4
    weight[:, :16] = (torch.randn(v, 16, generator=gen) * 2).round() / 4
    gaps = torch.tensor([12.0, 20.0, 25.0, 32.0, 40.0, 80.0])
    targets = torch.arange(n) * 7 + 3
    hidden[torch.arange(n), 16 + torch.arange(n)] = 1.0
    weight[targets, 16 + torch.arange(n)] = gaps
    hidden, weight = hidden.to(dtype).to(device), weight.to(dtype).to(device)
    labels = targets.to(device)
    logp, entropy = linear_logprobs_and_entropy(hidden, weight, labels, impl=impl)
    ref_logp, ref_entropy, *_ = _reference(hidden, weight, None, labels, 1.0, -100, None, None)
    assert (ref_entropy < 1e-6).sum() >= 3
    assert_close("entropy", entropy, ref_entropy, (0.0, 1e-5))
    assert_close("logp", logp, ref_logp, (0.0, 1e-5))


@requires_triton
def test_triton_vocab_splits_merge_exactly():
    """The forward's per-split statistics combine to the single-split result."""
    from hapo_ops.kernels.linear_logprob_entropy import linear_forward
    hidden, weight, bias, labels, _ = _inputs(19, 20, 150, torch.float32, TRITON_DEVICE, seed=6)
    labels[0] = -100
    inv_t = torch.full((19,), 1 / 0.8, device=TRITON_DEVICE)
    every = torch.ones((), dtype=torch.bool, device=TRITON_DEVICE)

    def combined(splits):
        parts = RowStatistics.from_columns(linear_forward(hidden, weight, bias, labels, None,
                                                          0.8, "ieee", splits=splits))
        assert parts.row_max.shape[0] == splits or splits > 10
        return combine_parts(parts, every, inv_t, **parts_reducers())[0]

    one = combined(1)
    for splits in (3, 10):  # 10 = the number of vocabulary tiles at BLOCK_V = 16
        for a, b in zip(one, combined(splits)):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_tokens", [None, 16])
def test_triton_backward_dz_buffer_sizes(dtype, chunk_tokens):
    """One dz buffer for every token (the default at test sizes) or several."""
    hidden, weight, bias, labels, gen = _inputs(33, 40, 150, dtype, TRITON_DEVICE, seed=8)
    labels[4] = -100
    temperature = (torch.rand(33, generator=gen) + 0.5).to(TRITON_DEVICE)
    _check(hidden, weight, bias, labels, "triton", temperature=temperature,
           blocks={"chunk_tokens": chunk_tokens})


# --------------------------------------------------------------------------- memory


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.max_op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.max_numel:
                self.max_numel, self.max_op = t.numel(), str(func)
        return out


def test_torch_path_never_allocates_n_by_v():
    n, d, v = 256, 16, 2000
    hidden, weight, bias, labels, _ = _inputs(n, d, v, torch.bfloat16, "cpu", seed=7)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    with _LargestTensor() as mode:
        logp, entropy = linear_logprobs_and_entropy(h, w, labels, bias=b, impl="torch",
                                                    chunk_tokens=32, chunk_vocab=128)
        (logp.sum() + entropy.sum()).backward()
    bound = max(32 * 128, n * d, v * d)  # one block, or the inputs' / gradients' size
    assert mode.max_numel <= bound, (mode.max_numel, mode.max_op)
    assert mode.max_numel < n * v // 8


@pytest.mark.slow
def test_default_blocks_stay_under_a_sixteenth_of_the_logits():
    """At the real default block sizes (no argument), forward and backward: no tensor is
    larger than one block, and N×V is 16 blocks here (the RL-step sizes have hundreds)."""
    n, d, v = 2 * CHUNK_TOKENS, 8, 8 * CHUNK_VOCAB
    hidden, weight, _, labels, _ = _inputs(n, d, v, torch.float32, "cpu", seed=9, bias=False)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _LargestTensor() as mode:
        logp, entropy = linear_logprobs_and_entropy(h, w, labels, impl="torch")
        (logp.sum() + entropy.sum()).backward()
    assert mode.max_numel <= CHUNK_TOKENS * CHUNK_VOCAB, (mode.max_numel, mode.max_op)
    assert mode.max_numel * 16 <= n * v


# --------------------------------------------------------------------------- bad input


def test_bad_arguments_name_the_argument():
    hidden, weight, bias, labels, _ = _inputs(4, 8, 10, torch.float32, "cpu")
    fn = linear_logprobs_and_entropy
    with pytest.raises(ValueError, match="weight"):
        fn(hidden, weight[:, :5], labels)
    with pytest.raises(TypeError, match="weight"):
        fn(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="bias"):
        fn(hidden, weight, labels, bias=bias[:3])
    with pytest.raises(ValueError, match="labels"):
        fn(hidden, weight, labels[:2])
    with pytest.raises(TypeError, match="labels"):
        fn(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="labels"):
        fn(hidden, weight, torch.full_like(labels, 10))
    with pytest.raises(ValueError, match="temperature"):
        fn(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        fn(hidden, weight, labels, temperature=torch.ones(3))
    with pytest.raises(ValueError, match="temperature"):
        fn(hidden, weight, labels, temperature=torch.zeros(4))
    with pytest.raises(ValueError, match="impl"):
        fn(hidden, weight, labels, impl="cuda")
    with pytest.raises(ValueError, match="fp32_precision"):
        fn(hidden, weight, labels, fp32_precision="fp64")
    with pytest.raises(TypeError, match="hidden"):
        fn(hidden.long(), weight, labels)
    with pytest.raises(ValueError, match="hidden"):
        fn(hidden.sum(), weight, labels)  # 0-d (an empty batch is valid input)


def test_exported():
    assert hapo_ops.linear_logprobs_and_entropy is linear_logprobs_and_entropy


# --------------------------------------------------------------------------- CUDA, realistic


@requires_cuda
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_realistic_against_unfused(dtype):
    """N=4096, D=2048, V=151936 on the GPU: values and gradients against the unfused
    matmul + logits op in float32 (bf16: the unfused path rounds logits to bf16, hence the
    looser value bound), and against float64 on a slice of rows."""
    torch.manual_seed(0)
    n, d, v = 4096, 2048, 151936
    hidden = torch.randn(n, d, device="cuda").to(dtype)
    weight = (torch.randn(v, d, device="cuda") / d ** 0.5 * 3).to(dtype)
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::7] = -100
    temperature = torch.rand(n, device="cuda") + 0.5
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, entropy = linear_logprobs_and_entropy(h, w, labels, temperature=temperature)
    g = torch.randn(2, n, device="cuda")
    (logp * g[0] + entropy * g[1]).sum().backward()
    h32 = hidden.float().requires_grad_()
    w32 = weight.float().requires_grad_()
    logits = h32 @ w32.T                                # fp32 cuBLAS (no TF32 unless enabled)
    logits.retain_grad()
    ref_logp, ref_entropy = hapo_ops.logprobs_and_entropy(logits, labels,
                                                          temperature=temperature)
    (ref_logp * g[0] + ref_entropy * g[1]).sum().backward()
    dz = logits.grad.abs()
    tol = 1e-3 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(logp, ref_logp, rtol=tol, atol=tol)
    torch.testing.assert_close(entropy, ref_entropy, rtol=tol, atol=tol)
    _assert_grad("d_hidden", h.grad, (h32.grad, dz @ w32.abs()), dtype)
    _assert_grad("d_weight", w.grad, (w32.grad, dz.T @ h32.abs()), dtype)
    # float64 on 64 rows: values to ~1e-5 whatever the dtype (logits never rounded).
    rows = slice(0, 64)
    ref64 = _reference(hidden[rows], weight, None, labels[rows], temperature[rows], -100,
                       None, None)
    torch.testing.assert_close(logp[rows].double(), ref64[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy[rows].double(), ref64[1], rtol=1e-4, atol=1e-4)


@requires_cuda
def test_cuda_matches_interpreter_shapes():
    """The small test shapes on the compiled kernels (odd V and D, bias, per-token T)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n, d, v in ((5, 17, 37), (33, 48, 300), (300, 130, 1000)):
            hidden, weight, bias, labels, gen = _inputs(n, d, v, dtype, "cuda", seed=n + v)
            temperature = (torch.rand(n, generator=gen) * 1.5 + 0.3).cuda()
            _check(hidden, weight, bias, labels, "triton", temperature=temperature)
