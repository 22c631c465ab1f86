"""HAPO's actor engine for verl (0.9.x): exact T = 1 entropy and per-token temperature.

Source: HAPO, arXiv 2509.16591, §3 (ĥ from the entropy of the raw next-token distribution,
T_t = T_base·(1 + τ·ĥ_t) while sampling). Read against verl 0.9.1
(``verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead``,
``verl.workers.engine.base.EngineRegistry``).

:class:`HAPOFSDPEngineWithLMHead` is verl's FSDP language-model engine whose outputs come
from hapo-ops instead of verl's ``logprobs_from_logits`` / ``entropy_from_logits``:

- ``entropy``: the entropy of softmax(z) at T = 1 from the raw logits
  (:func:`hapo_ops.token_entropy`, exact for near-deterministic tokens, float32), whatever
  the rollout temperature;
- ``log_probs``: log softmax(z / T_t) of the next token at the per-token temperature
  T_t = :func:`hapo_ops.adaptive_temperature` (H_t, stats) — the statistics, τ, T_base and
  variant the rollout used, read per sample from the batch field ``hapo_rollout_stats``
  (see :data:`ROLLOUT_STATS_KEY`), the one the HAPO agent loop writes into the trajectory;
- ``hapo_token_temperature``: T_t per token. verl writes every extra engine output into
  the batch when it computes the old log-probs, so the reference model and every later
  update read T_t from there instead of recomputing it: the ratio of the update compares
  log-probs at the same temperatures.

Without ``hapo_rollout_stats`` (validation, a rollout without HAPO) the log-probs are at
verl's own (per-sample) temperature, the entropy still at T = 1.

It is registered in verl's ``EngineRegistry`` under the vendor key ``"hapo"``
(:data:`ENGINE_VENDOR`) for the ``fsdp`` and ``fsdp2`` backends; verl picks it where the
environment variable ``VERL_ENGINE_VENDOR=hapo`` is set (pass it to every worker through
Ray's runtime environment: ``+ray_kwargs.ray_init.runtime_env.env_vars.VERL_ENGINE_VENDOR=hapo``).
The verl plugin imports this module in such processes.

Supported: verl's packed (remove-padding) inputs, static packed padding
(``pad_to_length``) and Ulysses sequence parallelism. Refused with an error: fused kernels
(``use_fused_kernels``: they never materialise the logits), the padded path
(``use_remove_padding=False``), top-k distillation, and tensor-parallel (DTensor) logits.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

import hapo_ops
from hapo_ops.entropy.signal import EntropyStats
from hapo_ops.integrations.verl.board import publish_engine_stats, stats_board
from hapo_ops.integrations.verl.settings import ENGINE_VENDOR, RolloutSettings
from hapo_ops.integrations.verl.wire import (ROLLOUT_STATS_FIELDS, ROLLOUT_STATS_KEY,
                                             TOKEN_TEMPERATURE_KEY, VARIANT_CODES, column,
                                             dense_stats_rows, encode_row, row_settings, row_stats,
                                             variant_of_code)

try:
    import ray
    from verl.utils import tensordict_utils as tu
    from verl.utils import torch_functional as verl_F
    from verl.utils.ulysses import ulysses_pad_and_slice_inputs
    from verl.workers.engine.base import BaseEngine, EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    from verl.workers.engine.utils import pad_packed_inputs
    from verl.workers.utils.padding import no_padding_2_padding
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError("hapo_ops.integrations.verl.engine needs verl: pip install 'hapo-ops[verl]'") from exc

logger = logging.getLogger(__name__)

#: File of the engine's last statistics inside each actor checkpoint directory.
STATS_CHECKPOINT_FILE = "hapo_entropy_stats.pt"


def rollout_stats_row(stats: EntropyStats | None, *, base_temperature: float, tau: float,
                      variant: str = "paper", eps: float = 1e-8, quantile: float = 0.8,
                      step: int = 0, stats_step: int = -1) -> torch.Tensor:
    """The float32 row of ``hapo_rollout_stats`` for one sample: keyword form of
    :func:`hapo_ops.integrations.verl.wire.encode_row`."""
    settings = RolloutSettings(tau=float(tau), base_temperature=float(base_temperature),
                               variant=variant, eps=float(eps), quantile=float(quantile))
    return encode_row(stats, settings, step=step, stats_step=stats_step)


def token_temperature(entropy: torch.Tensor, stats_rows: torch.Tensor,
                      settings: RolloutSettings | None = None) -> torch.Tensor:
    """T_t = T_base·(1 + τ·ĥ_t) per token from the T = 1 entropy and per-token rows.

    ``entropy``: (N,) float32; ``stats_rows``: (N, 10) dense rows of ``hapo_rollout_stats``,
    one per token (each sample's row repeated). pivot, log_max, log_min may differ per
    token; τ, T_base, eps and the variant are the batch's ``settings`` (read from the rows,
    one host read, when not given).
    """
    settings = row_settings(stats_rows) if settings is None else settings
    return hapo_ops.adaptive_temperature(
        entropy, row_stats(stats_rows), base_temperature=settings.base_temperature,
        tau=settings.tau, variant=settings.variant, eps=settings.eps)


def _refuse(micro_batch: Any) -> None:
    if tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False):
        raise NotImplementedError(
            "HAPO's verl engine needs the logits: set actor_rollout_ref.model.use_fused_kernels=False "
            "(verl's fused kernels return log-probs and entropy without them)")
    if not tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
        raise NotImplementedError(
            "HAPO's verl engine supports verl's packed inputs only: set "
            "actor_rollout_ref.model.use_remove_padding=True")
    if tu.get_non_tensor_data(data=micro_batch, key="distillation_use_topk", default=False):
        raise NotImplementedError("HAPO's verl engine does not implement top-k distillation")


class StatsPublishingEngine:
    """What HAPO's FSDP and Megatron engines share besides the forward: decoding the
    statistics rows once per batch, publishing the statistics of the last old-log-prob
    batch (``hapo_batch_stats``, ``hapo_batch_step``) for the next rollout, and keeping them
    in verl's checkpoint. An engine says which of its ranks publishes
    (:meth:`publishes_stats`); that rank alone writes :data:`STATS_CHECKPOINT_FILE` and, on
    load, publishes again."""

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        """verl's pass over the micro-batches, with the statistics rows decoded once per
        batch: made dense (TransferQueue returns them nested) and their settings (τ,
        T_base, eps, variant: one host read) kept for every micro-batch."""
        self.hapo_batch_settings = None
        if ROLLOUT_STATS_KEY in data.keys() and TOKEN_TEMPERATURE_KEY not in data.keys():
            rows = dense_stats_rows(data[ROLLOUT_STATS_KEY])
            data[ROLLOUT_STATS_KEY] = rows
            self.hapo_batch_settings = row_settings(rows)
        try:
            return super().forward_backward_batch(data, loss_function, forward_only=forward_only)
        finally:
            self.hapo_batch_settings = None

    def publishes_stats(self) -> bool:
        """Whether this rank posts the statistics (rank 0 unless an engine says otherwise)."""
        return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    def publish_stats(self) -> None:
        """Publish ``hapo_batch_stats`` to this job's board. Without Ray (the engine driven
        outside a Ray job: nothing to feed) an ERROR is logged; with Ray and no board,
        :func:`~hapo_ops.integrations.verl.board.publish_entropy_stats` raises."""
        publish_engine_stats(self.hapo_batch_stats, self.hapo_batch_step,
                             board=getattr(self, "hapo_stats_board", None))

    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None,
                        **kwargs):
        """verl's checkpoint, plus (the publishing rank) the last statistics and their step
        in :data:`STATS_CHECKPOINT_FILE`, so that a resumed run samples its first rollout
        with them instead of at T_base."""
        super().save_checkpoint(local_path, hdfs_path=hdfs_path, global_step=global_step,
                                max_ckpt_to_keep=max_ckpt_to_keep, **kwargs)
        stats = getattr(self, "hapo_batch_stats", None)
        if stats is not None and local_path is not None and self.publishes_stats():
            os.makedirs(local_path, exist_ok=True)
            torch.save({"stats": [float(v) for v in stats], "step": int(self.hapo_batch_step)},
                       os.path.join(local_path, STATS_CHECKPOINT_FILE))

    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=True, **kwargs):
        """verl's checkpoint; then the statistics saved with it (if any) are restored and
        published by the publishing rank to the board, created here if the agent-loop
        manager has not made it yet (this engine keeps the handle)."""
        path = None if local_path is None else os.path.join(local_path, STATS_CHECKPOINT_FILE)
        saved = torch.load(path) if path is not None and os.path.exists(path) else None
        result = super().load_checkpoint(local_path, hdfs_path=hdfs_path,
                                         del_local_after_load=del_local_after_load, **kwargs)
        if saved is not None:
            self.hapo_batch_stats = EntropyStats(*(torch.tensor(v) for v in saved["stats"]))
            self.hapo_batch_step = int(saved["step"])
            if self.publishes_stats():
                if ray.is_initialized():
                    self.hapo_stats_board = stats_board(create=True)
                self.publish_stats()
        return result


@EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"],
                         device=["cuda", "npu"], vendor=ENGINE_VENDOR)
class HAPOFSDPEngineWithLMHead(StatsPublishingEngine, FSDPEngineWithLMHead):
    """verl's FSDP language-model engine with the T = 1 entropy and per-token temperature
    computed by hapo-ops (module docstring)."""

    def infer_batch(self, data, loss_function=None):
        """verl's forward-only pass; on the old-log-prob pass of a HAPO batch (statistics
        present, no stored T_t) also the statistics of the T = 1 entropies of its response
        tokens over all data-parallel ranks (quantile and eps from the batch), kept as
        ``hapo_batch_stats`` (with ``hapo_batch_step``, the batch's training step) and
        published for the next rollout (rank 0,
        :func:`hapo_ops.integrations.verl.board.publish_entropy_stats`)."""
        keys = data.keys()
        collect = ROLLOUT_STATS_KEY in keys and TOKEN_TEMPERATURE_KEY not in keys
        self._hapo_entropies = [] if collect else None
        try:
            outputs = super().infer_batch(data, loss_function)
        finally:
            collected, self._hapo_entropies = self._hapo_entropies, None
        if collect:
            rows = dense_stats_rows(data[ROLLOUT_STATS_KEY])
            settings = row_settings(rows)
            values = (torch.cat(collected) if collected
                      else torch.zeros(0, dtype=torch.float32, device=rows.device))
            group = None
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                group = self.get_data_parallel_group()
            self.hapo_batch_stats = hapo_ops.entropy_stats(
                values, torch.ones_like(values, dtype=torch.bool), quantile=settings.quantile,
                eps=settings.eps, group=group)
            self.hapo_batch_step = int(column(rows, "step").max())
            if self.publishes_stats():
                self.publish_stats()
        return outputs

    def _packed_like_inputs(self, values: torch.Tensor, static_pad_size: int,
                            pad_value: float) -> torch.Tensor:
        """(total_nnz, ...) per-token values laid out as verl lays out the packed inputs:
        the static pad, then this rank's Ulysses slice."""
        values = values.unsqueeze(0)
        if static_pad_size:
            values, _ = pad_packed_inputs(values, None, static_pad_size, pad_value=pad_value)
        if self.use_ulysses_sp:
            values, _, _ = ulysses_pad_and_slice_inputs(
                values, position_ids_rmpad=None, sp_size=self.ulysses_sequence_parallel_size,
                pad_value=pad_value)
        return values.squeeze(0)

    def prepare_model_inputs(self, micro_batch):
        _refuse(micro_batch)
        model_inputs, output_args = super().prepare_model_inputs(micro_batch)
        input_ids = micro_batch["input_ids"]
        total = input_ids.values().shape[0]
        static_pad_size = self._get_packed_pad_size(total)
        if TOKEN_TEMPERATURE_KEY in micro_batch.keys():
            stored = micro_batch[TOKEN_TEMPERATURE_KEY].values().to(torch.float32)
            output_args["hapo_stored_temperature"] = self._packed_like_inputs(
                stored, static_pad_size, pad_value=1.0)
        elif ROLLOUT_STATS_KEY in micro_batch.keys():
            rows = dense_stats_rows(micro_batch[ROLLOUT_STATS_KEY])  # dense already: no copy
            sample = torch.arange(rows.shape[0], device=rows.device)
            token_sample = verl_F.expand_as_nested(sample, input_ids).values()
            token_sample = self._packed_like_inputs(token_sample, static_pad_size, pad_value=0)
            output_args["hapo_stats_rows"] = rows[token_sample.long()]
        return model_inputs, output_args

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        from torch.distributed.tensor import DTensor

        _refuse(micro_batch)
        calculate_entropy = tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy",
                                                   default=False)
        distillation_only = tu.get_non_tensor_data(data=micro_batch, key="distillation_only",
                                                   default=False)
        if tu.get_non_tensor_data(data=micro_batch, key="calculate_sum_pi_squared", default=False):
            raise NotImplementedError("HAPO's verl engine does not compute sum_pi_squared")
        logits = output.logits.squeeze(0)  # (local packed tokens, V), raw (T = 1)
        if isinstance(logits, DTensor):
            raise NotImplementedError("HAPO's verl engine does not take tensor-parallel logits")
        labels = output_args["input_ids_rmpad_rolled"]

        # The T = 1 entropy, once: an output (with its gradient) and/or the source of T_t.
        from_stats = ("hapo_stats_rows" in output_args
                      and "hapo_stored_temperature" not in output_args)
        entropy_t1 = None
        if calculate_entropy or from_stats:
            entropy_t1 = hapo_ops.token_entropy(logits if calculate_entropy else logits.detach())
        with torch.no_grad():
            if "hapo_stored_temperature" in output_args:
                temperature = output_args["hapo_stored_temperature"].to(logits.device)
            elif from_stats:
                temperature = token_temperature(entropy_t1.detach(),
                                                output_args["hapo_stats_rows"].to(logits.device),
                                                getattr(self, "hapo_batch_settings", None))
            else:  # verl's own per-sample temperature
                temperature = output_args["temperature_rmpad"].to(device=logits.device,
                                                                  dtype=torch.float32)
        model_output = {}
        pad_size = output_args["pad_size"]
        cu_seqlens = micro_batch["input_ids"].offsets()
        nest = torch.nested.nested_tensor_from_jagged
        if not distillation_only:
            log_probs, _ = hapo_ops.logprobs_and_entropy(logits, labels, temperature=temperature)
            model_output["log_probs"] = nest(self._gather_and_unpad_packed(log_probs, pad_size),
                                             cu_seqlens)
        if calculate_entropy:
            entropy = self._gather_and_unpad_packed(entropy_t1, pad_size)
            model_output["entropy"] = nest(entropy, cu_seqlens)
            collected = getattr(self, "_hapo_entropies", None)
            if collected is not None:  # the response tokens, sliced as verl's loss slices them
                response = no_padding_2_padding(model_output["entropy"].detach(), micro_batch)
                mask = micro_batch.select("response_mask").to_padded_tensor()["response_mask"]
                collected.append(response.to(torch.float32)[mask.to(response.device).bool()])
        model_output[TOKEN_TEMPERATURE_KEY] = nest(
            self._gather_and_unpad_packed(temperature.to(torch.float32), pad_size), cu_seqlens)
        return model_output


@EngineRegistry.register(model_type="language_model", backend=["veomni", "torchtitan"],
                         device=["cuda", "npu"], vendor=ENGINE_VENDOR)
class HAPOUnsupportedEngine(BaseEngine):
    """Stands where ``VERL_ENGINE_VENDOR=hapo`` meets a backend HAPO's engine does not cover,
    so that verl does not fall back silently to its own engine (and the exact entropy and
    per-token temperature are not lost without a word)."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(
            "HAPO's verl engine (VERL_ENGINE_VENDOR=hapo) exists for the fsdp/fsdp2 and "
            "megatron strategies only; use actor_rollout_ref.actor.strategy=fsdp2 (or megatron) "
            "or unset VERL_ENGINE_VENDOR")


__all__ = [
    "ENGINE_VENDOR",
    "HAPOFSDPEngineWithLMHead",
    "HAPOUnsupportedEngine",
    "ROLLOUT_STATS_FIELDS",
    "ROLLOUT_STATS_KEY",
    "STATS_CHECKPOINT_FILE",
    "StatsPublishingEngine",
    "TOKEN_TEMPERATURE_KEY",
    "VARIANT_CODES",
    "dense_stats_rows",
    "rollout_stats_row",
    "token_temperature",
    "variant_of_code",
]
