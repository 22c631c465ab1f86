"""Timing, memory measurement, result records and environment metadata for the benchmarks.

Timing
  CUDA: one untimed first call (its wall time is kept as ``first_call_s``: it includes
  compilation / autotuning), further warm-up calls, then per-repetition CUDA events around
  each call (like ``triton.testing.do_bench``, without the L2 flush: every tensor here is far
  larger than L2). The number of repetitions adapts to a time target; the median is reported.
  CPU: ``time.perf_counter`` around each call, median of 2-3 calls, the first included
  (the torch paths compile nothing; this keeps a full CPU run within a few minutes).

Memory ("extra peak MB")
  CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` before the call, i.e. the
  extra memory the call needs on top of its inputs (outputs and gradients included).
  CPU: peak resident set size sampled every millisecond from /proc/self/statm during one
  call, minus the RSS just before it. Sampling can miss short spikes and the allocator may
  reuse pages freed earlier, so it is a lower bound; it is labelled as such.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated() minus allocated before the call"
CPU_MEMORY_METHOD = "peak RSS sampled every 1 ms minus RSS before the call (lower bound)"


def log(message: str) -> None:
    """A progress line on stderr (stdout carries only the final tables)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- records


@dataclasses.dataclass
class Result:
    """One row of a results table (JSON-serialisable through ``dataclasses.asdict``)."""

    suite: str                      # "logprob" | "trainer" | "copy"
    name: str                       # implementation (logprob) or op (trainer)
    mode: str                       # "forward", "forward+backward", ...
    dtype: str
    shape: list[int]                # logprob: [N, V]; trainer: [B, L]
    status: str = "ok"              # ok | oom | error | skipped | reference
    median_ms: float | None = None
    min_ms: float | None = None
    reps: int = 0
    first_call_s: float | None = None
    bytes_moved: int | None = None  # minimum-traffic model, for GB/s
    gbps: float | None = None
    pct_copy_bw: float | None = None
    extra_peak_mb: float | None = None
    note: str = ""

    def set_bandwidth(self, nbytes: int, copy_gbps: float | None) -> None:
        self.bytes_moved = nbytes
        if self.median_ms:
            self.gbps = nbytes / (self.median_ms * 1e-3) / 1e9
            if copy_gbps:
                self.pct_copy_bw = 100.0 * self.gbps / copy_gbps


@dataclasses.dataclass
class Timing:
    median_ms: float
    min_ms: float
    reps: int
    first_call_s: float


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    warmup: int = 2          # calls before timing, the first one included
    min_reps: int = 3
    max_reps: int = 50
    target_s: float = 0.4    # aim for about this much timed work per case (CUDA)

    @staticmethod
    def for_device(device: torch.device, quick: bool) -> TimingConfig:
        if device.type == "cuda":
            return TimingConfig(warmup=3, min_reps=5, max_reps=100,
                                target_s=0.15 if quick else 0.4)
        # CPU: the memory-sampled first call is one of the timed calls; slow ops get 2 calls.
        return TimingConfig(warmup=0, min_reps=2, max_reps=3, target_s=10.0)


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, config: TimingConfig) -> Timing:
    """Median time of ``fn()`` in milliseconds (see the module docstring for the method)."""
    first_call_s = math.nan
    for i in range(config.warmup):
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i == 0:
            first_call_s = time.perf_counter() - start
    if device.type == "cuda":
        times = _cuda_times(fn, device, config)
    else:
        times = _cpu_times(fn, config.min_reps)
    return Timing(median_ms=statistics.median(times), min_ms=min(times), reps=len(times),
                  first_call_s=first_call_s)


def _reps(config: TimingConfig, estimate_ms: float) -> int:
    wanted = math.ceil(config.target_s * 1e3 / max(estimate_ms, 1e-3))
    return max(config.min_reps, min(config.max_reps, wanted))


def _cuda_times(fn: Callable[[], Any], device: torch.device, config: TimingConfig) -> list[float]:
    estimate_ms = _cuda_event_times(fn, 1)[0]
    return _cuda_event_times(fn, _reps(config, estimate_ms))


def _cuda_event_times(fn: Callable[[], Any], reps: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]


def _cpu_times(fn: Callable[[], Any], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


# --------------------------------------------------------------------------- memory


def memory_method(device: torch.device) -> str:
    return CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD


def extra_peak_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Extra peak memory of one call of ``fn`` in MiB (method: ``memory_method``)."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    sampler = RssSampler()
    if not sampler.available:
        fn()
        return None
    with sampler:
        fn()
    return sampler.extra_bytes / 2**20


class RssSampler:
    """Samples this process's resident set size in a background thread."""

    _STATM = "/proc/self/statm"

    def __init__(self, interval_s: float = 1e-3) -> None:
        self.interval_s = interval_s
        self.available = os.path.exists(self._STATM)
        self._page = os.sysconf("SC_PAGE_SIZE") if self.available else 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.base = 0
        self.peak = 0

    def rss(self) -> int:
        with open(self._STATM, "rb") as f:
            return int(f.read().split()[1]) * self._page

    @property
    def extra_bytes(self) -> int:
        return max(0, self.peak - self.base)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        gc.collect()
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = max(self.peak, self.rss())
        self._stop.set()
        assert self._thread is not None
        self._thread.join()


def release_memory(device: torch.device) -> None:
    """Drop cached blocks so that the next case starts from a clean allocator.

    Never raises: after a device fault the next case reports the error instead.
    """
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001
            log(f"release_memory: {short_error(exc)}")


def total_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def short_error(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- measure a case


def _cpu_measure(result: Result, fn: Callable[[], Any], config: TimingConfig) -> Timing:
    """CPU: the first call is memory-sampled and timed; 1-2 more calls (no compilation here)."""
    start = time.perf_counter()
    result.extra_peak_mb = extra_peak_mb(fn, torch.device("cpu"))
    first_ms = (time.perf_counter() - start) * 1e3
    times = [first_ms] + _cpu_times(fn, _reps(config, first_ms) - 1)
    return Timing(median_ms=statistics.median(times), min_ms=min(times), reps=len(times),
                  first_call_s=first_ms / 1e3)


def measure(result: Result, fn: Callable[[], Any], device: torch.device,
            config: TimingConfig) -> Result:
    """Time ``fn`` and its extra peak memory into ``result``; OOM and errors become statuses.

    On CUDA the memory is read from one extra call after timing; on CPU it is sampled
    during the first call, which also counts as a timed call (slow device, no compilation).
    """
    timing: Timing | None
    try:
        if device.type == "cuda":
            timing = time_fn(fn, device, config)
            result.extra_peak_mb = extra_peak_mb(fn, device)
        else:
            timing = _cpu_measure(result, fn, config)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, the run goes on
        result.status = "oom" if is_oom(exc) else "error"
        result.note = short_error(exc)
        timing = None
    if timing is None:
        release_memory(device)  # after the except block: the traceback no longer pins tensors
        return result
    result.median_ms = timing.median_ms
    result.min_ms = timing.min_ms
    result.reps = timing.reps
    result.first_call_s = timing.first_call_s
    return result


# --------------------------------------------------------------------------- environment


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        module = sys.modules.get(name)
        return getattr(module, "__version__", None)


def git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    """Metadata stored with every results file."""
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_tag(device),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "numpy": package_version("numpy"),
        "hapo_ops": package_version("hapo-ops"),
        "liger_kernel": package_version("liger-kernel"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "memory_method": memory_method(device),
        "total_memory_gib": total_memory_bytes(device) / 2**30,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(gpu_name=props.name, sm_count=props.multi_processor_count,
                    cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
    return meta
