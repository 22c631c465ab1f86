"""Gloo process groups for the distributed tests, started once per world size and reused.

``run_ranks(fn, world, *args)`` runs ``fn(rank, world, *args)`` on every rank of a pool of
``world`` spawned CPU processes that joined one gloo group when the pool started (which
costs seconds: starting one per test would dominate the suite), and returns the ranks'
results in rank order. ``fn`` must be a module-level function (it is pickled by reference)
and must leave no collective half done. A failure or a hang fails the test and replaces the
pool, so one broken test cannot break the next.
"""

from __future__ import annotations

import atexit
import os
import queue
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 180


def _serve(rank: int, world: int, init_file: str, tasks, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(rank, world, *args)))
        except BaseException:  # noqa: BLE001 - every failure goes to the parent
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """``world`` processes in one gloo group, each serving tasks from its own queue."""

    def __init__(self, world: int) -> None:
        context = mp.get_context("spawn")
        self.world = world
        self.directory = tempfile.TemporaryDirectory()
        init_file = os.path.join(self.directory.name, "init")
        self.tasks = [context.Queue() for _ in range(world)]
        self.results = context.Queue()
        self.processes = [context.Process(target=_serve, daemon=True,
                                          args=(r, world, init_file, self.tasks[r],
                                                self.results)) for r in range(world)]
        for process in self.processes:
            process.start()

    def run(self, fn, args: tuple) -> tuple[list, list[str]]:
        """(results in rank order, error texts); a rank that does not answer in time counts
        as an error."""
        for tasks in self.tasks:
            tasks.put((fn, args))
        answers: dict[int, object] = {}
        errors: list[str] = []
        while len(answers) + len(errors) < self.world:
            try:
                rank, ok, payload = self.results.get(timeout=TIMEOUT_S)
            except queue.Empty:
                errors.append(f"a rank did not answer within {TIMEOUT_S} s")
                break
            if ok:
                answers[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
        return [answers.get(r) for r in range(self.world)], errors

    def close(self, *, force: bool = False) -> None:
        for process, tasks in zip(self.processes, self.tasks):
            if not force and process.is_alive():
                tasks.put(None)
        for process in self.processes:
            process.join(None if not force else 1)
            if process.is_alive():
                process.kill()
                process.join()
        self.directory.cleanup()


_POOLS: dict[int, RankPool] = {}


def _close_all() -> None:
    for pool in _POOLS.values():
        pool.close(force=True)
    _POOLS.clear()


atexit.register(_close_all)


def run_ranks(fn, world: int, *args) -> list:
    """``fn(rank, world, *args)`` on each rank of the ``world``-process gloo pool."""
    pool = _POOLS.get(world)
    if pool is None:
        pool = _POOLS[world] = RankPool(world)
    results, errors = pool.run(fn, args)
    if errors:
        pool.close(force=True)
        del _POOLS[world]
        pytest.fail("\n".join(errors))
    return results
