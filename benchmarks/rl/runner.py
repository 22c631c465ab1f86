"""``python -m benchmarks --only rl``: every method over several seeds, then the report."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from typing import Any

import torch

import hapo_ops
from benchmarks.rl import report
from benchmarks.rl.loop import RLConfig, log, run_method, warm_start
from benchmarks.rl.methods import METHODS, Method

DEFAULT_SEEDS = 5
QUICK_SEEDS = 2


def config_for(quick: bool) -> RLConfig:
    """The default configuration, or the ``--quick`` one (fewer steps, smaller eval set)."""
    if quick:
        return RLConfig(steps=40, eval_size=256)
    return RLConfig()


def machine() -> dict[str, Any]:
    """Facts about the machine and software the run used."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"date": datetime.date.today().isoformat(), "platform": platform.platform(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "hapo_ops": hapo_ops.__version__, "git_commit": commit}


def _init_worker() -> None:
    torch.set_num_threads(1)


def _jobs(cfg: RLConfig, seeds: list[int], methods: tuple[Method, ...],
          workers: int) -> list[dict[str, Any]]:
    """Warm-starts (one per seed, shared by every method), then one run per (method, seed)."""
    progress_every = max(cfg.eval_every, cfg.steps // 2)
    if workers <= 1:
        warm = {s: warm_start(cfg, s) for s in seeds}
        _warm_done(warm)
        runs = []
        for s in seeds:
            for m in methods:
                runs.append(run_method(m, cfg, s, warm[s][0], progress_every))
                _done(runs[-1], len(runs), len(seeds) * len(methods))
        return [{**r, "warm_steps": warm[r["seed"]][1]} for r in runs]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                initializer=_init_worker) as pool:
        warm = dict(zip(seeds, pool.map(warm_start, [cfg] * len(seeds), seeds)))
        _warm_done(warm)
        futures = [pool.submit(run_method, m, cfg, s, warm[s][0], progress_every)
                   for s in seeds for m in methods]
        runs = []
        for future in concurrent.futures.as_completed(futures):
            runs.append(future.result())
            _done(runs[-1], len(runs), len(futures))
    order = {(m.name, s): i for i, (s, m) in enumerate((s, m) for s in seeds for m in methods)}
    return [{**r, "warm_steps": warm[r["seed"]][1]}
            for r in sorted(runs, key=lambda r: order[(r["method"], r["seed"])])]


def _warm_done(warm: dict[int, tuple[dict[str, torch.Tensor], int]]) -> None:
    log("warm-starts done: " + ", ".join(f"seed {s} in {n} steps" for s, (_, n) in warm.items()))


def _done(run: dict[str, Any], count: int, total: int) -> None:
    last = run["evals"][-1]
    log(f"[{count}/{total}] {run['method']} seed {run['seed']}: greedy {last['greedy']:.3f} "
        f"sampled {last['sampled']:.3f} ({run['wall_s']:.0f} s)")


def run(*, quick: bool = False, seeds: int | None = None, out: str | None = None,
        workers: int | None = None, argv: list[str] | None = None) -> int:
    """Train every method on every seed, print the Markdown report, write files to ``out``."""
    started = time.monotonic()
    cfg = config_for(quick)
    seed_list = list(range(seeds if seeds else (QUICK_SEEDS if quick else DEFAULT_SEEDS)))
    workers = workers or min(2, os.cpu_count() or 1)
    torch.set_num_threads(1)  # every run single-threaded: identical results for any --workers
    meta: dict[str, Any] = {
        "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": quick, "seeds": seed_list, "workers": workers, "threads_per_worker": 1,
        "config": dataclasses.asdict(cfg), **machine()}
    log(f"rl: {len(METHODS)} methods x {len(seed_list)} seeds, {cfg.steps} steps of "
        f"{cfg.prompts_per_step}x{cfg.group_size} rollouts, {workers} worker(s); "
        f"torch {torch.__version__}")
    runs = _jobs(cfg, seed_list, METHODS, workers)
    meta["wall_s"] = round(time.monotonic() - started, 1)
    meta["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    doc = report.build(meta, METHODS, runs)
    text = report.markdown(doc)
    print(text)
    if out:
        for path in report.write(doc, text, out):
            log(f"wrote {path}")
    else:
        log("results not saved (no --out DIR): the report above is the only copy")
    log(f"rl done in {meta['wall_s']} s")
    return 0
