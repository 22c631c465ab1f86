"""Per-token log-prob and entropy straight from hidden states and the LM head.

    z = hidden · weightᵀ + bias,   logp = z_y/T - logsumexp(z/T),   H = logsumexp(z/T) - E_p[z/T]

without ever materializing the N×V logits: at 16k tokens and a 152k vocabulary they are the
largest tensor of an RL step (5 GB in bf16, 10 GB in fp32). Same numerics as
:func:`hapo_ops.logprobs_and_entropy` (the per-row statistics of ``hapo_ops.vocab.row_statistics``),
same gradients chained through the matmul:

    dz = [g_lp (1[v=y] - p) - g_H p (log p + H)] / T,
    ∂hidden = dz · W,   ∂weight = dzᵀ · hidden,   ∂bias = Σ_tokens dz.

Implementations:
  * ``impl="torch"``: blocks of ``chunk_tokens`` tokens × ``chunk_vocab`` vocabulary entries.
    The forward reduces each block to its row statistics and combines them exactly
    (``combine_parts``); the backward recomputes each block from the saved per-row state
    (M, log1p(rest)) and H. Matmuls run in fp32 (2-byte inputs are upcast a block at a time:
    their products are exact in fp32, as on tensor cores with fp32 accumulation) or in fp64
    for fp64 inputs. Extra memory: three block-sized temporaries, one C_V×D weight-gradient
    accumulator and the (N, D) hidden-gradient accumulator; never anything N×V. Slower than
    ``hidden @ weight.T`` followed by the logits op on a CPU (the blocks are recomputed in
    the backward): it trades time for memory.
  * ``impl="triton"``: ``hapo_ops.kernels.linear_logprob_entropy`` (logits tiles on chip,
    fp32 accumulators, tensor cores for bf16/fp16; fp32 inputs use ``fp32_precision``).

Unsharded, both run inside the ``hapo_ops::linear_logprobs_entropy`` custom op (fake kernels
and registered autograd), so ``torch.compile(fullgraph=True)`` traces through it.

Vocabulary (tensor) parallel (``tp_group=``): ``weight``/``bias`` are one rank's rows of the
LM head and ``hidden`` is replicated. Each rank reduces its shard to raw row statistics,
combined exactly across ranks (``row_statistics.combine_vocab_shards``). The backward
recomputes the shard's dz from the global state with the sharded rule (-g_lp·p on every row,
+g_lp only where this shard holds the label), keeps the weight and bias gradients local and
all-reduces (SUM) the hidden gradient Σ_r dz_r · W_r.
"""

from __future__ import annotations

import torch

from hapo_ops._utils.collectives import ProcessGroup, all_reduce_sum, check_process_group
from hapo_ops._utils.validation import check_choice, check_same_device, check_tensor
from hapo_ops.vocab.row_statistics import (NEG_LARGE, POS_LARGE, RowStatistics, block_statistics,
                                           combine_parts, combine_vocab_shards, label_logits,
                                           log_probabilities, parts_reducers, shard_labels,
                                           softmax_gradient)
from hapo_ops.vocab.token_inputs import (KERNEL_DTYPES, check_chunk, check_ignore_index,
                                         check_token_labels, checks_values, flat_float32,
                                         inverse_temperature, prepare_temperature,
                                         resolve_impl, shard_vocab_start)

# Torch path block sizes: a 1024 × 8192 fp32 block is 32 MiB (three temporaries: 96 MiB,
# against 5 GiB of bf16 logits at 16k × 152k).
CHUNK_TOKENS = 1024
CHUNK_VOCAB = 8192
FP32_PRECISIONS = ("tf32x3", "ieee", "tf32")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------
# Torch path
# ---------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Saturated z = h · wᵀ + b for one block in the compute dtype (h, w already upcast):
    one block-sized allocation, bias and saturation in place."""
    z = h @ w.T
    if b is not None:
        z.add_(b)
    return z.clamp_(NEG_LARGE, POS_LARGE)


def torch_row_statistics(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, inv_temperature: torch.Tensor,
                         chunk_tokens: int, chunk_vocab: int) -> RowStatistics:
    """Row statistics (compute dtype) of z = hidden · weightᵀ + bias, block by block; the
    label logit is 0 where the label is outside [0, V)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    cdt = _compute_dtype(hidden.dtype)
    columns = torch.empty((n_rows, 4), dtype=cdt, device=hidden.device)
    bias_c = None if bias is None else bias.to(cdt)
    every_part = torch.ones((), dtype=torch.bool, device=hidden.device)
    for r0 in range(0, n_rows, chunk_tokens):
        r1 = min(r0 + chunk_tokens, n_rows)
        h, inv_t, label = hidden[r0:r1].to(cdt), inv_temperature[r0:r1].to(cdt), labels[r0:r1]
        running = None
        for v0 in range(0, vocab, chunk_vocab):
            v1 = min(v0 + chunk_vocab, vocab)
            z = _block_logits(h, weight[v0:v1].to(cdt), None if bias_c is None else bias_c[v0:v1])
            in_block = (label >= v0) & (label < v1)
            label_logit = torch.where(in_block, label_logits(z, label - v0), 0.0)
            part = RowStatistics(*block_statistics(z, inv_t), label_logit)
            del z
            if running is not None:
                pair = RowStatistics(*(torch.stack(both) for both in zip(running, part)))
                part, _ = combine_parts(pair, every_part, inv_t, **parts_reducers())
            running = part
        columns[r0:r1] = running.stacked()
    return RowStatistics.from_columns(columns)


def torch_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   labels: torch.Tensor, inv_temperature: torch.Tensor, state: torch.Tensor,
                   entropy: torch.Tensor, grad_logp: torch.Tensor | None,
                   grad_entropy: torch.Tensor | None, ignore_index: int, chunk_tokens: int,
                   chunk_vocab: int, *, want_hidden: bool, want_weight: bool, want_bias: bool,
                   sharded: bool = False
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients, vocabulary blocks outside, token blocks inside: each C_V×D weight-gradient
    block is finished (and cast to the weight dtype) before the next; the hidden gradient
    accumulates in an (N, D) buffer of the compute dtype.

    ``sharded``: ``weight`` is one vocabulary shard, ``labels`` shard-local (-1 where another
    shard holds the label), ``grad_logp`` already zero where logp has no gradient and
    ``state`` the global one: -g_lp·p applies on every row, +g_lp only at a label in [0, V)."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    cdt = _compute_dtype(hidden.dtype)
    device = hidden.device
    want_bias = want_bias and bias is not None
    grad_hidden = torch.zeros((n_rows, dim), dtype=cdt, device=device) if want_hidden else None
    grad_weight = torch.empty_like(weight) if want_weight else None
    grad_bias = torch.empty_like(bias) if want_bias else None
    bias_c = None if bias is None else bias.to(cdt)
    if grad_logp is not None and not sharded:
        _, has_label = shard_labels(labels, vocab, ignore_index)
        grad_logp = torch.where(has_label, grad_logp, 0.0)
    for v0 in range(0, vocab, chunk_vocab):
        v1 = min(v0 + chunk_vocab, vocab)
        w = weight[v0:v1].to(cdt)
        b = None if bias_c is None else bias_c[v0:v1]
        gw = torch.zeros((v1 - v0, dim), dtype=cdt, device=device) if want_weight else None
        gb = torch.zeros(v1 - v0, dtype=cdt, device=device) if want_bias else None
        for r0 in range(0, n_rows, chunk_tokens):
            r1 = min(r0 + chunk_tokens, n_rows)
            rows = slice(r0, r1)
            h, inv_t, label = hidden[rows].to(cdt), inv_temperature[rows], labels[rows]
            g_lp = None if grad_logp is None else grad_logp[rows]
            label_weight = None
            if g_lp is not None:
                label_weight = torch.where((label >= v0) & (label < v1), g_lp, 0.0)
            log_p = log_probabilities(_block_logits(h, w, b), state[rows], inv_t)
            grad = softmax_gradient(log_p, entropy[rows], g_lp,
                                    None if grad_entropy is None else grad_entropy[rows],
                                    (label - v0).clamp(0, v1 - v0 - 1), label_weight, inv_t)
            if grad_hidden is not None:
                grad_hidden[rows].addmm_(grad, w)
            if gw is not None:
                gw.addmm_(grad.T, h)
            if gb is not None:
                gb += grad.sum(0)
        if gw is not None:
            grad_weight[v0:v1] = gw
        if gb is not None:
            grad_bias[v0:v1] = gb
    return grad_hidden, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------
# Dispatch to the two paths
# ---------------------------------------------------------------------------------------

def _row_statistics(hidden, weight, bias, labels, temperature, scalar_temperature, impl,
                    fp32_precision, chunk_tokens, chunk_vocab) -> RowStatistics:
    inv_t = inverse_temperature(temperature, scalar_temperature, labels.numel(), hidden.device)
    if impl == "triton":
        from hapo_ops.kernels.linear_logprob_entropy import linear_forward
        splits = RowStatistics.from_columns(linear_forward(
            hidden, weight, bias, labels, temperature, scalar_temperature, fp32_precision))
        every_part = torch.ones((), dtype=torch.bool, device=hidden.device)
        return combine_parts(splits, every_part, inv_t, **parts_reducers())[0]
    return torch_row_statistics(hidden, weight, bias, labels, inv_t, chunk_tokens, chunk_vocab)


def _backward(hidden, weight, bias, labels, temperature, scalar_temperature, state, entropy,
              grad_logp, grad_entropy, ignore_index, impl, fp32_precision, chunk_tokens,
              chunk_vocab, want, sharded):
    """(grad_hidden in the compute dtype or the input dtype, grad_weight and grad_bias in the
    parameters' dtypes), None where not wanted."""
    want_hidden, want_weight, want_bias = want
    if impl == "triton":
        from hapo_ops.kernels.linear_logprob_entropy import linear_backward
        gh, gw, gb = linear_backward(hidden, weight, bias, labels, temperature,
                                     scalar_temperature, state, entropy, grad_logp,
                                     grad_entropy, ignore_index, fp32_precision,
                                     want_hidden=want_hidden, want_weight=want_weight,
                                     want_bias=want_bias, chunk_tokens=chunk_tokens or None,
                                     sharded=sharded)
    else:
        inv_t = inverse_temperature(temperature, scalar_temperature, labels.numel(),
                                    hidden.device)
        gh, gw, gb = torch_backward(hidden, weight, bias, labels, inv_t, state, entropy,
                                    grad_logp, grad_entropy, ignore_index, chunk_tokens,
                                    chunk_vocab, want_hidden=want_hidden,
                                    want_weight=want_weight, want_bias=want_bias,
                                    sharded=sharded)
    return (gh, None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype))


# ---------------------------------------------------------------------------------------
# Unsharded: custom ops
# ---------------------------------------------------------------------------------------

@torch.library.custom_op("hapo_ops::linear_logprobs_entropy", mutates_args=())
def _linear_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               labels: torch.Tensor, temperature: torch.Tensor | None,
               scalar_temperature: float, ignore_index: int, impl: str, fp32_precision: str,
               chunk_tokens: int, chunk_vocab: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    stats = _row_statistics(hidden, weight, bias, labels, temperature, scalar_temperature,
                            impl, fp32_precision, chunk_tokens, chunk_vocab)
    inv_t = inverse_temperature(temperature, scalar_temperature, labels.numel(), hidden.device)
    _, has_label = shard_labels(labels, weight.shape[0], ignore_index)
    logp, entropy, state, _ = combine_vocab_shards(stats, labels, has_label,
                                                   inv_t.to(stats.rest.dtype), ignore_index,
                                                   None, check_found=False)
    return logp, entropy, state


@_linear_op.register_fake
def _(hidden, weight, bias, labels, temperature, scalar_temperature, ignore_index, impl,
      fp32_precision, chunk_tokens, chunk_vocab):
    n_rows = hidden.shape[0]
    new = hidden.new_empty
    return (new(n_rows, dtype=torch.float32), new(n_rows, dtype=torch.float32),
            new((n_rows, 2), dtype=_compute_dtype(hidden.dtype)))


@torch.library.custom_op("hapo_ops::linear_logprobs_entropy_backward", mutates_args=())
def _linear_backward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        labels: torch.Tensor, temperature: torch.Tensor | None,
                        scalar_temperature: float, state: torch.Tensor, entropy: torch.Tensor,
                        grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                        ignore_index: int, impl: str, fp32_precision: str, chunk_tokens: int,
                        chunk_vocab: int, want_hidden: bool, want_weight: bool, want_bias: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight, grad_bias) in the inputs' dtypes; an empty tensor stands
    for a gradient that is not wanted (a custom op cannot return None)."""
    gh, gw, gb = _backward(hidden, weight, bias, labels, temperature, scalar_temperature, state,
                           entropy, grad_logp, grad_entropy, ignore_index, impl, fp32_precision,
                           chunk_tokens, chunk_vocab, (want_hidden, want_weight, want_bias),
                           sharded=False)
    return (hidden.new_empty(0) if gh is None else gh.to(hidden.dtype),
            hidden.new_empty(0) if gw is None else gw, hidden.new_empty(0) if gb is None else gb)


@_linear_backward_op.register_fake
def _(hidden, weight, bias, labels, temperature, scalar_temperature, state, entropy, grad_logp,
      grad_entropy, ignore_index, impl, fp32_precision, chunk_tokens, chunk_vocab, want_hidden,
      want_weight, want_bias):
    return (torch.empty_like(hidden) if want_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if want_weight else hidden.new_empty(0),
            torch.empty_like(bias) if want_bias and bias is not None else hidden.new_empty(0))


def _linear_setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, temperature, scalar_temperature, ignore_index, impl,
     fp32_precision, chunk_tokens, chunk_vocab) = inputs
    _, entropy, state = output
    ctx.save_for_backward(hidden, weight, bias, labels, temperature, state, entropy)
    ctx.options = (scalar_temperature, ignore_index, impl, fp32_precision, chunk_tokens,
                   chunk_vocab)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(state)


def _linear_op_backward(ctx, grad_logp, grad_entropy, grad_state):
    hidden, weight, bias, labels, temperature, state, entropy = ctx.saved_tensors
    want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
    want_bias = want_bias and bias is not None
    none = (None,) * 8
    if (grad_logp is None and grad_entropy is None) or not (want_hidden or want_weight
                                                          or want_bias):
        return (None, None, None) + none
    scalar_temperature, ignore_index, impl, fp32_precision, chunk_tokens, chunk_vocab = ctx.options
    gh, gw, gb = _linear_backward_op(
        hidden, weight, bias, labels, temperature, scalar_temperature, state, entropy,
        flat_float32(grad_logp), flat_float32(grad_entropy), ignore_index, impl, fp32_precision,
        chunk_tokens, chunk_vocab, want_hidden, want_weight, want_bias)
    return ((gh if want_hidden else None), (gw if want_weight else None),
            (gb if want_bias else None)) + none


_linear_op.register_autograd(_linear_op_backward, setup_context=_linear_setup_context)


# ---------------------------------------------------------------------------------------
# Vocabulary shards
# ---------------------------------------------------------------------------------------

class _VocabParallelLinear(torch.autograd.Function):
    """One vocabulary shard of the LM head: ``labels`` are shard-local (-1 where another shard
    holds the label); the forward combines every shard's row statistics, the backward
    all-reduces the hidden gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, scalar_temperature,
                ignore_index, impl, fp32_precision, chunk_tokens, chunk_vocab, group,
                global_labels, has_label, check_found):
        stats = _row_statistics(hidden, weight, bias, labels, temperature, scalar_temperature,
                                impl, fp32_precision, chunk_tokens, chunk_vocab)
        inv_t = inverse_temperature(temperature, scalar_temperature, labels.numel(),
                                    hidden.device).to(stats.rest.dtype)
        logp, entropy, state, logp_ok = combine_vocab_shards(
            stats, global_labels, has_label, inv_t, ignore_index, group,
            check_found=check_found)
        ctx.save_for_backward(hidden, weight, bias, labels, temperature, state, entropy,
                              logp_ok)
        ctx.options = (scalar_temperature, ignore_index, impl, fp32_precision, chunk_tokens,
                       chunk_vocab)
        ctx.group = group
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, temperature, state, entropy, logp_ok = ctx.saved_tensors
        want = tuple(ctx.needs_input_grad[:3])
        none = (None,) * 12
        if (grad_logp is None and grad_entropy is None) or not any(want):
            return (None, None, None) + none
        grad_logp = flat_float32(grad_logp)
        if grad_logp is not None:
            grad_logp = torch.where(logp_ok, grad_logp, 0.0)
        scalar_temperature, ignore_index, impl, fp32_precision, chunk_tokens, chunk_vocab = ctx.options
        gh, gw, gb = _backward(hidden, weight, bias, labels, temperature, scalar_temperature,
                               state, entropy, grad_logp, flat_float32(grad_entropy), ignore_index,
                               impl, fp32_precision, chunk_tokens, chunk_vocab, want,
                               sharded=True)
        if gh is not None:
            # Each shard holds dz_r · W_r; the input gradient is their sum (as for Megatron's
            # column-parallel LM head), summed in fp32 (fp64 for fp64 inputs).
            gh = all_reduce_sum(gh.to(_compute_dtype(hidden.dtype)), ctx.group).to(hidden.dtype)
        return (gh, gw, gb) + none


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def linear_logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                labels: torch.Tensor, *, bias: torch.Tensor | None = None,
                                temperature: float | torch.Tensor = 1.0,
                                ignore_index: int = -100, impl: str = "auto",
                                fp32_precision: str = "tf32x3", validate: bool = False,
                                tp_group: ProcessGroup | None = None,
                                vocab_start: int | torch.Tensor | None = None,
                                chunk_tokens: int | None = None, chunk_vocab: int | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``labels`` and entropy (nats) of softmax((hidden · weightᵀ + bias) / T),
    without materializing the N×V logits.

    Args:
      hidden: (..., D) float16, bfloat16, float32 (or float64, always on the torch path);
        an empty batch (e.g. (0, D)) gives empty results and zero weight/bias gradients.
      weight: (V, D) LM head as ``nn.Linear`` stores it, same dtype as ``hidden``.
      labels: (...) = hidden.shape[:-1], integer ids; ``ignore_index`` positions give logp 0
        and no logp gradient (their entropy is still computed). Labels outside [0, V) (with
        ``tp_group``: held by no shard) raise on CPU and with ``validate=True``; otherwise
        their logp is NaN.
      bias: optional (V,) floating tensor.
      temperature: a float > 0 or a tensor broadcastable to the token shape (no gradient).
      impl: "auto" (Triton on CUDA, else torch), "torch", or "triton" (CUDA, or CPU under
        ``TRITON_INTERPRET=1``).
      fp32_precision: ``tl.dot`` input precision for float32 inputs on the Triton path:
        "tf32x3" (default: near-fp32 accuracy on tensor cores, fp32 heads are kept for
        precision), "ieee" (exact fp32, no tensor cores) or "tf32" (fastest, ~1e-3 relative).
        2-byte dtypes always multiply exactly into fp32 accumulators.
      validate: check label and temperature values (a host read) off CPU too.
      tp_group: a ``torch.distributed`` process group over which the LM head is split by
        vocabulary rows (tensor parallel, Megatron's column-parallel LM head): ``weight``
        (V_r, D) and ``bias`` (V_r,) are then this rank's contiguous slice of the vocabulary,
        in rank order (slices may differ in size), ``hidden`` is the same on every rank and
        ``labels`` are global ids. (logp, H) equal the unsharded op's on every rank; each call
        all-reduces 6 float32 values per token (as ``logprobs_and_entropy(tp_group=)``),
        never the logits. Backward: the weight and bias gradients
        are this shard's slice of the unsharded ones; the hidden gradient is all-reduced (SUM
        over ``tp_group``, N·D values, in fp32) so that every rank gets the full gradient
        Σ_r dz_r · W_r. The upstream gradients must be the same on every rank (a replicated
        loss), and ``hidden`` must require grad on all ranks or on none.
      vocab_start: the global id of this shard's first row (int or 0-d integer tensor);
        default: derived from an all-gather of the shard sizes (one tiny collective per call).
      chunk_tokens, chunk_vocab: block sizes of the torch path (default 1024 × 8192); on the
        Triton path ``chunk_tokens`` bounds the backward's dz buffer (default 512 MiB of it).
    Returns:
      (logprobs, entropy) float32 of shape hidden.shape[:-1], differentiable with respect to
      hidden, weight and bias (gradients in their dtypes).

    Examples:
      >>> hidden, weight = torch.randn(4, 8), torch.randn(32, 8)
      >>> labels = torch.tensor([1, 5, 7, -100])
      >>> logp, entropy = linear_logprobs_and_entropy(hidden, weight, labels)
      >>> torch.allclose(logp[:3], torch.log_softmax(hidden @ weight.T, -1)[:3].gather(
      ...     -1, labels[:3, None])[:, 0], atol=1e-5)
      True
    """
    hidden = check_tensor("hidden", hidden, floating=True, allow_empty=True)
    weight = check_tensor("weight", weight, floating=True)
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., D), got a 0-d tensor")
    dim = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != dim:
        raise ValueError(f"weight must have shape (V, D) with D = hidden.shape[-1] = {dim}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), "
                        f"got {weight.dtype}")
    check_same_device("weight", weight, "hidden", hidden)
    vocab = weight.shape[0]
    if bias is not None:
        bias = check_tensor("bias", bias, floating=True)
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must have shape (V,) = ({vocab},), got {tuple(bias.shape)}")
        check_same_device("bias", bias, "hidden", hidden)
    token_shape = hidden.shape[:-1]
    ignore_index = check_ignore_index(ignore_index)
    fp32_precision = check_choice("fp32_precision", fp32_precision, FP32_PRECISIONS)
    chunk_tokens = check_chunk("chunk_tokens", chunk_tokens)
    chunk_vocab = check_chunk("chunk_vocab", chunk_vocab) or CHUNK_VOCAB
    if tp_group is not None:
        check_process_group("tp_group", tp_group, optional=False)
    elif vocab_start is not None:
        raise ValueError("vocab_start is only meaningful with tp_group; got tp_group=None")
    check_values = checks_values(hidden, validate)
    labels = check_token_labels(labels, token_shape, vocab, ignore_index, hidden.device,
                                source="hidden", check_range=check_values and tp_group is None)
    t_tensor, t_scalar = prepare_temperature(temperature, token_shape, hidden.device,
                                             source="hidden", check_values=check_values)
    impl = resolve_impl(impl, hidden)
    if impl == "triton":
        if hidden.dtype not in KERNEL_DTYPES:
            raise TypeError(f"impl='triton' takes hidden of dtype float16, bfloat16 or float32, "
                            f"got {hidden.dtype}")

    flat_hidden = hidden.reshape(-1, dim)
    if flat_hidden.numel() and flat_hidden.stride(-1) != 1:
        flat_hidden = flat_hidden.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    # The torch path's token blocks; 0 lets the Triton backward size its dz buffer.
    chunk_tokens = chunk_tokens or (CHUNK_TOKENS if impl == "torch" else 0)
    if tp_group is None:
        logp, entropy, _ = _linear_op(flat_hidden, weight, bias, labels, t_tensor, t_scalar,
                                      ignore_index, impl, fp32_precision, chunk_tokens,
                                      chunk_vocab)
    else:
        start = shard_vocab_start(vocab_start, vocab, tp_group, hidden.device)
        local, has_label = shard_labels(labels, vocab, ignore_index, start)
        logp, entropy = _VocabParallelLinear.apply(
            flat_hidden, weight, bias, local, t_tensor, t_scalar, ignore_index, impl,
            fp32_precision, chunk_tokens, chunk_vocab, tp_group, labels, has_label,
            check_values)
    return logp.view(token_shape), entropy.view(token_shape)


__all__ = ["linear_logprobs_and_entropy"]
