"""Timing, memory measurement, result records and environment metadata for the benchmarks.

Timing
  Warm-up calls first, never timed: the first one's wall time is kept as ``first_call_s``
  (it includes compilation and autotuning, e.g. ``torch.compile``). Then per-repetition
  timing, the median reported with the minimum and maximum of the repetitions (their spread
  shows how much a busy machine moved the numbers): CUDA events around each call on CUDA (like
  ``triton.testing.do_bench``, without the L2 flush: every tensor here is far larger than
  L2; the number of repetitions adapts to a time target), ``time.perf_counter`` around each
  of 2-3 calls on CPU. A case may give a ``setup`` that runs before every call (warm-up and
  memory call included) outside the timed region: in-place rows refresh their logits with
  it, so that every repetition starts from fresh logits, not from the previous
  repetition's gradient.

Memory ("peak MB", ``MEMORY_DEFINITION``)
  One untimed call (after timing on CUDA; the first warm-up call on CPU): the most bytes allocated through torch's allocator during the
  call above those allocated just before it (the inputs), outputs and gradients included;
  the same definition on every device. CUDA: ``torch.cuda.max_memory_allocated()`` after
  ``reset_peak_memory_stats()``, minus ``memory_allocated()`` before the call. CPU: the
  running sum of torch.profiler's allocation events (``profile_memory=True``) during the
  call, its maximum (the CPU allocator reports every allocation made while the profiler
  runs, and the free of each of those). Memory allocated outside torch's allocator (BLAS
  scratch, Triton's launch state) is counted on neither device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

MEMORY_DEFINITION = ("peak MB: the most bytes allocated through torch's allocator during one "
                     "call above those allocated just before it (the inputs), outputs and "
                     "gradients included; measured the same way for every row")
CUDA_MEMORY_METHOD = ("torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), "
                      "minus memory_allocated() before the call")
CPU_MEMORY_METHOD = ("maximum running sum of the torch.profiler allocation events "
                     "(profile_memory=True) of the call")

Setup = Callable[[], Any] | None


def log(message: str) -> None:
    """A progress line on stderr (stdout carries only the final tables)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- records


@dataclasses.dataclass
class Result:
    """One row of a results table (JSON-serialisable through ``dataclasses.asdict``)."""

    suite: str                      # "logprob" | "trainer" | "linear" | "sampler" | "copy"
    name: str                       # implementation (logprob) or op (trainer)
    mode: str                       # "forward", "forward+backward", ...
    dtype: str
    shape: list[int]                # logprob: [N, V]; trainer: [B, L]
    status: str = "ok"              # ok | oom | error | skipped
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    reps: int = 0
    first_call_s: float | None = None
    bytes_moved: int | None = None  # minimum-traffic model, for GB/s
    gbps: float | None = None
    pct_copy_bw: float | None = None
    extra_peak_mb: float | None = None  # MEMORY_DEFINITION
    note: str = ""
    baseline: str | None = None     # the row (same suite, shape, dtype, mode) compared with

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
    max_ms: float
    reps: int
    first_call_s: float


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    warmup: int = 2          # untimed calls before timing (compilation, caches)
    min_reps: int = 3
    max_reps: int = 50
    target_s: float = 0.4    # aim for about this much timed work per case

    @staticmethod
    def for_device(device: torch.device, quick: bool) -> TimingConfig:
        if device.type == "cuda":
            return TimingConfig(warmup=3, min_reps=5, max_reps=100,
                                target_s=0.15 if quick else 0.4)
        # CPU: one untimed warm-up call, then 2 timed calls of a slow op, 3 of a fast one.
        return TimingConfig(warmup=1, min_reps=2, max_reps=3, target_s=10.0)


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, config: TimingConfig,
            setup: Setup = None, warmups_done: int = 0) -> Timing:
    """Median time of ``fn()`` in milliseconds (see the module docstring for the method);
    ``setup()`` runs before every call, outside the timed region. ``warmups_done``: untimed
    calls the caller already made."""
    first_call_s = math.nan
    for i in range(warmups_done, max(1, config.warmup)):
        if setup is not None:
            setup()
            synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i == 0:
            first_call_s = time.perf_counter() - start
    if device.type == "cuda":
        estimate_ms = _cuda_event_times(fn, 1, setup)[0]
        times = _cuda_event_times(fn, _reps(config, estimate_ms), setup)
    else:
        times = _cpu_times(fn, 1, setup)
        times += _cpu_times(fn, _reps(config, times[0]) - 1, setup)
    return Timing(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times),
                  reps=len(times), first_call_s=first_call_s)


def _reps(config: TimingConfig, estimate_ms: float) -> int:
    wanted = math.ceil(config.target_s * 1e3 / max(estimate_ms, 1e-3))
    return max(config.min_reps, min(config.max_reps, wanted))


def _cuda_event_times(fn: Callable[[], Any], reps: int, setup: Setup = None) -> list[float]:
    """Each start event is recorded after ``setup()``'s work was queued: only ``fn``'s
    work lies between the two events."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        if setup is not None:
            setup()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]


def _cpu_times(fn: Callable[[], Any], reps: int, setup: Setup = None) -> list[float]:
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


# --------------------------------------------------------------------------- memory


def memory_method(device: torch.device) -> str:
    return CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD


def extra_peak_mb(fn: Callable[[], Any], device: torch.device, setup: Setup = None
                  ) -> float | None:
    """Peak MiB allocated during one call of ``fn`` above what was allocated before it
    (``MEMORY_DEFINITION``); ``setup()`` runs first, outside the measure."""
    if setup is not None:
        setup()
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return cpu_peak_bytes(fn) / 2**20


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by torch's CPU allocator during ``fn()`` above those allocated
    before it: the maximum running sum of the profiler's allocation events. While memory
    profiling is on, the allocator reports each allocation and the free of each block it
    allocated then (blocks alive before the call never count)."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler_log(), profile(activities=[ProfilerActivity.CPU],
                                       profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and "cpu" in str(e.device_type()).lower()]
    events.sort(key=lambda e: e.start_ns())
    total = peak = 0
    for event in events:
        total += event.nbytes()
        peak = max(peak, total)
    return peak


# A line of Kineto's own log (the torch profiler's backend), e.g.
# "USDT:2026-12-03 08:32:33 10103:10103 SyncActivityProfilerHandler.cpp:59] profiler_stop".
_PROFILER_LOG_LINE = re.compile(r"^[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \w+\.cpp:\d+\] ")


@contextlib.contextmanager
def quiet_profiler_log() -> Iterator[None]:
    """Drop the lines Kineto writes to the process's stderr (file descriptor 2) at every
    profiler start and stop, while the block runs; every other line written to stderr in
    the meantime is passed on when the block ends. Kineto reads its log level once per
    process, so this is done per block rather than through ``KINETO_LOG_LEVEL``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            kept = [line for line in text.splitlines(keepends=True)
                    if not _PROFILER_LOG_LINE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


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


def measure(result: Result, fn: Callable[[], Any], device: torch.device,
            config: TimingConfig, setup: Setup = None) -> Result:
    """Time ``fn`` and its peak memory into ``result``; OOM and errors become statuses.

    Warm-up (compilation included) is never timed, and ``setup()`` runs before every call
    outside the timed region. The memory comes from one more call after timing on CUDA;
    on CPU (slow, and nothing compiled in the default run) from the first warm-up call.
    """
    timing: Timing | None
    try:
        if device.type == "cpu" and config.warmup == 1:
            start = time.perf_counter()
            result.extra_peak_mb = extra_peak_mb(fn, device, setup)
            first_call_s = time.perf_counter() - start
            timing = time_fn(fn, device, config, setup, warmups_done=1)
            timing.first_call_s = first_call_s
        else:
            timing = time_fn(fn, device, config, setup)
            result.extra_peak_mb = extra_peak_mb(fn, device, setup)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, the run goes on
        result.status = "oom" if is_oom(exc) else "error"
        result.note = short_error(exc)
        timing = None
    if timing is None:
        release_memory(device)  # after the except block: the traceback no longer pins tensors
        return result
    result.median_ms = timing.median_ms
    result.min_ms = timing.min_ms
    result.max_ms = timing.max_ms
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


def kernel_configs() -> dict[str, Any]:
    """The launch configurations (block x warps x stages) of the logits kernels at
    V = 151936 per pass and dtype, and the ``HAPO_OPS_KERNEL_CONFIG`` override if one is
    set (then the numbers are not those of the shipped rule)."""
    configs: dict[str, Any] = {"override": os.environ.get("HAPO_OPS_KERNEL_CONFIG") or None}
    try:
        from hapo_ops.kernels._common import pick_config
    except Exception as exc:  # noqa: BLE001 - no Triton: no kernels
        configs["error"] = short_error(exc)
        return configs
    for pass_ in ("forward", "backward", "sample"):
        for dtype in (torch.bfloat16, torch.float32):
            name = str(dtype).removeprefix("torch.")
            configs[f"{pass_}:{name}"] = "x".join(map(str, pick_config(151936, dtype, pass_)))
    return configs


def busy_machine_warning(load_average: float | None, cores: int | None) -> str | None:
    """A warning when the 1-minute load average exceeds the number of cores: other processes
    then compete for the CPU, and CPU timings (and host-side launch times on a GPU) are
    inflated and spread out; None otherwise."""
    if load_average is None or not cores or load_average <= cores:
        return None
    return (f"busy machine: load average {load_average:.2f} above its {cores} cores; "
            f"timings are inflated and spread out (compare min with max)")


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
        "verl": package_version("verl"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "memory_definition": MEMORY_DEFINITION,
        "memory_method": memory_method(device),
        "kernel_configs": kernel_configs(),
        "total_memory_gib": total_memory_bytes(device) / 2**30,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(gpu_name=props.name, sm_count=props.multi_processor_count,
                    cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
    return meta
