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
    params = SamplingParams(temperature=1.0, logprobs=0, max_tokens=16,
                            extra_args=sampling_extra_args(stats, tau=0.05, base_temperature=1.0))
    outputs = llm.generate(prompts, params)

(``examples/vllm_generate.py`` runs this end to end on a CPU with a tiny model.) Requests
without a ``"hapo"`` entry in ``extra_args`` (and greedy ones) are left untouched. The
engine's own ``temperature`` must be 1 (the processor applies T_base) and ``min_p`` 0.

vLLM does not return T_t; the trainer recomputes it from its own logits with the same
statistics, ``adaptive_temperature(token_entropy(logits), stats, ...)``, and scores the old
and current log-probs at it.

:func:`sampling_extra_args` and :func:`parse_sampling_args` need no vLLM (a rollout driver
may run where vLLM is not installed); the processor classes do.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch

from hapo_ops._utils.validation import VARIANTS, check_tau
from hapo_ops.entropy.signal import (NO_ENTROPY_STATS, EntropyStats, check_entropy_stats,
                                     is_no_entropy_stats)
from hapo_ops.entropy.temperature import adaptive_temperature
from hapo_ops.vocab.logprob_entropy import token_entropy

# The processors subclass vLLM's interfaces when vLLM is installed; without it the module
# still imports (sampling_extra_args is all a rollout driver needs) and constructing a
# processor raises ImportError.
try:
    from vllm.sampling_params import SamplingParams, SamplingType
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
except ImportError:  # pragma: no cover - exercised only without vLLM
    SamplingParams = SamplingType = BatchUpdate = MoveDirectionality = None
    V1LogitsProcessor = object
try:  # model runner v2's interface (vLLM >= 0.30)
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as MRV2LogitsProcessor
except ImportError:  # pragma: no cover - older vLLM or none
    LogitsContext = None
    MRV2LogitsProcessor = object

VLLM_AVAILABLE = SamplingParams is not None

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
      stats: ``EntropyStats`` of the previous training batch (0-d tensors or floats), a
        plain tuple (pivot, log_max, log_min) of them (the rule of ``normalized_entropy``;
        a dict is refused), or None (the first step: T = T_base everywhere). Statistics of a batch without valid
        tokens (pivot 0, log_max +inf, log_min -inf) make ĥ = 0 everywhere and are sent as
        no statistics.
      tau: temperature strength τ, |τ| < 1 (T > 0); τ < 0 inverts the adaptation
        (high-entropy tokens sample cooler), as in ``adaptive_temperature``.
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
        check_entropy_stats("stats", stats)     # the rule of normalized_entropy
        values = [_plain_float(f"stats.{name}", value) for name, value in zip(_STATS_FIELDS, stats)]
        pivot, log_max, log_min = values
        if any(math.isnan(v) for v in values):
            raise ValueError(f"stats must not be NaN, got {tuple(values)}")
        if not is_no_entropy_stats(pivot, log_max, log_min):
            entry.update(zip(_STATS_FIELDS, values))
    parse_sampling_args({EXTRA_ARGS_KEY: entry})  # the same checks the engine applies
    return {EXTRA_ARGS_KEY: entry}


def parse_sampling_args(extra_args: Mapping[str, Any] | None) -> SamplingArgs | None:
    """The HAPO arguments of a request's ``extra_args``, checked; None if it carries none.

    The entry is the dict :func:`sampling_extra_args` makes, or that dict as a JSON string
    (:func:`sampling_vllm_xargs`). Raises ``ValueError`` / ``TypeError`` naming the offending field (``extra_args["hapo"]``
    and its keys) for: a non-dict entry, unknown or missing keys, non-numeric or non-finite
    values, statistics that are partly given or out of order (log_min ≤ pivot ≤ log_max),
    |tau| ≥ 1, base_temperature ≤ 0, an unknown variant, eps ≤ 0.
    """
    if extra_args is None or EXTRA_ARGS_KEY not in extra_args:
        return None
    name = f'extra_args["{EXTRA_ARGS_KEY}"]'
    entry = extra_args[EXTRA_ARGS_KEY]
    if isinstance(entry, str):  # the vllm_xargs form (see sampling_vllm_xargs)
        try:
            entry = json.loads(entry)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is a str but not valid JSON: {exc}") from None
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

    tau = check_tau(f'{name}["tau"]', number("tau"))
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


def sampling_vllm_xargs(stats: EntropyStats | None, *, tau: float = 0.05,
                        base_temperature: float = 1.0, variant: str = "paper",
                        eps: float = 1e-8) -> dict[str, str]:
    """``{"hapo": "<JSON>"}``: :func:`sampling_extra_args` for vLLM's OpenAI-compatible server.

    The server's ``vllm_xargs`` accepts only flat values (str, int, float or lists of them),
    so the entry travels as one JSON string, which the processor parses like the dict.
    Send it as ``"vllm_xargs": sampling_vllm_xargs(stats, ...)`` in a completion request
    (with the ``openai`` client: ``extra_body={"vllm_xargs": ...}``). Arguments as
    :func:`sampling_extra_args`.
    """
    entry = sampling_extra_args(stats, tau=tau, base_temperature=base_temperature,
                                variant=variant, eps=eps)[EXTRA_ARGS_KEY]
    return {EXTRA_ARGS_KEY: json.dumps(entry, allow_nan=False)}


def check_sampling_params(params: Any) -> SamplingArgs | None:
    """The request's HAPO arguments, or None if it has none; raises ``ValueError`` for a
    request the processors cannot serve exactly.

    Refused, with the field named: a malformed ``extra_args["hapo"]`` (see
    :func:`parse_sampling_args`); ``temperature`` other than 1 (the processor applies
    T_base; vLLM's own temperature would divide again; greedy requests, temperature 0,
    are allowed and left untouched); ``min_p > 0`` (vLLM computes min-p's threshold on the
    logits before the V1 processor divides them). Top-k / top-p stay allowed: they act on
    softmax(z/T_t) and truncate the behaviour distribution (replay it in the trainer with
    ``top_k=`` / ``top_p=``).
    """
    args = parse_sampling_args(getattr(params, "extra_args", None))
    if args is None or _is_greedy(params):
        return args
    if params.temperature != 1.0:
        raise ValueError(
            f"SamplingParams.temperature must be 1.0 for a request with "
            f'extra_args["{EXTRA_ARGS_KEY}"] (the processor applies base_temperature='
            f"{args.base_temperature}; put the temperature there), got {params.temperature}")
    if params.min_p > 0.0:
        raise ValueError(
            f"SamplingParams.min_p must be 0 for a request with extra_args[\"{EXTRA_ARGS_KEY}\"] "
            f"(vLLM computes min-p's threshold before the adaptive temperature), got {params.min_p}")
    return args


def _is_greedy(params: Any) -> bool:
    if SamplingType is not None:
        return params.sampling_type == SamplingType.GREEDY
    return params.temperature < 1e-5  # pragma: no cover - vLLM's _SAMPLING_EPS


class _TemperatureTable:
    """Per-slot HAPO state for a processor, and the one per-row rule both processors apply.

    Each slot (a request's place in vLLM's batch) holds one row of ``COLUMNS``: the
    request's statistics (pivot, log_max, log_min), its variant's index in ``VARIANTS``
    (-1 for a slot the processor leaves alone) and its tau, base_temperature and eps. A
    request without statistics gets pivot 0, log_max +inf, log_min -inf, for which
    ``normalized_entropy`` is 0 (T = T_base). The host copy is written per request
    (add/remove/move) and copied to the device once per batch change; ``temperatures``
    reads only device tensors.

    Bounded whatever the requests send: the state is this fixed (slots, 7) table, with no
    table of distinct settings (any number of distinct tau / base_temperature / eps values
    is served, each row with its own), and a batch costs one entropy pass over its logits
    plus at most one ``adaptive_temperature`` pass over (B,) values per variant present,
    so at most two.
    """

    COLUMNS = ("pivot", "log_max", "log_min", "variant", "tau", "base_temperature", "eps")
    # A slot left alone: no statistics, T = 1 (valid values, so that the per-row checks of
    # adaptive_temperature pass for every row of the batch).
    IDLE = (*NO_ENTROPY_STATS, -1.0, 0.0, 1.0, 1.0)

    def __init__(self, num_slots: int, device: torch.device, pin_memory: bool) -> None:
        self.host = torch.tensor([self.IDLE] * num_slots, dtype=torch.float32).reshape(
            num_slots, len(self.COLUMNS))
        self.view = self.host.numpy()
        on_cpu = torch.device(device).type == "cpu"
        self.device_table = self.host if on_cpu else torch.empty_like(self.host, device=device)
        # Uploads go through two pinned staging buffers in turn, so that a host write never
        # lands in a buffer whose previous asynchronous copy may still be pending (vLLM's
        # own per-request buffers use the same depth).
        self.staging = [] if on_cpu else [torch.empty_like(self.host, pin_memory=pin_memory)
                                          for _ in range(2)]

    def set(self, slot: int, args: SamplingArgs | None) -> bool:
        if args is None:
            self.view[slot] = self.IDLE
            return False
        stats = (NO_ENTROPY_STATS if args.pivot is None
                 else (args.pivot, args.log_max, args.log_min))
        self.view[slot] = (*stats, VARIANTS.index(args.variant), args.tau,
                           args.base_temperature, args.eps)
        return True

    def move(self, source: int, target: int, swap: bool) -> None:
        moved = self.view[source].copy()
        if swap:
            self.view[source] = self.view[target]
        else:
            self.view[source] = self.IDLE
        self.view[target] = moved

    def upload(self, rows: int | None = None) -> None:
        if self.staging:
            self.staging.reverse()
            staged = self.staging[0][:rows].copy_(self.host[:rows])
            self.device_table[:rows].copy_(staged, non_blocking=True)

    def variants_in(self, slots: np.ndarray | slice) -> np.ndarray:
        """The variant indices used by ``slots`` (host data only; empty: nothing to do)."""
        used = self.view[slots, 3]
        return np.unique(used[used >= 0]).astype(np.int64)

    def temperatures(self, logits: torch.Tensor, rows: torch.Tensor,
                     variants: np.ndarray) -> torch.Tensor:
        """(B,) float32 T_row: ``adaptive_temperature`` of each row's entropy with its
        request's statistics and settings; 1 for rows left alone. ``rows``: (B, 7) state."""
        entropy = token_entropy(logits)
        stats = EntropyStats(rows[:, 0], rows[:, 1], rows[:, 2])
        temperature = torch.ones_like(entropy)
        for index in variants.tolist():  # the variants in the batch (at most two)
            temperature = torch.where(
                rows[:, 3] == index,
                adaptive_temperature(entropy, stats, base_temperature=rows[:, 5],
                                     tau=rows[:, 4], variant=VARIANTS[index], eps=rows[:, 6]),
                temperature)
        return temperature


def _require_vllm(base: type, name: str) -> None:
    if base is object:
        raise ImportError(f"{name} needs vLLM's logits-processor interface: "
                          f"pip install -e '.[vllm]' in a clone (on a CPU: the README's vLLM on a CPU)")


class AdaptiveTemperatureLogitsProcessor(V1LogitsProcessor):
    """HAPO's adaptive temperature as a vLLM V1 logits processor (argmax-invariant).

    For each row of a request whose ``SamplingParams.extra_args`` carries a ``"hapo"``
    entry (:func:`sampling_extra_args`) and that samples (temperature 1):
    H = the entropy of the row as the engine holds it (−inf entries, grammar masks and
    vocabulary padding have probability 0), T_row = ``adaptive_temperature(H, stats, ...)``
    with the request's statistics and settings, logits divided by T_row. Other rows are
    untouched. The entropy is ``token_entropy`` (exact for near-deterministic rows; the
    Triton kernel on GPU), one pass over the batch's logits; the per-request state lives
    in a fixed (max_num_seqs, 7) table copied to the device when the batch changes; no
    host sync. Any number of distinct settings (tau, base_temperature, eps) costs the
    same: at most one pass over (B,) values per variant in the batch, never one per
    setting, and nothing grows with the settings the engine has seen.

    vLLM V1 runs argmax-invariant processors after its own temperature (which must be 1
    here, so it changes nothing) and min-p, before top-k/top-p, and skips them in
    all-greedy batches. Register with ``LLM(logits_processors=[
    "hapo_ops.integrations.vllm:AdaptiveTemperatureLogitsProcessor"])`` or
    ``vllm serve --logits-processors hapo_ops.integrations.vllm:AdaptiveTemperatureLogitsProcessor``.
    For vLLM's model runner v2 use :class:`AdaptiveTemperatureLogitsProcessorMRV2`.
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        _require_vllm(V1LogitsProcessor, "AdaptiveTemperatureLogitsProcessor")
        self.table = _TemperatureTable(vllm_config.scheduler_config.max_num_seqs, device,
                                       is_pin_memory)
        self.batch_size = 0
        self.active_variants = np.zeros(0, dtype=np.int64)

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        check_sampling_params(sampling_params)

    def is_argmax_invariant(self) -> bool:
        """Dividing a row by T_row > 0 keeps its argmax."""
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        table = self.table
        for slot in batch_update.removed:
            table.set(slot, None)
        for slot, params, _, _ in batch_update.added:
            args = check_sampling_params(params)
            table.set(slot, None if args is None or _is_greedy(params) else args)
        for source, target, direction in batch_update.moved:
            table.move(source, target, swap=direction == MoveDirectionality.SWAP)
        self.batch_size = batch_update.batch_size
        self.active_variants = table.variants_in(slice(0, self.batch_size))
        if self.active_variants.size:
            table.upload(self.batch_size)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.active_variants.size:
            return logits
        rows = self.table.device_table[:logits.shape[0]]
        temperature = self.table.temperatures(logits, rows, self.active_variants)
        return logits.div_(temperature.to(logits.dtype)[:, None])


class AdaptiveTemperatureLogitsProcessorMRV2(MRV2LogitsProcessor):
    """:class:`AdaptiveTemperatureLogitsProcessor`'s rule for vLLM's model runner v2.

    Model runner v2 (``vllm.v1.worker.gpu``, the default on CUDA from vLLM 0.33) has its own
    processor interface: per-slot state set in ``add_request``, flushed in
    ``apply_staged_writes``, and ``apply(logits, ctx)`` where a row maps to its request
    slot through ``ctx.expanded_idx_mapping``. Its custom processors run after penalties,
    bias, bad words and grammar masks and before temperature, min-p and top-k/top-p, so the
    entropy is that of the row after those, exactly as the trainer sees it when none are
    used. Register it the same way (``logits_processors=[
    "hapo_ops.integrations.vllm:AdaptiveTemperatureLogitsProcessorMRV2"]``); the V1 class is
    refused by model runner v2's loader and vice versa.
    """

    def __init__(self, vllm_config: Any, req_states: Any) -> None:
        _require_vllm(MRV2LogitsProcessor, "AdaptiveTemperatureLogitsProcessorMRV2")
        self.table = _TemperatureTable(req_states.max_num_reqs, req_states.device, True)
        self.changed = False

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        check_sampling_params(sampling_params)

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        args = check_sampling_params(sampling_params)
        self.changed = True
        return self.table.set(req_idx, None if args is None or _is_greedy(sampling_params)
                              else args)

    def apply_staged_writes(self) -> None:
        if self.changed:
            self.table.upload()
            self.changed = False

    def apply(self, logits: torch.Tensor, ctx: Any) -> torch.Tensor:
        variants = self.table.variants_in(ctx.idx_mapping_np)
        if not variants.size:
            return logits
        rows = self.table.device_table[ctx.expanded_idx_mapping]
        temperature = self.table.temperatures(logits, rows, variants)
        return logits.div_(temperature.to(logits.dtype)[:, None])


__all__ = ["AdaptiveTemperatureLogitsProcessor", "AdaptiveTemperatureLogitsProcessorMRV2",
           "EXTRA_ARGS_KEY", "SamplingArgs", "check_sampling_params", "parse_sampling_args",
           "sampling_extra_args", "sampling_vllm_xargs"]
