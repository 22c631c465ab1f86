"""HAPO's actor engine for verl's Megatron strategy (0.9.x): the exact T = 1 entropy and the
per-token temperature on the tensor-parallel vocabulary shards.

Source: HAPO, arXiv 2509.16591, §3 (ĥ from the entropy of the raw next-token distribution,
T_t = T_base·(1 + τ·ĥ_t) while sampling). Read against verl 0.9.1
(``verl.workers.engine.megatron.transformer_impl.MegatronEngineWithLMHead``,
``verl.models.mcore.model_forward.gptmodel_forward_model_engine``) and megatron-core 0.19.

:class:`HAPOMegatronEngineWithLMHead` is verl's Megatron language-model engine with the
contract of the FSDP one (:class:`~hapo_ops.integrations.verl.engine.HAPOFSDPEngineWithLMHead`):

- ``entropy``: the entropy of softmax(z) at T = 1 (float32), whatever the rollout
  temperature. verl's own Megatron engine divides the logits by the sample's temperature
  before its ``vocab_parallel_entropy``, so its entropy is at T_sample;
- ``log_probs``: log softmax(z / T_t) of the next token at T_t = T_base·(1 + τ·ĥ_t), with the
  statistics, τ, T_base and variant of the rollout read per sample from
  ``hapo_rollout_stats`` (:data:`~hapo_ops.integrations.verl.wire.ROLLOUT_STATS_KEY`, decoded
  once per batch), through the FSDP engine's own rule
  (:func:`~hapo_ops.integrations.verl.engine.token_temperature`);
- ``hapo_token_temperature``: T_t per token, which verl stores with the batch when it computes
  the old log-probs, so that the reference model and every update use the same temperatures;
  a batch that carries it is scored at those temperatures.

Without statistics (validation, a rollout without HAPO) the log-probs are at verl's own
per-sample temperature, the entropy still at T = 1. On the old-log-prob pass of a HAPO
batch the engine also keeps, as ``hapo_batch_stats``, the statistics of the T = 1
entropies of the response tokens over the data-parallel ranks (on the last pipeline stage),
and publishes them for the next rollout, as the FSDP engine does.

The logits Megatron hands to verl's hook ``_lm_head_logits_processor`` are this rank's
contiguous slice of the vocabulary (its output layer is column-parallel);
:func:`hapo_ops.vocab_parallel_logprobs_and_entropy` computes the exact per-token values
from the shards (two all-reduces over the tensor-parallel group), differentiable, with the
gradient on each shard its slice of the unsharded gradient. The per-token statistics and
stored temperatures are laid out as verl lays out the labels (its own packing function with
the same arguments), so packed (``use_remove_padding=True``) and padded inputs, static
packed padding and context-parallel slicing follow verl's layout.

Parallelism: tensor parallel as above; pipeline parallel: the last stage computes it (verl
runs the hook there only; the statistics are kept on the last stage's ranks); sequence
parallel: the output layer gathers the sequence before the logits, so the hook sees the
same logits; context parallel (also dynamic): the per-token values are sliced by verl's
own packing, as the labels are (tested on CPU: tensor and pipeline parallel 2; sequence and
context parallel need TransformerEngine's layers). Refused with an error: verl's fused kernels
(``use_fused_kernels``: they never materialise the logits), top-k distillation and
``calculate_sum_pi_squared``.

Registered in verl's ``EngineRegistry`` under the vendor key ``"hapo"`` for the
``megatron`` backend; ``VERL_ENGINE_VENDOR=hapo`` selects it (the verl plugin imports this
module where megatron-core is installed).
"""

from __future__ import annotations

from typing import Any

import torch

import hapo_ops
from hapo_ops.integrations.verl.engine import StatsPublishingEngine, token_temperature
from hapo_ops.integrations.verl.settings import ENGINE_VENDOR
from hapo_ops.integrations.verl.wire import (ROLLOUT_STATS_KEY, TOKEN_TEMPERATURE_KEY, column,
                                             dense_stats_rows, row_settings)

try:
    from megatron.core import parallel_state as mpu
    from verl.models.mcore.util import preprocess_bshd_engine, preprocess_thd_engine
    from verl.utils import tensordict_utils as tu
    from verl.utils import torch_functional as verl_F
    from verl.utils.megatron_utils import unwrap_model
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead
    from verl.workers.utils.padding import no_padding_2_padding
except ImportError as exc:  # pragma: no cover - exercised only without verl / megatron-core
    raise ImportError("hapo_ops.integrations.verl.megatron_engine needs verl and megatron-core: "
                      "pip install 'hapo-ops[verl]' megatron-core mbridge") from exc


def refuse_unsupported(*, use_fused_kernels: bool = False, distillation_use_topk: bool = False,
                       calculate_sum_pi_squared: bool = False) -> None:
    """Raise NotImplementedError, naming the setting, for what HAPO's Megatron engine does
    not cover."""
    if use_fused_kernels:
        raise NotImplementedError(
            "HAPO's verl Megatron engine needs the logits: set "
            "actor_rollout_ref.model.use_fused_kernels=False (verl's fused kernels return "
            "log-probs and entropy at one uniform temperature without materialising them)")
    if distillation_use_topk:
        raise NotImplementedError("HAPO's verl Megatron engine does not implement top-k distillation")
    if calculate_sum_pi_squared:
        raise NotImplementedError("HAPO's verl Megatron engine does not compute sum_pi_squared")


@EngineRegistry.register(model_type="language_model", backend="megatron",
                         device=["cuda", "npu"], vendor=ENGINE_VENDOR)
class HAPOMegatronEngineWithLMHead(StatsPublishingEngine, MegatronEngineWithLMHead):
    """verl's Megatron language-model engine with the T = 1 entropy and per-token
    temperature computed by hapo-ops on the vocabulary shards (module docstring)."""

    def infer_batch(self, data, loss_function=None):
        """verl's forward-only pass; on the old-log-prob pass of a HAPO batch (statistics
        present, no stored T_t), on the last pipeline stage, also the statistics of the T = 1
        entropies of its response tokens over the data-parallel ranks (quantile and eps from
        the batch), kept as ``hapo_batch_stats`` (with ``hapo_batch_step``) and published for
        the next rollout by the first tensor-parallel, context-parallel and data-parallel rank
        of that stage (:func:`hapo_ops.integrations.verl.board.publish_entropy_stats`)."""
        keys = data.keys()
        collect = ROLLOUT_STATS_KEY in keys and TOKEN_TEMPERATURE_KEY not in keys
        outputs = super().infer_batch(data, loss_function)
        if collect and mpu.is_pipeline_last_stage(ignore_virtual=True):
            rows = dense_stats_rows(data[ROLLOUT_STATS_KEY])
            self.hapo_batch_stats = self._response_entropy_stats(outputs, data, rows)
            self.hapo_batch_step = int(column(rows, "step").max())
            if self.publishes_stats():
                self.publish_stats()
        return outputs

    def publishes_stats(self) -> bool:
        """The first tensor-, context- and data-parallel rank of the last pipeline stage
        (where the statistics are computed) publishes them and keeps them in the checkpoint."""
        return (mpu.is_pipeline_last_stage(ignore_virtual=True)
                and self.is_mp_src_rank_with_outputs() and self.get_data_parallel_rank() == 0)

    def _response_entropy_stats(self, outputs: dict, data, rows: torch.Tensor
                                ) -> hapo_ops.EntropyStats:
        """:func:`hapo_ops.entropy_stats` of the T = 1 entropies of the response tokens (the
        engine's output, gathered over context parallelism by verl), pooled over the
        data-parallel group."""
        settings = row_settings(rows)
        entropy = outputs.get("model_output", {}).get("entropy", None)
        if entropy is None:  # calculate_entropy unset: no T = 1 entropies on this pass
            values = torch.zeros(0, dtype=torch.float32, device=rows.device)
        else:
            response = no_padding_2_padding(entropy.detach(), data).to(torch.float32)
            mask = data.select("response_mask").to_padded_tensor()["response_mask"]
            values = response[mask.to(response.device).bool()]
        group = None
        if torch.distributed.is_initialized() and self.get_data_parallel_size() > 1:
            group = self.get_data_parallel_group()
        return hapo_ops.entropy_stats(values, torch.ones_like(values, dtype=torch.bool),
                                      quantile=settings.quantile, eps=settings.eps, group=group)

    def forward_step(self, batch_iter, model, logits_processor_func, postprocess_micro_batch_func):
        refuse_unsupported(use_fused_kernels=bool(self.engine_config.use_fused_kernels))
        return super().forward_step(batch_iter, model, logits_processor_func,
                                    postprocess_micro_batch_func)

    def _token_layout(self, values, batch, data_format: str) -> torch.Tensor:
        """Per-token ``values`` (nested like ``input_ids``) laid out as verl lays out the
        labels for the hook: packed with this micro-batch's padding and context-parallel
        slice (thd), or padded (bshd)."""
        use_fp8_padding = getattr(self.tf_config, "fp8", None) in ("e4m3", "hybrid")
        if data_format == "thd":
            pad_to_length_bucket = (self.engine_config.pad_to_length_bucket
                                    if self.engine_config.pad_to_length
                                    and self.engine_config.use_remove_padding else None)
            return preprocess_thd_engine(
                values, pre_process=True, need_roll=False, use_fp8_padding=use_fp8_padding,
                local_cp_size=tu.get_non_tensor_data(data=batch, key="local_cp_size", default=None),
                pad_to_length_bucket=pad_to_length_bucket,
                cp_layout=self._get_context_parallel_layout(unwrap_model(self.module[0])))[0]
        return preprocess_bshd_engine(
            values, pre_process=True, need_roll=False, use_fp8_padding=use_fp8_padding,
            forced_max_seqlen=tu.get_non_tensor_data(data=batch, key="forced_max_seqlen",
                                                     default=None))[0]

    def _token_temperature(self, label: torch.Tensor, temperature: torch.Tensor,
                           entropy_t1: torch.Tensor | None, batch, data_format: str
                           ) -> torch.Tensor:
        """T_t laid out like ``label``: stored with the batch, else from the statistics and the
        T = 1 entropy, else verl's per-sample temperature; 1 on padding."""
        keys = batch.keys()
        if TOKEN_TEMPERATURE_KEY in keys:
            stored = batch[TOKEN_TEMPERATURE_KEY].to(torch.float32)
            values = self._token_layout(stored, batch, data_format).to(label.device)
        elif ROLLOUT_STATS_KEY in keys:
            rows = dense_stats_rows(batch[ROLLOUT_STATS_KEY])  # dense already: no copy
            sample = torch.arange(rows.shape[0], device=rows.device)
            token_sample = self._token_layout(verl_F.expand_as_nested(sample, batch["input_ids"]),
                                              batch, data_format)
            token_rows = rows[token_sample.reshape(-1).long()].to(label.device)
            values = token_temperature(entropy_t1.detach().reshape(-1), token_rows,
                                       getattr(self, "hapo_batch_settings", None))
            values = values.reshape(label.shape)
        else:
            values = temperature.to(torch.float32)
        # padding (0 in verl's layout) is scored at T = 1
        return torch.where(values > 0, values, torch.ones_like(values))

    def _lm_head_logits_processor(self, logits, label, temperature, *,
                                  calculate_sum_pi_squared: bool, calculate_entropy: bool,
                                  distillation_use_topk: bool, distillation_only: bool,
                                  logits_processor_func: Any, batch, data_format: str):
        """verl's hook on the last pipeline stage: ``logits`` (1, T, V/tp) packed or (b, s,
        V/tp) padded, raw (T = 1), this rank's vocabulary slice; ``label`` the next tokens.
        Returns ``entropy`` (T = 1, when asked), ``log_probs`` at T_t and
        ``hapo_token_temperature``, laid out like ``label``."""
        refuse_unsupported(distillation_use_topk=distillation_use_topk,
                           calculate_sum_pi_squared=calculate_sum_pi_squared)
        if logits.shape[:-1] != label.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and label {tuple(label.shape)} "
                             "must agree up to the vocabulary dimension")
        tp_group = mpu.get_tensor_model_parallel_group()
        vocab_start = mpu.get_tensor_model_parallel_rank() * logits.shape[-1]

        # The T = 1 entropy, once: an output (with its gradient) and/or the source of T_t.
        from_stats = (ROLLOUT_STATS_KEY in batch.keys()
                      and TOKEN_TEMPERATURE_KEY not in batch.keys())
        entropy_t1 = None
        if calculate_entropy or from_stats:
            _, entropy_t1 = hapo_ops.vocab_parallel_logprobs_and_entropy(
                logits if calculate_entropy else logits.detach(), None, tp_group,
                vocab_start=vocab_start)
        with torch.no_grad():
            token_temp = self._token_temperature(label, temperature, entropy_t1, batch,
                                                 data_format)
        ret = {}
        if calculate_entropy:
            ret["entropy"] = entropy_t1
        if not distillation_only:
            ret["log_probs"], _ = hapo_ops.vocab_parallel_logprobs_and_entropy(
                logits, label, tp_group, vocab_start=vocab_start, temperature=token_temp)
        ret[TOKEN_TEMPERATURE_KEY] = token_temp
        return ret


__all__ = ["HAPOMegatronEngineWithLMHead", "refuse_unsupported"]
