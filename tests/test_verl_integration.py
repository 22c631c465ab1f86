"""hapo_ops.integrations.verl against the installed verl (0.9.x), on CPU, no mocks.

The batches are built the way verl's trainer builds them: a padded ``DataProto`` batch
(left-padded prompts, right-padded responses, scores on the last valid token, uid strings),
``left_right_2_no_padding`` and verl's own micro-batching for the actor loss.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl")
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

import hapo_ops  # noqa: E402
from hapo_ops.integrations import verl as hapo_verl  # noqa: E402


def test_import_verl_alone_registers_the_estimators():
    """The entry point: a fresh interpreter that only imports verl sees both estimators."""
    code = ("import verl\n"
            "from verl.trainer.ppo import core_algos\n"
            "fns = [core_algos.get_adv_estimator_fn(n) for n in ('hapo_tlga', 'hapo_tlga_released')]\n"
            "print(' '.join(f.__module__ + '.' + f.__name__ for f in fns))\n")
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_PLUGINS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [
        "hapo_ops.integrations.verl.compute_hapo_tlga_advantage",
        "hapo_ops.integrations.verl.compute_hapo_tlga_released_advantage"]


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


def test_config_machinery_accepts_the_hapo_loss_config():
    """verl's hydra config + omega_conf_to_dataclass (what validate_config and the actor
    worker run) build the actor config with the HAPO fields."""
    from hydra import compose, initialize_config_module
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    overrides = [
        "algorithm.adv_estimator=hapo_tlga",
        "trainer.v1.trainer_mode=hapo_sync",
        "actor_rollout_ref.actor.calculate_entropy=True",
        "actor_rollout_ref.actor.clip_ratio_c=10.0",
        "actor_rollout_ref.actor.policy_loss._target_=hapo_ops.integrations.verl.HAPOPolicyLossConfig",
        "+actor_rollout_ref.actor.policy_loss.hapo_alpha=0.5",
        "+actor_rollout_ref.actor.policy_loss.hapo_variant=released",
        "+algorithm.hapo_fallback_threshold=4.0",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "data.train_batch_size=8", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "trainer.n_gpus_per_node=1",
    ]
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    validate_config(cfg, use_reference_policy=False, use_critic=False)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, hapo_verl.HAPOPolicyLossConfig)
    assert actor.policy_loss.hapo_alpha == 0.5 and actor.policy_loss.hapo_variant == "released"
    assert actor.policy_loss.hapo_beta == 1.0 and actor.policy_loss.hapo_quantile == 0.8
    assert actor.clip_ratio_c == 10.0 and actor.calculate_entropy
    with pytest.raises(ValueError, match="hapo_variant"):
        hapo_verl.HAPOPolicyLossConfig(hapo_variant="other")


def test_trainer_modes_registered_with_verls_v1_trainers():
    pytest.importorskip("transfer_queue")
    from verl.trainer.ppo.v1 import PPOTrainerSync, get_trainer_cls

    cls = get_trainer_cls("hapo_sync")
    assert issubclass(cls, PPOTrainerSync) and cls is not PPOTrainerSync
    assert cls.on_init_end is not PPOTrainerSync.on_init_end
    assert issubclass(get_trainer_cls("hapo_colocate_async"), get_trainer_cls("colocate_async"))
    assert hapo_verl.register_trainers().count("hapo_sync") == 1  # idempotent
    assert get_trainer_cls("hapo_sync") is cls


# ----------------------------------------------------------------------------- actor loss


def _actor_config(mode="token-mean", **policy):
    from verl.workers.config import FSDPActorConfig
    return FSDPActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2,
                           loss_agg_mode=mode, clip_ratio_c=10.0, clip_ratio_low=0.2,
                           clip_ratio_high=0.28,
                           policy_loss=hapo_verl.HAPOPolicyLossConfig(**policy))


def _actor_batch(seed=0, dp_size=1, micro_batch_size=12):
    """The actor's mini-batch after ``_update_actor``'s conversion, split by verl."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.utils import prepare_micro_batches
    from verl.workers.utils.padding import left_right_2_no_padding

    batch, _, response_mask = _rollout_batch(seed)
    g = torch.Generator().manual_seed(seed + 10)
    b, lr = response_mask.shape
    batch.batch["old_log_probs"] = -torch.rand(b, lr, generator=g) * 2.0
    batch.batch["advantages"] = torch.randn(b, 1, generator=g).expand(b, lr) * response_mask
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
