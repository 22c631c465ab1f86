"""Results document: JSON, Markdown tables and an optional bandwidth plot (matplotlib).

    python -m benchmarks.report DIR      (DIR holds one run's results.json)

prints the README's benchmark section, generated from that one file alone: every number
of it comes from one run of one harness (``python -m benchmarks``), with the kernel
configurations recorded in that run. Exit code 1 when the run overrode the shipped kernel
configurations (``HAPO_OPS_KERNEL_CONFIG``) or was interrupted, 2 when DIR has no
results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.common import MEMORY_DEFINITION, Result, busy_machine_warning, log

JSON_NAME = "results.json"
MARKDOWN_NAME = "results.md"
PLOT_NAME = "logprob_bandwidth_bf16_forward.png"


def build(metadata: dict[str, Any], results: Sequence[Result],
          accuracy: Sequence[dict[str, Any]],
          published: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """``published``: figures from elsewhere, never mixed with the measured rows."""
    return {"metadata": metadata, "results": [dataclasses.asdict(r) for r in results],
            "entropy_accuracy": list(accuracy), "published": list(published)}


# --------------------------------------------------------------------------- markdown


def _num(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return _num(value, 3 if value < 100 else 1)


def _spread(row: dict[str, Any]) -> str:
    """'min–max' ms of the repetitions (blank for rows without timing or older results)."""
    low, high = row.get("min_ms"), row.get("max_ms")
    if low is None or high is None or row["status"] != "ok":
        return ""
    return f"{_ms(low)}–{_ms(high)}"


def _sci(value: float | None) -> str:
    return "" if value is None else f"{value:.2e}"


def _status(row: dict[str, Any]) -> str:
    if row["status"] == "ok":
        return row["note"]
    return f"**{row['status']}**: {row['note']}" if row["note"] else f"**{row['status']}**"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _rows(doc: dict[str, Any], suite: str) -> list[dict[str, Any]]:
    return [row for row in doc["results"] if row["suite"] == suite]


def find_row(doc: dict[str, Any], suite: str, name: str, mode: str, dtype: str,
             shape: Sequence[int]) -> dict[str, Any] | None:
    for row in _rows(doc, suite):
        if (row["name"], row["mode"], row["dtype"], list(row["shape"])) == \
                (name, mode, dtype, list(shape)):
            return row
    return None


def baseline_row(doc: dict[str, Any], row: dict[str, Any],
                 name: str | None = None) -> dict[str, Any] | None:
    """The row ``row`` is compared with: same suite, shape and dtype, same mode (an in-place
    forward+backward is compared with the baseline's forward+backward)."""
    name = name or row.get("baseline")
    if not name:
        return None
    mode = row["mode"].removesuffix(" in-place")
    return find_row(doc, row["suite"], name, mode, row["dtype"], row["shape"])


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b or (isinstance(b, float) and math.isnan(b)):
        return ""
    return f"{a / b:.2f}×"


def vs_baseline(doc: dict[str, Any], row: dict[str, Any]) -> str:
    """'0.52× time, 0.05× memory' of the baseline row (blank when either is missing)."""
    base = baseline_row(doc, row)
    if base is None or row["status"] != "ok" or base["status"] != "ok":
        return ""
    time_ratio = _ratio(row["median_ms"], base["median_ms"])
    memory = _ratio(row["extra_peak_mb"], base["extra_peak_mb"])
    return f"{time_ratio} time" + (f", {memory} memory" if memory else "")


def header(doc: dict[str, Any]) -> str:
    meta = doc["metadata"]
    copy = meta.get("copy_bandwidth_gbps")
    parts = [f"device: {meta['device_name']} ({meta['device']})", f"torch {meta['torch']}",
             f"triton {meta['triton']}", f"date {meta['date']}"]
    if copy:
        parts.append(f"copy bandwidth {copy:,.0f} GB/s (read + written)")
    if meta.get("load_average_1m_at_start") is not None:
        parts.append(f"{meta.get('cpu_count')} CPU cores, load average "
                     f"{meta.get('load_average_1m_at_start')} at start, "
                     f"{meta.get('load_average_1m_at_end')} at end")
    text = "; ".join(parts)
    busy = [warning for warning in (
        busy_machine_warning(meta.get(key), meta.get("cpu_count"))
        for key in ("load_average_1m_at_start", "load_average_1m_at_end")) if warning]
    if busy:
        text += f"\n\n**Warning: {busy[-1]}.**"
    text += f"\n\n{meta.get('memory_definition', MEMORY_DEFINITION)} " \
        f"({meta['memory_method']}). Times: the median of the timed repetitions (\"reps\"), " \
        "with their minimum and maximum (\"min–max\"). \"vs baseline\": time and peak " \
        "memory over the baseline row's at the same shape, dtype and mode (below 1 is better)."
    configs = meta.get("kernel_configs") or {}
    if meta.get("device", "").startswith("cuda") and "forward:bfloat16" in configs:
        text += ("\n\nKernel configurations (block × warps × stages, V = 151936): "
                 + ", ".join(f"{key} {value}" for key, value in configs.items()
                             if key not in ("override", "error")) + ".")
    if configs.get("override"):
        text += (f"\n\n**Kernel configurations overridden (HAPO_OPS_KERNEL_CONFIG="
                 f"{configs['override']}): not the shipped rule.**")
    if meta.get("budget_s"):
        text += f" Time budget {meta['budget_s']:g} s: cases past it are reported as skipped."
    if meta.get("interrupted"):
        text += f"\n\n**Interrupted ({meta['interrupted']}): partial results.**"
    return text


def trainer_table(doc: dict[str, Any]) -> str:
    headers = ["op", "mode", "B", "L", "median ms", "min–max", "reps", "peak MB", "vs baseline",
               "baseline", "note"]
    rows = [[r["name"], r["mode"], str(r["shape"][0]), str(r["shape"][1]), _ms(r["median_ms"]),
             _spread(r), str(r["reps"] or ""), _num(r["extra_peak_mb"], 1), vs_baseline(doc, r),
             r.get("baseline") or "", _status(r)]
            for r in _rows(doc, "trainer")]
    return table(headers, rows)


def logprob_table(doc: dict[str, Any]) -> str:
    headers = ["impl", "dtype", "N", "V", "mode", "median ms", "min–max", "reps", "GB/s",
               "% of copy BW", "peak MB", "vs torch-eager", "note"]
    rows = [[r["name"], r["dtype"], str(r["shape"][0]), str(r["shape"][1]), r["mode"],
             _ms(r["median_ms"]), _spread(r), str(r["reps"] or ""), _num(r["gbps"], 1),
             _num(r["pct_copy_bw"], 1), _num(r["extra_peak_mb"], 1), vs_baseline(doc, r),
             _status(r)]
            for r in _rows(doc, "logprob")]
    return table(headers, rows)


def linear_table(doc: dict[str, Any]) -> str:
    rows_in = _rows(doc, "linear")
    with_matmul = any(r["name"] == "matmul" for r in rows_in)
    headers = ["impl", "dtype", "N", "D", "V", "mode", "median ms", "min–max", "reps", "peak MB",
               "vs unfused"]
    headers += ["time / matmul alone"] if with_matmul else []
    headers += ["note"]
    rows = []
    for r in rows_in:
        row = [r["name"], r["dtype"], *(str(x) for x in r["shape"]), r["mode"],
               _ms(r["median_ms"]), _spread(r), str(r["reps"] or ""),
               _num(r["extra_peak_mb"], 1), vs_baseline(doc, r)]
        if with_matmul:
            base = baseline_row(doc, r, "matmul") if r["name"] != "matmul" else None
            row.append(_ratio(r["median_ms"], base["median_ms"])
                       if base and r["status"] == base["status"] == "ok" else "")
        rows.append(row + [_status(r)])
    return table(headers, rows)


def distributed_table(doc: dict[str, Any]) -> str:
    headers = ["case", "shape", "bytes per call", "note"]
    rows = [[r["name"], " × ".join(str(x) for x in r["shape"]), _num(r["bytes_moved"], 0),
             _status(r)] for r in _rows(doc, "distributed")]
    return table(headers, rows)


def sampler_table(doc: dict[str, Any]) -> str:
    headers = ["impl", "dtype", "B", "V", "median ms", "min–max", "reps", "GB/s", "% of copy BW",
               "peak MB", "vs torch-eager", "note"]
    rows = [[r["name"], r["dtype"], str(r["shape"][0]), str(r["shape"][1]), _ms(r["median_ms"]),
             _spread(r), str(r["reps"] or ""), _num(r["gbps"], 1), _num(r["pct_copy_bw"], 1),
             _num(r["extra_peak_mb"], 1), vs_baseline(doc, r), _status(r)]
            for r in _rows(doc, "sampler")]
    return table(headers, rows)


def replay_table(doc: dict[str, Any]) -> str:
    """Sampling replay: each case against the plain op of the same impl, mode and shape."""
    headers = ["impl/case", "dtype", "N", "V", "mode", "median ms", "min–max", "reps",
               "peak MB", "vs plain", "note"]
    rows = [[r["name"], r["dtype"], str(r["shape"][0]), str(r["shape"][1]), r["mode"],
             _ms(r["median_ms"]), _spread(r), str(r["reps"] or ""), _num(r["extra_peak_mb"], 1),
             vs_baseline(doc, r), _status(r)] for r in _rows(doc, "replay")]
    return table(headers, rows)


def contention_table(doc: dict[str, Any]) -> str:
    """CPU under contention: each row against torch-eager at the same load and against
    itself with no added load."""
    headers = ["op, load", "impl", "dtype", "B", "V", "median ms", "min–max", "reps",
               "vs torch-eager", "vs no added load", "note"]
    rows = []
    for r in _rows(doc, "contention"):
        op = r["mode"].split(", ")[0]
        quiet = find_row(doc, "contention", r["name"], f"{op}, {CONTENTION_QUIET}",
                         r["dtype"], r["shape"])
        slowdown = (_ratio(r["median_ms"], quiet["median_ms"])
                    if quiet is not None and quiet is not r
                    and r["status"] == quiet["status"] == "ok" else "")
        rows.append([r["mode"], r["name"], r["dtype"], str(r["shape"][0]), str(r["shape"][1]),
                     _ms(r["median_ms"]), _spread(r), str(r["reps"] or ""),
                     vs_baseline(doc, r).removesuffix(" time"), slowdown, _status(r)])
    return table(headers, rows)


CONTENTION_TITLE = ("CPU under contention: the torch paths and plain torch with one busy "
                    "loop per core, started and stopped by the benchmark")
CONTENTION_QUIET = "no added load"
CONTENTION_NOTE = ("The two implementations alternate, one call each per round, so that both "
                   "see the same load (the load average over each case is in its note); "
                   "\"vs no added load\": the median over the same implementation's median "
                   "without the busy loops.")

REPLAY_TITLE = ("Sampling replay: log-prob + entropy under the truncated distribution "
                "(kept sets, top-k, top-p) against the plain op")


def accuracy_table(doc: dict[str, Any]) -> str:
    headers = ["impl", "dtype", "gap", "rows", "V", "median H (fp64)", "min H (fp64)",
               "max rel err H", "max abs err logp", "note"]
    rows = [[str(a.get("impl", "")), str(a.get("dtype", "")), _num(a.get("gap"), 0),
             str(a.get("rows", "")), str(a.get("V", "")), _sci(a.get("median_entropy_ref")),
             _sci(a.get("min_entropy_ref")), _sci(a.get("max_rel_err_entropy")),
             _sci(a.get("max_abs_err_logprob")), str(a.get("error", ""))]
            for a in doc["entropy_accuracy"]]
    return table(headers, rows)


def markdown(doc: dict[str, Any]) -> str:
    sections = ["# hapo_ops benchmarks", header(doc)]
    if _rows(doc, "trainer"):
        sections += ["## Trainer-side ops (one RL step)", trainer_table(doc)]
    if _rows(doc, "logprob"):
        sections += [
            "## Log-prob + entropy from logits",
            "GB/s: minimum traffic (forward N·V·itemsize; with backward 3·N·V·itemsize) "
            "over the median time; % of copy BW: that over the copy bandwidth measured in "
            "this run. In-place rows are compared with torch-eager's forward+backward.",
            logprob_table(doc)]
        published = published_lines(doc)
        if published:
            sections += ["Published, not measured here:\n\n" + published]
    if _rows(doc, "linear"):
        sections += ["## Fused LM head + log-prob + entropy (no N×V logits)", linear_table(doc)]
    if _rows(doc, "distributed"):
        sections += ["## Distributed: bytes communicated per call (payload per rank), TP "
                     "shape N × V, quantile tokens × ranks", distributed_table(doc)]
    if _rows(doc, "sampler"):
        sections += ["## Adaptive-temperature sampling (GB/s: two reads of the logits)",
                     sampler_table(doc)]
    if _rows(doc, "replay"):
        sections += [f"## {REPLAY_TITLE}", replay_table(doc)]
    if _rows(doc, "contention"):
        sections += [f"## {CONTENTION_TITLE}", CONTENTION_NOTE, contention_table(doc)]
    if doc["entropy_accuracy"]:
        sections += ["## Entropy accuracy on near-deterministic rows "
                     "(top logit `gap` above the rest, against float64)", accuracy_table(doc)]
    return "\n\n".join(sections) + "\n"


def published_lines(doc: dict[str, Any]) -> str:
    """One line per published figure, next to this run's own row at that shape if any."""
    lines = []
    for item in doc.get("published", []):
        shape = item["shape"]
        n, v = math.prod(shape[:-1]), shape[-1]
        line = (f"- {item['what']}: {item['median_ms']} ms on an {item['device']}, "
                f"{item['dtype']} {list(shape)} ({item['source']}; not measured here)")
        ours = find_row(doc, "logprob", "hapo-triton", "forward", item["dtype"], [n, v])
        if ours and ours["status"] == "ok":
            line += (f". This run, hapo-triton at that shape: {_ms(ours['median_ms'])} ms on "
                     f"{doc['metadata']['device_name']}, different hardware")
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------- README section

TARGET = ("bfloat16", [16384, 151936])


def _cell(row: dict[str, Any] | None, with_pct: bool = True) -> str:
    if row is None:
        return "not run"
    if row["status"] != "ok":
        return row["status"]
    text = f"{_ms(row['median_ms'])} ms"
    if with_pct and row.get("pct_copy_bw"):
        text += f" ({row['pct_copy_bw']:.0f}% of copy)"
    return text


def _mb(row: dict[str, Any] | None) -> str:
    if row is None or row["status"] != "ok" or row["extra_peak_mb"] is None:
        return ""
    return f"{row['extra_peak_mb']:,.1f}"


def logprob_target_table(doc: dict[str, Any]) -> str:
    """Target-shape table: one line per implementation, forward and forward+backward."""
    dtype, shape = TARGET
    names = []
    for row in _rows(doc, "logprob"):
        if row["dtype"] == dtype and row["shape"] == shape and row["name"] not in names:
            names.append(row["name"])
    headers = ["", "forward", "forward + backward", "forward + backward in place",
               "peak MB (fwd / fwd+bwd / in place)"]
    rows = []
    for name in names:
        cells = [find_row(doc, "logprob", name, mode, dtype, shape)
                 for mode in ("forward", "forward+backward", "forward+backward in-place")]
        rows.append([name] + [_cell(c) if c else "" for c in cells]
                    + [" / ".join(_mb(c) or "–" for c in cells)])
    return table(headers, rows)


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "**not met**")


def target_lines(doc: dict[str, Any]) -> str:
    """The GPU targets, each with this run's figure and whether it is met."""
    dtype, shape = TARGET
    lines = []
    for mode, goal in (("forward", 95.0), ("forward+backward", 90.0),
                       ("forward+backward in-place", 90.0)):
        row = find_row(doc, "logprob", "hapo-triton", mode, dtype, shape)
        pct = row.get("pct_copy_bw") if row and row["status"] == "ok" else None
        lines.append(f"- logits kernel, {mode}: ≥ {goal:.0f}% of copy bandwidth; this run "
                     f"{'–' if pct is None else f'{pct:.1f}%'}: "
                     f"{_verdict(None if pct is None else pct >= goal)}")
    samples = [r for r in _rows(doc, "sampler") if r["name"] == "hapo-triton"
               and r["status"] == "ok" and r.get("pct_copy_bw")]
    best = max((r["pct_copy_bw"] for r in samples), default=None)
    lines.append(f"- sampler: ≥ 85% of copy bandwidth counting its two reads; this run "
                 f"{'–' if best is None else f'{best:.1f}% (best B)'}: "
                 f"{_verdict(None if best is None else best >= 85.0)}")
    for mode in ("forward", "forward+backward"):
        fused = find_row(doc, "linear", "hapo-fused-triton", mode, "bfloat16",
                         [16384, 4096, 151936])
        base = baseline_row(doc, fused) if fused else None
        ratio = (fused["median_ms"] / base["median_ms"]
                 if fused and base and fused["status"] == base["status"] == "ok" else None)
        lines.append(f"- fused linear head, {mode} (bf16 16384 × 4096 × 151936): ≤ 1.3× "
                     f"cuBLAS + logits kernel; this run "
                     f"{'–' if ratio is None else f'{ratio:.2f}×'}: "
                     f"{_verdict(None if ratio is None else ratio <= 1.3)}")
    return "\n".join(lines)


def readme_section(doc: dict[str, Any]) -> str:
    """The README's benchmark section, from one results document."""
    meta = doc["metadata"]
    parts = [header(doc)]
    if meta["device"].startswith("cuda") and _rows(doc, "logprob"):
        dtype, (n, v) = TARGET
        parts += [f"### Log-prob + entropy, {dtype} logits, N = {n}, V = {v}",
                  logprob_target_table(doc)]
        published = published_lines(doc)
        if published:
            parts += ["Published, not measured here:\n\n" + published]
    if meta["device"].startswith("cuda"):
        parts += ["Targets:\n\n" + target_lines(doc)]
    if not meta["device"].startswith("cuda") and _rows(doc, "logprob"):
        parts += ["### Log-prob + entropy from logits", logprob_table(doc)]
    for suite, title, render in (
            ("trainer", "### Trainer-side ops (one RL step)", trainer_table),
            ("linear", "### Fused LM head + log-prob + entropy", linear_table),
            ("sampler", "### Adaptive-temperature sampling (GB/s: two reads of the logits)",
             sampler_table),
            ("replay", f"### {REPLAY_TITLE}", replay_table),
            ("contention", f"### {CONTENTION_TITLE}\n\n{CONTENTION_NOTE}", contention_table)):
        rows = _rows(doc, suite)
        if suite == "linear" and meta["device"].startswith("cuda"):
            rows = [r for r in rows if r["dtype"] == "bfloat16" and r["shape"][0] == 16384
                    and r["shape"][1] == 4096 and r["shape"][2] == 151936]
            if rows:
                parts += [title, render({**doc, "results": rows})]
            continue
        if rows:
            parts += [title, render(doc)]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Print the README's benchmark section from one results folder.")
    parser.add_argument("folder", help="a folder holding one run's results.json")
    args = parser.parse_args(argv)
    path = os.path.join(args.folder, JSON_NAME)
    if not os.path.isfile(path):
        print(f"error: no {JSON_NAME} in {args.folder}", file=sys.stderr)
        return 2
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    doc.setdefault("published", [])
    print(readme_section(doc), end="")
    meta = doc["metadata"]
    if (meta.get("kernel_configs") or {}).get("override"):
        print("error: this run overrode the shipped kernel configurations "
              "(HAPO_OPS_KERNEL_CONFIG); its numbers are not the shipped ones", file=sys.stderr)
        return 1
    if meta.get("interrupted"):
        print(f"warning: this run was interrupted ({meta['interrupted']})", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- files


def write(doc: dict[str, Any], text: str, out_dir: str) -> list[str]:
    """Write JSON, Markdown and (if matplotlib imports) the plot; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, JSON_NAME), os.path.join(out_dir, MARKDOWN_NAME)]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(text)
    plot_path = os.path.join(out_dir, PLOT_NAME)
    if plot_bandwidth(doc, plot_path):
        paths.append(plot_path)
    return paths


Series = dict[tuple[str, int], list[tuple[int, float]]]


def _series(rows: Sequence[dict[str, Any]], keep: Callable[[dict[str, Any]], bool]) -> Series:
    """{(impl, N): [(V, GB/s), ...]} sorted by V."""
    series: Series = {}
    for r in rows:
        if keep(r) and r["gbps"]:
            series.setdefault((r["name"], r["shape"][0]), []).append((r["shape"][1], r["gbps"]))
    return {key: sorted(points) for key, points in sorted(series.items())}


def plot_bandwidth(doc: dict[str, Any], path: str) -> bool:
    """GB/s against V per implementation (bf16, forward); False when nothing was drawn."""
    rows = [r for r in _rows(doc, "logprob") if r["dtype"] == "bfloat16" and r["mode"] == "forward"]
    measured = _series(rows, lambda r: r["status"] == "ok")
    if not measured:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001 - optional dependency
        log(f"no plot: matplotlib unavailable ({type(exc).__name__})")
        return False
    fig, ax = plt.subplots(figsize=(9, 5.5))
    impls = sorted({name for name, _ in measured})
    colors = {name: f"C{i % 10}" for i, name in enumerate(impls)}
    sizes = sorted({n for _, n in measured}, reverse=True)
    styles = {n: ("-", "--", ":", "-.")[i % 4] for i, n in enumerate(sizes)}
    for (name, n), points in measured.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colors[name],
                linestyle=styles[n], label=f"{name} N={n}")
    copy = doc["metadata"].get("copy_bandwidth_gbps")
    if copy:
        ax.axhline(copy, color="gray", linestyle="--", label="device copy (read + write)")
    ax.set_xlabel("vocabulary size V")
    ax.set_ylabel("GB/s (N·V·2 bytes / median time)")
    ax.set_title(f"log-prob + entropy, bf16, forward — {doc['metadata']['device_name']}")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
