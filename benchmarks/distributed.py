"""Communication of the distributed ops: bytes per call, against gathering everything.

Bytes are the payload each rank contributes to its collectives per call (the message sizes;
a ring all-reduce puts about 2·(W-1)/W times that on each rank's link), counted by
wrapping ``torch.distributed.all_reduce`` / ``all_gather`` around the real op. The message
sizes do not depend on the world size, so one process group of size 1 (gloo) counts them.

Cases
  tp: ``logprobs_and_entropy(shard, labels, tp_group=...)`` at N = 16384 tokens, with and
      without ``vocab_start`` (without: one extra all-gather of one int per rank). The
      counted bytes do not depend on the shard width (a small one is run); the alternative,
      all-gathering the logits, moves N·V·2 bytes (bf16, V = 151936).
  quantile: ``entropy_stats`` over 100M tokens (10M with --quick, 1M with --smoke) split over
      8 ranks simulated by 8 threads in lock-step (each histogram round sums the 8 ranks'
      histograms), checked bitwise against the single-process result; the alternative,
      all-gathering every value, moves 4 bytes per token.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from benchmarks.common import Result, TimingConfig, log, short_error

TP_TOKENS = 16384
TP_VOCAB = 151936
TP_SHARD = 1024            # the shard run here; the bytes do not depend on it
SIM_RANKS = 8


@contextlib.contextmanager
def count_collective_bytes() -> Iterator[list[int]]:
    """Within the block, [bytes, calls] of every all_reduce / all_gather payload."""
    counter = [0, 0]
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}

    def wrap(name: str, payload: Callable[..., torch.Tensor]):
        def counted(*args, **kwargs):
            tensor = payload(*args, **kwargs)
            counter[0] += tensor.numel() * tensor.element_size()
            counter[1] += 1
            return originals[name](*args, **kwargs)
        return counted

    dist.all_reduce = wrap("all_reduce", lambda tensor, *a, **k: tensor)
    dist.all_gather = wrap("all_gather", lambda tensor_list, tensor, *a, **k: tensor)
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


@contextlib.contextmanager
def single_process_group(device: torch.device) -> Iterator[dist.ProcessGroup]:
    """A process group of size 1, NCCL on CUDA and gloo on CPU (the default group if none
    exists yet)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        yield dist.new_group([dist.get_rank()], backend=backend)
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{os.path.join(tmp, 'init')}",
                                rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


def _row(name: str, shape: list[int], nbytes: int | None, baseline: int, note: str,
         status: str = "ok") -> Result:
    result = Result(suite="distributed", name=name, mode="per call", dtype="", shape=shape,
                    status=status, bytes_moved=nbytes)
    if nbytes:
        note = (f"{note}; gathering everything: {baseline / 2**20:,.1f} MiB "
                f"({baseline / nbytes:,.0f}× more)")
    result.note = note
    return result


def tp_rows(group: dist.ProcessGroup, device: torch.device) -> list[Result]:
    import hapo_ops

    g = torch.Generator(device=device).manual_seed(0)
    shard = torch.randn(TP_TOKENS, TP_SHARD, device=device, generator=g).to(torch.bfloat16)
    shard.requires_grad_(True)
    labels = torch.randint(0, TP_SHARD, (TP_TOKENS,), device=device, generator=g)
    baseline = TP_TOKENS * TP_VOCAB * 2
    rows = []
    for name, start in (("tp logprobs_and_entropy, vocab_start given", 0),
                        ("tp logprobs_and_entropy, vocab_start derived", None)):
        with count_collective_bytes() as counter:
            logp, entropy = hapo_ops.logprobs_and_entropy(shard, labels, tp_group=group,
                                                          vocab_start=start)
            (logp + entropy).sum().backward()
        rows.append(_row(name, [TP_TOKENS, TP_VOCAB], counter[0], baseline,
                         f"{counter[1]} collectives, forward + backward "
                         f"({counter[0] / TP_TOKENS:g} B/token)"))
    return rows


class SimulatedRanks:
    """``world`` threads in lock-step standing in for ranks: ``reducer(rank, op)`` returns a
    hook that combines the tensors all ranks pass in the same round with ``op``."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.bytes = 0

    def reducer(self, rank: int, op: Callable[[torch.Tensor], torch.Tensor]):
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = tensor
            self.barrier.wait()
            out = op(torch.stack(self.slots))       # type: ignore[arg-type]
            if rank == 0:
                self.bytes += tensor.numel() * tensor.element_size()
            self.barrier.wait()
            return out
        return reduce


def quantile_row(device: torch.device, tokens: int) -> Result:
    import hapo_ops

    g = torch.Generator(device=device).manual_seed(0)
    # Mostly near-deterministic tokens, as in RL: ln H ~ N(-12, 3), a third around 0.2 nats.
    entropy = torch.exp(torch.randn(tokens, device=device, generator=g) * 3.0 - 12.0)
    mask = torch.rand(tokens, device=device, generator=g) < 0.9
    bounds = torch.linspace(0, tokens, SIM_RANKS + 1).round().long().tolist()
    ranks = SimulatedRanks(SIM_RANKS)
    outputs: list[object] = [None] * SIM_RANKS

    def rank_main(rank: int) -> None:
        piece = slice(bounds[rank], bounds[rank + 1])
        try:
            outputs[rank] = hapo_ops.entropy_stats(
                entropy[piece], mask[piece],
                reduce_counts=ranks.reducer(rank, lambda t: t.sum(0)),
                reduce_extrema=ranks.reducer(rank, lambda t: t.amax(0)))
        except BaseException as exc:  # noqa: BLE001
            outputs[rank] = exc
            ranks.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(SIM_RANKS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    errors = [o for o in outputs if isinstance(o, BaseException)]
    if errors:
        raise errors[0]
    single = hapo_ops.entropy_stats(entropy, mask)
    exact = all(all(torch.equal(a, b) for a, b in zip(o, single)) for o in outputs)
    return _row(f"entropy_stats over {SIM_RANKS} simulated ranks", [tokens, SIM_RANKS],
                ranks.bytes, 4 * tokens,
                f"{'bitwise equal to' if exact else 'DIFFERS from'} the single-process result; "
                f"{elapsed:.1f} s for the {SIM_RANKS} threads",
                status="ok" if exact else "error")


def run(device: torch.device, config: TimingConfig, results: list[Result], *, quick: bool,
        smoke: bool, deadline: float = math.inf) -> None:
    """Append the TP and distributed-quantile rows to ``results`` (``config`` unused: these
    are byte counts, not timings)."""
    tokens = 1_000_000 if smoke else 10_000_000 if quick else 100_000_000
    cases: list[tuple[str, Callable[[], list[Result]]]] = [
        ("tp", lambda: _with_group(device)),
        ("quantile", lambda: [quantile_row(device, tokens)]),
    ]
    for name, case in cases:
        if time.monotonic() > deadline:
            results.append(_row(name, [], None, 0, "time budget spent", status="skipped"))
            continue
        log(f"distributed: {name}")
        try:
            results.extend(case())
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            results.append(_row(name, [], None, 0, short_error(exc), status="error"))


def _with_group(device: torch.device) -> list[Result]:
    if not dist.is_available():
        return [_row("tp", [], None, 0, "torch.distributed unavailable", status="skipped")]
    with single_process_group(device) as group:
        return tp_rows(group, device)
