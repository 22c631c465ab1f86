"""hapo_ops.integrations.trl against the installed TRL (1.16.x): a real HAPOGRPOTrainer on a
tiny randomly initialised Qwen2 model with an offline character tokenizer, on CPU."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import hapo_ops  # noqa: E402
from hapo_ops.integrations.trl import HAPOGRPOConfig, HAPOGRPOTrainer  # noqa: E402

CHARS = "abcdefgh "


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   padding_side="left")


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
    tokenizer = _tokenizer()
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
    tokenizer = _tokenizer()
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
