"""Tensor- and data-parallel use through ``torch.distributed`` (SPEC §6).

Everything takes a process group the trainer already has (NCCL on GPU, gloo on CPU);
``group=None`` means a single process and communicates nothing.

Vocabulary (tensor) parallel log-prob and entropy. Rank r holds a contiguous slice of the
vocabulary and reduces it to the per-row sums of ``hapo_ops.token_stats`` in its units u
(1 for the torch path, ln 2 for the Triton kernel): m_r = max s, rest_r = Σ_{v≠argmax}
e^(s_v - m_r), a_r = Σ e^(s_v - m_r)(m_r - s_v). With M = max_r m_r (all-reduce MAX),
c_r = e^(m_r - M) and T = {r : m_r = M} (the ranks tied at the global max):

    rest = Σ_{r∈T} rest_r + (|T| - 1) + Σ_{r∉T} c_r (1 + rest_r)
    a    = Σ_{r∈T} a_r + Σ_{r∉T} c_r (a_r + (M - m_r)(1 + rest_r))
    H    = log1p(rest) + u·a / (1 + rest),    logp = u·(s_y - M) - log1p(rest)

(one all-reduce SUM of [rest, a, s_y - M on the label's rank, 1[r∈T], 1[label here]]).
A rank at the maximum keeps its own rest_r instead of adding 1 + rest_r and subtracting 1,
so a near-deterministic row stays exact (no cancellation), as unsharded. Communication per
call: 6 float32 values per token (24·N bytes), independent of V; the backward needs none:
each shard's gradient is the unsharded formula with the global (M, log1p(rest), H), and the
+g_lp term only on the shard that holds the label. ``linear_logprobs_and_entropy(tp_group=)``
(an LM head split by vocabulary rows, hidden replicated) combines its shards' sums with the
same functions (``shard_local_labels``, ``vocab_parallel_outputs``); its backward adds one
all-reduce SUM of the hidden gradient (N·D values), each shard holding dz_r · W_r.

Data parallel: ``entropy_stats(..., group=)`` (radix selection with all-reduced 256-bin
histograms), ``grpo_advantages`` / ``token_level_group_advantages(..., group=)`` (per-row
values all-gathered, O(B)), and ``global_token_count`` for exact token-means.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from hapo_ops._validation import check_mask, check_tensor
from hapo_ops.token_stats import (NEG_LARGE, ROW_LABEL, ROW_MAX, ROW_REST, ROW_SPREAD,
                                  _backward_impl, _prepare, checks_values, row_statistics)

ProcessGroup = dist.ProcessGroup


# ---------------------------------------------------------------------------------------
# Reducers: pure wrappers (the input is never modified); identity without a group.
# ---------------------------------------------------------------------------------------

def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: ProcessGroup | None
                ) -> torch.Tensor:
    if group is None:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=op, group=group)
    return out


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Σ over the ranks of ``group`` (a new tensor; ``tensor`` itself when group is None)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM, group)


def all_reduce_max(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Elementwise max over the ranks of ``group``."""
    return _all_reduce(tensor, dist.ReduceOp.MAX, group)


def all_reduce_min(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Elementwise min over the ranks of ``group``."""
    return _all_reduce(tensor, dist.ReduceOp.MIN, group)


def all_gather_rows(rows: torch.Tensor, group: ProcessGroup | None = None
                    ) -> tuple[torch.Tensor, int]:
    """(the rows of every rank concatenated in rank order, offset of this rank's rows).

    Row counts may differ between ranks. That makes one host read unavoidable: the receive
    buffers' sizes are the other ranks' row counts (one all-gather of an int per rank), then
    one all-gather of the rows padded to the largest count.
    """
    if group is None:
        return rows, 0
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    size = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    sizes_out = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes_out, size, group=group)
    sizes = torch.cat(sizes_out).tolist()
    padded = rows.new_zeros((max(sizes),) + tuple(rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    full = torch.cat([part[:n] for part, n in zip(gathered, sizes)])
    return full, sum(sizes[:rank])


def global_token_count(mask: torch.Tensor | Sequence[torch.Tensor],
                       group: ProcessGroup | None = None) -> torch.Tensor:
    """N_tok = Σ over ranks (and over the given micro-batch masks) of Σ m, an int64 0-d tensor.

    The denominator that makes a token-mean exact however the step is split: pass it as
    ``num_tokens`` to every micro-batch's ``aggregate_loss`` / policy loss and sum (do not
    average) the micro-batch losses; data-parallel gradient averaging then needs the
    per-rank sum, i.e. multiply by the world size if the trainer's all-reduce averages.
    """
    return all_reduce_sum(_count(mask, lambda valid: valid.sum(dtype=torch.int64)), group)


def global_sequence_count(mask: torch.Tensor | Sequence[torch.Tensor],
                          group: ProcessGroup | None = None) -> torch.Tensor:
    """N_seq = Σ over ranks and micro-batches of the rows with a valid token (int64 0-d),
    the ``num_sequences`` of the sequence-mean modes of ``aggregate_loss``."""
    return all_reduce_sum(_count(mask, lambda valid: valid.reshape(valid.shape[0], -1)
                                 .any(-1).sum(dtype=torch.int64)), group)


def _count(mask, count_one) -> torch.Tensor:
    masks = [mask] if isinstance(mask, torch.Tensor) else list(mask)
    if not masks:
        raise ValueError("mask must be a tensor or a non-empty sequence of tensors, got none")
    counts = [count_one(check_mask("mask", m)) for m in masks]
    return torch.stack([c.to(counts[0].device) for c in counts]).sum()


# ---------------------------------------------------------------------------------------
# Vocabulary-parallel log-prob and entropy
# ---------------------------------------------------------------------------------------

def combine_vocab_shards(stats: torch.Tensor, has_label: torch.Tensor, unit: float,
                         group: ProcessGroup | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, H, state, found) of the whole vocabulary from each shard's per-row sums.

    ``stats`` (N, 4) [m, rest, a, s_y] in units of ``unit`` nats (``token_stats.row_statistics``),
    ``has_label`` (N,) bool: the row's label lies in this shard. Formula in the module
    docstring. ``state`` (N, 2) = (M, log1p(rest)), what the backward needs; ``found`` (N,)
    counts the shards that hold the label (0: the label is in no shard). logp is unmasked.
    """
    row_max, rest, spread, s_label = (stats[:, i] for i in (ROW_MAX, ROW_REST, ROW_SPREAD,
                                                            ROW_LABEL))
    global_max = all_reduce_max(row_max, group)
    tied = row_max == global_max
    gap = global_max - row_max                                      # ≥ 0, in units
    weight = torch.exp(-gap * unit)
    mass = 1.0 + rest
    label_term = torch.where(s_label <= NEG_LARGE, float("-inf"), s_label - global_max)
    parts = torch.stack([
        torch.where(tied, rest, weight * mass),
        torch.where(tied, spread, weight * (spread + gap * mass)),
        torch.where(has_label, label_term, 0.0),
        tied.to(stats.dtype),
        has_label.to(stats.dtype),
    ], dim=-1)
    rest_sum, spread_sum, label_sum, n_tied, found = all_reduce_sum(parts, group).unbind(-1)
    total_rest = rest_sum + (n_tied - 1.0)
    log_norm = torch.log1p(total_rest)
    entropy = log_norm + unit * spread_sum / (1.0 + total_rest)
    logp = unit * label_sum - log_norm
    no_finite_logit = global_max <= NEG_LARGE
    entropy = torch.where(no_finite_logit, float("nan"), entropy)
    logp = torch.where(no_finite_logit, float("nan"), logp)
    return logp, entropy, torch.stack([global_max, log_norm], dim=-1), found


def shard_vocab_start(vocab_size: int, group: ProcessGroup, device: torch.device
                      ) -> torch.Tensor:
    """Global id of this rank's first vocabulary entry, Σ of the sizes of lower ranks, as an
    int64 0-d tensor: one all-gather of one int per rank (no host read)."""
    size = torch.tensor([vocab_size], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    lower = torch.cat(sizes)[: dist.get_rank(group)]
    return lower.sum()


def _check_vocab_start(vocab_start: object, device: torch.device) -> torch.Tensor | int:
    if isinstance(vocab_start, torch.Tensor):
        check_tensor("vocab_start", vocab_start, integer=True)
        if vocab_start.numel() != 1:
            raise ValueError(f"vocab_start must be an int or a 0-d tensor, got shape "
                             f"{tuple(vocab_start.shape)}")
        return vocab_start.reshape(()).to(device)
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int):
        raise TypeError(f"vocab_start must be an int or an integer tensor, "
                        f"got {type(vocab_start).__name__}")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    return vocab_start


def check_tp_group(tp_group: object) -> ProcessGroup:
    if not isinstance(tp_group, ProcessGroup):
        raise TypeError(f"tp_group must be a torch.distributed ProcessGroup, "
                        f"got {type(tp_group).__name__}")
    return tp_group


def shard_local_labels(flat_labels: torch.Tensor, vocab: int, ignore_index: int,
                       group: ProcessGroup, vocab_start: int | torch.Tensor | None, *,
                       no_labels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(shard-local labels, has_label) for global ``flat_labels`` (N,) and a shard of ``vocab``
    entries starting at ``vocab_start`` (derived with ``shard_vocab_start`` when None).
    has_label: the label lies in this shard (never for ignore_index); the local label is
    label - vocab_start there and -1 elsewhere (what the sharded backwards expect)."""
    if no_labels:
        start: int | torch.Tensor = 0       # every label is ignore_index: no shard holds one
    elif vocab_start is None:
        start = shard_vocab_start(vocab, group, flat_labels.device)
    else:
        start = _check_vocab_start(vocab_start, flat_labels.device)
    local = flat_labels - start
    has_label = (flat_labels != ignore_index) & (local >= 0) & (local < vocab)
    return torch.where(has_label, local, -1), has_label


def vocab_parallel_outputs(stats: torch.Tensor, has_label: torch.Tensor, unit: float,
                           labels: torch.Tensor, ignore_index: int, group: ProcessGroup,
                           check_found: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, H, state, logp_ok) of every vocabulary-parallel op from this shard's per-row
    sums (``combine_vocab_shards``): logp 0 at ignore_index and NaN for a label held by no
    shard (which raises instead with ``check_found``, on every rank: the check follows the
    all-reduce); logp and H float32, state (M, log1p(rest)) in the dtype of ``stats``;
    ``logp_ok`` (N,) bool: the rows whose logp has a gradient."""
    logp, entropy, state, found = combine_vocab_shards(stats, has_label, unit, group)
    ignored = labels == ignore_index
    if check_found and bool((~ignored & (found == 0)).any()):
        raise ValueError(f"labels must be global ids held by some vocabulary shard or "
                         f"equal ignore_index={ignore_index}; found "
                         f"{int((~ignored & (found == 0)).sum())} in no shard")
    logp = torch.where(found > 0, logp, float("nan"))
    logp = torch.where(ignored, 0.0, logp)
    logp_ok = ~ignored & (found > 0)
    return logp.to(torch.float32), entropy.to(torch.float32), state, logp_ok


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    """Forward: shard sums → all-reduces → (logp, H). Backward: local, no communication."""

    @staticmethod
    def forward(ctx, logits, labels, local_labels, has_label, temperature, scalar_temperature,
                ignore_index, impl, inplace, group, check_found):
        stats, unit = row_statistics(logits, local_labels, temperature, scalar_temperature,
                                     impl)
        logp, entropy, state, logp_ok = vocab_parallel_outputs(
            stats, has_label, unit, labels, ignore_index, group, check_found)
        ctx.save_for_backward(logits, local_labels, logp_ok, temperature, state, entropy)
        ctx.scalar_temperature, ctx.ignore_index = scalar_temperature, ignore_index
        ctx.impl, ctx.inplace = impl, inplace
        ctx.set_materialize_grads(False)
        token_shape = logits.shape[:-1]
        return logp.view(token_shape), entropy.view(token_shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, local_labels, logp_ok, temperature, state, entropy = ctx.saved_tensors
        none = (None,) * 10
        if grad_logp is None and grad_entropy is None:
            return (None,) + none
        if grad_logp is not None:
            grad_logp = torch.where(logp_ok, grad_logp.reshape(-1).to(torch.float32), 0.0)
        if grad_entropy is not None:
            grad_entropy = grad_entropy.reshape(-1).to(torch.float32).contiguous()
        grad = _backward_impl(logits, local_labels, temperature, ctx.scalar_temperature, state,
                              entropy, grad_logp, grad_entropy, ctx.ignore_index, ctx.impl,
                              ctx.inplace, sharded=True)
        return (grad,) + none


def vocab_parallel_logprobs_and_entropy(
        logits: torch.Tensor, labels: torch.Tensor | None, tp_group: ProcessGroup, *,
        vocab_start: int | torch.Tensor | None = None, temperature: float | torch.Tensor = 1.0,
        ignore_index: int = -100, impl: str = "auto", inplace_backward: bool = False,
        validate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``logprobs_and_entropy`` of a vocabulary shard: ``logits`` (..., V_r) is this rank's
    contiguous slice [vocab_start, vocab_start + V_r) of the vocabulary, ``labels`` global
    ids. Returns the unsharded op's (logp, H) on every rank, differentiable in both (the
    gradient is this shard's slice of the unsharded gradient). See the module docstring.

    Communication: all-reduce MAX of N float32, all-reduce SUM of 5·N float32 (plus, without
    ``vocab_start``, one all-gather of one int per rank). Labels held by no shard raise on
    CPU and with ``validate=True`` (after the all-reduce, so every rank raises); otherwise
    their logp is NaN.
    """
    check_tp_group(tp_group)
    no_labels = labels is None
    logits, flat_labels, t_tensor, t_scalar, impl = _prepare(
        logits, labels, temperature, ignore_index, impl, validate, check_label_range=False)
    local, has_label = shard_local_labels(flat_labels, logits.shape[-1], ignore_index,
                                          tp_group, vocab_start, no_labels=no_labels)
    check_found = checks_values(logits, validate) and not no_labels
    return _VocabParallelLogprobsEntropy.apply(
        logits, flat_labels, local, has_label, t_tensor, t_scalar, ignore_index, impl,
        bool(inplace_backward), tp_group, check_found)


__all__ = ["all_gather_rows", "all_reduce_max", "all_reduce_min", "all_reduce_sum",
           "check_tp_group", "combine_vocab_shards", "global_sequence_count",
           "global_token_count", "shard_local_labels", "shard_vocab_start",
           "vocab_parallel_logprobs_and_entropy", "vocab_parallel_outputs"]
