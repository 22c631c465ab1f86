"""adaptive_temperature_sample: distribution (chi-square), returned fields against the
single-purpose ops, reproducibility, batching independence of the kernel's RNG, -inf
entries, top-k/top-p, bad input. The Triton kernel runs in the interpreter on CPU (slow per
row: its tests use a few hundred rows) and is checked bit for bit against a NumPy model of
its documented Philox stream, which then carries the many-draw chi-square."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import hapo_ops
from conftest import HAS_CUDA, HAS_TRITON, IMPL_DEVICES, INTERPRETING
from hapo_ops import EntropyStats, SampleOutput, adaptive_temperature_sample

warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy warnings of the interpreter

TRITON = [p for p in IMPL_DEVICES if p.values[0] == "triton"]
requires_triton = pytest.mark.skipif(not TRITON, reason="needs Triton (interpreter or CUDA)")
LOG2E = 1.4426950408889634


def _stats() -> EntropyStats:
    return EntropyStats(torch.tensor(math.log(1.0)), torch.tensor(math.log(2.5)),
                        torch.tensor(math.log(0.05)))


def _two_temperature_rows(vocab: int = 8) -> torch.Tensor:
    """A peaked row (low entropy → cooler) and a flat one (high entropy → hotter)."""
    peaked = torch.linspace(3.0, -3.0, vocab)
    flat = torch.linspace(0.6, -0.6, vocab)
    return torch.stack([peaked, flat])


# --------------------------------------------------------------------------- chi-square


def _chi_square_critical(dof: int, p_value: float = 1e-6) -> float:
    """Upper p-quantile of chi-square(dof), Wilson-Hilferty (z = 4.7534 for p = 1e-6)."""
    z = {1e-6: 4.753424308822899}[p_value]
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def _assert_chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """Pearson chi-square of ``tokens`` against ``probs``; cells with expected count < 5
    pooled. Fixed seeds make it deterministic; p = 1e-6 only catches real errors."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * n
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)])
        expected = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    stat = ((counts - expected) ** 2 / expected.clamp_min(1e-12)).sum().item()
    dof = counts.numel() - 1
    assert stat < _chi_square_critical(dof), f"chi-square {stat:.1f} with {dof} dof"


def _check_groups(out: SampleOutput, logits: torch.Tensor, group: torch.Tensor) -> None:
    temps = []
    for g in group.unique():
        rows = (group == g).nonzero()[:, 0]
        t = out.temperature[rows]
        assert torch.all(t == t[0])
        temps.append(t[0].item())
        probs = torch.softmax(logits[rows[0]].double() / t[0].double(), -1)
        _assert_chi_square(out.tokens[rows].cpu(), probs.cpu())
    assert len(set(temps)) == len(temps), "the groups should have different temperatures"


def test_torch_distribution_chi_square():
    base = _two_temperature_rows(12)
    group = torch.arange(2).repeat_interleave(10000)
    logits = base[group]
    out = adaptive_temperature_sample(logits, _stats(), tau=0.5, seed=7, impl="torch")
    _check_groups(out, logits, group)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_negative_tau_samples_high_entropy_rows_cooler(impl, device):
    """τ < 0 inverts the adaptation: the flat (high-entropy) row gets the lower temperature,
    the one ``adaptive_temperature`` gives, and the draws follow softmax(z/T_row)."""
    base = _two_temperature_rows(12).to(device)
    group = torch.arange(2, device=device).repeat_interleave(256 if impl == "triton" else 4000)
    logits = base[group]
    out = adaptive_temperature_sample(logits, _stats(), tau=-0.5, seed=5, impl=impl)
    expected = hapo_ops.adaptive_temperature(hapo_ops.token_entropy(base), _stats(), tau=-0.5)
    peaked, flat = expected.tolist()
    assert flat < peaked < 1.0          # both above the pivot: both cooled, the flat row more
    hotter = hapo_ops.adaptive_temperature(hapo_ops.token_entropy(base), _stats(), tau=0.5)
    torch.testing.assert_close(expected - 1.0, -(hotter - 1.0))
    torch.testing.assert_close(out.temperature, expected[group], rtol=1e-6, atol=1e-6)
    if impl == "torch":
        _check_groups(out, logits, group)


@pytest.fixture(scope="module")
def kernel_draws():
    """One interpreter/CUDA call: 2 groups × 256 rows of V = 8 (a few seconds interpreted)."""
    if not TRITON:
        pytest.skip("needs Triton")
    device = TRITON[0].values[1]
    base = _two_temperature_rows(8)
    group = torch.arange(2).repeat_interleave(256)
    logits = base[group].to(device)
    out = adaptive_temperature_sample(logits, _stats(), tau=0.5, seed=11, impl="triton")
    return logits, group.to(device), out


@requires_triton
def test_triton_distribution_chi_square(kernel_draws):
    logits, group, out = kernel_draws
    _check_groups(out, logits, group)


# --------------------------------------------------------------------------- NumPy model


def _philox4x32(seed: int, c0, c1, c2, c3, rounds: int = 10):
    """Philox4x32 (Salmon et al. 2011) as Triton's ``tl.philox`` computes it."""
    mask = np.uint64(0xFFFFFFFF)
    c = [np.asarray(x, dtype=np.uint64) & mask for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    a, b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(rounds):
        p0, p2 = b * c[2], a * c[0]  # < 2^64: exact in uint64
        c = [((p0 >> np.uint64(32)) ^ c[1] ^ k0) & mask, p0 & mask,
             ((p2 >> np.uint64(32)) ^ c[3] ^ k1) & mask, p2 & mask]
        k0 = (k0 + np.uint64(0x9E3779B9)) & mask
        k1 = (k1 + np.uint64(0xBB67AE85)) & mask
    return c


def reference_tokens(logits: np.ndarray, temperature: np.ndarray, seed: int,
                     row_ids: np.ndarray) -> np.ndarray:
    """Gumbel-max with the kernel's documented stream: entry v of row r uses output v % 4 of
    Philox(key=seed, counter=(v // 4, 0, r_lo, r_hi)); E = -ln(1 - w), w = (bits>>9 + ½)·2^-23."""
    n, vocab = logits.shape
    v = np.arange(vocab)
    r = row_ids.astype(np.uint64)[:, None]
    outs = _philox4x32(seed, np.broadcast_to(v // 4, (n, vocab)), 0, r & np.uint64(0xFFFFFFFF),
                       r >> np.uint64(32))
    bits = np.choose(v % 4, outs)
    f32 = np.float32
    w = ((bits >> np.uint64(9)).astype(f32) + f32(0.5)) * f32(2.0 ** -23)
    series = w * (f32(1) + w * (f32(0.5) + w * (f32(1 / 3) + w * (f32(0.25) + w * (
        f32(0.2) + w * (f32(1 / 6) + w / f32(7)))))))
    exponential = np.where(w < f32(0.05), series, -np.log(f32(1) - w))
    scale = (f32(1) / temperature.astype(f32)) * f32(LOG2E)
    s = np.maximum(logits.astype(f32) * scale[:, None], f32(-1e30))
    key = np.where(s <= f32(-1e30), -np.inf, s - np.log2(exponential))
    return key.argmax(-1)


@requires_triton
def test_triton_tokens_follow_the_documented_philox_stream(kernel_draws):
    logits, _, out = kernel_draws
    expected = reference_tokens(logits.cpu().numpy(), out.temperature.cpu().numpy(), 11,
                                np.arange(logits.shape[0]))
    np.testing.assert_array_equal(out.tokens.cpu().numpy(), expected)


def test_documented_stream_distribution_chi_square():
    """Many draws of the kernel's algorithm (through the bit-exact NumPy model)."""
    base = _two_temperature_rows(16)
    temperature = np.array([0.7, 1.3], dtype=np.float32)
    n = 20000
    for row in range(2):
        tokens = reference_tokens(np.repeat(base[row:row + 1].numpy(), n, 0),
                                  np.full(n, temperature[row]), 1234, np.arange(n) + 10**10)
        probs = torch.softmax(base[row].double() / float(temperature[row]), -1)
        _assert_chi_square(torch.from_numpy(tokens), probs)


# --------------------------------------------------------------------------- fields


def _field_logits(device: str, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(7, 300, generator=gen) * 3
    z[1, 150:] = float("-inf")                 # half the vocabulary masked
    z[2] = -20.0
    z[2, 17] = 15.0                            # near-deterministic: H ≈ 1e-13
    z[3] = 0.0                                 # uniform
    z[4, :3] = 1e4                             # huge magnitudes
    return z.to(device=device, dtype=dtype)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant,stats", [("paper", "stats"), ("released", "stats"),
                                           ("paper", None)])
def test_fields_equal_the_single_purpose_ops(impl, device, dtype, variant, stats):
    logits = _field_logits(device, dtype)
    stats = _stats() if stats else None
    out = adaptive_temperature_sample(logits, stats, base_temperature=0.9, tau=0.4,
                                      variant=variant, seed=5, impl=impl)
    assert isinstance(out, SampleOutput)
    assert out.tokens.dtype == torch.int64 and out.tokens.shape == (7,)
    for field in (out.temperature, out.logprobs, out.entropy):
        assert field.dtype == torch.float32 and field.shape == (7,)
    entropy = hapo_ops.token_entropy(logits, impl=impl)
    compiled = device == "cuda"  # compiled code: fast log/division, possible FMA contraction
    if compiled:
        torch.testing.assert_close(out.entropy, entropy, rtol=2e-6, atol=0)
    else:
        assert torch.equal(out.entropy, entropy)  # the same accumulation, bit for bit
    temperature = hapo_ops.adaptive_temperature(entropy, stats, base_temperature=0.9, tau=0.4,
                                                variant=variant)
    torch.testing.assert_close(out.temperature, temperature, rtol=1e-6,
                               atol=1e-6 if compiled else 0)
    logprobs = hapo_ops.token_logprobs(logits, out.tokens, temperature=out.temperature,
                                       impl=impl)
    torch.testing.assert_close(out.logprobs, logprobs, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(out.logprobs).all() and (out.logprobs <= 0).all()
    assert (out.tokens[1] < 150) and out.tokens[2] == 17 and out.tokens[4] < 3


# --------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_seed_reproducible_and_seeds_differ(impl, device):
    logits = torch.zeros(16, 200, device=device)
    first = adaptive_temperature_sample(logits, None, seed=42, impl=impl).tokens
    again = adaptive_temperature_sample(logits, None, seed=42, impl=impl).tokens
    other = adaptive_temperature_sample(logits, None, seed=43, impl=impl).tokens
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len(first.unique()) > 8  # rows draw independently


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_generator_and_default_generator(impl, device):
    logits = torch.zeros(8, 100, device=device)
    a = adaptive_temperature_sample(logits, None, generator=torch.Generator().manual_seed(1),
                                    impl=impl).tokens
    b = adaptive_temperature_sample(logits, None, generator=torch.Generator().manual_seed(1),
                                    impl=impl).tokens
    assert torch.equal(a, b)
    torch.manual_seed(9)
    c = adaptive_temperature_sample(logits, None, impl=impl).tokens
    torch.manual_seed(9)
    d = adaptive_temperature_sample(logits, None, impl=impl).tokens
    assert torch.equal(c, d)


@requires_triton
@pytest.mark.parametrize("impl,device", TRITON)
def test_triton_draw_independent_of_batching(impl, device):
    gen = torch.Generator().manual_seed(0)
    rows = (torch.randn(3, 64, generator=gen) * 0.3).to(device)
    together = adaptive_temperature_sample(rows, _stats(), seed=5, impl=impl)
    row_ids = torch.tensor([1], device=device)
    alone = adaptive_temperature_sample(rows[1:2], _stats(), seed=5, row_ids=row_ids, impl=impl)
    assert together.tokens[1] == alone.tokens[0]
    # Moving a row in the batch while keeping its id keeps its token.
    order = torch.tensor([2, 0, 1], device=device)
    shuffled = adaptive_temperature_sample(rows[order], _stats(), seed=5, row_ids=order,
                                           impl=impl)
    assert torch.equal(shuffled.tokens, together.tokens[order])


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_minus_inf_entries_are_never_drawn(impl, device):
    n = 400 if impl == "torch" else 96
    logits = torch.full((n, 64), float("-inf"))
    logits[:, 5] = 0.0
    logits[:, 40] = -3.0
    logits[::2, 63] = 2.0
    logits[1] = float("-inf")                     # no distribution at all
    out = adaptive_temperature_sample(logits.to(device), None, seed=3, impl=impl)
    tokens = out.tokens.cpu()
    allowed = torch.isfinite(logits.gather(1, tokens[:, None]))[:, 0]
    allowed[1] = True
    assert allowed.all()
    assert tokens[1] == 0
    assert torch.isnan(out.temperature[1]) and torch.isnan(out.logprobs[1])
    assert torch.isnan(out.entropy[1])
    assert torch.isfinite(out.logprobs[2:]).all()
    assert set(tokens[2:].tolist()) == {5, 40, 63}


# --------------------------------------------------------------------------- top-k / top-p


def test_top_k_top_p_torch_path():
    logits = torch.linspace(2.0, -2.0, 20).repeat(3000, 1)
    out = adaptive_temperature_sample(logits, None, seed=1, top_k=4)  # auto → torch
    assert out.tokens.max() < 4
    probs = torch.softmax(logits[0, :4].double(), -1)
    _assert_chi_square(out.tokens, probs)
    torch.testing.assert_close(out.logprobs, probs.log().float()[out.tokens])

    base = torch.softmax(logits[0].double() / 1.0, -1)
    keep = int((base.cumsum(0) - base < 0.5).sum())  # smallest prefix of mass ≥ 0.5
    out = adaptive_temperature_sample(logits, None, seed=2, top_p=0.5, impl="torch")
    assert out.tokens.max() < keep
    renorm = base[:keep] / base[:keep].sum()
    torch.testing.assert_close(out.logprobs, renorm.log().float()[out.tokens])


def test_filter_keeps_top_token_and_ties():
    from hapo_ops.vocab.sampling import filter_top_k_top_p
    scaled = torch.tensor([[5.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    top_k = filter_top_k_top_p(scaled, 2, None)
    assert torch.isfinite(top_k).sum(-1).tolist() == [3, 4]  # ties with the k-th stay
    top_p = filter_top_k_top_p(scaled, None, 1e-3)
    # The top token stays; ties at the top-p threshold stay too (the uniform row keeps all).
    assert torch.isfinite(top_p).sum(-1).tolist() == [1, 4]


@requires_triton
def test_kernel_refuses_top_k_top_p():
    logits = torch.zeros(2, 10, device=TRITON[0].values[1])
    with pytest.raises(ValueError, match="top_k and top_p"):
        adaptive_temperature_sample(logits, None, seed=0, top_k=3, impl="triton")
    with pytest.raises(ValueError, match="top_k and top_p"):
        adaptive_temperature_sample(logits, None, seed=0, top_p=0.9, impl="triton")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(logits=torch.zeros(10)), ValueError, "logits"),
    (dict(logits=torch.zeros(2, 3, 4)), ValueError, "logits"),
    (dict(logits=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "logits"),
    (dict(logits=torch.zeros(4, 0)), ValueError, "logits"),  # no vocabulary
    (dict(logits=[[0.0, 1.0]]), TypeError, "logits"),
    (dict(stats=(1.0, 2.0)), TypeError, "stats"),
    (dict(base_temperature=0.0), ValueError, "base_temperature"),
    (dict(base_temperature=float("nan")), ValueError, "base_temperature"),
    (dict(tau=1.0), ValueError, "tau"),
    (dict(tau=-1.0), ValueError, "tau"),
    (dict(tau=-(1.0 - 1e-9)), ValueError, "tau"),  # rounds to -1 in float32: T = 0
    (dict(variant="other"), ValueError, "variant"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**63), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "seed or generator"),
    (dict(generator=3), TypeError, "generator"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=2.0), TypeError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(row_ids=torch.arange(3)), ValueError, "row_ids"),
    (dict(row_ids=torch.zeros(2)), TypeError, "row_ids"),
    (dict(impl="cuda"), ValueError, "impl"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(logits=torch.zeros(2, 4), stats=None)
    args.update(kwargs)
    logits, stats = args.pop("logits"), args.pop("stats")
    with pytest.raises(error, match=match):
        adaptive_temperature_sample(logits, stats, **args)


@pytest.mark.skipif(HAS_CUDA or (HAS_TRITON and INTERPRETING),
                    reason="needs a machine with no GPU and no Triton interpreter (here "
                           "impl='triton' runs, on a GPU or in the interpreter)")
def test_triton_on_cpu_without_interpreter_is_refused():
    with pytest.raises(ValueError, match="impl='triton'"):
        adaptive_temperature_sample(torch.zeros(2, 4), None, seed=0, impl="triton")
