"""Per-token log-prob and entropy straight from hidden states and the LM head (SPEC §1).

    z = hidden · weightᵀ + bias,   s = z / T,   logp = s_y - logsumexp(s),   H = logsumexp(s) - E_p[s]

without ever materializing the N×V logits: at 16k tokens and a 152k vocabulary they are the
largest tensor of an RL step (5 GB in bf16, 10 GB in fp32). Same numerics as
:func:`hapo_ops.logprobs_and_entropy` (the cancellation-free H = log1p(rest) + a/(1+rest)),
same gradients chained through the matmul:

    dz = [g_lp (1[v=y] - p) - g_H p (log p + H)] / T,
    ∂hidden = dz · W,   ∂weight = dzᵀ · hidden,   ∂bias = Σ_tokens dz.

Implementations:
  * ``impl="torch"``: chunks of ``TOKEN_CHUNK`` tokens × ``VOCAB_CHUNK`` vocabulary entries.
    Forward folds each chunk's (max, rest, spread) into the running per-row statistics
    exactly (no subtraction of large numbers); backward recomputes each chunk from the saved
    per-row state (max, log1p(rest)) and H. Matmuls run in fp32 (2-byte inputs are upcast a
    chunk at a time: their products are exact in fp32, as on tensor cores with fp32
    accumulation) or in fp64 for fp64 inputs. Extra memory: two C_N×C_V fp32 temporaries
    (in-place updates), one C_V×D weight-gradient accumulator and the (N, D) fp32
    hidden-gradient accumulator; never anything N×V.
  * ``impl="triton"``: ``hapo_ops.kernels.linear_logprob_entropy`` (logits tiles on chip,
    fp32 accumulators, tensor cores for bf16/fp16; fp32 inputs use ``fp32_precision``).

Vocabulary (tensor) parallel (``tp_group=``): ``weight``/``bias`` are one rank's rows of the
LM head and ``hidden`` is replicated. Either path reduces its shard to the raw per-row sums
[m, rest, spread, s_y] (``torch_row_stats``, or the Triton forward with ``raw_stats``), which
``hapo_ops.distributed.vocab_parallel_outputs`` combines exactly (all-reduce MAX of N, SUM of
5·N values). The backward recomputes the shard's dz from the global state with the sharded
rule (-g_lp·p on every row, +g_lp only where this shard holds the label), keeps the weight
and bias gradients local and all-reduces (SUM) the hidden gradient Σ_r dz_r · W_r.
"""

from __future__ import annotations

import torch

from hapo_ops._validation import check_choice, check_tensor
from hapo_ops.token_stats import (ROW_LABEL, ROW_MAX, ROW_REST, ROW_SPREAD,
                                  _check_triton_device, check_token_labels, checks_values,
                                  inv_temperature, prepare_temperature, resolve_impl)

# Torch path chunk sizes (module constants so that tests can shrink them). A 1024 × 8192
# fp32 chunk is 32 MiB; forward and backward keep two such temporaries alive (64 MiB, against
# 5 GiB of bf16 logits at 16k × 152k).
TOKEN_CHUNK = 1024
VOCAB_CHUNK = 8192
FP32_PRECISIONS = ("tf32x3", "ieee", "tf32")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------
# Torch path
# ---------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                  inv_t: torch.Tensor) -> torch.Tensor:
    """s = (h · wᵀ + b) / T for one chunk, in the compute dtype (h, w already upcast); one
    chunk-sized allocation (bias and temperature applied in place)."""
    z = h @ w.T
    if b is not None:
        z.add_(b)
    return z.mul_(inv_t[:, None])


def torch_row_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    labels: torch.Tensor, inv_temperature: torch.Tensor) -> torch.Tensor:
    """(N, 4) per-row sums [m, rest, spread, s_y] (columns ``token_stats.ROW_*``, natural
    units, compute dtype) of s = (hidden · weightᵀ + bias)/T: m = max s, rest the mass off
    one argmax, spread = Σ e^(s-m)(m-s), s_y the label's s (0 where the label is outside
    [0, V)). What a vocabulary shard contributes (``hapo_ops.distributed``)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    cdt = _compute_dtype(hidden.dtype)
    stats = torch.empty((n_rows, 4), dtype=cdt, device=hidden.device)
    bias_c = None if bias is None else bias.to(cdt)
    for r0 in range(0, n_rows, TOKEN_CHUNK):
        r1 = min(r0 + TOKEN_CHUNK, n_rows)
        h = hidden[r0:r1].to(cdt)
        inv_t = inv_temperature[r0:r1].to(cdt)
        label = labels[r0:r1]
        row_max = rest = spread = label_s = None
        for v0 in range(0, vocab, VOCAB_CHUNK):
            v1 = min(v0 + VOCAB_CHUNK, vocab)
            s = _chunk_logits(h, weight[v0:v1].to(cdt), None if bias_c is None else bias_c[v0:v1],
                              inv_t)
            in_chunk = (label >= v0) & (label < v1)
            picked = s.gather(-1, (label - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0]
            c_label = torch.where(in_chunk, picked, torch.zeros_like(picked))
            # The chunk's own statistics: max m, rest off one argmax, spread Σ e^(s-m)(m-s);
            # in place, so that two chunk-sized tensors are alive at a time.
            c_max, c_arg = s.max(-1, keepdim=True)
            gap = s.neg_().add_(c_max)                                # m - s ≥ 0, over s
            weights = torch.exp(-gap)
            c_spread = torch.linalg.vecdot(weights, gap)
            c_rest = weights.scatter_(-1, c_arg, 0.0).sum(-1)         # gap 0 there: no spread
            c_max = c_max[:, 0]
            del s, gap, weights
            if row_max is None:
                row_max, rest, spread, label_s = c_max, c_rest, c_spread, c_label
                continue
            label_s = label_s + c_label  # exactly one chunk holds the label
            # Exact merge of (row_max, rest, spread) with the chunk's: the smaller side's whole
            # mass e^(m_small - M)(1 + rest_small) moves off the max (ties stay on the first).
            keep = row_max >= c_max
            big_max = torch.where(keep, row_max, c_max)
            small_max = torch.where(keep, c_max, row_max)
            big_rest = torch.where(keep, rest, c_rest)
            small_rest = torch.where(keep, c_rest, rest)
            big_spread = torch.where(keep, spread, c_spread)
            small_spread = torch.where(keep, c_spread, spread)
            delta = big_max - small_max                               # ≥ 0
            factor = torch.exp(-delta)
            rest = big_rest + factor * (1.0 + small_rest)
            spread = big_spread + factor * (small_spread + delta * (1.0 + small_rest))
            row_max = big_max
        stats[r0:r1, ROW_MAX] = row_max
        stats[r0:r1, ROW_REST] = rest
        stats[r0:r1, ROW_SPREAD] = spread
        stats[r0:r1, ROW_LABEL] = label_s
    return stats


def torch_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  labels: torch.Tensor, inv_temperature: torch.Tensor, ignore_index: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, H, state) for hidden (N, D), weight (V, D); state (N, 2) = (max s, log1p(rest))
    in the compute dtype, logp and H float32."""
    vocab = weight.shape[0]
    stats = torch_row_stats(hidden, weight, bias, labels, inv_temperature)
    row_max, rest, spread, label_s = (stats[:, i] for i in (ROW_MAX, ROW_REST, ROW_SPREAD,
                                                            ROW_LABEL))
    log_norm = torch.log1p(rest)
    entropy = (log_norm + spread / (1.0 + rest)).to(torch.float32)
    logp = ((label_s - row_max) - log_norm).to(torch.float32)
    state = torch.stack((row_max, log_norm), dim=1)
    in_range = (labels >= 0) & (labels < vocab)
    logp = torch.where(in_range, logp, torch.full_like(logp, float("nan")))
    logp = torch.where(labels == ignore_index, torch.zeros_like(logp), logp)
    return logp, entropy, state


def torch_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   labels: torch.Tensor, inv_temperature: torch.Tensor, state: torch.Tensor,
                   entropy: torch.Tensor, grad_logp: torch.Tensor | None,
                   grad_entropy: torch.Tensor | None, ignore_index: int, *,
                   want_hidden: bool, want_weight: bool, want_bias: bool,
                   sharded: bool = False, cast_hidden: bool = True
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients in the input dtypes, vocabulary chunks outside, token chunks inside: each
    C_V×D weight-gradient chunk is finished (and cast) before the next, the hidden gradient
    accumulates in an (N, D) buffer of the compute dtype (returned as such with
    ``cast_hidden=False``).

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
    label_ok = (labels != ignore_index) & (labels >= 0) & (labels < vocab)
    g_lp = None
    if grad_logp is not None:
        g_lp = grad_logp.to(cdt) if sharded else torch.where(label_ok, grad_logp.to(cdt), 0.0)
    g_h = None if grad_entropy is None else grad_entropy.to(cdt)
    entropy_c = entropy.to(cdt)
    for v0 in range(0, vocab, VOCAB_CHUNK):
        v1 = min(v0 + VOCAB_CHUNK, vocab)
        w = weight[v0:v1].to(cdt)
        b = None if bias_c is None else bias_c[v0:v1]
        gw = torch.zeros((v1 - v0, dim), dtype=cdt, device=device) if want_weight else None
        gb = torch.zeros(v1 - v0, dtype=cdt, device=device) if want_bias else None
        for r0 in range(0, n_rows, TOKEN_CHUNK):
            r1 = min(r0 + TOKEN_CHUNK, n_rows)
            h = hidden[r0:r1].to(cdt)
            inv_t = inv_temperature[r0:r1].to(cdt)
            # Two chunk-sized tensors: log p (turned into dz in place) and p.
            log_p = _chunk_logits(h, w, b, inv_t).sub_(state[r0:r1, :1]).sub_(state[r0:r1, 1:])
            p = log_p.exp()
            grad = log_p
            if g_h is not None:  # -g_H·p·(log p + H); log p is finite, so p = 0 gives 0
                grad.add_(entropy_c[r0:r1, None]).mul_(p).mul_(-g_h[r0:r1, None])
            else:
                grad.zero_()
            if g_lp is not None:
                g = g_lp[r0:r1]
                grad.addcmul_(p, g[:, None], value=-1.0)
                label = labels[r0:r1]
                in_chunk = (label >= v0) & (label < v1)
                grad.scatter_add_(-1, (label - v0).clamp(0, v1 - v0 - 1)[:, None],
                                  torch.where(in_chunk, g, 0.0)[:, None])
            del p
            grad.mul_(inv_t[:, None])
            if grad_hidden is not None:
                grad_hidden[r0:r1].addmm_(grad, w)
            if gw is not None:
                gw.addmm_(grad.T, h)
            if gb is not None:
                gb += grad.sum(0)
        if gw is not None:
            grad_weight[v0:v1] = gw
        if gb is not None:
            grad_bias[v0:v1] = gb
    if grad_hidden is not None and cast_hidden:
        grad_hidden = grad_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------

class _LinearLogprobEntropy(torch.autograd.Function):
    """Unsharded, or (``group`` set) one vocabulary shard of the LM head: ``labels`` are then
    shard-local (-1 where another shard holds the label), the forward combines every shard's
    per-row sums (``hapo_ops.distributed``) and the backward all-reduces the hidden gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, scalar_temperature,
                ignore_index, impl, fp32_precision, group=None, global_labels=None,
                has_label=None, check_found=False):
        if group is None:
            logp, entropy, state = _forward_impl(hidden, weight, bias, labels, temperature,
                                                 scalar_temperature, ignore_index, impl,
                                                 fp32_precision, raw_stats=False)
            logp_ok = None
        else:
            from hapo_ops.distributed import vocab_parallel_outputs
            stats, unit = _forward_impl(hidden, weight, bias, labels, temperature,
                                        scalar_temperature, ignore_index, impl, fp32_precision,
                                        raw_stats=True)
            logp, entropy, state, logp_ok = vocab_parallel_outputs(
                stats, has_label, unit, global_labels, ignore_index, group, check_found)
        ctx.save_for_backward(hidden, weight, bias, labels, temperature, state, entropy,
                              logp_ok)
        ctx.scalar_temperature, ctx.ignore_index = scalar_temperature, ignore_index
        ctx.impl, ctx.fp32_precision, ctx.group = impl, fp32_precision, group
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, temperature, state, entropy, logp_ok = ctx.saved_tensors
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        none = (None,) * 13
        if grad_logp is None and grad_entropy is None:
            return none
        if not (want_hidden or want_weight or want_bias):
            return none
        group = ctx.group
        sharded = group is not None
        grad_logp = None if grad_logp is None else grad_logp.reshape(-1).float().contiguous()
        if grad_logp is not None and sharded:
            grad_logp = torch.where(logp_ok, grad_logp, 0.0)
        grad_entropy = (None if grad_entropy is None
                        else grad_entropy.reshape(-1).float().contiguous())
        if ctx.impl == "triton":
            from hapo_ops.kernels import linear_logprob_entropy as kernels
            backward = (kernels.linear_backward_chunked if kernels.BACKWARD == "chunked"
                        else kernels.linear_backward)
            gh, gw, gb = backward(hidden, weight, bias, labels, temperature,
                                  ctx.scalar_temperature, state, entropy, grad_logp,
                                  grad_entropy, ctx.ignore_index, ctx.fp32_precision,
                                  want_hidden=want_hidden, want_weight=want_weight,
                                  want_bias=want_bias, sharded=sharded)
            gw = None if gw is None else gw.to(weight.dtype)
            gb = None if gb is None else gb.to(bias.dtype)
        else:
            inv_t = inv_temperature(temperature, ctx.scalar_temperature, labels.numel(),
                                     hidden.device)
            gh, gw, gb = torch_backward(hidden, weight, bias, labels, inv_t, state, entropy,
                                        grad_logp, grad_entropy, ctx.ignore_index,
                                        want_hidden=want_hidden, want_weight=want_weight,
                                        want_bias=want_bias, sharded=sharded,
                                        cast_hidden=False)
        if gh is not None:
            if sharded:
                # Each shard holds dz_r · W_r; the input gradient is their sum (as for
                # Megatron's column-parallel LM head), summed in fp32 (fp64 for fp64 inputs).
                from hapo_ops.distributed import all_reduce_sum
                gh = all_reduce_sum(gh.to(_compute_dtype(hidden.dtype)), group)
            gh = gh.to(hidden.dtype)
        return (gh, gw, gb) + (None,) * 10


def _forward_impl(hidden, weight, bias, labels, temperature, scalar_temperature, ignore_index,
                  impl, fp32_precision, *, raw_stats):
    """(logp, H, state), or with ``raw_stats`` (per-row sums (N, 4), their unit in nats)."""
    if impl == "triton":
        from hapo_ops.kernels.linear_logprob_entropy import LN2, linear_forward
        out = linear_forward(hidden, weight, bias, labels, temperature, scalar_temperature,
                             ignore_index, fp32_precision, raw_stats=raw_stats)
        return (out, LN2) if raw_stats else out
    inv_t = inv_temperature(temperature, scalar_temperature, labels.numel(), hidden.device)
    if raw_stats:
        return torch_row_stats(hidden, weight, bias, labels, inv_t), 1.0
    return torch_forward(hidden, weight, bias, labels, inv_t, ignore_index)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def _check_same_device(name: str, value: torch.Tensor, hidden: torch.Tensor) -> None:
    if value.device != hidden.device:
        raise ValueError(f"{name} must be on the device of hidden ({hidden.device}), "
                         f"got {value.device}")


def linear_logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                labels: torch.Tensor, *, bias: torch.Tensor | None = None,
                                temperature: float | torch.Tensor = 1.0,
                                ignore_index: int = -100, impl: str = "auto",
                                fp32_precision: str = "tf32x3", validate: bool = False,
                                tp_group=None, vocab_start: int | torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``labels`` and entropy (nats) of softmax((hidden · weightᵀ + bias) / T),
    without materializing the N×V logits.

    Args:
      hidden: (..., D) float16, bfloat16, float32 (or float64 on the torch path).
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
        all-reduces 6 float32 values per token (as ``logprobs_and_entropy(tp_group=)``,
        ``hapo_ops.distributed``), never the logits. Backward: the weight and bias gradients
        are this shard's slice of the unsharded ones; the hidden gradient is all-reduced (SUM
        over ``tp_group``, N·D values, in fp32) so that every rank gets the full gradient
        Σ_r dz_r · W_r. The upstream gradients must be the same on every rank (a replicated
        loss), and ``hidden`` must require grad on all ranks or on none.
      vocab_start: the global id of this shard's first row (int or 0-d integer tensor);
        default: derived from an all-gather of the shard sizes (one tiny collective per call).
    Returns:
      (logprobs, entropy) float32 of shape hidden.shape[:-1], differentiable with respect to
      hidden, weight and bias (gradients in their dtypes).
    """
    hidden = check_tensor("hidden", hidden, floating=True)
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
    _check_same_device("weight", weight, hidden)
    vocab = weight.shape[0]
    if bias is not None:
        bias = check_tensor("bias", bias, floating=True)
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must have shape (V,) = ({vocab},), got {tuple(bias.shape)}")
        _check_same_device("bias", bias, hidden)
    token_shape = hidden.shape[:-1]
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    fp32_precision = check_choice("fp32_precision", fp32_precision, FP32_PRECISIONS)
    if tp_group is not None:
        from hapo_ops.distributed import check_tp_group
        check_tp_group(tp_group)
    elif vocab_start is not None:
        raise ValueError("vocab_start is only meaningful with tp_group; got tp_group=None")
    check_values = checks_values(hidden, validate)
    labels = check_token_labels(labels, token_shape, vocab, ignore_index, hidden.device,
                                source="hidden", check_range=check_values and tp_group is None)
    t_tensor, t_scalar = prepare_temperature(temperature, token_shape, hidden.device,
                                             source="hidden", check_values=check_values)
    impl = resolve_impl(impl, hidden)
    if impl == "triton":
        _check_triton_device(hidden)
        if hidden.dtype not in TRITON_DTYPES:
            raise TypeError(f"impl='triton' takes hidden of dtype float16, bfloat16 or float32, "
                            f"got {hidden.dtype}")

    flat_hidden = hidden.reshape(-1, dim)
    if flat_hidden.numel() and flat_hidden.stride(-1) != 1:
        flat_hidden = flat_hidden.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    flat_labels = labels.reshape(-1).contiguous()
    if tp_group is None:
        logp, entropy = _LinearLogprobEntropy.apply(flat_hidden, weight, bias, flat_labels,
                                                    t_tensor, t_scalar, ignore_index, impl,
                                                    fp32_precision)
    else:
        from hapo_ops.distributed import shard_local_labels
        local, has_label = shard_local_labels(flat_labels, vocab, ignore_index, tp_group,
                                              vocab_start)
        logp, entropy = _LinearLogprobEntropy.apply(flat_hidden, weight, bias, local, t_tensor,
                                                    t_scalar, ignore_index, impl,
                                                    fp32_precision, tp_group, flat_labels,
                                                    has_label, check_values)
    return logp.view(token_shape), entropy.view(token_shape)


__all__ = ["linear_logprobs_and_entropy"]
