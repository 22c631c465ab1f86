"""The scripts in examples/ run as a user runs them (``python examples/NAME.py`` from the
root of a clone, a subprocess with this interpreter) and print what they promise. Each skips
where its framework is not installed: the main suite runs the transformers one, the vLLM/TRL
environment (.ci/vllm.sh) the others."""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _needs(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


def _run(name: str, timeout: float = 900) -> str:
    """Run examples/<name> from the repository root; its stdout (fails with its output)."""
    done = subprocess.run([sys.executable, os.path.join("examples", name)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout}\n{done.stderr[-6000:]}"
    return done.stdout


def _number(pattern: str, text: str) -> tuple[float, ...]:
    found = re.search(pattern, text)
    assert found, f"no line matching {pattern!r} in:\n{text}"
    return tuple(float(g) for g in found.groups())


def _temperature_range(text: str) -> tuple[float, float]:
    low, high = _number(r"per-token temperatures: min (\S+) max (\S+)", text)
    return low, high


def test_hf_generate():
    _needs("transformers", "tokenizers")
    out = _run("hf_generate.py")
    low, high = _temperature_range(out)
    # τ = 0.05: T in [0.95, 1.05], and it varies from token to token
    assert 0.95 - 1e-6 <= low < high <= 1.05 + 1e-6 and high - low > 0.02
    (gap,) = _number(r"recomputed T_t vs recorded: max \|diff\| = (\S+)", out)
    assert gap < 1e-4  # the trainer's T_t is the one generate sampled at
    (mean,) = _number(r"old log-probs at the recorded temperatures: mean (\S+)", out)
    assert math.isfinite(mean) and mean < 0


def test_vllm_generate():
    _needs("vllm", "transformers", "tokenizers")
    out = _run("vllm_generate.py")
    low, high = _temperature_range(out)
    assert 0.95 - 1e-6 <= low < high <= 1.05 + 1e-6 and high - low > 0.02
    gap_max, gap_mean = _number(r"trainer's at T_t\|: max (\S+) mean (\S+)", out)
    # the engine runs the float32 checkpoint in bfloat16 (vLLM's default): its behaviour
    # log-probs match the trainer's float32 ones at T_t to bf16 accuracy
    assert math.isfinite(gap_max) and gap_mean < 0.05
    completions = ast.literal_eval(re.search(r"completions: (\[.*\])", out).group(1))
    assert len(completions) == 4 and all(completions)


def _steps(out: str) -> list[tuple[float, dict]]:
    steps = re.findall(r"^step (\d+): loss (\S+) .*?(\{.*\})$", out, flags=re.M)
    return [(float(loss), ast.literal_eval(metrics)) for _, loss, metrics in steps]


def _check_trl_run(out: str) -> None:
    steps = _steps(out)
    assert len(steps) == 2, out
    assert all(math.isfinite(loss) for loss, _ in steps)
    _, second = steps[1]
    assert any(k.startswith("hapo/") for k in second)
    # the second rollout has the first step's statistics: per-token temperatures spread
    low, high = (next(v for k, v in second.items()
                      if k.startswith("hapo/") and "temperature" in k and k.endswith(end))
                 for end in ("min", "max"))
    assert high - low > 0.02


def test_trl_grpo():
    _needs("trl", "datasets", "transformers", "tokenizers")
    _check_trl_run(_run("trl_grpo.py"))


def test_trl_vllm_colocate():
    _needs("trl", "vllm", "datasets", "transformers", "tokenizers")
    out = _run("trl_vllm_colocate.py")
    _check_trl_run(out)
    ratios = [float(r) for r in re.findall(r"max vLLM importance ratio (\S+)", out)]
    assert len(ratios) == 2 and all(math.isfinite(r) for r in ratios)
