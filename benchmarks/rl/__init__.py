"""RL benchmark: train a small policy from scratch on CPU with GRPO, DAPO, HAPO and HAPO's
ablations, through the public ``hapo_ops`` API (``python -m benchmarks --only rl``).

Modules: ``task`` (digit sorting, binary reward), ``policy`` (a GRU), ``methods`` (the
recipes), ``loop`` (rollout and PPO training), ``report`` (statistics, Markdown, JSON,
plots), ``runner`` (seeds and processes).
"""

from benchmarks.rl.runner import run

__all__ = ["run"]
