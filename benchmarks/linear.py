"""Fused LM head + log-prob + entropy (``hapo_ops.linear_logprobs_and_entropy``) against the
unfused path and Liger-Kernel.

Implementations
  hapo-fused-triton  linear_logprobs_and_entropy(h, W, y, impl="triton"): no N×V tensor
  hapo-fused-torch   the chunked PyTorch path (impl="torch"); on CUDA at the target shape only
  unfused            logits = h @ Wᵀ (cuBLAS, or the CPU BLAS) + hapo_ops.logprobs_and_entropy
                     (our logits kernel on CUDA, the torch path on CPU): one N×V logits tensor
                     and, with backward, one N×V logits gradient
  liger-flce         Liger-Kernel's LigerFusedLinearCrossEntropyLoss(reduction="none"):
                     log-prob only (no entropy), CUDA, when installed
  matmul             the matrix products alone (CUDA): forward h @ Wᵀ; forward+backward that
                     and the two backward products dz @ W and dzᵀ @ h (no softmax work): the
                     floor of any LM head, fused or not

Every row's baseline is ``unfused`` at the same shape and mode (the report gives the time
and memory ratios to it, and on CUDA the time ratio to ``matmul``).

CUDA: the grid N ∈ {8192, 16384} × D ∈ {2048, 4096} × V ∈ {128256, 151936} in bf16
(and the target shape in fp32), forward and forward+backward (gradients of h and W).
Target: fused ≤ 1.3× the time of ``unfused`` with no N×V allocation ("peak MB").
CPU: one small fp32 shape (N=2048, D=256, V=32000) for the memory comparison; the N×V
logits there are 250 MiB (noted on each row), the fused path's chunks 2 × 32 MiB. The
fused torch path recomputes the logits in backward (one more matmul); unfused pays for the
torch logits path's elementwise backward over the whole N×V tensor instead.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import (Result, TimingConfig, log, measure, release_memory, short_error,
                               total_memory_bytes)

FORWARD = "forward"
FWD_BWD = "forward+backward"
MEMORY_FRACTION = 0.5  # skip shapes whose unfused logits + gradient exceed this share

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


@dataclasses.dataclass(frozen=True)
class Shape:
    dtype: torch.dtype
    n: int
    d: int
    v: int

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def logits_bytes(self) -> int:
        return self.n * self.v * self.itemsize

    def label(self) -> str:
        return f"{dtype_name(self.dtype)} N={self.n} D={self.d} V={self.v}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- implementations


def fused_fn(impl: str) -> Fn:
    import hapo_ops

    def fn(hidden, weight, labels):
        return hapo_ops.linear_logprobs_and_entropy(hidden, weight, labels, impl=impl)
    return fn


def unfused_fn(hidden, weight, labels):
    import hapo_ops
    return hapo_ops.logprobs_and_entropy(hidden @ weight.T, labels)


def matmul_fn(hidden, weight, labels):
    """The LM head's matrix products alone (what any head must do); outputs unused."""
    return (hidden @ weight.T,)


def matmul_step(mode: str) -> Step:
    """Forward: z = h Wᵀ. Forward+backward: z, then dz @ W and dzᵀ @ h with dz = z (the same
    shapes as the backward products; no autograd, no softmax work)."""
    def forward(hidden, weight, labels):
        with torch.no_grad():
            hidden @ weight.T

    def forward_backward(hidden, weight, labels):
        with torch.no_grad():
            z = hidden @ weight.T
            z @ weight
            z.T @ hidden
    return forward if mode == FORWARD else forward_backward


def liger_import_error() -> str | None:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - optional dependency
        return short_error(exc)
    return None


def liger_fn(hidden, weight, labels):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    out = LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden, labels)
    loss = out[0] if isinstance(out, tuple) else out
    return (-loss,)  # log-prob only


def make_step(fn: Fn, mode: str) -> Step:
    if mode == FORWARD:
        def forward(hidden, weight, labels):
            with torch.no_grad():
                fn(hidden, weight, labels)
        return forward

    def forward_backward(hidden, weight, labels):
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        outputs = fn(h, w, labels)
        torch.autograd.grad(outputs, (h, w), [torch.ones_like(t) for t in outputs])
    return forward_backward


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    fn: Callable[[], Fn]
    modes: tuple[str, ...] = (FORWARD, FWD_BWD)
    note: str = ""
    target_only: bool = False
    step: Callable[[str], Step] | None = None  # instead of make_step(fn(), mode)


def available_impls(device: torch.device, *, smoke: bool) -> list[Impl]:
    unfused_note = ("cuBLAS matmul + hapo logits kernel" if device.type == "cuda"
                    else "matmul + hapo torch path")
    fused_torch_note = ("chunked PyTorch: bounded memory (1024 × 8192 logit chunks, logits "
                        "recomputed in backward)")
    if device.type == "cpu" and not smoke:
        return [Impl("hapo-fused-torch", lambda: fused_fn("torch"), note=fused_torch_note),
                Impl("unfused", lambda: unfused_fn, note=unfused_note)]
    impls = [Impl("hapo-fused-triton", lambda: fused_fn("triton"),
                  note="no N×V tensor; backward dz chunk ≤ 512 MiB"),
             Impl("unfused", lambda: unfused_fn, note=unfused_note),
             Impl("hapo-fused-torch", lambda: fused_fn("torch"), note=fused_torch_note,
                  target_only=True)]
    if device.type == "cuda":
        impls.append(Impl("matmul", lambda: matmul_fn, step=matmul_step,
                          note="cuBLAS products alone: forward h·Wᵀ; with backward also "
                               "dz·W and dzᵀ·h"))
        error = liger_import_error()
        if error is None:
            impls.append(Impl("liger-flce", lambda: liger_fn, note="log-prob only"))
        else:
            log(f"liger-kernel unavailable, skipped: {error}")
    return impls


def make_shapes(device: torch.device, *, quick: bool, smoke: bool) -> tuple[list[Shape], Shape]:
    bf16, fp32 = torch.bfloat16, torch.float32
    if smoke:
        target = Shape(bf16, 40, 24, 300)
        return [target, Shape(fp32, 40, 24, 300)], target
    if device.type == "cpu":
        target = Shape(fp32, 2048, 256, 32000)
        return [target], target
    target = Shape(bf16, 16384, 4096, 151936)
    shapes = [target] + [Shape(bf16, n, d, v) for n in (16384, 8192) for d in (4096, 2048)
                         for v in (151936, 128256) if Shape(bf16, n, d, v) != target]
    if quick:
        shapes = [target, Shape(bf16, 8192, 2048, 128256)]
    return shapes + [Shape(fp32, 16384, 4096, 151936)], target


# --------------------------------------------------------------------------- runs


BASELINE = "unfused"


def _row(shape: Shape, name: str, mode: str, **fields: Any) -> Result:
    return Result(suite="linear", name=name, mode=mode, dtype=dtype_name(shape.dtype),
                  shape=[shape.n, shape.d, shape.v],
                  baseline=None if name == BASELINE else BASELINE, **fields)


def describe(result: Result) -> str:
    head = f"{result.name:<18} {result.dtype:<8} {'x'.join(map(str, result.shape)):<18} " \
           f"{result.mode:<17}"
    if result.status != "ok":
        return f"{head} {result.status}: {result.note}"
    text = f"{head} {result.median_ms:10.3f} ms"
    if result.extra_peak_mb is not None:
        text += f"  +{result.extra_peak_mb:.0f} MB"
    return text


def run(device: torch.device, config: TimingConfig, results: list[Result], *, quick: bool,
        smoke: bool, deadline: float = math.inf) -> None:
    """Append one row per (shape, implementation, mode) to ``results``."""
    shapes, target = make_shapes(device, quick=quick, smoke=smoke)
    impls = available_impls(device, smoke=smoke)
    log(f"linear: {len(shapes)} shapes, impls {[impl.name for impl in impls]}")
    limit = MEMORY_FRACTION * total_memory_bytes(device)
    for shape in shapes:
        cases = [(impl, mode) for impl in impls if not impl.target_only or shape == target
                 for mode in impl.modes]
        why = None
        if time.monotonic() > deadline:
            why = "time budget spent"
        elif 2 * shape.logits_bytes > limit:
            why = f"unfused logits + gradient exceed {MEMORY_FRACTION:.0%} of memory"
        if why:
            results += [_row(shape, impl.name, mode, status="skipped", note=why)
                        for impl, mode in cases]
            continue
        generator = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(shape.n, shape.d, device=device, generator=generator,
                             dtype=shape.dtype)
        weight = (torch.randn(shape.v, shape.d, device=device, generator=generator)
                  / math.sqrt(shape.d) * 2).to(shape.dtype)
        labels = torch.randint(0, shape.v, (shape.n,), device=device, generator=generator)
        for impl, mode in cases:
            note = f"{impl.note}; N×V logits {shape.logits_bytes / 2**20:,.0f} MB"
            result = _row(shape, impl.name, mode, note=note)
            if time.monotonic() > deadline:
                result.status, result.note = "skipped", "time budget spent"
            else:
                try:
                    step = impl.step(mode) if impl.step else make_step(impl.fn(), mode)
                except Exception as exc:  # noqa: BLE001
                    result.status, result.note = "error", short_error(exc)
                else:
                    measure(result, lambda: step(hidden, weight, labels), device, config)
            log(describe(result))
            results.append(result)
        del hidden, weight, labels
        release_memory(device)
