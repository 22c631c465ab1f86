"""Per-token log-prob and entropy of softmax(z/T) restricted to a subset S of the vocabulary:
the one autograd home of the logits op, for every truncation and every sharding.

    p_v = softmax(z/T)_v / Σ_{u∈S} softmax(z/T)_u  on S (0 elsewhere),
    logp = log p_y (-inf for y ∉ S),   H = -Σ_{v∈S} p_v log p_v,
    ∂logp/∂z_v = (1[v=y] - p_v)/T,   ∂H/∂z_v = -p_v (log p_v + H)/T   (v ∈ S; 0 elsewhere).

The variants differ in two choices only:

* the subset S (``threshold`` and ``kept_ids``, at most one given): every entry; the entries
  z ≥ θ of a per-row threshold (top-k/top-p, ``hapo_ops.vocab.truncation``); or a kept-id
  set per row (the replay of a rollout engine's truncation). Each part of the vocabulary
  reduces the entries of S it holds to ``RowStatistics`` (``partial_statistics``): blocks
  of rows in PyTorch or the Triton kernel for the first two, an O(N·K) gather for kept ids;
* how the parts combine (``group``): None, the logits are the whole vocabulary and the
  statistics are already whole; a ``torch.distributed`` group, the logits are this rank's
  slice and ``row_statistics.combine_vocab_shards`` all-reduces the statistics (one MAX of
  N and one SUM of 5·N float32 values, independent of V).

Then the same ``finish`` (fused into the Triton kernel for whole rows of the first two
subsets, the same formulas) and one label rule (``row_statistics.shard_labels`` decides where a
label is found, ``mask_logprobs`` what follows), and the same backward (``subset_gradient``):
each part's gradient is the unsharded formula with the whole row's state (M, log1p(rest)),
-g_lp·p_v on every row whose logp has a gradient and +g_lp at the label where this part
holds it. No communication in the backward.

Labels and kept ids enter in the coordinates of this part of the vocabulary (``local_labels``
-1 where the part does not hold the label, ``shard_kept_ids``); ``labels`` stay global for
the label rule. Unsharded, the forward and its backward run as the custom ops
``hapo_ops::logprobs_entropy`` and ``hapo_ops::logprobs_entropy_backward(_)`` (fake kernels,
registered autograd), so ``torch.compile(fullgraph=True)`` traces through them; over a group
the same forward, setup and backward run in a ``torch.autograd.Function`` (a process group
cannot enter a custom op).
"""

from __future__ import annotations

import torch

from hapo_ops._utils.blocks import block_rows, block_threads, for_each_block
from hapo_ops._utils.collectives import ProcessGroup
from hapo_ops.vocab.row_statistics import (RowStatistics, block_statistics, combine_vocab_shards,
                                           label_logits, log_probabilities, mask_below,
                                           row_blocks, softmax_gradient)
from hapo_ops.vocab.token_inputs import flat_float32, inverse_temperature
from hapo_ops.vocab.truncation import (gather_kept, kept_entries, kept_gradient,
                                       kept_row_statistics, label_position, scatter_kept)

# Logits per block of the torch path: about 1M on CPU (three fp32 temporaries of 4 MiB,
# well under a quarter of any realistic logits tensor), 16M on accelerators (fewer launches).
CPU_BLOCK_ELEMENTS = 1 << 20
DEVICE_BLOCK_ELEMENTS = 1 << 24


def default_chunk_tokens(vocab: int, device: torch.device) -> int:
    """Rows per block of the torch path when ``chunk_tokens`` is not given."""
    elements = CPU_BLOCK_ELEMENTS if device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
    return max(1, elements // max(vocab, 1))


# ---------------------------------------------------------------------------------------
# Every entry, or the entries z ≥ θ: the torch path in blocks of rows
# ---------------------------------------------------------------------------------------

def torch_row_statistics(logits: torch.Tensor, local_labels: torch.Tensor,
                         inv_temperature: torch.Tensor, chunk_tokens: int,
                         threshold: torch.Tensor | None = None) -> RowStatistics:
    """Raw float32 statistics of every row of ``logits`` (..., V), over the entries
    z ≥ ``threshold`` (N,) when given; the label logit is NEG_LARGE for a label below θ.
    Blocks of at most ``chunk_tokens`` rows, spread over the CPU threads by
    ``for_each_block``."""
    n_rows = local_labels.numel()
    columns = torch.empty((n_rows, 4), dtype=torch.float32, device=logits.device)

    def block_columns(item: tuple[int, torch.Tensor]) -> None:
        start, block = item
        rows = slice(start, start + block.shape[0])
        z = mask_below(block, None if threshold is None else threshold[rows])
        columns[rows] = RowStatistics(*block_statistics(z, inv_temperature[rows]),
                                      label_logits(z, local_labels[rows])).stacked()

    threads = block_threads(logits.numel(), logits.device)
    for_each_block(block_columns, row_blocks(logits, block_rows(n_rows, chunk_tokens, threads)),
                   logits.device, threads)
    return RowStatistics.from_columns(columns)


def torch_backward(logits: torch.Tensor, local_labels: torch.Tensor,
                   inv_temperature: torch.Tensor, state: torch.Tensor, entropy: torch.Tensor,
                   grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                   chunk_tokens: int, *, inplace: bool,
                   threshold: torch.Tensor | None = None) -> torch.Tensor:
    """∂L/∂z, block by block (``for_each_block``), into a new tensor or (``inplace``) over
    ``logits`` itself, of the distribution over z ≥ ``threshold`` when given. ``grad_logp``
    is zero where logp has no gradient; its +g_lp term lands at the local label where it
    lies in [0, V)."""
    vocab = logits.shape[-1]
    out = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype,
                                             device=logits.device)
    holds_label = (local_labels >= 0) & (local_labels < vocab)
    label_weight = None if grad_logp is None else torch.where(holds_label, grad_logp, 0.0)
    label_index = local_labels.clamp(0, max(vocab - 1, 0))

    def block_gradient(item: tuple[int, torch.Tensor, torch.Tensor]) -> None:
        start, block, out_block = item
        rows = slice(start, start + block.shape[0])
        log_p = log_probabilities(mask_below(block, None if threshold is None
                                             else threshold[rows]),
                                  state[rows], inv_temperature[rows])
        grad = softmax_gradient(
            log_p, entropy[rows], None if grad_logp is None else grad_logp[rows],
            None if grad_entropy is None else grad_entropy[rows], label_index[rows],
            None if label_weight is None else label_weight[rows], inv_temperature[rows])
        out_block.copy_(grad.view(out_block.shape))

    threads = block_threads(logits.numel(), logits.device)
    per_block = block_rows(local_labels.numel(), chunk_tokens, threads)
    for_each_block(block_gradient, row_blocks(logits, per_block, out), logits.device, threads)
    return out


# ---------------------------------------------------------------------------------------
# The two choices: the subset's partial statistics and gradient; the combination
# ---------------------------------------------------------------------------------------

def partial_statistics(logits: torch.Tensor, local_labels: torch.Tensor,
                       temperature: torch.Tensor | None, scalar_temperature: float, impl: str,
                       chunk_tokens: int, threshold: torch.Tensor | None,
                       kept_ids: torch.Tensor | None) -> RowStatistics:
    """``RowStatistics`` (N,) of the entries of S that ``logits`` (..., V) holds; the label
    logit is NEG_LARGE where the held label is not in S."""
    inv_t = inverse_temperature(temperature, scalar_temperature, local_labels.numel(),
                                logits.device)
    if kept_ids is not None:  # both impls: the N·K gather
        ids, index, use = kept_entries(kept_ids, logits.shape[-1])
        return kept_row_statistics(gather_kept(logits, index, use), ids, use, local_labels,
                                   inv_t)[0]
    if impl == "triton":
        from hapo_ops.kernels.logprob_entropy import logprob_entropy_row_statistics
        return RowStatistics.from_columns(logprob_entropy_row_statistics(
            logits, local_labels, temperature, scalar_temperature, threshold=threshold))
    return torch_row_statistics(logits, local_labels, inv_t, chunk_tokens, threshold)


def subset_gradient(logits: torch.Tensor, local_labels: torch.Tensor,
                    temperature: torch.Tensor | None, scalar_temperature: float,
                    state: torch.Tensor, entropy: torch.Tensor, grad_logp: torch.Tensor | None,
                    grad_entropy: torch.Tensor | None, impl: str, chunk_tokens: int,
                    threshold: torch.Tensor | None, kept_ids: torch.Tensor | None, *,
                    inplace: bool) -> torch.Tensor:
    """∂L/∂logits (0 outside S) into a new tensor or (``inplace``) over ``logits``, from the
    whole rows' ``state`` and ``entropy``; ``grad_logp`` is zero where logp has no gradient."""
    inv_t = inverse_temperature(temperature, scalar_temperature, local_labels.numel(),
                                logits.device)
    if kept_ids is not None:
        ids, index, use = kept_entries(kept_ids, logits.shape[-1])
        position, found = label_position(ids, use, local_labels)
        label_weight = None if grad_logp is None else torch.where(found, grad_logp, 0.0)
        grad = kept_gradient(gather_kept(logits, index, use), state, entropy, grad_logp,
                             grad_entropy, position, label_weight, inv_t)
        return scatter_kept(grad, index, use, logits, logits if inplace else None)
    if impl == "triton":
        from hapo_ops.kernels.logprob_entropy import logprob_entropy_backward
        return logprob_entropy_backward(logits, local_labels, temperature, scalar_temperature,
                                        state, entropy, grad_logp, grad_entropy, -1,
                                        inplace=inplace, sharded=True, threshold=threshold)
    return torch_backward(logits, local_labels, inv_t, state, entropy, grad_logp, grad_entropy,
                          chunk_tokens, inplace=inplace, threshold=threshold)


def subset_forward(logits: torch.Tensor, labels: torch.Tensor, local_labels: torch.Tensor,
                   temperature: torch.Tensor | None, scalar_temperature: float,
                   ignore_index: int, impl: str, chunk_tokens: int,
                   threshold: torch.Tensor | None, kept_ids: torch.Tensor | None,
                   group: ProcessGroup | None = None, check_found: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, H) of the token shape, state (N, 2) and the rows whose logp has a gradient
    (N,): this part's statistics, combined over ``group`` (None: they are whole), finished,
    and the label rule applied (``check_found``: a label held by no part raises)."""
    token_shape = logits.shape[:-1]
    if group is None and kept_ids is None and impl == "triton":
        # Whole rows: the kernel finishes them itself (the formulas of ``finish`` and the
        # label rule, bit for bit those of the sampler's kernel).
        from hapo_ops.kernels.logprob_entropy import logprob_entropy_forward
        logp, entropy, state = logprob_entropy_forward(logits, labels, temperature,
                                                       scalar_temperature, ignore_index,
                                                       threshold=threshold)
        has_gradient = local_labels >= 0            # the rule of ``mask_logprobs``
        if threshold is not None:
            has_gradient = has_gradient & (logp != float("-inf"))
        return logp.view(token_shape), entropy.view(token_shape), state, has_gradient
    stats = partial_statistics(logits, local_labels, temperature, scalar_temperature, impl,
                               chunk_tokens, threshold, kept_ids)
    inv_t = inverse_temperature(temperature, scalar_temperature, labels.numel(), logits.device)
    logp, entropy, state, has_gradient = combine_vocab_shards(
        stats, labels, local_labels >= 0, inv_t, ignore_index, group, check_found=check_found,
        truncated=threshold is not None or kept_ids is not None)
    return logp.view(token_shape), entropy.view(token_shape), state, has_gradient


# ---------------------------------------------------------------------------------------
# Autograd: one forward, one setup, one backward, for the custom op and for shards
# ---------------------------------------------------------------------------------------

@torch.library.custom_op("hapo_ops::logprobs_entropy", mutates_args=())
def _subset_op(logits: torch.Tensor, labels: torch.Tensor, local_labels: torch.Tensor,
               temperature: torch.Tensor | None, scalar_temperature: float, ignore_index: int,
               impl: str, inplace_backward: bool, chunk_tokens: int,
               threshold: torch.Tensor | None = None, kept_ids: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return subset_forward(logits, labels, local_labels, temperature, scalar_temperature,
                          ignore_index, impl, chunk_tokens, threshold, kept_ids)


@_subset_op.register_fake
def _(logits, labels, local_labels, temperature, scalar_temperature, ignore_index, impl,
      inplace_backward, chunk_tokens, threshold=None, kept_ids=None):
    token_shape, n_rows = logits.shape[:-1], labels.numel()
    new = logits.new_empty
    return (new(token_shape, dtype=torch.float32), new(token_shape, dtype=torch.float32),
            new((n_rows, 2), dtype=torch.float32), new((n_rows,), dtype=torch.bool))


@torch.library.custom_op("hapo_ops::logprobs_entropy_backward", mutates_args=())
def _backward_op(logits: torch.Tensor, local_labels: torch.Tensor,
                 temperature: torch.Tensor | None, scalar_temperature: float,
                 state: torch.Tensor, entropy: torch.Tensor, grad_logp: torch.Tensor | None,
                 grad_entropy: torch.Tensor | None, impl: str, chunk_tokens: int,
                 threshold: torch.Tensor | None = None, kept_ids: torch.Tensor | None = None
                 ) -> torch.Tensor:
    return subset_gradient(logits, local_labels, temperature, scalar_temperature, state,
                           entropy, grad_logp, grad_entropy, impl, chunk_tokens, threshold,
                           kept_ids, inplace=False)


@_backward_op.register_fake
def _(logits, local_labels, temperature, scalar_temperature, state, entropy, grad_logp,
      grad_entropy, impl, chunk_tokens, threshold=None, kept_ids=None):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("hapo_ops::logprobs_entropy_backward_", mutates_args=("logits",))
def _backward_inplace_op(logits: torch.Tensor, local_labels: torch.Tensor,
                         temperature: torch.Tensor | None, scalar_temperature: float,
                         state: torch.Tensor, entropy: torch.Tensor,
                         grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                         impl: str, chunk_tokens: int, threshold: torch.Tensor | None = None,
                         kept_ids: torch.Tensor | None = None) -> None:
    subset_gradient(logits, local_labels, temperature, scalar_temperature, state, entropy,
                    grad_logp, grad_entropy, impl, chunk_tokens, threshold, kept_ids,
                    inplace=True)


def _setup_context(ctx, inputs, output) -> None:
    (logits, _, local_labels, temperature, scalar_temperature, _, impl, inplace, chunk_tokens,
     threshold, kept_ids) = inputs[:11]
    _, entropy, state, has_gradient = output
    ctx.save_for_backward(logits, local_labels, temperature, state, entropy, has_gradient,
                          threshold, kept_ids)
    ctx.scalar_temperature, ctx.impl, ctx.inplace = scalar_temperature, impl, inplace
    ctx.chunk_tokens, ctx.n_inputs = chunk_tokens, len(inputs)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(state, has_gradient)


def _backward(ctx, grad_logp, grad_entropy, grad_state=None, grad_has_gradient=None):
    (logits, local_labels, temperature, state, entropy, has_gradient, threshold,
     kept_ids) = ctx.saved_tensors
    grad_logp, grad_entropy = flat_float32(grad_logp), flat_float32(grad_entropy)
    if grad_logp is None and grad_entropy is None:
        return (None,) * ctx.n_inputs
    if grad_logp is not None:
        grad_logp = torch.where(has_gradient, grad_logp, 0.0)
    args = (logits, local_labels, temperature, ctx.scalar_temperature, state,
            entropy.reshape(-1), grad_logp, grad_entropy, ctx.impl, ctx.chunk_tokens,
            threshold, kept_ids)
    if ctx.inplace:
        _backward_inplace_op(*args)
        grad = logits
    else:
        grad = _backward_op(*args)
    return (grad,) + (None,) * (ctx.n_inputs - 1)


_subset_op.register_autograd(_backward, setup_context=_setup_context)


class _ShardedSubset(torch.autograd.Function):
    """The custom op's forward, setup and backward, combined over a process group."""

    @staticmethod
    def forward(ctx, *inputs):
        (logits, labels, local_labels, temperature, scalar_temperature, ignore_index, impl, _,
         chunk_tokens, threshold, kept_ids, group, check_found) = inputs
        output = subset_forward(logits, labels, local_labels, temperature, scalar_temperature,
                                ignore_index, impl, chunk_tokens, threshold, kept_ids, group,
                                check_found)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def subset_logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                local_labels: torch.Tensor, temperature: torch.Tensor | None,
                                scalar_temperature: float, ignore_index: int, impl: str,
                                inplace_backward: bool, chunk_tokens: int, *,
                                threshold: torch.Tensor | None = None,
                                kept_ids: torch.Tensor | None = None,
                                group: ProcessGroup | None = None, check_found: bool = False
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, H), float32 of the token shape, differentiable in ``logits``, of the
    distribution over S (``threshold`` (N,) float32, ``kept_ids`` (N, K) local int64, or
    neither: every entry), ``logits`` being the whole vocabulary (``group`` None) or this
    rank's slice of it. ``labels`` (N,) int64 global ids, ``local_labels`` (N,) their
    position in this part (-1 where it does not hold them; ``shard_labels``)."""
    args = (logits, labels, local_labels, temperature, scalar_temperature, ignore_index, impl,
            bool(inplace_backward), chunk_tokens, threshold, kept_ids)
    if group is None:
        logp, entropy, _, _ = _subset_op(*args)
    else:
        logp, entropy, _, _ = _ShardedSubset.apply(*args, group, check_found)
    return logp, entropy


__all__ = ["default_chunk_tokens", "partial_statistics", "subset_forward", "subset_gradient",
           "subset_logprobs_and_entropy", "torch_backward", "torch_row_statistics"]
