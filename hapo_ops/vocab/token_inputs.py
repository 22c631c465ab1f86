"""Argument handling shared by the per-token ops over a vocabulary (logits op, fused linear
head, sampler): implementation choice, logits, labels, temperature, shard offsets.

An empty batch (no rows: a data-parallel rank with nothing to do) is ordinary input: every
op returns empty outputs and zero gradients. A vocabulary of size 0 is an error.

Every check raises ``ValueError`` or ``TypeError`` naming the argument and what was
expected. Value checks (labels in range, T > 0) read tensor values back to the host: they
run on CPU tensors, where that is free, and elsewhere only with ``validate=True``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from hapo_ops._utils.collectives import ProcessGroup, exclusive_prefix_sum
from hapo_ops._utils.validation import check_choice, check_float, check_tensor

IMPLS = ("auto", "torch", "triton")
# The dtypes every Triton kernel over a vocabulary takes; "auto" takes the torch path for
# the others (float64 on CUDA, for example).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    """Whether Triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def auto_impl(device_type: str, dtype: torch.dtype, has_triton: bool) -> str:
    """What ``impl="auto"`` means for tensors of ``device_type`` and ``dtype``: the Triton
    kernels on CUDA for the dtypes they take (``KERNEL_DTYPES``) when Triton is installed,
    the torch path otherwise."""
    if device_type == "cuda" and dtype in KERNEL_DTYPES and has_triton:
        return "triton"
    return "torch"


def resolve_impl(impl: object, reference: torch.Tensor) -> str:
    """"torch" or "triton" for ``impl`` ("auto": ``auto_impl`` of ``reference``). "triton"
    needs CUDA tensors, or ``TRITON_INTERPRET=1`` (set before Triton is imported) to run in
    Triton's CPU interpreter."""
    impl = check_choice("impl", impl, IMPLS)
    if impl == "auto":
        return auto_impl(reference.device.type, reference.dtype, triton_available())
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton' needs Triton installed (pip install triton); "
                             "impl='torch' runs without it")
        if not reference.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                             f"triton is imported to interpret on {reference.device}; "
                             "got impl='triton'")
    return impl


def checks_values(reference: torch.Tensor, validate: bool) -> bool:
    """Whether value checks (a host read) run: free on CPU, opt-in elsewhere, and skipped
    while torch.compile traces (a data-dependent branch would break the graph)."""
    return (validate or reference.device.type == "cpu") and not torch.compiler.is_compiling()


def check_logits(name: str, logits: object, *, dims: int | None = None) -> torch.Tensor:
    """A floating tensor (..., V) (exactly ``dims`` dims when given) with V ≥ 1; any number
    of rows, including none."""
    logits = check_tensor(name, logits, floating=True, allow_empty=True)
    if logits.dim() < 1 or (dims is not None and logits.dim() != dims):
        expected = "(..., V)" if dims is None else "(B, V)" if dims == 2 else f"{dims} dims"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} must have a vocabulary (last dim) of size >= 1, "
                         f"got shape {tuple(logits.shape)}")
    return logits


def check_ignore_index(ignore_index: object) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return ignore_index


def check_token_labels(labels: object, token_shape: torch.Size, vocab: int, ignore_index: int,
                       device: torch.device, *, source: str, check_range: bool) -> torch.Tensor:
    """Labels of shape ``source.shape[:-1]`` on ``device``, any integer dtype, as a flat
    contiguous int64 tensor; with ``check_range`` (a host read), every label in [0, vocab)
    or equal to ignore_index."""
    labels = check_tensor("labels", labels, integer=True, allow_empty=True)
    if labels.shape != token_shape:
        raise ValueError(f"labels must have shape {source}.shape[:-1] = {tuple(token_shape)}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the device of {source} ({device}), "
                         f"got {labels.device}")
    labels = labels.to(torch.int64)
    if check_range:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index="
                             f"{ignore_index}; found {int(bad.sum())} outside")
    return labels.reshape(-1).contiguous()


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


def inverse_temperature(temperature: torch.Tensor | None, scalar_temperature: float,
                        n_rows: int, device: torch.device) -> torch.Tensor:
    """1/T per row as float32 (N,), from the per-token tensor or the scalar."""
    if temperature is None:
        return torch.full((n_rows,), 1.0 / scalar_temperature, dtype=torch.float32,
                          device=device)
    return 1.0 / temperature


def flat_float32(grad: torch.Tensor | None) -> torch.Tensor | None:
    """An upstream gradient as a flat contiguous float32 tensor (None stays None)."""
    return None if grad is None else grad.reshape(-1).to(torch.float32).contiguous()


def check_chunk(name: str, value: object) -> int | None:
    """None (the default) or a positive int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


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
        return vocab_start.reshape(()).to(device, torch.int64)
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int):
        raise TypeError(f"vocab_start must be an int or an integer tensor, "
                        f"got {type(vocab_start).__name__}")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    return vocab_start


__all__ = ["IMPLS", "KERNEL_DTYPES", "auto_impl", "check_chunk", "check_ignore_index",
           "check_logits", "check_token_labels", "checks_values", "flat_float32",
           "inverse_temperature", "prepare_temperature", "resolve_impl", "shard_vocab_start",
           "triton_available"]
