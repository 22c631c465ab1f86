"""Batch invariance: a row's log-prob and entropy are bitwise the same whether it is computed
alone or inside a batch. On a GPU: a batch of 16384 rows at the target vocabulary (151936,
bf16) with the shipped kernel configurations (``HAPO_OPS_KERNEL_CONFIG`` unset); on CPU
(torch path and the Triton interpreter) at small sizes.

Covers the logits op (``logprobs_and_entropy``), the fused linear head
(``linear_logprobs_and_entropy``) and the sampler (``adaptive_temperature_sample``: token,
temperature, behaviour log-prob and entropy, each row keyed by its ``row_ids``). A trainer
that recomputes old log-probs in another batch layout than the rollout's relies on it:
otherwise importance ratios differ from 1 by rounding alone.
"""

from __future__ import annotations

import math

import pytest
import torch

import hapo_ops
from conftest import IMPL_DEVICES, requires_cuda

N_ROWS = 16384
VOCAB = 151936
HIDDEN = 1024
ROWS = (0, 1, 127, 128, 4097, N_ROWS - 1)   # tile and block boundaries included

gpu = [requires_cuda, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _shipped_configs(monkeypatch):
    monkeypatch.delenv("HAPO_OPS_KERNEL_CONFIG", raising=False)


def _assert_bitwise(name: str, batch: torch.Tensor, alone: torch.Tensor, row: int) -> None:
    same = torch.equal(batch, alone) or (batch.isnan().all() and alone.isnan().all())
    assert same, f"{name}, row {row}: batch {batch.tolist()} != alone {alone.tolist()}"


def _logits(generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(N_ROWS, VOCAB, device="cuda", generator=generator) * 2).to(
        torch.bfloat16)


@requires_cuda
@pytest.mark.slow
def test_logits_op_row_alone_equals_row_in_batch():
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = _logits(g)
    labels = torch.randint(0, VOCAB, (N_ROWS,), device="cuda", generator=g)
    with torch.no_grad():
        logp, entropy = hapo_ops.logprobs_and_entropy(logits, labels, impl="triton")
        for row in ROWS:
            logp_1, entropy_1 = hapo_ops.logprobs_and_entropy(
                logits[row:row + 1].clone(), labels[row:row + 1], impl="triton")
            _assert_bitwise("logp", logp[row:row + 1], logp_1, row)
            _assert_bitwise("entropy", entropy[row:row + 1], entropy_1, row)


@requires_cuda
@pytest.mark.slow
def test_fused_linear_head_row_alone_equals_row_in_batch():
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(N_ROWS, HIDDEN, device="cuda", generator=g).to(torch.bfloat16)
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=g)
              * (2 / math.sqrt(HIDDEN))).to(torch.bfloat16)
    labels = torch.randint(0, VOCAB, (N_ROWS,), device="cuda", generator=g)
    with torch.no_grad():
        logp, entropy = hapo_ops.linear_logprobs_and_entropy(hidden, weight, labels,
                                                             impl="triton")
        for row in ROWS:
            logp_1, entropy_1 = hapo_ops.linear_logprobs_and_entropy(
                hidden[row:row + 1].clone(), weight, labels[row:row + 1], impl="triton")
            _assert_bitwise("logp", logp[row:row + 1], logp_1, row)
            _assert_bitwise("entropy", entropy[row:row + 1], entropy_1, row)


@requires_cuda
@pytest.mark.slow
def test_sampler_row_alone_equals_row_in_batch():
    g = torch.Generator(device="cuda").manual_seed(2)
    logits = _logits(g)
    stats = hapo_ops.EntropyStats(*(torch.tensor(v, device="cuda")
                                    for v in (math.log(1.0), math.log(4.0), math.log(1e-3))))
    with torch.no_grad():
        out = hapo_ops.adaptive_temperature_sample(logits, stats, seed=1234, impl="triton")
        for row in ROWS:
            alone = hapo_ops.adaptive_temperature_sample(
                logits[row:row + 1].clone(), stats, seed=1234, impl="triton",
                row_ids=torch.tensor([row], device="cuda"))
            for field in ("tokens", "temperature", "logprobs", "entropy"):
                _assert_bitwise(field, getattr(out, field)[row:row + 1],
                                getattr(alone, field), row)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_small_batches_on_every_path(impl, device):
    """The same property at test sizes, on every available path (rows of a 37-row batch)."""
    g = torch.Generator().manual_seed(3)
    n, vocab, dim = 37, 300, 16
    logits = (torch.randn(n, vocab, generator=g) * 3).to(device)
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)
    hidden = torch.randn(n, dim, generator=g).to(device)
    weight = torch.randn(vocab, dim, generator=g).to(device)
    stats = hapo_ops.EntropyStats(torch.tensor(-1.0), torch.tensor(1.5), torch.tensor(-6.0))
    with torch.no_grad():
        batch = hapo_ops.logprobs_and_entropy(logits, labels, impl=impl)
        head = hapo_ops.linear_logprobs_and_entropy(hidden, weight, labels, impl=impl)
        sample = hapo_ops.adaptive_temperature_sample(logits, stats, seed=5, impl=impl)
        for row in (0, 16, n - 1):
            one = slice(row, row + 1)
            alone = hapo_ops.logprobs_and_entropy(logits[one].clone(), labels[one], impl=impl)
            head_alone = hapo_ops.linear_logprobs_and_entropy(hidden[one].clone(), weight,
                                                              labels[one], impl=impl)
            checks = [("logp", batch[0][one], alone[0]), ("entropy", batch[1][one], alone[1])]
            if impl == "triton":
                # The torch path's head goes through torch's matmul, whose CPU BLAS kernels
                # differ between one row and many (gemv against gemm): not batch-invariant.
                checks += [("head logp", head[0][one], head_alone[0]),
                           ("head entropy", head[1][one], head_alone[1])]
            for name, got, want in checks:
                _assert_bitwise(name, got, want, row)
            if impl == "triton":  # the kernel's random stream is keyed by the row id
                sample_alone = hapo_ops.adaptive_temperature_sample(
                    logits[one].clone(), stats, seed=5, impl=impl,
                    row_ids=torch.tensor([row], device=device))
                for field in ("tokens", "temperature", "logprobs", "entropy"):
                    _assert_bitwise(field, getattr(sample, field)[one],
                                    getattr(sample_alone, field), row)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_on_cpu_rows_alone_equal_rows_in_batch_at_full_vocabulary(dtype):
    """The CPU torch path at V = 151936 on 2 intra-op threads: a row alone, a row in a batch
    (inside a block or alone in the last one) and any thread count give bitwise the same
    log-prob and entropy (a row's reductions are never split over threads)."""
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(13, VOCAB, generator=g) * 3).to(dtype)
    labels = torch.randint(0, VOCAB, (13,), generator=g)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            batch = hapo_ops.logprobs_and_entropy(logits, labels, impl="torch")
            for row in (0, 5, 12):
                one = slice(row, row + 1)
                alone = hapo_ops.logprobs_and_entropy(logits[one].clone(), labels[one],
                                                      impl="torch")
                _assert_bitwise("logp", batch[0][one], alone[0], row)
                _assert_bitwise("entropy", batch[1][one], alone[1], row)
            torch.set_num_threads(1)
            single = hapo_ops.logprobs_and_entropy(logits, labels, impl="torch")
        assert torch.equal(single[0], batch[0]) and torch.equal(single[1], batch[1])
    finally:
        torch.set_num_threads(previous)
