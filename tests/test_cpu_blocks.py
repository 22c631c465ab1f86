"""The CPU block runner of the torch paths (``hapo_ops._utils.blocks``): whole blocks spread
over threads, each block's ops on one intra-op thread, so that a loaded machine does not
stall the many small ops of a row-blocked path at OpenMP barriers. Checked here: every
block runs once, the iterable is advanced in order, the caller's thread count comes back
(also after an error), errors reach the caller, inference tensors can be written, and the
ops give the same results for any thread count."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

import hapo_ops
from hapo_ops._utils.blocks import (MIN_LOGITS_PER_THREAD, block_rows, block_threads,
                                    for_each_block, one_thread_per_block)

CPU = torch.device("cpu")
needs_openmp = pytest.mark.skipif(not one_thread_per_block(CPU),
                                  reason="one intra-op thread per block needs OpenMP")


@contextlib.contextmanager
def intra_op_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def test_crew_and_block_sizes():
    with intra_op_threads(4):
        if one_thread_per_block(CPU):
            assert block_threads(10 * MIN_LOGITS_PER_THREAD, CPU) == 4
            assert block_threads(2 * MIN_LOGITS_PER_THREAD, CPU) == 2
        assert block_threads(MIN_LOGITS_PER_THREAD - 1, CPU) == 1
    assert block_threads(10**9, torch.device("meta")) == 1
    assert block_rows(64, 6, 2) == 3      # the rows of one block shared by the threads
    assert block_rows(64, 6, 1) == 6
    assert block_rows(5, 12, 2) == 3      # one block per thread
    assert block_rows(1, 6, 4) == 1


@needs_openmp
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_block_once_iterable_in_order_one_intra_op_thread(threads):
    taken, seen = [], {}
    lock = threading.Lock()

    def blocks():
        for i in range(9):
            taken.append(i)  # advanced under the runner's lock
            yield i

    def work(i):
        with lock:
            seen[i] = (torch.get_num_threads(), torch.is_grad_enabled())

    with intra_op_threads(2):
        for_each_block(work, blocks(), CPU, threads)
        assert torch.get_num_threads() == 2
    assert taken == list(range(9))
    assert sorted(seen) == list(range(9))
    assert set(seen.values()) == {(1, False)}


@needs_openmp
@pytest.mark.parametrize("where", ["work", "iterable"])
def test_an_error_reaches_the_caller_and_the_thread_count_comes_back(where):
    def blocks():
        for i in range(8):
            if where == "iterable" and i == 5:
                raise ValueError("block 5")
            yield i

    def work(i):
        if where == "work" and i == 3:
            raise ValueError("block 3")

    with intra_op_threads(2):
        with pytest.raises(ValueError, match="block"):
            for_each_block(work, blocks(), CPU, 2)
        assert torch.get_num_threads() == 2


@needs_openmp
def test_inference_tensors_are_written_under_inference_mode():
    """vLLM runs its logits processors under inference mode: the blocks write the caller's
    inference tensors from every thread."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4 * MIN_LOGITS_PER_THREAD // 12, generator=g) * 3
    with intra_op_threads(2):
        expected = hapo_ops.token_entropy(logits, impl="torch", chunk_tokens=2)
        with torch.inference_mode():
            got = hapo_ops.token_entropy(logits.clone(), impl="torch", chunk_tokens=2)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_the_thread_count(dtype):
    """Log-prob, entropy, gradient (also in place and on a slice that is not a view), top-p,
    and the sampler: bitwise the same on 1, 2 and 3 intra-op threads."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 7, 20000, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 20000, (2, 7), generator=g)

    def run():
        out = []
        for sliced, inplace, top_p in ((False, False, None), (True, True, None),
                                       (False, False, 0.9)):
            leaf = logits.float().requires_grad_()
            x = leaf * 1.0 if inplace else leaf
            x = x[:, :-1] if sliced else x
            y = labels[:, :-1] if sliced else labels
            logp, entropy = hapo_ops.logprobs_and_entropy(x, y, impl="torch", chunk_tokens=3,
                                                          inplace_backward=inplace,
                                                          top_p=top_p)
            (logp.sum() + entropy.sum()).backward()
            out += [logp.detach(), entropy.detach(), leaf.grad]
        out += list(hapo_ops.adaptive_temperature_sample(logits[0], None, seed=4, top_k=50,
                                                         impl="torch"))
        return out

    results = []
    for n in (1, 2, 3):
        with intra_op_threads(n):
            results.append(run())
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
