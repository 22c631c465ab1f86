"""Integrations of hapo-ops with generation engines (optional dependencies).

``hapo_ops.integrations.transformers``: ``AdaptiveTemperatureLogitsProcessor`` for
``model.generate`` (needs ``pip install hapo-ops[transformers]``). Each submodule imports its
engine on import, so this package itself needs none of them.
"""
