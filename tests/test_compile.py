"""Every op under ``torch.compile(fullgraph=True)``: no graph break, and the compiled result
equals the eager one (values and gradients). CPU, ``aot_eager`` (traces what inductor would
see, without compiling C++: fast and deterministic)."""

from __future__ import annotations

import pytest
import torch

import hapo_ops
from conftest import IMPL_DEVICES


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)


def _assert_same(eager, compiled):
    for a, b in zip(torch.utils._pytree.tree_leaves(eager),
                    torch.utils._pytree.tree_leaves(compiled), strict=True):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, equal_nan=True)
        else:
            assert a == b


def _batch(seed=0, rows=6, length=7):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, length, generator=g) < 0.8
    entropy = torch.exp(torch.randn(rows, length, generator=g) * 3 - 2)
    logp = -torch.rand(rows, length, generator=g)
    old = logp + torch.randn(rows, length, generator=g) * 0.2
    rewards = torch.bernoulli(torch.full((rows,), 0.5), generator=g)
    group_ids = torch.tensor([0, 0, 1, 1, 2, 2][:rows])
    return mask, entropy, logp, old, rewards, group_ids


TRAINER_OPS = {
    "entropy_stats": lambda b: hapo_ops.entropy_stats(b[1], b[0]),
    "normalized_entropy": lambda b: hapo_ops.normalized_entropy(
        b[1], hapo_ops.entropy_stats(b[1], b[0]), variant="released"),
    "adaptive_temperature": lambda b: hapo_ops.adaptive_temperature(
        b[1], hapo_ops.entropy_stats(b[1], b[0]), tau=0.1),
    "grpo_advantages": lambda b: hapo_ops.grpo_advantages(b[4], b[5], b[0]),
    "token_level_group_advantages": lambda b: hapo_ops.token_level_group_advantages(
        b[4], b[5], b[0], fallback_threshold=1.0, variant="released"),
    "redistribute_advantages": lambda b: hapo_ops.redistribute_advantages(
        b[2] - b[3], b[1].log().tanh(), (b[2] - b[3]).exp(), eps_low=0.2, eps_high=0.28),
    "adaptive_clip_bounds": lambda b: hapo_ops.adaptive_clip_bounds(b[1].log().tanh()),
    "aggregate_loss": lambda b: hapo_ops.aggregate_loss(b[2], b[0], "seq-mean-token-mean"),
    "global_token_count": lambda b: hapo_ops.global_token_count([b[0], b[0][:2]]),
}


@pytest.mark.parametrize("name", sorted(TRAINER_OPS))
def test_trainer_ops(name):
    batch = _batch()
    op = TRAINER_OPS[name]
    _assert_same(op(batch), _compiled(op)(batch))


@pytest.mark.parametrize("loss", ["clipped", "hapo"])
def test_policy_losses_with_gradients(loss):
    mask, entropy, logp, old, rewards, group_ids = _batch(1)

    def step(logp):
        adv = hapo_ops.token_level_group_advantages(rewards, group_ids, mask)
        if loss == "clipped":
            out = hapo_ops.clipped_policy_loss(logp, old, adv, mask, dual_clip=3.0)
        else:
            out = hapo_ops.hapo_policy_loss(logp, old, adv, entropy, mask)
        return out

    eager_in = logp.clone().requires_grad_()
    compiled_in = logp.clone().requires_grad_()
    eager = step(eager_in)
    compiled = _compiled(step)(compiled_in)
    _assert_same(eager, compiled)
    eager.loss.backward()
    compiled.loss.backward()
    torch.testing.assert_close(compiled_in.grad, eager_in.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_linear_head(impl, device):
    torch.manual_seed(2)
    hidden = torch.randn(5, 16, device=device)
    weight = torch.randn(40, 16, device=device)
    bias = torch.randn(40, device=device)
    labels = torch.randint(0, 40, (5,), device=device)
    temperature = torch.rand(5, device=device) + 0.5

    def loss(h, w):
        logp, entropy = hapo_ops.linear_logprobs_and_entropy(
            h, w, labels, bias=bias, temperature=temperature, impl=impl, chunk_tokens=2,
            chunk_vocab=16)
        return (logp - 0.1 * entropy).sum()

    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    eager = loss(*leaves)
    grads = torch.autograd.grad(eager, leaves)
    leaves_c = [t.clone().requires_grad_() for t in (hidden, weight)]
    compiled = _compiled(loss)(*leaves_c)
    grads_c = torch.autograd.grad(compiled, leaves_c)
    _assert_same(eager, compiled)
    _assert_same(grads, grads_c)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_linear_head_opcheck(impl, device):
    torch.manual_seed(3)
    hidden = torch.randn(4, 8, device=device, requires_grad=True)
    weight = torch.randn(20, 8, device=device, requires_grad=True)
    labels = torch.randint(0, 20, (4,), device=device)
    ops = torch.ops.hapo_ops
    args = (hidden, weight, None, labels, None, 0.8, -100, impl, "ieee", 3, 7)
    torch.library.opcheck(ops.linear_logprobs_entropy, args)
    _, entropy, state = ops.linear_logprobs_entropy(*(a.detach() if isinstance(
        a, torch.Tensor) else a for a in args))
    g = torch.randn(4, device=device)
    torch.library.opcheck(ops.linear_logprobs_entropy_backward, (
        hidden.detach(), weight.detach(), None, labels, None, 0.8, state, entropy, g, g, -100,
        impl, "ieee", 3, 7, True, True, False))


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_sampler(impl, device):
    torch.manual_seed(4)
    logits = torch.randn(6, 50, device=device) * 3
    stats = hapo_ops.EntropyStats(torch.tensor(-1.0), torch.tensor(1.5), torch.tensor(-6.0))

    def sample(z):
        return hapo_ops.adaptive_temperature_sample(z, stats, seed=11, impl=impl)

    _assert_same(sample(logits), _compiled(sample)(logits))
