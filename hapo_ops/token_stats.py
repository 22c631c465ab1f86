"""Per-token log-probability and entropy straight from logits (SPEC §1).

    s = z / T,   state = logsumexp(s),   logp = s_y - state,   H = state - Σ_v softmax(s)_v · s_v.

Exact for near-deterministic rows: with m = max s (at index j), the non-negative sums
    rest = Σ_{v≠j} e^(s_v - m)   and   a = Σ_v e^(s_v - m)(m - s_v)
give  H = log1p(rest) + a / (1 + rest)  and  logp = (s_y - m) - log1p(rest),
with no subtraction of nearly equal numbers (``state - E[s]`` loses everything in fp32 when
H < 1e-6). Gradients:
    ∂logp/∂z_v = (1[v=y] - p_v) / T,    ∂H/∂z_v = -p_v (log p_v + H) / T.

Two implementations share this contract: ``impl="torch"`` (row-chunked PyTorch, bounded
memory, any device) and ``impl="triton"`` (fused kernels in ``hapo_ops.kernels``; one read of
the logits forward, one read and one write backward). ``impl="auto"`` takes Triton on CUDA.
Both run inside the ``hapo_ops::logprobs_entropy`` custom op, so ``torch.compile`` traces
through them without a graph break. With ``tp_group`` the logits are one vocabulary shard and
the per-row sums are combined across ranks (``hapo_ops.distributed``; not traced by compile).
"""

from __future__ import annotations

import os

import torch

from hapo_ops._validation import check_choice, check_float, check_tensor

IMPLS = ("auto", "torch", "triton")
# Rows per chunk of the torch path: about this many logits at a time (16 MB per fp32 temp).
TORCH_CHUNK_ELEMENTS = 1 << 22
# Stand-in for -inf inside the sums: keeps every product finite (0 · 1e30 = 0) while
# e^(-1e30 - m) is exactly 0 for any real logit.
NEG_LARGE = -1.0e30


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, logits: torch.Tensor) -> str:
    impl = check_choice("impl", impl, IMPLS)
    if impl == "auto":
        return "triton" if logits.is_cuda and triton_available() else "torch"
    return impl


# ---------------------------------------------------------------------------------------
# Torch path: row chunks, each with the exact (rest, a) sums of the module docstring.
# ---------------------------------------------------------------------------------------

def _scaled(rows: torch.Tensor, inv_temperature: torch.Tensor) -> torch.Tensor:
    return rows.to(torch.float32) * inv_temperature[:, None]


def torch_forward(logits_2d: torch.Tensor, labels: torch.Tensor, inv_temperature: torch.Tensor,
                  ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, H, state) from (N, V) logits, chunk by chunk over rows.

    logp, H: (N,) float32; state: (N, 2) float32 = (max of z/T, log1p(rest)), what the
    backward needs to rebuild log p_v = (s_v - max) - log1p(rest) without rounding a large state.
    """
    n_rows, vocab = logits_2d.shape
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits_2d.device)
    entropy = torch.empty_like(logp)
    state = torch.empty((n_rows, 2), dtype=torch.float32, device=logits_2d.device)
    step = max(1, TORCH_CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        s = _scaled(logits_2d[start:stop], inv_temperature[start:stop])
        row_max, rest, spread = _row_statistics(s)
        log_norm = torch.log1p(rest)
        entropy[start:stop] = log_norm + spread / (1.0 + rest)
        state[start:stop, 0] = row_max
        state[start:stop, 1] = log_norm
        logp[start:stop] = (_label_logit(s, labels[start:stop]) - row_max) - log_norm
    return _finish_logp(logp, labels, vocab, ignore_index), entropy, state


def _row_statistics(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, rest, spread) per row of scaled logits s (n, V), the sums of the module docstring:
    m = max_v s_v (at the first argmax j), rest = Σ_{v≠j} e^(s_v - m), spread = Σ_v e^(s_v - m)(m - s_v)."""
    row_max, argmax = s.max(-1, keepdim=True)
    shifted = (row_max - s.clamp_min(NEG_LARGE))              # ≥ 0, finite
    weights = torch.exp(-shifted)
    rest = weights.scatter(-1, argmax, 0.0).sum(-1)
    spread = (weights * shifted).sum(-1)
    return row_max[:, 0], rest, spread


def _label_logit(s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """s_y per row, read at the label clamped into [0, V) (the caller masks other labels)."""
    safe = labels.clamp(0, s.shape[-1] - 1)[:, None]
    return s.gather(-1, safe)[:, 0]


# Column order of the per-row statistics ``row_statistics`` returns.
ROW_MAX, ROW_REST, ROW_SPREAD, ROW_LABEL = range(4)


def torch_row_statistics(logits_2d: torch.Tensor, labels: torch.Tensor,
                         inv_temperature: torch.Tensor) -> torch.Tensor:
    """(N, 4) float32 [m, rest, spread, s_y] per row in natural units (see ``row_statistics``)."""
    n_rows, _ = logits_2d.shape
    out = torch.empty((n_rows, 4), dtype=torch.float32, device=logits_2d.device)
    step = max(1, TORCH_CHUNK_ELEMENTS // max(logits_2d.shape[-1], 1))
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        s = _scaled(logits_2d[start:stop], inv_temperature[start:stop])
        row_max, rest, spread = _row_statistics(s)
        # A row with no finite logit (possible in one vocabulary shard) holds no mass: give it
        # finite statistics at the -inf stand-in so that its weight e^(m - M) is exactly 0.
        empty = row_max <= NEG_LARGE
        out[start:stop, ROW_MAX] = row_max.clamp_min(NEG_LARGE)
        out[start:stop, ROW_REST] = torch.where(empty, 0.0, rest)
        out[start:stop, ROW_SPREAD] = torch.where(empty, 0.0, spread)
        out[start:stop, ROW_LABEL] = _label_logit(s, labels[start:stop])
    return out


def _finish_logp(logp: torch.Tensor, labels: torch.Tensor, vocab: int,
                 ignore_index: int) -> torch.Tensor:
    """0 where ignored, NaN where the label is outside [0, V)."""
    in_range = (labels >= 0) & (labels < vocab)
    logp = torch.where(in_range, logp, torch.full_like(logp, float("nan")))
    return torch.where(labels == ignore_index, torch.zeros_like(logp), logp)


def torch_backward(logits_2d: torch.Tensor, labels: torch.Tensor, inv_temperature: torch.Tensor,
                   state: torch.Tensor, entropy: torch.Tensor, grad_logp: torch.Tensor | None,
                   grad_entropy: torch.Tensor | None, ignore_index: int,
                   out: torch.Tensor, sharded: bool = False) -> torch.Tensor:
    """Writes ∂L/∂z into ``out`` (N, V) (may be ``logits_2d`` itself) chunk by chunk.

    ``sharded``: the rows are one vocabulary shard and ``grad_logp`` is already zero where
    the logp has no gradient; -g_lp·p_v applies to every row, +g_lp at the label only where
    the (shard-local) label lies in [0, V).
    """
    n_rows, vocab = logits_2d.shape
    step = max(1, TORCH_CHUNK_ELEMENTS // max(vocab, 1))
    in_shard = (labels >= 0) & (labels < vocab)
    label_ok = in_shard if sharded else in_shard & (labels != ignore_index)
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        inv_t = inv_temperature[start:stop, None]
        s = _scaled(logits_2d[start:stop], inv_temperature[start:stop])
        log_p = (s - state[start:stop, :1]) - state[start:stop, 1:]
        p = log_p.exp()
        grad = torch.zeros_like(p)
        if grad_entropy is not None:
            term = torch.where(p > 0, p * (log_p + entropy[start:stop, None]), 0.0)
            grad -= grad_entropy[start:stop, None] * term
        if grad_logp is not None:
            g = grad_logp[start:stop, None]
            g_label = torch.where(label_ok[start:stop, None], g, 0.0)
            grad -= (g if sharded else g_label) * p
            safe = labels[start:stop].clamp(0, vocab - 1)[:, None]
            grad.scatter_add_(-1, safe, g_label)
        out[start:stop] = grad * inv_t
    return out


# ---------------------------------------------------------------------------------------
# Custom ops: one autograd home for both implementations, visible to torch.compile.
# ---------------------------------------------------------------------------------------

def _check_triton_device(logits: torch.Tensor) -> None:
    if not logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                         f"triton is imported to interpret on {logits.device}; got impl='triton'")


def inv_temperature(temperature: torch.Tensor | None, scalar_temperature: float, n_rows: int,
                    device: torch.device) -> torch.Tensor:
    """1/T per row as float32 (N,), from the per-token tensor or the scalar."""
    if temperature is None:
        return torch.full((n_rows,), 1.0 / scalar_temperature, dtype=torch.float32, device=device)
    return 1.0 / temperature


@torch.library.custom_op("hapo_ops::logprobs_entropy", mutates_args=())
def _logprobs_entropy_op(logits: torch.Tensor, labels: torch.Tensor,
                         temperature: torch.Tensor | None, scalar_temperature: float,
                         ignore_index: int, impl: str, inplace_backward: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    token_shape = logits.shape[:-1]
    if impl == "triton":
        from hapo_ops.kernels.logprob_entropy import logprob_entropy_forward
        logp, entropy, state = logprob_entropy_forward(logits, labels, temperature,
                                                       scalar_temperature, ignore_index)
    else:
        logits_2d = logits.reshape(-1, logits.shape[-1])
        inv_t = inv_temperature(temperature, scalar_temperature, labels.numel(), logits.device)
        logp, entropy, state = torch_forward(logits_2d, labels, inv_t, ignore_index)
    return logp.view(token_shape), entropy.view(token_shape), state


@_logprobs_entropy_op.register_fake
def _(logits, labels, temperature, scalar_temperature, ignore_index, impl, inplace_backward):
    token_shape = logits.shape[:-1]
    new = logits.new_empty
    return (new(token_shape, dtype=torch.float32), new(token_shape, dtype=torch.float32),
            new((labels.numel(), 2), dtype=torch.float32))


def row_statistics(logits: torch.Tensor, labels: torch.Tensor, temperature: torch.Tensor | None,
                   scalar_temperature: float, impl: str) -> tuple[torch.Tensor, float]:
    """Per-row sums of the module docstring, before they are turned into logp and H:
    (stats, unit), stats (N, 4) float32 with columns [m, rest, spread, s_y] (``ROW_*``):
    m = max_v s_v, rest = Σ_{v≠argmax} e^(s_v - m), spread = Σ e^(s_v - m)(m - s_v), s_y
    the scaled label logit (meaningful where 0 ≤ label < V). m, spread and s_y are in units
    of ``unit`` nats (1 for the torch path, ln 2 for the Triton kernel, which works in log2):
    H = log1p(rest) + unit·spread/(1 + rest), logp = unit·(s_y - m) - log1p(rest).

    A row with no finite logit gets m = -1e30 (finite, so that e^(m - M) = 0 for any real M).
    Used to combine vocabulary shards (``hapo_ops.distributed``).
    """
    if impl == "triton":
        from hapo_ops.kernels.logprob_entropy import LN2, logprob_entropy_row_stats
        return logprob_entropy_row_stats(logits, labels, temperature, scalar_temperature), LN2
    logits_2d = logits.reshape(-1, logits.shape[-1])
    inv_t = inv_temperature(temperature, scalar_temperature, labels.numel(), logits.device)
    return torch_row_statistics(logits_2d, labels, inv_t), 1.0


def _backward_impl(logits, labels, temperature, scalar_temperature, state, entropy, grad_logp,
                   grad_entropy, ignore_index, impl, inplace, sharded=False):
    if impl == "triton":
        from hapo_ops.kernels.logprob_entropy import logprob_entropy_backward
        return logprob_entropy_backward(logits, labels, temperature, scalar_temperature, state,
                                        entropy, grad_logp, grad_entropy, ignore_index,
                                        inplace=inplace, sharded=sharded)
    logits_2d = logits.view(-1, logits.shape[-1]) if inplace else logits.reshape(-1, logits.shape[-1])
    out = logits_2d if inplace else torch.empty(logits_2d.shape, dtype=logits.dtype,
                                                device=logits.device)
    inv_t = inv_temperature(temperature, scalar_temperature, labels.numel(), logits.device)
    torch_backward(logits_2d, labels, inv_t, state, entropy, grad_logp, grad_entropy,
                   ignore_index, out, sharded=sharded)
    return out.view(logits.shape)


@torch.library.custom_op("hapo_ops::logprobs_entropy_backward", mutates_args=())
def _logprobs_entropy_backward_op(logits: torch.Tensor, labels: torch.Tensor,
                                  temperature: torch.Tensor | None, scalar_temperature: float,
                                  state: torch.Tensor, entropy: torch.Tensor,
                                  grad_logp: torch.Tensor | None,
                                  grad_entropy: torch.Tensor | None, ignore_index: int,
                                  impl: str) -> torch.Tensor:
    return _backward_impl(logits, labels, temperature, scalar_temperature, state, entropy,
                          grad_logp, grad_entropy, ignore_index, impl, inplace=False)


@_logprobs_entropy_backward_op.register_fake
def _(logits, labels, temperature, scalar_temperature, state, entropy, grad_logp, grad_entropy,
      ignore_index, impl):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("hapo_ops::logprobs_entropy_backward_", mutates_args=("logits",))
def _logprobs_entropy_backward_inplace_op(logits: torch.Tensor, labels: torch.Tensor,
                                          temperature: torch.Tensor | None,
                                          scalar_temperature: float, state: torch.Tensor,
                                          entropy: torch.Tensor, grad_logp: torch.Tensor | None,
                                          grad_entropy: torch.Tensor | None, ignore_index: int,
                                          impl: str) -> None:
    _backward_impl(logits, labels, temperature, scalar_temperature, state, entropy, grad_logp,
                   grad_entropy, ignore_index, impl, inplace=True)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, scalar_temperature, ignore_index, impl, inplace = inputs
    _, entropy, state = output
    ctx.save_for_backward(logits, labels, temperature, state, entropy)
    ctx.scalar_temperature, ctx.ignore_index = scalar_temperature, ignore_index
    ctx.impl, ctx.inplace = impl, inplace
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(state)


def _flat_grad(grad: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.reshape(-1).to(torch.float32).contiguous()


def _backward(ctx, grad_logp, grad_entropy, grad_state):
    logits, labels, temperature, state, entropy = ctx.saved_tensors
    grad_logp, grad_entropy = _flat_grad(grad_logp), _flat_grad(grad_entropy)
    if grad_logp is None and grad_entropy is None:
        return (None,) * 7
    args = (logits, labels, temperature, ctx.scalar_temperature, state, entropy.reshape(-1),
            grad_logp, grad_entropy, ctx.ignore_index, ctx.impl)
    if ctx.inplace:
        _logprobs_entropy_backward_inplace_op(*args)
        grad = logits
    else:
        grad = _logprobs_entropy_backward_op(*args)
    return grad, None, None, None, None, None, None


_logprobs_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def checks_values(logits: torch.Tensor, validate: bool) -> bool:
    """Whether value checks (a host read) run: free on CPU, opt-in elsewhere, and skipped
    while torch.compile traces (a data-dependent branch would break the graph)."""
    return (validate or logits.device.type == "cpu") and not torch.compiler.is_compiling()


def check_token_labels(labels: object, token_shape: torch.Size, vocab: int, ignore_index: int,
                       device: torch.device, *, source: str, check_range: bool) -> torch.Tensor:
    """Labels of shape ``source.shape[:-1]`` on ``device``; with ``check_range`` (a host read),
    every label in [0, vocab) or equal to ignore_index."""
    labels = check_tensor("labels", labels, integer=True)
    if labels.shape != token_shape:
        raise ValueError(f"labels must have shape {source}.shape[:-1] = {tuple(token_shape)}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the device of {source} ({device}), "
                         f"got {labels.device}")
    if check_range:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index="
                             f"{ignore_index}; found {int(bad.sum())} outside")
    return labels


def prepare_temperature(temperature: float | torch.Tensor, token_shape: torch.Size,
                        device: torch.device, *, source: str, check_values: bool
                        ) -> tuple[torch.Tensor | None, float]:
    """(per-token T as flat contiguous float32, or None; the scalar T otherwise).

    A tensor must broadcast to the token shape; with ``check_values`` (a host read) it must
    be finite and > 0 everywhere. No gradient flows to it.
    """
    if not isinstance(temperature, torch.Tensor):
        return None, check_float("temperature", temperature, min_value=0.0, min_inclusive=False)
    if not temperature.is_floating_point():
        raise TypeError(f"temperature must be a float or a floating-point tensor, "
                        f"got dtype {temperature.dtype}")
    if temperature.device != device:
        raise ValueError(f"temperature must be on the device of {source} ({device}), "
                         f"got {temperature.device}")
    try:
        expanded = temperature.expand(token_shape)
    except RuntimeError:
        raise ValueError(f"temperature of shape {tuple(temperature.shape)} does not broadcast "
                         f"to the token shape {tuple(token_shape)}") from None
    flat = expanded.detach().reshape(-1).to(torch.float32).contiguous()
    if check_values and not bool(((flat > 0) & torch.isfinite(flat)).all()):
        raise ValueError("temperature must be finite and > 0 at every token")
    return flat, 1.0


def _prepare(logits: torch.Tensor, labels: torch.Tensor | None, temperature: float | torch.Tensor,
             ignore_index: int, impl: str, validate: bool, check_label_range: bool = True):
    logits = check_tensor("logits", logits, floating=True)
    if logits.dim() < 1:
        raise ValueError("logits must have shape (..., V), got a 0-d tensor")
    vocab = logits.shape[-1]
    token_shape = logits.shape[:-1]
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if labels is None:
        labels = torch.full(token_shape, ignore_index, dtype=torch.int64, device=logits.device)
    check_values = checks_values(logits, validate)
    labels = check_token_labels(labels, token_shape, vocab, ignore_index, logits.device,
                                source="logits", check_range=check_values and check_label_range)
    tensor_temperature, scalar_temperature = prepare_temperature(
        temperature, token_shape, logits.device, source="logits", check_values=check_values)
    impl = resolve_impl(impl, logits)
    if impl == "triton":
        _check_triton_device(logits)
    return logits, labels.reshape(-1).contiguous(), tensor_temperature, scalar_temperature, impl


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, *,
                         temperature: float | torch.Tensor = 1.0, ignore_index: int = -100,
                         impl: str = "auto", inplace_backward: bool = False,
                         validate: bool = False, tp_group=None,
                         vocab_start: int | torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of ``labels`` and Shannon entropy (nats) of softmax(logits / T).

    logp = z_y/T - logsumexp(z/T);  H = logsumexp(z/T) - Σ_v softmax(z/T)_v · z_v/T.

    Args:
      logits: (..., V), any float dtype, any leading shape; the last dim should be contiguous.
      labels: (...) integer token ids. Positions equal to ``ignore_index`` give logp 0 and no
        logp gradient (their entropy is still computed). Labels outside [0, V) raise on CPU
        and with ``validate=True``; otherwise their logp is NaN (never an out-of-bounds read).
      temperature: a float, or a tensor broadcastable to the token shape (per-token T). No
        gradient flows to it.
      impl: "auto" (Triton on CUDA, else torch), "torch" or "triton".
      inplace_backward: write ∂L/∂logits into the logits buffer instead of a new N×V tensor.
        Safe only when nothing else reads these logits after this op's backward (the usual
        ``logits = lm_head(h)`` → this op); autograd raises if another op saved them.
      tp_group: a ``torch.distributed`` process group over which the vocabulary is split
        (tensor parallel): ``logits`` is then this rank's contiguous slice of the vocabulary,
        in rank order (slices may differ in size), and ``labels`` are global token ids.
        Results and gradients equal the unsharded op's; each call all-reduces 6 float32
        values per token (see ``hapo_ops.distributed``), never the logits. The upstream
        gradients must be the same on every rank of the group (a replicated loss).
      vocab_start: the global id of this shard's first entry (int or 0-d integer tensor).
        Default: derived from an all-gather of the shard sizes, one tiny extra collective
        per call; pass it to save that.
    Returns:
      (logprobs, entropy), float32, shape logits.shape[:-1]. Both are differentiable.
    """
    if tp_group is not None:
        from hapo_ops.distributed import vocab_parallel_logprobs_and_entropy
        return vocab_parallel_logprobs_and_entropy(
            logits, labels, tp_group, vocab_start=vocab_start, temperature=temperature,
            ignore_index=ignore_index, impl=impl, inplace_backward=inplace_backward,
            validate=validate)
    if vocab_start is not None:
        raise ValueError("vocab_start is only meaningful with tp_group; got tp_group=None")
    logits, flat_labels, t_tensor, t_scalar, impl = _prepare(logits, labels, temperature,
                                                             ignore_index, impl, validate)
    logp, entropy, _ = _logprobs_entropy_op(logits, flat_labels, t_tensor, t_scalar,
                                            ignore_index, impl, bool(inplace_backward))
    return logp, entropy


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *,
                   temperature: float | torch.Tensor = 1.0, ignore_index: int = -100,
                   impl: str = "auto", inplace_backward: bool = False,
                   validate: bool = False, tp_group=None,
                   vocab_start: int | torch.Tensor | None = None) -> torch.Tensor:
    """logp = z_y/T - logsumexp(z/T) per token (see :func:`logprobs_and_entropy`)."""
    return logprobs_and_entropy(logits, labels, temperature=temperature,
                                ignore_index=ignore_index, impl=impl,
                                inplace_backward=inplace_backward, validate=validate,
                                tp_group=tp_group, vocab_start=vocab_start)[0]


def token_entropy(logits: torch.Tensor, *, temperature: float | torch.Tensor = 1.0,
                  impl: str = "auto", inplace_backward: bool = False, tp_group=None,
                  vocab_start: int | torch.Tensor | None = None) -> torch.Tensor:
    """H = logsumexp(z/T) - Σ_v softmax(z/T)_v · z_v/T per token, float32, exact for H ≪ 1e-6
    (see :func:`logprobs_and_entropy`; ``tp_group`` for a vocabulary-parallel shard)."""
    return logprobs_and_entropy(logits, None, temperature=temperature, impl=impl,
                                inplace_backward=inplace_backward, tp_group=tp_group,
                                vocab_start=vocab_start)[1]
