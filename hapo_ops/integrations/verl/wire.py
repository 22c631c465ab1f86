"""The wire format of HAPO's statistics in verl: one row per sample, and its one codec.

The rollout (the agent-loop manager) writes a row into every prompt it sends; verl copies it
into the trajectory, so the actor's engine reads the very row the rollout sampled with; the
agent loop turns it into the vLLM request's ``extra_args["hapo"]``
(:func:`hapo_ops.integrations.vllm.sampling_extra_args`). Encoding and decoding live here
only. Imports nothing of verl.
"""

from __future__ import annotations

from typing import Any

import torch

from hapo_ops._utils.validation import VARIANTS
from hapo_ops.entropy.signal import NO_ENTROPY_STATS, EntropyStats
from hapo_ops.integrations.verl.settings import RolloutSettings
from hapo_ops.integrations.vllm import sampling_extra_args

#: Batch field of the per-sample rows (a (batch, 10) float32 tensor).
ROLLOUT_STATS_KEY = "hapo_rollout_stats"
#: Batch field of the per-token temperature T_t the engine stores with the old log-probs.
TOKEN_TEMPERATURE_KEY = "hapo_token_temperature"
#: Columns of a row. ``step``: the training step of the rollout that wrote it;
#: ``stats_step``: the step whose training batch gave the statistics (-1: none or unknown).
ROLLOUT_STATS_FIELDS = ("pivot", "log_max", "log_min", "base_temperature", "tau", "eps", "variant",
                        "quantile", "step", "stats_step")
#: The variant column holds the variant's index in VARIANTS ("paper" 0, "released" 1).
VARIANT_CODES = {name: float(code) for code, name in enumerate(VARIANTS)}
#: "No statistics yet": pivot 0, log_max +inf, log_min -inf, which gives ĥ = 0 and T_t = T_base
#: (what ``hapo_ops.entropy_stats`` returns for a batch without valid tokens).
NO_STATS = EntropyStats(*NO_ENTROPY_STATS)

_COLUMN = {name: i for i, name in enumerate(ROLLOUT_STATS_FIELDS)}
_SETTING_COLUMNS = ("tau", "base_temperature", "variant", "eps", "quantile")


def encode_row(stats: EntropyStats | None, settings: RolloutSettings, *, step: int = 0,
               stats_step: int = -1) -> torch.Tensor:
    """The (10,) float32 row of one sample (columns :data:`ROLLOUT_STATS_FIELDS`).

    ``stats`` None (no training batch yet) is stored as :data:`NO_STATS`, with
    ``stats_step`` -1.
    """
    if settings.variant not in VARIANT_CODES:
        raise ValueError(f"variant must be one of {tuple(VARIANT_CODES)}, got {settings.variant!r}")
    if stats is None:
        stats, stats_step = NO_STATS, -1
    values = {"pivot": stats[0], "log_max": stats[1], "log_min": stats[2],
              "base_temperature": settings.base_temperature, "tau": settings.tau,
              "eps": settings.eps, "variant": VARIANT_CODES[settings.variant],
              "quantile": settings.quantile, "step": step, "stats_step": stats_step}
    return torch.tensor([float(values[name]) for name in ROLLOUT_STATS_FIELDS], dtype=torch.float32)


def dense_stats_rows(rows: Any) -> torch.Tensor:
    """The ``hapo_rollout_stats`` column as a dense (batch, 10) float32 tensor.

    verl hands it over dense, but TransferQueue stores every tensor column sample by sample
    and rebuilds it with ``torch.nested.as_nested_tensor(rows, layout=torch.jagged)`` (or
    the strided layout), which comes back as a nested (batch, j) tensor even though every
    row has the same length. A nested column is padded back to dense; rows of any other
    length are refused. Reads only shapes (no host synchronisation).
    """
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"{ROLLOUT_STATS_KEY} must be a tensor of shape (batch, "
                        f"{len(ROLLOUT_STATS_FIELDS)}), got {type(rows).__name__}")
    width = len(ROLLOUT_STATS_FIELDS)
    if rows.is_nested:
        dense = rows.to_padded_tensor(0.0)
        # every row is at most `width` long and all of them hold batch·width values
        if dense.dim() != 2 or dense.shape[-1] != width or rows.numel() != dense.numel():
            raise ValueError(f"{ROLLOUT_STATS_KEY} must hold {width} values per sample "
                             f"{ROLLOUT_STATS_FIELDS}, got a nested tensor of rows of "
                             f"other lengths ({rows.numel()} values over {dense.shape[0]} rows)")
        rows = dense
    if rows.dim() != 2 or rows.shape[-1] != width:
        raise ValueError(f"{ROLLOUT_STATS_KEY} must have shape (batch, {width}), got "
                         f"{tuple(rows.shape)}")
    return rows.to(torch.float32)


def variant_of_code(code: float) -> str:
    """The variant whose code (:data:`VARIANT_CODES`) a row holds; ``ValueError`` otherwise."""
    if code not in VARIANT_CODES.values():
        raise ValueError(f"{ROLLOUT_STATS_KEY}: variant code must be one of "
                         f"{sorted(VARIANT_CODES.values())}, got {code}")
    return VARIANTS[int(code)]


def column(rows: torch.Tensor, name: str) -> torch.Tensor:
    """One column (by its name in :data:`ROLLOUT_STATS_FIELDS`) of dense rows."""
    return rows[..., _COLUMN[name]]


def row_stats(rows: torch.Tensor) -> EntropyStats:
    """The statistics of dense rows, as an EntropyStats of (batch,) tensors (on the rows'
    device, no host read); rows without statistics hold :data:`NO_STATS`."""
    return EntropyStats(column(rows, "pivot"), column(rows, "log_max"), column(rows, "log_min"))


def has_stats(rows: torch.Tensor) -> torch.Tensor:
    """(batch,) bool: the row carries statistics (log_max finite; :data:`NO_STATS` has +inf)."""
    return torch.isfinite(column(rows, "log_max"))


def row_settings(rows: torch.Tensor) -> RolloutSettings:
    """The settings of a batch of dense rows (one host read), which every row must share:
    τ, T_base, the variant, eps and the quantile; ``ValueError`` naming the column that
    differs between rows."""
    if rows.shape[0] == 0:
        raise ValueError(f"{ROLLOUT_STATS_KEY} holds no rows")
    picked = rows[:, [_COLUMN[name] for name in _SETTING_COLUMNS]].cpu()
    first = picked[0]
    differ = (picked != first).any(dim=0)
    if bool(differ.any()):
        name = _SETTING_COLUMNS[int(differ.nonzero()[0])]
        raise ValueError(f"{ROLLOUT_STATS_KEY}: {name} must be the same for every sample of a "
                         f"batch, got {column(rows, name).unique().tolist()}")
    tau, base_temperature, variant, eps, quantile = first.tolist()
    return RolloutSettings(tau=tau, base_temperature=base_temperature,
                           variant=variant_of_code(variant), eps=eps, quantile=quantile)


def row_extra_args(row: Any) -> dict:
    """The vLLM request's ``extra_args`` entry (``{"hapo": {...}}``, from
    :func:`hapo_ops.integrations.vllm.sampling_extra_args`) of one sample's row."""
    row = dense_stats_rows(torch.as_tensor(row, dtype=torch.float32).reshape(1, -1))
    settings = row_settings(row)
    stats = None
    if bool(has_stats(row)[0]):
        stats = EntropyStats(*(float(v[0]) for v in row_stats(row)))
    return sampling_extra_args(stats, tau=settings.tau, base_temperature=settings.base_temperature,
                               variant=settings.variant, eps=settings.eps)


__all__ = ["NO_STATS", "ROLLOUT_STATS_FIELDS", "ROLLOUT_STATS_KEY", "TOKEN_TEMPERATURE_KEY",
           "VARIANT_CODES", "column", "dense_stats_rows", "encode_row", "has_stats",
           "row_extra_args", "row_settings", "row_stats", "variant_of_code"]
