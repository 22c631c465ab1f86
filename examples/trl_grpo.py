"""HAPO in TRL: ``HAPOGRPOTrainer`` trains for two steps, sampling with ``model.generate``.

``HAPOGRPOConfig`` is TRL's ``GRPOConfig`` plus the ``hapo_*`` fields (README, "TRL"): every
token is sampled at its adaptive temperature, the advantages are token-level group averages,
and the loss is HAPO's (adaptive clipping, advantage redistribution, dual clip). Runs on a
CPU in under a minute with a tiny random model built offline (tiny_model.py):

    python examples/trl_grpo.py

Needs: hapo-ops and TRL 1.16 (``pip install -e ".[trl]"``), in an environment without verl.
"""

import tempfile

from datasets import Dataset

from hapo_ops.integrations.trl import HAPOGRPOConfig, HAPOGRPOTrainer
from tiny_model import char_tokenizer, count_a, tiny_llama

tokenizer = char_tokenizer()
model = tiny_llama(tokenizer)  # or AutoModelForCausalLM.from_pretrained(...) with its tokenizer
data = Dataset.from_dict({"prompt": ["ab", "ba c", "hh", "cafe"] * 4})

args = HAPOGRPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, report_to="none",
                      per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=2, learning_rate=1e-3, logging_steps=1,
                      save_strategy="no", seed=0, disable_tqdm=True,
                      temperature=1.0, top_k=0, top_p=1.0,  # no truncation: T_base = 1
                      hapo_tau=0.3)  # a large τ, so that the temperature spread shows
trainer = HAPOGRPOTrainer(model=model, reward_funcs=count_a, args=args, train_dataset=data,
                          processing_class=tokenizer)
trainer.train()

for entry in trainer.state.log_history:
    if "loss" in entry:
        hapo = {k: round(v, 4) for k, v in entry.items() if k.startswith("hapo/")}
        print(f"step {entry['step']}: loss {entry['loss']:.4f} reward {entry['reward']:.3f} {hapo}")
