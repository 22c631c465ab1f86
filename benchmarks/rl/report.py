"""Statistics over seeds (mean ± 95% t-interval), the Markdown report, JSON and PNG curves."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from benchmarks.rl.methods import Method

# two-sided 95% quantiles of Student's t, df = 1..30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

TAIL = 10  # training-step metrics are averaged over the last TAIL steps
FINAL_EVALS = 3  # final accuracy: mean of the last FINAL_EVALS held-out evaluations


def t_quantile(df: int) -> float:
    """t_{0.975, df} (normal approximation with a 1/df correction past the table)."""
    if df < 1:
        return math.nan
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean and the half-width of its 95% confidence interval (t-distribution)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci": math.nan, "n": n}
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return {"mean": mean, "ci": t_quantile(n - 1) * math.sqrt(var / n), "n": n}


def _tail_mean(steps: list[dict[str, float]], key: str) -> float:
    tail = steps[-TAIL:]
    return sum(s[key] for s in tail) / len(tail)


def _final(run: dict[str, Any]) -> dict[str, float]:
    steps, last = run["steps"], run["evals"][-FINAL_EVALS:]
    return {"greedy": sum(e["greedy"] for e in last) / len(last),
            "sampled": sum(e["sampled"] for e in last) / len(last),
            "start_greedy": run["evals"][0]["greedy"],
            "start_sampled": run["evals"][0]["sampled"],
            "entropy": _tail_mean(steps, "entropy"), "length": _tail_mean(steps, "length"),
            "reward": _tail_mean(steps, "reward"),
            "clip_low": sum(s["clip_low"] for s in steps) / len(steps),
            "clip_high": sum(s["clip_high"] for s in steps) / len(steps),
            "temp_min": min(s["temp_min"] for s in steps),
            "temp_max": max(s["temp_max"] for s in steps),
            "max_ratio_check": max(s["ratio_check"] for s in steps)}


def _curve(runs: list[dict[str, Any]], series: str, key: str) -> dict[str, list[float]]:
    by_seed = [r[series] for r in runs]
    points = [mean_ci([s[i][key] for s in by_seed]) for i in range(len(by_seed[0]))]
    return {"step": [p["step"] for p in by_seed[0]],
            "mean": [p["mean"] for p in points], "ci": [p["ci"] for p in points]}


def build(meta: dict[str, Any], methods: tuple[Method, ...],
          runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The result document: per-method summaries, curves, paired differences, raw runs."""
    summary, curves, finals = {}, {}, {}
    for m in methods:
        mine = [r for r in runs if r["method"] == m.name]
        finals[m.name] = {r["seed"]: _final(r) for r in mine}
        keys = next(iter(finals[m.name].values())).keys()
        summary[m.name] = {k: mean_ci([f[k] for f in finals[m.name].values()]) for k in keys}
        summary[m.name]["temp_min"]["mean"] = min(f["temp_min"] for f in finals[m.name].values())
        summary[m.name]["temp_max"]["mean"] = max(f["temp_max"] for f in finals[m.name].values())
        curves[m.name] = {"greedy": _curve(mine, "evals", "greedy"),
                          "sampled": _curve(mine, "evals", "sampled"),
                          **{k: _curve(mine, "steps", k) for k in
                             ("entropy", "clip_low", "clip_high", "temp_min", "temp_max",
                              "length", "reward")}}
    return {"meta": meta, "methods": {m.name: m.description for m in methods},
            "summary": summary, "paired": _paired(methods, finals), "curves": curves,
            "runs": runs}


def _paired(methods: tuple[Method, ...],
            finals: dict[str, dict[int, dict[str, float]]]) -> dict[str, Any]:
    """Differences to GRPO and to HAPO (paper), paired by seed (same warm-start and
    prompts), for the final greedy and sampled accuracy."""
    out: dict[str, Any] = {}
    for ref in ("grpo", "hapo"):
        if ref not in finals:
            continue
        for m in methods:
            if m.name == ref or f"{ref} - {m.name}" in out:
                continue
            seeds = sorted(set(finals[m.name]) & set(finals[ref]))
            out[f"{m.name} - {ref}"] = {
                k: mean_ci([finals[m.name][s][k] - finals[ref][s][k] for s in seeds])
                for k in ("greedy", "sampled")}
    return out


def _warm_steps(doc: dict[str, Any]) -> str:
    steps = {r["seed"]: r.get("warm_steps") for r in doc["runs"]}
    return ", ".join(str(steps[s]) for s in sorted(steps))


def _fmt(stat: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    if math.isnan(stat["ci"]):
        return f"{stat['mean'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['ci'] * scale:.{digits}f}"


def _overlaps(a: dict[str, float], b: dict[str, float]) -> bool:
    return abs(a["mean"] - b["mean"]) <= (a["ci"] + b["ci"])


def reading(doc: dict[str, Any]) -> list[str]:
    """Plain sentences on which intervals overlap (computed, not hand-written)."""
    summary, lines = doc["summary"], []
    if len(doc["meta"]["seeds"]) < 3:
        return [f"{len(doc['meta']['seeds'])} seed(s): the intervals are too wide (or "
                "degenerate) to tell methods apart; use at least 3 seeds, 5 by default."]
    for key, label in (("greedy", "greedy"), ("sampled", "sampled")):
        best = max(summary, key=lambda n: summary[n][key]["mean"])
        apart = [n for n in summary if n != best and not _overlaps(summary[n][key],
                                                                   summary[best][key])]
        together = [n for n in summary if n != best and n not in apart]
        line = (f"Final {label} accuracy: the highest mean is {best} "
                f"({_fmt(summary[best][key], 100)} %); ")
        if together:
            line += f"its interval overlaps those of {', '.join(together)}"
        line += (f"{'; ' if together else ''}no overlap with {', '.join(apart)}."
                 if apart else ".")
        lines.append(line)
    for pair, diff in doc["paired"].items():
        for key in ("greedy", "sampled"):
            d = diff[key]
            if not math.isnan(d["ci"]) and abs(d["mean"]) > d["ci"]:
                lines.append(f"Paired by seed, {pair} {key} accuracy = "
                             f"{_fmt(d, 100)} points: the interval excludes 0.")
    lines.append(f"{len(doc['paired'])} paired comparisons per accuracy: at 95% about "
                 f"{0.05 * len(doc['paired']):.1f} of them would exclude 0 by chance alone, "
                 "so read a consistent pattern, not one pair.")
    if len(lines) == 3:
        lines.append("No paired difference (method minus GRPO or minus HAPO, same seed) "
                     "has a 95% interval that excludes 0: no difference on this task at "
                     "this budget.")
    return lines


def markdown(doc: dict[str, Any]) -> str:
    """The Markdown report: setup, final-value table, paired differences, reading."""
    meta, cfg, summary = doc["meta"], doc["meta"]["config"], doc["summary"]
    n = len(meta["seeds"])
    out = [
        "# RL benchmark: GRPO, DAPO, HAPO and ablations, trained from scratch on CPU",
        "",
        f"`{meta['command']}` — {meta['date']}, {meta['cpu']} ({meta['cpu_count']} cores, "
        f"{meta['workers']} worker processes x 1 thread), torch {meta['torch']}, "
        f"hapo-ops {meta['hapo_ops']} (commit {meta['git_commit']}), wall time "
        f"{meta['wall_s']:.0f} s"
        + (f" (load average {meta['load_average_at_end'][1]} over the last 5 minutes"
           f"{': the cores were shared' if meta['load_average_at_end'][1] > meta['cpu_count'] else ''})"
           if meta.get("load_average_at_end") else "") + ".",
        "",
        f"Task: sort 1–{cfg['max_len']} digits, binary exact-match reward. Policy: GRU "
        f"(embedding {cfg['d_embed']}, hidden {cfg['d_hidden']}), supervised warm-start "
        f"until {cfg['warm_target']:.0%} greedy exact match on the training batches "
        f"(steps per seed: {_warm_steps(doc)}; shared by all methods of a seed), then "
        f"{cfg['steps']} RL steps of {cfg['prompts_per_step']} prompts x {cfg['group_size']} "
        f"samples, {cfg['ppo_epochs']} PPO epochs x {cfg['micro_batches']} micro-batches, "
        f"Adam lr {cfg['lr']}, base temperature {cfg['base_temperature']}, τ {cfg['tau']}. "
        f"Held-out accuracy on {cfg['eval_size']} problems never trained on. "
        f"{n} seeds; ± is the 95% t-interval over seeds.",
        "",
        "| method | greedy acc % | sampled acc % | entropy (nats) | clip low % | "
        "clip high % | temperature | length (tokens) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        out.append(
            f"| {name} | {_fmt(s['greedy'], 100)} | {_fmt(s['sampled'], 100)} | "
            f"{_fmt(s['entropy'], 1, 3)} | {_fmt(s['clip_low'], 100, 2)} | "
            f"{_fmt(s['clip_high'], 100, 2)} | {s['temp_min']['mean']:.3f}–"
            f"{s['temp_max']['mean']:.3f} | {_fmt(s['length'], 1, 2)} |")
    start = next(iter(summary.values()))
    out += [
        "",
        f"Start (after the warm-start, same for every method): greedy "
        f"{_fmt(start['start_greedy'], 100)} %, sampled {_fmt(start['start_sampled'], 100)} %. "
        f"Accuracy: mean of the held-out evaluations at steps "
        f"{cfg['steps'] - (FINAL_EVALS - 1) * cfg['eval_every']}–{cfg['steps']}; entropy (T = 1, rollout tokens) and length "
        f"averaged over the last {TAIL} steps; clip fractions over all steps and PPO epochs "
        f"(the first epoch of a batch is on-policy and never clips); temperature: min–max "
        f"over all rollout tokens.",
        "",
        "Paired differences (same seed: same warm-start and prompts), accuracy points:",
        "",
        "| pair | greedy | sampled |",
        "|---|---|---|",
    ]
    for pair, d in doc["paired"].items():
        out.append(f"| {pair} | {_fmt(d['greedy'], 100)} | {_fmt(d['sampled'], 100)} |")
    out += ["", "Reading:", ""] + [f"- {line}" for line in reading(doc)]
    out += ["", "Methods:", ""] + [f"- **{k}**: {v}" for k, v in doc["methods"].items()]
    return "\n".join(out) + "\n"


def write(doc: dict[str, Any], text: str, out_dir: str) -> list[str]:
    """results.json, results.md and, when matplotlib is importable, the PNG curves."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(_rounded(doc), f, separators=(",", ":"))
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(text)
    return paths + plot(doc, out_dir)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 5)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def plot(doc: dict[str, Any], out_dir: str) -> list[str]:
    """rl_curves.png (accuracy and entropy) and rl_clip_temp.png (clip fractions,
    temperature, length) vs step, one line per method with its 95% band over seeds.
    Returns [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    n = len(doc["meta"]["seeds"])
    figures = {"rl_curves.png": (("greedy", "held-out accuracy, greedy"),
                                 ("sampled", "held-out accuracy, sampled at T_base"),
                                 ("entropy", "mean token entropy (nats, rollouts)")),
               "rl_clip_temp.png": (("clip_low", "clip fraction, low side"),
                                    ("clip_high", "clip fraction, high side"),
                                    ("temp_max", "max rollout temperature"),
                                    ("length", "response length (tokens)"))}
    paths = []
    colors = plt.get_cmap("tab10").colors
    for filename, panels in figures.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
        for ax, (key, title) in zip(axes, panels):
            for i, (name, curves) in enumerate(doc["curves"].items()):
                c = curves[key]
                smooth = key not in ("greedy", "sampled")
                x, mean, ci = c["step"], _smooth(c["mean"], smooth), _smooth(c["ci"], smooth)
                style = "-" if name in ("grpo", "dapo", "hapo", "hapo-released") else "--"
                ax.plot(x, mean, style, color=colors[i % 10], label=name, linewidth=1.4)
                ax.fill_between(x, [m - h for m, h in zip(mean, ci)],
                                [m + h for m, h in zip(mean, ci)], color=colors[i % 10],
                                alpha=0.12, linewidth=0)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
        axes[1 if filename == "rl_curves.png" else 0].legend(fontsize=8, loc="upper left")
        fig.suptitle(f"digit sorting, GRU policy, {n} seeds, mean and 95% band"
                     + (" (training curves: 9-step moving average)"
                        if filename == "rl_curves.png" else " (9-step moving average)"),
                     fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, filename)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _smooth(values: list[float], on: bool, width: int = 9) -> list[float]:
    """Centered moving average (NaN-free inputs); identity when ``on`` is False."""
    if not on:
        return values
    half = width // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]
