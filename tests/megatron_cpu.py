"""verl's Megatron engine on CPU: the test-only shims, the tiny model, the ranks' work.

verl 0.9.x runs its Megatron engine on CUDA/NPU only; the legacy mbridge path
(``vanilla_mbridge=True``) constructs it and runs its forward and backward on a CPU with the
shims of :func:`install_cpu_shims` (each commented with what it stands in for). Megatron's
optimizer cannot run on a CPU (CUDA tensors and streams in ``get_megatron_optimizer`` and the
DDP grad buffers), so the engine is built with ``forward_only=True`` (no optimizer, no DDP
wrapper) and the backward runs through verl's ``forward_backward_batch`` and Megatron's
schedule into the parameters' ``.grad``.

The functions named ``rank_*`` run on every rank of a gloo group (tests/distributed_harness.py).
"""

from __future__ import annotations

import os
import types

import torch

from verl_cpu import install_verl_cpu_platform

VOCAB = 64


def make_tiny_model(path: str, vocab: int = VOCAB) -> None:
    """A tiny random Qwen2 (fp32, untied output layer) with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2",
                            bos_token="t3").save_pretrained(path)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=1, eos_token_id=2, bos_token_id=3,
                      initializer_range=0.5)  # entropies spread from near 0 to ln V
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)


class _CPUZerosTorch(types.ModuleType):
    """torch for Megatron's schedules module, whose token counter is created on "cuda"."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, **kwargs)


def install_cpu_shims() -> None:
    """Everything verl's Megatron engine (legacy mbridge path) needs to run on a CPU."""
    install_verl_cpu_platform()

    # Megatron's CUDA RNG tracker: its states kept on the CPU generator.
    from megatron.core.tensor_parallel import random as mrandom
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    # RoPE and mbridge ask for the current CUDA device.
    torch.cuda.current_device = lambda: "cpu"
    # Megatron's pipeline send/receive synchronises the GPU around its shape exchange.
    torch.cuda.synchronize = lambda *a, **k: None
    # mbridge moves the built model to the GPU.
    torch.nn.Module.cuda = lambda self, *a, **k: self

    # mbridge compares with ModelType.encoder_and_decoder, gone from this megatron-core.
    from megatron.core.enums import ModelType
    import mbridge.core.util as mutil
    mutil.ModelType = types.SimpleNamespace(encoder_or_decoder=ModelType.encoder_or_decoder,
                                            encoder_and_decoder=object())

    # mbridge builds TransformerEngine layers: the local (torch) layer spec instead, with the
    # names of its layer-norm weights (separate modules instead of fused into the linears).
    from megatron.core.models.gpt import gpt_layer_specs
    import mbridge.core.llm_bridge as llm_bridge
    from mbridge.models.qwen2 import Qwen2Bridge

    def local_block_spec(config, use_transformer_engine=True, **kwargs):
        return gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                                          **kwargs)

    llm_bridge.get_gpt_decoder_block_spec = local_block_spec
    Qwen2Bridge._OTHER_MAPPING = {
        **getattr(Qwen2Bridge, "_OTHER_MAPPING", {}),
        "input_layernorm.weight": ["model.layers.{layer_number}.input_layernorm.weight"]}
    Qwen2Bridge._MLP_MAPPING = {
        "pre_mlp_layernorm.weight": ["model.layers.{layer_number}.post_attention_layernorm.weight"],
        **Qwen2Bridge._MLP_MAPPING}

    # verl logs GPU memory.
    import verl.workers.engine.megatron.transformer_impl as impl
    impl.log_gpu_memory_usage = lambda *a, **k: None

    # Megatron's local attention refuses packed sequences (TransformerEngine's takes them):
    # the same attention with a block-diagonal causal mask over the packed sequences.
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    if not hasattr(DotProductAttention, "unpacked_forward"):
        DotProductAttention.unpacked_forward = DotProductAttention.forward

        def packed_forward(self, query, key, value, attention_mask, attn_mask_type=None,
                           attention_bias=None, packed_seq_params=None):
            if packed_seq_params is not None:
                cu = packed_seq_params.cu_seqlens_q_padded
                if cu is None:
                    cu = packed_seq_params.cu_seqlens_q
                n = query.shape[0]
                sequence = torch.searchsorted(cu[1:].to(query.device),
                                              torch.arange(n, device=query.device), right=True)
                position = torch.arange(n, device=query.device)
                allowed = (sequence[:, None] == sequence[None, :]) & (
                    position[None, :] <= position[:, None])
                attention_mask = ~allowed[None, None]
                # packed (thd) tensors are [t, heads, dim]: one batch of t tokens
                out = self.unpacked_forward(query.unsqueeze(1), key.unsqueeze(1),
                                            value.unsqueeze(1), attention_mask,
                                            attn_mask_type=attn_mask_type,
                                            attention_bias=attention_bias)
                return out.squeeze(1)
            if attention_mask is not None and attention_mask.dim() == 2:
                # verl's padded (bshd) inputs carry a (b, s) mask of the valid tokens, which
                # TransformerEngine's attention takes: causal and key padding, True = masked
                s = attention_mask.shape[1]
                causal = torch.ones(s, s, dtype=torch.bool, device=query.device).tril()
                attention_mask = ~(causal[None] & attention_mask.bool()[:, None, :])[:, None]
            return self.unpacked_forward(query, key, value, attention_mask,
                                         attn_mask_type=attn_mask_type,
                                         attention_bias=attention_bias)

        DotProductAttention.forward = packed_forward

    # Megatron's no-pipelining schedule creates its token counter on "cuda".
    from megatron.core.pipeline_parallel import schedules
    schedules.torch = _CPUZerosTorch("torch_for_megatron_schedules")


def seed_megatron(seed: int) -> None:
    """verl skips Megatron's model-parallel RNG seeding without an accelerator."""
    from megatron.core import tensor_parallel
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def engine_batch(seed: int = 0, b: int = 6, prompt_len: int = 5, response_len: int = 7,
                 temperature: float = 1.0):
    """A batch as verl's actor worker hands it to its engine (no-padding, nested layout)."""
    from verl import DataProto
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(1, prompt_len + 1, (b,), generator=g)
    response_lens = torch.randint(1, response_len + 1, (b,), generator=g)
    response_lens[0] = response_len
    prompt_mask = torch.arange(prompt_len)[None, :] >= (prompt_len - prompt_lens)[:, None]
    response_mask = torch.arange(response_len)[None, :] < response_lens[:, None]
    prompts = torch.randint(3, VOCAB, (b, prompt_len), generator=g) * prompt_mask
    responses = torch.randint(3, VOCAB, (b, response_len), generator=g) * response_mask
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    batch = DataProto.from_dict(tensors={
        "prompts": prompts, "responses": responses,
        "input_ids": torch.cat([prompts, responses], dim=1), "attention_mask": attention_mask,
        "position_ids": position_ids, "response_mask": response_mask.long()})
    td = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(td, calculate_entropy=True, compute_loss=False, use_dynamic_bsz=False,
                         micro_batch_size_per_gpu=b // 2, temperature=temperature)
    return td


# ----------------------------------------------------------------------------- on each rank

_ENGINES: dict = {}


def build_engine(model_path: str, *, tp: int, data_format: str = "thd", pp: int = 1):
    """verl's engine registered under ``VERL_ENGINE_VENDOR=hapo`` for Megatron, built by
    verl's own ``initialize`` (legacy mbridge, fp32 parameters, no sequence parallelism),
    once per process and configuration."""
    key = (model_path, tp, pp, data_format)
    if key in _ENGINES:
        return _ENGINES[key]
    install_cpu_shims()
    from megatron.core import parallel_state as mpu
    if mpu.is_initialized() and (mpu.get_tensor_model_parallel_world_size() != tp
                                 or mpu.get_pipeline_model_parallel_world_size() != pp):
        # another layout on this process before: verl builds Megatron's groups anew
        mpu.destroy_model_parallel()
        _ENGINES.clear()
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import HFModelConfig, McoreEngineConfig, McoreOptimizerConfig
    from verl.workers.engine import EngineRegistry

    from hapo_ops.integrations.verl import megatron_engine  # noqa: F401  (registers it)

    os.environ["VERL_ENGINE_VENDOR"] = "hapo"
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"  # the registry key verl uses on a GPU machine
    cls = EngineRegistry.get_engine_cls("language_model", "megatron")
    engine_config = McoreEngineConfig(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=False, vanilla_mbridge=True, forward_only=True,
        use_remove_padding=data_format == "thd", use_dynamic_bsz=False,
        micro_batch_size_per_gpu=3,
        # torch's LayerNorm (the local layer spec) refuses sequence parallelism
        override_transformer_config={"sequence_parallel": False})
    # verl accepts bf16/fp16 only; fp32 parameters make the comparison with the float64
    # reference tight (a test-only override of the validated field)
    object.__setattr__(engine_config, "dtype", "float32")
    engine = cls(HFModelConfig(path=model_path), engine_config, McoreOptimizerConfig(lr=1e-3),
                 CheckpointConfig())
    seed_megatron(1)
    engine.initialize()
    _ENGINES[key] = engine
    return engine


def _flat(nested: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return nested.values().detach().clone(), nested.offsets().clone()


def rank_infer(rank: int, world: int, model_path: str, data_format: str, seed: int,
               rows: torch.Tensor | None, temperature: float, stored: torch.Tensor | None = None,
               tp: int = 2, pp: int = 1) -> dict:
    """The old-log-prob pass (verl's ``infer_batch``) of the engine on one batch; the
    outputs as (values, offsets) and the engine's batch statistics."""
    from hapo_ops.integrations.verl.wire import ROLLOUT_STATS_KEY, TOKEN_TEMPERATURE_KEY

    engine = build_engine(model_path, tp=tp, pp=pp, data_format=data_format)
    engine.hapo_batch_stats = None
    td = engine_batch(seed, temperature=temperature)
    if rows is not None:
        td[ROLLOUT_STATS_KEY] = rows
    if stored is not None:
        values, offsets = stored
        td[TOKEN_TEMPERATURE_KEY] = torch.nested.nested_tensor_from_jagged(values, offsets)
    out = engine.infer_batch(td)
    result = {"engine": type(engine).__name__,
              "stats": None if engine.hapo_batch_stats is None
              else tuple(v.clone() for v in engine.hapo_batch_stats)}
    for key, value in out.get("model_output", {}).items():
        result[key] = _flat(value)
    return result


def response_weights(seed: int, td) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed per-token weights (a, b) of the backward test's loss Σ a·logp + b·H over the
    response tokens, (batch, max response length)."""
    g = torch.Generator().manual_seed(seed + 100)
    responses = td["responses"]
    length = int(responses.offsets().diff().max()) if responses.is_nested else responses.shape[1]
    shape = (len(td), length)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def rank_backward(rank: int, world: int, model_path: str, data_format: str, seed: int,
                  rows: torch.Tensor, temperature: float, tp: int = 2, pp: int = 1) -> dict:
    """One forward and backward through verl's ``forward_backward_batch`` (Megatron's
    schedule, two micro-batches) of the loss Σ a·logp + b·H over the response tokens; the
    gradients of this rank's output-layer shard, embedding shard and final norm (those its
    pipeline stage holds)."""
    from verl.workers.utils.padding import no_padding_2_padding

    from hapo_ops.integrations.verl.wire import ROLLOUT_STATS_KEY

    engine = build_engine(model_path, tp=tp, pp=pp, data_format=data_format)
    model = engine.module[0]
    for p in model.parameters():
        p.grad = None
    td = engine_batch(seed, temperature=temperature)
    td[ROLLOUT_STATS_KEY] = rows
    a_all, b_all = response_weights(seed, td)

    def loss_function(model_output, data, dp_group=None):
        logp = no_padding_2_padding(model_output["log_probs"], data)
        entropy = no_padding_2_padding(model_output["entropy"], data)
        mask = data.select("response_mask").to_padded_tensor()["response_mask"].bool()
        index = data["hapo_sample_index"].long()
        a, b = a_all[index][:, :logp.shape[1]], b_all[index][:, :logp.shape[1]]
        return ((a * logp + b * entropy) * mask).sum(), {}

    td["hapo_sample_index"] = torch.arange(len(td))
    engine.forward_backward_batch(td, loss_function, forward_only=False)
    named = dict(model.named_parameters())
    return {name: named[name].grad.detach().clone() for name in
            ("output_layer.weight", "embedding.word_embeddings.weight",
             "decoder.final_layernorm.weight") if name in named}


def rank_checkpoint(rank: int, world: int, model_path: str, rows: torch.Tensor, path: str,
                    tp: int = 2, pp: int = 1) -> dict:
    """The old-log-prob pass, then verl's ``save_checkpoint`` into ``path``; then the
    statistics dropped and verl's ``load_checkpoint`` from it: what each rank restored."""
    from hapo_ops.integrations.verl.engine import STATS_CHECKPOINT_FILE
    from hapo_ops.integrations.verl.wire import ROLLOUT_STATS_KEY

    engine = build_engine(model_path, tp=tp, pp=pp)
    # Test-only: verl's own Megatron checkpoint needs its checkpoint manager, which verl
    # builds only with the optimizer, and verl's Megatron optimizer needs CUDA (module
    # docstring); so verl's part of save/load is a no-op here (patched where verl defines
    # it, restored below) and HAPO's part (the statistics file of the publishing rank,
    # restored and published on load) runs as is.
    verl_part = {"save_checkpoint": lambda self, *a, **k: torch.distributed.barrier(),
                 "load_checkpoint": lambda self, *a, **k: None}
    saved_methods = []
    for name, method in verl_part.items():
        owner = next(c for c in type(engine).__mro__
                     if name in c.__dict__ and c.__module__.startswith("verl."))
        saved_methods.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, method)
    try:
        engine.hapo_batch_stats, engine.hapo_batch_step = None, None
        td = engine_batch(3, temperature=0.9)
        td[ROLLOUT_STATS_KEY] = rows
        engine.infer_batch(td)
        computed, computed_step = engine.hapo_batch_stats, engine.hapo_batch_step
        engine.save_checkpoint(path, global_step=4)
        torch.distributed.barrier()
        written = os.path.exists(os.path.join(path, STATS_CHECKPOINT_FILE))
        engine.hapo_batch_stats, engine.hapo_batch_step = None, None
        engine.load_checkpoint(path, del_local_after_load=False)
        restored = engine.hapo_batch_stats
    finally:
        for owner, name, method in saved_methods:
            setattr(owner, name, method)
    return {"publishes": engine.publishes_stats(), "written": written,
            "computed": None if computed is None else tuple(float(v) for v in computed),
            "restored": None if restored is None else tuple(float(v) for v in restored),
            "step": engine.hapo_batch_step, "computed_step": computed_step}
