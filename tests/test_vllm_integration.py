"""hapo_ops.integrations.vllm: the per-request arguments (no vLLM needed) and, with vLLM
installed (its own CI environment, .ci/vllm.sh), the logits processors run by vLLM's real
engine, batch bookkeeping and sampler on CPU with a tiny random Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

import hapo_ops
from hapo_ops.integrations.vllm import parse_sampling_args, sampling_extra_args


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


BASE = {"tau": 0.05, "base_temperature": 1.0, "variant": "paper", "eps": 1e-8}


@pytest.mark.parametrize("entry, error, message", [
    (3.0, TypeError, r'extra_args\["hapo"\] must be a dict'),
    ({**BASE, "tua": 0.1}, ValueError, r"unknown keys \['tua'\]"),
    ({k: v for k, v in BASE.items() if k != "eps"}, ValueError, r"missing keys \['eps'\]"),
    ({**BASE, "tau": 1.0}, ValueError, r'\["tau"\] must be in \(-1, 1\)'),
    ({**BASE, "tau": "0.1"}, TypeError, r'\["tau"\] must be a float'),
    ({**BASE, "tau": True}, TypeError, r'\["tau"\] must be a float'),
    ({**BASE, "base_temperature": 0.0}, ValueError, r'\["base_temperature"\] must be > 0'),
    ({**BASE, "variant": "paper2"}, ValueError, r'\["variant"\] must be one of'),
    ({**BASE, "eps": -1.0}, ValueError, r'\["eps"\] must be > 0'),
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
