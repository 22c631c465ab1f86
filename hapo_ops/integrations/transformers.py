"""HAPO adaptive temperature inside Hugging Face ``model.generate``.

Source: HAPO, arXiv 2509.16591, §3.1. At every decoding step each row's scores are divided by
T_row = T_base·(1 + τ·ĥ_row), ĥ from the entropy of that row's scores (the raw next-token
distribution) and the ``EntropyStats`` of the previous training batch::

    proc = AdaptiveTemperatureLogitsProcessor(stats, tau=0.05)
    out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         logits_processor=LogitsProcessorList([proc]))
    T = proc.temperatures            # (batch, new tokens): each sampled token's temperature

Custom processors run before generate's own warpers, so ``temperature``, ``top_k`` and
``top_p`` of ``generate`` apply on top (keep temperature=1.0 and use ``base_temperature``;
leave top-k/top-p off for an untruncated behaviour policy). The trainer recomputes the
behaviour log-probs with ``token_logprobs(logits, tokens, temperature=T)``.
"""

from __future__ import annotations

import torch

try:
    from transformers import LogitsProcessor
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("hapo_ops.integrations.transformers needs transformers: "
                      "python install.py transformers (or pip install -e '.[transformers]') "
                      "in a clone") from exc

from hapo_ops._utils.validation import check_float, check_tau, check_variant
from hapo_ops.entropy.signal import EntropyStats
from hapo_ops.entropy.temperature import adaptive_temperature
from hapo_ops.vocab.logprob_entropy import token_entropy


class AdaptiveTemperatureLogitsProcessor(LogitsProcessor):
    """scores / T_row with T_row = ``adaptive_temperature(token_entropy(scores), stats, ...)``.

    Args:
      stats: ``EntropyStats`` of the previous training batch, or None (T = T_base).
      tau, base_temperature, variant: as in :func:`hapo_ops.adaptive_temperature`
        (|τ| < 1; τ < 0 inverts the adaptation: high-entropy rows sample cooler).
      record: keep each step's (B,) temperatures; ``temperatures`` stacks them to
        (B, steps), ``reset()`` clears them (call it between ``generate`` calls).
      impl: implementation of the entropy (``token_entropy``'s ``impl``).

    The entropy is that of the scores this processor receives: the raw logits, unless
    processors that change them (repetition penalty, …) come before it in the list.
    """

    def __init__(self, stats: EntropyStats | None, tau: float = 0.05,
                 base_temperature: float = 1.0, variant: str = "paper", *,
                 record: bool = True, impl: str = "auto") -> None:
        if stats is not None and (not isinstance(stats, tuple) or len(stats) != 3):
            raise TypeError(f"stats must be an EntropyStats or None, got {type(stats).__name__}")
        self.stats = None if stats is None else EntropyStats(*stats)
        self.tau = check_tau("tau", tau)
        self.base_temperature = check_float("base_temperature", base_temperature,
                                            min_value=0.0, min_inclusive=False)
        self.variant = check_variant(variant)
        self.record = bool(record)
        self.impl = impl
        self._steps: list[torch.Tensor] = []

    def row_temperatures(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) float32 temperatures of a (B, V) step of scores."""
        entropy = token_entropy(scores.detach(), impl=self.impl)
        return adaptive_temperature(entropy, self.stats, base_temperature=self.base_temperature,
                                    tau=self.tau, variant=self.variant)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        temperature = self.row_temperatures(scores)
        if self.record:
            self._steps.append(temperature)
        return scores / temperature.to(scores.dtype)[:, None]

    @property
    def temperatures(self) -> torch.Tensor:
        """(B, steps) float32 temperature of every processed step (empty (0, 0) if none)."""
        if not self._steps:
            return torch.empty(0, 0)
        return torch.stack(self._steps, dim=1)

    def reset(self) -> None:
        """Forget the recorded temperatures."""
        self._steps.clear()


__all__ = ["AdaptiveTemperatureLogitsProcessor"]
