"""Results document: JSON, Markdown tables and an optional bandwidth plot (matplotlib)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.common import Result, log

JSON_NAME = "results.json"
MARKDOWN_NAME = "results.md"
PLOT_NAME = "logprob_bandwidth_bf16_forward.png"


def build(metadata: dict[str, Any], results: Sequence[Result],
          accuracy: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"metadata": metadata, "results": [dataclasses.asdict(r) for r in results],
            "entropy_accuracy": list(accuracy)}


# --------------------------------------------------------------------------- markdown


def _num(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return _num(value, 3 if value < 100 else 1)


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


def header(doc: dict[str, Any]) -> str:
    meta = doc["metadata"]
    copy = meta.get("copy_bandwidth_gbps")
    parts = [f"device: {meta['device_name']} ({meta['device']})", f"torch {meta['torch']}",
             f"triton {meta['triton']}", f"date {meta['date']}"]
    if copy:
        parts.append(f"copy bandwidth {copy:,.0f} GB/s (read + written)")
    text = "; ".join(parts) + f"\n\nextra peak MB: {meta['memory_method']}."
    if meta.get("budget_s"):
        text += f" Time budget {meta['budget_s']:g} s: cases past it are reported as skipped."
    if meta.get("interrupted"):
        text += f"\n\n**Interrupted ({meta['interrupted']}): partial results.**"
    return text


def trainer_table(doc: dict[str, Any]) -> str:
    headers = ["op", "mode", "B", "L", "median ms", "reps", "extra peak MB", "note"]
    rows = [[r["name"], r["mode"], str(r["shape"][0]), str(r["shape"][1]), _ms(r["median_ms"]),
             str(r["reps"] or ""), _num(r["extra_peak_mb"], 1), _status(r)]
            for r in _rows(doc, "trainer")]
    return table(headers, rows)


def logprob_table(doc: dict[str, Any]) -> str:
    headers = ["impl", "dtype", "N", "V", "mode", "median ms", "GB/s", "% of copy BW",
               "extra peak MB", "note"]
    rows = [[r["name"], r["dtype"], str(r["shape"][0]), str(r["shape"][1]), r["mode"],
             _ms(r["median_ms"]), _num(r["gbps"], 1), _num(r["pct_copy_bw"], 1),
             _num(r["extra_peak_mb"], 1), _status(r)]
            for r in _rows(doc, "logprob")]
    return table(headers, rows)


def linear_table(doc: dict[str, Any]) -> str:
    headers = ["impl", "dtype", "N", "D", "V", "mode", "median ms", "extra peak MB", "note"]
    rows = [[r["name"], r["dtype"], *(str(x) for x in r["shape"]), r["mode"],
             _ms(r["median_ms"]), _num(r["extra_peak_mb"], 1), _status(r)]
            for r in _rows(doc, "linear")]
    return table(headers, rows)


def distributed_table(doc: dict[str, Any]) -> str:
    headers = ["case", "shape", "bytes per call", "note"]
    rows = [[r["name"], " × ".join(str(x) for x in r["shape"]), _num(r["bytes_moved"], 0),
             _status(r)] for r in _rows(doc, "distributed")]
    return table(headers, rows)


def sampler_table(doc: dict[str, Any]) -> str:
    headers = ["impl", "dtype", "B", "V", "median ms", "GB/s", "% of copy BW", "extra peak MB",
               "note"]
    rows = [[r["name"], r["dtype"], str(r["shape"][0]), str(r["shape"][1]), _ms(r["median_ms"]),
             _num(r["gbps"], 1), _num(r["pct_copy_bw"], 1), _num(r["extra_peak_mb"], 1),
             _status(r)] for r in _rows(doc, "sampler")]
    return table(headers, rows)


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
            "over the median time. Rows marked *reference* are published, not measured.",
            logprob_table(doc)]
    if _rows(doc, "linear"):
        sections += ["## Fused LM head + log-prob + entropy (no N×V logits)", linear_table(doc)]
    if _rows(doc, "distributed"):
        sections += ["## Distributed: bytes communicated per call (payload per rank), TP "
                     "shape N × V, quantile tokens × ranks", distributed_table(doc)]
    if _rows(doc, "sampler"):
        sections += ["## Adaptive-temperature sampling (GB/s: two reads of the logits)",
                     sampler_table(doc)]
    if doc["entropy_accuracy"]:
        sections += ["## Entropy accuracy on near-deterministic rows "
                     "(top logit `gap` above the rest, against float64)", accuracy_table(doc)]
    return "\n\n".join(sections) + "\n"


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
    for (name, n), points in _series(rows, lambda r: r["status"] == "reference").items():
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker="*", s=150,
                   color="black", label=f"{name} N={n}", zorder=3)
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
