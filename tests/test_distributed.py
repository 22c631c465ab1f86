"""Tensor- and data-parallel ops against the single-process result.

Each test runs on a gloo process group on CPU (world sizes 2 and 3, one group per world size
for the whole session: ``distributed_harness``); every rank computes its part and returns
tensors to the parent, which compares them with the single-process op on the whole batch.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

import hapo_ops
from conftest import INTERPRETING
from distributed_harness import run_ranks
from hapo_ops._utils.collectives import all_gather_rows, all_reduce_max, all_reduce_sum

IMPLS = ["torch"] + (["triton"] if INTERPRETING else [])


# ------------------------------------------------------------------------------ TP

def _tp_inputs(sizes: list[int]):
    """(logits (3, 5, V) float32, global labels, per-token temperature, upstream weights)
    with the hard cases placed on rows the shards split in different ways."""
    vocab = sum(sizes)
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, 5, vocab, generator=g) * 3.0
    flat = logits.view(-1, vocab)
    flat[0, 3] += 20.0                     # near-deterministic, max in shard 0 (H < 1e-6)
    flat[1, vocab - 2] += 15.0             # near-deterministic, max in the last shard
    flat[2, :] = -8.0
    flat[2, 1] = flat[2, vocab - 1] = 9.0  # the max tied across the first and last shard
    flat[3, vocab - sizes[-1]:] = float("-inf")   # the last shard has no finite logit
    flat[4, :] = flat[4, 0]                # uniform row
    labels = torch.randint(0, vocab, (3, 5), generator=g)
    labels.view(-1)[0] = 3                 # the argmax of the near-deterministic row
    labels.view(-1)[1] = 0                 # a tiny probability on another shard than the max
    labels.view(-1)[3] = vocab - 1         # a -inf logit: logp = -inf
    labels.view(-1)[[5, 11]] = -100        # ignored
    temperature = 0.5 + torch.rand(3, 5, generator=g)
    w_logp, w_entropy = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    return logits, labels, temperature, w_logp, w_entropy


def _tp_worker(rank: int, world: int, sizes: list[int], pass_start: bool):
    group = dist.group.WORLD
    logits, labels, temperature, w_logp, w_entropy = _tp_inputs(sizes)
    start = sum(sizes[:rank])
    vocab_start = start if pass_start else None
    out = {}
    for impl in IMPLS:
        shard = logits[..., start:start + sizes[rank]].clone().requires_grad_(True)
        logp, entropy = hapo_ops.logprobs_and_entropy(
            shard, labels, temperature=temperature, impl=impl, tp_group=group,
            vocab_start=vocab_start)
        # logp = -inf at row 3's label (a -inf logit): its gradient is autograd's, δ_y - p
        (w_logp * logp + w_entropy * entropy).sum().backward()
        out[impl] = (logp.detach(), entropy.detach(), shard.grad)
        # Gradient of one output only; the wrappers; a scalar temperature.
        shard2 = logits[..., start:start + sizes[rank]].clone().requires_grad_(True)
        hapo_ops.token_entropy(shard2, tp_group=group, impl=impl).mul(w_entropy).sum().backward()
        logp_only = hapo_ops.token_logprobs(shard, labels, temperature=0.7, tp_group=group,
                                            impl=impl, vocab_start=vocab_start)
        out[impl + "-entropy-only"] = shard2.grad
        out[impl + "-logp-t0.7"] = logp_only.detach()
    # Labels held by no shard raise on every rank (after the all-reduce: no rank hangs).
    bad = labels.clone()
    bad[0, 0] = sum(sizes)
    try:
        hapo_ops.logprobs_and_entropy(logits[..., start:start + sizes[rank]], bad,
                                      tp_group=group, impl="torch")
        out["raised"] = False
    except ValueError:
        out["raised"] = True
    return out


def _float64_reference(logits, labels, temperature):
    s = logits.double() / temperature.double()[..., None]
    log_p = s.log_softmax(-1)
    entropy = -(log_p.exp() * torch.where(log_p.exp() > 0, log_p, 0.0)).sum(-1)
    logp = log_p.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return torch.where(labels == -100, 0.0, logp), entropy


@pytest.mark.parametrize("sizes,pass_start", [([20, 10, 7], False), ([25, 12], True)],
                         ids=["world3-derived-start", "world2-given-start"])
def test_vocab_parallel_matches_unsharded(sizes, pass_start):
    results = run_ranks(_tp_worker, len(sizes), sizes, pass_start)
    logits, labels, temperature, w_logp, w_entropy = _tp_inputs(sizes)
    ref_logp64, ref_entropy64 = _float64_reference(logits, labels, temperature)
    z64 = logits.double().requires_grad_(True)
    logp64, entropy64 = _float64_reference(z64, labels, temperature)
    (w_logp * logp64 + w_entropy * entropy64).sum().backward()
    grad64 = z64.grad
    for impl in IMPLS:
        full = logits.clone().requires_grad_(True)
        logp, entropy = hapo_ops.logprobs_and_entropy(full, labels, temperature=temperature,
                                                      impl=impl)
        (w_logp * logp + w_entropy * entropy).sum().backward()
        full2 = logits.clone().requires_grad_(True)
        hapo_ops.token_entropy(full2, impl=impl).mul(w_entropy).sum().backward()
        logp_t07 = hapo_ops.token_logprobs(logits, labels, temperature=0.7, impl=impl)
        for rank, res in enumerate(results):
            tp_logp, tp_entropy, tp_grad_shard = res[impl]
            # Every rank returns the whole (replicated) result, equal to the unsharded op.
            torch.testing.assert_close(tp_logp, logp.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tp_entropy, entropy.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(res[impl + "-logp-t0.7"], logp_t07, rtol=1e-5, atol=1e-5)
            # Near-deterministic rows stay exact: relative error of H against float64.
            rel = ((tp_entropy.double() - ref_entropy64).abs() / ref_entropy64).max()
            assert rel < 1e-5, (impl, rank, rel)
            assert tp_logp.view(-1)[3] == float("-inf")
            torch.testing.assert_close(tp_logp.double(), ref_logp64, rtol=1e-5, atol=1e-5)
        tp_grad = torch.cat([res[impl][2] for res in results], dim=-1)
        torch.testing.assert_close(tp_grad, full.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tp_grad.double(), grad64, rtol=1e-5, atol=1e-5)
        tp_grad_entropy = torch.cat([res[impl + "-entropy-only"] for res in results], dim=-1)
        torch.testing.assert_close(tp_grad_entropy, full2.grad, rtol=1e-5, atol=1e-6)
    assert all(res["raised"] for res in results)


# ------------------------------------------------------------------------------ DP

def _dp_inputs(world: int):
    """Uneven per-rank pieces of one batch; the last rank has no valid token."""
    g = torch.Generator().manual_seed(world)
    rows = [4, 7, 3][:world]
    total, length = sum(rows), 6
    entropy = torch.exp(torch.randn(total, length, generator=g) * 6.0 - 4.0)
    entropy[0, :3] = entropy[1, 0]                     # repeated values at the pivot
    entropy[2, 2] = 0.0                                # below eps
    mask = torch.rand(total, length, generator=g) < 0.7
    mask[-rows[-1]:] = False                           # the last rank: no valid token
    group_ids = torch.randperm(total, generator=g) % 4  # groups split across ranks
    group_ids[0] = 17                                  # a group of one
    rewards = torch.bernoulli(torch.full((total,), 0.5), generator=g)
    rewards[1] = 3.0                                   # an outlier: fallback in its group
    per_token = torch.randn(total, length, generator=g, dtype=torch.float64)
    return rows, entropy, mask, group_ids, rewards, per_token


def _split(tensor: torch.Tensor, rows: list[int], rank: int) -> torch.Tensor:
    return tensor[sum(rows[:rank]):sum(rows[:rank + 1])]


def _advantage_cases():
    return {"tlga": dict(), "tlga-released": dict(variant="released"),
            "tlga-no-std": dict(normalize_std=False), "tlga-low-threshold":
            dict(fallback_threshold=1.0)}


def _dp_worker(rank: int, world: int):
    group = dist.group.WORLD
    rows, entropy, mask, group_ids, rewards, per_token = _dp_inputs(world)
    mine = {name: _split(t, rows, rank) for name, t in
            dict(entropy=entropy, mask=mask, group_ids=group_ids, rewards=rewards,
                 per_token=per_token).items()}
    out = {}
    for q in (0.0, 0.5, 0.8, 1.0):
        out[f"stats-{q}"] = hapo_ops.entropy_stats(mine["entropy"], mine["mask"], quantile=q,
                                                   group=group)
    # The whole group sees no valid token.
    out["stats-empty"] = hapo_ops.entropy_stats(mine["entropy"], torch.zeros_like(mine["mask"]),
                                                group=group)
    for name, kwargs in _advantage_cases().items():
        out[name] = hapo_ops.token_level_group_advantages(
            mine["rewards"], mine["group_ids"], mine["mask"], group=group, **kwargs)
    out["grpo"] = hapo_ops.grpo_advantages(mine["rewards"], mine["group_ids"], mine["mask"],
                                           group=group)
    out["grpo-no-std"] = hapo_ops.grpo_advantages(mine["rewards"], mine["group_ids"],
                                                  normalize_std=False, group=group)
    # Token-mean over micro-batches and ranks: the step's token count, summed losses.
    micro = [(mine["per_token"][i:i + 2], mine["mask"][i:i + 2])
             for i in range(0, rows[rank], 2)]
    num_tokens = hapo_ops.global_token_count([m for _, m in micro], group)
    num_sequences = hapo_ops.global_sequence_count([m for _, m in micro], group)
    out["num_tokens"], out["num_sequences"] = num_tokens, num_sequences
    out["token-mean"] = sum(hapo_ops.aggregate_loss(pt, m, num_tokens=num_tokens)
                            for pt, m in micro)
    out["seq-mean-token-sum"] = sum(hapo_ops.aggregate_loss(pt, m, "seq-mean-token-sum",
                                                            num_sequences=num_sequences)
                                    for pt, m in micro)
    gathered, offset = all_gather_rows(torch.full((rank + 1, 2), float(rank)), group)
    out["gather"], out["offset"] = gathered, offset
    x = torch.tensor([rank, -rank], dtype=torch.int64)
    out["sum"], out["max"] = all_reduce_sum(x, group), all_reduce_max(x, group)
    out["input-unchanged"] = torch.equal(x, torch.tensor([rank, -rank]))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_matches_single_process(world):
    results = run_ranks(_dp_worker, world)
    rows, entropy, mask, group_ids, rewards, per_token = _dp_inputs(world)
    for q in (0.0, 0.5, 0.8, 1.0):
        ref = hapo_ops.entropy_stats(entropy, mask, quantile=q)
        for res in results:  # bitwise, on every rank
            for got, want in zip(res[f"stats-{q}"], ref, strict=True):
                assert torch.equal(got, want), (q, got, want)
    empty = hapo_ops.entropy_stats(entropy, torch.zeros_like(mask))
    for res in results:
        assert all(torch.equal(a, b) for a, b in zip(res["stats-empty"], empty, strict=True))

    for name, kwargs in _advantage_cases().items():
        ref = hapo_ops.token_level_group_advantages(rewards, group_ids, mask, **kwargs)
        got = torch.cat([res[name] for res in results])
        assert torch.equal(got, ref), name
    ref = hapo_ops.grpo_advantages(rewards, group_ids, mask)
    assert torch.equal(torch.cat([res["grpo"] for res in results]), ref)
    ref = hapo_ops.grpo_advantages(rewards, group_ids, normalize_std=False)
    assert torch.equal(torch.cat([res["grpo-no-std"] for res in results]), ref)

    total = sum(res["token-mean"] for res in results)
    torch.testing.assert_close(total, hapo_ops.aggregate_loss(per_token, mask), rtol=1e-12,
                               atol=0)
    total = sum(res["seq-mean-token-sum"] for res in results)
    torch.testing.assert_close(total, hapo_ops.aggregate_loss(per_token, mask,
                                                              "seq-mean-token-sum"),
                               rtol=1e-12, atol=0)
    for rank, res in enumerate(results):
        assert int(res["num_tokens"]) == int(mask.sum())
        assert int(res["num_sequences"]) == int(mask.any(-1).sum())
        expected = torch.cat([torch.full((r + 1, 2), float(r)) for r in range(world)])
        assert torch.equal(res["gather"], expected)
        assert res["offset"] == sum(r + 1 for r in range(rank))
        assert res["sum"].tolist() == [sum(range(world)), -sum(range(world))]
        assert res["max"].tolist() == [world - 1, 0]
        assert res["input-unchanged"]


# ------------------------------------------------------------------------------ no group

def test_without_group_nothing_is_communicated():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert int(hapo_ops.global_token_count(mask)) == 3
    assert int(hapo_ops.global_token_count([mask, mask[:1]])) == 5
    assert int(hapo_ops.global_sequence_count([mask, torch.zeros_like(mask)])) == 2
    x = torch.arange(3)
    assert all_reduce_sum(x) is x and all_reduce_max(x) is x
    rows, offset = all_gather_rows(x)
    assert rows is x and offset == 0


def test_distributed_argument_errors():
    logits, labels = torch.randn(4, 7), torch.randint(0, 7, (4,))
    with pytest.raises(ValueError, match="vocab_start"):
        hapo_ops.logprobs_and_entropy(logits, labels, vocab_start=3)
    with pytest.raises(TypeError, match="tp_group"):
        hapo_ops.logprobs_and_entropy(logits, labels, tp_group="world")
    hidden, weight = torch.randn(4, 3), torch.randn(7, 3)
    with pytest.raises(ValueError, match="vocab_start"):
        hapo_ops.linear_logprobs_and_entropy(hidden, weight, labels, vocab_start=3)
    with pytest.raises(TypeError, match="tp_group"):
        hapo_ops.linear_logprobs_and_entropy(hidden, weight, labels, tp_group="world")
    with pytest.raises(ValueError, match="group"):
        hapo_ops.entropy_stats(torch.rand(4), torch.ones(4), group=object(),
                               reduce_counts=lambda t: t)
    with pytest.raises(ValueError, match="mask"):
        hapo_ops.global_token_count([])
    # a group that is not a ProcessGroup is refused by name before any collective
    mask = torch.ones(2, 3)
    for call in (lambda: hapo_ops.entropy_stats(torch.rand(2, 3), mask, group="world"),
                 lambda: hapo_ops.global_token_count(mask, group="world"),
                 lambda: hapo_ops.global_sequence_count(mask, group="world"),
                 lambda: hapo_ops.grpo_advantages(torch.rand(2), torch.tensor([0, 0]),
                                                  group="world"),
                 lambda: hapo_ops.token_level_group_advantages(
                     torch.rand(2), torch.tensor([0, 0]), mask, group="world")):
        with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
            call()


# ------------------------------------------------------------------------------ TP linear head

def _linear_tp_inputs(sizes: list[int]):
    """(hidden (3, 5, D), weight (V, D), bias (V,), global labels, per-token temperature,
    upstream weights) float32, with near-deterministic rows whose max lies in the first and
    in the last shard, a max tied across the first and last shard, and ignored labels."""
    vocab, dim = sum(sizes), 24
    g = torch.Generator().manual_seed(100 + vocab)
    weight = torch.randn(vocab, dim, generator=g) / dim ** 0.5
    bias = torch.randn(vocab, generator=g) * 0.5
    weight[vocab - 1], bias[vocab - 1] = weight[1], bias[1]   # the same logit in two shards
    hidden = torch.randn(3, 5, dim, generator=g)
    flat = hidden.view(-1, dim)
    flat[0] = weight[3] * 60.0             # near-deterministic, max in shard 0
    flat[1] = weight[vocab - 2] * 60.0     # near-deterministic, max in the last shard
    flat[2] = weight[1] * 12.0             # max tied between the first and the last shard
    labels = torch.randint(0, vocab, (3, 5), generator=g)
    labels.view(-1)[0] = 3                 # the argmax of a near-deterministic row
    labels.view(-1)[1] = 0                 # a tiny probability on another shard than the max
    labels.view(-1)[[5, 11]] = -100        # ignored
    temperature = 0.5 + torch.rand(3, 5, generator=g)
    temperature.view(-1)[:2] = 1.0
    w_logp, w_entropy = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    return hidden, weight, bias, labels, temperature, w_logp, w_entropy


def _linear_tp_variants():
    """(name, impl, block sizes) run by every rank: several blocks in every shard (torch),
    dz buffers of 4 tokens or of all of them (Triton)."""
    out = [("torch", "torch", {"chunk_tokens": 4, "chunk_vocab": 6})]
    if "triton" in IMPLS:
        out += [("triton-dz4", "triton", {"chunk_tokens": 4}), ("triton", "triton", {})]
    return out


def _linear_tp_worker(rank: int, world: int, sizes: list[int], pass_start: bool):
    group = dist.group.WORLD
    hidden, weight, bias, labels, temperature, w_logp, w_entropy = _linear_tp_inputs(sizes)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    vocab_start = start if pass_start else None
    out = {}
    for name, impl, blocks in _linear_tp_variants():
        h = hidden.clone().requires_grad_(True)
        w = weight[rows].clone().requires_grad_(True)
        b = bias[rows].clone().requires_grad_(True)
        logp, entropy = hapo_ops.linear_logprobs_and_entropy(
            h, w, labels, bias=b, temperature=temperature, impl=impl, tp_group=group,
            vocab_start=vocab_start, **blocks)
        (w_logp * logp + w_entropy * entropy).sum().backward()
        out[name] = (logp.detach(), entropy.detach(), h.grad, w.grad, b.grad)
        # The entropy gradient alone, a scalar temperature, no bias, hidden without gradient
        # (no collective in backward).
        w2 = weight[rows].clone().requires_grad_(True)
        _, entropy2 = hapo_ops.linear_logprobs_and_entropy(
            hidden, w2, labels, temperature=0.7, impl=impl, tp_group=group,
            vocab_start=vocab_start, **blocks)
        (w_entropy * entropy2).sum().backward()
        out[name + "-entropy-only"] = (entropy2.detach(), w2.grad)
    # Labels held by no shard raise on every rank (after the all-reduce: no rank hangs).
    bad = labels.clone()
    bad[0, 0] = sum(sizes)
    try:
        hapo_ops.linear_logprobs_and_entropy(hidden, weight[rows], bad, tp_group=group,
                                             impl="torch")
        out["raised"] = False
    except ValueError:
        out["raised"] = True
    return out


@pytest.mark.parametrize("sizes,pass_start", [([20, 10, 7], False), ([25, 12], True)],
                         ids=["world3-derived-start", "world2-given-start"])
def test_vocab_parallel_linear_matches_unsharded(sizes, pass_start):
    results = run_ranks(_linear_tp_worker, len(sizes), sizes, pass_start)
    hidden, weight, bias, labels, temperature, w_logp, w_entropy = _linear_tp_inputs(sizes)
    z = hidden.double() @ weight.double().T + bias.double()
    ref_logp64, _ = _float64_reference(z, labels, temperature)
    # H in float64 without the cancellation that -Σ p log p still has at H ≈ 1e-30 (there
    # log p at the argmax rounds to 0 and drops rest, about 1/gap of H).
    s = z / temperature.double()[..., None]
    top, argmax = s.max(-1, keepdim=True)
    gap = top - s
    weights = torch.exp(-gap)
    rest = weights.scatter(-1, argmax, 0.0).sum(-1)           # the mass off one argmax
    ref_entropy64 = torch.log1p(rest) + (weights * gap).sum(-1) / (1.0 + rest)
    assert ref_entropy64.view(-1)[:2].max() < 1e-10          # the near-deterministic rows
    for name, impl, _ in _linear_tp_variants():
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        b = bias.clone().requires_grad_(True)
        logp, entropy = hapo_ops.linear_logprobs_and_entropy(
            h, w, labels, bias=b, temperature=temperature, impl=impl)
        (w_logp * logp + w_entropy * entropy).sum().backward()
        w2 = weight.clone().requires_grad_(True)
        entropy2 = hapo_ops.linear_logprobs_and_entropy(hidden, w2, labels, temperature=0.7,
                                                        impl=impl)[1]
        (w_entropy * entropy2).sum().backward()
        for rank, res in enumerate(results):
            tp_logp, tp_entropy, tp_grad_hidden = res[name][:3]
            torch.testing.assert_close(tp_logp, logp.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tp_entropy, entropy.detach(), rtol=1e-5, atol=1e-6)
            rel = ((tp_entropy.double() - ref_entropy64).abs() / ref_entropy64).max()
            assert rel < 1e-5, (name, rank, rel)
            torch.testing.assert_close(tp_logp.double(), ref_logp64, rtol=1e-5, atol=1e-5)
            # The full hidden gradient on every rank (all-reduced over the shards).
            torch.testing.assert_close(tp_grad_hidden, h.grad, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(res[name + "-entropy-only"][0], entropy2.detach(),
                                       rtol=1e-5, atol=1e-6)
        # Weight and bias gradients: each rank holds its slice of the unsharded gradient.
        torch.testing.assert_close(torch.cat([res[name][3] for res in results]), w.grad,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([res[name][4] for res in results]), b.grad,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([res[name + "-entropy-only"][1]
                                              for res in results]), w2.grad,
                                   rtol=1e-5, atol=1e-5)
    assert all(res["raised"] for res in results)


# ------------------------------------------------------------------------------ empty ranks

def _empty_rank_worker(rank: int, world: int):
    """Rank 1 holds no rows at all (empty tensors): every rank still reaches the same
    collectives and gets the global result (its own rows: none)."""
    group = dist.group.WORLD
    _, entropy, mask, group_ids, rewards, _ = _dp_inputs(world)
    total = entropy.shape[0]
    bounds = [0, 4, 4, total] if world == 3 else [0, total, total]
    start, stop = bounds[rank], bounds[rank + 1]
    mine = slice(start, stop)
    return {
        "stats": hapo_ops.entropy_stats(entropy[mine], mask[mine], group=group),
        "tlga": hapo_ops.token_level_group_advantages(rewards[mine], group_ids[mine],
                                                      mask[mine], group=group),
        "grpo": hapo_ops.grpo_advantages(rewards[mine], group_ids[mine], group=group),
        "tokens": hapo_ops.global_token_count(mask[mine], group),
        "rows": stop - start,
    }


@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_with_an_empty_batch_gets_the_global_result(world):
    results = run_ranks(_empty_rank_worker, world)
    _, entropy, mask, group_ids, rewards, _ = _dp_inputs(world)
    assert results[1]["rows"] == 0
    stats = hapo_ops.entropy_stats(entropy, mask)
    tlga = hapo_ops.token_level_group_advantages(rewards, group_ids, mask)
    grpo = hapo_ops.grpo_advantages(rewards, group_ids)
    for res in results:
        assert all(torch.equal(a, b) for a, b in zip(res["stats"], stats, strict=True))
        assert int(res["tokens"]) == int(mask.sum())
    assert torch.equal(torch.cat([res["tlga"] for res in results]), tlga)
    assert torch.equal(torch.cat([res["grpo"] for res in results]), grpo)
    assert results[1]["tlga"].shape == (0, mask.shape[1])


# ------------------------------------------------------------------------------ checks first

def _bad_calls(lp, old, adv, mask, rewards, group_ids):
    """(name the error must contain, call) for bad arguments of the ops that all-reduce."""
    clip_cov = functools.partial(hapo_ops.clip_cov_policy_loss, lp, old, adv, mask,
                                 group=dist.group.WORLD)
    kl_cov = functools.partial(hapo_ops.kl_cov_policy_loss, lp, old, adv, mask,
                               group=dist.group.WORLD)
    return [
        ("eps_low", lambda: clip_cov(seed=0, eps_low=-0.1)),
        ("eps_low", lambda: clip_cov(seed=0, eps_low=torch.full(lp.shape, 1.5))),
        ("eps_high", lambda: clip_cov(seed=0, eps_high=-0.1)),
        ("cov_bounds", lambda: clip_cov(seed=0, cov_bounds=(5.0, 1.0))),
        ("seed", lambda: clip_cov()),
        ("seed", lambda: clip_cov(seed=1.5)),
        ("num_tokens", lambda: clip_cov(seed=0, num_tokens=0)),
        ("kl_coef", lambda: kl_cov(kl_coef=-1.0)),
        ("normalizer", lambda: kl_cov(normalizer=-2.0)),
        ("num_sequences", lambda: kl_cov(num_sequences=torch.tensor(0.0))),
        ("mask", lambda: hapo_ops.grpo_advantages(rewards, group_ids, mask[:, :1].T,
                                                  group=dist.group.WORLD)),
    ]


def _checks_first_worker(rank: int, world: int):
    """Rank 0 makes every bad call, alone: each must raise before any collective (else
    its all-reduce would pair with rank 1's next one and the group would fall out of
    step). Then both ranks make one good call each, which must agree."""
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(4, 5, generator=g) * 2
    old, adv = lp + 0.1 * torch.randn(4, 5, generator=g), torch.randn(4, generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    rewards, group_ids = torch.rand(4, generator=g), torch.tensor([0, 0, 1, 1])
    errors = []
    if rank == 0:
        for name, call in _bad_calls(lp, old, adv, mask, rewards, group_ids):
            try:
                call()
                errors.append(f"{name}: no error")
            except (ValueError, TypeError) as error:
                if name not in str(error):
                    errors.append(f"{name}: {error}")
    kl = hapo_ops.kl_cov_policy_loss(lp, old, adv, mask, cov_fraction=0.5,
                                     group=dist.group.WORLD).per_token
    grpo = hapo_ops.grpo_advantages(rewards, group_ids, group=dist.group.WORLD)
    return errors, kl, grpo


def test_a_bad_argument_raises_before_any_collective():
    results = run_ranks(_checks_first_worker, 2)
    assert results[0][0] == []
    assert torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][2], results[1][2])


# ------------------------------------------------------------------------------ compile

def _compiled_tp_worker(rank: int, world: int, sizes: list[int]):
    """The vocabulary-parallel op (its all-reduces included) under torch.compile(fullgraph=True)
    equals eager, values and gradients."""
    group = dist.group.WORLD
    logits, labels, temperature, w_logp, w_entropy = _tp_inputs(sizes)
    start = sum(sizes[:rank])
    shard = logits[..., start:start + sizes[rank]]

    def loss(z):
        logp, entropy = hapo_ops.logprobs_and_entropy(z, labels, temperature=temperature,
                                                      impl="torch", tp_group=group,
                                                      vocab_start=start)
        return (w_logp * logp.nan_to_num(neginf=0.0) + w_entropy * entropy).sum()

    eager_in, compiled_in = shard.clone().requires_grad_(), shard.clone().requires_grad_()
    eager = loss(eager_in)
    eager.backward()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(compiled_in)
    compiled.backward()
    return eager.detach(), compiled.detach(), eager_in.grad, compiled_in.grad


def test_vocab_parallel_under_torch_compile():
    for eager, compiled, grad, grad_compiled in run_ranks(_compiled_tp_worker, 2, [25, 12]):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad_compiled, grad, rtol=1e-6, atol=1e-7)
