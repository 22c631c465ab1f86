"""Inputs every op over a vocabulary takes alike, on both paths: any memory layout with an
in-place backward, labels and kept ids of any integer dtype, empty batches, and the rule
that picks the path under ``impl="auto"``."""

from __future__ import annotations

import pytest
import torch

import hapo_ops
from conftest import IMPL_DEVICES
from hapo_ops.reference import reference_logits_grad, reference_logprobs_and_entropy
from tolerances import GRAD_TOL, VALUE_TOL, assert_close

VOCAB = 11


def _layouts(device):
    """(name, make) pairs: ``make(base)`` turns a contiguous (2, 3, V) leaf into a non-leaf
    tensor of that shape with the named layout (last dim contiguous or not)."""
    return [
        ("transposed", lambda b: b.transpose(0, 1).mul(1.0).transpose(0, 1)),
        ("permuted", lambda b: b.permute(2, 0, 1).mul(1.0).permute(1, 2, 0)),
        ("sliced", lambda b: torch.cat([b, b[:, :1]], 1).mul(1.0)[:, :-1]),
        ("strided-vocab", lambda b: torch.stack([b, b], -1).mul(1.0)[..., 0]),
    ]


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("truncation", [{}, {"top_k": 4}, {"kept_ids": "kept"}])
def test_inplace_backward_takes_every_layout(impl, device, truncation):
    """The in-place backward accepts every layout the out-of-place one does (permuted and
    transposed logits included) and gives the same gradient, on both paths."""
    torch.manual_seed(0)
    base = torch.randn(2, 3, VOCAB, device=device)
    labels = torch.randint(0, VOCAB, (2, 3), device=device)
    kwargs = dict(truncation)
    if "kept_ids" in kwargs:
        kwargs["kept_ids"] = torch.randint(-1, VOCAB, (2, 3, 5), device=device)
    g_logp, g_entropy = torch.randn(2, 3, device=device), torch.randn(2, 3, device=device)
    grads = []
    for name, make in _layouts(device):
        for inplace in (False, True):
            leaf = base.clone().requires_grad_()
            logits = make(leaf)
            assert torch.equal(logits, base), name
            logp, entropy = hapo_ops.logprobs_and_entropy(logits, labels, impl=impl,
                                                          inplace_backward=inplace, **kwargs)
            (logp.nan_to_num(neginf=0.0) * g_logp + entropy.nan_to_num() * g_entropy
             ).sum().backward()
            grads.append((name, inplace, leaf.grad))
    for name, inplace, grad in grads[1:]:
        torch.testing.assert_close(grad, grads[0][2], rtol=1e-6, atol=1e-7,
                                   msg=f"{name} inplace={inplace}")


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32,
                                   torch.int64])
def test_labels_and_kept_ids_of_every_integer_dtype(impl, device, dtype):
    torch.manual_seed(1)
    logits = torch.randn(4, VOCAB, device=device)
    labels = torch.tensor([0, 3, 10, 7])
    kept = torch.tensor([[0, 1, 2], [3, 3, 9], [10, 4, 5], [7, 0, 1]])
    expected = hapo_ops.logprobs_and_entropy(logits, labels.to(device), impl=impl)
    got = hapo_ops.logprobs_and_entropy(logits, labels.to(dtype).to(device), impl=impl)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    expected = hapo_ops.logprobs_and_entropy(logits, labels.to(device),
                                             kept_ids=kept.to(device), impl=impl)
    got = hapo_ops.logprobs_and_entropy(logits, labels.to(dtype).to(device),
                                        kept_ids=kept.to(dtype).to(device), impl=impl)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    top_k = torch.tensor([1, 2, 3, 0], dtype=dtype, device=device)
    got = hapo_ops.token_logprobs(logits, labels.to(dtype).to(device), top_k=top_k, impl=impl)
    expected = hapo_ops.token_logprobs(logits, labels.to(device), top_k=top_k.long(), impl=impl)
    assert torch.equal(got, expected)
    hidden, weight = torch.randn(4, 6, device=device), torch.randn(VOCAB, 6, device=device)
    got = hapo_ops.linear_logprobs_and_entropy(hidden, weight, labels.to(dtype).to(device),
                                               impl=impl)
    expected = hapo_ops.linear_logprobs_and_entropy(hidden, weight, labels.to(device),
                                                    impl=impl)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def _empty_logits_cases(device):
    empty_kept = torch.zeros(0, 3, dtype=torch.long, device=device)
    return [{}, {"kept_ids": empty_kept}, {"top_k": 3}, {"top_p": 0.9},
            {"top_k": 2, "top_p": 0.5}, {"temperature": torch.ones(0, device=device)}]


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("shape", [(0, VOCAB), (2, 0, VOCAB)])
@pytest.mark.parametrize("inplace", [False, True])
def test_empty_batch_gives_empty_results_and_gradients(impl, device, shape, inplace):
    """An empty batch (a data-parallel rank with nothing to do) is ordinary input."""
    token_shape = shape[:-1]
    labels = torch.zeros(token_shape, dtype=torch.long, device=device)
    for kwargs in _empty_logits_cases(device):
        if "kept_ids" in kwargs:
            kwargs["kept_ids"] = kwargs["kept_ids"].view(*token_shape, 3)
        leaf = torch.randn(shape, device=device, requires_grad=True)
        logp, entropy = hapo_ops.logprobs_and_entropy(leaf * 1.0, labels, impl=impl,
                                                      inplace_backward=inplace, **kwargs)
        assert logp.shape == token_shape and entropy.shape == token_shape, kwargs
        assert logp.dtype == entropy.dtype == torch.float32
        (logp.sum() + entropy.sum()).backward()
        assert leaf.grad.shape == shape
        assert hapo_ops.token_logprobs(leaf, labels, impl=impl, **kwargs).shape == token_shape
        assert hapo_ops.token_entropy(leaf, impl=impl, **kwargs).shape == token_shape
    with pytest.raises(ValueError, match="logits"):
        hapo_ops.token_entropy(torch.zeros(3, 0, device=device), impl=impl)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_empty_batch_through_the_linear_head_and_the_sampler(impl, device):
    hidden = torch.randn(0, 6, device=device, requires_grad=True)
    weight = torch.randn(VOCAB, 6, device=device, requires_grad=True)
    bias = torch.randn(VOCAB, device=device, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long, device=device)
    logp, entropy = hapo_ops.linear_logprobs_and_entropy(hidden, weight, labels, bias=bias,
                                                         impl=impl)
    assert logp.shape == (0,) and entropy.shape == (0,)
    (logp.sum() + entropy.sum()).backward()
    assert hidden.grad.shape == (0, 6)
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))
    stats = hapo_ops.EntropyStats(torch.tensor(-1.0), torch.tensor(1.5), torch.tensor(-6.0))
    stats = hapo_ops.EntropyStats(*(s.to(device) for s in stats))
    for kwargs in ({}, {"top_k": 3, "top_p": 0.9}) if impl == "torch" else ({},):
        out = hapo_ops.adaptive_temperature_sample(torch.randn(0, VOCAB, device=device), stats,
                                                   seed=3, impl=impl, **kwargs)
        for field in out:
            assert field.shape == (0,)
        assert out.tokens.dtype == torch.int64


def test_empty_batch_under_torch_compile():
    def loss(z, y):
        logp, entropy = hapo_ops.logprobs_and_entropy(z, y, impl="torch", top_k=2)
        return logp.sum() + entropy.sum()

    leaf = torch.randn(0, VOCAB, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    out = torch.compile(loss, fullgraph=True, backend="aot_eager")(leaf, labels)
    out.backward()
    assert out.item() == 0 and leaf.grad.shape == (0, VOCAB)


@pytest.mark.parametrize("dtype,expected", [
    (torch.float32, "triton"), (torch.bfloat16, "triton"), (torch.float16, "triton"),
    (torch.float64, "torch"),
])
def test_auto_takes_the_kernels_only_for_their_dtypes_on_cuda(dtype, expected):
    """impl="auto": the Triton kernels on CUDA for the dtypes they take, the torch path for
    every other dtype (float64), device (CPU) or install (no Triton)."""
    from hapo_ops.vocab.token_inputs import auto_impl
    assert auto_impl("cuda", dtype, True) == expected
    assert auto_impl("cuda", dtype, False) == "torch"
    assert auto_impl("cpu", dtype, True) == "torch"


def test_float64_through_auto_matches_the_reference():
    """What "auto" picks for float64 runs (here on CPU: the torch path) and stays exact."""
    torch.manual_seed(2)
    hidden = torch.randn(5, 4, dtype=torch.float64)
    weight = torch.randn(VOCAB, 4, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (5,))
    logp, entropy = hapo_ops.linear_logprobs_and_entropy(hidden, weight, labels)
    ref_logp, ref_entropy = reference_logprobs_and_entropy(hidden @ weight.T, labels)
    assert_close("logp", logp, ref_logp, VALUE_TOL[torch.float32])
    assert_close("entropy", entropy, ref_entropy, VALUE_TOL[torch.float32])
    logits = (hidden @ weight.T).requires_grad_()
    g = torch.randn(5, dtype=torch.float64)
    logp, entropy = hapo_ops.logprobs_and_entropy(logits, labels)
    (logp * g.float()).sum().backward()
    expected = reference_logits_grad(logits.detach(), labels, g, torch.zeros_like(g))
    assert_close("grad", logits.grad, expected, GRAD_TOL[torch.float32])
