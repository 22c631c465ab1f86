"""CPU timings under contention: the row-blocked torch paths beside plain torch while every
core also runs a busy loop that the benchmark starts and stops itself.

Cases (CPU only)
  entropy   hapo-torch  ``token_entropy(logits, impl="torch")``
            torch-eager ``-(p · log p).sum(-1)`` from one ``log_softmax``
            on (64, 151936) float32 logits
  sampler   hapo-torch  ``adaptive_temperature_sample(..., impl="torch")``
            torch-eager the sequence of ``benchmarks.sampler.eager_sample``
            on (64, 151936) bfloat16 logits

Each case runs twice: with no added load (whatever else runs on the machine stays: the
load average is recorded), then with one busy-loop process per core (``busy_loops``: plain
``python -c`` loops that also end by themselves after ``BUSY_LIMIT_S``, so that none
outlives a benchmark that dies). A CPU op splits its work over the intra-op threads and
waits at a barrier after each op; on shared cores that wait is where a path of many small
ops loses time (``hapo_ops._utils.blocks``).

Timing: after one untimed call of each, the two implementations alternate, one call each
per round, so that both see the same background load; the median of the rounds is
reported with their minimum and maximum. "vs torch-eager" compares the two at the same
load; "vs no added load" compares each with itself without the busy loops.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch

from benchmarks.common import Result, TimingConfig, log, release_memory, short_error
from benchmarks.report import CONTENTION_QUIET as QUIET

VOCAB = 151936
BASELINE = "torch-eager"
BUSY_LIMIT_S = 300.0      # a busy loop ends by itself after this long
NOTES = {
    ("entropy", "hapo-torch"): "token_entropy(impl='torch'): blocks of rows, each block's ops "
                               "on one thread, blocks spread over the threads",
    ("entropy", "torch-eager"): "-(exp(log_softmax(z)) · log_softmax(z)).sum(-1)",
    ("sampler", "hapo-torch"): "adaptive_temperature_sample(impl='torch'): entropy, race, "
                               "log-prob in row blocks",
    ("sampler", "torch-eager"): "log_softmax entropy, softmax(z/T), multinomial",
}


def core_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loaded_mode(n_busy: int) -> str:
    return f"{n_busy} busy loop{'s' if n_busy != 1 else ''}"


@contextlib.contextmanager
def busy_loops(count: int, limit_s: float = BUSY_LIMIT_S) -> Iterator[list[subprocess.Popen]]:
    """``count`` busy-loop processes for the duration of the block, killed on exit (and
    each ending by itself after ``limit_s`` seconds whatever happens to this process)."""
    code = (f"import time\nend = time.monotonic() + {float(limit_s)!r}\n"
            "while time.monotonic() < end:\n    pass\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(count)]
    try:
        time.sleep(0.5)  # interpreter start-up
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def entropy_fns() -> dict[str, Callable[[torch.Tensor], object]]:
    import hapo_ops

    def eager(logits: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits.float(), dim=-1)
        return -(log_p.exp() * log_p).sum(-1)

    return {"hapo-torch": lambda logits: hapo_ops.token_entropy(logits, impl="torch"),
            BASELINE: eager}


def sampler_fns() -> dict[str, Callable[[torch.Tensor], object]]:
    from benchmarks.sampler import _stats, eager_sample, hapo_sample

    stats = _stats(torch.device("cpu"))
    ours = hapo_sample("torch")
    return {"hapo-torch": lambda logits: ours(logits, stats),
            BASELINE: lambda logits: eager_sample(logits, stats)}


def plan(*, quick: bool, smoke: bool) -> tuple[list[tuple[str, int, int, torch.dtype]], int]:
    """([(op, rows, V, dtype)], rounds): 9 rounds, 5 with --quick."""
    if smoke:
        return [("entropy", 16, 3000, torch.float32), ("sampler", 16, 3000, torch.bfloat16)], 2
    return [("entropy", 64, VOCAB, torch.float32), ("sampler", 64, VOCAB, torch.bfloat16)], \
        5 if quick else 9


def paired_times(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Milliseconds of each function over ``rounds`` rounds, one call of each per round
    (after one untimed call of each)."""
    with torch.no_grad():
        for fn in fns.values():
            fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _rows(op: str, n_rows: int, vocab: int, dtype: torch.dtype, mode: str,
          names: list[str]) -> list[Result]:
    return [Result(suite="contention", name=name, mode=f"{op}, {mode}",
                   dtype=str(dtype).removeprefix("torch."), shape=[n_rows, vocab],
                   note=NOTES.get((op, name), ""),
                   baseline=None if name == BASELINE else BASELINE) for name in names]


def run_case(op: str, n_rows: int, vocab: int, dtype: torch.dtype, rounds: int,
             n_busy: int) -> list[Result]:
    """The rows of one case, without (first) and with ``n_busy`` busy loops."""
    fns = (entropy_fns if op == "entropy" else sampler_fns)()
    logits = (torch.randn(n_rows, vocab, generator=torch.Generator().manual_seed(0)) * 2
              ).to(dtype)
    calls = {name: (lambda fn=fn: fn(logits)) for name, fn in fns.items()}
    results = []
    for mode in (QUIET, loaded_mode(n_busy)):
        rows = _rows(op, n_rows, vocab, dtype, mode, list(fns))
        try:
            load_start = os.getloadavg()[0]
            with busy_loops(n_busy if mode != QUIET else 0):
                times = paired_times(calls, rounds)
            load_end = os.getloadavg()[0]
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            for row in rows:
                row.status, row.note = "error", short_error(exc)
        else:
            for row in rows:
                ms = times[row.name]
                row.median_ms, row.min_ms, row.max_ms = statistics.median(ms), min(ms), max(ms)
                row.reps = len(ms)
                row.note += (f"; load average {load_start:.1f} → {load_end:.1f} over the "
                             f"case")
        for row in rows:
            log(f"contention {op:<8} {row.name:<12} {mode:<14}: "
                + (f"{row.median_ms:.1f} ms" if row.median_ms else row.status))
        results += rows
    del logits
    release_memory(torch.device("cpu"))
    return results


def run(device: torch.device, config: TimingConfig, results: list[Result], *, quick: bool,
        smoke: bool, deadline: float = math.inf) -> None:
    """Append the rows of every case to ``results`` (CPU only; nothing on other devices)."""
    del config  # paired rounds, not the shared timing loop
    if device.type != "cpu":
        log("contention: CPU suite, skipped on this device")
        return
    cases, rounds = plan(quick=quick, smoke=smoke)
    n_busy = core_count()
    log(f"contention: {cases and [c[:3] for c in cases]}, {rounds} paired rounds, "
        f"{n_busy} busy loops, {torch.get_num_threads()} torch threads")
    for op, n_rows, vocab, dtype in cases:
        if time.monotonic() > deadline:
            for mode in (QUIET, loaded_mode(n_busy)):
                for row in _rows(op, n_rows, vocab, dtype, mode, ["hapo-torch", BASELINE]):
                    row.status, row.note = "skipped", "time budget spent"
                    results.append(row)
            continue
        results += run_case(op, n_rows, vocab, dtype, rounds, n_busy)
