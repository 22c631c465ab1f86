"""HAPO in TRL (1.16.x): ``HAPOGRPOConfig`` and ``HAPOGRPOTrainer(GRPOTrainer)``.

Source: HAPO, arXiv 2509.16591. Read against TRL 1.16.0 (``GRPOTrainer``:
``_generate_single_turn``, ``_generate_and_score_completions``, ``_calculate_rewards``,
``_get_per_token_logps_and_entropies``, ``_compute_loss``).

What the trainer changes, each switchable in the config:

- adaptive temperature (``hapo_adaptive_temperature``): ``model.generate`` samples every
  token at T = T_base·(1 + τ·ĥ) through
  :class:`~hapo_ops.integrations.transformers.AdaptiveTemperatureLogitsProcessor`, with
  T_base = ``temperature`` and the entropy statistics of the previous training batch
  (T_base on the first step). The temperature of every sampled token is recorded and
  travels with the batch; the behaviour (old), reference and current log-probs are all
  computed at it (``hapo_ops.logprobs_and_entropy(logits, labels, temperature=T)``), and the
  entropy that drives ĥ is the raw (T = 1) one, like the sampler's.
  With ``use_vllm=True`` the sampling runs in vLLM through
  :class:`~hapo_ops.integrations.vllm.AdaptiveTemperatureLogitsProcessor`: in colocate mode
  the trainer registers it in the ``LLM`` that TRL builds; in server mode start the server
  with ``--logits-processors hapo_ops.integrations.vllm:AdaptiveTemperatureLogitsProcessor``.
  Each generation sends the statistics in every request's ``extra_args`` (server:
  ``vllm_xargs``) and vLLM's own temperature is set to 1. vLLM does not report T_t, so the
  trainer recomputes it from its own T = 1 logits of the sampled sequences with the same
  statistics (one no-grad forward per generation batch, run as TRL runs its own forward of
  the rollout: on the trainer's prepared model, gradient checkpointing off, so FSDP and
  ZeRO-3 gather the shards; models whose forward has no ``logits_to_keep`` work too); the
  old, reference and current log-probs are then taken at it, and vLLM's processed
  log-probs (the behaviour log-probs at T_t) feed TRL's vLLM importance-sampling
  correction, whose ratios are then 1 up to the engine-vs-trainer logits mismatch.
- token-level group-average advantages (``hapo_token_level_advantages``):
  ``hapo_ops.token_level_group_advantages`` over the generation batch (all processes),
  instead of GRPO's per-sequence ones.
- the HAPO loss: ``hapo_ops.hapo_policy_loss`` with ``epsilon`` / ``epsilon_high`` as base
  clip bounds, ``hapo_alpha``, ``hapo_beta``, ``hapo_quantile``, dual clip
  ``hapo_dual_clip`` (TRL's two-sided clip ``delta`` is refused: ``hapo_dual_clip`` is
  the bound HAPO's loss puts on negative advantages), aggregated as TRL's ``loss_type``
  does ("dapo", "grpo", "bnpo", "dr_grpo"). ĥ's entropy statistics are those of the
  micro-batch pooled over every process (``entropy_stats(..., group=)``), so every rank
  uses the same ĥ, as the sampler does.

Logged (the loss's metrics in one gather across processes per micro-batch):
``hapo/clip_frac_low``, ``hapo/clip_frac_high``, ``hapo/dual_clip_frac``,
``hapo/approx_kl``, ``hapo/h_hat_mean``, ``hapo/pivot`` (loss), ``hapo/temperature_min``,
``hapo/temperature_mean``, ``hapo/temperature_max`` and, once there are statistics,
``hapo/sampling_pivot`` (rollout).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

import hapo_ops
from hapo_ops._utils.validation import VARIANTS, check_choice, check_float

try:
    from transformers import LogitsProcessorList
    from trl import GRPOConfig, GRPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("hapo_ops.integrations.trl needs trl: pip install 'hapo-ops[trl]'") from exc

from hapo_ops.integrations.transformers import AdaptiveTemperatureLogitsProcessor
from hapo_ops.integrations.vllm import sampling_extra_args, sampling_vllm_xargs

#: What a TRL vLLM server must be started with for ``use_vllm=True, vllm_mode="server"``
#: (``trl vllm-serve --model ... --logits-processors <this>``, or ``vllm serve``).
VLLM_LOGITS_PROCESSOR = "hapo_ops.integrations.vllm:AdaptiveTemperatureLogitsProcessor"

SUPPORTED_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")


@dataclass
class HAPOGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the HAPO hyperparameters (see the module docstring).

    hapo_variant: "paper" or "released" (the public reference code's ĥ and fallback test).
    hapo_tau: adaptive temperature strength τ (T = T_base·(1 + τ·ĥ)).
    hapo_alpha / hapo_beta: adaptive clipping / advantage redistribution strengths
      (β in [0, 1]: A·(1 + β·ĥ) keeps the sign of A for every ĥ in [-1, 1]).
    hapo_quantile: pivot quantile of the entropy statistics.
    hapo_token_level_advantages: token-level group-average advantages instead of GRPO's.
    hapo_adaptive_temperature: per-token adaptive sampling temperature (``model.generate``).
    hapo_dual_clip: dual-clip constant c > 1 for negative advantages, or None.
    hapo_fallback_threshold: GRPO fallback threshold of the token-level advantages.

    Refused (``ValueError`` naming the field): ``hapo_beta`` outside [0, 1]; TRL's ``delta``
    (use ``hapo_dual_clip``); ``min_p > 0`` with ``use_vllm`` and adaptive temperature.
    """

    hapo_variant: str = field(default="paper", metadata={"help": "'paper' or 'released'."})
    hapo_tau: float = field(default=0.05, metadata={"help": "Adaptive temperature strength."})
    hapo_alpha: float = field(default=1.0, metadata={"help": "Adaptive clipping strength."})
    hapo_beta: float = field(default=1.0, metadata={"help": "Advantage redistribution strength."})
    hapo_quantile: float = field(default=0.8, metadata={"help": "Pivot quantile of log-entropy."})
    hapo_token_level_advantages: bool = field(
        default=True, metadata={"help": "Token-level group-average advantages."})
    hapo_adaptive_temperature: bool = field(
        default=True, metadata={"help": "Per-token adaptive sampling temperature."})
    hapo_dual_clip: float | None = field(default=10.0, metadata={"help": "Dual-clip constant."})
    hapo_fallback_threshold: float = field(
        default=5.0, metadata={"help": "GRPO fallback threshold of the token-level advantages."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("hapo_variant", self.hapo_variant, VARIANTS)
        check_float("hapo_tau", self.hapo_tau, min_value=-1.0, min_inclusive=False,
                    max_value=1.0, max_inclusive=False)
        check_float("hapo_alpha", self.hapo_alpha)
        # A·(1 + β·ĥ) with ĥ in [-1, 1] keeps A's sign only for β in [0, 1]
        check_float("hapo_beta", self.hapo_beta, min_value=0.0, max_value=1.0)
        check_float("hapo_quantile", self.hapo_quantile, min_value=0.0, max_value=1.0)
        if self.hapo_dual_clip is not None:
            check_float("hapo_dual_clip", self.hapo_dual_clip, min_value=1.0, min_inclusive=False)
        check_float("hapo_fallback_threshold", self.hapo_fallback_threshold, min_value=0.0,
                    min_inclusive=False)
        if self.delta is not None:
            raise ValueError(f"delta must be None with HAPOGRPOConfig, got {self.delta}: HAPO's "
                             f"loss bounds the ratio of negative advantages with hapo_dual_clip "
                             f"(a token's loss is at most c·|A|, as TRL's delta=c does for "
                             f"c > 1 + epsilon_high); set hapo_dual_clip instead")
        if self.use_vllm and self.hapo_adaptive_temperature and (self.min_p or 0.0) > 0.0:
            raise ValueError(f"min_p must be 0 with use_vllm and hapo_adaptive_temperature (vLLM "
                             f"computes min-p's threshold before the adaptive temperature), "
                             f"got {self.min_p}")


class HAPOGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with HAPO's sampling, advantages and loss (see the module docstring).

    Takes a :class:`HAPOGRPOConfig` as ``args``. Unsupported with HAPO (a ``ValueError`` at
    construction): ``loss_type`` other than dapo/grpo/bnpo/dr_grpo, sequence-level
    importance sampling, ``top_entropy_quantile < 1``, ``off_policy_mask_threshold``, an
    entropy bonus; with ``hapo_adaptive_temperature``, also transformers' continuous
    batching, tools and ``rollout_func`` (none of them reports per-token temperatures).
    ``HAPOGRPOConfig`` refuses ``min_p > 0`` with vLLM and adaptive temperature (vLLM applies
    min-p before the processor).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        with _vllm_processor_registered(config):
            super().__init__(*args, **kwargs)
        if not isinstance(self.args, HAPOGRPOConfig):
            raise TypeError(f"HAPOGRPOTrainer needs a HAPOGRPOConfig as args, "
                            f"got {type(self.args).__name__}")
        self._check_supported()
        # decided once, before any wrapping by the accelerator (as TRL's trainers decide)
        self._hapo_forward_takes_logits_to_keep = _forward_takes_logits_to_keep(self.model)
        self._hapo_stats: hapo_ops.EntropyStats | None = None
        self._hapo_entropy_buffer: list[torch.Tensor] = []
        self._hapo_rollout_temperature: torch.Tensor | None = None
        self._hapo_rewards_per_func: torch.Tensor | None = None

    # ------------------------------------------------------------------ checks

    def _check_supported(self) -> None:
        args = self.args
        problems = []
        if self.loss_type not in SUPPORTED_LOSS_TYPES:
            problems.append(f"loss_type={self.loss_type!r} (supported: {SUPPORTED_LOSS_TYPES})")
        if self.importance_sampling_level != "token":
            problems.append("importance_sampling_level='sequence'")
        if self.top_entropy_quantile < 1.0:
            problems.append("top_entropy_quantile < 1")
        if self.off_policy_mask_threshold is not None:
            problems.append("off_policy_mask_threshold")
        if self._entropy_bonus_enabled:
            problems.append("an entropy bonus (entropy_coef / adaptive entropy)")
        if args.hapo_adaptive_temperature:
            if self.use_transformers_continuous_batching:
                problems.append("transformers continuous batching with hapo_adaptive_temperature")
            if self.tools or self.rollout_func is not None:
                problems.append("tools / rollout_func with hapo_adaptive_temperature")
        if problems:
            raise ValueError("HAPOGRPOTrainer does not support: " + "; ".join(problems))

    # ------------------------------------------------------------------ generation

    def _entropy_stats_for_sampling(self) -> hapo_ops.EntropyStats | None:
        """Stats of the T = 1 entropies of everything trained on since the last rollout
        (pooled over processes); the previous stats when nothing was trained since."""
        if self._hapo_entropy_buffer:
            values = torch.cat(self._hapo_entropy_buffer)
            self._hapo_entropy_buffer = []
            self._hapo_stats = self._pooled_entropy_stats(
                values, torch.ones_like(values, dtype=torch.bool))
        return self._hapo_stats

    def _pooled_entropy_stats(self, entropies: torch.Tensor,
                              valid: torch.Tensor) -> hapo_ops.EntropyStats:
        """``entropy_stats`` of the valid entropies of every process (the same on each): the
        loss and the sampler both use these, so ĥ does not depend on the rank."""
        group = None
        if (torch.distributed.is_available() and torch.distributed.is_initialized()
                and self.accelerator.num_processes > 1):
            group = torch.distributed.group.WORLD
        return hapo_ops.entropy_stats(entropies, valid, quantile=self.args.hapo_quantile,
                                      group=group)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                              has_tool_images=False):
        if not self.args.hapo_adaptive_temperature:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields,
                                                 num_generations, has_tool_images)
        stats = self._entropy_stats_for_sampling()
        if self.use_vllm:
            return self._generate_with_vllm(stats, prompt_ids, images, multimodal_fields,
                                            num_generations, has_tool_images)
        processor = AdaptiveTemperatureLogitsProcessor(
            stats, tau=self.args.hapo_tau, base_temperature=self.temperature,
            variant=self.args.hapo_variant)
        model = self.accelerator.unwrap_model(self.model_wrapped)
        generate = model.generate

        def generate_with_adaptive_temperature(*args, **kwargs):
            # generate's own temperature is 1: the processor applies T_base·(1 + τ·ĥ)
            config = copy.deepcopy(kwargs["generation_config"])
            config.temperature = 1.0
            kwargs["generation_config"] = config
            processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
            processors.append(processor)
            return generate(*args, logits_processor=processors, **kwargs)

        model.generate = generate_with_adaptive_temperature
        try:
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        finally:
            del model.generate
        temperature = processor.temperatures.to(self.accelerator.device)
        lengths = [len(ids) for ids in completion_ids]
        if temperature.shape[0] != len(completion_ids) or temperature.shape[1] < max(lengths, default=0):
            raise RuntimeError("the adaptive temperature processor did not see every sampled "
                               "token (another generation path was taken)")
        self._hapo_rollout_temperature = temperature
        self._hapo_sampling_stats = stats
        return completion_ids, logprobs

    def _generate_with_vllm(self, stats, prompt_ids, images, multimodal_fields, num_generations,
                            has_tool_images):
        """TRL's vLLM generation with the step's statistics in every request (engine
        temperature 1; the processor applies T_base·(1 + τ·ĥ)), then T_t recomputed from the
        trainer's own logits of the sampled sequences with the same statistics."""
        settings = dict(tau=self.args.hapo_tau, base_temperature=self.temperature,
                        variant=self.args.hapo_variant)
        generation = self.vllm_generation
        original = generation.generation_kwargs
        kwargs = {**original, "temperature": 1.0}
        if self.vllm_mode == "server":  # the OpenAI-compatible server takes flat vllm_xargs
            kwargs["vllm_xargs"] = {**(original.get("vllm_xargs") or {}),
                                    **sampling_vllm_xargs(stats, **settings)}
        else:
            kwargs["extra_args"] = {**(original.get("extra_args") or {}),
                                    **sampling_extra_args(stats, **settings)}
        generation.generation_kwargs = kwargs
        try:
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        finally:
            generation.generation_kwargs = original
        self._hapo_rollout_temperature = self._recompute_rollout_temperature(
            stats, prompt_ids, completion_ids)
        self._hapo_sampling_stats = stats
        return completion_ids, logprobs

    def _recompute_rollout_temperature(self, stats, prompt_ids, completion_ids) -> torch.Tensor:
        """(B, max completion length) T_t = adaptive_temperature(H_t, stats, ...) with H_t
        the T = 1 entropy of the trainer's logits at each sampled position (padding: T_base).

        The forward runs as TRL 1.16 runs its own no-grad forward of a rollout (the old
        log-probs in ``_generate_and_score_completions``): on ``self.model``, the model as the
        accelerator prepared it (under FSDP the wrapper, whose forward gathers the shards;
        under DeepSpeed ZeRO-3 the module, whose hooks gather them), under ``torch.no_grad``
        with gradient checkpointing switched off."""
        device = self.accelerator.device
        width = max((len(ids) for ids in completion_ids), default=0)
        base = torch.full((len(completion_ids), width), self.temperature, device=device)
        if stats is None or width == 0:  # no statistics yet: the processor used T_base
            return base
        from trl.trainer.utils import pad

        pad_id = self._tokenizer.pad_token_id
        prompts = pad([torch.tensor(ids) for ids in prompt_ids], padding_value=pad_id,
                      padding_side="left")
        completions = pad([torch.tensor(ids) for ids in completion_ids], padding_value=pad_id,
                          padding_side="right")
        prompt_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in prompt_ids],
                          padding_value=0, padding_side="left")
        completion_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in completion_ids],
                              padding_value=0, padding_side="right")
        input_ids = torch.cat([prompts, completions], dim=1).to(device)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).to(device)
        batch_size = self.args.per_device_train_batch_size
        temperatures = []
        with torch.no_grad(), disable_gradient_checkpointing(
                self.model, self.args.gradient_checkpointing_kwargs):
            for start in range(0, input_ids.shape[0], batch_size):
                end = start + batch_size
                logits = self._completion_logits(self.model, input_ids[start:end],
                                                 attention_mask[start:end], width)
                temperatures.append(hapo_ops.adaptive_temperature(
                    hapo_ops.token_entropy(logits), stats, base_temperature=self.temperature,
                    tau=self.args.hapo_tau, variant=self.args.hapo_variant))
        temperature = torch.cat(temperatures, dim=0)
        return torch.where(completion_mask.to(device).bool(), temperature, base)

    def _completion_logits(self, model, input_ids, attention_mask,
                           logits_to_keep: int) -> torch.Tensor:
        """(B, logits_to_keep, V) logits of the model's own forward (its logit scaling and
        soft-capping apply) that score the last ``logits_to_keep`` tokens: position t scores
        token t + 1. The forward is asked for the last ``logits_to_keep + 1`` positions only
        when it takes ``logits_to_keep`` (decided once, from its signature, as TRL's
        trainers decide); otherwise it returns every position and the cut drops the rest."""
        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                        "use_cache": False}
        if self._hapo_forward_takes_logits_to_keep:
            model_inputs["logits_to_keep"] = logits_to_keep + 1
        with self.accelerator.autocast():
            logits = model(**model_inputs).logits
        return logits[:, :-1, :][:, -logits_to_keep:, :]

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions,
                                                      completion_ids_list)
        self._hapo_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._hapo_rollout_temperature = None
        self._hapo_rewards_per_func = None
        try:
            output = super()._generate_and_score_completions(inputs)
            mode = "train" if self.model.training else "eval"
            mask = output["completion_mask"]
            if "tool_mask" in output:
                mask = mask * output["tool_mask"]
            if self.args.hapo_adaptive_temperature:
                temperature = self._completion_temperature(output["completion_ids"].shape[1])
                output["hapo_temperature"] = temperature
                self._log_temperature(mode, temperature, mask)
            if self.args.hapo_token_level_advantages:
                output["advantages"] = self._token_level_advantages(mask)
        finally:
            self._hapo_rollout_temperature = None
            self._hapo_rewards_per_func = None
        return output

    def _completion_temperature(self, width: int) -> torch.Tensor:
        """(B, width) recorded temperatures aligned with the padded completions (positions
        past the sampled steps, i.e. padding, get T_base)."""
        temperature = self._hapo_rollout_temperature
        if temperature.shape[1] >= width:
            return temperature[:, :width].contiguous()
        pad = temperature.new_full((temperature.shape[0], width - temperature.shape[1]),
                                   self.temperature)
        return torch.cat([temperature, pad], dim=1)

    def _log_temperature(self, mode: str, temperature: torch.Tensor, mask: torch.Tensor) -> None:
        valid = mask.bool()
        values = temperature[valid] if valid.any() else temperature.new_full((1,), self.temperature)
        lo, hi = values.min().reshape(1), values.max().reshape(1)
        sums = torch.stack([values.sum(), values.new_tensor(float(values.numel()))])
        lo = self.accelerator.gather(lo).min().item()
        hi = self.accelerator.gather(hi).max().item()
        sums = self.accelerator.reduce(sums, reduction="sum")
        self._metrics[mode]["hapo/temperature_min"].append(lo)
        self._metrics[mode]["hapo/temperature_max"].append(hi)
        self._metrics[mode]["hapo/temperature_mean"].append((sums[0] / sums[1]).item())
        stats = getattr(self, "_hapo_sampling_stats", None)
        if stats is not None:  # none before the first training step (T = T_base)
            self._metrics[mode]["hapo/sampling_pivot"].append(stats.pivot.item())

    def _token_level_advantages(self, mask: torch.Tensor) -> torch.Tensor:
        """(B_local, C) token-level group-average advantages over the generation batch of all
        processes (groups: consecutive ``num_generations`` rows, as TRL samples them)."""
        rewards_per_func = self._hapo_rewards_per_func
        weights = self.reward_weights.to(rewards_per_func.device)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        all_mask = self.accelerator.gather(
            self.accelerator.pad_across_processes(mask, dim=1, pad_index=0))
        all_mask = all_mask.bool() & ~unscorable.to(all_mask.device)[:, None]
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        group_ids = torch.arange(rewards.shape[0], device=rewards.device) // num_generations
        advantages = hapo_ops.token_level_group_advantages(
            torch.where(unscorable, torch.zeros_like(rewards), rewards), group_ids,
            all_mask.to(rewards.device), variant=self.args.hapo_variant,
            fallback_threshold=self.args.hapo_fallback_threshold,
            normalize_std=self.scale_rewards != "none")
        start = self.accelerator.process_index * mask.shape[0]
        local = advantages[start:start + mask.shape[0], :mask.shape[1]]
        return local.to(device=mask.device, dtype=torch.float32)

    # ------------------------------------------------------------------ log-probs

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask,
                                           logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False,
                                           hapo_temperature=None, **kwargs):
        """TRL's contract ``(logps, entropies, aux_loss)``; with adaptive temperature, the
        log-probs at the recorded per-token temperature and the T = 1 entropies.

        ``hapo_temperature``: (B, logits_to_keep); defaults to the temperatures recorded by
        the rollout being scored (TRL's own calls for the old and reference log-probs).

        Without temperatures this is TRL's own method (its fused LM head). With them, the
        logits are :meth:`_completion_logits` (the model's own forward, cut to the
        completion as TRL scores it)."""
        temperature = hapo_temperature
        if temperature is None and self.args.hapo_adaptive_temperature:
            temperature = self._hapo_rollout_temperature
            if temperature is not None:
                temperature = self._completion_temperature(logits_to_keep)
        if temperature is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs)
        if compute_aux_loss or any(v is not None for v in kwargs.values()):
            raise ValueError("HAPOGRPOTrainer's adaptive temperature supports text-only, "
                             "dense models")
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            end = min(start + batch_size, input_ids.size(0))
            ids, am = input_ids[start:end], attention_mask[start:end]
            logits = self._completion_logits(model, ids, am, logits_to_keep)
            labels = ids[:, -logits_to_keep:].masked_fill(am[:, -logits_to_keep:] == 0, -100)
            logps, _ = hapo_ops.logprobs_and_entropy(
                logits, labels, temperature=temperature[start:end].to(logits.device))
            all_logps.append(logps)
            if compute_entropy:
                all_entropies.append(hapo_ops.token_entropy(logits))
        logps = torch.cat(all_logps, dim=0)
        entropies = torch.cat(all_entropies, dim=0) if compute_entropy else None
        return logps, entropies, None

    # ------------------------------------------------------------------ loss

    def _compute_loss(self, model, inputs):
        args = self.args
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        valid = mask.bool()

        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            hapo_temperature=inputs.get("hapo_temperature"))
        old_per_token_logps = inputs.get("old_per_token_logps")
        if old_per_token_logps is None:
            old_per_token_logps = per_token_logps.detach()
        old_per_token_logps = old_per_token_logps.to(per_token_logps.dtype)
        advantages = inputs["advantages"].to(per_token_logps.dtype)

        mode = "train" if self.model.training else "eval"
        entropies = entropies.detach()
        stats = self._pooled_entropy_stats(entropies, valid)
        if mode == "train":
            self._hapo_entropy_buffer.append(entropies[valid].float())
        agg, agg_kwargs, accumulation = self._aggregation(inputs, mask, mode)
        out = hapo_ops.hapo_policy_loss(
            per_token_logps, old_per_token_logps, advantages, entropies, valid, stats=stats,
            variant=args.hapo_variant, eps_low=self.epsilon_low, eps_high=self.epsilon_high,
            alpha=args.hapo_alpha, beta=args.hapo_beta, quantile=args.hapo_quantile,
            dual_clip=args.hapo_dual_clip, agg=agg, **agg_kwargs)
        per_token_loss = out.per_token
        if self.use_vllm and self.vllm_importance_sampling_correction:
            per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if args.use_bias_correction_kl:
                per_token_kl = per_token_kl * torch.exp(
                    (per_token_logps - old_per_token_logps).clamp(-20.0, 20.0))
            per_token_loss = per_token_loss + self.beta * per_token_kl
        loss = hapo_ops.aggregate_loss(per_token_loss, valid, agg, **agg_kwargs) / accumulation
        if self.aux_loss_enabled and aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation

        self._log_loss_metrics(mode, out, stats, entropies, valid,
                               per_token_kl if self.beta != 0.0 else None)
        return loss

    def _aggregation(self, inputs, mask, mode) -> tuple[str, dict, float]:
        """(hapo agg mode, denominators, accumulation divisor) reproducing TRL's loss_type."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type == "grpo":
            return "seq-mean-token-mean", {"num_sequences": mask.shape[0]}, accumulation
        if self.loss_type == "bnpo":
            return "token-mean", {}, accumulation
        if self.loss_type == "dr_grpo":
            return ("seq-mean-token-sum-norm",
                    {"normalizer": mask.shape[0] * self.max_completion_length}, accumulation)
        # dapo: num_items_in_batch spans the generation batch of all processes
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return "token-mean", {"num_tokens": normalizer}, 1.0

    def _log_loss_metrics(self, mode, out, stats, entropies, valid, per_token_kl) -> None:
        """Means over the valid tokens of every process: the local sums and counts stacked
        into one vector, one gather across processes and one transfer to the host per
        micro-batch (the pivot, the same on every rank, travels with them)."""
        count = valid.sum().float()
        h_hat = hapo_ops.normalized_entropy(entropies, stats, variant=self.args.hapo_variant)
        sums = {
            "hapo/clip_frac_low": out.clip_frac_low * count,
            "hapo/clip_frac_high": out.clip_frac_high * count,
            "hapo/dual_clip_frac": out.dual_clip_frac * count,
            "hapo/approx_kl": out.approx_kl * count,
            "hapo/h_hat_mean": (h_hat * valid).sum(),
            "entropy": (entropies * valid).sum(),
        }
        if per_token_kl is not None:
            sums["kl"] = (per_token_kl.detach() * valid).sum()
        local = torch.stack([*(value.float() for value in sums.values()), count,
                             stats.pivot.float()])
        rows = self.accelerator.gather(local.unsqueeze(0))  # (processes, metrics + 2)
        *totals, total_count, pivot = torch.cat([rows[:, :-1].sum(dim=0), rows[0, -1:]]).tolist()
        for name, total in zip(sums, totals):
            self._metrics[mode][name].append(total / max(total_count, 1.0))
        self._metrics[mode]["hapo/pivot"].append(pivot)


def _forward_takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` (the base model's under PEFT) has a ``logits_to_keep``
    argument; models without it return the logits of every position."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@contextlib.contextmanager
def _vllm_processor_registered(config: object):
    """While TRL builds its colocated ``vllm.LLM`` (with a fixed argument list), add the
    adaptive-temperature processor to its ``logits_processors`` (the constructor route)."""
    if not (isinstance(config, HAPOGRPOConfig) and config.use_vllm
            and config.vllm_mode == "colocate" and config.hapo_adaptive_temperature):
        yield
        return
    from trl.generation import vllm_generation

    build = vllm_generation.LLM

    def build_with_processor(*args: Any, **kwargs: Any):
        processors = list(kwargs.pop("logits_processors", None) or [])
        return build(*args, logits_processors=[*processors, VLLM_LOGITS_PROCESSOR], **kwargs)

    vllm_generation.LLM = build_with_processor
    try:
        yield
    finally:
        vllm_generation.LLM = build


__all__ = ["HAPOGRPOConfig", "HAPOGRPOTrainer", "SUPPORTED_LOSS_TYPES", "VLLM_LOGITS_PROCESSOR"]
