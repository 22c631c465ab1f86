"""Per-token log-probability and entropy straight from logits, whole or one vocabulary shard.

    logp = z_y/T - logsumexp(z/T),   H = logsumexp(z/T) - Σ_v softmax(z/T)_v · z_v/T,
    ∂logp/∂z_v = (1[v=y] - p_v)/T,   ∂H/∂z_v = -p_v (log p_v + H)/T.

Both come from the per-row statistics of ``hapo_ops.vocab.row_statistics`` (exact for
near-deterministic rows, where ``logsumexp - E[z/T]`` cancels in fp32). Two paths share this
contract: ``impl="torch"`` (blocks of rows in PyTorch, bounded memory, any device) and
``impl="triton"`` (``hapo_ops.kernels.logprob_entropy``: one read of the logits forward, one
read and one write backward); ``impl="auto"`` takes Triton on CUDA.

Unsharded, both run inside the ``hapo_ops::logprobs_entropy`` custom op (with fake kernels
and registered autograd), so ``torch.compile(fullgraph=True)`` traces through them.

Vocabulary (tensor) parallel (``tp_group``): the logits are this rank's contiguous slice of
the vocabulary. Each rank reduces its slice to raw per-row statistics, which
``row_statistics.combine_vocab_shards`` combines exactly with one all-reduce MAX of N and one
all-reduce SUM of 5·N float32 values (24 bytes per token, independent of V); the backward
needs no communication: each shard's gradient is the unsharded formula with the global
state, and the +g_lp term only on the shard that holds the label.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from hapo_ops._utils.validation import check_tensor
from hapo_ops._utils.collectives import (ProcessGroup, check_process_group, all_reduce_max, all_reduce_sum,
                                  exclusive_prefix_sum)
from hapo_ops.vocab.row_statistics import (NEG_LARGE, RowStatistics, block_statistics,
                                     combine_parts, combine_vocab_shards, finish, label_logits,
                                     log_probabilities, mask_logprobs, saturate, shard_labels,
                                     softmax_gradient)
from hapo_ops.vocab.truncation import (TORCH_DIGIT_BITS, TRITON_DIGIT_BITS, candidate_keys,
                                 check_kept_ids, check_top_k, check_top_p, gather_kept,
                                 kept_entries, kept_gradient, kept_row_statistics, key_logits,
                                 label_position, saturated_row_max, scatter_kept, thresholds,
                                 torch_candidate_sums, truncates)
from hapo_ops.vocab.token_inputs import (check_chunk, check_ignore_index, check_token_labels,
                                   checks_values, flat_float32, inverse_temperature,
                                   prepare_temperature, resolve_impl)

# Logits per block of the torch path: about 1M on CPU (three fp32 temporaries of 4 MiB,
# well under a quarter of any realistic logits tensor), 16M on accelerators (fewer launches).
CPU_BLOCK_ELEMENTS = 1 << 20
DEVICE_BLOCK_ELEMENTS = 1 << 24


def default_chunk_tokens(vocab: int, device: torch.device) -> int:
    """Rows per block of the torch path when ``chunk_tokens`` is not given."""
    elements = CPU_BLOCK_ELEMENTS if device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
    return max(1, elements // max(vocab, 1))


# ---------------------------------------------------------------------------------------
# Torch path: blocks of rows, each reduced with the algebra of hapo_ops.vocab.row_statistics.
# ---------------------------------------------------------------------------------------

def row_blocks(logits: torch.Tensor, chunk_tokens: int, *alike: torch.Tensor
               ) -> Iterator[tuple]:
    """(first row, (n, V) rows of ``logits``, the same rows of each of ``alike``) blocks
    covering the rows of ``logits`` (..., V) in order; ``alike`` tensors have its shape.

    Where the leading dims flatten (in every tensor), each block is a view. Otherwise (a
    slice such as ``logits[:, :-1]``) blocks are slabs of whole indices of the first dim:
    the ``logits`` rows are read through a block-sized copy, and the ``alike`` blocks stay
    views of shape (k, ..., V), so that an in-place backward writes into the caller's
    buffer (``block.copy_(rows.view(block.shape))``).
    """
    vocab = logits.shape[-1]
    tensors = (logits,) + alike
    try:
        flat = [t.view(-1, vocab) for t in tensors]
    except RuntimeError:
        yield from _slab_blocks(logits, chunk_tokens, alike)
        return
    for start in range(0, flat[0].shape[0], chunk_tokens):
        yield (start, *(rows[start:start + chunk_tokens] for rows in flat))


def _slab_blocks(logits: torch.Tensor, chunk_tokens: int, alike: tuple[torch.Tensor, ...]
                 ) -> Iterator[tuple]:
    vocab = logits.shape[-1]
    per_index = logits[0].numel() // max(vocab, 1) if logits.shape[0] else 0
    if per_index > chunk_tokens:  # one index of the first dim holds more than a block
        for index in range(logits.shape[0]):
            for start, *blocks in row_blocks(logits[index], chunk_tokens,
                                             *(t[index] for t in alike)):
                yield (index * per_index + start, *blocks)
        return
    step = max(1, chunk_tokens // max(per_index, 1))
    for first in range(0, logits.shape[0], step):
        last = min(first + step, logits.shape[0])
        yield (first * per_index, logits[first:last].reshape(-1, vocab),
               *(t[first:last] for t in alike))


def torch_forward(logits: torch.Tensor, labels: torch.Tensor, inv_temperature: torch.Tensor,
                  ignore_index: int, chunk_tokens: int, threshold: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, H, state) flat float32, state (N, 2) = (M, log1p(rest)), block by block;
    with ``threshold`` (N,), of the truncated distribution over the entries z ≥ θ."""
    n_rows, vocab = labels.numel(), logits.shape[-1]
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logp)
    state = torch.empty((n_rows, 2), dtype=torch.float32, device=logits.device)
    for start, block in row_blocks(logits, chunk_tokens):
        rows = slice(start, start + block.shape[0])
        stats = _block_row_statistics(block, labels[rows], inv_temperature[rows],
                                      _rows(threshold, rows))
        logp[rows], entropy[rows], state[rows] = finish(stats, inv_temperature[rows])
    logp, _ = mask_logprobs(logp, labels, (labels >= 0) & (labels < vocab), ignore_index)
    return logp, entropy, state


def _rows(values: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if values is None else values[rows]


def saturate_above(block: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """Saturated fp32 logits of a row block, the entries below the rows' ``threshold``
    (the tokens a truncation drops) at NEG_LARGE, i.e. probability 0."""
    z = saturate(block)
    if threshold is not None:
        z = z.masked_fill_(z < threshold[:, None], NEG_LARGE)
    return z


def _block_row_statistics(block: torch.Tensor, labels: torch.Tensor,
                          inv_temperature: torch.Tensor,
                          threshold: torch.Tensor | None = None) -> RowStatistics:
    z = saturate_above(block, threshold)
    row_max, rest, spread = block_statistics(z, inv_temperature)
    return RowStatistics(row_max, rest, spread, label_logits(z, labels))


def torch_row_statistics(logits: torch.Tensor, labels: torch.Tensor,
                         inv_temperature: torch.Tensor, chunk_tokens: int,
                         threshold: torch.Tensor | None = None) -> RowStatistics:
    """Raw float32 statistics of every row (a vocabulary shard's contribution), over the
    entries z ≥ ``threshold`` when given."""
    n_rows = labels.numel()
    columns = torch.empty((n_rows, 4), dtype=torch.float32, device=logits.device)
    for start, block in row_blocks(logits, chunk_tokens):
        rows = slice(start, start + block.shape[0])
        columns[rows] = _block_row_statistics(block, labels[rows], inv_temperature[rows],
                                              _rows(threshold, rows)).stacked()
    return RowStatistics.from_columns(columns)


def torch_backward(logits: torch.Tensor, labels: torch.Tensor, inv_temperature: torch.Tensor,
                   state: torch.Tensor, entropy: torch.Tensor, grad_logp: torch.Tensor | None,
                   grad_entropy: torch.Tensor | None, ignore_index: int, chunk_tokens: int, *,
                   inplace: bool, sharded: bool = False,
                   threshold: torch.Tensor | None = None) -> torch.Tensor:
    """∂L/∂z, block by block, into a new tensor or (``inplace``) over ``logits`` itself;
    with ``threshold``, of the truncated distribution over z ≥ θ (the caller zeroes
    ``grad_logp`` where the label lies below θ).

    ``sharded``: the rows are one vocabulary shard, ``labels`` shard-local and ``grad_logp``
    already zero where logp has no gradient: -g_lp·p_v applies to every row, +g_lp at the
    label only where it lies in this shard.
    """
    vocab = logits.shape[-1]
    out = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype,
                                             device=logits.device)
    in_shard = (labels >= 0) & (labels < vocab)
    if grad_logp is not None and not sharded:
        grad_logp = torch.where(in_shard & (labels != ignore_index), grad_logp, 0.0)
    label_weight = None if grad_logp is None else torch.where(in_shard, grad_logp, 0.0)
    label_index = labels.clamp(0, max(vocab - 1, 0))
    for start, block, out_block in row_blocks(logits, chunk_tokens, out):
        rows = slice(start, start + block.shape[0])
        log_p = log_probabilities(saturate_above(block, _rows(threshold, rows)), state[rows],
                                  inv_temperature[rows])
        grad = softmax_gradient(
            log_p, entropy[rows], None if grad_logp is None else grad_logp[rows],
            None if grad_entropy is None else grad_entropy[rows], label_index[rows],
            None if label_weight is None else label_weight[rows], inv_temperature[rows])
        out_block.copy_(grad.view(out_block.shape))
    return out


# ---------------------------------------------------------------------------------------
# Dispatch to the two paths
# ---------------------------------------------------------------------------------------

def _forward(logits, labels, temperature, scalar_temperature, ignore_index, impl, chunk_tokens,
             threshold=None):
    if impl == "triton":
        from hapo_ops.kernels.logprob_entropy import logprob_entropy_forward
        return logprob_entropy_forward(logits, labels, temperature, scalar_temperature,
                                       ignore_index, threshold=threshold)
    inv_t = inverse_temperature(temperature, scalar_temperature, labels.numel(), logits.device)
    return torch_forward(logits, labels, inv_t, ignore_index, chunk_tokens, threshold)


def _row_statistics(logits, labels, temperature, scalar_temperature, impl, chunk_tokens,
                    threshold=None) -> RowStatistics:
    if impl == "triton":
        from hapo_ops.kernels.logprob_entropy import logprob_entropy_row_statistics
        return RowStatistics.from_columns(logprob_entropy_row_statistics(
            logits, labels, temperature, scalar_temperature, threshold=threshold))
    inv_t = inverse_temperature(temperature, scalar_temperature, labels.numel(), logits.device)
    return torch_row_statistics(logits, labels, inv_t, chunk_tokens, threshold)


def _backward(logits, labels, temperature, scalar_temperature, state, entropy, grad_logp,
              grad_entropy, ignore_index, impl, chunk_tokens, *, inplace, sharded=False,
              threshold=None):
    if impl == "triton":
        from hapo_ops.kernels.logprob_entropy import logprob_entropy_backward
        return logprob_entropy_backward(logits, labels, temperature, scalar_temperature, state,
                                        entropy, grad_logp, grad_entropy, ignore_index,
                                        inplace=inplace, sharded=sharded, threshold=threshold)
    inv_t = inverse_temperature(temperature, scalar_temperature, labels.numel(), logits.device)
    return torch_backward(logits, labels, inv_t, state, entropy, grad_logp, grad_entropy,
                          ignore_index, chunk_tokens, inplace=inplace, sharded=sharded,
                          threshold=threshold)


def truncation_threshold(logits: torch.Tensor, temperature: torch.Tensor | None,
                         scalar_temperature: float, top_k: int | torch.Tensor | None,
                         top_p: float | torch.Tensor | None, impl: str, chunk_tokens: int,
                         group: ProcessGroup | None = None) -> torch.Tensor:
    """θ (N,) float32 of ``truncation.thresholds`` for ``logits`` (..., V) (one vocabulary
    shard under ``group``: the row max and every pass's sums are all-reduced): the torch
    path's 256-bin histograms in row blocks, or the Triton kernel's 16-way passes."""
    logits = logits.detach()
    vocab = logits.shape[-1]
    n_rows = logits.numel() // max(vocab, 1)
    row_max = all_reduce_max(saturated_row_max(logits), group)
    if impl == "triton":
        from hapo_ops.kernels.truncation import candidate_sums

        def sums(prefix, shift, digit_bits, lower, rmax):
            candidates = key_logits(candidate_keys(prefix, shift, digit_bits))
            return candidate_sums(logits, candidates, lower, rmax, temperature,
                                  scalar_temperature)
        digit_bits = TRITON_DIGIT_BITS
    else:
        inv_t = inverse_temperature(temperature, scalar_temperature, n_rows, logits.device)
        # The histogram pass holds a few int64 temporaries per logit: smaller blocks.
        step = max(1, chunk_tokens // 8)
        sums = torch_candidate_sums(lambda: row_blocks(logits, step), n_rows, inv_t)
        digit_bits = TORCH_DIGIT_BITS
    return thresholds(sums, row_max, top_k, top_p, n_rows, logits.dtype, digit_bits,
                      logits.device, lambda x: all_reduce_sum(x, group))


# ---------------------------------------------------------------------------------------
# Unsharded: custom ops, one autograd home for both paths, visible to torch.compile.
# ``threshold`` (N,) or None: the truncated distribution over the entries z ≥ θ.
# ---------------------------------------------------------------------------------------

@torch.library.custom_op("hapo_ops::logprobs_entropy", mutates_args=())
def _logprobs_entropy_op(logits: torch.Tensor, labels: torch.Tensor,
                         temperature: torch.Tensor | None, scalar_temperature: float,
                         ignore_index: int, impl: str, inplace_backward: bool,
                         chunk_tokens: int, threshold: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logp, entropy, state = _forward(logits, labels, temperature, scalar_temperature,
                                    ignore_index, impl, chunk_tokens, threshold)
    token_shape = logits.shape[:-1]
    return logp.view(token_shape), entropy.view(token_shape), state


@_logprobs_entropy_op.register_fake
def _(logits, labels, temperature, scalar_temperature, ignore_index, impl, inplace_backward,
      chunk_tokens, threshold=None):
    token_shape = logits.shape[:-1]
    new = logits.new_empty
    return (new(token_shape, dtype=torch.float32), new(token_shape, dtype=torch.float32),
            new((labels.numel(), 2), dtype=torch.float32))


@torch.library.custom_op("hapo_ops::logprobs_entropy_backward", mutates_args=())
def _logprobs_entropy_backward_op(logits: torch.Tensor, labels: torch.Tensor,
                                  temperature: torch.Tensor | None, scalar_temperature: float,
                                  state: torch.Tensor, entropy: torch.Tensor,
                                  grad_logp: torch.Tensor | None,
                                  grad_entropy: torch.Tensor | None, ignore_index: int,
                                  impl: str, chunk_tokens: int,
                                  threshold: torch.Tensor | None = None) -> torch.Tensor:
    return _backward(logits, labels, temperature, scalar_temperature, state, entropy,
                     grad_logp, grad_entropy, ignore_index, impl, chunk_tokens, inplace=False,
                     threshold=threshold)


@_logprobs_entropy_backward_op.register_fake
def _(logits, labels, temperature, scalar_temperature, state, entropy, grad_logp, grad_entropy,
      ignore_index, impl, chunk_tokens, threshold=None):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("hapo_ops::logprobs_entropy_backward_", mutates_args=("logits",))
def _logprobs_entropy_backward_inplace_op(logits: torch.Tensor, labels: torch.Tensor,
                                          temperature: torch.Tensor | None,
                                          scalar_temperature: float, state: torch.Tensor,
                                          entropy: torch.Tensor, grad_logp: torch.Tensor | None,
                                          grad_entropy: torch.Tensor | None, ignore_index: int,
                                          impl: str, chunk_tokens: int,
                                          threshold: torch.Tensor | None = None) -> None:
    _backward(logits, labels, temperature, scalar_temperature, state, entropy, grad_logp,
              grad_entropy, ignore_index, impl, chunk_tokens, inplace=True, threshold=threshold)


def _setup_context(ctx, inputs, output):
    (logits, labels, temperature, scalar_temperature, ignore_index, impl, inplace, chunk,
     *rest) = inputs
    threshold = rest[0] if rest else None
    logp, entropy, state = output
    # Truncated: a label below θ has logp = -inf and no gradient (it is not a kept entry).
    dropped = None if threshold is None else logp == float("-inf")
    ctx.save_for_backward(logits, labels, temperature, state, entropy, threshold, dropped)
    ctx.scalar_temperature, ctx.ignore_index = scalar_temperature, ignore_index
    ctx.impl, ctx.inplace, ctx.chunk_tokens = impl, inplace, chunk
    ctx.n_inputs = len(inputs)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(state)


def _op_backward(ctx, grad_logp, grad_entropy, grad_state):
    logits, labels, temperature, state, entropy, threshold, dropped = ctx.saved_tensors
    grad_logp, grad_entropy = flat_float32(grad_logp), flat_float32(grad_entropy)
    if grad_logp is None and grad_entropy is None:
        return (None,) * ctx.n_inputs
    if grad_logp is not None and dropped is not None:
        grad_logp = torch.where(dropped.reshape(-1), 0.0, grad_logp)
    args = (logits, labels, temperature, ctx.scalar_temperature, state, entropy.reshape(-1),
            grad_logp, grad_entropy, ctx.ignore_index, ctx.impl, ctx.chunk_tokens)
    extra = () if threshold is None else (threshold,)
    if ctx.inplace:
        _logprobs_entropy_backward_inplace_op(*args, *extra)
        grad = logits
    else:
        grad = _logprobs_entropy_backward_op(*args, *extra)
    return (grad,) + (None,) * (ctx.n_inputs - 1)


_logprobs_entropy_op.register_autograd(_op_backward, setup_context=_setup_context)


@torch.library.custom_op("hapo_ops::truncation_threshold", mutates_args=())
def _truncation_threshold_op(logits: torch.Tensor, temperature: torch.Tensor | None,
                             scalar_temperature: float, top_k: torch.Tensor | None,
                             scalar_top_k: int, top_p: torch.Tensor | None,
                             scalar_top_p: float, impl: str, chunk_tokens: int
                             ) -> torch.Tensor:
    """θ (N,) of ``truncation_threshold``; ``scalar_top_k`` 0 and ``scalar_top_p`` 1 stand
    for None when the tensors are None."""
    k = top_k if top_k is not None else (scalar_top_k or None)
    p = top_p if top_p is not None else (scalar_top_p if scalar_top_p < 1.0 else None)
    return truncation_threshold(logits, temperature, scalar_temperature, k, p, impl,
                                chunk_tokens)


@_truncation_threshold_op.register_fake
def _(logits, temperature, scalar_temperature, top_k, scalar_top_k, top_p, scalar_top_p, impl,
      chunk_tokens):
    n_rows = logits.numel() // max(logits.shape[-1], 1)
    return logits.new_empty((n_rows,), dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# Kept sets (replay of the engine's truncation): O(N·K) gather, both impls share it.
# ---------------------------------------------------------------------------------------

def _kept_inputs(logits, kept_ids, labels, temperature, scalar_temperature, vocab_start=0):
    ids, index, use = kept_entries(kept_ids, logits.shape[-1], vocab_start)
    inv_t = inverse_temperature(temperature, scalar_temperature, labels.numel(), logits.device)
    return ids, index, use, inv_t, gather_kept(logits, index, use)


@torch.library.custom_op("hapo_ops::kept_logprobs_entropy", mutates_args=())
def _kept_op(logits: torch.Tensor, kept_ids: torch.Tensor, labels: torch.Tensor,
             temperature: torch.Tensor | None, scalar_temperature: float, ignore_index: int,
             inplace_backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vocab, token_shape = logits.shape[-1], logits.shape[:-1]
    ids, _, use, inv_t, z = _kept_inputs(logits, kept_ids, labels, temperature,
                                         scalar_temperature)
    stats, _, _ = kept_row_statistics(z, ids, use, labels, inv_t)
    logp, entropy, state = finish(stats, inv_t)
    logp, _ = mask_logprobs(logp, labels, (labels >= 0) & (labels < vocab), ignore_index)
    return logp.view(token_shape), entropy.view(token_shape), state


@_kept_op.register_fake
def _(logits, kept_ids, labels, temperature, scalar_temperature, ignore_index,
      inplace_backward):
    token_shape = logits.shape[:-1]
    new = logits.new_empty
    return (new(token_shape, dtype=torch.float32), new(token_shape, dtype=torch.float32),
            new((labels.numel(), 2), dtype=torch.float32))


def _kept_backward(logits, kept_ids, labels, temperature, scalar_temperature, state, entropy,
                   grad_logp, grad_entropy, ignore_index, out=None):
    ids, index, use, inv_t, z = _kept_inputs(logits, kept_ids, labels, temperature,
                                             scalar_temperature)
    position, found = label_position(ids, use, labels)
    if grad_logp is not None:
        grad_logp = torch.where(found & (labels != ignore_index), grad_logp, 0.0)
    grad = kept_gradient(z, state, entropy, grad_logp, grad_entropy, position, grad_logp, inv_t)
    return scatter_kept(grad, index, use, logits, out)


@torch.library.custom_op("hapo_ops::kept_logprobs_entropy_backward", mutates_args=())
def _kept_backward_op(logits: torch.Tensor, kept_ids: torch.Tensor, labels: torch.Tensor,
                      temperature: torch.Tensor | None, scalar_temperature: float,
                      state: torch.Tensor, entropy: torch.Tensor,
                      grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                      ignore_index: int) -> torch.Tensor:
    return _kept_backward(logits, kept_ids, labels, temperature, scalar_temperature, state,
                          entropy, grad_logp, grad_entropy, ignore_index)


@_kept_backward_op.register_fake
def _(logits, kept_ids, labels, temperature, scalar_temperature, state, entropy, grad_logp,
      grad_entropy, ignore_index):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("hapo_ops::kept_logprobs_entropy_backward_", mutates_args=("logits",))
def _kept_backward_inplace_op(logits: torch.Tensor, kept_ids: torch.Tensor,
                              labels: torch.Tensor, temperature: torch.Tensor | None,
                              scalar_temperature: float, state: torch.Tensor,
                              entropy: torch.Tensor, grad_logp: torch.Tensor | None,
                              grad_entropy: torch.Tensor | None, ignore_index: int) -> None:
    _kept_backward(logits, kept_ids, labels, temperature, scalar_temperature, state, entropy,
                   grad_logp, grad_entropy, ignore_index, out=logits)


def _kept_setup_context(ctx, inputs, output):
    logits, kept_ids, labels, temperature, scalar_temperature, ignore_index, inplace = inputs
    _, entropy, state = output
    ctx.save_for_backward(logits, kept_ids, labels, temperature, state, entropy)
    ctx.scalar_temperature, ctx.ignore_index, ctx.inplace = (scalar_temperature, ignore_index,
                                                            inplace)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(state)


def _kept_op_backward(ctx, grad_logp, grad_entropy, grad_state):
    logits, kept_ids, labels, temperature, state, entropy = ctx.saved_tensors
    grad_logp, grad_entropy = flat_float32(grad_logp), flat_float32(grad_entropy)
    if grad_logp is None and grad_entropy is None:
        return (None,) * 7
    args = (logits, kept_ids, labels, temperature, ctx.scalar_temperature, state,
            entropy.reshape(-1), grad_logp, grad_entropy, ctx.ignore_index)
    if ctx.inplace:
        _kept_backward_inplace_op(*args)
        grad = logits
    else:
        grad = _kept_backward_op(*args)
    return (grad,) + (None,) * 6


_kept_op.register_autograd(_kept_op_backward, setup_context=_kept_setup_context)


# ---------------------------------------------------------------------------------------
# Vocabulary shards
# ---------------------------------------------------------------------------------------

class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    """Forward: shard statistics → all-reduces → (logp, H). Backward: local, no communication.
    With ``threshold`` (N,), the truncated distribution over the entries z ≥ θ."""

    @staticmethod
    def forward(ctx, logits, labels, local_labels, has_label, temperature, scalar_temperature,
                ignore_index, impl, inplace, chunk_tokens, group, check_found, threshold=None):
        stats = _row_statistics(logits, local_labels, temperature, scalar_temperature, impl,
                                chunk_tokens, threshold)
        inv_t = inverse_temperature(temperature, scalar_temperature, labels.numel(),
                                    logits.device)
        logp, entropy, state, logp_ok = combine_vocab_shards(
            stats, labels, has_label, inv_t, ignore_index, group, check_found=check_found)
        if threshold is not None:  # a label below θ: logp = -inf, no gradient
            logp_ok = logp_ok & (logp != float("-inf"))
        ctx.save_for_backward(logits, local_labels, logp_ok, temperature, state, entropy,
                              threshold)
        ctx.scalar_temperature, ctx.ignore_index = scalar_temperature, ignore_index
        ctx.impl, ctx.inplace, ctx.chunk_tokens = impl, inplace, chunk_tokens
        ctx.set_materialize_grads(False)
        token_shape = logits.shape[:-1]
        return logp.view(token_shape), entropy.view(token_shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, local_labels, logp_ok, temperature, state, entropy, threshold = ctx.saved_tensors
        none = (None,) * 12
        if grad_logp is None and grad_entropy is None:
            return (None,) + none
        grad_logp, grad_entropy = flat_float32(grad_logp), flat_float32(grad_entropy)
        if grad_logp is not None:
            grad_logp = torch.where(logp_ok, grad_logp, 0.0)
        grad = _backward(logits, local_labels, temperature, ctx.scalar_temperature, state,
                         entropy, grad_logp, grad_entropy, ctx.ignore_index, ctx.impl,
                         ctx.chunk_tokens, inplace=ctx.inplace, sharded=True,
                         threshold=threshold)
        return (grad,) + none


class _VocabParallelKept(torch.autograd.Function):
    """Kept-set replay on a vocabulary shard: each rank gathers the kept ids it holds, the
    shards' ``RowStatistics`` combine over the group (``combine_parts``: an all-reduce MAX of
    N and a SUM of 5·N values); the backward scatters locally, no communication."""

    @staticmethod
    def forward(ctx, logits, kept_ids, labels, temperature, scalar_temperature, ignore_index,
                inplace, group, vocab_start):
        ids, index, use, inv_t, z = _kept_inputs(logits, kept_ids, labels, temperature,
                                                 scalar_temperature, vocab_start)
        stats, position, found = kept_row_statistics(z, ids, use, labels, inv_t)
        combined, n_found = combine_parts(
            stats, found, inv_t, reduce_max=lambda x: all_reduce_max(x, group),
            reduce_sum=lambda x: all_reduce_sum(x, group))
        logp, entropy, state = finish(combined, inv_t)
        in_kept = n_found > 0
        logp = torch.where(in_kept | torch.isnan(logp), logp, float("-inf"))
        logp, logp_ok = mask_logprobs(logp, labels, labels >= 0, ignore_index)
        ctx.save_for_backward(logits, index, use, position, found, logp_ok & in_kept,
                              temperature, state, entropy)
        ctx.scalar_temperature, ctx.inplace = scalar_temperature, inplace
        ctx.set_materialize_grads(False)
        token_shape = logits.shape[:-1]
        return logp.to(torch.float32).view(token_shape), entropy.to(torch.float32).view(token_shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        (logits, index, use, position, found, logp_ok, temperature, state,
         entropy) = ctx.saved_tensors
        none = (None,) * 8
        if grad_logp is None and grad_entropy is None:
            return (None,) + none
        grad_logp, grad_entropy = flat_float32(grad_logp), flat_float32(grad_entropy)
        label_weight = None
        if grad_logp is not None:
            grad_logp = torch.where(logp_ok, grad_logp, 0.0)
            label_weight = torch.where(found, grad_logp, 0.0)
        inv_t = inverse_temperature(temperature, ctx.scalar_temperature, state.shape[0],
                                    logits.device)
        z = gather_kept(logits, index, use)
        grad = kept_gradient(z, state, entropy, grad_logp, grad_entropy, position, label_weight,
                             inv_t)
        return (scatter_kept(grad, index, use, logits, logits if ctx.inplace else None),) + none


def shard_vocab_start(vocab_start: object, shard_size: int, tp_group: ProcessGroup,
                      device: torch.device) -> int | torch.Tensor:
    """The global id of this shard's first entry: ``vocab_start`` checked (an int ≥ 0 or a
    0-d integer tensor), or, when None, the sum of the lower ranks' shard sizes (one
    all-gather of one int per rank, no host read)."""
    if vocab_start is None:
        return exclusive_prefix_sum(shard_size, tp_group, device)
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


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def _check_logits(logits: object) -> torch.Tensor:
    logits = check_tensor("logits", logits, floating=True)
    if logits.dim() < 1:
        raise ValueError("logits must have shape (..., V), got a 0-d tensor")
    return logits


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor | None, *,
                         temperature: float | torch.Tensor = 1.0, ignore_index: int = -100,
                         impl: str = "auto", inplace_backward: bool = False,
                         validate: bool = False, tp_group: ProcessGroup | None = None,
                         vocab_start: int | torch.Tensor | None = None,
                         chunk_tokens: int | None = None,
                         kept_ids: torch.Tensor | None = None,
                         top_k: int | torch.Tensor | None = None,
                         top_p: float | torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of ``labels`` and Shannon entropy (nats) of softmax(logits / T),
    or of its truncation to the tokens a rollout engine kept (``kept_ids``, ``top_k``,
    ``top_p``).

    logp = z_y/T - logsumexp(z/T);  H = logsumexp(z/T) - Σ_v softmax(z/T)_v · z_v/T.
    Truncated to a kept set S: p_v = softmax(z/T)_v / Σ_{u∈S} softmax(z/T)_u on S, 0 elsewhere;
    logp = log p_y (-inf for y ∉ S), H = -Σ_{v∈S} p_v log p_v, and gradients flow only into
    the entries of S (``hapo_ops.vocab.truncation``).

    Args:
      logits: (..., V), any float dtype, any leading shape; the last dim should be contiguous.
        Math in float32. -inf entries have probability 0; +inf entries share all the mass
        (the limit of those logits growing together: one +inf entry gives logp 0 there,
        -inf elsewhere, and H = 0); a NaN logit makes its row's results NaN; a row with no
        finite or +inf entry has no distribution and gives NaN.
      labels: (...) integer token ids, or None (entropy only). Positions equal to
        ``ignore_index`` give logp 0 and no logp gradient (their entropy is still computed).
        Labels outside [0, V) raise on CPU and with ``validate=True``; otherwise their logp
        is NaN (never an out-of-bounds read).
      temperature: a float, or a tensor broadcastable to the token shape (per-token T). No
        gradient flows to it.
      impl: "auto" (Triton on CUDA, else torch), "torch" or "triton".
      inplace_backward: write ∂L/∂logits into the logits buffer instead of a new N×V tensor.
        Safe only when nothing else reads these logits after this op's backward (the usual
        ``logits = lm_head(h)`` → this op); autograd raises if another op saved them. For a
        slice such as ``logits[:, :-1]`` autograd allocates a gradient of the whole base
        tensor anyway, so in place saves nothing there (it still works).
      validate: check label and temperature values (a host read) off CPU too.
      tp_group: a ``torch.distributed`` process group over which the vocabulary is split
        (tensor parallel): ``logits`` is then this rank's contiguous slice of the vocabulary,
        in rank order (slices may differ in size), and ``labels`` are global token ids.
        Results and gradients equal the unsharded op's; each call all-reduces 6 float32
        values per token, never the logits. The upstream gradients must be the same on
        every rank of the group (a replicated loss). Not traced by ``torch.compile``.
      vocab_start: the global id of this shard's first entry (int or 0-d integer tensor).
        Default: the sum of the lower ranks' shard sizes, one tiny all-gather per call.
      chunk_tokens: rows per block of the torch path (default: about 1M logits per block on
        CPU, 16M on accelerators); smaller blocks use less memory, larger ones fewer steps.
      kept_ids: (..., K) integer token ids the rollout kept at each position (after its
        top-k/top-p), padded with -1 (any negative id is padding): the replay of the
        distribution the engine actually sampled from. Duplicate ids count once. Ids ≥ V
        raise on CPU and with ``validate=True``, otherwise they are ignored. A position
        whose kept set is empty has no distribution: logp and H are NaN (logp 0 where the
        label is ignored) and its gradient is 0. Reads O(N·K) logits (one gather, one
        scatter in backward); both impls use this torch gather path (the N·K arithmetic is
        negligible and the backward's N×V zero-fill is a memset a kernel could not beat).
        Under ``tp_group`` the ids are global and each shard gathers those it holds; a label
        held by no shard counts as outside its kept set (-inf).
      top_k: keep the k largest logits (ties with the k-th kept): an int ≥ 1, or an integer
        tensor broadcastable to the token shape (entries ≤ 0 disable it there).
      top_p: then keep the smallest set of most probable tokens of the renormalized top-k
        distribution at T whose mass reaches p (ties at the threshold kept, at least one
        token): a float in (0, 1] or a tensor broadcastable to the token shape. With
        ``top_k``/``top_p`` the truncation is recomputed from these logits, as engines do,
        by a per-row threshold search (no sort): 2 (torch) or 4 (Triton) extra reads of
        the logits per rule for bfloat16, 4 or 8 for float32, one more for top_p
        (``hapo_ops.vocab.truncation``). Not with ``kept_ids``.
    Returns:
      (logprobs, entropy), float32, shape logits.shape[:-1]. Both are differentiable.

    Examples:
      >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
      >>> logp, entropy = logprobs_and_entropy(logits, torch.tensor([0]))
      >>> logp  # log softmax(z)[0]
      tensor([-0.1698])
      >>> kept = torch.tensor([[0, 1, -1]])  # the engine kept tokens 0 and 1
      >>> logprobs_and_entropy(logits, torch.tensor([0]), kept_ids=kept)[0]
      tensor([-0.1269])
      >>> logprobs_and_entropy(logits, torch.tensor([0]), top_k=2)[0]  # the same set
      tensor([-0.1269])

    References:
      HAPO, arXiv 2509.16591 (§3: the entropy signal takes ln H, so near-deterministic
      tokens need relative, not absolute, precision); vLLM ``--return-sampling-mask`` (the
      kept sets replayed here).
    """
    logits = _check_logits(logits)
    vocab, token_shape = logits.shape[-1], logits.shape[:-1]
    ignore_index = check_ignore_index(ignore_index)
    chunk_tokens = check_chunk("chunk_tokens", chunk_tokens)
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(vocab, logits.device)
    no_labels = labels is None
    if no_labels:
        labels = torch.full(token_shape, ignore_index, dtype=torch.int64, device=logits.device)
    check_values = checks_values(logits, validate)
    flat_labels = check_token_labels(labels, token_shape, vocab, ignore_index, logits.device,
                                     source="logits",
                                     check_range=check_values and tp_group is None)
    t_tensor, t_scalar = prepare_temperature(temperature, token_shape, logits.device,
                                             source="logits", check_values=check_values)
    impl = resolve_impl(impl, logits)
    top_k = check_top_k(top_k, token_shape, logits.device)
    top_p = check_top_p(top_p, token_shape, logits.device, check_values=check_values)
    truncated = truncates(top_k, top_p)
    kept = None
    if kept_ids is not None:
        if truncated:
            raise ValueError("pass kept_ids (the engine's kept sets) or top_k/top_p (recompute "
                             "them), not both")
        kept = check_kept_ids(kept_ids, token_shape, vocab, logits.device,
                              check_range=check_values and tp_group is None)
    if tp_group is None:
        if vocab_start is not None:
            raise ValueError("vocab_start is only meaningful with tp_group; got tp_group=None")
        if kept is not None:
            logp, entropy, _ = _kept_op(logits, kept, flat_labels, t_tensor, t_scalar,
                                        ignore_index, bool(inplace_backward))
            return logp, entropy
        threshold = None
        if truncated:
            threshold = _truncation_threshold_op(
                logits.detach(), t_tensor, t_scalar, _tensor_or_none(top_k),
                top_k if isinstance(top_k, int) else 0, _tensor_or_none(top_p),
                top_p if isinstance(top_p, float) else 1.0, impl, chunk_tokens)
        extra = () if threshold is None else (threshold,)
        logp, entropy, _ = _logprobs_entropy_op(logits, flat_labels, t_tensor, t_scalar,
                                                ignore_index, impl, bool(inplace_backward),
                                                chunk_tokens, *extra)
        return logp, entropy
    check_process_group("tp_group", tp_group, optional=False)
    if kept is not None:
        start = shard_vocab_start(vocab_start, vocab, tp_group, logits.device)
        return _VocabParallelKept.apply(logits, kept, flat_labels, t_tensor, t_scalar,
                                        ignore_index, bool(inplace_backward), tp_group, start)
    threshold = None
    if truncated:
        with torch.no_grad():
            threshold = truncation_threshold(logits, t_tensor, t_scalar, top_k, top_p, impl,
                                             chunk_tokens, tp_group)
    # With no labels no shard holds one, and the shard offset is not needed.
    start = 0 if no_labels else shard_vocab_start(vocab_start, vocab, tp_group, logits.device)
    local, has_label = shard_labels(flat_labels, vocab, ignore_index, start)
    return _VocabParallelLogprobsEntropy.apply(
        logits, flat_labels, local, has_label, t_tensor, t_scalar, ignore_index, impl,
        bool(inplace_backward), chunk_tokens, tp_group, check_values and not no_labels,
        threshold)


def _tensor_or_none(value: object) -> torch.Tensor | None:
    return value if isinstance(value, torch.Tensor) else None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *,
                   temperature: float | torch.Tensor = 1.0, ignore_index: int = -100,
                   impl: str = "auto", inplace_backward: bool = False,
                   validate: bool = False, tp_group: ProcessGroup | None = None,
                   vocab_start: int | torch.Tensor | None = None,
                   chunk_tokens: int | None = None, kept_ids: torch.Tensor | None = None,
                   top_k: int | torch.Tensor | None = None,
                   top_p: float | torch.Tensor | None = None) -> torch.Tensor:
    """logp = z_y/T - logsumexp(z/T) per token, or under the truncated distribution of
    ``kept_ids`` / ``top_k`` / ``top_p`` (see :func:`logprobs_and_entropy`)."""
    return logprobs_and_entropy(logits, labels, temperature=temperature,
                                ignore_index=ignore_index, impl=impl,
                                inplace_backward=inplace_backward, validate=validate,
                                tp_group=tp_group, vocab_start=vocab_start,
                                chunk_tokens=chunk_tokens, kept_ids=kept_ids, top_k=top_k,
                                top_p=top_p)[0]


def token_entropy(logits: torch.Tensor, *, temperature: float | torch.Tensor = 1.0,
                  impl: str = "auto", inplace_backward: bool = False,
                  validate: bool = False, tp_group: ProcessGroup | None = None,
                  chunk_tokens: int | None = None, kept_ids: torch.Tensor | None = None,
                  vocab_start: int | torch.Tensor | None = None,
                  top_k: int | torch.Tensor | None = None,
                  top_p: float | torch.Tensor | None = None) -> torch.Tensor:
    """H = logsumexp(z/T) - Σ_v softmax(z/T)_v · z_v/T per token, float32, exact for H ≪ 1e-6
    (see :func:`logprobs_and_entropy`; ``tp_group`` for a vocabulary-parallel shard;
    ``kept_ids`` / ``top_k`` / ``top_p`` for the entropy of the truncated distribution)."""
    return logprobs_and_entropy(logits, None, temperature=temperature, impl=impl,
                                inplace_backward=inplace_backward, validate=validate,
                                tp_group=tp_group, chunk_tokens=chunk_tokens,
                                vocab_start=vocab_start, kept_ids=kept_ids, top_k=top_k,
                                top_p=top_p)[1]


def vocab_parallel_logprobs_and_entropy(
        logits: torch.Tensor, labels: torch.Tensor | None, tp_group: ProcessGroup, *,
        vocab_start: int | torch.Tensor | None = None, temperature: float | torch.Tensor = 1.0,
        ignore_index: int = -100, impl: str = "auto", inplace_backward: bool = False,
        validate: bool = False, chunk_tokens: int | None = None,
        kept_ids: torch.Tensor | None = None, top_k: int | torch.Tensor | None = None,
        top_p: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`logprobs_and_entropy` of a vocabulary shard: ``logits`` (..., V_r) is this rank's
    contiguous slice [vocab_start, vocab_start + V_r) of the vocabulary, ``labels`` global
    ids. Returns the unsharded op's (logp, H) on every rank, differentiable in both (the
    gradient is this shard's slice of the unsharded gradient).

    Communication: all-reduce MAX of N float32, all-reduce SUM of 5·N float32 (plus, without
    ``vocab_start``, one all-gather of one int per rank). Labels held by no shard raise on
    CPU and with ``validate=True`` (after the all-reduce, so every rank raises); otherwise
    their logp is NaN. ``kept_ids`` (global ids; each shard gathers those it holds) costs the
    same two all-reduces; ``top_k``/``top_p`` add one all-reduce MAX of N and, per search
    pass, one all-reduce SUM of N·2^D float32 (D = 8 torch, 4 Triton).
    """
    return logprobs_and_entropy(logits, labels, temperature=temperature,
                                ignore_index=ignore_index, impl=impl,
                                inplace_backward=inplace_backward, validate=validate,
                                tp_group=check_process_group("tp_group", tp_group, optional=False), vocab_start=vocab_start,
                                chunk_tokens=chunk_tokens, kept_ids=kept_ids, top_k=top_k,
                                top_p=top_p)


__all__ = ["default_chunk_tokens", "logprobs_and_entropy", "row_blocks",
           "saturate_above", "shard_vocab_start", "token_entropy", "token_logprobs",
           "truncation_threshold", "vocab_parallel_logprobs_and_entropy"]
