"""Adaptive-temperature sampling: one token per row at T = T_base·(1 + τ·ĥ).

Source: HAPO, arXiv 2509.16591, §3.1. ĥ comes from the entropy H of the raw (T = 1)
next-token distribution and ``EntropyStats`` of the previous training batch; the token is
drawn from softmax(z/T_row), and its log-prob under that same distribution (the behaviour
policy) is returned with the temperature, so that a trainer can form an exact importance
ratio.

Two implementations:
  "triton"  one fused kernel (``hapo_ops.kernels.sampling``): two reads of the logits, nothing
            of size B×V written, Gumbel-max with a counter-based Philox RNG keyed by
            (seed, row id, vocabulary index): reproducible for a seed and independent of how
            rows are batched.
  "torch"   the same semantics in row chunks of PyTorch (entropy and log-probs through
            ``hapo_ops.vocab.logprob_entropy``), with an exponential race driven by a
            ``torch.Generator`` seeded from the same seed: another random stream, which
            depends on the batch layout. It also supports ``top_k`` / ``top_p``, with the
            truncation rule of ``hapo_ops.vocab.truncation`` (the one ``logprobs_and_entropy``
            recomputes), so that the returned behaviour log-prob is the trainer's.

Both run inside the ``hapo_ops::adaptive_temperature_sample`` custom op, so
``torch.compile(fullgraph=True)`` traces a sampling step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hapo_ops._utils.blocks import block_threads, for_each_block
from hapo_ops._utils.validation import check_float, check_tau, check_tensor, check_variant
from hapo_ops.entropy.signal import EntropyStats
from hapo_ops.entropy.temperature import adaptive_temperature
from hapo_ops.vocab.logprob_entropy import token_entropy, token_logprobs
from hapo_ops.vocab.row_statistics import saturate
from hapo_ops.vocab.subset_statistics import default_chunk_tokens
from hapo_ops.vocab.token_inputs import check_logits, resolve_impl
from hapo_ops.vocab.truncation import check_top_k, check_top_p, truncation_threshold

SEED_LIMIT = 1 << 63


class SampleOutput(NamedTuple):
    """Result of :func:`adaptive_temperature_sample`, all (B,), no gradient.

    tokens: int64 drawn token ids; temperature: float32 T of each row; logprobs: float32
    log-prob of the drawn token under the distribution it was drawn from; entropy: float32
    Shannon entropy (nats) of the raw T = 1 distribution.
    """

    tokens: torch.Tensor
    temperature: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------

def _check_stats(stats: object) -> EntropyStats | None:
    if stats is None:
        return None
    if not isinstance(stats, tuple) or len(stats) != 3:
        raise TypeError(f"stats must be an EntropyStats or None, got {type(stats).__name__}")
    return EntropyStats(*stats)


def _check_seed(seed: object, generator: object) -> None:
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed must lie in [0, 2**63), got {seed}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def _check_truncation(top_k: object, top_p: object, logits: torch.Tensor
                      ) -> tuple[int | None, float | None]:
    """``top_k`` / ``top_p`` as the logits op checks them (``hapo_ops.vocab.truncation``),
    one value for every row."""
    for name, value in (("top_k", top_k), ("top_p", top_p)):
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a Python number or None for the sampler (one "
                            f"value for every row), got a tensor")
    rows = logits.shape[:1]
    return (check_top_k(top_k, rows, logits.device),
            check_top_p(top_p, rows, logits.device, check_values=False))


def _check_row_ids(row_ids: object, logits: torch.Tensor) -> torch.Tensor:
    n_rows = logits.shape[0]
    if row_ids is None:
        return torch.arange(n_rows, dtype=torch.int64, device=logits.device)
    row_ids = check_tensor("row_ids", row_ids, integer=True, allow_empty=True)
    if tuple(row_ids.shape) != (n_rows,):
        raise ValueError(f"row_ids must have shape ({n_rows},), got {tuple(row_ids.shape)}")
    if row_ids.device != logits.device:
        raise ValueError(f"row_ids must be on the device of logits ({logits.device}), "
                         f"got {row_ids.device}")
    return row_ids.to(torch.int64).contiguous()


def _draw_seed(generator: torch.Generator | None) -> torch.Tensor:
    """A seed in [0, 2^63) drawn from ``generator`` (torch's default CPU generator if None),
    as a (1,) int64 tensor on the generator's device (no host sync)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, SEED_LIMIT - 1, (1,), generator=generator, device=device,
                         dtype=torch.int64)


def _seed_tensor(seed: int | None, generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
    """The kernel's (1,) int64 seed on ``device`` without a host sync: a fill for an int (or a
    seed drawn on the CPU), a draw on the device for a device generator (a host-to-device copy
    of a pageable CPU tensor would synchronize the stream)."""
    if seed is None:
        drawn = _draw_seed(generator)
        if drawn.device == device:
            return drawn
        if drawn.device.type != "cpu":
            return drawn.to(device)
        seed = int(drawn)  # a CPU tensor: no device sync
    return torch.full((1,), seed, dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------------
# Torch path
# ---------------------------------------------------------------------------------------

def filter_top_k_top_p(scaled: torch.Tensor, top_k: int | None,
                       top_p: float | None) -> torch.Tensor:
    """Set to -inf the entries of ``scaled`` (rows of z/T) outside the top-k, then outside
    the smallest set of most probable tokens of the renormalized top-k distribution whose
    mass reaches top_p, as engines do after the temperature: the rule of
    ``hapo_ops.vocab.truncation`` (ties at either threshold kept, at least one token kept).

    Examples:
      >>> filter_top_k_top_p(torch.tensor([[3.0, 1.0, 1.0, 0.0]]), 2, None)
      tensor([[3., 1., 1., -inf]])

    References:
      Holtzman et al., arXiv 1904.09751 (top-p); vLLM's top-k/top-p sampler.
    """
    if top_k is None and (top_p is None or top_p >= 1.0):
        return scaled
    threshold = truncation_threshold(scaled, None, 1.0, top_k, top_p, "torch",
                                     default_chunk_tokens(scaled.shape[-1], scaled.device))
    return scaled.masked_fill(saturate(scaled) < threshold[:, None], float("-inf"))


def torch_sample(logits: torch.Tensor, temperature: torch.Tensor, generator: torch.Generator,
                 top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Tokens (B,) drawn from softmax(z/T) of (B, V) logits and per-row T, truncated by
    ``top_k``/``top_p`` (``hapo_ops.vocab.truncation``: the entries below the row's threshold θ
    are never drawn).

    Exponential race in row chunks: token = argmax_v z_v/T - ln E_v, E ~ Exp(1) drawn in
    float64 (no token wins through a rounded-to-zero E). Rows with no finite logit give 0.
    The chunks are spread over the CPU threads (``for_each_block``); their draws stay in
    chunk order, one stream for any thread count.
    """
    n_rows, vocab = logits.shape
    tokens = torch.empty(n_rows, dtype=torch.int64, device=logits.device)
    step = default_chunk_tokens(vocab, logits.device)
    threshold = None
    if top_k is not None or (top_p is not None and top_p < 1.0):
        threshold = truncation_threshold(logits, temperature, 1.0, top_k, top_p, "torch", step)

    def draws():  # advanced in chunk order, whichever thread takes the chunk
        for start in range(0, n_rows, step):
            stop = min(start + step, n_rows)
            race = torch.empty((stop - start, vocab), dtype=torch.float64,
                               device=logits.device)
            yield start, stop, race.exponential_(generator=generator)

    def winners(item: tuple[int, int, torch.Tensor]) -> None:
        start, stop, race = item
        scaled = logits[start:stop].to(torch.float32) / temperature[start:stop, None]
        if threshold is not None:
            dropped = saturate(logits[start:stop]) < threshold[start:stop, None]
            scaled = scaled.masked_fill_(dropped, float("-inf"))
        key = scaled - race.clamp_min_(1e-300).log_().to(torch.float32)
        tokens[start:stop] = key.nan_to_num(nan=float("-inf")).argmax(-1)

    for_each_block(winners, draws(), logits.device, block_threads(logits.numel(), logits.device))
    return tokens


def _sample_torch(logits, stats, base_temperature, tau, variant, eps, seed, top_k,
                  top_p) -> SampleOutput:
    entropy = token_entropy(logits, impl="torch")
    temperature = adaptive_temperature(entropy, stats, base_temperature=base_temperature,
                                       tau=tau, variant=variant, eps=eps).to(torch.float32)
    gen = torch.Generator(device=logits.device).manual_seed(seed)
    tokens = torch_sample(logits, temperature, gen, top_k, top_p)
    no_distribution = torch.isnan(entropy)
    tokens = tokens.masked_fill(no_distribution, 0)
    safe_t = temperature.masked_fill(no_distribution, 1.0)
    # The trainer's op with the same truncation: the same threshold, the same log-prob.
    logprobs = token_logprobs(logits, tokens, temperature=safe_t, impl="torch", top_k=top_k,
                              top_p=top_p)
    logprobs = logprobs.masked_fill(no_distribution, float("nan"))
    temperature = temperature.masked_fill(no_distribution, float("nan"))
    return SampleOutput(tokens, temperature, logprobs, entropy)


# ---------------------------------------------------------------------------------------
# One custom op for both paths: torch.compile traces through it
# ---------------------------------------------------------------------------------------

@torch.library.custom_op("hapo_ops::adaptive_temperature_sample", mutates_args=())
def _sample_op(logits: torch.Tensor, stats: torch.Tensor | None, seed: torch.Tensor,
               row_ids: torch.Tensor, base_temperature: float, tau: float, paper: bool,
               eps: float, top_k: int, top_p: float, impl: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``stats`` (3,) float32 or None; ``seed`` (1,) int64 (on the logits' device for the
    kernel, on the CPU for the torch path, which seeds a ``torch.Generator`` with it: a host
    read, free there); ``top_k`` 0 and ``top_p`` 1 mean no truncation."""
    if impl == "triton":
        from hapo_ops.kernels.sampling import adaptive_sample_forward
        return adaptive_sample_forward(logits, stats, seed, row_ids,
                                       base_temperature=base_temperature, tau=tau,
                                       paper=paper, eps=eps)
    entropy_stats = None if stats is None else EntropyStats(*stats.unbind())
    out = _sample_torch(logits, entropy_stats, base_temperature, tau,
                        "paper" if paper else "released", eps, int(seed),
                        top_k or None, top_p if top_p < 1.0 else None)
    return tuple(t.clone() if t is logits else t for t in out)


@_sample_op.register_fake
def _(logits, stats, seed, row_ids, base_temperature, tau, paper, eps, top_k, top_p, impl):
    n_rows = logits.shape[0]
    new = logits.new_empty
    return (new(n_rows, dtype=torch.int64), new(n_rows, dtype=torch.float32),
            new(n_rows, dtype=torch.float32), new(n_rows, dtype=torch.float32))


def _stats_tensor(stats: EntropyStats | None, device: torch.device) -> torch.Tensor | None:
    if stats is None:
        return None
    return torch.stack([torch.as_tensor(s).reshape(()).to(device, torch.float32)
                        for s in stats])


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def adaptive_temperature_sample(logits: torch.Tensor, stats: EntropyStats | None, *,
                                base_temperature: float = 1.0, tau: float = 0.05,
                                variant: str = "paper", seed: int | None = None,
                                generator: torch.Generator | None = None,
                                top_k: int | None = None, top_p: float | None = None,
                                row_ids: torch.Tensor | None = None,
                                impl: str = "auto", eps: float = 1e-8) -> SampleOutput:
    """Draw one token per row from softmax(z/T_row), T_row = T_base·(1 + τ·ĥ_row).

    H_row = entropy of softmax(z_row) (T = 1), ĥ = ``normalized_entropy(H, stats,
    variant=variant)``, T = ``adaptive_temperature(H, stats, ...)``; ``stats=None`` (no
    training batch yet) gives T = T_base for every row. |τ| < 1 (T > 0); τ < 0 inverts
    the adaptation (high-entropy rows sample cooler), as in ``adaptive_temperature``.
    Source: HAPO (arXiv 2509.16591) §3.1;

    Args:
      logits: (B, V) float logits of the next token (any float dtype; math in fp32).
      stats: ``EntropyStats`` of the previous training batch, or None.
      seed / generator: at most one. ``seed`` (int in [0, 2^63)) makes the draw reproducible;
        ``generator`` supplies a seed (one draw from it); neither draws the seed from torch's
        default CPU generator (so ``torch.manual_seed`` reproduces it). Under
        ``torch.compile`` pass ``seed`` (a generator object cannot enter a graph).
      top_k, top_p: optional truncation applied after the temperature, as engines do (torch
        path only; ``impl="auto"`` then takes the torch path, ``impl="triton"`` raises).
        ``logprobs`` is then the log-prob under the truncated, renormalized distribution
        actually sampled from, equal to ``token_logprobs(logits, tokens,
        temperature=temperature, top_k=top_k, top_p=top_p)`` (the same threshold search,
        ``hapo_ops.vocab.truncation``; ties at a threshold kept, at least one token) and to the
        replay with ``kept_ids`` = the kept set.
      row_ids: (B,) integer identity of each row in the kernel's counter-based RNG (default
        ``arange(B)``): a row with the same logits, seed and row id draws the same token in
        any batch. The torch path draws from a ``torch.Generator`` stream instead (another
        stream, which depends on the batch) and ignores it.
      impl: "auto" (Triton on CUDA without top_k/top_p, else torch), "torch" or "triton".
      eps: the floor of H in ℓ = ln(max(H, eps)) and of the scales of ĥ, as in
        ``normalized_entropy`` (use the same value as the ``entropy_stats`` that made
        ``stats``).
    Returns:
      ``SampleOutput(tokens, temperature, logprobs, entropy)``, each (B,), no gradient.
      Without truncation ``logprobs == token_logprobs(logits, tokens, temperature=temperature)``
      and ``entropy == token_entropy(logits)``. A row with no distribution (all logits -inf)
      or with a NaN logit gives token 0 and NaN temperature, logprob and entropy, on both
      paths. Entries at -inf are never drawn otherwise; +inf entries share all the mass.
    """
    logits = check_logits("logits", logits, dims=2)
    stats = _check_stats(stats)
    base_temperature = check_float("base_temperature", base_temperature, min_value=0.0,
                                   min_inclusive=False)
    tau = check_tau("tau", tau)
    variant = check_variant(variant)
    _check_seed(seed, generator)
    top_k, top_p = _check_truncation(top_k, top_p, logits)
    row_ids = _check_row_ids(row_ids, logits)
    truncated = top_k is not None or top_p is not None
    if impl == "auto" and truncated:
        impl = "torch"
    eps = check_float("eps", eps, min_value=0.0, min_inclusive=False)
    impl = resolve_impl(impl, logits)
    if impl == "triton" and truncated:
        raise ValueError("top_k and top_p are supported by impl='torch' only; the fused "
                         "kernel samples from the full softmax(z/T)")
    seed_device = logits.device if impl == "triton" else torch.device("cpu")
    with torch.no_grad():
        out = _sample_op(logits.detach(), _stats_tensor(stats, logits.device),
                         _seed_tensor(seed, generator, seed_device), row_ids,
                         base_temperature, tau, variant == "paper", eps, top_k or 0,
                         1.0 if top_p is None else top_p, impl)
    return SampleOutput(*out)


__all__ = ["SampleOutput", "adaptive_temperature_sample", "filter_top_k_top_p"]
