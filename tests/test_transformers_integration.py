"""AdaptiveTemperatureLogitsProcessor inside a real ``model.generate`` call (a tiny randomly
initialised GPT-2 built from a config: no download). Skipped without transformers."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hapo_ops  # noqa: E402
from hapo_ops import EntropyStats  # noqa: E402
from hapo_ops.integrations.transformers import AdaptiveTemperatureLogitsProcessor  # noqa: E402

VOCAB = 97
STEPS = 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1,
                                     n_head=2, bos_token_id=0, eos_token_id=None,
                                     pad_token_id=1)  # no EOS: every row runs STEPS steps
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # spread the logits so that rows differ in entropy
        model.lm_head.weight.mul_(10.0)
    return model


def _stats() -> EntropyStats:
    return EntropyStats(torch.tensor(math.log(1.5)), torch.tensor(math.log(3.5)),
                        torch.tensor(math.log(0.3)))


def _generate(model, proc, seed=0):
    input_ids = torch.tensor([[0, 5, 9], [0, 44, 2], [0, 70, 70], [0, 3, 3]])
    torch.manual_seed(seed)
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                          temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=STEPS,
                          logits_processor=[proc],
                          output_scores=True, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=1)


def generate_processors(model):
    config = transformers.GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                           pad_token_id=1)
    return model._get_logits_processor(generation_config=config, input_ids_seq_length=3,
                                       encoder_input_ids=None, prefix_allowed_tokens_fn=None,
                                       logits_processor=transformers.LogitsProcessorList())


@pytest.mark.parametrize("variant,tau", [("paper", 0.3), ("released", 0.3), ("paper", -0.3)])
def test_generate_scores_are_logits_over_adaptive_temperature(model, variant, tau):
    proc = AdaptiveTemperatureLogitsProcessor(_stats(), tau=tau, base_temperature=0.8,
                                              variant=variant)
    out = _generate(model, proc)
    assert len(out.logits) == STEPS and len(out.scores) == STEPS
    assert len(generate_processors(model)) == 0  # no processor of generate's own in between
    assert proc.temperatures.shape == (4, STEPS)
    for step, (raw, scores) in enumerate(zip(out.logits, out.scores)):
        entropy = hapo_ops.token_entropy(raw)
        expected_t = hapo_ops.adaptive_temperature(entropy, _stats(), base_temperature=0.8,
                                                   tau=tau, variant=variant)
        torch.testing.assert_close(proc.temperatures[:, step], expected_t, rtol=0, atol=0)
        torch.testing.assert_close(scores, raw / expected_t[:, None], rtol=1e-6, atol=1e-6)
    assert len(set(proc.temperatures.flatten().tolist())) > 1  # rows really differ
    # The trainer's behaviour log-probs from the recorded temperatures.
    tokens = out.sequences[:, -STEPS:]
    raw = torch.stack(out.logits, dim=1)                           # (B, steps, V)
    logp = hapo_ops.token_logprobs(raw, tokens, temperature=proc.temperatures)
    direct = torch.log_softmax(torch.stack(out.scores, 1), -1).gather(-1, tokens[..., None])
    torch.testing.assert_close(logp, direct[..., 0], rtol=1e-5, atol=1e-5)


def test_no_stats_is_base_temperature_and_reset(model):
    proc = AdaptiveTemperatureLogitsProcessor(None, base_temperature=1.25)
    out = _generate(model, proc)
    assert torch.equal(proc.temperatures, torch.full((4, STEPS), 1.25))
    torch.testing.assert_close(out.scores[0], out.logits[0] / 1.25)
    proc.reset()
    assert proc.temperatures.numel() == 0


def test_same_seed_same_generation(model):
    first = _generate(model, AdaptiveTemperatureLogitsProcessor(_stats(), tau=0.3), seed=3)
    again = _generate(model, AdaptiveTemperatureLogitsProcessor(_stats(), tau=0.3), seed=3)
    assert torch.equal(first.sequences, again.sequences)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(stats=(1.0,)), TypeError, "stats"),
    (dict(stats=None, tau=1.5), ValueError, "tau"),
    (dict(stats=None, tau=-1.0), ValueError, "tau"),
    (dict(stats=None, tau=1.0 - 1e-9), ValueError, "tau"),  # rounds to 1 in float32: T = 0
    (dict(stats=None, base_temperature=-1.0), ValueError, "base_temperature"),
    (dict(stats=None, variant="x"), ValueError, "variant"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdaptiveTemperatureLogitsProcessor(**kwargs)
