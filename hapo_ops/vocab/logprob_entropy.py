"""Per-token log-probability and entropy straight from logits, whole or one vocabulary shard,
of softmax(z/T) or of its truncation to the tokens a rollout engine kept.

    logp = z_y/T - logsumexp(z/T),   H = logsumexp(z/T) - Σ_v softmax(z/T)_v · z_v/T,
    ∂logp/∂z_v = (1[v=y] - p_v)/T,   ∂H/∂z_v = -p_v (log p_v + H)/T.

This module checks the arguments and picks the two choices of
``hapo_ops.vocab.subset_statistics``, the one autograd home of every variant: the subset of
the vocabulary (every entry, the entries above a top-k/top-p threshold of
``hapo_ops.vocab.truncation``, or the engine's kept ids) and how the parts of the
vocabulary combine (whole, or a tensor-parallel shard all-reduced over ``tp_group``). Both
paths, ``impl="torch"`` (blocks of rows in PyTorch, bounded memory, any device) and
``impl="triton"`` (``hapo_ops.kernels.logprob_entropy``: one read of the logits forward, one
read and one write backward), share the per-row statistics of
``hapo_ops.vocab.row_statistics`` (exact for near-deterministic rows, where
``logsumexp - E[z/T]`` cancels in fp32).
"""

from __future__ import annotations

import torch

from hapo_ops._utils.collectives import ProcessGroup, check_process_group
from hapo_ops.vocab.row_statistics import shard_labels
from hapo_ops.vocab.subset_statistics import default_chunk_tokens, subset_logprobs_and_entropy
from hapo_ops.vocab.token_inputs import (check_chunk, check_ignore_index, check_logits,
                                         check_token_labels, checks_values,
                                         prepare_temperature, resolve_impl, shard_vocab_start)
from hapo_ops.vocab.truncation import (check_kept_ids, check_top_k, check_top_p,
                                       shard_kept_ids, truncates, truncation_threshold)


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
      logits: (..., V), any float dtype, any leading shape (an empty batch, e.g. (0, V),
        gives empty results and an empty gradient; V must be ≥ 1); any strides (a contiguous
        last dim is fastest). Math in float32. -inf entries have probability 0 (a label there
        has logp -inf and autograd's gradient of log softmax, (1[v = y] - p_v)/T, 1/T at the
        label; a label outside a truncated distribution's kept set has none); +inf entries share all the mass
        (the limit of those logits growing together: one +inf entry gives logp 0 there,
        -inf elsewhere, and H = 0); a NaN logit makes its row's results NaN; a row with no
        finite or +inf entry has no distribution and gives NaN.
      labels: (...) token ids of any integer dtype, or None (entropy only). Positions equal to
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
        On a CPU each block's ops run on one thread and the blocks are spread over
        ``torch.get_num_threads()`` threads (a batch of fewer blocks than threads is cut
        into one block per thread): no per-op thread barrier, which keeps the path fast on
        busy cores, and bitwise the same results for any thread count and batch layout.
      kept_ids: (..., K) integer token ids the rollout kept at each position (after its
        top-k/top-p), padded with -1 (any negative id is padding): the replay of the
        distribution the engine actually sampled from. Duplicate ids count once. Ids ≥ V
        raise on CPU and with ``validate=True``, otherwise they are ignored. A position
        whose kept set is empty has no distribution: logp and H are NaN (logp 0 where the
        label is ignored) and its gradient is 0. Reads O(N·K) logits (one gather, one
        scatter in backward); both impls use this torch gather path (the N·K arithmetic is
        negligible and the backward's N×V zero-fill is a memset a kernel could not beat).
        Under ``tp_group`` the ids are global and each shard gathers those it holds; a label
        held by no shard follows the ``labels`` rule (NaN, or an error where checked).
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
    logits = check_logits("logits", logits)
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
    if kept_ids is not None:
        if truncated:
            raise ValueError("pass kept_ids (the engine's kept sets) or top_k/top_p (recompute "
                             "them), not both")
        kept_ids = check_kept_ids(kept_ids, token_shape, vocab, logits.device,
                                  check_range=check_values and tp_group is None)
    if tp_group is None:
        if vocab_start is not None:
            raise ValueError("vocab_start is only meaningful with tp_group; got tp_group=None")
        start = 0
    else:
        check_process_group("tp_group", tp_group, optional=False)
        # With no labels and no kept ids no shard needs its offset.
        start = (0 if no_labels and kept_ids is None
                 else shard_vocab_start(vocab_start, vocab, tp_group, logits.device))
    local_labels, _ = shard_labels(flat_labels, vocab, ignore_index, start)
    if kept_ids is not None:
        kept_ids = shard_kept_ids(kept_ids, vocab, start)
    threshold = None
    if truncated:
        threshold = truncation_threshold(logits, t_tensor, t_scalar, top_k, top_p, impl,
                                         chunk_tokens, tp_group)
    return subset_logprobs_and_entropy(
        logits, flat_labels, local_labels, t_tensor, t_scalar, ignore_index, impl,
        inplace_backward, chunk_tokens, threshold=threshold, kept_ids=kept_ids, group=tp_group,
        check_found=check_values and not no_labels)


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


__all__ = ["logprobs_and_entropy", "token_entropy", "token_logprobs",
           "vocab_parallel_logprobs_and_entropy"]
