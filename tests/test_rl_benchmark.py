"""Smoke tests of the RL benchmark's loop (benchmarks/rl): tiny sizes, every method.

They check the plumbing, not learning: recorded temperatures reach the importance ratio,
entropy stats carry from one step to the next rollout, losses are finite, parameters move,
micro-batching does not change the update, and seeded runs reproduce exactly.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
import torch

import hapo_ops
from benchmarks.rl import loop, report, task
from benchmarks.rl.methods import METHODS, method_by_name

TINY = loop.RLConfig(max_len=5, prompts_per_step=4, group_size=4, steps=3, ppo_epochs=2,
                     micro_batches=2, lr=3e-3, warm_max_steps=20, warm_batch=32, eval_size=16,
                     eval_every=2, d_embed=8, d_hidden=16)


@pytest.fixture(scope="module")
def warm() -> dict[str, torch.Tensor]:
    return loop.warm_start(TINY, 0)[0]


def _policy(warm: dict[str, torch.Tensor], cfg: loop.RLConfig = TINY) -> loop.GRUPolicy:
    policy = loop.make_policy(cfg, 0)
    policy.load_state_dict(warm)
    return policy


def _batch(policy, cfg, method, stats, seed=0) -> loop.Batch:
    held_out = loop.eval_problems(cfg)[2]
    prompts, targets = loop.train_problems(cfg.prompts_per_step, cfg, held_out,
                                           torch.Generator().manual_seed(seed))
    return loop.rollout(policy, prompts, targets, stats, method, cfg,
                        torch.Generator().manual_seed(seed + 1))


def test_task_encoding_and_reward() -> None:
    seqs = torch.tensor([[3, 1, 2, task.PAD], [7, task.PAD, task.PAD, task.PAD]])
    prompts, targets = task.encode_prompts(seqs), task.encode_answers(seqs)
    assert prompts.tolist() == [[task.PAD, task.BOS, 3, 1, 2, task.EQ],
                                [task.PAD] * 3 + [task.BOS, 7, task.EQ]]
    assert targets.tolist() == [[1, 2, 3, task.EOS, task.PAD],
                                [7, task.EOS] + [task.PAD] * 3]
    junk_after_eos = targets.clone()
    junk_after_eos[1, 2:] = 5
    wrong = targets.clone()
    wrong[0, 0] = 2
    assert task.rewards(junk_after_eos, targets).tolist() == [1.0, 1.0]
    assert task.rewards(wrong, targets).tolist() == [0.0, 1.0]
    assert task.response_mask(junk_after_eos)[1].tolist() == [True, True, False, False, False]


def test_held_out_problems_never_trained_on() -> None:
    cfg = dataclasses.replace(TINY, max_len=1, eval_size=6)   # 10 possible problems
    held_out = loop.eval_problems(cfg)[2]
    _, targets = loop.train_problems(200, cfg, held_out, torch.Generator().manual_seed(0))
    assert not set(targets[:, 0].tolist()) & set(held_out.tolist())  # key of [d] is d


@pytest.mark.parametrize("name", ["hapo", "hapo-released", "grpo"])
def test_ratio_uses_recorded_temperatures(warm, name: str) -> None:
    """Training log-probs at the recorded per-token T equal the behaviour log-probs before
    any update (ratio 1); at T = 1 they would not."""
    cfg = dataclasses.replace(TINY, base_temperature=0.7, tau=0.3)
    method = method_by_name(name)
    policy = _policy(warm, cfg)
    first = _batch(policy, cfg, method, None)
    stats = hapo_ops.entropy_stats(first.entropy, first.mask)
    batch = _batch(policy, cfg, method, stats, seed=5)
    valid = batch.mask
    if method.adaptive_temperature:
        assert batch.temperature[valid].unique().numel() > 1   # per-token temperatures
    answers, labels, temperature = loop.training_inputs(batch)
    with torch.no_grad():
        logits = loop.answer_logits(policy, batch.prompts, answers)
        logp, _ = hapo_ops.logprobs_and_entropy(logits, labels, temperature=temperature,
                                                impl="torch")
        logp_t1 = hapo_ops.token_logprobs(logits, labels, impl="torch")
    torch.testing.assert_close(logp[valid], batch.logprobs[valid], atol=2e-5, rtol=0)
    assert (logp_t1[valid] - batch.logprobs[valid]).abs().max() > 1e-3
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    metrics, _ = loop.train_step(policy, optimizer, batch, method, cfg)
    assert metrics["ratio_check"] < 2e-5


def test_stats_carried_between_steps(warm) -> None:
    """Step 0 samples at T_base (no stats yet); later steps use the previous step's stats."""
    runs = {name: loop.run_method(method_by_name(name), TINY, 0, warm)
            for name in ("hapo", "hapo-released", "hapo-no-temp", "dapo")}
    for name, run in runs.items():
        first, later = run["steps"][0], run["steps"][1:]
        assert first["temp_min"] == first["temp_max"] == TINY.base_temperature
        if name in ("hapo", "hapo-released"):
            assert all(s["temp_max"] > s["temp_min"] for s in later), name
            assert all(s["temp_max"] <= TINY.base_temperature * (1 + TINY.tau) + 1e-6
                       for s in later)
        else:
            assert all(s["temp_min"] == s["temp_max"] == TINY.base_temperature
                       for s in later), name
    # the released variant's ĥ is never negative, so T never drops below T_base
    assert all(s["temp_min"] >= TINY.base_temperature - 1e-6
               for s in runs["hapo-released"]["steps"])
    assert any(s["temp_min"] < TINY.base_temperature for s in runs["hapo"]["steps"])


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_each_method_trains(warm, method) -> None:
    policy = _policy(warm)
    before = [p.detach().clone() for p in policy.parameters()]
    batch = _batch(policy, TINY, method, None)
    batch.rewards = torch.tensor([1.0, 0.0] * (batch.rewards.numel() // 2))  # signal in every group
    optimizer = torch.optim.Adam(policy.parameters(), lr=TINY.lr)
    metrics, stats = loop.train_step(policy, optimizer, batch, method, TINY)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert isinstance(stats, hapo_ops.EntropyStats) and torch.isfinite(stats.pivot)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


@pytest.mark.parametrize("name", ["hapo", "grpo"])
def test_micro_batches_give_the_full_batch_update(warm, name: str) -> None:
    """Global token (and sequence) counts + summed micro-batch losses: the same update as
    one batch."""
    method = method_by_name(name)
    batch = _batch(_policy(warm), TINY, method, None)
    batch.rewards = torch.tensor([1.0, 0.0] * (batch.rewards.numel() // 2))
    params = []
    for micro in (1, 2, 4):
        cfg = dataclasses.replace(TINY, micro_batches=micro, ppo_epochs=1)
        policy = _policy(warm)
        loop.train_step(policy, torch.optim.SGD(policy.parameters(), lr=1.0), batch, method, cfg)
        params.append(torch.cat([p.detach().flatten() for p in policy.parameters()]))
    torch.testing.assert_close(params[1], params[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(params[2], params[0], atol=1e-6, rtol=1e-5)


def test_seeded_runs_reproduce(warm) -> None:
    method = method_by_name("hapo")
    a, b = (loop.run_method(method, TINY, 0, warm) for _ in range(2))
    c = loop.run_method(method, TINY, 1)
    for run in (a, b, c):
        run.pop("wall_s")
    assert a == b
    assert a["steps"] != c["steps"]


def test_report_files(warm, tmp_path: pathlib.Path) -> None:
    cfg = dataclasses.replace(TINY, steps=2)
    methods = tuple(m for m in METHODS if m.name in ("grpo", "hapo"))
    runs = [loop.run_method(m, cfg, s, warm) for s in (0, 1) for m in methods]
    meta = {"command": "test", "seeds": [0, 1], "config": dataclasses.asdict(cfg),
            "date": "2026-11-30", "cpu": "cpu", "cpu_count": 2, "workers": 1,
            "torch": torch.__version__, "hapo_ops": hapo_ops.__version__,
            "git_commit": None, "wall_s": 1.0}
    doc = report.build(meta, methods, runs)
    text = report.markdown(doc)
    assert "| hapo |" in text and "hapo - grpo" in text
    paths = report.write(doc, text, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["grpo"]
    assert all(pathlib.Path(p).exists() for p in paths)


def test_only_the_public_api() -> None:
    """The benchmark uses hapo_ops as a user would: no internal module imports."""
    for path in pathlib.Path(loop.__file__).parent.glob("*.py"):
        source = path.read_text()
        assert "from hapo_ops." not in source and "import hapo_ops." not in source, path


def test_t_interval() -> None:
    stat = report.mean_ci([1.0, 2.0, 3.0])
    assert stat["mean"] == 2.0
    assert abs(stat["ci"] - 4.303 * (1 / 3) ** 0.5) < 1e-9
