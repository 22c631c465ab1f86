"""vLLM adaptive-temperature processor: its cost, and the engine-vs-trainer mismatch of T_t.

Run in an environment with vLLM (``.venv-vllm``, see .ci/vllm.sh):
``python -m benchmarks.vllm_processor [--out DIR] [--quick]``. Markdown to stdout,
``vllm_processor.json`` under ``--out``.

Rows
  processor alone   AdaptiveTemperatureLogitsProcessor.apply on B = 256 rows of V = 151936
                    fp32 logits (every row with HAPO arguments), against one read of the
                    same logits (``logits.amax(-1)``) and the exact entropy alone
                    (``token_entropy``): the processor reads the logits twice (entropy,
                    then the in-place division) and writes them once.
  decode step       a tiny random Llama in vllm.LLM with the processor registered, one run:
                    the same batch of requests with HAPO arguments (processor active) and
                    without (registered but idle), alternating; time per generated step.
  T_t mismatch      the same model in fp32 and bf16 engines: T_t the engine used (from its
                    own logits, read back as full-vocabulary prompt log-probs) against T_t
                    the fp32 trainer recomputes, and vLLM's behaviour log-prob against the
                    trainer's log-prob at its T_t.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _key, _value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                     "VLLM_CPU_CI_ENV": "1"}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

import hapo_ops  # noqa: E402
from hapo_ops.integrations.vllm import (AdaptiveTemperatureLogitsProcessor,  # noqa: E402
                                        sampling_extra_args)

VOCAB = 151936
TINY_VOCAB = 256
PROCESSOR = "hapo_ops.integrations.vllm:AdaptiveTemperatureLogitsProcessor"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def processor_alone(rows: int, reps: int) -> dict:
    from vllm.config import SchedulerConfig, VllmConfig
    from vllm.v1.sample.logits_processor import BatchUpdateBuilder
    from vllm import SamplingParams

    config = VllmConfig(scheduler_config=SchedulerConfig(
        max_num_seqs=rows, max_num_batched_tokens=max(rows, 64), max_model_len=64,
        is_encoder_decoder=False))
    processor = AdaptiveTemperatureLogitsProcessor(config, torch.device("cpu"), False)
    stats = hapo_ops.EntropyStats(*torch.tensor([0.0, 1.4, -9.0]))
    params = SamplingParams(temperature=1.0, extra_args=sampling_extra_args(stats, tau=0.05))
    builder = BatchUpdateBuilder()
    builder.added.extend((i, params, None, []) for i in range(rows))
    processor.update_state(builder.get_and_reset(rows))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, VOCAB, generator=g) * 4
    read_ms = median_ms(lambda: logits.amax(-1), reps)
    entropy_ms = median_ms(lambda: hapo_ops.token_entropy(logits), reps)
    apply_ms = median_ms(lambda: processor.apply(logits), reps)
    return {"rows": rows, "vocab": VOCAB, "one_read_ms": read_ms, "entropy_ms": entropy_ms,
            "apply_ms": apply_ms, "apply_over_read": apply_ms / read_ms}


def tiny_llama(path: str):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # entropies from ~0.03 to ~2.5 nats
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(path)
    return model


def model_stats(model) -> hapo_ops.EntropyStats:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, TINY_VOCAB, (4, 32), generator=g)
    with torch.no_grad():
        entropy = hapo_ops.token_entropy(model(ids).logits.float())
    return hapo_ops.entropy_stats(entropy, torch.ones_like(entropy, dtype=torch.bool))


def engine(path: str, dtype: str, **kwargs):
    from vllm import LLM

    return LLM(model=path, dtype=dtype, enforce_eager=True, max_model_len=256,
               skip_tokenizer_init=True, logits_processors=[PROCESSOR],
               logprobs_mode="processed_logprobs", seed=0, **kwargs)


def release(llm) -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def decode_step(path: str, stats, batch: int, tokens: int, repeats: int) -> dict:
    from vllm import SamplingParams

    llm = engine(path, "float32", max_num_seqs=batch)
    prompts = [{"prompt_token_ids": [1 + i, 7, 3 + i]} for i in range(batch)]

    def run(extra) -> float:
        params = SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=0,
                                extra_args=extra)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return (time.perf_counter() - start) * 1e3 / tokens

    run(None)  # warm-up
    on, off = [], []
    for _ in range(repeats):
        on.append(run(sampling_extra_args(stats, tau=0.05)))
        off.append(run(None))
    release(llm)
    on_ms, off_ms = statistics.median(on), statistics.median(off)
    return {"batch": batch, "vocab": TINY_VOCAB, "step_ms_with": on_ms, "step_ms_without": off_ms,
            "overhead": on_ms / off_ms - 1.0}


def mismatch(path: str, model, stats, dtype: str, requests: int, tokens: int) -> dict:
    """T_t from the engine's own logits vs the fp32 trainer's, and the behaviour log-prob gap."""
    from vllm import SamplingParams

    llm = engine(path, dtype, max_num_seqs=requests, max_logprobs=TINY_VOCAB)
    extra = sampling_extra_args(stats, tau=0.05)
    prompts = [{"prompt_token_ids": [1 + i, 9, 4 + i, 2]} for i in range(requests)]
    outputs = llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=tokens, logprobs=0,
                                                   ignore_eos=True, seed=1, extra_args=extra),
                           use_tqdm=False)
    sequences = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outputs]
    # the engine's raw logits, as full-vocabulary prompt log-probs of the whole sequence
    scored = llm.generate([{"prompt_token_ids": s} for s in sequences],
                          SamplingParams(max_tokens=1, prompt_logprobs=TINY_VOCAB, temperature=1.0),
                          use_tqdm=False)
    release(llm)
    dt, gaps, gaps_t1 = [], [], []
    for output, sequence, score in zip(outputs, sequences, scored):
        completion = output.outputs[0]
        start = len(output.prompt_token_ids)
        engine_logp = torch.tensor([[step[v].logprob for v in range(TINY_VOCAB)]
                                    for step in score.prompt_logprobs[start:]])
        with torch.no_grad():
            logits = model(torch.tensor([sequence])).logits[0, start - 1:-1].float()
        t_trainer = hapo_ops.adaptive_temperature(hapo_ops.token_entropy(logits), stats, tau=0.05)
        t_engine = hapo_ops.adaptive_temperature(hapo_ops.token_entropy(engine_logp), stats, tau=0.05)
        dt.append(((t_engine - t_trainer).abs() / t_trainer))
        behaviour = torch.tensor([s[t].logprob for s, t in zip(completion.logprobs, completion.token_ids)])
        labels = torch.tensor(completion.token_ids)
        gaps.append((behaviour - hapo_ops.token_logprobs(logits, labels, temperature=t_trainer)).abs())
        gaps_t1.append((behaviour - hapo_ops.token_logprobs(logits, labels)).abs())
    dt, gaps, gaps_t1 = torch.cat(dt), torch.cat(gaps), torch.cat(gaps_t1)
    return {"engine_dtype": dtype, "tokens": int(dt.numel()),
            "rel_dT_max": dt.max().item(), "rel_dT_mean": dt.mean().item(),
            "logp_gap_max": gaps.max().item(), "logp_gap_mean": gaps.mean().item(),
            "logp_gap_if_T1_assumed_mean": gaps_t1.mean().item()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vllm_processor")
    parser.add_argument("--out", metavar="DIR")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    import vllm

    results: dict = {"vllm": vllm.__version__, "torch": torch.__version__,
                     "device": "cpu", "threads": torch.get_num_threads()}
    log("processor alone ...")
    results["processor_alone"] = processor_alone(256, 3 if args.quick else 7)
    with tempfile.TemporaryDirectory() as path:
        model = tiny_llama(path)
        stats = model_stats(model)
        log("decode step ...")
        results["decode_step"] = decode_step(path, stats, batch=8, tokens=32 if args.quick else 64,
                                             repeats=2 if args.quick else 4)
        results["mismatch"] = []
        for dtype in ("float32", "bfloat16"):
            log(f"T_t mismatch, {dtype} engine ...")
            results["mismatch"].append(mismatch(path, model, stats, dtype, requests=8,
                                                tokens=16 if args.quick else 32))
    p, d = results["processor_alone"], results["decode_step"]
    lines = [
        f"vLLM {results['vllm']}, torch {results['torch']}, CPU, {results['threads']} threads",
        "",
        "| row | measured | ratio |",
        "|---|---|---|",
        f"| processor alone, B={p['rows']}, V={p['vocab']} fp32 | apply {p['apply_ms']:.1f} ms; "
        f"one read {p['one_read_ms']:.1f} ms; entropy alone {p['entropy_ms']:.1f} ms | "
        f"apply / one read = {p['apply_over_read']:.2f} |",
        f"| decode step, tiny Llama, B={d['batch']}, V={d['vocab']} | with {d['step_ms_with']:.2f} ms; "
        f"without {d['step_ms_without']:.2f} ms | overhead {100 * d['overhead']:+.1f}% |",
        "",
        "| engine | tokens | max / mean rel. error of T_t | max / mean behaviour log-prob gap "
        "at the trainer's T_t | mean gap if T = 1 were assumed |",
        "|---|---|---|---|---|",
    ]
    for m in results["mismatch"]:
        lines.append(f"| {m['engine_dtype']} | {m['tokens']} | {m['rel_dT_max']:.2e} / "
                     f"{m['rel_dT_mean']:.2e} | {m['logp_gap_max']:.2e} / {m['logp_gap_mean']:.2e} | "
                     f"{m['logp_gap_if_T1_assumed_mean']:.2e} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "vllm_processor.json").write_text(json.dumps(results, indent=1))
        (Path(args.out) / "vllm_processor.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
