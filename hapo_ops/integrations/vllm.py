"""HAPO adaptive temperature inside vLLM: a logits processor and its per-request arguments.

Source: HAPO, arXiv 2509.16591, §3.1. Every sampled token is drawn from softmax(z/T_t) with
T_t = T_base·(1 + τ·ĥ_t), ĥ_t from the entropy of the raw (T = 1) next-token distribution
and the ``EntropyStats`` of the previous training batch. In vLLM a logits processor divides
each row by its T_t; with ``logprobs_mode="processed_logprobs"`` vLLM then returns the
log-prob of every sampled token under softmax(z/T_t), which is exactly the behaviour
log-prob the trainer needs::

    from vllm import LLM, SamplingParams
    from hapo_ops.integrations.vllm import sampling_extra_args

    llm = LLM(model, logprobs_mode="processed_logprobs",
              logits_processors=["hapo_ops.integrations.vllm:AdaptiveTemperatureLogitsProcessor"])
    params = SamplingParams(temperature=1.0, logprobs=0,
                            extra_args=sampling_extra_args(stats, tau=0.05, base_temperature=1.0))

Requests without a ``"hapo"`` entry in ``extra_args`` (and greedy ones) are left untouched.
The engine's own ``temperature`` must be 1 (the processor applies T_base) and ``min_p`` 0.

vLLM does not return T_t; the trainer recomputes it from its own logits with the same
statistics, ``adaptive_temperature(token_entropy(logits), stats, ...)``, and scores the old
and current log-probs at it.

:func:`sampling_extra_args` and :func:`parse_sampling_args` need no vLLM (a rollout driver
may run where vLLM is not installed); the processor classes do.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import torch

from hapo_ops._utils.validation import VARIANTS
from hapo_ops.entropy.signal import EntropyStats

#: The key of ``SamplingParams.extra_args`` (or ``vllm_xargs``) that carries HAPO's arguments.
EXTRA_ARGS_KEY = "hapo"

_STATS_FIELDS = ("pivot", "log_max", "log_min")
_SETTING_FIELDS = ("tau", "base_temperature", "variant", "eps")


class SamplingArgs(NamedTuple):
    """HAPO's per-request sampling arguments, as parsed from ``extra_args["hapo"]``.

    pivot / log_max / log_min: the ``EntropyStats`` as floats, or all three None (no
    statistics yet: T = T_base). tau, base_temperature, variant, eps: as in
    :func:`hapo_ops.adaptive_temperature`.
    """

    pivot: float | None
    log_max: float | None
    log_min: float | None
    tau: float
    base_temperature: float
    variant: str
    eps: float

    def stats(self) -> EntropyStats | None:
        """The statistics as an ``EntropyStats`` of 0-d float32 tensors (None without them)."""
        if self.pivot is None:
            return None
        return EntropyStats(*(torch.tensor(v, dtype=torch.float32)
                              for v in (self.pivot, self.log_max, self.log_min)))


def sampling_extra_args(stats: EntropyStats | None, *, tau: float = 0.05,
                        base_temperature: float = 1.0, variant: str = "paper",
                        eps: float = 1e-8) -> dict[str, dict[str, float | str]]:
    """``{"hapo": {...}}``: the ``extra_args`` entry that turns on adaptive temperature.

    Merge it into ``SamplingParams.extra_args`` (or send it as ``vllm_xargs`` over the
    OpenAI-compatible API); every value is a plain float or str, so the dict is JSON-safe.
    The processor then samples the request's tokens at T = T_base·(1 + τ·ĥ) (HAPO, arXiv
    2509.16591, §3.1), ĥ = ``normalized_entropy(H, stats, variant=variant, eps=eps)``.

    Args:
      stats: ``EntropyStats`` of the previous training batch (0-d tensors or floats), or
        None (the first step: T = T_base everywhere). Statistics of a batch without valid
        tokens (pivot 0, log_max +inf, log_min -inf) make ĥ = 0 everywhere and are sent as
        no statistics.
      tau: temperature strength τ, |τ| < 1.
      base_temperature: T_base > 0 (the engine's own temperature stays 1).
      variant: "paper" or "released" (see ``normalized_entropy``).
      eps: the floor of H inside ln(max(H, eps)) and of the denominators; use the ``eps``
        the statistics were computed with.

    Returns:
      ``{"hapo": {"tau", "base_temperature", "variant", "eps"[, "pivot", "log_max",
      "log_min"]}}``; the statistics keys are absent when there are none.

    Examples:
      >>> stats = hapo_ops.entropy_stats(entropy, mask)            # last training batch
      >>> params = SamplingParams(temperature=1.0, logprobs=0,
      ...                         extra_args=sampling_extra_args(stats, tau=0.05))
    """
    entry: dict[str, float | str] = {"tau": tau, "base_temperature": base_temperature,
                                     "variant": variant, "eps": eps}
    if stats is not None:
        if not isinstance(stats, tuple) or len(stats) != 3:
            raise TypeError(f"stats must be an EntropyStats or None, got {type(stats).__name__}")
        values = [_plain_float(f"stats.{name}", value) for name, value in zip(_STATS_FIELDS, stats)]
        pivot, log_max, log_min = values
        if any(math.isnan(v) for v in values):
            raise ValueError(f"stats must not be NaN, got {tuple(values)}")
        if not (pivot == 0.0 and log_max == math.inf and log_min == -math.inf):
            entry.update(zip(_STATS_FIELDS, values))
    parse_sampling_args({EXTRA_ARGS_KEY: entry})  # the same checks the engine applies
    return {EXTRA_ARGS_KEY: entry}


def parse_sampling_args(extra_args: Mapping[str, Any] | None) -> SamplingArgs | None:
    """The HAPO arguments of a request's ``extra_args``, checked; None if it carries none.

    Raises ``ValueError`` / ``TypeError`` naming the offending field (``extra_args["hapo"]``
    and its keys) for: a non-dict entry, unknown or missing keys, non-numeric or non-finite
    values, statistics that are partly given or out of order (log_min ≤ pivot ≤ log_max),
    |tau| ≥ 1, base_temperature ≤ 0, an unknown variant, eps ≤ 0.
    """
    if extra_args is None or EXTRA_ARGS_KEY not in extra_args:
        return None
    name = f'extra_args["{EXTRA_ARGS_KEY}"]'
    entry = extra_args[EXTRA_ARGS_KEY]
    if not isinstance(entry, Mapping):
        raise TypeError(f"{name} must be a dict (use hapo_ops.integrations.vllm."
                        f"sampling_extra_args), got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_STATS_FIELDS) - set(_SETTING_FIELDS), key=str)
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown}; expected "
                         f"{list(_SETTING_FIELDS + _STATS_FIELDS)}")
    missing = [key for key in _SETTING_FIELDS if key not in entry]
    if missing:
        raise ValueError(f"{name} is missing keys {missing}")
    given = [key for key in _STATS_FIELDS if key in entry]
    if given and len(given) != len(_STATS_FIELDS):
        raise ValueError(f"{name} must have all of {list(_STATS_FIELDS)} or none of them, "
                         f"got only {given}")

    def number(key: str) -> float:
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f'{name}["{key}"] must be a float, got {type(value).__name__}')
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f'{name}["{key}"] must be finite, got {value}')
        return value

    tau = number("tau")
    if not -1.0 < tau < 1.0:
        raise ValueError(f'{name}["tau"] must be in (-1, 1) so that T > 0, got {tau}')
    base_temperature = number("base_temperature")
    if base_temperature <= 0.0:
        raise ValueError(f'{name}["base_temperature"] must be > 0, got {base_temperature}')
    variant = entry["variant"]
    if variant not in VARIANTS:
        raise ValueError(f'{name}["variant"] must be one of {VARIANTS}, got {variant!r}')
    eps = number("eps")
    if eps <= 0.0:
        raise ValueError(f'{name}["eps"] must be > 0, got {eps}')
    pivot = log_max = log_min = None
    if given:
        pivot, log_max, log_min = (number(key) for key in _STATS_FIELDS)
        if not log_min <= pivot <= log_max:
            raise ValueError(f"{name} statistics must satisfy log_min <= pivot <= log_max, got "
                             f"log_min={log_min}, pivot={pivot}, log_max={log_max}")
    return SamplingArgs(pivot, log_max, log_min, tau, base_temperature, variant, eps)


def _plain_float(name: str, value: object) -> float:
    """A Python float from a float, int or one-element tensor (one host read per value)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise TypeError(f"{name} must be a one-element floating-point tensor or a float, "
                            f"got {value.dtype} of shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")
    return float(value)


__all__ = ["EXTRA_ARGS_KEY", "SamplingArgs", "parse_sampling_args", "sampling_extra_args"]
