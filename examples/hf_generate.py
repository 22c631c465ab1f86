"""HAPO's adaptive temperature inside Hugging Face ``model.generate``, then the trainer side.

Each generated token is sampled at T_t = T_base·(1 + τ·ĥ_t), ĥ_t from the entropy of its
raw next-token distribution and the statistics of the last training batch; the processor
records T_t, and the trainer scores the old log-probs at it (the behaviour policy), never at
T_base. Runs on a CPU in seconds with a tiny random model built offline (tiny_model.py):

    python examples/hf_generate.py

Needs: hapo-ops and transformers (``pip install -e ".[transformers]"``).
"""

import torch

import hapo_ops
from tiny_model import char_tokenizer, last_batch_stats, tiny_llama

tokenizer = char_tokenizer()
model = tiny_llama(tokenizer)
# The statistics of the last training batch's entropies (None before the first step: T_base).
stats = last_batch_stats(model, tokenizer, ["abcabcab", "hhgfedcb", "a b c d ", "cafebabe"])
inputs = tokenizer(["ab", "ba", "hh", "ca"], return_tensors="pt")
prompt_length = inputs["input_ids"].shape[1]
torch.manual_seed(0)

# --- as in the README (Adaptive temperature sampling, "In a rollout engine") ---
from transformers import LogitsProcessorList
from hapo_ops.integrations.transformers import AdaptiveTemperatureLogitsProcessor

proc = AdaptiveTemperatureLogitsProcessor(stats, tau=0.05, base_temperature=1.0)
out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                     max_new_tokens=16, logits_processor=LogitsProcessorList([proc]))
temperature = proc.temperatures        # (B, new tokens); proc.reset() before the next call
# --- end ---

response_ids = out[:, prompt_length:]
# the response's tokens up to and including its first <eos> (generate pads after it)
ended = (response_ids == tokenizer.eos_token_id).int().cumsum(dim=1)
response_mask = (ended == 0) | ((ended == 1) & (response_ids == tokenizer.eos_token_id))

# The trainer side: one forward over prompt + response; position t scores response token t.
with torch.no_grad():
    old_logits = model(out).logits[:, prompt_length - 1:-1].float()
old_logp = hapo_ops.token_logprobs(old_logits, response_ids, temperature=temperature)
# T_t is a function of the logits and the statistics: the trainer can recompute it (as the
# vLLM and TRL integrations do, since vLLM does not return it).
recomputed = hapo_ops.adaptive_temperature(hapo_ops.token_entropy(old_logits), stats, tau=0.05)

t = temperature[response_mask]
print("completions:", tokenizer.batch_decode(response_ids, skip_special_tokens=True))
print(f"per-token temperatures: min {t.min():.4f} max {t.max():.4f} over {t.numel()} tokens")
print(f"trainer's recomputed T_t vs recorded: max |diff| = "
      f"{(recomputed - temperature)[response_mask].abs().max():.2e}")
print(f"old log-probs at the recorded temperatures: mean {old_logp[response_mask].mean():.4f}")
