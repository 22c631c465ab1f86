"""hapo_ops.integrations.vllm: the per-request arguments (no vLLM needed) and, with vLLM
installed (its own CI environment, .ci/vllm.sh), the logits processors run by vLLM's real
engine, batch bookkeeping and sampler on CPU with a tiny random Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

import hapo_ops
from hapo_ops.integrations.vllm import (parse_sampling_args, sampling_extra_args,
                                        sampling_vllm_xargs)


def _stats(seed: int = 0, n: int = 64) -> hapo_ops.EntropyStats:
    g = torch.Generator().manual_seed(seed)
    entropy = torch.rand(n, generator=g) ** 4 * 3.0
    return hapo_ops.entropy_stats(entropy, torch.ones(n, dtype=torch.bool))


# ---------------------------------------------------------------- the per-request arguments


def test_sampling_extra_args_is_json_safe_and_round_trips():
    stats = _stats()
    extra = sampling_extra_args(stats, tau=0.3, base_temperature=0.7, variant="released", eps=1e-6)
    assert json.loads(json.dumps(extra, allow_nan=False)) == extra
    entry = extra["hapo"]
    assert all(type(v) in (float, str) for v in entry.values())
    parsed = parse_sampling_args(json.loads(json.dumps(extra)))
    assert (parsed.tau, parsed.base_temperature, parsed.variant, parsed.eps) == (0.3, 0.7, "released", 1e-6)
    # the statistics survive exactly (float32 -> Python float -> float32)
    for got, want in zip(parsed.stats(), stats):
        assert torch.equal(got, want)


def test_sampling_extra_args_gives_the_library_temperature():
    stats = _stats(1)
    entropy = torch.rand(100, dtype=torch.float64) * 2.0
    for variant in ("paper", "released"):
        parsed = parse_sampling_args(sampling_extra_args(stats, tau=0.2, base_temperature=1.3,
                                                         variant=variant))
        want = hapo_ops.adaptive_temperature(entropy, stats, base_temperature=1.3, tau=0.2,
                                             variant=variant)
        got = hapo_ops.adaptive_temperature(entropy, parsed.stats(), base_temperature=parsed.base_temperature,
                                            tau=parsed.tau, variant=parsed.variant, eps=parsed.eps)
        assert torch.equal(got, want)
        assert not torch.equal(got, torch.full_like(got, 1.3))


def test_sampling_extra_args_without_stats_is_base_temperature():
    empty = hapo_ops.entropy_stats(torch.rand(8), torch.zeros(8, dtype=torch.bool))
    for stats in (None, empty):
        extra = sampling_extra_args(stats, base_temperature=0.9)
        assert set(extra["hapo"]) == {"tau", "base_temperature", "variant", "eps"}
        assert parse_sampling_args(extra).stats() is None
    assert parse_sampling_args({"other": 1}) is None
    assert parse_sampling_args(None) is None


def test_vllm_xargs_form_is_flat_and_parses_to_the_same_arguments():
    """vLLM's OpenAI-compatible server accepts only flat vllm_xargs values: one JSON string."""
    stats = _stats(2)
    xargs = sampling_vllm_xargs(stats, tau=0.2, base_temperature=0.9)
    assert isinstance(xargs["hapo"], str)
    assert parse_sampling_args(xargs) == parse_sampling_args(
        sampling_extra_args(stats, tau=0.2, base_temperature=0.9))


BASE = {"tau": 0.05, "base_temperature": 1.0, "variant": "paper", "eps": 1e-8}


@pytest.mark.parametrize("entry, error, message", [
    (3.0, TypeError, r'extra_args\["hapo"\] must be a dict'),
    ({**BASE, "tua": 0.1}, ValueError, r"unknown keys \['tua'\]"),
    ({k: v for k, v in BASE.items() if k != "eps"}, ValueError, r"missing keys \['eps'\]"),
    ({**BASE, "tau": 1.0}, ValueError, r'\["tau"\] must be in \(-1, 1\)'),
    ({**BASE, "tau": -(1.0 - 1e-9)}, ValueError, r'\["tau"\] must be in \(-1, 1\)'),  # -1 in float32
    ({**BASE, "tau": "0.1"}, TypeError, r'\["tau"\] must be a float'),
    ({**BASE, "tau": True}, TypeError, r'\["tau"\] must be a float'),
    ({**BASE, "base_temperature": 0.0}, ValueError, r'\["base_temperature"\] must be > 0'),
    ({**BASE, "variant": "paper2"}, ValueError, r'\["variant"\] must be one of'),
    ({**BASE, "eps": -1.0}, ValueError, r'\["eps"\] must be > 0'),
    ({**BASE, "eps": 0.0}, ValueError, r'\["eps"\] must be > 0, got 0.0'),
    ({**BASE, "eps": 0}, ValueError, r'\["eps"\] must be > 0, got 0.0'),
    ({**BASE, "pivot": 0.0}, ValueError, r"all of \['pivot', 'log_max', 'log_min'\] or none"),
    ({**BASE, "pivot": 0.0, "log_max": math.nan, "log_min": -1.0}, ValueError, r'\["log_max"\] must be finite'),
    ({**BASE, "pivot": 2.0, "log_max": 1.0, "log_min": -1.0}, ValueError, "log_min <= pivot <= log_max"),
])
def test_parse_sampling_args_refuses_malformed_entries(entry, error, message):
    with pytest.raises(error, match=message):
        parse_sampling_args({"hapo": entry})


def test_sampling_extra_args_refuses_bad_settings():
    with pytest.raises(ValueError, match="tau"):
        sampling_extra_args(None, tau=-1.0)
    with pytest.raises(TypeError, match="stats"):
        sampling_extra_args((1.0, 2.0))
    with pytest.raises(ValueError, match="NaN"):
        sampling_extra_args(hapo_ops.EntropyStats(*torch.tensor([0.0, math.nan, -1.0])))


# ---------------------------------------------------------------- vLLM's real engine (CPU)
# Everything below needs vLLM (the CPU build vllm-cpu in CI's own environment, .ci/vllm.sh)
# and skips without it. The engine runs in-process, eagerly, with a 1 GiB KV cache.

VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_CI_ENV": "1"}
VOCAB = 256


def _vllm():
    import os

    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)
    return pytest.importorskip("vllm")


def _tiny_llama(path: str, seed: int = 0):
    """A random Llama (head_dim 32: vLLM's CPU attention needs >= 32) whose next-token
    entropies spread from near 0 to a few nats, saved to ``path``; returns the HF model."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # a sharper head: entropies from ~0.03 to ~2.5 nats
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(path)
    return model


def _engine(model_dir: str, processor, **kwargs):
    vllm = _vllm()
    options = dict(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=64,
                   skip_tokenizer_init=True, logits_processors=[processor],
                   logprobs_mode="processed_logprobs", max_num_seqs=4, seed=0)
    options.update(kwargs)
    return vllm.LLM(**options)


def _release(llm) -> None:
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def _model_stats(model, seed: int) -> hapo_ops.EntropyStats:
    """Statistics of the model's own entropies on random sequences (a "training batch")."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 16), generator=g)
    with torch.no_grad():
        entropy = hapo_ops.token_entropy(model(ids).logits.float())
    return hapo_ops.entropy_stats(entropy, torch.rand(entropy.shape, generator=g) < 0.7)


def _trainer_logits(model, prompt_ids, token_ids) -> torch.Tensor:
    """(len(token_ids), V) float32 logits of a transformers forward, position t scoring token t."""
    ids = torch.tensor([list(prompt_ids) + list(token_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    return logits[len(prompt_ids) - 1:-1]


def _sampled_logprobs(completion) -> torch.Tensor:
    return torch.tensor([step[token].logprob
                         for step, token in zip(completion.logprobs, completion.token_ids)])


def _expected_logprobs(model, output, extra_args) -> tuple[torch.Tensor, torch.Tensor]:
    """(behaviour log-probs, T_t) as the trainer recomputes them: T_t from its own logits with
    the statistics it sent, the log-prob of each sampled token at T_t."""
    completion = output.outputs[0]
    logits = _trainer_logits(model, output.prompt_token_ids, completion.token_ids)
    tokens = torch.tensor(completion.token_ids)
    args = parse_sampling_args(extra_args)
    if args is None:
        temperature = torch.ones(len(tokens))
    else:
        temperature = hapo_ops.adaptive_temperature(
            hapo_ops.token_entropy(logits), args.stats(), base_temperature=args.base_temperature,
            tau=args.tau, variant=args.variant, eps=args.eps)
    return hapo_ops.token_logprobs(logits, tokens, temperature=temperature), temperature


class RecordingProcessor:
    """Mixin for a test subclass of a processor: records the batch updates vLLM sends."""

    updates: list = []

    def update_state(self, batch_update):
        if batch_update is not None:
            type(self).updates.append((list(batch_update.removed), len(batch_update.added),
                                       [(a, b, d.name) for a, b, d in batch_update.moved]))
        super().update_state(batch_update)


@pytest.fixture(scope="class")
def v1_engine(tmp_path_factory):
    _vllm()
    from hapo_ops.integrations.vllm import AdaptiveTemperatureLogitsProcessor

    class Recording(RecordingProcessor, AdaptiveTemperatureLogitsProcessor):
        updates = []

    path = str(tmp_path_factory.mktemp("tiny_llama"))
    model = _tiny_llama(path)
    llm = _engine(path, Recording)
    yield llm, model, Recording
    _release(llm)


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(n),), generator=g).tolist()
            for n in torch.randint(2, 9, (count,), generator=g)]


class TestV1Engine:
    """vllm.LLM with AdaptiveTemperatureLogitsProcessor and processed_logprobs, fp32."""

    def test_behaviour_logprobs_are_at_the_recomputed_temperature(self, v1_engine):
        vllm = _vllm()
        llm, model, _ = v1_engine
        stats_a, stats_b = _model_stats(model, 3), _model_stats(model, 4)
        requests = [  # (extra_args, temperature): four kinds of request in one batch
            (sampling_extra_args(stats_a, tau=0.5), 1.0),
            (sampling_extra_args(stats_b, tau=-0.4, base_temperature=0.8, variant="released"), 1.0),
            (None, 1.0),                                    # no HAPO arguments: plain T = 1
            (sampling_extra_args(stats_a, tau=0.5), 0.0),   # greedy: untouched, argmax
        ]
        params = [vllm.SamplingParams(temperature=t, max_tokens=12, logprobs=0, seed=i,
                                      extra_args=extra)
                  for i, (extra, t) in enumerate(requests)]
        prompts = _prompts(len(params), seed=1)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        temperatures = []
        for (extra, greedy_t), output in zip(requests, outputs):
            got = _sampled_logprobs(output.outputs[0])
            want, temperature = _expected_logprobs(model, output, extra if greedy_t else None)
            assert len(got) == 12
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            temperatures.append(temperature)
            if greedy_t == 0.0:
                logits = _trainer_logits(model, output.prompt_token_ids, output.outputs[0].token_ids)
                assert output.outputs[0].token_ids == logits.argmax(-1).tolist()
        # each request got its own temperatures, and they vary per token
        assert temperatures[0].std() > 0.05 and temperatures[1].std() > 0.05
        assert not torch.allclose(temperatures[0], temperatures[1])
        # the check can fail: T = 1 log-probs differ from the adaptive ones
        plain, _ = _expected_logprobs(model, outputs[0], None)
        assert (plain - _sampled_logprobs(outputs[0].outputs[0])).abs().max() > 1e-2

    def test_bookkeeping_survives_finishes_and_reordering(self, v1_engine):
        """More requests than max_num_seqs, of different lengths: vLLM admits, finishes and
        moves requests while others run; each keeps its own statistics and settings."""
        vllm = _vllm()
        llm, model, recording = v1_engine
        recording.updates.clear()
        count = 10
        extras = [None if i % 4 == 3 else
                  sampling_extra_args(_model_stats(model, 10 + i), tau=0.1 + 0.08 * i,
                                      variant=("paper", "released")[i % 2])
                  for i in range(count)]
        params = [vllm.SamplingParams(temperature=1.0, max_tokens=3 + (5 * i) % 11, logprobs=0,
                                      seed=100 + i, extra_args=extra)
                  for i, extra in enumerate(extras)]
        outputs = llm.generate([{"prompt_token_ids": p} for p in _prompts(count, seed=2)],
                               params, use_tqdm=False)
        for extra, output in zip(extras, outputs):
            want, _ = _expected_logprobs(model, output, extra)
            torch.testing.assert_close(_sampled_logprobs(output.outputs[0]), want, atol=1e-4, rtol=0)
        # vLLM reused finished requests' slots for new ones while others ran, and moved
        # requests to close gaps (swaps are driven directly in the next test)
        admitted_later = sum(added for _, added, _ in recording.updates[1:])
        moves = [m for _, _, moved in recording.updates for m in moved]
        assert admitted_later >= count - 4
        assert moves, "vLLM never moved a request: the test did not exercise reordering"

    def test_refusals_reach_the_user(self, v1_engine):
        vllm = _vllm()
        llm, _, _ = v1_engine
        extra = sampling_extra_args(None)
        cases = [(dict(temperature=0.7, extra_args=extra), "temperature must be 1.0"),
                 (dict(temperature=1.0, min_p=0.1, extra_args=extra), "min_p must be 0"),
                 (dict(temperature=1.0, extra_args={"hapo": {"tau": 0.1}}), "missing keys"),
                 (dict(temperature=1.0, extra_args={"hapo": {**extra["hapo"], "eps": 0.0}}),
                  r'\["eps"\] must be > 0'),
                 (dict(temperature=1.0, extra_args={"hapo": {**extra["hapo"], "tau": "big"}}),
                  r'\["tau"\] must be a float, got str')]
        from vllm.exceptions import VLLMValidationError  # what vLLM turns a ValueError into

        for kwargs, message in cases:
            with pytest.raises((ValueError, TypeError, VLLMValidationError), match=message):
                llm.generate([{"prompt_token_ids": [1, 2, 3]}],
                             vllm.SamplingParams(max_tokens=2, **kwargs), use_tqdm=False)


def _vllm_config(max_num_seqs: int):
    _vllm()
    from vllm.config import SchedulerConfig, VllmConfig

    return VllmConfig(scheduler_config=SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max(64, max_num_seqs), max_model_len=64,
        is_encoder_decoder=False))


REQUEST_KINDS = ["plain", "greedy", "stats_a", "stats_b", "none_stats", "released"]


def _request(kind: str):
    vllm = _vllm()
    extra = {"plain": None, "greedy": sampling_extra_args(_stats(5), tau=0.5),
             "stats_a": sampling_extra_args(_stats(6), tau=0.5),
             "stats_b": sampling_extra_args(_stats(7), tau=-0.3, base_temperature=1.4),
             "none_stats": sampling_extra_args(None, base_temperature=0.7),
             "released": sampling_extra_args(_stats(6), tau=0.5, variant="released")}[kind]
    return vllm.SamplingParams(temperature=0.0 if kind == "greedy" else 1.0, extra_args=extra)


def _expected_rows(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Each row on its own: divided by its request's T, or untouched."""
    rows = []
    for row, p in zip(logits, params):
        args = parse_sampling_args(p.extra_args)
        if args is None or p.temperature == 0.0:
            rows.append(row)
            continue
        t = hapo_ops.adaptive_temperature(hapo_ops.token_entropy(row[None]), args.stats(),
                                          base_temperature=args.base_temperature, tau=args.tau,
                                          variant=args.variant, eps=args.eps)
        rows.append(row / t)
    return torch.stack(rows)


def _random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * torch.rand(rows, 1, generator=g) * 8
    return logits.masked_fill(torch.rand(rows, vocab, generator=g) < 0.2, float("-inf"))


def _assert_rows(got: torch.Tensor, want: torch.Tensor, params: list) -> None:
    for i, p in enumerate(params):
        if parse_sampling_args(p.extra_args) is None or p.temperature == 0.0:
            assert torch.equal(got[i], want[i]), f"row {i} should be untouched"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_v1_batch_updates_from_vllms_builder_keep_each_requests_parameters():
    """Random sequences of removals, additions, condensing moves and swaps, written with
    vLLM's real BatchUpdateBuilder as its persistent batch does; after each update every
    row must be transformed with its own request's arguments."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    _vllm()
    from vllm.v1.sample.logits_processor import BatchUpdateBuilder, MoveDirectionality

    from hapo_ops.integrations.vllm import AdaptiveTemperatureLogitsProcessor

    slots_max = 8
    config = _vllm_config(slots_max)
    params_of = {kind: _request(kind) for kind in REQUEST_KINDS}

    @hypothesis.settings(max_examples=25, deadline=None)
    @hypothesis.given(st.data())
    def run(data):
        processor = AdaptiveTemperatureLogitsProcessor(config, torch.device("cpu"), False)
        builder = BatchUpdateBuilder()
        batch: list = []  # the params in each slot, as vLLM's persistent batch holds them
        for step in range(data.draw(st.integers(1, 6))):
            removed = sorted(data.draw(st.sets(st.integers(0, max(len(batch) - 1, 0)),
                                               max_size=len(batch))), reverse=True)
            for slot in removed:
                builder.removed_append(slot)
                batch[slot] = None
            for kind in data.draw(st.lists(st.sampled_from(REQUEST_KINDS),
                                           max_size=slots_max - len(batch) + len(removed))):
                slot = builder.pop_removed()  # vLLM reuses the lowest freed slot first
                if slot is None:
                    slot = len(batch)
                    batch.append(None)
                batch[slot] = params_of[kind]
                builder.added.append((slot, params_of[kind], None, []))
            while None in batch:  # condense: the last request moves into the lowest hole
                hole = batch.index(None)
                if hole == len(batch) - 1:
                    batch.pop()
                    continue
                batch[hole] = batch.pop()
                builder.moved.append((len(batch), hole, MoveDirectionality.UNIDIRECTIONAL))
            for a, b in data.draw(st.lists(st.tuples(st.integers(0, slots_max - 1),
                                                     st.integers(0, slots_max - 1)), max_size=3)):
                if a < len(batch) and b < len(batch) and a != b:
                    batch[a], batch[b] = batch[b], batch[a]
                    builder.moved.append((a, b, MoveDirectionality.SWAP))
            processor.update_state(builder.get_and_reset(len(batch)))
            if not batch:
                continue
            logits = _random_logits(len(batch), 40, seed=step)
            want = _expected_rows(logits, batch)
            _assert_rows(processor.apply(logits.clone()), want, batch)

    run()


def _grown_state(table) -> int:
    """How many entries the processor table's containers hold (lists, dicts, sets)."""
    return sum(len(v) for v in vars(table).values() if isinstance(v, (list, dict, set)))


def test_v1_state_is_bounded_whatever_the_distinct_settings():
    """300 requests, each with its own (tau, base_temperature, eps, variant), pass through 4
    slots: every row gets its own request's temperature, and the processor's state does not
    grow with the distinct settings it has seen (a fixed per-slot table, no table of
    settings)."""
    vllm = _vllm()
    from vllm.v1.sample.logits_processor import BatchUpdateBuilder

    from hapo_ops.integrations.vllm import AdaptiveTemperatureLogitsProcessor

    slots = 4
    processor = AdaptiveTemperatureLogitsProcessor(_vllm_config(slots), torch.device("cpu"),
                                                   False)
    start = _grown_state(processor.table)
    builder = BatchUpdateBuilder()
    batch: list = [None] * slots
    for step in range(75):
        for slot in range(slots):
            n = step * slots + slot
            extra = sampling_extra_args(_stats(n % 5) if n % 3 else None,
                                        tau=-0.9 + 1.8 * (n % 97) / 96,
                                        base_temperature=0.5 + n / 300,
                                        variant=("paper", "released")[n % 2],
                                        eps=10.0 ** -(3 + n % 6))
            batch[slot] = vllm.SamplingParams(temperature=1.0, extra_args=extra)
            if step:
                builder.removed_append(slot)
            builder.added.append((slot, batch[slot], None, []))
        processor.update_state(builder.get_and_reset(slots))
        logits = _random_logits(slots, 40, seed=step)
        _assert_rows(processor.apply(logits.clone()), _expected_rows(logits, batch), batch)
    assert _grown_state(processor.table) == start
    assert tuple(processor.table.host.shape) == (slots, 7)


def test_sampled_distribution_through_vllms_sampler():
    """Many draws at one position through vLLM's real V1 Sampler with the processor among
    its logits processors: the counts follow softmax(z/T_t) (chi-square) and not softmax(z);
    requests without HAPO arguments in the same batch follow softmax(z)."""
    _vllm()
    from vllm.v1.sample.logits_processor import BatchUpdateBuilder, LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler

    from hapo_ops.integrations.vllm import AdaptiveTemperatureLogitsProcessor

    draws, vocab = 6000, 8
    z = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    stats = hapo_ops.EntropyStats(*torch.tensor([0.0, 1.0, -3.0]))  # ĥ(z) = 0.48
    hapo = _vllm().SamplingParams(temperature=1.0, extra_args=sampling_extra_args(stats, tau=0.9))
    plain = _vllm().SamplingParams(temperature=1.0)
    rows = 2 * draws
    processor = AdaptiveTemperatureLogitsProcessor(_vllm_config(rows), torch.device("cpu"), False)
    builder = BatchUpdateBuilder()
    builder.added.extend((i, hapo if i < draws else plain, None, []) for i in range(rows))
    processor.update_state(builder.get_and_reset(rows))
    zeros = torch.zeros(rows)
    metadata = SamplingMetadata(
        temperature=torch.ones(rows), all_greedy=False, all_random=True, top_p=None, top_k=None,
        generators={}, max_num_logprobs=0, no_penalties=True, prompt_token_ids=None,
        frequency_penalties=zeros, presence_penalties=zeros, repetition_penalties=torch.ones(rows),
        output_token_ids=[[] for _ in range(rows)], allowed_token_ids_mask=None,
        bad_words_token_ids={}, logitsprocs=LogitsProcessors([processor]))
    torch.manual_seed(0)
    out = Sampler(logprobs_mode="processed_logprobs")(z.expand(rows, vocab).clone(), metadata)
    tokens = out.sampled_token_ids[:, 0].long()

    temperature = hapo_ops.adaptive_temperature(hapo_ops.token_entropy(z[None]), stats, tau=0.9)
    assert abs(temperature.item() - 1.0) > 0.3
    adaptive, raw = torch.softmax(z / temperature, -1), torch.softmax(z, -1)

    def chi_square(counts, probs):
        expected = probs.double() * counts.sum()
        return float(((counts.double() - expected) ** 2 / expected).sum())

    critical = 24.32  # chi-square, 7 degrees of freedom, p = 0.001
    counts_hapo = torch.bincount(tokens[:draws], minlength=vocab)
    counts_plain = torch.bincount(tokens[draws:], minlength=vocab)
    assert chi_square(counts_hapo, adaptive) < critical
    assert chi_square(counts_hapo, raw) > 10 * critical
    assert chi_square(counts_plain, raw) < critical
    # the processed log-probs vLLM returns are those of softmax(z / T_t) (and of softmax(z))
    logprobs = out.logprobs_tensors.logprobs[:, 0]
    torch.testing.assert_close(logprobs[:draws], adaptive.log()[tokens[:draws]], atol=1e-5, rtol=0)
    torch.testing.assert_close(logprobs[draws:], raw.log()[tokens[draws:]], atol=1e-5, rtol=0)


def test_mrv2_processor_through_its_interface_objects():
    """Model runner v2 needs Triton on the device (on CPU vLLM falls back to V1), so its
    engine does not run here; its real loader, request state and LogitsContext do: rows map
    to request slots in any order, a request may own several rows (speculative decoding),
    declined requests are untouched."""
    _vllm()
    mrv2 = pytest.importorskip("vllm.v1.worker.gpu.sample.logits_processor")
    import numpy as np
    from vllm.v1.worker.gpu.states import RequestState

    name = "hapo_ops.integrations.vllm:AdaptiveTemperatureLogitsProcessorMRV2"
    slots = 6
    req_states = RequestState(max_num_reqs=slots, max_model_len=64, max_num_batched_tokens=64,
                              num_speculative_steps=0, vocab_size=40, device=torch.device("cpu"))
    (processor,) = mrv2.build_custom_logits_processors(_vllm_config(slots), req_states, False, [name])
    kinds = ["stats_a", "plain", "greedy", "stats_b", "released", "none_stats"]
    for slot, kind in enumerate(kinds):
        assert processor.add_request(slot, _request(kind)) == (kind not in ("plain", "greedy"))
    processor.apply_staged_writes()
    # slot 4 is re-used by a new request (add_request resets it)
    processor.add_request(4, _request("stats_b"))
    processor.apply_staged_writes()
    params = [_request(k) for k in kinds]
    params[4] = _request("stats_b")
    row_slots = [3, 0, 4, 4, 1, 2, 5]  # slot 4 owns two rows
    idx_mapping = torch.tensor([3, 0, 4, 1, 2, 5], dtype=torch.int32)
    ctx = mrv2.LogitsContext(
        expanded_idx_mapping=torch.tensor(row_slots, dtype=torch.int32), idx_mapping=idx_mapping,
        idx_mapping_np=idx_mapping.numpy(), expanded_local_pos=torch.tensor([0, 0, 0, 1, 0, 0, 0]),
        input_ids=torch.zeros(7, dtype=torch.int64), pos=torch.zeros(7, dtype=torch.int64),
        seq_lens_upper_bound_np=np.ones(6, dtype=np.int32))
    logits = _random_logits(len(row_slots), 40, seed=3)
    want = _expected_rows(logits, [params[s] for s in row_slots])
    _assert_rows(processor.apply(logits.clone(), ctx), want, [params[s] for s in row_slots])
    # the params validator the frontend builds from the same name refuses bad requests
    from vllm.exceptions import VLLMValidationError

    validate = mrv2.build_custom_logits_processors_params_validator([name])
    with pytest.raises((ValueError, VLLMValidationError), match="temperature must be 1.0"):
        validate(_vllm().SamplingParams(temperature=0.5, extra_args=sampling_extra_args(None)))
    # each runner's loader refuses the other interface's class
    with pytest.raises(ValueError, match="not a subclass"):
        mrv2.build_custom_logits_processors(
            _vllm_config(slots), req_states, False,
            ["hapo_ops.integrations.vllm:AdaptiveTemperatureLogitsProcessor"])


def test_openai_server_request_carries_the_arguments():
    """What a TRL client in server mode (or any OpenAI client) sends: vLLM's own request model
    turns ``vllm_xargs`` into the request's extra_args, which the processor accepts; the
    nested dict form is refused by that model, hence the JSON string."""
    _vllm()
    import pydantic
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from hapo_ops.integrations.vllm import check_sampling_params

    stats = _stats(8)
    body = {"model": "m", "prompt": [1, 2, 3], "temperature": 1.0, "logprobs": 0,
            "vllm_xargs": sampling_vllm_xargs(stats, tau=0.2)}
    params = CompletionRequest(**json.loads(json.dumps(body))).to_sampling_params(8)
    assert check_sampling_params(params) == parse_sampling_args(sampling_extra_args(stats, tau=0.2))
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest(**{**body, "vllm_xargs": sampling_extra_args(stats)})


def test_validate_params_refusals():
    vllm = _vllm()
    from hapo_ops.integrations.vllm import (AdaptiveTemperatureLogitsProcessor,
                                            AdaptiveTemperatureLogitsProcessorMRV2)

    extra = sampling_extra_args(_stats(), tau=0.1)
    for cls in (AdaptiveTemperatureLogitsProcessor, AdaptiveTemperatureLogitsProcessorMRV2):
        cls.validate_params(vllm.SamplingParams(temperature=1.0, top_k=5, top_p=0.9,
                                                extra_args=extra))
        cls.validate_params(vllm.SamplingParams(temperature=0.0, extra_args=extra))  # greedy
        cls.validate_params(vllm.SamplingParams(temperature=0.3))  # no HAPO arguments
        with pytest.raises(ValueError, match=r"SamplingParams.temperature must be 1.0.*got 0.7"):
            cls.validate_params(vllm.SamplingParams(temperature=0.7, extra_args=extra))
        with pytest.raises(ValueError, match=r"SamplingParams.min_p must be 0.*got 0.05"):
            cls.validate_params(vllm.SamplingParams(temperature=1.0, min_p=0.05, extra_args=extra))
        with pytest.raises(ValueError, match=r'extra_args\["hapo"\]\["variant"\]'):
            cls.validate_params(vllm.SamplingParams(
                extra_args={"hapo": {**extra["hapo"], "variant": "x"}}))
        with pytest.raises(ValueError, match=r'extra_args\["hapo"\] is a str but not valid JSON'):
            cls.validate_params(vllm.SamplingParams(extra_args={"hapo": "{tau"}))
        # eps = 0 is refused at admission, not inside the engine step (dict and JSON forms)
        for entry in ({**extra["hapo"], "eps": 0.0}, json.dumps({**extra["hapo"], "eps": 0})):
            with pytest.raises(ValueError, match=r'extra_args\["hapo"\]\["eps"\] must be > 0'):
                cls.validate_params(vllm.SamplingParams(temperature=1.0,
                                                        extra_args={"hapo": entry}))
        # every key present, one of a bad type: the bad value is named, not "missing keys"
        for key in ("tau", "base_temperature", "eps", "pivot", "log_max", "log_min"):
            for entry in ({**extra["hapo"], key: "big"}, json.dumps({**extra["hapo"], key: "big"})):
                with pytest.raises(TypeError, match=rf'extra_args\["hapo"\]\["{key}"\] must be '
                                                    r"a float, got str"):
                    cls.validate_params(vllm.SamplingParams(temperature=1.0,
                                                            extra_args={"hapo": entry}))
        with pytest.raises(ValueError, match=r'extra_args\["hapo"\]\["variant"\] must be one of'):
            cls.validate_params(vllm.SamplingParams(
                temperature=1.0, extra_args={"hapo": {**extra["hapo"], "variant": 3}}))
