"""HAPO's engine for verl's Megatron strategy, on verl's real Megatron engine (legacy mbridge
path, megatron-core) with tensor parallelism 2 on two gloo processes.

Runs in its own environment (.ci/megatron.sh: megatron-core ≥ 0.17 needs Python ≥ 3.12);
the CPU shims are in tests/megatron_cpu.py. The reference is independent of Megatron and of
hapo-ops: transformers' own model with the same weights, each sequence alone, the softmax in
float64, ĥ and T_t written out here.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("megatron.core")
pytest.importorskip("mbridge")

import megatron_cpu  # noqa: E402
import test_verl_integration as fsdp_tests  # noqa: E402  (HAPO's FSDP engine on CPU)
from distributed_harness import run_ranks  # noqa: E402
from test_verl_integration import verl_on_cpu  # noqa: E402,F401  (fixture)

TP = 2


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2_megatron")
    megatron_cpu.make_tiny_model(str(path))
    return str(path)


def _reference(model_path, td, *, dtype=torch.float32):
    """Per sequence: raw logits (float64) of every position but the last, and next tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="eager",
                                                 dtype=dtype)
    out = []
    with torch.no_grad():
        for ids in td["input_ids"].unbind():
            z = model(ids[None], position_ids=torch.arange(len(ids))[None]).logits[0].double()
            out.append((z[:-1], ids[1:]))
    return out


def _entropy(z):
    return -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)


def _h_hat(entropy, pivot, log_max, log_min, eps=1e-8):
    """ĥ of the paper variant in float64 (HAPO §3)."""
    ell = torch.log(torch.clamp(entropy, min=eps))
    above = (ell - pivot) / torch.clamp(log_max - pivot, min=eps)
    below = (ell - pivot) / torch.clamp(pivot - log_min, min=eps)
    return torch.where(ell > pivot, above, below).clamp(-1.0, 1.0)


def _stats_rows(reference, base_temperature, tau):
    """Per-sample statistics inside the range of the reference's log-entropies, so that ĥ
    spreads over (-1, 1) without saturating for most tokens; sample 0 has none (T_base)."""
    from hapo_ops.integrations.verl import engine as verl_engine

    ell = torch.cat([torch.log(_entropy(z)) for z, _ in reference])
    lo, hi = ell.min().item(), ell.max().item()
    span = hi - lo
    rows = [verl_engine.rollout_stats_row(None, base_temperature=base_temperature, tau=tau)]
    for i in range(1, len(reference)):
        pivot = lo + span * (0.3 + 0.4 * i / len(reference))
        rows.append(verl_engine.rollout_stats_row((pivot, hi + 0.5 * span, lo - 0.5 * span),
                                                  base_temperature=base_temperature, tau=tau))
    return torch.stack(rows)


def _reference_temperature(z, row):
    pivot, log_max, log_min, base, tau = row[:5].double()
    return base * (1.0 + tau * _h_hat(_entropy(z), pivot, log_max, log_min))


def _per_sequence(flat):
    values, offsets = flat
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def _check(out, reference, rows):
    from hapo_ops.integrations.verl.wire import TOKEN_TEMPERATURE_KEY

    temperatures = _per_sequence(out[TOKEN_TEMPERATURE_KEY])
    for i, ((z, labels), logp, entropy, temperature) in enumerate(zip(
            reference, _per_sequence(out["log_probs"]), _per_sequence(out["entropy"]),
            temperatures)):
        n = len(labels)
        want_t = _reference_temperature(z, rows[i])
        want_logp = (z / want_t[:, None]).log_softmax(-1).gather(-1, labels[:, None])[:, 0]
        torch.testing.assert_close(entropy[:n].double(), _entropy(z), rtol=0, atol=2e-5)
        torch.testing.assert_close(temperature[:n].double(), want_t, rtol=0, atol=2e-5)
        torch.testing.assert_close(logp[:n].double(), want_logp, rtol=2e-5, atol=2e-5)
    spread = torch.cat(temperatures)
    assert spread.max() - spread.min() > 0.05  # T_t really varies per token


def _response_stats(reference, td, quantile=0.8):
    import hapo_ops

    values = torch.cat([_entropy(z)[-int(td["response_mask"][i].sum()):]
                        for i, (z, _) in enumerate(reference)])
    return hapo_ops.entropy_stats(values, torch.ones_like(values, dtype=torch.bool),
                                  quantile=quantile)


@pytest.mark.parametrize("data_format", ["thd", "bshd"])
def test_tp2_entropy_logprobs_and_temperature_against_the_reference(model_path, data_format):
    """verl's Megatron engine (HAPO's subclass, picked by VERL_ENGINE_VENDOR=hapo), TP = 2,
    packed (thd) and padded (bshd) inputs, old-log-prob pass of a HAPO batch: on both ranks
    the T = 1 entropy, T_t = T_base·(1 + τ·ĥ_t) and the log-probs at T_t equal the float64
    reference; the batch statistics (response tokens) are those of the reference entropies;
    T_t is the FSDP engine's rule applied to the returned entropy, bit for bit."""
    from hapo_ops.integrations.verl import engine as verl_engine

    td = megatron_cpu.engine_batch(seed=3, temperature=0.9)
    reference = _reference(model_path, td)
    rows = _stats_rows(reference, base_temperature=0.9, tau=0.4)
    outs = run_ranks(megatron_cpu.rank_infer, TP, model_path, data_format, 3, rows, 0.9)
    expected_stats = _response_stats(reference, td)
    for out in outs:
        assert out["engine"] == "HAPOMegatronEngineWithLMHead"
        _check(out, reference, rows)
        for got, want in zip(out["stats"], expected_stats):
            torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=1e-5)
        # one T_t rule: the FSDP engine's token_temperature of this engine's entropy
        entropy, offsets = out["entropy"]
        sample = torch.repeat_interleave(torch.arange(len(offsets) - 1), offsets.diff())
        torch.testing.assert_close(out[verl_engine.TOKEN_TEMPERATURE_KEY][0],
                                   verl_engine.token_temperature(entropy, rows[sample]),
                                   rtol=0, atol=0)
    for key in ("entropy", "log_probs", verl_engine.TOKEN_TEMPERATURE_KEY):
        torch.testing.assert_close(outs[0][key][0], outs[1][key][0], rtol=0, atol=0)


def test_pipeline_parallel_last_stage(model_path):
    """PP = 2 (verl's pipelined Megatron schedule, gloo send/receive): the last stage returns
    the outputs, equal to the reference, and keeps the batch statistics; the first stage
    has neither."""
    td = megatron_cpu.engine_batch(seed=3, temperature=0.9)
    reference = _reference(model_path, td)
    rows = _stats_rows(reference, base_temperature=0.9, tau=0.4)
    first, last = run_ranks(megatron_cpu.rank_infer, 2, model_path, "thd", 3, rows, 0.9, None,
                            1, 2)
    assert first["stats"] is None and "log_probs" not in first
    _check(last, reference, rows)
    for got, want in zip(last["stats"], _response_stats(reference, td)):
        torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=1e-5)


def test_statistics_kept_in_verls_checkpoint(model_path, tmp_path):
    """PP = 2: the last stage's publishing rank writes the batch statistics next to verl's
    Megatron checkpoint and, after they are dropped, verl's load restores them (a resumed
    run's first rollout samples at T_t, as with the FSDP engine); the first stage, which
    never computes them, neither writes nor restores any."""
    td = megatron_cpu.engine_batch(seed=3, temperature=0.9)
    rows = _stats_rows(_reference(model_path, td), base_temperature=0.9, tau=0.4)
    first, last = run_ranks(megatron_cpu.rank_checkpoint, 2, model_path, rows,
                            str(tmp_path / "ckpt"), 1, 2)
    assert not first["publishes"] and first["computed"] is None
    assert last["publishes"] and last["written"] and first["written"]  # one shared folder
    assert last["restored"] == last["computed"] and last["step"] == last["computed_step"]
    assert first["restored"] == last["computed"]  # every rank reads the one file back


def test_same_batch_same_token_temperature_as_the_fsdp_engine(verl_on_cpu, monkeypatch):
    """The same batch and model through HAPO's FSDP engine (verl's real FSDP2 actor worker,
    one process, fp32) and HAPO's Megatron engine (TP = 2): the same T_t, T = 1 entropy and
    log-probs at T_t, up to the two models' float32 rounding."""
    from hapo_ops.integrations.verl import engine as verl_engine

    monkeypatch.setenv("VERL_ENGINE_VENDOR", verl_engine.ENGINE_VENDOR)
    worker = fsdp_tests._actor_worker(verl_on_cpu, fsdp_tests.FP32_ENGINE)
    assert type(worker.actor.engine) is verl_engine.HAPOFSDPEngineWithLMHead
    td = megatron_cpu.engine_batch(seed=6, temperature=0.9)
    reference = _reference(verl_on_cpu, td)
    rows = _stats_rows(reference, base_temperature=0.9, tau=0.4)
    td[verl_engine.ROLLOUT_STATS_KEY] = rows
    fsdp = fsdp_tests._infer(worker, td, temperature=0.9)
    megatron = run_ranks(megatron_cpu.rank_infer, TP, verl_on_cpu, "thd", 6, rows, 0.9)
    for out in megatron:
        for key in (verl_engine.TOKEN_TEMPERATURE_KEY, "entropy", "log_probs"):
            values, offsets = out[key]
            assert torch.equal(offsets, fsdp[key].offsets())
            scored = torch.ones_like(values, dtype=torch.bool)
            scored[offsets[1:] - 1] = False  # each sequence's last position scores no token
            torch.testing.assert_close(values[scored], fsdp[key].values()[scored], rtol=2e-5,
                                       atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
        spread = out[verl_engine.TOKEN_TEMPERATURE_KEY][0]
        assert spread.max() - spread.min() > 0.05


def test_stored_temperature_and_validation(model_path):
    """A batch that carries T_t (the update, the reference model) is scored at it, whatever
    statistics ride along: the log-probs of the old-log-prob pass again, exactly. Without
    statistics (validation) the log-probs are at verl's temperature, the entropy at T = 1."""
    from hapo_ops.integrations.verl.wire import TOKEN_TEMPERATURE_KEY

    td = megatron_cpu.engine_batch(seed=4, temperature=0.8)
    reference = _reference(model_path, td)
    rows = _stats_rows(reference, base_temperature=0.8, tau=0.5)
    old = run_ranks(megatron_cpu.rank_infer, TP, model_path, "thd", 4, rows, 0.8)[0]
    other_rows = _stats_rows(reference, base_temperature=0.8, tau=0.1)
    again = run_ranks(megatron_cpu.rank_infer, TP, model_path, "thd", 4, other_rows, 0.8,
                      old[TOKEN_TEMPERATURE_KEY])
    for r in again:
        torch.testing.assert_close(r["log_probs"][0], old["log_probs"][0], rtol=0, atol=0)
        torch.testing.assert_close(r[TOKEN_TEMPERATURE_KEY][0], old[TOKEN_TEMPERATURE_KEY][0],
                                   rtol=0, atol=0)
        assert r["stats"] is None  # not an old-log-prob pass: no new statistics

    plain = run_ranks(megatron_cpu.rank_infer, TP, model_path, "thd", 4, None, 0.8)
    for out in plain:
        assert out["stats"] is None
        for (z, labels), logp, entropy, temperature in zip(
                reference, _per_sequence(out["log_probs"]), _per_sequence(out["entropy"]),
                _per_sequence(out[TOKEN_TEMPERATURE_KEY])):
            n = len(labels)
            want = (z / 0.8).log_softmax(-1).gather(-1, labels[:, None])[:, 0]
            torch.testing.assert_close(logp[:n].double(), want, rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(entropy[:n].double(), _entropy(z), rtol=0, atol=2e-5)
            assert torch.all(temperature[:n] == 0.8)


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_backward_through_verls_megatron_schedule_gives_the_reference_gradient(model_path, tp, pp):
    """verl's forward_backward_batch (Megatron's schedule, two micro-batches; with PP = 2
    its pipelined schedule) of Σ a·logp(T_t) + b·H(T = 1) over the response tokens: each
    rank's gradient of its output-layer and embedding shards is its slice of the reference
    gradient, the final norm's is the whole of it (PP: the first stage holds the embedding,
    the last the norm and output layer)."""
    from transformers import AutoModelForCausalLM

    td = megatron_cpu.engine_batch(seed=5, temperature=1.0)
    reference = _reference(model_path, td)
    rows = _stats_rows(reference, base_temperature=1.0, tau=0.4)
    grads = run_ranks(megatron_cpu.rank_backward, 2, model_path, "thd", 5, rows, 1.0, tp, pp)

    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="eager",
                                                 dtype=torch.float64)
    a_all, b_all = megatron_cpu.response_weights(5, td)
    loss = torch.zeros((), dtype=torch.float64)
    for i, ((z_ref, labels), ids) in enumerate(zip(reference, td["input_ids"].unbind())):
        z = model(ids[None], position_ids=torch.arange(len(ids))[None]).logits[0, :-1]
        temperature = _reference_temperature(z_ref, rows[i])
        logp = (z / temperature[:, None]).log_softmax(-1).gather(-1, labels[:, None])[:, 0]
        entropy = _entropy(z)
        n_response = int(td["response_mask"][i].sum())
        # the response tokens are scored at the last n_response positions
        logp, entropy = logp[-n_response:], entropy[-n_response:]
        loss = loss + (a_all[i, :n_response] * logp + b_all[i, :n_response] * entropy).sum()
    loss.backward()
    params = dict(model.named_parameters())
    shard = megatron_cpu.VOCAB // tp
    held = [set(got) for got in grads]
    if pp == 2:  # the stages' parameters
        assert held == [{"embedding.word_embeddings.weight"},
                        {"output_layer.weight", "decoder.final_layernorm.weight"}]
    else:
        assert held == [set(grads[0])] * 2 and len(held[0]) == 3
    for rank, got in enumerate(grads):
        rows_of_rank = slice(rank * shard, (rank + 1) * shard) if tp == 2 else slice(None)
        for name, ref in (("output_layer.weight", params["lm_head.weight"].grad[rows_of_rank]),
                          ("embedding.word_embeddings.weight",
                           params["model.embed_tokens.weight"].grad[rows_of_rank]),
                          ("decoder.final_layernorm.weight", params["model.norm.weight"].grad)):
            if name not in got:
                continue
            assert ref.abs().max() > 0
            # float32 model against float64: errors relative to the gradient's scale
            torch.testing.assert_close(got[name].double(), ref, rtol=1e-3,
                                       atol=2e-4 * ref.abs().max().item(),
                                       msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")


def test_refusals_are_named():
    """verl's fused kernels (no logits), top-k distillation and Σπ² raise, naming the
    setting."""
    from hapo_ops.integrations.verl import megatron_engine

    for flags, match in (({"use_fused_kernels": True}, "use_fused_kernels=False"),
                         ({"distillation_use_topk": True}, "top-k distillation"),
                         ({"calculate_sum_pi_squared": True}, "sum_pi_squared")):
        with pytest.raises(NotImplementedError, match=match):
            megatron_engine.refuse_unsupported(**flags)
    megatron_engine.refuse_unsupported()  # nothing asked: nothing refused


def test_import_verl_with_the_hapo_vendor_registers_the_megatron_engine():
    """The plugin: a fresh interpreter with VERL_ENGINE_VENDOR=hapo that only imports verl
    gets HAPO's engine for the megatron backend (and still the FSDP one for fsdp2)."""
    import os
    import subprocess
    import sys

    code = ("import verl\n"
            "from verl.workers.engine import EngineRegistry\n"
            "for backend in ('megatron', 'fsdp2'):\n"
            "    cls = EngineRegistry.get_engine_cls('language_model', backend)\n"
            "    print(cls.__module__ + '.' + cls.__name__)\n")
    env = {**os.environ, "VERL_ENGINE_VENDOR": "hapo", "VERL_ENGINE_DEVICE": "cuda"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "hapo_ops.integrations.verl.megatron_engine.HAPOMegatronEngineWithLMHead",
        "hapo_ops.integrations.verl.engine.HAPOFSDPEngineWithLMHead"]
