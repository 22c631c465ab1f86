"""entropy_quantile_mask (80/20 forking tokens, Archer's per-response split) and
sequence_entropy_advantages (EDGE-GRPO) against plain float64 references.

References loop over rows and sort Python lists; the ops are vectorised (and radix-selected).
The data-parallel checks run on the session's gloo group of each world size.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from hapo_ops.rl.losses import clipped_policy_loss
from hapo_ops.rl.token_selection import entropy_quantile_mask, sequence_entropy_advantages
from distributed_harness import run_ranks

SETTINGS = dict(derandomize=True, deadline=None, max_examples=40)
F64 = torch.float64


# --------------------------------------------------------------------------- references


def ref_quantile_mask(entropy, mask, rho, per_sequence=False):
    """Nearest rank k = round((1 - rho)(n - 1)) + 1 over the float32 entropies of the valid,
    non-NaN tokens; keep H >= the k-th smallest (ties kept)."""
    h = entropy.detach().float()
    m = mask.bool() & ~torch.isnan(h)
    out = torch.zeros(h.shape, dtype=torch.bool)
    if per_sequence:
        rows = [(i,) for i in range(h.shape[0])] if h.dim() == 2 else []
        for row in rows:
            out[row] = ref_quantile_mask(h[row], m[row], rho)
        return out
    values = sorted(float(v) for v in h[m].tolist())
    if not values:
        return out
    k = round((1.0 - rho) * (len(values) - 1)) + 1
    threshold = values[k - 1]
    for idx in zip(*torch.nonzero(m, as_tuple=True)):
        if float(h[idx]) >= threshold:
            out[idx] = True
    return out


def ref_edge(adv, entropy, mask, max_scale=None):
    """A_i * mean_j P_j / P_i with P_i the valid-token mean entropy (rows with a token)."""
    m = mask.bool()
    B = entropy.shape[0]
    p = []
    for i in range(B):
        vals = [float(v) for v, keep in zip(entropy[i].double().tolist(), m[i].tolist()) if keep]
        p.append(sum(vals) / len(vals) if vals else None)
    present = [v for v in p if v is not None]
    pbar = sum(present) / len(present) if present else 0.0
    out = torch.zeros(adv.shape, dtype=F64)
    for i in range(B):
        scale = 1.0 if not p[i] else pbar / p[i]     # None (empty) or 0 keep the advantage
        if max_scale is not None:
            scale = min(scale, max_scale)
        if adv.dim() == 1:
            out[i] = float(adv[i]) * scale
        else:
            for t in range(adv.shape[1]):
                out[i, t] = float(adv[i, t]) * scale if m[i, t] else 0.0
    return out


def assert_elementwise(got, want, atol, rtol):
    got, want = got.double(), want.double()
    assert not torch.isnan(got).any() and not torch.isnan(want).any()
    bad = (got - want).abs() > atol + rtol * want.abs()
    assert not bad.any(), (got[bad], want[bad])


# --------------------------------------------------------------------------- strategies


@st.composite
def entropy_batch(draw):
    B = draw(st.integers(1, 5))
    L = draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["continuous", "ties", "tiny"]))
    if kind == "continuous":
        entropy = torch.rand(B, L, generator=g, dtype=F64) * 3
    elif kind == "ties":
        entropy = torch.randint(0, 3, (B, L), generator=g).to(F64) * 0.5
    else:
        entropy = torch.exp(torch.randn(B, L, generator=g, dtype=F64) * 5 - 10)
    mask = torch.rand(B, L, generator=g) < draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    dtype = draw(st.sampled_from([torch.float32, F64]))
    entropy = entropy.to(dtype)
    entropy[~mask] = float("nan")                       # masked garbage
    return entropy, mask


# --------------------------------------------------------------------------- quantile mask


@settings(**SETTINGS)
@given(entropy_batch(), st.sampled_from([0.05, 0.2, 0.3, 0.5, 0.8, 1.0]), st.booleans())
def test_quantile_mask_matches_reference(batch, rho, per_sequence):
    entropy, mask = batch
    got = entropy_quantile_mask(entropy, mask, top_fraction=rho, per_sequence=per_sequence)
    assert got.dtype == torch.bool and got.shape == entropy.shape
    assert torch.equal(got, ref_quantile_mask(entropy, mask, rho, per_sequence))
    assert not (got & ~mask.bool()).any()


def test_quantile_mask_worked_example_and_boundaries():
    entropy = torch.tensor([[0.1, 2.0, 0.3, 1.5], [0.05, 0.2, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    # 7 valid values; rho = 0.3: k = round(0.7 * 6) + 1 = 5, the 5th smallest is 1.5.
    want = torch.tensor([[0, 1, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(entropy_quantile_mask(entropy, mask, top_fraction=0.3), want)
    # A value exactly at the threshold is kept; the float just below it is not.
    # n = 6, rho = 0.2: k = round(0.8 * 5) + 1 = 5, the threshold is 3.0.
    just_below = float(torch.nextafter(torch.tensor(3.0), torch.tensor(0.0)))
    h = torch.tensor([0.0, 1.0, 2.0, just_below, 3.0, 4.0])
    assert entropy_quantile_mask(h, torch.ones(6), top_fraction=0.2).tolist() == [
        False, False, False, False, True, True]
    # Round half to even: n = 6, rho = 0.5 -> k = round(2.5) + 1 = 3 (not 4).
    h = torch.arange(6.0)
    assert torch.equal(entropy_quantile_mask(h, torch.ones(6), top_fraction=0.5),
                       torch.tensor([False, False, True, True, True, True]))
    # Per response (Archer): row 0 keeps {1.5, 2.0}, row 1 keeps {3.0}.
    got = entropy_quantile_mask(entropy, mask, top_fraction=0.2, per_sequence=True)
    assert torch.equal(got, torch.tensor([[0, 1, 0, 1], [0, 0, 1, 0]], dtype=torch.bool))


def test_quantile_mask_ties_empty_and_full():
    ones = torch.ones(3, 4)
    # All tied: the threshold equals every value, every valid token is kept.
    assert torch.equal(entropy_quantile_mask(ones, ones, top_fraction=0.2), ones.bool())
    # Ties at the threshold are all kept: 5 of 8 tokens although rho * n = 1.6.
    h = torch.tensor([0.1, 0.2, 0.3, 0.7, 0.7, 0.7, 0.7, 0.7])
    got = entropy_quantile_mask(h, torch.ones(8), top_fraction=0.2)
    assert got.tolist() == [False] * 3 + [True] * 5
    # Empty: nothing valid, or only NaN valid.
    assert not entropy_quantile_mask(ones, torch.zeros(3, 4)).any()
    assert not entropy_quantile_mask(torch.full((2, 2), float("nan")), torch.ones(2, 2)).any()
    assert not entropy_quantile_mask(ones, torch.zeros(3, 4), per_sequence=True).any()
    # One valid token: always kept. rho = 1: the whole mask.
    single = torch.zeros(3, 4, dtype=torch.bool)
    single[1, 2] = True
    assert torch.equal(entropy_quantile_mask(torch.rand(3, 4), single), single)
    mask = torch.rand(3, 4) > 0.4
    assert torch.equal(entropy_quantile_mask(torch.rand(3, 4), mask, top_fraction=1.0), mask)
    # -0.0 and +0.0 are equal entropies.
    h = torch.tensor([-0.0, 0.0, 0.0, 1.0])
    assert entropy_quantile_mask(h, torch.ones(4), top_fraction=0.75).tolist() == [True] * 4


def test_quantile_mask_as_loss_mask_keeps_the_normaliser():
    g = torch.Generator().manual_seed(0)
    entropy, mask = torch.rand(3, 5, generator=g), torch.rand(3, 5, generator=g) > 0.2
    forking = entropy_quantile_mask(entropy, mask, top_fraction=0.2)
    lp = torch.randn(3, 5, generator=g)
    out = clipped_policy_loss(lp, lp, torch.ones(3), forking, num_tokens=mask.sum())
    # r = 1: per-token loss -1 on the forking tokens, divided by all valid tokens.
    assert math.isclose(float(out.loss), -float(forking.sum()) / float(mask.sum()), rel_tol=1e-6)


def test_archer_dual_token_clip_composition():
    """Per-response entropy split -> per-token eps -> clipped_policy_loss, against loops."""
    g = torch.Generator().manual_seed(1)
    B, L = 4, 6
    entropy = torch.rand(B, L, generator=g)
    mask = torch.rand(B, L, generator=g) > 0.25
    old = -torch.rand(B, L, generator=g) * 3
    lp = (old + torch.randn(B, L, generator=g) * 0.5).requires_grad_(True)
    adv = torch.randn(B, generator=g)
    high = entropy_quantile_mask(entropy, mask, top_fraction=0.2, per_sequence=True)
    eps = torch.where(high, 0.5, 0.2)
    out = clipped_policy_loss(lp, old, adv, mask, eps_low=eps, eps_high=eps)
    out.loss.backward()
    want = torch.zeros(B, L, dtype=F64)
    for i in range(B):
        vals = sorted(entropy[i][mask[i]].tolist())
        thr = vals[round(0.8 * (len(vals) - 1))] if vals else math.inf
        for t in range(L):
            if not mask[i, t]:
                continue
            e = 0.5 if entropy[i, t] >= thr else 0.2
            r = math.exp(float(lp.detach()[i, t]) - float(old[i, t]))
            a = float(adv[i])
            want[i, t] = max(-a * r, -a * min(max(r, 1 - e), 1 + e))
    assert_elementwise(out.per_token.detach(), want, 1e-6, 1e-5)
    assert torch.isfinite(lp.grad).all()


def test_quantile_mask_rejects_bad_input():
    h, m = torch.rand(2, 3), torch.ones(2, 3)
    for rho in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="top_fraction"):
            entropy_quantile_mask(h, m, top_fraction=rho)
    with pytest.raises(TypeError, match="top_fraction"):
        entropy_quantile_mask(h, m, top_fraction="0.2")
    with pytest.raises(TypeError, match="entropy"):
        entropy_quantile_mask(torch.ones(2, 3, dtype=torch.int64), m)
    with pytest.raises(ValueError, match="mask"):
        entropy_quantile_mask(h, torch.ones(3, 2))
    with pytest.raises(TypeError, match="per_sequence"):
        entropy_quantile_mask(h, m, per_sequence=1)
    with pytest.raises(ValueError, match="group"):
        entropy_quantile_mask(h, m, per_sequence=True, group=object())
    with pytest.raises(TypeError, match="group"):
        entropy_quantile_mask(h, m, group="world")


# --------------------------------------------------------------------------- EDGE-GRPO


@settings(**SETTINGS)
@given(entropy_batch(), st.booleans(), st.sampled_from([None, 1.5]))
def test_edge_advantages_match_reference(batch, per_token, max_scale):
    entropy, mask = batch
    B, L = entropy.shape
    g = torch.Generator().manual_seed(B * 10 + L)
    adv = torch.randn((B, L) if per_token else (B,), generator=g)
    if per_token:
        adv[~mask] = float("nan")                       # masked garbage
    got = sequence_entropy_advantages(adv, entropy, mask, max_scale=max_scale)
    assert got.shape == adv.shape and got.dtype == adv.dtype
    assert_elementwise(got, ref_edge(adv, entropy.nan_to_num(0.0), mask, max_scale), 1e-6, 1e-5)


def test_edge_advantages_worked_example_and_degenerate_rows():
    adv = torch.tensor([1.0, -1.0, 2.0, 0.5])
    entropy = torch.tensor([[0.2, 0.4, 9.9], [1.0, 1.4, 1.2], [0.0, 0.0, 5.0], [3.0, 3.0, 3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [0, 0, 0]])
    # P = (0.3, 1.2, 0, empty); P-bar over the three rows with tokens = 0.5.
    got = sequence_entropy_advantages(adv, entropy, mask)
    assert torch.allclose(got, torch.tensor([1.0 * 0.5 / 0.3, -1.0 * 0.5 / 1.2, 2.0, 0.5]))
    per_token = sequence_entropy_advantages(adv[:, None].expand(4, 3), entropy, mask)
    assert torch.equal(per_token, torch.where(mask.bool(), got[:, None], 0.0))
    # max_scale caps P-bar / P_i (a boundary: 0.5/0.3 capped, 0.5/1.2 untouched).
    capped = sequence_entropy_advantages(adv, entropy, mask, max_scale=1.25)
    assert torch.allclose(capped, torch.tensor([1.25, -0.5 / 1.2, 2.0, 0.5]))
    # All masked: unchanged advantages; per token: zeros. Never NaN.
    none = torch.zeros(4, 3)
    assert torch.equal(sequence_entropy_advantages(adv, entropy, none), adv)
    assert torch.equal(sequence_entropy_advantages(adv[:, None].expand(4, 3), entropy, none),
                       torch.zeros(4, 3))


def test_edge_advantages_are_detached():
    adv = torch.tensor([1.0, -1.0], requires_grad=True)
    entropy = torch.tensor([[0.5, 1.0], [2.0, 0.1]], requires_grad=True)
    out = sequence_entropy_advantages(adv, entropy, torch.ones(2, 2))
    assert not out.requires_grad


def test_edge_advantages_reject_bad_input():
    h, m = torch.rand(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        sequence_entropy_advantages(torch.ones(3), h, m)
    with pytest.raises(ValueError, match="advantages"):
        sequence_entropy_advantages(torch.ones(2, 2), h, m)
    with pytest.raises(TypeError, match="advantages"):
        sequence_entropy_advantages(torch.ones(2, dtype=torch.int64), h, m)
    with pytest.raises(ValueError, match="mask"):
        sequence_entropy_advantages(torch.ones(2), h, torch.ones(2, 2))
    with pytest.raises(ValueError, match="max_scale"):
        sequence_entropy_advantages(torch.ones(2), h, m, max_scale=0.0)
    with pytest.raises(TypeError, match="group"):
        sequence_entropy_advantages(torch.ones(2), h, m, group="world")
    with pytest.raises(ValueError, match="entropy"):
        sequence_entropy_advantages(torch.ones(()), torch.tensor(1.0), torch.tensor(1.0))


@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (0,)])
def test_empty_batches_give_empty_outputs(shape):
    """B = 0 (a data-parallel rank with nothing to do) or L = 0: empty outputs, no error."""
    h, m = torch.rand(shape), torch.ones(shape)
    for per_sequence in (False, True):
        if per_sequence and len(shape) < 2:
            continue
        out = entropy_quantile_mask(h, m, per_sequence=per_sequence)
        assert out.shape == shape and out.dtype == torch.bool
    if len(shape) == 2:
        for adv in (torch.ones(shape), torch.ones(shape[:-1])):
            out = sequence_entropy_advantages(adv, h, m)
            assert out.shape == adv.shape and torch.isfinite(out).all()


def test_all_masked_batch_selects_nothing_and_keeps_advantages():
    h, m = torch.rand(3, 4), torch.zeros(3, 4)
    assert not entropy_quantile_mask(h, m).any()
    assert not entropy_quantile_mask(h, m, per_sequence=True).any()
    adv = torch.tensor([1.0, -2.0, 0.5])
    assert torch.equal(sequence_entropy_advantages(adv, h, m), adv)


def test_quantile_mask_on_the_radix_path_matches_eager_and_reference():
    """Compiled, the batch quantile takes the radix k-th value (as on an accelerator)
    instead of the CPU's host ``kthvalue``: the same mask as eager and the reference, with
    ties, one valid token, an all-masked batch and NaN at masked positions."""
    g = torch.Generator().manual_seed(8)
    ties = (torch.randint(0, 3, (4, 6), generator=g) * 0.5).float()
    one = torch.zeros(4, 6, dtype=torch.bool)
    one[1, 4] = True
    garbage = torch.rand(4, 6, generator=g)
    garbage_mask = torch.rand(4, 6, generator=g) < 0.6
    garbage[~garbage_mask] = float("nan")
    batches = [(torch.rand(4, 6, generator=g), torch.rand(4, 6, generator=g) < 0.7),
               (ties, torch.ones(4, 6, dtype=torch.bool)), (ties, one),
               (ties, torch.zeros(4, 6, dtype=torch.bool)), (garbage, garbage_mask)]
    fn = functools.partial(entropy_quantile_mask, top_fraction=0.3)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)
    for entropy, mask in batches:
        got = compiled(entropy, mask)
        assert torch.equal(got, fn(entropy, mask))
        assert torch.equal(got, ref_quantile_mask(entropy, mask, 0.3))


# --------------------------------------------------------------------------- data parallel


def _dp_inputs(world):
    """Uneven shards of one batch; ties at the thresholds; the last rank has no valid token."""
    g = torch.Generator().manual_seed(40 + world)
    rows = [3, 5, 2][:world]
    total, length = sum(rows), 6
    entropy = torch.exp(torch.randn(total, length, generator=g) * 2 - 1)
    entropy[0, :4] = entropy[1, 1]                     # repeated values across ranks
    entropy[-rows[-1] - 1, 0] = 0.0
    mask = torch.rand(total, length, generator=g) < 0.7
    mask[-rows[-1]:] = False
    adv_rows = torch.randn(total, generator=g)
    adv_tokens = torch.randn(total, length, generator=g)
    return rows, entropy, mask, adv_rows, adv_tokens


RHOS = (0.05, 0.2, 0.5, 1.0)


def _dp_worker(rank, world):
    group = dist.group.WORLD
    rows, entropy, mask, adv_rows, adv_tokens = _dp_inputs(world)
    lo, hi = sum(rows[:rank]), sum(rows[:rank + 1])
    e, m = entropy[lo:hi], mask[lo:hi]
    out = {f"mask-{rho}": entropy_quantile_mask(e, m, top_fraction=rho, group=group)
           for rho in RHOS}
    out["mask-empty"] = entropy_quantile_mask(e, torch.zeros_like(m), group=group)
    out["edge-rows"] = sequence_entropy_advantages(adv_rows[lo:hi], e, m, group=group)
    out["edge-tokens"] = sequence_entropy_advantages(adv_tokens[lo:hi], e, m, group=group,
                                                     max_scale=2.0)
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def data_parallel(request):
    world = request.param
    return _dp_inputs(world), run_ranks(_dp_worker, world)


def test_quantile_mask_data_parallel_matches_single_process(data_parallel):
    (rows, entropy, mask, _, _), results = data_parallel
    for rho in RHOS:
        got = torch.cat([res[f"mask-{rho}"] for res in results])
        assert torch.equal(got, entropy_quantile_mask(entropy, mask, top_fraction=rho)), rho
        assert torch.equal(got, ref_quantile_mask(entropy, mask, rho)), rho
    assert not torch.cat([res["mask-empty"] for res in results]).any()


def test_edge_advantages_data_parallel_matches_single_process(data_parallel):
    (rows, entropy, mask, adv_rows, adv_tokens), results = data_parallel
    got = torch.cat([res["edge-rows"] for res in results])
    assert_elementwise(got, sequence_entropy_advantages(adv_rows, entropy, mask), 1e-7, 1e-6)
    assert_elementwise(got, ref_edge(adv_rows, entropy, mask), 1e-6, 1e-5)
    got = torch.cat([res["edge-tokens"] for res in results])
    assert_elementwise(got, ref_edge(adv_tokens, entropy, mask, 2.0), 1e-6, 1e-5)
