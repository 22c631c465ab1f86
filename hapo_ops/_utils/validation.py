"""Argument checks shared by every public op.

Each check raises ``ValueError`` or ``TypeError`` naming the argument and what was
expected. None of them reads tensor values (no host sync) unless its name says so.
"""

from __future__ import annotations

import math
import struct
from typing import Sequence

import torch

Scalar = float | int
ScalarOrTensor = float | torch.Tensor


def check_tensor(name: str, value: object, *, floating: bool = False, integer: bool = False,
                 allow_empty: bool = False) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    if not allow_empty and value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    return value


def check_mask(name: str, mask: object, shape: Sequence[int] | None = None, *,
               allow_empty: bool = False) -> torch.Tensor:
    """A mask is bool, integer (nonzero = valid, e.g. an attention mask) or floating point
    holding only 0 and 1 (1 = valid); returns it as bool.

    A floating-point mask with any other value (0.5, NaN, ...) looks like a weight: it is
    refused with a ``ValueError`` on the CPU (outside ``torch.compile``); on accelerators
    its values are not read (no host sync) and nonzero counts as valid. Pass per-token
    weights as ``weights=``.
    """
    mask = check_tensor(name, mask, allow_empty=allow_empty)
    if mask.is_complex():
        raise TypeError(f"{name} must be a bool or real tensor, got dtype {mask.dtype}")
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    valid = mask != 0
    if (mask.is_floating_point() and mask.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        other = valid & (mask != 1)
        if bool(other.any()):
            raise ValueError(f"{name} must hold only 0 and 1 (a floating-point mask is not a "
                             f"weight; pass weights= for that), got "
                             f"{float(mask[other].reshape(-1)[0])}")
    return valid


def check_same_shape(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                         f"got {tuple(value.shape)}")


def check_same_device(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {value.device}")


def check_float(name: str, value: object, *, min_value: float | None = None,
                min_inclusive: bool = True, max_value: float | None = None,
                max_inclusive: bool = True) -> float:
    """A finite Python number within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if min_value is not None and (value < min_value or (not min_inclusive and value == min_value)):
        op = ">=" if min_inclusive else ">"
        raise ValueError(f"{name} must be {op} {min_value}, got {value}")
    if max_value is not None and (value > max_value or (not max_inclusive and value == max_value)):
        op = "<=" if max_inclusive else "<"
        raise ValueError(f"{name} must be {op} {max_value}, got {value}")
    return value


def check_tau(name: str, value: object) -> float:
    """The strength τ of the adaptive temperature T = T_base·(1 + τ·ĥ), ĥ ∈ [-1, 1].

    |τ| < 1 keeps T > 0 at every token, and T is computed in float32, so |τ| must stay
    below 1 after rounding to float32 too (a τ within 3e-8 of ±1 rounds to ±1 and would
    give T = 0). τ < 0 is allowed: it inverts the adaptation.
    """
    value = check_float(name, value)
    if not (abs(value) < 1.0 and abs(struct.unpack("f", struct.pack("f", value))[0]) < 1.0):
        raise ValueError(f"{name} must be in (-1, 1) so that T > 0 (|tau| < 1 also in "
                         f"float32), got {value!r}")
    return value


def check_float_or_tensor(name: str, value: object, ref: torch.Tensor, *,
                          min_value: float = 0.0, min_inclusive: bool = True,
                          max_value: float | None = None, max_inclusive: bool = True
                          ) -> ScalarOrTensor:
    """A float within the bounds (default: >= min_value), or a floating tensor broadcastable
    to ``ref`` on its device whose values lie within them.

    Tensor values are checked only on the CPU (no host sync on accelerators), and not while
    ``torch.compile`` traces (a host read would break the graph); NaN is not rejected there.
    """
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating-point tensor, got dtype {value.dtype}")
        check_same_device(name, value, "the input", ref)
        try:
            torch.broadcast_shapes(value.shape, ref.shape)
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to "
                             f"{tuple(ref.shape)}") from None
        if value.device.type == "cpu" and value.numel() and not torch.compiler.is_compiling():
            below = value < min_value if min_inclusive else value <= min_value
            if bool(below.any()):
                raise ValueError(f"{name} must be {'>=' if min_inclusive else '>'} "
                                 f"{min_value} everywhere")
            if max_value is not None:
                above = value > max_value if max_inclusive else value >= max_value
                if bool(above.any()):
                    raise ValueError(f"{name} must be {'<=' if max_inclusive else '<'} "
                                     f"{max_value} everywhere")
        return value
    return check_float(name, value, min_value=min_value, min_inclusive=min_inclusive,
                       max_value=max_value, max_inclusive=max_inclusive)


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


# The two HAPO variants every op and integration accepts as ``variant=`` / ``hapo_variant=``:
# the paper's formulas, or those of the public reference code (README, "Paper and released
# variants"). The one spelling of the tuple; integrations import it from here.
VARIANTS = ("paper", "released")


def check_variant(variant: object) -> str:
    return check_choice("variant", variant, VARIANTS)
