"""The RL loop: supervised warm-start, then rollout -> advantages -> PPO epochs, per method.

Everything HAPO-specific goes through the public ``hapo_ops`` API, as a user's trainer
would call it:

- rollout: ``adaptive_temperature_sample(impl="torch")`` per decoding step with the
  ``EntropyStats`` of the previous training batch (None on the first step, and always None
  for methods without adaptive temperature, i.e. T = T_base), recording each token's
  temperature and behaviour log-prob;
- training: ``logprobs_and_entropy(..., temperature=<recorded per-token T>)``, so the
  importance ratio compares against the distribution the token was drawn from;
  ``token_level_group_advantages`` or ``grpo_advantages``; ``hapo_policy_loss`` or
  ``clipped_policy_loss`` with ``num_tokens=global_token_count(...)`` (and
  ``num_sequences``) over the micro-batches, micro-batch losses summed, several PPO
  epochs (one optimizer step each) per batch;
- ``entropy_stats`` of the step's T = 1 entropy feeds the next rollout; the loss's ĥ uses
  stats over the whole step's entropies (at the recorded T), so it does not depend on the
  micro-batch split.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import hapo_ops
from benchmarks.rl import task
from benchmarks.rl.methods import Method
from benchmarks.rl.policy import GRUPolicy, answer_logits

EVAL_SEED = 2026  # the held-out problems are the same for every seed and method


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Sizes and hyper-parameters shared by every method."""

    max_len: int = 16
    prompts_per_step: int = 16
    group_size: int = 8
    steps: int = 200
    ppo_epochs: int = 4
    micro_batches: int = 2
    lr: float = 3e-4
    grad_clip: float = 1.0
    warm_target: float = 0.6
    warm_max_steps: int = 1000
    warm_batch: int = 128
    warm_lr: float = 3e-3
    eval_size: int = 512
    eval_every: int = 10
    d_embed: int = 32
    d_hidden: int = 128
    base_temperature: float = 1.0
    tau: float = 0.05
    quantile: float = 0.8


@dataclasses.dataclass
class Batch:
    """One step's rollouts. tokens/mask/temperature/logprobs/entropy are (B, A)."""

    prompts: torch.Tensor
    targets: torch.Tensor
    group_ids: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    temperature: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    rewards: torch.Tensor


Chooser = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor]]


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[rl {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_policy(cfg: RLConfig, seed: int) -> GRUPolicy:
    """A freshly initialised policy; the initialisation depends only on ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GRUPolicy(task.VOCAB_SIZE, cfg.d_embed, cfg.d_hidden)


def eval_problems(cfg: RLConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The held-out problems: prompts, targets and their (n,) keys."""
    seqs = task.sample_sequences(cfg.eval_size, cfg.max_len,
                                 torch.Generator().manual_seed(EVAL_SEED))
    return task.encode_prompts(seqs), task.encode_answers(seqs), task.keys(seqs)


def train_problems(n: int, cfg: RLConfig, held_out: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n training problems (prompts, targets), none of them among the held-out ones."""
    seqs = task.sample_sequences(n, cfg.max_len, generator)
    clash = torch.isin(task.keys(seqs), held_out)
    while bool(clash.any()):
        fresh = task.sample_sequences(n, cfg.max_len, generator)
        seqs = torch.where(clash[:, None], fresh, seqs)
        clash = torch.isin(task.keys(seqs), held_out)
    return task.encode_prompts(seqs), task.encode_answers(seqs)


def decode(policy: GRUPolicy, prompts: torch.Tensor, length: int,
           choose: Chooser) -> tuple[torch.Tensor, ...]:
    """Autoregressive decoding of ``length`` tokens; ``choose(logits)`` returns
    (tokens, temperature, logprobs, entropy) per row. Returns those four stacked (B, length)."""
    columns: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        logits, state = policy(prompts)
        next_logits = logits[:, -1]
        for _ in range(length):
            picked = choose(next_logits)
            columns.append(picked)
            logits, state = policy(picked[0][:, None], state)
            next_logits = logits[:, 0]
    return tuple(torch.stack(col, dim=1) for col in zip(*columns))


def sampler(stats: hapo_ops.EntropyStats | None, cfg: RLConfig, variant: str,
            generator: torch.Generator) -> Chooser:
    """Adaptive-temperature sampling with the previous batch's stats (None: T = T_base)."""
    def choose(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = hapo_ops.adaptive_temperature_sample(
            logits, stats, base_temperature=cfg.base_temperature, tau=cfg.tau,
            variant=variant, generator=generator, impl="torch")
        return out.tokens, out.temperature, out.logprobs, out.entropy
    return choose


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Arg-max decoding (temperature, log-prob and entropy are placeholders)."""
    zeros = torch.zeros(logits.shape[0])
    return logits.argmax(dim=-1), zeros + 1.0, zeros, zeros


def rollout(policy: GRUPolicy, prompts: torch.Tensor, targets: torch.Tensor,
            stats: hapo_ops.EntropyStats | None, method: Method, cfg: RLConfig,
            generator: torch.Generator) -> Batch:
    """G samples for each prompt, with recorded temperatures and behaviour log-probs."""
    group_ids = torch.arange(prompts.shape[0]).repeat_interleave(cfg.group_size)
    prompts, targets = prompts[group_ids], targets[group_ids]
    used_stats = stats if method.adaptive_temperature else None
    tokens, temperature, logprobs, entropy = decode(
        policy, prompts, targets.shape[1], sampler(used_stats, cfg, method.variant, generator))
    return Batch(prompts, targets, group_ids, tokens, task.response_mask(tokens),
                 temperature, logprobs, entropy, task.rewards(tokens, targets))


def training_inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Answers fed to the policy (PAD after EOS), labels (-100 outside the response) and
    the per-token temperature (1 outside the response)."""
    answers = torch.where(batch.mask, batch.tokens, task.PAD)
    labels = torch.where(batch.mask, batch.tokens, -100)
    temperature = torch.where(batch.mask, batch.temperature, 1.0)
    return answers, labels, temperature


def advantages(batch: Batch, method: Method) -> torch.Tensor:
    """(B, A) advantages: token-level group average or GRPO, zero outside the response."""
    if method.advantages == "token":
        return hapo_ops.token_level_group_advantages(batch.rewards, batch.group_ids,
                                                     batch.mask, variant=method.variant)
    return hapo_ops.grpo_advantages(batch.rewards, batch.group_ids, batch.mask)


def policy_loss(method: Method, logp: torch.Tensor, old_logp: torch.Tensor,
                adv: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor,
                stats: hapo_ops.EntropyStats, num_tokens: torch.Tensor,
                num_sequences: torch.Tensor) -> hapo_ops.PolicyLossOutput:
    """The method's loss of one micro-batch, normalized by the whole step's counts."""
    if method.loss == "hapo":
        return hapo_ops.hapo_policy_loss(
            logp, old_logp, adv, entropy, mask, stats=stats, variant=method.variant,
            eps_low=method.eps_low, eps_high=method.eps_high, alpha=method.alpha,
            beta=method.beta, dual_clip=method.dual_clip, agg=method.agg,
            num_tokens=num_tokens, num_sequences=num_sequences)
    return hapo_ops.clipped_policy_loss(
        logp, old_logp, adv, mask, eps_low=method.eps_low, eps_high=method.eps_high,
        dual_clip=method.dual_clip, agg=method.agg, num_tokens=num_tokens,
        num_sequences=num_sequences)


def train_step(policy: GRUPolicy, optimizer: torch.optim.Optimizer, batch: Batch,
               method: Method, cfg: RLConfig) -> tuple[dict[str, float], hapo_ops.EntropyStats]:
    """PPO epochs on one batch. Returns metrics and the stats for the next rollout."""
    answers, labels, temperature = training_inputs(batch)
    mask = batch.mask
    with torch.no_grad():
        logits = answer_logits(policy, batch.prompts, answers)
        old_check, entropy_t = hapo_ops.logprobs_and_entropy(
            logits, labels, temperature=temperature, impl="torch")
        next_stats = hapo_ops.entropy_stats(hapo_ops.token_entropy(logits, impl="torch"),
                                            mask, quantile=cfg.quantile)
    loss_stats = hapo_ops.entropy_stats(entropy_t, mask, quantile=cfg.quantile)
    adv = advantages(batch, method)
    parts = torch.arange(mask.shape[0]).chunk(cfg.micro_batches)
    num_tokens = hapo_ops.global_token_count([mask[p] for p in parts])
    num_sequences = hapo_ops.global_sequence_count([mask[p] for p in parts])
    sums = {"clip_low": 0.0, "clip_high": 0.0, "dual_clip": 0.0, "approx_kl": 0.0}
    losses = []
    for _ in range(cfg.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros(())
        for p in parts:
            logits = answer_logits(policy, batch.prompts[p], answers[p])
            logp, entropy = hapo_ops.logprobs_and_entropy(
                logits, labels[p], temperature=temperature[p], impl="torch")
            out = policy_loss(method, logp, batch.logprobs[p], adv[p], entropy, mask[p],
                              loss_stats, num_tokens, num_sequences)
            out.loss.backward()
            step_loss = step_loss + out.loss.detach()
            share = float(mask[p].sum()) / float(num_tokens) / cfg.ppo_epochs
            sums["clip_low"] += share * float(out.clip_frac_low)
            sums["clip_high"] += share * float(out.clip_frac_high)
            sums["dual_clip"] += share * float(out.dual_clip_frac)
            sums["approx_kl"] += share * float(out.approx_kl)
        losses.append(float(step_loss))
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
    valid = mask.float()
    temps = batch.temperature[mask]
    metrics = {
        "reward": float(batch.rewards.mean()),
        "entropy": float((batch.entropy * valid).sum() / valid.sum()),
        "length": float(valid.sum(dim=1).mean()),
        "temp_min": float(temps.min()),
        "temp_max": float(temps.max()),
        "loss": losses[0],
        # |log pi_train(T) - log pi_behaviour| before any update: 0 up to rounding when the
        # recorded temperatures are used.
        "ratio_check": float(((old_check - batch.logprobs).abs() * valid).max()),
        **sums,
    }
    return metrics, next_stats


def evaluate(policy: GRUPolicy, prompts: torch.Tensor, targets: torch.Tensor,
             cfg: RLConfig, seed: int) -> dict[str, float]:
    """Held-out accuracy, greedy and sampled at T_base (same for every method)."""
    width = targets.shape[1]
    greedy_tokens = decode(policy, prompts, width, greedy)[0]
    sample_gen = torch.Generator().manual_seed(seed)
    sampled_tokens = decode(policy, prompts, width,
                            sampler(None, cfg, "paper", sample_gen))[0]
    return {"greedy": float(task.rewards(greedy_tokens, targets).mean()),
            "sampled": float(task.rewards(sampled_tokens, targets).mean())}


def accuracy_by_length(policy: GRUPolicy, prompts: torch.Tensor,
                       targets: torch.Tensor) -> dict[str, float]:
    """Greedy held-out accuracy per sequence length."""
    tokens = decode(policy, prompts, targets.shape[1], greedy)[0]
    correct = task.rewards(tokens, targets)
    digits = (targets < 10).sum(dim=1)
    return {str(int(d)): float(correct[digits == d].mean()) for d in digits.unique()}


def warm_start(cfg: RLConfig, seed: int) -> tuple[dict[str, torch.Tensor], int]:
    """Supervised warm-start (teacher-forced log-likelihood of correct answers) until the
    greedy exact-match rate over the last 10 training batches reaches ``cfg.warm_target``
    (at most ``cfg.warm_max_steps`` steps), so every seed starts RL from about the same
    partial accuracy. Returns the state dict and the number of steps taken.

    Greedy decoding is exactly right iff every teacher-forced arg-max is, so the rate comes
    from the training logits themselves (no held-out data is looked at)."""
    policy = make_policy(cfg, seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.warm_lr)
    generator = torch.Generator().manual_seed(seed * 1000 + 7)
    held_out = eval_problems(cfg)[2]
    recent: list[float] = []
    step = 0
    while step < cfg.warm_max_steps and not (len(recent) == 10
                                             and sum(recent) / 10 >= cfg.warm_target):
        prompts, targets = train_problems(cfg.warm_batch, cfg, held_out, generator)
        mask = task.response_mask(targets)
        labels = torch.where(mask, targets, -100)
        logits = answer_logits(policy, prompts, targets)
        logp = hapo_ops.token_logprobs(logits, labels, impl="torch")
        loss = -logp.sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        exact = ((logits.detach().argmax(-1) == targets) | ~mask).all(dim=1)
        recent = (recent + [float(exact.float().mean())])[-10:]
        step += 1
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}, step


def run_method(method: Method, cfg: RLConfig, seed: int,
               warm_state: dict[str, torch.Tensor] | None = None,
               progress_every: int = 0) -> dict[str, Any]:
    """One training run. Reproducible: same (method, cfg, seed) gives the same history.
    The warm-start and the training prompts depend on the seed only, not on the method.
    ``progress_every`` > 0 logs the held-out accuracy every that many steps."""
    started = time.monotonic()
    policy = make_policy(cfg, seed)
    policy.load_state_dict(warm_state if warm_state is not None else warm_start(cfg, seed)[0])
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    data_gen = torch.Generator().manual_seed(seed * 1000 + 1)
    sample_gen = torch.Generator().manual_seed(seed * 1000 + 2)
    eval_prompts, eval_targets, held_out = eval_problems(cfg)
    stats: hapo_ops.EntropyStats | None = None
    steps: list[dict[str, float]] = []
    evals: list[dict[str, float]] = []
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evals.append({"step": step, **evaluate(policy, eval_prompts, eval_targets, cfg,
                                                   seed * 1000 + 3)})
            if progress_every and step % progress_every == 0:
                log(f"{method.name} seed {seed}: step {step}/{cfg.steps} "
                    f"greedy {evals[-1]['greedy']:.3f} sampled {evals[-1]['sampled']:.3f}")
        if step == cfg.steps:
            break
        prompts, targets = train_problems(cfg.prompts_per_step, cfg, held_out, data_gen)
        batch = rollout(policy, prompts, targets, stats, method, cfg, sample_gen)
        metrics, stats = train_step(policy, optimizer, batch, method, cfg)
        steps.append({"step": step, **metrics})
    return {"method": method.name, "seed": seed, "steps": steps, "evals": evals,
            "final_by_digits": accuracy_by_length(policy, eval_prompts, eval_targets),
            "wall_s": round(time.monotonic() - started, 2)}
