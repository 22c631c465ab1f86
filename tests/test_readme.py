"""The README's commands and code, and the package's quick start, as a user runs them.

- The two opening commands: exactly two, the second one what CI runs (.ci/run).
- install.py (the first thing both commands run): the PyTorch build it picks per machine.
- The README's Python snippets that need only this package run here on small inputs; those
  that need vLLM or transformers are verbatim parts of the examples, which
  tests/test_examples.py runs.
- ``help(hapo_ops)``'s quick start runs, through the statistics for the next rollout.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import hapo_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*path: str) -> str:
    with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
        return f.read()


README = _read("README.md")


def _blocks(language: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^```" + language + r"\n(.*?)^```", README,
                                            flags=re.M | re.S)]


def _block(marker: str) -> str:
    """The one README python block that contains ``marker``."""
    found = [b for b in _blocks("python") if marker in b]
    assert len(found) == 1, f"{len(found)} README python blocks contain {marker!r}"
    return found[0]


# ---------------------------------------------------------------- the opening commands


def _opening_commands() -> list[str]:
    head = README.split("\n## ", 1)[0]
    first = re.search(r"^```bash\n(.*?)^```", head, flags=re.M | re.S)
    assert first, "the README opens with a bash block"
    return [line for line in first.group(1).splitlines() if line.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_command():
    run_main, run_tests = _opening_commands()
    assert run_main.startswith("python install.py") and run_main.endswith("python -m benchmarks")
    assert run_tests.startswith("python install.py test &&")
    assert run_tests.endswith("python -m pytest -q -p no:cacheprovider")
    ci_lines = [line.strip() for line in _read(".ci", "run").splitlines()]
    assert run_tests in ci_lines, ".ci/run must run the README's test command verbatim"


# ---------------------------------------------------------------- install.py


def _install_module():
    spec = importlib.util.spec_from_file_location("install_script", os.path.join(ROOT, "install.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_picks_the_cpu_build_only_on_linux_without_an_nvidia_gpu():
    install = _install_module()
    pick = install.torch_build
    assert pick(has_torch=False, system="Linux", nvidia_gpu=False) == "cpu"
    assert pick(has_torch=False, system="Linux", nvidia_gpu=True) is None      # PyPI: CUDA
    assert pick(has_torch=False, system="Darwin", nvidia_gpu=False) is None    # PyPI: CPU/MPS
    assert pick(has_torch=False, system="Windows", nvidia_gpu=False) is None
    for system, gpu in (("Linux", False), ("Linux", True)):   # an installed torch is kept
        assert pick(has_torch=True, system=system, nvidia_gpu=gpu) is None
        assert pick(has_torch=True, system=system, nvidia_gpu=gpu, choice="cpu") is None
    assert pick(has_torch=False, system="Linux", nvidia_gpu=True, choice="cpu") == "cpu"
    assert pick(has_torch=False, system="Linux", nvidia_gpu=False, choice="pypi") is None
    with pytest.raises(ValueError, match="--torch"):
        pick(has_torch=False, system="Linux", nvidia_gpu=False, choice="cuda")


def test_install_commands():
    install = _install_module()
    cpu = install.pip_commands("test", "cpu", python="py", cpu_torch="torch==2.9.1+cpu")
    assert cpu == [["py", "-m", "pip", "install", "--no-deps", "torch==2.9.1+cpu",
                    "--index-url", "https://download.pytorch.org/whl/cpu"],
                   ["py", "-m", "pip", "install", "-e", ".[test]"]]
    assert install.pip_commands("", None, python="py") == [["py", "-m", "pip", "install", "-e", "."]]
    assert install.pip_commands("test,plot", None, python="py")[-1][-1] == ".[test,plot]"
    for bad in ("te st", "test;rm", ".[test]", "test,"):
        with pytest.raises(ValueError, match="extras"):
            install.pip_commands(bad, None)


def test_install_reads_the_newest_cpu_version_from_pip_index():
    newest = _install_module().newest_cpu_version
    assert newest("torch (2.9.1+cpu)\nAvailable versions: 2.9.1+cpu, 2.9.0+cpu, 2.8.0+cpu\n") == "2.9.1+cpu"
    # a pip that also sees a CUDA build (another index or a local folder) still gets the CPU one
    assert newest("torch (2.14.1)\nAvailable versions: 2.14.1, 2.13.0+cpu\n") == "2.13.0+cpu"
    assert newest("torch (2.14.1)\nAvailable versions: 2.14.1\n") is None
    assert newest("ERROR: No matching distribution found for torch") is None


def test_install_dry_run_keeps_an_installed_torch():
    done = subprocess.run([sys.executable, "install.py", "--dry-run", "test"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "[install.py] torch is installed: kept"
    assert lines[1:] == [f"[install.py] {sys.executable} -m pip install -e .[test]"]
    bad = subprocess.run([sys.executable, "install.py", "--dry-run", "te st"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "extras must be" in bad.stderr


# ---------------------------------------------------------------- the snippets


B, L, V = 4, 6, 32


def _inputs(seed: int = 0) -> dict:
    """What the snippets take as given: a batch of B responses of L tokens over V ids."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, L, V, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, V, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g) < 0.8
    mask[:, 0] = True
    entropy = hapo_ops.token_entropy(logits.detach())
    stats = hapo_ops.entropy_stats(entropy, mask)
    temperature = hapo_ops.adaptive_temperature(entropy, stats, tau=0.05)
    old_logp = hapo_ops.token_logprobs(logits.detach(), labels, temperature=temperature)
    return dict(
        torch=torch, hapo_ops=hapo_ops, logits=logits, labels=labels, tokens=labels,
        response_ids=labels, response_mask=mask, mask=mask, T=temperature,
        temperature=temperature, old_logits=logits.detach() + 0.01, old_logp=old_logp,
        rollout_logp=old_logp + 0.05 * torch.randn(B, L, generator=g), entropy=entropy,
        logp=hapo_ops.token_logprobs(logits, labels, temperature=temperature), stats=stats,
        rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]), group_ids=torch.tensor([0, 0, 1, 1]),
        adv=torch.randn(B, L, generator=g), step=3, step_seed=11, dp=None)


def test_training_step_snippet_runs_and_gives_the_next_rollouts_statistics():
    ns = _inputs()
    exec(_block("out.loss.backward()"), ns)
    assert torch.isfinite(ns["out"].loss) and ns["logits"].grad is not None
    assert torch.isfinite(ns["logits"].grad).all() and ns["logits"].grad.abs().sum() > 0
    assert isinstance(ns["stats"], hapo_ops.EntropyStats)
    assert set(ns["metrics"]) == {"clip_low", "clip_high", "kl"}


def test_sampling_snippet_runs():
    ns = _inputs()
    ns["logits"] = ns["logits"].detach()[:, 0]            # (B, V): the next token of each row
    exec(_block("adaptive_temperature_sample(logits, stats"), ns)
    out = ns["out"]
    assert out.tokens.shape == (B,) and torch.isfinite(out.logprobs).all()
    assert ((out.temperature >= 0.95 - 1e-6) & (out.temperature <= 1.05 + 1e-6)).all()


def test_importance_ratio_and_vllm_trainer_side_snippets_run():
    ns = _inputs()
    exec(_block("old_logp = hapo_ops.token_logprobs(old_logits, response_ids, temperature=temperature)"), ns)
    assert ns["old_logp"].shape == (B, L) and ns["logp"].shape == (B, L)
    ns = _inputs()
    exec(_block("T = hapo_ops.adaptive_temperature(hapo_ops.token_entropy(logits), stats, tau=0.05)"), ns)
    assert ns["T"].shape == (B, L) and ns["old_logp"].shape == (B, L)


def test_sampling_replay_snippet_runs():
    ns = _inputs()
    ns["tokens"] = ns["logits"].detach().argmax(-1)  # sampled tokens are in every kept set
    kept = torch.randint(0, V, (B, L, 5), generator=torch.Generator().manual_seed(1))
    kept[..., 0] = ns["tokens"]
    kept[..., -1] = -1
    ns["kept_ids"] = kept
    exec(_block("kept_ids=kept_ids"), ns)
    assert torch.isfinite(ns["logp"]).all() and torch.isfinite(ns["entropy"]).all()


def test_companion_ops_snippet_runs():
    ns = _inputs()
    exec(_block("entropy_quantile_mask(entropy, mask, top_fraction=0.2"), ns)
    assert torch.isfinite(ns["out"].loss)


def test_token_mean_snippet_runs_with_a_data_parallel_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, not yet initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        ns = _inputs()
        logits, labels, temperature = ns["logits"], ns["labels"], ns["T"]
        ns.update(dist=dist, dp=dist.group.WORLD, step_stats=ns["stats"], micro_batches=[
            SimpleNamespace(logp=hapo_ops.token_logprobs(logits[rows], labels[rows],
                                                         temperature=temperature[rows]),
                            old_logp=ns["old_logp"][rows],
                            adv=ns["adv"][rows], entropy=ns["entropy"][rows], mask=ns["mask"][rows])
            for rows in (slice(0, 1), slice(1, 4))])
        exec(_block("global_token_count"), ns)
        assert ns["num_tokens"] == ns["mask"].sum() and ns["logits"].grad is not None
    finally:
        dist.destroy_process_group()


def _example_regions(name: str) -> list[str]:
    text = _read("examples", name)
    regions = re.findall(r"^( *)# --- as in the README[^\n]*\n(.*?)^\1# --- end ---", text,
                         flags=re.M | re.S)
    assert regions, f"examples/{name} marks no README part"
    return [textwrap.dedent(body) for _, body in regions]


@pytest.mark.parametrize("name", ["hf_generate.py", "vllm_generate.py"])
def test_framework_snippets_are_verbatim_parts_of_the_examples(name):
    """The README's transformers and vLLM snippets are parts of examples that
    tests/test_examples.py runs: each marked part of the example is a README block."""
    blocks = [textwrap.dedent(b) for b in _blocks("python")]
    for region in _example_regions(name):
        assert any(region.strip() == b.strip() for b in blocks), \
            f"examples/{name}: this part is not a README python block:\n{region}"


def test_readme_names_every_example_and_every_named_example_exists():
    names = set(re.findall(r"examples/([a-z_]+\.py)", README))
    shipped = {f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py")}
    assert shipped - {"tiny_model.py"} <= names
    assert names <= shipped, names - shipped


# ---------------------------------------------------------------- help(hapo_ops)


def test_package_quick_start_runs_through_the_statistics_for_the_next_rollout():
    doc = hapo_ops.__doc__
    code = textwrap.dedent(re.search(r"Quick start::\n\n(.*?)\n\n", doc, flags=re.S).group(1))
    assert "entropy_stats" in code
    ns = _inputs()
    exec(code, ns)
    assert ns["logits"].grad is not None and torch.isfinite(ns["out"].loss)
    assert isinstance(ns["stats"], hapo_ops.EntropyStats)
    torch.testing.assert_close(ns["stats"].pivot, hapo_ops.entropy_stats(ns["H"].detach(), ns["mask"]).pivot)
