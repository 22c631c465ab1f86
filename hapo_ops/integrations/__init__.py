"""Integrations of hapo-ops with generation engines (optional dependencies).

``hapo_ops.integrations.transformers``: ``AdaptiveTemperatureLogitsProcessor`` for
``model.generate`` (needs ``pip install hapo-ops[transformers]``).
``hapo_ops.integrations.vllm``: the same rule as vLLM logits processors, and
``sampling_extra_args`` for the per-request statistics (importable without vLLM; the
processors need ``pip install hapo-ops[vllm]``). Each submodule imports its engine on import,
so this package itself needs none of them.
"""
