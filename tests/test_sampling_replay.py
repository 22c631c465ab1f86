"""Sampling replay: log-probs and entropy under the truncated distribution a rollout engine
sampled from, replayed from its kept token sets (``kept_ids``) or recomputed from the logits
(``top_k`` / ``top_p``), against float64 references written plainly (full softmax, explicit
masks, Python loops); torch path and Triton (interpreter on CPU); gradients; the sampler's
behaviour log-prob; vocabulary shards over gloo ranks; opcheck and torch.compile."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hapo_ops
from conftest import HAS_CUDA, IMPL_DEVICES, INTERPRETING
from distributed_harness import run_ranks
from hapo_ops import EntropyStats, adaptive_temperature_sample
from tolerances import GRAD_TOL, VALUE_TOL, assert_close

warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy warnings of the interpreter

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TP_IMPLS = ["torch"] + (["triton"] if INTERPRETING else [])


# --------------------------------------------------------------------------- references


def reference_kept_mask(kept_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """(..., V) bool: the set of non-negative ids of each row (duplicates count once)."""
    flat = kept_ids.reshape(-1, kept_ids.shape[-1]).cpu()
    mask = torch.zeros(flat.shape[0], vocab, dtype=torch.bool)
    for row in range(flat.shape[0]):
        for token in flat[row].tolist():
            if 0 <= token < vocab:
                mask[row, token] = True
    return mask.view(*kept_ids.shape[:-1], vocab)


def reference_truncation_mask(logits: torch.Tensor, temperature, top_k, top_p) -> torch.Tensor:
    """(..., V) bool kept set of top-k then top-p, by sorting, in float64: the k largest
    logits and their ties; then every token whose strictly-more-probable kept mass is < p
    (the smallest most-probable set reaching p, ties kept)."""
    vocab = logits.shape[-1]
    z = logits.detach().double().cpu().reshape(-1, vocab)
    n_rows = z.shape[0]
    t = torch.as_tensor(temperature, dtype=torch.float64).expand(logits.shape[:-1]).reshape(-1)
    ks = (torch.as_tensor(top_k).expand(logits.shape[:-1]).reshape(-1).tolist()
          if top_k is not None else [0] * n_rows)
    ps = (torch.as_tensor(top_p, dtype=torch.float64).expand(logits.shape[:-1]).reshape(-1)
          .tolist() if top_p is not None else [1.0] * n_rows)
    mask = torch.zeros(n_rows, vocab, dtype=torch.bool)
    for row in range(n_rows):
        values = z[row]
        keep = torch.ones(vocab, dtype=torch.bool)
        k = int(ks[row])
        if 0 < k < vocab:
            kth = values.sort(descending=True).values[k - 1]
            keep = values >= kth
        if ps[row] < 1.0:
            probs = torch.softmax((values / t[row]).masked_fill(~keep, float("-inf")), -1)
            by_p = torch.zeros(vocab, dtype=torch.bool)
            for v in range(vocab):
                if keep[v]:
                    above = probs[keep & (values > values[v])].sum()
                    by_p[v] = bool(above < ps[row])
            keep = by_p
        mask[row] = keep
    return mask.view(logits.shape)


def reference_restricted(logits, mask, labels, temperature=1.0, ignore_index=-100,
                         g_logp=None, g_entropy=None):
    """(logp, H, ∂L/∂z) in float64 of softmax(z/T) restricted to ``mask`` and renormalized,
    by autograd through the plain formulas. logp: -inf outside the set, 0 where ignored;
    rows with an empty set: NaN and gradient 0. L = Σ g_logp·logp (finite logp only) +
    Σ g_entropy·H (rows with a distribution only)."""
    z = logits.detach().double().cpu().requires_grad_()
    mask = mask.cpu()
    t = torch.as_tensor(temperature, dtype=torch.float64).cpu()
    t = t.expand(logits.shape[:-1])[..., None] if t.dim() else t
    empty = ~mask.any(-1)
    safe_mask = mask | empty[..., None]          # empty rows: any distribution, then NaN
    s = torch.where(safe_mask, z / t, torch.tensor(float("-inf"), dtype=torch.float64))
    log_p = torch.log_softmax(s, -1)
    p = log_p.exp()
    entropy = -(p * torch.where(safe_mask, log_p, 0.0)).sum(-1)
    labels = labels.cpu()
    ignored = labels == ignore_index
    safe_labels = torch.where(ignored, 0, labels).clamp(0, logits.shape[-1] - 1)
    in_set = mask.gather(-1, safe_labels[..., None])[..., 0]
    logp = torch.where(in_set, log_p.gather(-1, safe_labels[..., None])[..., 0],
                       torch.tensor(float("-inf"), dtype=torch.float64))
    logp = torch.where(ignored, 0.0, logp)
    grad = None
    if g_logp is not None or g_entropy is not None:
        loss = z.sum() * 0.0
        if g_logp is not None:
            use = in_set & ~ignored & ~empty
            loss = loss + (g_logp.double().cpu() * torch.where(use, logp, 0.0)).sum()
        if g_entropy is not None:
            loss = loss + (g_entropy.double().cpu() * torch.where(empty, 0.0, entropy)).sum()
        (grad,) = torch.autograd.grad(loss, z)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    logp = torch.where(empty & ~ignored, nan, logp)
    entropy = torch.where(empty, nan, entropy)
    return logp.detach(), entropy.detach(), grad


def random_kept_ids(gen, shape, vocab, width, *, duplicates=True):
    """(…, width) kept ids: random subsets with -1 padding and (optionally) duplicates."""
    n_rows = int(torch.tensor(shape).prod())
    rows = []
    for _ in range(n_rows):
        size = int(torch.randint(1, min(width, vocab) + 1, (), generator=gen))
        ids = torch.randperm(vocab, generator=gen)[:size]
        if duplicates and size < width and bool(torch.rand((), generator=gen) < 0.5):
            ids = torch.cat([ids, ids[:1]])
        pad = torch.full((width - ids.numel(),), -1, dtype=torch.int64)
        row = torch.cat([ids, pad])
        rows.append(row[torch.randperm(width, generator=gen)])
    return torch.stack(rows).view(*shape, width)


def check_op(logits, labels, temperature, impl, ref_mask, **kwargs):
    """Values and gradients of the op (truncated by ``kwargs``) against the float64
    reference restricted to ``ref_mask``."""
    leaf = logits.detach().clone().requires_grad_()
    logp, entropy = hapo_ops.logprobs_and_entropy(leaf, labels, temperature=temperature,
                                                  impl=impl, **kwargs)
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    g_logp = torch.randn(labels.shape, device=logits.device)
    g_entropy = torch.randn(labels.shape, device=logits.device)
    ref_logp, ref_entropy, ref_grad = reference_restricted(
        logits, ref_mask, labels, temperature, g_logp=g_logp, g_entropy=g_entropy)
    assert_close("logp", logp, ref_logp, VALUE_TOL[logits.dtype], allow_nan=True)
    assert_close("entropy", entropy, ref_entropy, VALUE_TOL[logits.dtype], allow_nan=True)
    loss = (g_logp * torch.where(torch.isfinite(logp), logp, 0.0)
            + g_entropy * torch.where(torch.isnan(entropy), 0.0, entropy)).sum()
    loss.backward()
    assert_close("grad", leaf.grad, ref_grad, GRAD_TOL[logits.dtype])
    assert (leaf.grad[~ref_mask.to(leaf.device)] == 0).all()  # only kept entries
    return logp.detach(), entropy.detach(), leaf.grad


# --------------------------------------------------------------------------- kept_ids


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@settings(max_examples=8 if HAS_CUDA else 15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 4), vocab=st.sampled_from([1, 2, 7, 33, 130]),
       width=st.integers(1, 9), dtype=st.sampled_from(DTYPES),
       magnitude=st.sampled_from([1.0, 8.0, 30.0]), per_token_t=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_kept_ids_match_float64_reference(impl, device, rows, vocab, width, dtype, magnitude,
                                          per_token_t, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, 3, vocab, generator=gen) * magnitude).to(dtype)
    kept = random_kept_ids(gen, (rows, 3), vocab, width)
    labels = torch.randint(0, vocab, (rows, 3), generator=gen)
    labels[0, 0] = max(int(kept[0, 0].max()), 0)   # a label in its set (or the only token)
    labels[0, 1] = -100
    if per_token_t:
        temperature = torch.rand(rows, 3, generator=gen) * 1.5 + 0.3
    else:
        temperature = float(torch.rand((), generator=gen) * 1.5 + 0.3)
    mask = reference_kept_mask(kept, vocab)
    to = (lambda x: x.to(device) if isinstance(x, torch.Tensor) else x)
    check_op(to(logits), to(labels), to(temperature), impl, mask, kept_ids=to(kept))


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_kept_set_rules_empty_full_duplicates_outside(impl, device):
    """Empty set (all -1): NaN logp and H, 0 gradient, logp 0 where ignored. Full set (every
    id, any order): the plain op. Duplicates count once. A label outside its set: -inf,
    and no logp gradient."""
    torch.manual_seed(0)
    vocab = 11
    logits = torch.randn(5, vocab, device=device) * 3
    labels = torch.tensor([2, 2, 4, 7, 3], device=device)
    kept = torch.full((5, vocab + 2), -1, dtype=torch.int64)
    kept[1, :vocab] = torch.randperm(vocab)                 # full set
    kept[2, :4] = torch.tensor([4, 1, 4, 4])                # duplicates of the label
    kept[3, :3] = torch.tensor([0, 1, 2])                   # label 7 outside
    kept[4, :1] = 3                                         # a single token: logp 0, H 0
    kept = kept.to(device)
    leaf = logits.clone().requires_grad_()
    logp, entropy = hapo_ops.logprobs_and_entropy(leaf, labels, kept_ids=kept, impl=impl)
    assert torch.isnan(logp[0]) and torch.isnan(entropy[0])
    full_logp, full_entropy = hapo_ops.logprobs_and_entropy(logits[1:2], labels[1:2], impl=impl)
    assert_close("full logp", logp[1:2], full_logp, VALUE_TOL[torch.float32])
    assert_close("full entropy", entropy[1:2], full_entropy, VALUE_TOL[torch.float32])
    dedup_logp, dedup_entropy = hapo_ops.logprobs_and_entropy(
        logits[2:3], labels[2:3], kept_ids=torch.tensor([[1, 4]], device=device), impl=impl)
    assert torch.equal(logp[2:3], dedup_logp) and torch.equal(entropy[2:3], dedup_entropy)
    assert logp[3] == float("-inf") and torch.isfinite(entropy[3])
    assert logp[4] == 0 and entropy[4] == 0
    (torch.where(torch.isfinite(logp), logp, 0.0).sum()
     + torch.where(torch.isnan(entropy), 0.0, entropy).sum()).backward()
    assert (leaf.grad[0] == 0).all() and (leaf.grad[4] == 0).all()
    assert (leaf.grad[3, 3:] == 0).all() and (leaf.grad[3, :3] != 0).any()
    # Ignored labels: logp 0 even for an empty set; no labels at all: entropy only.
    ignored = torch.full((5,), -100, device=device)
    logp_ignored = hapo_ops.token_logprobs(logits, ignored, kept_ids=kept, impl=impl)
    assert (logp_ignored == 0).all()
    entropy_only = hapo_ops.token_entropy(logits, kept_ids=kept, impl=impl)
    torch.testing.assert_close(entropy_only, entropy.detach(), rtol=0, atol=0, equal_nan=True)
    # No kept column at all (K = 0): every set is empty.
    nothing = torch.empty((5, 0), dtype=torch.int64, device=device)
    assert torch.isnan(hapo_ops.token_entropy(logits, kept_ids=nothing, impl=impl)).all()


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_kept_ids_on_a_strided_slice_and_in_place(impl, device):
    """``logits[:, :-1]`` (not viewable as 2-D): gathered in place, no copy; the in-place
    backward writes the kept entries' gradient into the buffer, zeros elsewhere."""
    torch.manual_seed(1)
    base = torch.randn(3, 6, 29, device=device)
    gen = torch.Generator().manual_seed(1)
    kept = random_kept_ids(gen, (3, 5), 29, 6).to(device)
    labels = torch.randint(0, 29, (3, 5), device=device)
    mask = reference_kept_mask(kept, 29)
    check_op(base[:, :-1], labels, 0.8, impl, mask, kept_ids=kept)
    grads = []
    for inplace in (False, True):
        leaf = base.clone().requires_grad_()
        work = leaf * 1.0
        logp, entropy = hapo_ops.logprobs_and_entropy(work[:, :-1], labels, kept_ids=kept,
                                                      impl=impl, inplace_backward=inplace)
        (torch.where(torch.isfinite(logp), logp, 0.0) - 0.5 * entropy).sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


# --------------------------------------------------------------------------- top_k / top_p


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@settings(max_examples=6 if HAS_CUDA else 12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 3), vocab=st.sampled_from([1, 5, 33, 200]),
       dtype=st.sampled_from(DTYPES), top_k=st.sampled_from([None, 1, 3, 20]),
       top_p=st.sampled_from([None, 0.3, 0.8, 0.95, 1.0]), ties=st.booleans(),
       per_position=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_top_k_top_p_match_float64_reference(impl, device, rows, vocab, dtype, top_k, top_p,
                                             ties, per_position, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, 4, vocab, generator=gen) * 2.0
    if ties:  # repeated values straddling the thresholds
        logits = (logits * 2).round() / 2
    logits = logits.to(dtype)
    labels = torch.randint(0, vocab, (rows, 4), generator=gen)
    labels[0, 0] = int(logits[0, 0].float().argmax())   # always kept
    labels[-1, -1] = -100
    temperature = torch.rand(rows, 4, generator=gen) + 0.5
    if per_position:
        k_values = torch.randint(-1, vocab + 2, (rows, 4), generator=gen)  # ≤ 0: disabled
        p_values = torch.rand(rows, 4, generator=gen) * 0.9 + 0.1
        p_values[0, 1] = 1.0                                                 # disabled
        top_k, top_p = k_values, p_values
    if top_k is None and top_p is None:
        top_p = 0.5
    mask = reference_truncation_mask(logits, temperature, top_k, top_p)
    to = (lambda x: x.to(device) if isinstance(x, torch.Tensor) else x)
    check_op(to(logits), to(labels), to(temperature), impl, mask, top_k=to(top_k),
             top_p=to(top_p))


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_recomputed_truncation_equals_kept_ids_replay(impl, device):
    """top_k/top_p from the logits and the replay of the same kept sets: the same values
    and gradients (up to the order of the fp32 sums: over V entries, or over K)."""
    torch.manual_seed(2)
    vocab = 150
    logits = (torch.randn(6, vocab) * 2.5).to(torch.bfloat16).to(device)
    labels = torch.randint(0, vocab, (6,), device=device)
    labels[:3] = logits[:3].float().argmax(-1)
    temperature = torch.linspace(0.6, 1.4, 6, device=device)
    mask = reference_truncation_mask(logits, temperature.cpu(), 40, 0.9)
    width = int(mask.sum(-1).max())
    kept = torch.full((6, width + 3), -1, dtype=torch.int64)
    for row in range(6):
        ids = mask[row].nonzero()[:, 0]
        kept[row, :ids.numel()] = ids[torch.randperm(ids.numel())]
    torch.manual_seed(9)  # the same upstream gradients for both
    recomputed = check_op(logits, labels, temperature, impl, mask, top_k=40, top_p=0.9)
    torch.manual_seed(9)
    replayed = check_op(logits, labels, temperature, impl, mask, kept_ids=kept.to(device))
    assert_close("logp", recomputed[0], replayed[0], VALUE_TOL[torch.float32])
    assert_close("entropy", recomputed[1], replayed[1], VALUE_TOL[torch.float32])
    assert_close("grad", recomputed[2], replayed[2], GRAD_TOL[torch.bfloat16])


def test_torch_and_triton_thresholds_keep_the_same_sets():
    """The torch path (256-bin histograms) and the Triton kernel (16-way passes) find
    thresholds that keep the same entries, for every dtype."""
    if not INTERPRETING and not HAS_CUDA:
        pytest.skip("needs Triton")
    from hapo_ops.vocab.truncation import truncation_threshold
    device = "cuda" if HAS_CUDA else "cpu"
    torch.manual_seed(3)
    for dtype in DTYPES:
        logits = (torch.randn(5, 300) * 3).round().to(dtype).to(device)  # many ties
        temperature = torch.linspace(0.5, 1.5, 5, device=device)
        for top_k, top_p in ((7, None), (None, 0.7), (50, 0.6),
                             (torch.tensor([1, 0, 5, 300, 9], device=device),
                              torch.tensor([0.2, 1.0, 0.5, 0.99, 0.01], device=device))):
            sets = []
            for impl in ("torch", "triton"):
                theta = truncation_threshold(logits, temperature, 1.0, top_k, top_p, impl, 64)
                sets.append(logits.float() >= theta[:, None])
            assert torch.equal(sets[0], sets[1]), (dtype, top_k, top_p)
            expected = reference_truncation_mask(logits, temperature.cpu(), top_k, top_p)
            assert torch.equal(sets[0].cpu(), expected), (dtype, top_k, top_p)


def test_at_least_one_token_and_ties_at_the_threshold():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 1.0, 0.0], [3.0, 3.0, -1.0, -2.0]])
    labels = torch.tensor([3, 2, 1])
    logp, entropy = hapo_ops.logprobs_and_entropy(logits, labels, top_p=1e-3)
    # Uniform row: every token ties at the threshold (all kept); otherwise the argmax (and
    # its ties) alone.
    torch.testing.assert_close(logp, torch.tensor([-1.3863, float("-inf"), -0.6931]),
                               atol=1e-4, rtol=0)
    logp_k, _ = hapo_ops.logprobs_and_entropy(logits, labels, top_k=2)
    ref = reference_restricted(logits, reference_truncation_mask(logits, 1.0, 2, None),
                               labels)[0]
    assert_close("logp", logp_k, ref, VALUE_TOL[torch.float32])
    assert hapo_ops.token_entropy(logits, top_k=1)[1] == 0


# --------------------------------------------------------------------------- the sampler


def test_sampler_log_prob_equals_recomputed_and_replayed():
    """A token drawn with top_k/top_p (torch path) has the same behaviour log-prob as the
    trainer's recomputation and as the replay of its kept set; it lies in that set."""
    torch.manual_seed(4)
    logits = (torch.randn(64, 97) * 2).to(torch.bfloat16)
    stats = EntropyStats(torch.tensor(0.0), torch.tensor(1.2), torch.tensor(-3.0))
    for top_k, top_p in ((20, None), (None, 0.8), (30, 0.9)):
        out = adaptive_temperature_sample(logits, stats, seed=5, tau=0.3, top_k=top_k,
                                          top_p=top_p)
        recomputed = hapo_ops.token_logprobs(logits, out.tokens, temperature=out.temperature,
                                             top_k=top_k, top_p=top_p)
        assert torch.equal(out.logprobs, recomputed)
        mask = reference_truncation_mask(logits, out.temperature, top_k, top_p)
        assert mask.gather(-1, out.tokens[:, None]).all()
        width = int(mask.sum(-1).max())
        kept = torch.full((64, width), -1, dtype=torch.int64)
        for row in range(64):
            ids = mask[row].nonzero()[:, 0]
            kept[row, :ids.numel()] = ids
        replayed = hapo_ops.token_logprobs(logits, out.tokens, temperature=out.temperature,
                                           kept_ids=kept)
        assert_close("replay", out.logprobs, replayed, VALUE_TOL[torch.float32])
        ref = reference_restricted(logits, mask, out.tokens, out.temperature)[0]
        assert_close("reference", out.logprobs, ref, VALUE_TOL[torch.float32])


def test_filter_top_k_top_p_is_the_shared_rule():
    from hapo_ops.vocab.sampling import filter_top_k_top_p
    torch.manual_seed(6)
    scaled = torch.randn(7, 40) * 2
    for top_k, top_p in ((5, None), (None, 0.6), (10, 0.5)):
        kept = torch.isfinite(filter_top_k_top_p(scaled, top_k, top_p))
        assert torch.equal(kept, reference_truncation_mask(scaled, 1.0, top_k, top_p))
    assert filter_top_k_top_p(scaled, None, None) is scaled


# --------------------------------------------------------------------------- tensor parallel


def _tp_inputs(sizes):
    vocab = sum(sizes)
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, 3, vocab, generator=gen) * 2.5
    flat = logits.view(-1, vocab)
    flat[0, 2] += 20.0                                   # near-deterministic
    flat[1, :] = flat[1, 0]                              # uniform: ties everywhere
    flat[2, vocab - sizes[-1]:] = float("-inf")          # the last shard has no finite logit
    kept = random_kept_ids(gen, (4, 3), vocab, 9)
    kept.view(-1, 9)[3] = -1                             # an empty set
    kept.view(-1, 9)[4, :3] = torch.tensor([1, vocab - 1, 1])  # across shards, a duplicate
    labels = torch.randint(0, vocab, (4, 3), generator=gen)
    labels.view(-1)[4] = vocab - 1
    labels.view(-1)[5] = -100
    temperature = 0.5 + torch.rand(4, 3, generator=gen)
    w_logp, w_entropy = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    top_k = torch.randint(0, 12, (4, 3), generator=gen)
    return logits, kept, labels, temperature, w_logp, w_entropy, top_k


def _loss(logp, entropy, w_logp, w_entropy):
    return (w_logp * torch.where(torch.isfinite(logp), logp, 0.0)
            + w_entropy * torch.where(torch.isnan(entropy), 0.0, entropy)).sum()


def _cases(kept, top_k):
    return {"kept": dict(kept_ids=kept), "top_p": dict(top_p=0.85),
            "top_k_top_p": dict(top_k=top_k, top_p=0.7)}


def _tp_worker(rank: int, world: int, sizes: list[int]):
    group = dist.group.WORLD
    logits, kept, labels, temperature, w_logp, w_entropy, top_k = _tp_inputs(sizes)
    start = sum(sizes[:rank])
    out = {}
    for impl in TP_IMPLS:
        for name, kwargs in _cases(kept, top_k).items():
            shard = logits[..., start:start + sizes[rank]].clone().requires_grad_(True)
            logp, entropy = hapo_ops.logprobs_and_entropy(
                shard, labels, temperature=temperature, impl=impl, tp_group=group, **kwargs)
            _loss(logp, entropy, w_logp, w_entropy).backward()
            out[impl, name] = (logp.detach(), entropy.detach(), shard.grad)
    return out


@pytest.mark.parametrize("sizes", [[20, 10, 7], [25, 12]], ids=["world3", "world2"])
def test_vocab_parallel_matches_unsharded(sizes):
    results = run_ranks(_tp_worker, len(sizes), sizes)
    logits, kept, labels, temperature, w_logp, w_entropy, top_k = _tp_inputs(sizes)
    for impl in TP_IMPLS:
        for name, kwargs in _cases(kept, top_k).items():
            full = logits.clone().requires_grad_(True)
            logp, entropy = hapo_ops.logprobs_and_entropy(full, labels, temperature=temperature,
                                                          impl=impl, **kwargs)
            _loss(logp, entropy, w_logp, w_entropy).backward()
            for res in results:
                tp_logp, tp_entropy, _ = res[impl, name]
                assert torch.equal(torch.isnan(tp_logp), torch.isnan(logp))
                torch.testing.assert_close(tp_logp, logp.detach(), rtol=1e-5, atol=1e-5,
                                           equal_nan=True)
                torch.testing.assert_close(tp_entropy, entropy.detach(), rtol=1e-5, atol=1e-6,
                                           equal_nan=True)
            tp_grad = torch.cat([res[impl, name][2] for res in results], dim=-1)
            torch.testing.assert_close(tp_grad, full.grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- compile


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_opcheck_and_compile_without_graph_break(impl, device):
    torch.manual_seed(7)
    logits = torch.randn(4, 9, device=device, requires_grad=True)
    labels = torch.randint(0, 9, (4,), device=device)
    # (opcheck compares without equal_nan: no empty set here, the other tests cover it)
    kept = torch.tensor([[0, 3, -1], [1, 1, 2], [-1, 5, -1], [8, 7, 6]], device=device)
    temperature = torch.rand(4, device=device) + 0.5
    ops = torch.ops.hapo_ops
    # The one op of every subset: kept ids (local coordinates), then a threshold.
    torch.library.opcheck(ops.logprobs_entropy,
                          (logits, labels, labels, temperature, 1.0, -100, impl, False, 3, None,
                           kept))
    _, entropy, state, _ = ops.logprobs_entropy(logits.detach(), labels, labels, None, 0.7,
                                                -100, impl, False, 3, None, kept)
    args = (logits.detach(), labels, None, 0.7, state, entropy, torch.randn(4, device=device),
            torch.randn(4, device=device), impl, 3, None, kept)
    torch.library.opcheck(ops.logprobs_entropy_backward, args)
    torch.library.opcheck(ops.logprobs_entropy_backward_, (logits.detach().clone(),)
                          + args[1:])
    top_k = torch.tensor([2, 0, 5, 9], device=device)
    torch.library.opcheck(ops.truncation_threshold,
                          (logits.detach(), temperature, 1.0, top_k, 0, None, 0.8, impl, 2))
    threshold = ops.truncation_threshold(logits.detach(), None, 1.0, None, 3, None, 1.0, impl, 2)
    torch.library.opcheck(ops.logprobs_entropy,
                          (logits, labels, labels, temperature, 1.0, -100, impl, False, 3,
                           threshold))
    _, entropy, state, _ = ops.logprobs_entropy(logits.detach(), labels, labels, None, 0.7,
                                                -100, impl, False, 3, threshold)
    args = (logits.detach(), labels, None, 0.7, state, entropy, torch.randn(4, device=device),
            None, impl, 3, threshold)
    torch.library.opcheck(ops.logprobs_entropy_backward, args)
    torch.library.opcheck(ops.logprobs_entropy_backward_, (logits.detach().clone(),)
                          + args[1:])

    def loss(z, y, t, kept_ids, k):
        a_logp, a_entropy = hapo_ops.logprobs_and_entropy(z, y, temperature=t, impl=impl,
                                                          kept_ids=kept_ids)
        b_logp, b_entropy = hapo_ops.logprobs_and_entropy(z, y, temperature=t, impl=impl,
                                                          top_k=k, top_p=0.9)
        return (a_logp.nan_to_num(neginf=0.0) + a_entropy.nan_to_num()
                + b_logp.nan_to_num(neginf=0.0) - 0.1 * b_entropy).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    out = compiled(logits, labels, temperature, kept, top_k)
    (grad_compiled,) = torch.autograd.grad(out, logits)
    eager = loss(logits, labels, temperature, kept, top_k)
    (grad_eager,) = torch.autograd.grad(eager, logits)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad_compiled, grad_eager)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(kept_ids=torch.zeros(3, 2, dtype=torch.int64)), ValueError, "kept_ids"),
    (dict(kept_ids=torch.zeros(2, 2)), TypeError, "kept_ids"),
    (dict(kept_ids=torch.tensor([[0, 5], [1, -1]])), ValueError, "kept_ids"),
    (dict(kept_ids=torch.zeros(2, 2, dtype=torch.int64), top_k=2), ValueError, "not both"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=1.5), TypeError, "top_k"),
    (dict(top_k=torch.ones(2)), TypeError, "top_k"),
    (dict(top_k=torch.ones(3, dtype=torch.int64)), ValueError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p="high"), TypeError, "top_p"),
    (dict(top_p=torch.ones(2, dtype=torch.int64)), TypeError, "top_p"),
    (dict(top_p=torch.tensor([0.5, 0.0])), ValueError, "top_p"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        hapo_ops.logprobs_and_entropy(torch.randn(2, 5), torch.zeros(2, dtype=torch.long),
                                      **kwargs)


# --------------------------------------------------------------------------- precision edges


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_logits_one_ulp_apart_stay_apart(impl, device, dtype):
    """Every bit the dtype carries is searched: 16-bit logits one ulp apart (at several
    magnitudes, positive and negative) are never merged by top-k or top-p."""
    rows = []
    for value in (1.0, 3.0, -2.0, 700.0, 0.01):
        top = torch.tensor(value, dtype=dtype)
        below = torch.nextafter(top, torch.tensor(float("-inf"), dtype=dtype))
        far = torch.tensor([value - 40.0, value - 60.0]).to(dtype)
        rows.append(torch.cat([torch.stack([below, top]), far]))
    logits = torch.stack(rows).to(device)
    labels = torch.ones(len(rows), dtype=torch.long, device=device)   # the max
    for kwargs in (dict(top_k=1), dict(top_p=0.3), dict(top_k=2, top_p=0.3)):
        logp, entropy = hapo_ops.logprobs_and_entropy(logits, labels, impl=impl, **kwargs)
        assert (logp == 0).all() and (entropy == 0).all(), (kwargs, logp, entropy)
    logp = hapo_ops.token_logprobs(logits, torch.zeros_like(labels), impl=impl, top_k=2)
    expected = torch.log_softmax(logits[:, :2].float(), -1)[:, 0]
    torch.testing.assert_close(logp, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_top_p_of_zero_mass_keeps_the_most_probable_token(impl, device):
    """A top-p whose target mass is 0 (a p that rounds to 0 in float32, or a per-position 0
    where values are not checked) still keeps the most probable tokens (ties included)."""
    logits = torch.tensor([[0.5, 2.0, -1.0, 2.0], [3.0, 1.0, 0.0, -2.0]], device=device)
    labels = torch.tensor([1, 0], device=device)
    for top_p in (1e-46, torch.tensor([1e-46, 1e-46], dtype=torch.float64, device=device)):
        if isinstance(top_p, torch.Tensor) and device == "cpu":
            continue  # checked on CPU: an entry ≤ 0 raises (below)
        logp, entropy = hapo_ops.logprobs_and_entropy(logits, labels, impl=impl, top_p=top_p)
        torch.testing.assert_close(logp, torch.tensor([-0.6931472, 0.0], device=device))
        torch.testing.assert_close(entropy, torch.tensor([0.6931472, 0.0], device=device))
    from hapo_ops.vocab.truncation import truncation_threshold
    theta = truncation_threshold(logits, None, 1.0, None,
                                 torch.zeros(2, device=device), impl, 4)
    assert torch.equal(theta, torch.tensor([2.0, 3.0], device=device))
    if device == "cpu":
        with pytest.raises(ValueError, match="top_p"):
            hapo_ops.logprobs_and_entropy(logits, labels, top_p=torch.zeros(2))


def _tp_edge_worker(rank: int, world: int, impl: str):
    group = dist.group.WORLD
    out = {}
    # An empty batch on every rank: empty results, empty gradients, for every subset.
    labels = torch.zeros(0, dtype=torch.long)
    for name, kwargs in (("plain", {}), ("kept", dict(kept_ids=torch.zeros(0, 2).long())),
                         ("top_k_top_p", dict(top_k=2, top_p=0.8))):
        shard = torch.randn(0, 4, requires_grad=True)
        logp, entropy = hapo_ops.logprobs_and_entropy(shard, labels, impl=impl, tp_group=group,
                                                      **kwargs)
        (logp.sum() + entropy.sum()).backward()
        out[name] = (logp.shape, entropy.shape, shard.grad.shape)
    # A label no shard holds (id 8 ≥ V = 4·world) follows the labels rule with kept ids too:
    # checked on CPU, on every rank (the check follows the all-reduce).
    logits = torch.randn(2, 4)
    kept = torch.tensor([[0, 5, -1], [1, 8, 2]])
    try:
        hapo_ops.token_logprobs(logits, torch.tensor([5, 8]), impl=impl, tp_group=group,
                                kept_ids=kept)
        out["raises"] = False
    except ValueError as error:
        out["raises"] = "no shard" in str(error)
    return out


@pytest.mark.parametrize("impl", TP_IMPLS)
def test_vocab_parallel_empty_batch_and_label_rule(impl):
    for res in run_ranks(_tp_edge_worker, 2, impl):
        for name in ("plain", "kept", "top_k_top_p"):
            assert res[name] == ((0,), (0,), (0, 4)), name
        assert res["raises"]
