"""Log-prob + entropy from logits: hapo_ops against the usual alternatives.

Implementations
  hapo-triton    hapo_ops.logprobs_and_entropy(..., impl="triton")
  hapo-torch     the vocabulary-chunked PyTorch path (impl="torch"); one shape only on CUDA
  torch-eager    log_softmax(z.float() / T).gather(y) and -(softmax · log_softmax).sum(-1)
  torch-compile  torch.compile(dynamic=False) of the same eager function (fixed shapes:
                 one compilation per shape, in the untimed warm-up)
  liger          Liger-Kernel's cross entropy with reduction="none" (log-prob only; it always
                 writes the gradient into the logits, so its backward row is "in-place")

Every row's baseline is torch-eager at the same shape, dtype and mode (on CPU too, where it
is what a user would otherwise run). In-place rows get fresh logits before every repetition
(outside the timed region). The published TRL figure (0.89 ms on an H100, bf16
[8, 1024, 151936], forward) is kept apart from the measured rows (``PUBLISHED``); the
measured rows include that shape (N = 8192, V = 151936) on CUDA.

Effective bandwidth uses a minimum-traffic model: forward reads the logits once
(N·V·itemsize); forward+backward reads them twice and writes the gradient (3·N·V·itemsize).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import (Result, TimingConfig, is_oom, log, measure, release_memory,
                               short_error, total_memory_bytes)

FORWARD = "forward"
FWD_BWD = "forward+backward"
FWD_BWD_INPLACE = "forward+backward in-place"
ALL_MODES = (FORWARD, FWD_BWD, FWD_BWD_INPLACE)

TEMPERATURE = 1.0
MEMORY_FRACTION = 0.4     # skip shapes whose logits + gradient exceed this share of memory
BASELINE = "torch-eager"
# Published, not measured here: never a row of the measured tables.
PUBLISHED = [{"what": "TRL per-token log-prob (selective_log_softmax), forward",
              "device": "H100", "dtype": "bfloat16", "shape": [8, 1024, 151936],
              "median_ms": 0.89, "source": "TRL's published benchmark"}]

Step = Callable[[torch.Tensor, torch.Tensor], None]
LogprobFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- implementations


def eager_logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor,
                               temperature: float = TEMPERATURE
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook PyTorch version (materializes several N×V fp32 tensors)."""
    z = logits.float() / temperature
    log_probs = torch.log_softmax(z, dim=-1)
    logp = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(torch.softmax(z, dim=-1) * log_probs).sum(-1)
    return logp, entropy


def hapo_fn(impl: str, **kwargs: Any) -> LogprobFn:
    import hapo_ops

    def fn(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return hapo_ops.logprobs_and_entropy(logits, labels, temperature=TEMPERATURE,
                                             impl=impl, **kwargs)
    return fn


class CompiledEager:
    """``torch.compile(dynamic=False)`` of the eager function, built on first use (one per
    process). Static shapes specialise each shape (one compilation per shape and mode, in
    the untimed warm-up); the recompile limit is raised so that no shape of the grid falls
    back to eager."""

    _fn: LogprobFn | None = None

    @classmethod
    def get(cls) -> LogprobFn:
        if cls._fn is None:
            import torch._dynamo
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config,
                                                                        name)))
            cls._fn = torch.compile(eager_logprobs_and_entropy, dynamic=False)
        return cls._fn


def liger_import_error() -> str | None:
    try:
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - optional dependency, any failure means "absent"
        return short_error(exc)
    return None


def liger_fn(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob through Liger's cross entropy (reduction="none"); no entropy.

    Arguments are matched by name against ``LigerCrossEntropyFunction.forward`` so that
    versions with different positional signatures all work.
    """
    from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

    wanted = {"weight": None, "ignore_index": -100, "lse_square_scale": 0.0,
              "label_smoothing": 0.0, "reduction": "none", "softcap": None,
              "return_z_loss": False}
    params = list(inspect.signature(LigerCrossEntropyFunction.forward).parameters.values())[1:]
    args: list[Any] = [logits, labels]
    for param in params[2:]:
        if param.name in wanted:
            args.append(wanted[param.name])
        elif param.default is not inspect.Parameter.empty:
            args.append(param.default)
        else:
            raise TypeError(f"unknown required Liger argument {param.name!r}")
    out = LigerCrossEntropyFunction.apply(*args)
    loss = out[0] if isinstance(out, tuple) else out
    return -loss, loss  # (log-prob, placeholder): only the first output gets a gradient


def make_step(fn: LogprobFn, mode: str, *, entropy_grad: bool = True) -> Step:
    """A benchmark step: forward under no_grad, or forward plus ``autograd.grad``."""
    if mode == FORWARD:
        def forward(logits: torch.Tensor, labels: torch.Tensor) -> None:
            with torch.no_grad():
                fn(logits, labels)
        return forward

    def forward_backward(logits: torch.Tensor, labels: torch.Tensor) -> None:
        x = logits.detach().requires_grad_(True)
        logp, entropy = fn(x, labels)
        outputs = (logp, entropy) if entropy_grad else (logp,)
        torch.autograd.grad(outputs, x, [torch.ones_like(t) for t in outputs])
    return forward_backward


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    modes: tuple[str, ...]
    step: Callable[[str], Step]
    note: str = ""
    target_only: bool = False     # too slow for the whole grid: run at the target shape only
    stop_on_error: bool = False   # after a non-OOM error, skip the remaining shapes


def hapo_impl(impl: str, modes: tuple[str, ...] = ALL_MODES, **extra: Any) -> Impl:
    def step(mode: str) -> Step:
        kwargs = {"inplace_backward": True} if mode == FWD_BWD_INPLACE else {}
        return make_step(hapo_fn(impl, **kwargs), mode)
    return Impl(name=f"hapo-{impl}", modes=modes, step=step, **extra)


EAGER = Impl("torch-eager", (FORWARD, FWD_BWD),
             lambda mode: make_step(eager_logprobs_and_entropy, mode),
             note="log_softmax + softmax in fp32: several N×V fp32 tensors")
TORCH_NOTE = ("row-blocked PyTorch path: about 1M logits per block on CPU (16M on a GPU), "
              "so its memory stays bounded where eager holds several N×V fp32 tensors")


def available_impls(*, full: bool) -> list[Impl]:
    """Implementations to compare; ``full`` adds the GPU-only comparison set."""
    if not full:
        return [hapo_impl("torch", (FORWARD, FWD_BWD), note=TORCH_NOTE), EAGER]
    impls = [
        hapo_impl("triton"),
        EAGER,
        Impl("torch-compile", (FORWARD, FWD_BWD),
             lambda mode: make_step(CompiledEager.get(), mode),
             note="torch.compile(dynamic=False) of torch-eager; compiled in the untimed "
                  "warm-up", stop_on_error=True),
    ]
    liger_error = liger_import_error()
    if liger_error is None:
        impls.append(Impl("liger", (FORWARD, FWD_BWD_INPLACE),
                          lambda mode: make_step(liger_fn, mode, entropy_grad=False),
                          note="log-prob only; loss in the logits dtype", stop_on_error=True))
    else:
        log(f"liger-kernel unavailable, skipped: {liger_error}")
    impls.append(hapo_impl("torch", (FORWARD, FWD_BWD), note=TORCH_NOTE, target_only=True))
    return impls


# --------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class Shape:
    dtype: torch.dtype
    n: int
    v: int

    @property
    def logits_bytes(self) -> int:
        return self.n * self.v * torch.empty((), dtype=self.dtype).element_size()

    def label(self) -> str:
        return f"{dtype_name(self.dtype)} N={self.n} V={self.v}"


@dataclasses.dataclass
class Plan:
    shapes: list[Shape]            # in priority order (a time budget cuts from the end)
    target: Shape
    impls: list[Impl]
    accuracy_rows: int
    accuracy_impls: list[str]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_plan(device: torch.device, *, quick: bool, smoke: bool) -> Plan:
    bf16, fp32 = torch.bfloat16, torch.float32
    if smoke:  # tiny shapes, every implementation (CPU: Triton under TRITON_INTERPRET=1)
        target = Shape(bf16, 48, 1000)
        shapes = [target, Shape(fp32, 48, 1000), Shape(bf16, 32, 3000)]
        return Plan(shapes, target, available_impls(full=True), 8,
                    ["triton", "torch", "eager"])
    if device.type == "cpu":
        # N = 1024: torch-eager holds several N×V fp32 tensors (0.6 GB each at this N).
        target = Shape(bf16, 256 if quick else 1024, 151936)
        return Plan([target], target, available_impls(full=False), 16,
                    ["torch", "eager"])
    target = Shape(bf16, 16384, 151936)
    trl = Shape(bf16, 8192, 151936)           # TRL's published shape [8, 1024, 151936]
    if quick:  # the target shape, TRL's shape, fp32 at the target, then other vocabularies
        shapes = [target, trl, Shape(fp32, 16384, 151936), Shape(bf16, 16384, 128256),
                  Shape(bf16, 16384, 32000), Shape(bf16, 16384, 256000)]
    else:
        vocab = (151936, 32000, 128256, 256000)
        shapes = [Shape(dtype, n, v) for dtype in (bf16, fp32) for n in (16384, 8192)
                  for v in vocab]
    return Plan(shapes, target, available_impls(full=True), 64 if quick else 256,
                ["triton", "torch", "eager"])


def bytes_moved(shape: Shape, mode: str) -> int:
    return shape.logits_bytes * (1 if mode == FORWARD else 3)


# --------------------------------------------------------------------------- runs


def copy_bytes(device: torch.device, *, smoke: bool) -> int:
    """About 4 GB on a GPU (at most a tenth of its memory), 512 MiB on a CPU."""
    if smoke:
        return 16 << 20
    if device.type == "cuda":
        return min(4 << 30, total_memory_bytes(device) // 10)
    return 512 << 20


def copy_bandwidth(device: torch.device, config: TimingConfig, *, smoke: bool) -> Result:
    """Device-to-device copy ``dst.copy_(src)``; bytes = read + written."""
    numel = copy_bytes(device, smoke=smoke) // 4
    result = Result(suite="copy", name="dst.copy_(src)", mode="copy", dtype="float32",
                    shape=[numel], note="bytes read + written")
    _measure_copy(result, numel, device, config)
    release_memory(device)
    result.set_bandwidth(2 * numel * 4, None)
    log(f"copy bandwidth ({2 * numel * 4 / 1e9:.2f} GB read + written): "
        f"{result.gbps or float('nan'):.1f} GB/s")
    return result


def _measure_copy(result: Result, numel: int, device: torch.device,
                  config: TimingConfig) -> None:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    measure(result, lambda: dst.copy_(src), device, config)


class Runner:
    """Runs the plan's cases in priority order, within an optional wall-clock budget."""

    def __init__(self, plan: Plan, device: torch.device, config: TimingConfig,
                 copy_gbps: float | None, deadline: float, results: list[Result]) -> None:
        self.plan, self.device, self.config = plan, device, config
        self.copy_gbps, self.deadline = copy_gbps, deadline
        self.broken: dict[str, str] = {}
        self.results = results  # appended to as cases finish (kept if the run is interrupted)

    def run(self) -> None:
        limit = MEMORY_FRACTION * total_memory_bytes(self.device)
        for shape in self.plan.shapes:
            if 2 * shape.logits_bytes > limit:
                self._skip_shape(shape, f"logits + gradient {2 * shape.logits_bytes / 2**30:.1f} "
                                        f"GiB > {MEMORY_FRACTION:.0%} of memory")
            else:
                self._run_shape(shape)

    def _cases(self, shape: Shape) -> list[tuple[Impl, str]]:
        return [(impl, mode) for impl in self.plan.impls
                if not impl.target_only or shape == self.plan.target for mode in impl.modes]

    def _row(self, shape: Shape, impl: Impl, mode: str, **fields: Any) -> Result:
        fields.setdefault("note", impl.note)
        # in-place rows are compared with eager's forward+backward (report.py)
        baseline = None if impl.name == BASELINE else BASELINE
        return Result(suite="logprob", name=impl.name, mode=mode, dtype=dtype_name(shape.dtype),
                      shape=[shape.n, shape.v], baseline=baseline, **fields)

    def _skip_shape(self, shape: Shape, why: str) -> None:
        log(f"skip {shape.label()}: {why}")
        self.results += [self._row(shape, impl, mode, status="skipped", note=why)
                         for impl, mode in self._cases(shape)]

    def _run_shape(self, shape: Shape) -> None:
        if time.monotonic() > self.deadline:
            self._skip_shape(shape, "time budget spent")
            return
        failure: str | None = None
        try:
            logits = torch.empty(shape.n, shape.v, dtype=shape.dtype, device=self.device)
            labels = torch.randint(0, shape.v, (shape.n,), device=self.device)
        except Exception as exc:  # noqa: BLE001
            failure = short_error(exc)
        else:
            for impl, mode in self._cases(shape):
                self.results.append(self._run_case(shape, impl, mode, logits, labels))
            del logits, labels
        release_memory(self.device)
        if failure is not None:
            self._skip_shape(shape, f"inputs: {failure}")

    def _run_case(self, shape: Shape, impl: Impl, mode: str, logits: torch.Tensor,
                  labels: torch.Tensor) -> Result:
        if time.monotonic() > self.deadline:
            return self._row(shape, impl, mode, status="skipped", note="time budget spent")
        if impl.name in self.broken:
            return self._row(shape, impl, mode, status="skipped",
                             note=f"failed earlier: {self.broken[impl.name]}")
        logits.normal_(0.0, 2.0)
        # In-place modes overwrite the logits with their gradient: fresh logits before every
        # repetition, outside the timed region.
        setup = (lambda: logits.normal_(0.0, 2.0)) if mode == FWD_BWD_INPLACE else None
        result = self._row(shape, impl, mode)
        if mode == FWD_BWD_INPLACE:
            result.note = (result.note + "; " if result.note else "") + \
                "fresh logits before every repetition (untimed)"
        try:
            step = impl.step(mode)
        except Exception as exc:  # noqa: BLE001
            result.status, result.note = "error", short_error(exc)
        else:
            config = self.config
            if impl.name == "torch-compile":  # compilation and its first runs stay untimed
                config = dataclasses.replace(config, warmup=max(3, config.warmup))
            measure(result, lambda: step(logits, labels), self.device, config, setup)
        result.set_bandwidth(bytes_moved(shape, mode), self.copy_gbps)
        if result.status == "error" and impl.stop_on_error:
            self.broken[impl.name] = result.note
        log(describe(result))
        return result


def describe(result: Result) -> str:
    head = f"{result.name:<14} {result.dtype:<8} {'x'.join(map(str, result.shape)):<13} " \
           f"{result.mode:<26}"
    if result.status != "ok":
        return f"{head} {result.status}: {result.note}"
    text = f"{head} {result.median_ms:9.3f} ms"
    if result.gbps is not None:
        text += f" {result.gbps:8.1f} GB/s"
    if result.extra_peak_mb is not None:
        text += f"  +{result.extra_peak_mb:.0f} MB"
    return text


# --------------------------------------------------------------------------- accuracy


def near_deterministic_logits(rows: int, v: int, gap: float, dtype: torch.dtype,
                              device: torch.device, generator: torch.Generator
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose top logit sits ``gap`` above every other one; labels: half the argmax."""
    z = torch.randn(rows, v, generator=generator)
    top = torch.randint(0, v, (rows,), generator=generator)
    z[torch.arange(rows), top] = z.max(-1).values + gap
    labels = torch.where(torch.arange(rows) % 2 == 0, top,
                         torch.randint(0, v, (rows,), generator=generator))
    return z.to(device=device, dtype=dtype), labels.to(device)


def float64_reference(logits: torch.Tensor, labels: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1), entropy


def accuracy_fn(name: str) -> LogprobFn:
    return eager_logprobs_and_entropy if name == "eager" else hapo_fn(name)


def entropy_accuracy(plan: Plan, device: torch.device,
                     gaps: tuple[float, ...] = (10.0, 20.0, 30.0)) -> list[dict[str, Any]]:
    """Max relative entropy error against float64 on near-deterministic rows (target V)."""
    generator = torch.Generator().manual_seed(1234)
    rows: list[dict[str, Any]] = []
    for dtype in (plan.target.dtype, torch.float32):
        for gap in gaps:
            logits, labels = near_deterministic_logits(plan.accuracy_rows, plan.target.v, gap,
                                                       dtype, device, generator)
            ref_logp, ref_h = float64_reference(logits, labels)
            for name in plan.accuracy_impls:
                row: dict[str, Any] = {
                    "impl": "torch-eager" if name == "eager" else f"hapo-{name}",
                    "dtype": dtype_name(dtype), "gap": gap, "rows": plan.accuracy_rows,
                    "V": plan.target.v, "median_entropy_ref": ref_h.median().item(),
                    "min_entropy_ref": ref_h.min().item()}
                try:
                    with torch.no_grad():
                        logp, h = accuracy_fn(name)(logits, labels)
                    row["max_rel_err_entropy"] = ((h.double() - ref_h).abs() / ref_h).max().item()
                    row["max_abs_err_logprob"] = (logp.double() - ref_logp).abs().max().item()
                except Exception as exc:  # noqa: BLE001
                    row["error"] = short_error(exc)
                rows.append(row)
            del logits, labels, ref_logp, ref_h
            release_memory(device)
    return rows


# --------------------------------------------------------------------------- entry point


def run(device: torch.device, config: TimingConfig, results: list[Result],
        accuracy: list[dict[str, Any]], *, quick: bool, smoke: bool, copy_gbps: float | None,
        deadline: float = math.inf) -> None:
    """Append the benchmark rows to ``results`` and the accuracy rows to ``accuracy``."""
    plan = make_plan(device, quick=quick, smoke=smoke)
    log("entropy accuracy on near-deterministic rows (first: small and never cut by the budget)")
    try:
        accuracy += entropy_accuracy(plan, device)
    except Exception as exc:  # noqa: BLE001 - optional extra, never fatal
        log(f"accuracy check failed: {short_error(exc)}")
        accuracy.append({"error": short_error(exc), "oom": is_oom(exc)})
    release_memory(device)
    log(f"logprob: {len(plan.shapes)} shapes, impls {[impl.name for impl in plan.impls]}")
    Runner(plan, device, config, copy_gbps, deadline, results).run()
