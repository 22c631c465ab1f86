"""hapo_ops.integrations.verl against the installed verl (0.9.x), on CPU, no mocks.

The batches are built the way verl's trainer builds them: a padded ``DataProto`` batch
(left-padded prompts, right-padded responses, scores on the last valid token, uid strings),
``left_right_2_no_padding`` and verl's own micro-batching for the actor loss.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl")
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

from verl_cpu import install_verl_cpu_platform  # noqa: E402  (tests/verl_cpu.py)

import hapo_ops  # noqa: E402
from hapo_ops.integrations import verl as hapo_verl  # noqa: E402


def _fresh_python(code, **env_overrides):
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_PLUGINS"}
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def test_import_verl_alone_registers_the_estimators_and_the_loss():
    """The entry point: a fresh interpreter that only imports verl sees both estimators, and
    the actor worker and distillation bind the loss dispatcher under verl's name."""
    code = ("import verl\n"
            "from verl.trainer.ppo import core_algos\n"
            "from verl.workers import engine_workers\n"
            "from verl.trainer.distillation import losses as distillation\n"
            "fns = [core_algos.get_adv_estimator_fn(n) for n in ('hapo_tlga', 'hapo_tlga_released')]\n"
            "fns += [engine_workers.ppo_loss, distillation.ppo_loss]\n"
            "print(' '.join(f.__module__ + '.' + f.__name__ for f in fns))\n")
    assert _fresh_python(code) == [
        "hapo_ops.integrations.verl.loss.compute_hapo_tlga_advantage",
        "hapo_ops.integrations.verl.loss.compute_hapo_tlga_released_advantage",
        "hapo_ops.integrations.verl.loss.dispatch_ppo_loss",
        "hapo_ops.integrations.verl.loss.dispatch_ppo_loss"]


def test_engine_vendor_hapo_registers_the_engine_at_import_verl():
    """A worker started with VERL_ENGINE_VENDOR=hapo (Ray's runtime env) gets HAPO's engine
    registered by the plugin, before verl's worker looks its engine up."""
    code = ("import verl\n"
            "from verl.workers.engine import EngineRegistry\n"
            "cls = EngineRegistry._engines['language_model']['fsdp2'][('cuda', 'hapo')]\n"
            "print(cls.__module__ + '.' + cls.__name__)\n")
    assert _fresh_python(code, VERL_ENGINE_VENDOR="hapo") == [
        "hapo_ops.integrations.verl.engine.HAPOFSDPEngineWithLMHead"]


def test_building_the_config_installs_the_loss_without_the_plugin():
    """With verl's plugin discovery off, the worker's own config instantiation (hydra
    ``_target_``) imports this module, which puts the dispatcher in the already-loaded
    actor worker before it binds its loss."""
    code = ("from omegaconf import OmegaConf\n"
            "from verl.workers import engine_workers\n"
            "from verl.utils.config import omega_conf_to_dataclass\n"
            "before = engine_workers.ppo_loss.__name__\n"
            "cfg = OmegaConf.create({'_target_': "
            "'hapo_ops.integrations.verl.HAPOPolicyLossConfig', 'hapo_alpha': 0.5})\n"
            "loss_cfg = omega_conf_to_dataclass(cfg)\n"
            "print(before, type(loss_cfg).__name__, engine_workers.ppo_loss.__name__)\n")
    assert _fresh_python(code, VERL_USE_EXTERNAL_PLUGINS="none") == [
        "ppo_loss", "HAPOPolicyLossConfig", "dispatch_ppo_loss"]


def test_a_failing_registration_is_logged_as_an_error(monkeypatch, caplog):
    """verl logs plugin failures at debug level; this module logs them at ERROR first."""
    def broken():
        raise RuntimeError("registry changed")

    from hapo_ops.integrations.verl import loss

    monkeypatch.setattr(loss, "register_advantage_estimators", broken)
    with caplog.at_level("DEBUG"), pytest.raises(RuntimeError, match="registry changed"):
        hapo_verl.register()
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors and "NOT available" in errors[0].getMessage()


def test_dispatcher_routes_by_the_policy_loss_config():
    from verl.workers.utils import losses

    assert losses.ppo_loss is hapo_verl.dispatch_ppo_loss
    assert hapo_verl.VERL_PPO_LOSS.__module__ == "verl.workers.utils.losses"
    assert hapo_verl.install_loss_dispatcher() == hapo_verl.install_loss_dispatcher()  # idempotent
    with pytest.raises(ValueError, match="loss_mode"):
        hapo_verl.HAPOPolicyLossConfig(loss_mode="gspo")


def _rollout_batch(seed=0, n_prompts=3, n=4, prompt_len=5, response_len=7):
    """A padded batch as verl's trainer holds it after the rollout (``DataProto``)."""
    from verl import DataProto

    g = torch.Generator().manual_seed(seed)
    b = n_prompts * n
    prompt_lens = torch.randint(1, prompt_len + 1, (b,), generator=g)
    response_lens = torch.randint(1, response_len + 1, (b,), generator=g)
    response_lens[0] = response_len  # at least one full-length response
    positions_p = torch.arange(prompt_len)
    positions_r = torch.arange(response_len)
    prompt_mask = positions_p[None, :] >= (prompt_len - prompt_lens)[:, None]  # left padded
    response_mask = positions_r[None, :] < response_lens[:, None]  # right padded
    prompts = torch.randint(3, 50, (b, prompt_len), generator=g) * prompt_mask
    responses = torch.randint(3, 50, (b, response_len), generator=g) * response_mask
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    scores = torch.randint(0, 2, (b,), generator=g).float()
    scores[:n] = torch.tensor([1.0, 0.0, 0.0, 0.0])[:n]
    token_level_rewards = torch.zeros(b, response_len)
    token_level_rewards[torch.arange(b), response_lens - 1] = scores  # on the last valid token
    uids = np.array([str(uuid.UUID(int=int(torch.randint(0, 2**62, (1,), generator=g))))
                     for _ in range(n_prompts)], dtype=object)
    batch = DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses,
                 "input_ids": torch.cat([prompts, responses], dim=1),
                 "attention_mask": attention_mask, "position_ids": position_ids,
                 "response_mask": response_mask.long(),
                 "token_level_rewards": token_level_rewards},
        non_tensors={"uid": np.repeat(uids, n)})
    return batch, scores, response_mask


@pytest.mark.parametrize("name, variant", [("hapo_tlga", "paper"),
                                           ("hapo_tlga_released", "released")])
def test_estimator_as_verls_trainer_calls_it(name, variant):
    from omegaconf import OmegaConf
    from verl.trainer.ppo.ray_trainer import compute_advantage

    batch, scores, response_mask = _rollout_batch()
    # shuffle so that groups are not contiguous
    batch = batch.select_idxs(torch.randperm(len(batch), generator=torch.Generator().manual_seed(1)))
    algorithm = OmegaConf.create({"adv_estimator": name, "norm_adv_by_std_in_grpo": True,
                                  "gamma": 1.0, "lam": 1.0})
    out = compute_advantage(batch, adv_estimator=name, num_repeat=4,
                            norm_adv_by_std_in_grpo=True, config=algorithm)

    uid = batch.non_tensor_batch["uid"]
    _, group_ids = np.unique(uid, return_inverse=True)
    mask = batch.batch["response_mask"].bool()
    expected = hapo_ops.token_level_group_advantages(
        batch.batch["token_level_rewards"].sum(-1), torch.as_tensor(group_ids), mask,
        variant=variant)
    torch.testing.assert_close(out.batch["advantages"], expected.float(), rtol=0, atol=0)
    torch.testing.assert_close(out.batch["returns"], expected.float(), rtol=0, atol=0)
    assert out.batch["advantages"].dtype == torch.float32
    assert (out.batch["advantages"][~mask] == 0).all()


def test_estimator_options_and_uid_types():
    fn = core_algos.get_adv_estimator_fn("hapo_tlga")
    rewards = torch.zeros(6, 4)
    rewards[:, -1] = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 0.0])
    mask = torch.ones(6, 4, dtype=torch.long)
    mask[1, 2:] = 0
    by_str, _ = fn(rewards, mask, config=None, index=np.array(["b", "a", "b", "c", "a", "c"], dtype=object))
    by_int, _ = fn(rewards, mask, index=torch.tensor([7, 3, 7, 1, 3, 1]))
    mixed, _ = fn(rewards, mask, index=np.array([("p", 1), 5, ("p", 1), "x", 5, "x"], dtype=object))
    torch.testing.assert_close(by_str, by_int)
    torch.testing.assert_close(by_str, mixed)
    plain, _ = fn(rewards, mask, config={"norm_adv_by_std_in_grpo": False},
                  index=np.array(["b", "a", "b", "c", "a", "c"], dtype=object))
    expected = hapo_ops.token_level_group_advantages(
        rewards.sum(-1), torch.tensor([1, 0, 1, 2, 0, 2]), mask, normalize_std=False)
    torch.testing.assert_close(plain, expected)
    with pytest.raises(ValueError, match="index"):
        fn(rewards, mask, index=None)


# The README's verl configuration, part by part, plus the sizes of a small run.
DOCUMENTED_OVERRIDES = [
    "algorithm.adv_estimator=hapo_tlga",
    "actor_rollout_ref.actor.policy_loss._target_=hapo_ops.integrations.verl.HAPOPolicyLossConfig",
    "actor_rollout_ref.actor.calculate_entropy=True",
    "actor_rollout_ref.actor.clip_ratio_c=10.0",
]
DOCUMENTED_ENGINE_AND_ROLLOUT = [
    "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_ENGINE_VENDOR=hapo",
    "+actor_rollout_ref.rollout.agent.agent_loop_manager_class="
    "hapo_ops.integrations.verl.rollout.HAPOAgentLoopManager",
    "actor_rollout_ref.rollout.agent.agent_loop_config_path=hapo_agent_loops.yaml",
    "actor_rollout_ref.rollout.agent.default_agent_loop=hapo_single_turn_agent",
    "+actor_rollout_ref.rollout.engine_kwargs.vllm.logits_processors="
    "[hapo_ops.integrations.vllm:AdaptiveTemperatureLogitsProcessor]",
    "actor_rollout_ref.rollout.logprobs_mode=processed_logprobs",
    "actor_rollout_ref.rollout.temperature=1.0",
]
SMALL_RUN = [
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "data.train_batch_size=8", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
    "trainer.n_gpus_per_node=1",
]


def test_readme_lists_the_tested_configuration():
    """Every configuration line these tests build verl's trainers from is in the README."""
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                               "README.md"), encoding="utf-8").read()
    lines = {line.split("#")[0].strip() for line in readme.splitlines()}
    missing = [o for o in DOCUMENTED_OVERRIDES + DOCUMENTED_ENGINE_AND_ROLLOUT if o not in lines]
    assert not missing
    assert AGENT_LOOP_YAML.strip() in readme


def _compose(overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def test_config_machinery_accepts_the_hapo_loss_config():
    """verl's hydra config + omega_conf_to_dataclass (what validate_config and the actor
    worker run) build the actor config with the HAPO fields."""
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    cfg = _compose(DOCUMENTED_OVERRIDES + SMALL_RUN + [
        "+actor_rollout_ref.actor.policy_loss.hapo_alpha=0.5",
        "+actor_rollout_ref.actor.policy_loss.hapo_variant=released",
        "+algorithm.hapo_fallback_threshold=4.0"])
    validate_config(cfg, use_reference_policy=False, use_critic=False)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, hapo_verl.HAPOPolicyLossConfig)
    assert actor.policy_loss.hapo_alpha == 0.5 and actor.policy_loss.hapo_variant == "released"
    assert actor.policy_loss.hapo_beta == 1.0 and actor.policy_loss.hapo_quantile == 0.8
    assert actor.clip_ratio_c == 10.0 and actor.calculate_entropy
    with pytest.raises(ValueError, match="hapo_variant"):
        hapo_verl.HAPOPolicyLossConfig(hapo_variant="other")


@pytest.mark.parametrize("mode", ["sync", "colocate_async", "separate_async"])
def test_documented_config_builds_verls_own_trainer(mode):
    """The HAPO configuration leaves verl's trainer modes alone: verl's own trainer class for
    the mode, its replay buffer, its gen_batch_size and the mode's own settings."""
    pytest.importorskip("transfer_queue")
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync
    from verl.utils.config import validate_config

    extra = [f"trainer.v1.trainer_mode={mode}", "data.gen_batch_size=4"]
    if mode == "separate_async":  # verl's own requirements for this mode
        extra += ["actor_rollout_ref.actor.ppo_mini_batch_size=2",
                  "actor_rollout_ref.rollout.nnodes=1", "actor_rollout_ref.rollout.n_gpus_per_node=1",
                  "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl"]
    cfg = _compose(DOCUMENTED_OVERRIDES + DOCUMENTED_ENGINE_AND_ROLLOUT + SMALL_RUN + extra)
    validate_config(cfg, use_reference_policy=False, use_critic=False)
    # what run_ppo hands to ray.init: every worker's environment selects HAPO's engine
    from omegaconf import OmegaConf
    from verl.trainer.constants_ppo import get_ppo_ray_runtime_env
    from verl.utils.import_utils import load_class_from_fqn

    runtime_env = OmegaConf.merge(get_ppo_ray_runtime_env(cfg), cfg.ray_kwargs.ray_init.runtime_env)
    assert runtime_env.env_vars.VERL_ENGINE_VENDOR == "hapo"
    from hapo_ops.integrations.verl import rollout as verl_rollout

    manager = load_class_from_fqn(cfg.actor_rollout_ref.rollout.agent.agent_loop_manager_class,
                                  "AgentLoopManager")
    assert manager is verl_rollout.HAPOAgentLoopManager
    assert list(cfg.actor_rollout_ref.rollout.engine_kwargs.vllm.logits_processors) == [
        "hapo_ops.integrations.vllm:AdaptiveTemperatureLogitsProcessor"]
    cls = get_trainer_cls(cfg.trainer.v1.trainer_mode)
    assert cls.__module__.startswith("verl.trainer.ppo.v1.trainer_")
    trainer = cls(config=cfg)
    assert trainer.trainer_mode == mode
    buffer = trainer.replay_buffer
    if mode == "sync":
        assert type(buffer) is ReplayBuffer
        assert buffer.gen_batch_size == 4 and trainer.parameter_sync_step == 1
    else:
        assert type(buffer) is ReplayBufferAsync
    if mode == "separate_async":
        assert trainer.parameter_sync_step == cfg.trainer.v1.separate_async.parameter_sync_step == 4


# ----------------------------------------------------------------------------- CPU shims
# verl has no CPU platform and registers its FSDP engine for CUDA/NPU only; its real worker
# and engine run on a CPU with these test-only shims: a CPU platform registered with verl's
# PlatformRegistry (device "cpu", gloo), the gloo process group started first, verl's own
# engine classes registered for device "cpu", a tiny random Qwen2 with a word-level tokenizer.


def _make_tiny_model(path, vocab=64):
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


def _register_engines_for_cpu():
    """verl's FSDP language-model engine (and HAPO's, under vendor "hapo") for device cpu."""
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp import transformer_impl
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from hapo_ops.integrations.verl import engine as verl_engine

    transformer_impl.device_name = "cpu"  # read from the platform when verl was imported
    registry = EngineRegistry._engines["language_model"]
    for backend in ("fsdp", "fsdp2"):
        registry[backend].setdefault("cpu", FSDPEngineWithLMHead)
        registry[backend].setdefault(("cpu", verl_engine.ENGINE_VENDOR), verl_engine.HAPOFSDPEngineWithLMHead)


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def verl_on_cpu(tmp_path_factory):
    """One gloo rank with verl's CPU shims; yields the tiny model's path."""
    import torch.distributed as dist

    if not dist.is_initialized():
        port = _free_port()
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)
    install_verl_cpu_platform()
    _register_engines_for_cpu()
    path = tmp_path_factory.mktemp("tiny_qwen2")
    _make_tiny_model(str(path))
    return str(path)


WORKER_OVERRIDES = ["trainer.device=cpu", "actor_rollout_ref.actor.strategy=fsdp2",
                    "+actor_rollout_ref.model.override_config.attn_implementation=eager"]


def _actor_worker(model_path, overrides):
    from verl.workers.engine_workers import ActorRolloutRefWorker

    cfg = _compose(DOCUMENTED_OVERRIDES + SMALL_RUN + WORKER_OVERRIDES
                   + [f"actor_rollout_ref.model.path={model_path}"] + overrides)
    worker = ActorRolloutRefWorker(config=cfg.actor_rollout_ref, role="actor")
    worker.init_model()
    return worker


def _update_batch(seed=0):
    """An update batch as the trainer hands it to update_actor (no-padding layout)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    batch, _, mask = _rollout_batch(seed=seed)
    g = torch.Generator().manual_seed(seed + 5)
    b, lr = mask.shape
    batch.batch["old_log_probs"] = -torch.rand(b, lr, generator=g) * 4.0 - 1.0
    batch.batch["advantages"] = torch.randn(b, 1, generator=g).expand(b, lr) * mask
    td = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(td, calculate_entropy=True, global_batch_size=b, mini_batch_size=b,
                         epochs=1, seed=1, dataloader_kwargs={"shuffle": False}, temperature=1.0)
    return td


def test_real_actor_worker_installs_the_loss_of_its_config(verl_on_cpu):
    """verl's ActorRolloutRefWorker(role="actor").init_model() on CPU: with the HAPO policy-loss
    config its loss is hapo_loss, with verl's own config verl's ppo_loss; one real update
    (FSDP2, verl's default bf16 mixed precision) with α = β = 0 gives verl's numbers."""
    hapo = _actor_worker(verl_on_cpu, ["+actor_rollout_ref.actor.policy_loss.hapo_alpha=0.0",
                                       "+actor_rollout_ref.actor.policy_loss.hapo_beta=0.0"])
    verl_own = _actor_worker(verl_on_cpu, [
        "actor_rollout_ref.actor.policy_loss._target_=verl.workers.config.PolicyLossConfig"])
    for worker in (hapo, verl_own):
        assert worker.loss_fn.func is hapo_verl.dispatch_ppo_loss
        assert worker.actor.loss_fn is worker.loss_fn
    assert isinstance(hapo.loss_fn.keywords["config"].policy_loss, hapo_verl.HAPOPolicyLossConfig)
    assert not isinstance(verl_own.loss_fn.keywords["config"].policy_loss, hapo_verl.HAPOPolicyLossConfig)

    out = hapo.actor.train_mini_batch(_update_batch())["metrics"]
    ref = verl_own.actor.train_mini_batch(_update_batch())["metrics"]
    assert "actor/hapo/pivot" in out and "actor/hapo/pivot" not in ref  # hapo_loss ran, and verl's
    for name in ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower",
                 "loss", "grad_norm"):
        assert out[name] == pytest.approx(ref[name], rel=1e-6, abs=1e-8), name
    assert out["grad_norm"][0] > 0
    # verl's bonus is aggregated in bf16, hapo_loss's in float32
    assert out["actor/entropy_loss"] == pytest.approx(ref["actor/entropy_loss"], rel=2 ** -7)


# ----------------------------------------------------------------------------- actor loss


def _actor_config(mode="token-mean", **policy):
    from verl.workers.config import FSDPActorConfig
    return FSDPActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2,
                           loss_agg_mode=mode, clip_ratio_c=10.0, clip_ratio_low=0.2,
                           clip_ratio_high=0.28,
                           policy_loss=hapo_verl.HAPOPolicyLossConfig(**policy))


def _actor_batch(seed=0, dp_size=1, micro_batch_size=12, weights=False):
    """The actor's mini-batch after ``_update_actor``'s conversion, split by verl (with
    ``weights``: ``rollout_is_weights`` too, NaN off the response mask)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.utils import prepare_micro_batches
    from verl.workers.utils.padding import left_right_2_no_padding

    batch, _, response_mask = _rollout_batch(seed)
    g = torch.Generator().manual_seed(seed + 10)
    b, lr = response_mask.shape
    batch.batch["old_log_probs"] = -torch.rand(b, lr, generator=g) * 2.0
    batch.batch["advantages"] = torch.randn(b, 1, generator=g).expand(b, lr) * response_mask
    if weights:
        w = torch.rand(b, lr, generator=g) * 1.5 + 0.25
        batch.batch["rollout_is_weights"] = torch.where(response_mask.bool(), w, float("nan"))
    td = left_right_2_no_padding(batch.to_tensordict())
    num_tokens = td["loss_mask"].sum().item() * dp_size  # as if every rank held this much
    tu.assign_non_tensor(td, batch_num_tokens=num_tokens, dp_size=dp_size,
                         global_batch_size=b * dp_size, use_dynamic_bsz=False,
                         micro_batch_size_per_gpu=micro_batch_size)
    micro_batches, _ = prepare_micro_batches(td, dp_group=None, same_micro_num_in_dp=True)
    return batch, micro_batches


def _model_output(micro_batch, w, u):
    """What the engine returns for one micro-batch: nested (jagged) per-position log-probs of
    the next token and entropies, differentiable in the leaves ``w`` and ``u``."""
    input_ids = micro_batch["input_ids"]
    labels = torch.roll(input_ids.values(), -1)  # position p scores token p + 1
    offsets = input_ids.offsets()
    log_probs = -torch.nn.functional.softplus(w[labels])
    entropy = torch.nn.functional.softplus(u[labels]) * torch.exp(-3.0 * w[labels])
    nest = torch.nested.nested_tensor_from_jagged
    return {"log_probs": nest(log_probs, offsets), "entropy": nest(entropy, offsets)}


def _padded_reference(batch, w, u):
    responses = batch.batch["responses"]
    mask = batch.batch["response_mask"].bool()
    logp = -torch.nn.functional.softplus(w[responses])
    entropy = torch.nn.functional.softplus(u[responses]) * torch.exp(-3.0 * w[responses])
    return logp, entropy, mask


def _leaves(seed=3):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(64, generator=g) * 1.5).requires_grad_()
    u = torch.randn(64, generator=g).requires_grad_()
    return w, u


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_hapo_loss_equals_hapo_policy_loss(variant):
    """One micro-batch = the mini-batch: same loss and gradients as hapo_policy_loss."""
    batch, micro_batches = _actor_batch(micro_batch_size=12)
    assert len(micro_batches) == 1
    w, u = _leaves()
    config = _actor_config(hapo_variant=variant, hapo_alpha=0.7, hapo_beta=0.5,
                           hapo_quantile=0.6)
    loss, metrics = hapo_verl.hapo_loss(config, _model_output(micro_batches[0], w, u),
                                        micro_batches[0])
    grad_w, = torch.autograd.grad(loss, [w])

    logp, entropy, mask = _padded_reference(batch, w, u)
    ref = hapo_ops.hapo_policy_loss(logp, batch.batch["old_log_probs"],
                                    batch.batch["advantages"], entropy, mask, variant=variant,
                                    eps_low=0.2, eps_high=0.28, alpha=0.7, beta=0.5,
                                    quantile=0.6, dual_clip=10.0)
    ref_grad_w, = torch.autograd.grad(ref.loss, [w])
    torch.testing.assert_close(loss, ref.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_w, ref_grad_w, rtol=1e-5, atol=1e-8)
    assert grad_w.abs().sum() > 0
    assert metrics["actor/hapo/clip_frac_low"].values == [ref.clip_frac_low.item()]
    assert metrics["actor/pg_clipfrac"].values[0] == pytest.approx(
        (ref.clip_frac_low + ref.clip_frac_high).item())
    stats = hapo_ops.entropy_stats(entropy.detach(), mask, quantile=0.6)
    assert metrics["actor/hapo/pivot"].values == [stats.pivot.item()]
    assert "actor/hapo/h_hat_mean" in metrics and "actor/pg_loss" in metrics


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-sum",
                                  "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("dp_size", [1, 2])
def test_hapo_loss_aggregates_like_verls_agg_loss(mode, dp_size):
    """Micro-batches with verl's global counts: each micro-batch's loss is verl's agg_loss of
    the HAPO per-token loss, so their sum is verl's mini-batch objective."""
    batch, micro_batches = _actor_batch(seed=1, dp_size=dp_size, micro_batch_size=4)
    assert len(micro_batches) == 3
    w, u = _leaves(5)
    config = _actor_config(mode, hapo_stats_scope="local")
    total_grad = torch.zeros_like(w)
    for mb in micro_batches:
        loss, _ = hapo_verl.hapo_loss(config, _model_output(mb, w, u), mb)
        grad_w, = torch.autograd.grad(loss, [w])
        total_grad += grad_w

        from verl.workers.utils.padding import no_padding_2_padding
        out = _model_output(mb, w, u)
        logp = no_padding_2_padding(out["log_probs"], mb)
        entropy = no_padding_2_padding(out["entropy"], mb)
        padded = mb.select("response_mask", "old_log_probs", "advantages").to_padded_tensor()
        mask = padded["response_mask"].bool()
        ref = hapo_ops.hapo_policy_loss(logp, padded["old_log_probs"], padded["advantages"],
                                        entropy, mask, eps_low=0.2, eps_high=0.28,
                                        dual_clip=10.0)
        verl_loss = core_algos.agg_loss(loss_mat=ref.per_token, loss_mask=mask,
                                        loss_agg_mode=mode, dp_size=dp_size,
                                        batch_num_tokens=mb["batch_num_tokens"],
                                        global_batch_size=mb["global_batch_size"])
        torch.testing.assert_close(loss, verl_loss, rtol=1e-6, atol=1e-7)
        verl_grad, = torch.autograd.grad(verl_loss, [w])
        torch.testing.assert_close(grad_w, verl_grad, rtol=1e-5, atol=1e-8)
    assert total_grad.abs().sum() > 0


def test_hapo_loss_rollout_is_weights_go_to_the_policy_loss():
    """rollout_is_weights are hapo_policy_loss's weights= (loss and gradient equal), and a
    NaN weight off the response mask neither reaches the loss nor its gradient."""
    batch, micro_batches = _actor_batch(micro_batch_size=12, weights=True)
    mb = micro_batches[0]
    assert "rollout_is_weights" in mb
    w, u = _leaves()
    config = _actor_config(hapo_alpha=0.7, hapo_beta=0.5, hapo_quantile=0.6)
    loss, _ = hapo_verl.hapo_loss(config, _model_output(mb, w, u), mb)
    grad_w, = torch.autograd.grad(loss, [w])

    logp, entropy, mask = _padded_reference(batch, w, u)
    weights = batch.batch["rollout_is_weights"]
    assert torch.isnan(weights).any()
    ref = hapo_ops.hapo_policy_loss(logp, batch.batch["old_log_probs"], batch.batch["advantages"],
                                    entropy, mask, eps_low=0.2, eps_high=0.28, alpha=0.7,
                                    beta=0.5, quantile=0.6, dual_clip=10.0,
                                    weights=torch.where(mask, weights, 0.0))
    ref_grad_w, = torch.autograd.grad(ref.loss, [w])
    assert torch.isfinite(loss) and torch.isfinite(grad_w).all()
    torch.testing.assert_close(loss, ref.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_w, ref_grad_w, rtol=1e-5, atol=1e-8)


def test_hapo_loss_extra_terms_and_errors():
    batch, micro_batches = _actor_batch(micro_batch_size=12)
    mb = micro_batches[0]
    w, u = _leaves()
    from verl.workers.config import FSDPActorConfig
    config = FSDPActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2,
                             clip_ratio_c=10.0, entropy_coeff=0.01)  # plain PolicyLossConfig
    loss, metrics = hapo_verl.hapo_loss(config, _model_output(mb, w, u), mb)
    base = _actor_config()
    base_loss, _ = hapo_verl.hapo_loss(
        FSDPActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2,
                        clip_ratio_c=10.0, clip_ratio_high=0.2), _model_output(mb, w, u), mb)
    entropy_loss = metrics["actor/entropy_loss"].values[0]
    assert loss.item() == pytest.approx(base_loss.item() - 0.01 * entropy_loss, rel=1e-5)
    assert base.policy_loss.hapo_alpha == 1.0
    out = _model_output(mb, w, u)
    del out["entropy"]
    with pytest.raises(ValueError, match="calculate_entropy"):
        hapo_verl.hapo_loss(base, out, mb)


def _bf16_model_output(micro_batch, w, u):
    """The engine's outputs under verl's default bf16 mixed precision: bf16 log-probs and
    entropies (what FSDP's bf16 forward hands the loss), differentiable in float32 leaves."""
    out = _model_output(micro_batch, w, u)
    nest = torch.nested.nested_tensor_from_jagged
    offsets = micro_batch["input_ids"].offsets()
    return {k: nest(v.values().to(torch.bfloat16), offsets) for k, v in out.items()}


def _float32_entropy(model_output):
    out = dict(model_output)
    nest = torch.nested.nested_tensor_from_jagged
    out["entropy"] = nest(out["entropy"].values().float(), out["entropy"].offsets())
    return out


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-sum",
                                  "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("dp_size", [1, 2])
@pytest.mark.parametrize("entropy_coeff", [0.0, 0.01])
def test_hapo_loss_without_hapo_equals_verls_ppo_loss_in_bf16(mode, dp_size, entropy_coeff):
    """α = β = 0: hapo_loss is verl's own vanilla ppo_loss (same clip bounds, dual clip
    clip_ratio_c) on the same bf16 micro-batches: loss, gradients and every verl metric.

    verl aggregates its entropy bonus in the entropy's dtype (bf16 here), hapo_loss in
    float32: with a bonus, verl's loss is taken on the float32 entropies (verl's own
    aggregation of the same values), and verl's bf16 bonus agrees to bf16 resolution."""
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    _, micro_batches = _actor_batch(seed=2, dp_size=dp_size, micro_batch_size=4)
    w, u = _leaves(7)
    common = dict(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2,
                  loss_agg_mode=mode, clip_ratio_c=3.0, clip_ratio_low=0.2, clip_ratio_high=0.28,
                  entropy_coeff=entropy_coeff)
    hapo_cfg = FSDPActorConfig(policy_loss=hapo_verl.HAPOPolicyLossConfig(
        hapo_alpha=0.0, hapo_beta=0.0), **common)
    verl_cfg = FSDPActorConfig(policy_loss=PolicyLossConfig(), **common)
    for mb in micro_batches:
        loss, metrics = hapo_verl.hapo_loss(hapo_cfg, _bf16_model_output(mb, w, u), mb)
        grads = torch.autograd.grad(loss, [w, u], allow_unused=True)
        verl_out = _bf16_model_output(mb, w, u)
        _, bf16_metrics = hapo_verl.VERL_PPO_LOSS(verl_cfg, verl_out, mb)
        ref_loss, ref_metrics = hapo_verl.VERL_PPO_LOSS(verl_cfg, _float32_entropy(verl_out), mb)
        ref_grads = torch.autograd.grad(ref_loss, [w, u], allow_unused=True)
        assert loss.dtype == ref_loss.dtype == torch.float32
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
        for g, ref_g in zip(grads, ref_grads):
            if ref_g is None:  # no entropy bonus: no gradient into the entropy's leaf
                assert g is None or not g.any()
            else:
                torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-8)
        assert grads[0].abs().sum() > 0
        for name in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower",
                     "actor/pg_loss", "actor/entropy_loss"):
            assert metrics[name].aggregation == ref_metrics[name].aggregation, name
            assert metrics[name].values == pytest.approx(ref_metrics[name].values, rel=1e-6, abs=1e-7), name
            if name != "actor/entropy_loss":
                assert metrics[name].values == pytest.approx(bf16_metrics[name].values, rel=1e-6, abs=1e-7), name
        assert metrics["actor/entropy_loss"].values == pytest.approx(
            bf16_metrics["actor/entropy_loss"].values, rel=2 ** -7)


# ----------------------------------------------------------------------------- HAPO engine

FP32_ENGINE = ["+actor_rollout_ref.actor.fsdp_config.mixed_precision="
               "{param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}"]
STATIC_PAD = ["actor_rollout_ref.actor.fsdp_config.pad_to_length=True",
              "actor_rollout_ref.actor.fsdp_config.pad_to_length_bucket=16"]


def _reference_logits(model_path, input_ids):
    """Independent reference: transformers' own model (eager attention) on each sequence
    alone, float64 softmax; returns per sequence (logits[:-1], next tokens)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="eager",
                                                 dtype=torch.float32)
    out = []
    with torch.no_grad():
        for ids in input_ids.unbind():
            z = model(ids[None], position_ids=torch.arange(len(ids))[None]).logits[0].double()
            out.append((z[:-1], ids[1:]))
    return out


def _reference_h_hat(entropy, pivot, log_max, log_min, eps=1e-8):
    """ĥ of the paper variant in float64, written out here (HAPO §3)."""
    ell = torch.log(torch.clamp(entropy, min=eps))
    above = (ell - pivot) / torch.clamp(log_max - pivot, min=eps)
    below = (ell - pivot) / torch.clamp(pivot - log_min, min=eps)
    return torch.where(ell > pivot, above, below).clamp(-1.0, 1.0)


def _stats_rows(reference, base_temperature, tau):
    """Per-sample statistics around the reference's log-entropies (so ĥ spreads over
    [-1, 1]); sample 0 has none (T = T_base)."""
    from hapo_ops.integrations.verl import engine as verl_engine

    ell = torch.cat([torch.log(-(z.softmax(-1) * z.log_softmax(-1)).sum(-1)) for z, _ in reference])
    lo, hi = ell.min().item(), ell.max().item()
    rows = [verl_engine.rollout_stats_row(None, base_temperature=base_temperature, tau=tau)]
    for i in range(1, len(reference)):
        pivot = lo + (hi - lo) * (0.2 + 0.6 * i / len(reference))
        rows.append(verl_engine.rollout_stats_row((pivot, hi - 0.1 * (hi - lo), lo + 0.1 * (hi - lo)),
                                                  base_temperature=base_temperature, tau=tau))
    return torch.stack(rows)


def _check_against_reference(out, reference, rows):
    """log-probs at T_t, the T = 1 entropy and T_t equal the float64 reference (≤ 1e-5)."""
    from hapo_ops.integrations.verl import engine as verl_engine

    for i, (z, labels) in enumerate(reference):
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
        pivot, log_max, log_min, base, tau = rows[i, :5].double()
        temperature = base * (1.0 + tau * _reference_h_hat(entropy, pivot, log_max, log_min))
        logp = (z / temperature[:, None]).log_softmax(-1).gather(-1, labels[:, None])[:, 0]
        n = len(labels)
        torch.testing.assert_close(out["entropy"][i][:n].double(), entropy, rtol=0, atol=1e-5)
        torch.testing.assert_close(out[verl_engine.TOKEN_TEMPERATURE_KEY][i][:n].double(),
                                   temperature, rtol=0, atol=1e-5)
        torch.testing.assert_close(out["log_probs"][i][:n].double(), logp, rtol=1e-5, atol=1e-5)
    spread = out[verl_engine.TOKEN_TEMPERATURE_KEY].values()
    assert spread.max() - spread.min() > 0.05  # the temperatures do vary per token


def _infer(worker, td, **extra):
    from verl.utils import tensordict_utils as tu

    tu.assign_non_tensor(td, compute_loss=False, calculate_entropy=True, **extra)
    return worker.actor.infer_batch(td)


def _as_transfer_queue_returns(rows):
    """A (batch, K) column as TransferQueue hands it back: stored sample by sample, then
    packed by its storage manager (a jagged nested tensor, whatever the rows' lengths)."""
    from transfer_queue.storage.managers.simple_storage_manager import AsyncSimpleStorageManager

    return AsyncSimpleStorageManager._pack_field_values(list(rows.unbind()))


def test_stats_rows_come_back_dense_from_transfer_queues_nested_column():
    """The per-sample row comes back through TransferQueue as a nested (batch, j) tensor;
    the engine reads it as the dense (batch, 10) rows it was, and refuses ragged rows."""
    from hapo_ops.integrations.verl import engine as verl_engine

    rows = torch.stack([verl_engine.rollout_stats_row(None, base_temperature=0.7, tau=0.2),
                        verl_engine.rollout_stats_row((0.5, 1.0, -2.0), base_temperature=0.7,
                                                      tau=0.2, variant="released")] * 4)
    packed = _as_transfer_queue_returns(rows)
    assert packed.is_nested and packed.layout == torch.jagged
    torch.testing.assert_close(verl_engine.dense_stats_rows(packed), rows, rtol=0, atol=0)
    strided = torch.nested.as_nested_tensor(list(rows.unbind()), layout=torch.strided)
    torch.testing.assert_close(verl_engine.dense_stats_rows(strided), rows, rtol=0, atol=0)
    torch.testing.assert_close(verl_engine.dense_stats_rows(rows.double()), rows, rtol=0, atol=0)
    ragged = torch.nested.as_nested_tensor([rows[0], rows[1, :7]], layout=torch.jagged)
    with pytest.raises(ValueError, match="hapo_rollout_stats must hold 10 values"):
        verl_engine.dense_stats_rows(ragged)
    with pytest.raises(ValueError, match=r"shape \(batch, 10\)"):
        verl_engine.dense_stats_rows(rows[:, :7])
    with pytest.raises(TypeError, match="hapo_rollout_stats must be a tensor"):
        verl_engine.dense_stats_rows(rows.tolist())


@pytest.mark.parametrize("static_pad,transfer_queue", [(False, False), (True, False), (False, True)])
def test_hapo_engine_against_an_independent_reference(verl_on_cpu, monkeypatch, static_pad,
                                                      transfer_queue):
    """VERL_ENGINE_VENDOR=hapo makes verl's own worker build HAPO's engine; on a tiny random
    Qwen2 (fp32, eager attention) its log-probs at the per-token temperatures, the T = 1
    entropy and T_t equal an independent transformers reference, with and without verl's
    static packed padding, and with the statistics column as TransferQueue returns it
    (nested)."""
    from hapo_ops.integrations.verl import engine as verl_engine

    monkeypatch.setenv("VERL_ENGINE_VENDOR", verl_engine.ENGINE_VENDOR)
    worker = _actor_worker(verl_on_cpu, FP32_ENGINE + (STATIC_PAD if static_pad else []))
    engine = worker.actor.engine
    assert type(engine) is verl_engine.HAPOFSDPEngineWithLMHead
    assert engine.pad_to_length == static_pad
    td = _update_batch(seed=3)
    reference = _reference_logits(verl_on_cpu, td["input_ids"])
    rows = _stats_rows(reference, base_temperature=0.9, tau=0.3)
    td[verl_engine.ROLLOUT_STATS_KEY] = _as_transfer_queue_returns(rows) if transfer_queue else rows
    out = _infer(worker, td, temperature=0.9)
    _check_against_reference(out, reference, rows)
    # the statistics of this batch's T = 1 entropies (response tokens), for the next rollout
    response_entropy = torch.cat([
        -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)[-int(td["response_mask"][i].sum()):]
        for i, (z, _) in enumerate(reference)])
    expected = hapo_ops.entropy_stats(response_entropy, torch.ones_like(response_entropy, dtype=torch.bool),
                                      quantile=0.8)
    for got, want in zip(engine.hapo_batch_stats, expected):
        torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=1e-5)


def test_hapo_engine_update_right_after_old_log_probs_has_ratio_one(verl_on_cpu, monkeypatch):
    """T_t stored with the batch when the old log-probs are computed: the update (and the
    reference model) use it, so an update right after has ratio exactly 1."""
    from verl.workers.utils.padding import no_padding_2_padding

    from hapo_ops.integrations.verl import engine as verl_engine

    monkeypatch.setenv("VERL_ENGINE_VENDOR", verl_engine.ENGINE_VENDOR)
    worker = _actor_worker(verl_on_cpu, FP32_ENGINE)
    td = _update_batch(seed=4)
    reference = _reference_logits(verl_on_cpu, td["input_ids"])
    td[verl_engine.ROLLOUT_STATS_KEY] = _stats_rows(reference, base_temperature=1.0, tau=0.5)
    old = _infer(worker, td.clone(), temperature=1.0)
    stored = old[verl_engine.TOKEN_TEMPERATURE_KEY]

    # The reference model: verl builds it as a TrainingWorker through the same registry
    # lookup, so it gets this engine too, and it reads the stored T_t like any batch (verl's
    # forward-only FSDP2 engine pins memory for CPU offload, which needs an accelerator, so
    # the stored-temperature pass runs here on the actor's engine, before the update).
    from verl.workers.engine import EngineRegistry

    assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is verl_engine.HAPOFSDPEngineWithLMHead
    again_td = _update_batch(seed=4)
    again_td[verl_engine.TOKEN_TEMPERATURE_KEY] = stored
    again = _infer(worker, again_td, temperature=1.0)
    torch.testing.assert_close(again["log_probs"].values(), old["log_probs"].values(), rtol=0, atol=0)

    update = _update_batch(seed=4)
    # the response slice of the nested log-probs, as verl's loss slices the new ones
    update["old_log_probs"] = no_padding_2_padding(old["log_probs"], update)
    update[verl_engine.TOKEN_TEMPERATURE_KEY] = stored
    # other statistics ride along too (a later step's): the stored T_t wins
    update[verl_engine.ROLLOUT_STATS_KEY] = _stats_rows(reference, base_temperature=1.0, tau=0.1)
    metrics = worker.actor.train_mini_batch(update)["metrics"]
    assert metrics["actor/ppo_kl"] == pytest.approx([0.0], abs=1e-6)
    assert metrics["actor/hapo/approx_kl"] == pytest.approx([0.0], abs=1e-7)
    assert metrics["actor/pg_clipfrac"] == [0.0]



# Ulysses sequence parallelism on CPU. verl's Ulysses attention is a wrapper around
# transformers' flash-attention forward (all-to-all, attention over the whole packed
# sequence, all-to-all back). flash-attn has no CPU build, so the shim registers an
# attention implementation that routes through that same (verl-patched) hook, and puts a
# varlen causal attention on the CPU in the place of the flash-attn kernel.

CPU_VARLEN_ATTENTION = "hapo_test_cpu_varlen"


def _cpu_varlen_flash_attention(query, key, value, attention_mask, query_length, *args,
                                position_ids=None, softmax_scale=None, **kwargs):
    """flash-attn's varlen causal attention on a CPU: (1, S, H, D) packed query/key/value,
    sequences delimited where position_ids restart, grouped-query heads repeated."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (1, H, S, D)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    segment = (position_ids[0] == 0).cumsum(0)
    n = segment.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = causal & (segment[:, None] == segment[None, :])
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)
    return out.transpose(1, 2)


def _install_cpu_varlen_attention():
    from transformers import AttentionInterface
    from transformers.integrations import flash_attention
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    from verl.models.transformers import monkey_patch

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # through transformers' flash-attention hook, which verl replaces by its Ulysses wrapper
        out = flash_attention._flash_attention_forward(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask,
            query.shape[2], position_ids=kwargs.get("position_ids"), softmax_scale=scaling)
        return out, None

    AttentionInterface.register(CPU_VARLEN_ATTENTION, attention)
    AttentionMaskInterface.register(CPU_VARLEN_ATTENTION, flash_attention_mask)
    monkey_patch._flash_attention_forward = _cpu_varlen_flash_attention  # the kernel's place
    flash_attention._flash_attention_forward = _cpu_varlen_flash_attention  # SP = 1: no wrapper


def _sp_rank_main(model_path, sp_size, out_path, stats_path):
    """One gloo rank of the SP run: HAPO's engine through verl's worker, SP = sp_size."""
    sp_size = int(sp_size)
    import torch.distributed as dist

    from hapo_ops.integrations.verl import engine as verl_engine

    dist.init_process_group("gloo")
    install_verl_cpu_platform()
    _register_engines_for_cpu()
    _install_cpu_varlen_attention()
    os.environ["VERL_ENGINE_VENDOR"] = verl_engine.ENGINE_VENDOR
    worker = _actor_worker(model_path, FP32_ENGINE + [
        f"actor_rollout_ref.actor.ulysses_sequence_parallel_size={sp_size}",
        f"actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size={sp_size}",
        f"trainer.n_gpus_per_node={dist.get_world_size()}",
        f"++actor_rollout_ref.model.override_config.attn_implementation={CPU_VARLEN_ATTENTION}"])
    assert worker.actor.engine.ulysses_sequence_parallel_size == sp_size
    td = _update_batch(seed=6)
    td[verl_engine.ROLLOUT_STATS_KEY] = torch.load(stats_path)
    out = _infer(worker, td, temperature=0.9)
    if dist.get_rank() == 0:
        torch.save({k: out[k].values() for k in ("log_probs", "entropy",
                                                 verl_engine.TOKEN_TEMPERATURE_KEY)}, out_path)
    dist.destroy_process_group()


def _run_ranks(world_size, *args):
    port = str(_free_port())
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import test_verl_integration as t; "
            f"t._sp_rank_main(*{tuple(str(a) for a in args)!r})")
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                   LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=here,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]


def test_hapo_engine_ulysses_sp2_equals_sp1(verl_on_cpu, tmp_path):
    """Ulysses SP = 2 on two gloo ranks gives the SP = 1 result (and both the reference)."""
    td = _update_batch(seed=6)
    reference = _reference_logits(verl_on_cpu, td["input_ids"])
    rows = _stats_rows(reference, base_temperature=0.9, tau=0.3)
    torch.save(rows, tmp_path / "stats.pt")
    results = {}
    for sp_size in (1, 2):
        _run_ranks(sp_size, verl_on_cpu, sp_size, tmp_path / f"sp{sp_size}.pt", tmp_path / "stats.pt")
        results[sp_size] = torch.load(tmp_path / f"sp{sp_size}.pt")
    for key, value in results[1].items():
        torch.testing.assert_close(results[2][key], value, rtol=1e-6, atol=1e-6)
    nest = torch.nested.nested_tensor_from_jagged
    offsets = td["input_ids"].offsets()
    _check_against_reference({k: nest(v, offsets) for k, v in results[2].items()}, reference, rows)


# ----------------------------------------------------------------------------- rollout

AGENT_LOOP_YAML = """\
- name: hapo_single_turn_agent
  _target_: hapo_ops.integrations.verl.rollout.HAPOSingleTurnAgentLoop
"""
ROLLOUT_OVERRIDES = [
    "actor_rollout_ref.rollout.temperature=0.9",
    "+actor_rollout_ref.actor.policy_loss.hapo_tau=0.2",
    "+actor_rollout_ref.actor.policy_loss.hapo_variant=released",
]


class _RecordingLLMServer:
    """Stands in for verl's LLM server client (the vLLM side is tested with vLLM itself):
    records each request's sampling parameters and returns two tokens."""

    def __init__(self):
        self.requests = []

    async def generate(self, *, request_id, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        self.requests.append(dict(sampling_params))
        return TokenOutput(token_ids=[5, 2], log_probs=[-0.5, -0.7], stop_reason="completed")


def _agent_loop(model_path, tmp_path, server):
    """HAPO's agent loop built as verl's AgentLoopWorker builds one: registry entries from
    the YAML at agent_loop_config_path, then hydra.utils.instantiate with verl's wrappers."""
    import asyncio

    import hydra
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset
    from verl.utils.config import omega_conf_to_dataclass

    path = tmp_path / "agent_loops.yaml"
    path.write_text(AGENT_LOOP_YAML)
    cfg = _compose(DOCUMENTED_OVERRIDES + SMALL_RUN + ROLLOUT_OVERRIDES + [
        f"actor_rollout_ref.model.path={model_path}",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={path}",
        "actor_rollout_ref.rollout.agent.default_agent_loop=hapo_single_turn_agent",
        "actor_rollout_ref.rollout.prompt_length=16", "actor_rollout_ref.rollout.response_length=8"])
    model_config = omega_conf_to_dataclass(cfg.actor_rollout_ref.model)
    tokenizer = model_config.tokenizer
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    asyncio.set_event_loop(asyncio.new_event_loop())  # verl's loop binds the current one
    (entry,) = [e for e in OmegaConf.load(path) if e.name == cfg.actor_rollout_ref.rollout.agent.default_agent_loop]
    loop = hydra.utils.instantiate(
        config=entry, trainer_config=DictConfigWrap(config=cfg), server_manager=server,
        tokenizer=tokenizer, processor=None, hf_model_type=None, dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(cfg.data), tools=ToolListWrap([]))
    return cfg, loop


def test_agent_loop_puts_the_statistics_into_extra_args(verl_on_cpu, tmp_path):
    """The manager's prompt entry, through verl's worker hand-off (NonTensorData → .data →
    the loop's kwargs), becomes each request's extra_args["hapo"], with the engine at T = 1;
    verl copies the same entry into the trajectory, which the actor reads."""
    import asyncio

    from tensordict import NonTensorData

    from hapo_ops.integrations.verl import engine as verl_engine, rollout as verl_rollout
    from hapo_ops.integrations.verl.board import PublishedStats
    from hapo_ops.integrations.verl.settings import RolloutSettings, rollout_settings
    from hapo_ops.integrations.verl.wire import column
    from hapo_ops.integrations.vllm import check_sampling_params, parse_sampling_args

    server = _RecordingLLMServer()
    cfg, loop = _agent_loop(verl_on_cpu, tmp_path, server)
    run = asyncio.get_event_loop().run_until_complete
    assert isinstance(loop, verl_rollout.HAPOSingleTurnAgentLoop)
    settings = rollout_settings(cfg)
    assert settings == RolloutSettings(tau=0.2, base_temperature=0.9, variant="released",
                                       eps=1e-8, quantile=0.8)
    stats = hapo_ops.EntropyStats(torch.tensor(0.5), torch.tensor(1.5), torch.tensor(-2.0))
    from verl.utils import tensordict_utils as tu

    prompts = tu.get_tensordict({"input_ids": torch.zeros(3, 2)},
                                non_tensor_dict={"uid": ["a", "b", "c"], "global_steps": 3})
    verl_rollout.attach_rollout_stats(prompts, PublishedStats(stats, 2), settings)
    # AgentLoopWorkerTQ.generate_sequences: a NonTensorData entry goes to every sample as .data
    (chunk, _) = prompts.chunk(2)
    entry = chunk.get(verl_engine.ROLLOUT_STATS_KEY)
    assert isinstance(entry, NonTensorData)
    row = entry.data
    assert (float(column(row, "step")), float(column(row, "stats_step"))) == (3.0, 2.0)
    sampling = {"temperature": 0.9, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0,
                "logprobs": True}
    out = run(loop.run(dict(sampling), raw_prompt=[{"role": "user", "content": "t5 t6"}],
                               **{verl_engine.ROLLOUT_STATS_KEY: row}))
    request = server.requests[-1]
    assert request["temperature"] == 1.0
    expected = hapo_ops.integrations.vllm.sampling_extra_args(
        stats, tau=0.2, base_temperature=0.9, variant="released", eps=1e-8)
    # the row is float32 (the actor reads the same row): the same numbers to float32
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32)) if isinstance(v, float) else v  # noqa: E731
    assert request["extra_args"] == {"hapo": {k: f32(v) for k, v in expected["hapo"].items()}}
    args = parse_sampling_args(request["extra_args"])
    assert (args.pivot, args.log_max, args.log_min) == (0.5, 1.5, -2.0)
    assert args.base_temperature == pytest.approx(0.9) and args.tau == pytest.approx(0.2)

    class Params:  # the fields vLLM's processor checks, as vLLM's SamplingParams holds them
        temperature, min_p, extra_args, sampling_type = request["temperature"], 0.0, request["extra_args"], None
    if importlib_util_find_spec("vllm") is None:
        assert parse_sampling_args(Params.extra_args) is not None
    else:
        assert check_sampling_params(Params) is not None
    assert out.response_ids == [5, 2]
    # the first step (no statistics yet): T_base everywhere, no statistics sent
    verl_rollout.attach_rollout_stats(prompts, None, settings)
    row = prompts.get(verl_engine.ROLLOUT_STATS_KEY)
    run(loop.run(dict(sampling), raw_prompt=[{"role": "user", "content": "t5"}],
                         **{verl_engine.ROLLOUT_STATS_KEY: row.data if hasattr(row, "data") else row}))
    assert "pivot" not in server.requests[-1]["extra_args"]["hapo"]
    # greedy (validation) and requests without the entry stay verl's own
    run(loop.run({**sampling, "temperature": 0.0}, raw_prompt=[{"role": "user", "content": "t5"}],
                         **{verl_engine.ROLLOUT_STATS_KEY: row.data if hasattr(row, "data") else row}))
    assert "extra_args" not in server.requests[-1] and server.requests[-1]["temperature"] == 0.0
    run(loop.run(dict(sampling), raw_prompt=[{"role": "user", "content": "t5"}]))
    assert "extra_args" not in server.requests[-1] and server.requests[-1]["temperature"] == 0.9


def importlib_util_find_spec(name):
    import importlib.util

    return importlib.util.find_spec(name)


def test_publishing_without_a_board_raises():
    """No Ray job (or no HAPO agent-loop manager): publishing raises, naming the manager's
    configuration line, instead of returning quietly; reading finds nothing."""
    from hapo_ops.integrations.verl import board

    import ray

    if ray.is_initialized():
        pytest.skip("a Ray session is running")
    stats = hapo_ops.EntropyStats(torch.tensor(0.5), torch.tensor(1.5), torch.tensor(-2.0))
    with pytest.raises(RuntimeError, match="agent_loop_manager_class=hapo_ops.integrations.verl."
                                           "rollout.HAPOAgentLoopManager"):
        board.publish_entropy_stats(stats, step=1)
    assert board.latest_entropy_stats() is None


def test_hapo_engine_refuses_what_it_does_not_cover(monkeypatch):
    """The backends HAPO's engine does not cover (veomni, torchtitan) under the hapo vendor
    key, and verl's fused kernels or padded inputs, raise instead of silently losing the
    exact entropy (Megatron: tests/test_verl_megatron.py, in its own environment)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine import EngineRegistry

    from hapo_ops.integrations.verl import engine as verl_engine

    monkeypatch.setenv("VERL_ENGINE_VENDOR", verl_engine.ENGINE_VENDOR)
    monkeypatch.setenv("VERL_ENGINE_DEVICE", "cuda")
    for backend in ("veomni", "torchtitan"):
        cls = EngineRegistry.get_engine_cls("language_model", backend)
        assert cls is verl_engine.HAPOUnsupportedEngine
        with pytest.raises(NotImplementedError, match="fsdp/fsdp2 and megatron"):
            cls()
    for flags, match in (({"use_fused_kernels": True}, "use_fused_kernels"),
                         ({"use_remove_padding": False}, "use_remove_padding")):
        td = tu.get_tensordict({"input_ids": torch.zeros(2, 3)}, non_tensor_dict=flags)
        with pytest.raises(NotImplementedError, match=match):
            verl_engine.HAPOFSDPEngineWithLMHead.prepare_model_inputs(None, td)


# ----------------------------------------------------------------------------- checks and metrics


def test_variant_of_code_refuses_unknown_codes():
    from hapo_ops.integrations.verl import wire

    assert [wire.variant_of_code(c) for c in (0.0, 1.0)] == ["paper", "released"]
    for code in (2.0, -1.0, 0.5, float("nan")):
        with pytest.raises(ValueError, match="variant code must be one of"):
            wire.variant_of_code(code)


def test_hapo_beta_outside_zero_one_is_refused_by_name():
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="hapo_beta"):
            hapo_verl.HAPOPolicyLossConfig(hapo_beta=beta)
    from hydra.errors import InstantiationException
    from verl.utils.config import omega_conf_to_dataclass

    cfg = _compose(DOCUMENTED_OVERRIDES + ["+actor_rollout_ref.actor.policy_loss.hapo_beta=2.0"])
    # as verl builds the actor's config (hydra wraps the ValueError)
    with pytest.raises(InstantiationException, match=r"hapo_beta must be <= 1.0, got 2.0"):
        omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert hapo_verl.HAPOPolicyLossConfig(hapo_beta=0.0).hapo_beta == 0.0
    assert hapo_verl.HAPOPolicyLossConfig(hapo_beta=1.0).hapo_beta == 1.0


def test_row_settings_are_read_once_and_must_agree():
    from hapo_ops.integrations.verl import wire
    from hapo_ops.integrations.verl.settings import RolloutSettings

    settings = RolloutSettings(tau=0.3, base_temperature=0.8, variant="released", eps=1e-6,
                               quantile=0.7)
    rows = torch.stack([wire.encode_row(None, settings, step=4),
                        wire.encode_row((0.1, 1.0, -1.0), settings, step=4, stats_step=3)])
    got = wire.row_settings(rows)
    assert got.variant == "released" and got.tau == pytest.approx(0.3)
    assert got.base_temperature == pytest.approx(0.8) and got.quantile == pytest.approx(0.7)
    assert wire.has_stats(rows).tolist() == [False, True]
    other = wire.encode_row(None, settings._replace(tau=0.1), step=4)
    with pytest.raises(ValueError, match="tau must be the same"):
        wire.row_settings(torch.stack([rows[0], other]))


def test_rollout_metrics_of_a_batch():
    """min / mean / max of T_t over the response tokens only; has_stats the share of samples
    with statistics; stats_age their step minus the statistics' step, -1 when none had any."""
    from hapo_ops.integrations.verl import rollout, wire
    from hapo_ops.integrations.verl.settings import RolloutSettings

    settings = RolloutSettings(tau=0.5, base_temperature=1.0, variant="paper", eps=1e-8, quantile=0.8)
    with_stats = wire.encode_row((0.1, 1.0, -1.0), settings, step=5, stats_step=4)
    without = wire.encode_row(None, settings, step=1)
    temperature = torch.tensor([[0.6, 1.4, 9.0], [1.0, 0.9, 9.0]])  # 9.0: off the response
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    nested = _as_transfer_queue_returns(torch.stack([with_stats, with_stats]))
    got = rollout.rollout_metrics(nested, temperature, mask)
    assert got["rollout/hapo/temperature_min"] == pytest.approx(0.6)
    assert got["rollout/hapo/temperature_max"] == pytest.approx(1.4)
    assert got["rollout/hapo/temperature_mean"] == pytest.approx(0.975)
    assert got["rollout/hapo/has_stats"] == 1.0 and got["rollout/hapo/stats_age"] == 1.0
    jagged = torch.nested.as_nested_tensor([temperature[0, :2], temperature[1, :2]], layout=torch.jagged)
    jagged_mask = torch.nested.as_nested_tensor([mask[0, :2], mask[1, :2]], layout=torch.jagged)
    assert rollout.rollout_metrics(nested, jagged, jagged_mask) == got
    first = rollout.rollout_metrics(torch.stack([without, without]))
    assert first == {"rollout/hapo/has_stats": 0.0, "rollout/hapo/stats_age": rollout.NO_STATS_AGE}


def test_manager_refuses_a_rollout_without_the_hapo_processor_or_engine(monkeypatch):
    from hapo_ops.integrations.verl import rollout

    monkeypatch.delenv("VERL_ENGINE_VENDOR", raising=False)
    rollout.check_rollout_config(_compose(DOCUMENTED_OVERRIDES + DOCUMENTED_ENGINE_AND_ROLLOUT))
    no_processor = [o for o in DOCUMENTED_ENGINE_AND_ROLLOUT if "logits_processors" not in o]
    with pytest.raises(ValueError, match=re.escape(rollout.PROCESSOR_LINE)):
        rollout.check_rollout_config(_compose(DOCUMENTED_OVERRIDES + no_processor))
    no_engine = [o for o in DOCUMENTED_ENGINE_AND_ROLLOUT if "VERL_ENGINE_VENDOR" not in o]
    with pytest.raises(ValueError, match=re.escape(rollout.ENGINE_LINE)):
        rollout.check_rollout_config(_compose(DOCUMENTED_OVERRIDES + no_engine))
    with pytest.raises(ValueError, match="rollout.name=vllm"):
        rollout.check_rollout_config(_compose(DOCUMENTED_OVERRIDES + DOCUMENTED_ENGINE_AND_ROLLOUT
                                              + ["actor_rollout_ref.rollout.name=sglang"]))


def _pooled_loss_rank(rank, world):
    """One rank of a data-parallel hapo_loss: its own micro-batch, verl's dispatcher with the
    data-parallel group, as verl's actor worker calls it."""
    import torch.distributed as dist

    _, micro_batches = _actor_batch(seed=rank, dp_size=world, micro_batch_size=12)
    w, u = _leaves(3 + 4 * rank)
    config = _actor_config(hapo_stats_scope="dp", hapo_quantile=0.6)
    mb = micro_batches[0]
    output = _model_output(mb, w, u)
    loss, metrics = hapo_verl.dispatch_ppo_loss(config, output, mb, dp_group=dist.group.WORLD)
    from verl.workers.utils.padding import no_padding_2_padding
    entropy = no_padding_2_padding(output["entropy"], mb).detach()
    mask = mb.select("response_mask").to_padded_tensor()["response_mask"].bool()
    return {"pivot": metrics["actor/hapo/pivot"].values[0], "loss": loss.item(),
            "entropy": entropy[mask]}


def test_hapo_loss_pools_the_statistics_over_two_data_parallel_ranks():
    """Two gloo ranks, each with its own micro-batch: with hapo_stats_scope="dp" the pivot
    (actor/hapo/pivot) is that of both ranks' tokens together, the same on both ranks, and
    not either rank's own."""
    from distributed_harness import run_ranks

    results = run_ranks(_pooled_loss_rank, 2)
    pooled = torch.cat([r["entropy"] for r in results])
    expected = hapo_ops.entropy_stats(pooled, torch.ones_like(pooled, dtype=torch.bool), quantile=0.6)
    for r in results:
        assert r["pivot"] == pytest.approx(expected.pivot.item(), rel=1e-6)
        local = hapo_ops.entropy_stats(r["entropy"], torch.ones_like(r["entropy"], dtype=torch.bool),
                                       quantile=0.6)
        assert abs(local.pivot.item() - expected.pivot.item()) > 1e-3


def test_hapo_engine_entropy_bonus_has_verls_gradient(verl_on_cpu, monkeypatch):
    """entropy_coeff > 0 with zero advantages: the gradient is the entropy bonus's alone, and
    under HAPO's engine it equals the one under verl's own engine (a detached entropy output
    would give none)."""
    from hapo_ops.integrations.verl import engine as verl_engine

    def grad_norm(vendor):
        if vendor:
            monkeypatch.setenv("VERL_ENGINE_VENDOR", vendor)
        else:
            monkeypatch.delenv("VERL_ENGINE_VENDOR", raising=False)
        worker = _actor_worker(verl_on_cpu, FP32_ENGINE + ["actor_rollout_ref.actor.entropy_coeff=0.5"])
        assert (type(worker.actor.engine) is verl_engine.HAPOFSDPEngineWithLMHead) == bool(vendor)
        td = _update_batch(seed=6)
        td["advantages"] = torch.zeros_like(td["advantages"])
        return worker.actor.train_mini_batch(td)["metrics"]["grad_norm"][0]

    hapo, verl_own = grad_norm(verl_engine.ENGINE_VENDOR), grad_norm(None)
    assert verl_own > 0
    assert hapo == pytest.approx(verl_own, rel=1e-4)


def test_hapo_engine_checkpoint_carries_the_statistics(verl_on_cpu, monkeypatch, tmp_path, caplog):
    """The statistics of the last old-log-prob pass are saved with verl's actor checkpoint
    and restored when a fresh engine loads it (published again: here, without Ray, an ERROR
    says they could not be)."""
    from hapo_ops.integrations.verl import engine as verl_engine

    monkeypatch.setenv("VERL_ENGINE_VENDOR", verl_engine.ENGINE_VENDOR)
    worker = _actor_worker(verl_on_cpu, FP32_ENGINE)
    td = _update_batch(seed=3)
    reference = _reference_logits(verl_on_cpu, td["input_ids"])
    rows = _stats_rows(reference, base_temperature=1.0, tau=0.3)
    rows[:, verl_engine.ROLLOUT_STATS_FIELDS.index("step")] = 7.0
    td[verl_engine.ROLLOUT_STATS_KEY] = rows
    _infer(worker, td, temperature=1.0)
    saved = worker.actor.engine.hapo_batch_stats
    worker.actor.engine.save_checkpoint(str(tmp_path), global_step=7)
    assert (tmp_path / verl_engine.STATS_CHECKPOINT_FILE).exists()

    fresh = _actor_worker(verl_on_cpu, FP32_ENGINE)
    assert getattr(fresh.actor.engine, "hapo_batch_stats", None) is None
    with caplog.at_level("ERROR"):
        fresh.actor.engine.load_checkpoint(str(tmp_path), del_local_after_load=False)
    assert fresh.actor.engine.hapo_batch_step == 7
    for got, want in zip(fresh.actor.engine.hapo_batch_stats, saved):
        assert float(got) == float(want)
    assert "not published" in caplog.text


def test_verl_package_modules_import_one_way():
    """settings, wire, board, loss, engine, megatron_engine, rollout: each module of the
    package imports (at any depth of its code) only modules before it."""
    import ast
    import pathlib

    order = ["settings", "wire", "board", "loss", "engine", "megatron_engine", "rollout"]
    package = pathlib.Path(hapo_verl.__file__).parent
    assert sorted(p.stem for p in package.glob("*.py")) == sorted(order + ["__init__"])
    for position, name in enumerate(order):
        tree = ast.parse((package / f"{name}.py").read_text(encoding="utf-8"))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "hapo_ops.integrations.verl":
                    imported.update(alias.name for alias in node.names)
                elif node.module.startswith("hapo_ops.integrations.verl."):
                    imported.add(node.module.rsplit(".", 1)[1])
            elif isinstance(node, ast.Import):
                imported.update(a.name.rsplit(".", 1)[1] for a in node.names
                                if a.name.startswith("hapo_ops.integrations.verl."))
        assert imported <= set(order[:position]), (name, imported - set(order[:position]))
