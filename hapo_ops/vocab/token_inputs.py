"""Argument handling shared by the per-token ops over a vocabulary (logits op, fused linear
head, sampler): implementation choice, labels, temperature.

Every check raises ``ValueError`` or ``TypeError`` naming the argument and what was
expected. Value checks (labels in range, T > 0) read tensor values back to the host: they
run on CPU tensors, where that is free, and elsewhere only with ``validate=True``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from hapo_ops._utils.validation import check_choice, check_float, check_tensor

IMPLS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """Whether Triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def resolve_impl(impl: object, reference: torch.Tensor) -> str:
    """"torch" or "triton" for ``impl`` ("auto": Triton for CUDA tensors when it is
    installed). "triton" needs CUDA tensors, or ``TRITON_INTERPRET=1`` (set before Triton is
    imported) to run in Triton's CPU interpreter."""
    impl = check_choice("impl", impl, IMPLS)
    if impl == "auto":
        return "triton" if reference.is_cuda and triton_available() else "torch"
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


def check_ignore_index(ignore_index: object) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return ignore_index


def check_token_labels(labels: object, token_shape: torch.Size, vocab: int, ignore_index: int,
                       device: torch.device, *, source: str, check_range: bool) -> torch.Tensor:
    """Labels of shape ``source.shape[:-1]`` on ``device``, as a flat contiguous tensor; with
    ``check_range`` (a host read), every label in [0, vocab) or equal to ignore_index."""
    labels = check_tensor("labels", labels, integer=True, allow_empty=True)
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


__all__ = ["IMPLS", "check_chunk", "check_ignore_index", "check_token_labels", "checks_values",
           "flat_float32", "inverse_temperature", "prepare_temperature", "resolve_impl", "triton_available"]
