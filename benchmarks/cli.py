"""Command line: ``python -m benchmarks [--quick] [--out DIR] [--only SUITE[,SUITE...]]
[--device cpu|cuda] [--budget-s S]``.

Progress goes to stderr, the final Markdown tables to stdout. Files (results.json,
results.md, a PNG plot when matplotlib is importable) are written only with ``--out``;
without it the run says so. A warning goes to stderr (and into the tables' header) when the
load average exceeds the number of cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import time
import traceback
from typing import Any

SUITES = ("trainer", "logprob", "linear", "distributed", "sampler", "replay", "contention")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmarks of hapo_ops: trainer-side ops at the size of one RL step, "
                    "log-prob + entropy from logits (against eager, and on CUDA "
                    "torch.compile and Liger-Kernel) and from hidden states, the "
                    "adaptive-temperature sampler, sampling replay, the bytes of the "
                    "distributed ops and (CPU) the torch paths beside plain torch under a "
                    "busy-loop load the run starts and stops itself. Tables (median and "
                    "min–max of the repetitions) go to stdout, progress to stderr; nothing "
                    "is saved without --out.")
    parser.add_argument("--quick", action="store_true",
                        help="smaller trainer batch (1024 responses), fewer CPU tokens, "
                             "shorter CUDA timing")
    parser.add_argument("--out", metavar="DIR",
                        help="write results.json, results.md and the plot here "
                             "(default: print only)")
    parser.add_argument("--only", type=_suites, metavar="SUITE[,SUITE...]",
                        help=f"run these suites ({', '.join(SUITES)}, comma-separated) or rl "
                             "alone; rl (training runs of every method and seed, about 12 "
                             "minutes on 2 idle cores, 2 with --quick) runs only when named")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="rl suite: number of seeds (default 5, 2 with --quick)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda when available, else cpu")
    parser.add_argument("--budget-s", type=float, default=None, metavar="S",
                        help="start no new case after S seconds; remaining cases are "
                             "reported as skipped (default: no limit)")
    # Tiny shapes and every implementation, with Triton under TRITON_INTERPRET=1 on CPU:
    # a smoke test of the GPU code paths on a machine without one.
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    return parser


def _suites(text: str) -> str:
    """``--only``: one suite, a comma-separated list of suites, or rl alone."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["rl"]:
        return "rl"
    unknown = [name for name in names if name not in SUITES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"invalid suite {', '.join(unknown) or repr(text)}: choose from "
            f"{', '.join(SUITES)} (comma-separated), or rl alone")
    return ",".join(names)


class Interrupted(BaseException):
    """Raised by SIGTERM (e.g. from ``timeout``) so that partial results are still written."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Interrupted(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.only == "rl":
        from benchmarks import rl
        return rl.run(quick=args.quick, seeds=args.seeds, out=args.out, argv=argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

    import torch

    from benchmarks import common, linear, logprob_entropy, report, trainer_ops
    from benchmarks import distributed as distributed_bench
    from benchmarks import contention, replay, sampler

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.monotonic()
    deadline = started + args.budget_s if args.budget_s else math.inf
    config = common.TimingConfig.for_device(device, args.quick or args.smoke)
    metadata: dict[str, Any] = common.environment(device)
    metadata.update(argv=sys.argv[1:] if argv is None else argv, quick=args.quick,
                    smoke=args.smoke, budget_s=args.budget_s, timing=dataclasses.asdict(config))
    common.log(f"device {metadata['device_name']}, torch {metadata['torch']}, "
               f"triton {metadata['triton']}, load average "
               f"{metadata['load_average_1m_at_start']} on {metadata['cpu_count']} cores")
    busy = common.busy_machine_warning(metadata["load_average_1m_at_start"],
                                       metadata["cpu_count"])
    if busy:
        common.log(f"warning: {busy}")
    if not args.out:
        common.log("results are printed only, not saved: pass --out DIR to keep them")

    results: list[common.Result] = []
    accuracy: list[dict[str, Any]] = []
    suites = args.only.split(",") if args.only else list(SUITES)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        copy = logprob_entropy.copy_bandwidth(device, config, smoke=args.smoke)
        results.append(copy)
        metadata["copy_bandwidth_gbps"] = copy.gbps
        if "trainer" in suites:
            trainer_ops.run(device, config, results, quick=args.quick, smoke=args.smoke,
                            deadline=deadline)
        if "logprob" in suites:
            logprob_entropy.run(device, config, results, accuracy, quick=args.quick,
                                smoke=args.smoke, copy_gbps=copy.gbps, deadline=deadline)
        if "linear" in suites:
            linear.run(device, config, results, quick=args.quick, smoke=args.smoke,
                       deadline=deadline)
        if "distributed" in suites:
            distributed_bench.run(device, config, results, quick=args.quick, smoke=args.smoke,
                                  deadline=deadline)
        if "sampler" in suites:
            sampler.run(device, config, results, quick=args.quick, smoke=args.smoke,
                        copy_gbps=copy.gbps, deadline=deadline)
        if "replay" in suites:
            replay.run(device, config, results, quick=args.quick, smoke=args.smoke,
                       copy_gbps=copy.gbps, deadline=deadline)
        if "contention" in suites:
            contention.run(device, config, results, quick=args.quick, smoke=args.smoke,
                           deadline=deadline)
    except (Interrupted, KeyboardInterrupt) as exc:
        metadata["interrupted"] = str(exc) or type(exc).__name__
        common.log(f"interrupted ({metadata['interrupted']}): writing partial results")
    except Exception as exc:  # noqa: BLE001 - e.g. a device fault: keep what was measured
        traceback.print_exc()
        metadata["interrupted"] = f"crashed: {common.short_error(exc)}"
        common.log(f"{metadata['interrupted']}: writing partial results")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    metadata["wall_s"] = round(time.monotonic() - started, 1)
    metadata["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)

    published = logprob_entropy.PUBLISHED if device.type == "cuda" and "logprob" in suites else []
    doc = report.build(metadata, results, accuracy, published)
    text = report.markdown(doc)
    print(text)
    busy = common.busy_machine_warning(metadata["load_average_1m_at_end"],
                                       metadata["cpu_count"])
    if busy:
        common.log(f"warning: {busy}")
    if args.out:
        for path in report.write(doc, text, args.out):
            common.log(f"wrote {path}")
    else:
        common.log("results not saved (no --out DIR): the tables above are the only copy")
    common.log(f"done in {metadata['wall_s']} s")
    return 1 if "interrupted" in metadata else 0
