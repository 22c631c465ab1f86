"""Row-blocked CPU work spread over threads by whole blocks, each block's ops on one thread.

A PyTorch CPU op splits its elements over the ``torch.get_num_threads()`` OpenMP threads
and ends at a barrier where the threads wait for each other, spinning before they sleep.
The row-blocked paths of hapo-ops run some ten ops per block of about 1M logits, so a
(64, 151936) batch crossed about a hundred barriers per call. On a quiet machine that is
cheap; on shared cores (other processes runnable: the ordinary state of a CI machine, of a
rollout engine's host, of a trainer with data loaders) a thread at a barrier waits for one
that was descheduled, and spins meanwhile on a core the others need. On 2 cores with two
busy processes the blocked entropy took 4.3 s where a plain ``log_softmax`` entropy (four
large ops) took 0.75 s; with ``OMP_WAIT_POLICY=PASSIVE`` (no spinning) or one thread,
about 0.5 s.

``for_each_block`` hands whole blocks to threads instead: each thread runs a block's ops
with one intra-op thread and takes the next block when done (no barrier inside a call; one
join at its end; a descheduled thread delays its own block only). ``block_threads`` sizes
the crew to the work (starting a thread costs about 0.1 ms) and ``block_rows`` cuts a
small batch into at least one block per thread. Results are those of single-threaded ops
on every path that goes through here: a row's reductions never split over threads, so
they are the same for any thread count and any batch layout.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

Block = TypeVar("Block")
_END = object()

# Logits per thread below which another thread is not worth starting (~0.1 ms to start one,
# against ~0.6 ms of single-threaded block work on 2^17 logits).
MIN_LOGITS_PER_THREAD = 1 << 17


def one_thread_per_block(device: torch.device) -> bool:
    """Whether ``for_each_block`` runs blocks with one intra-op thread on ``device``: a CPU
    with an OpenMP build of PyTorch, where the intra-op thread count is each thread's own
    (``torch.set_num_threads`` elsewhere resizes one shared pool), outside a
    ``torch.compile`` trace (which records the ops of the blocks in order instead)."""
    return (device.type == "cpu" and not torch.compiler.is_compiling()
            and torch.backends.openmp.is_available())


def block_threads(logits: int, device: torch.device) -> int:
    """Threads ``for_each_block`` spreads the blocks of ``logits`` logits in all over: up to
    ``torch.get_num_threads()``, at least ``MIN_LOGITS_PER_THREAD`` logits each; 1 off the
    CPU path (``one_thread_per_block``)."""
    if not one_thread_per_block(device):
        return 1
    return max(1, min(torch.get_num_threads(), logits // MIN_LOGITS_PER_THREAD))


def block_rows(n_rows: int, chunk_tokens: int, threads: int) -> int:
    """Rows per block when ``threads`` threads each hold one block at a time: the
    ``chunk_tokens`` rows of one block shared among them (the same rows in flight, so the
    same memory, and each thread's block stays in its cache), and no more than one block
    per thread for a small batch."""
    return max(1, min(math.ceil(chunk_tokens / threads), math.ceil(n_rows / threads)))


def _no_graph(inference: bool) -> contextlib.AbstractContextManager:
    """What every thread runs blocks under: no autograd graph, and inference mode where
    the caller is in it (so that its inference tensors may be written)."""
    return torch.inference_mode() if inference else torch.no_grad()


@contextlib.contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """The calling thread's intra-op thread count set to 1, then restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def for_each_block(work: Callable[[Block], None], blocks: Iterable[Block],
                   device: torch.device, threads: int = 1) -> None:
    """Call ``work(block)`` for every item of ``blocks``; each call writes its results into
    its own part of tensors allocated beforehand and returns nothing.

    On a CPU (``one_thread_per_block``) every block runs with one intra-op thread (the
    calling thread's count is restored on return), on the calling thread and, with
    ``threads`` > 1 (``block_threads``), on ``threads - 1`` helper threads started for this
    call and joined before it returns, each taking the next block when done (PyTorch
    releases the GIL inside ops). ``blocks`` is advanced under a lock, in order, so that
    work done by the iterable itself (a random draw) keeps its order. Blocks run without
    an autograd graph (in inference mode where the caller is); other thread-local
    settings, such as autocast, do not reach the helper threads, so the blocks' ops must
    not depend on them. The first exception of any thread is raised once every thread has
    stopped. Elsewhere (ops are asynchronous on accelerators) the blocks run in order on
    the calling thread, as they are.
    """
    if not one_thread_per_block(device):
        for block in blocks:
            work(block)
        return
    inference = torch.is_inference_mode_enabled()
    with _one_intra_op_thread(), _no_graph(inference):
        if threads <= 1:
            for block in blocks:
                work(block)
            return
        pending = iter(blocks)
        first = next(pending, _END)
        if first is _END:
            return
        second = next(pending, _END)
        if second is _END:
            work(first)
            return
        _run_threads(work, itertools.chain((first, second), pending), threads, inference)


def _run_threads(work: Callable[[Block], None], pending: Iterator[Block], threads: int,
                 inference: bool) -> None:
    lock = threading.Lock()
    errors: list[BaseException] = []

    def take() -> object:
        with lock:
            if errors:
                return _END
            try:
                return next(pending, _END)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the calling thread
                errors.append(exc)
                return _END

    def drain() -> None:
        while (block := take()) is not _END:
            try:
                work(block)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the calling thread
                with lock:
                    errors.append(exc)
                return

    def helper() -> None:
        torch.set_num_threads(1)  # this new thread's own count; it ends with the call
        with _no_graph(inference):
            drain()

    helpers = [threading.Thread(target=helper, name=f"hapo_ops-block-{i}", daemon=True)
               for i in range(threads - 1)]
    for thread in helpers:
        thread.start()
    try:
        drain()
    except BaseException as exc:  # noqa: BLE001 - e.g. KeyboardInterrupt: stop the helpers
        with lock:
            errors.append(exc)
    finally:
        for thread in helpers:
            thread.join()
    if errors:
        raise errors[0]


__all__ = ["MIN_LOGITS_PER_THREAD", "block_rows", "block_threads", "for_each_block",
           "one_thread_per_block"]
