"""Elementwise tolerances by dtype, as Liger-Kernel's tests use them: |got - ref| ≤ atol +
rtol·|ref| at every element (never relative to the largest entry, which hides errors in
small ones). Non-finite references must be matched exactly (same inf, NaN only where the
reference is NaN and the caller allows it); a NaN where the reference is finite never passes.
"""

from __future__ import annotations

import torch

# logp and H are computed and returned in fp32 whatever the input dtype, from the inputs'
# exact values: fp32 tolerances for every dtype.
VALUE_TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-6, 1e-5),
             torch.float16: (1e-6, 1e-5), torch.float64: (1e-6, 1e-5)}
# Gradients come in the input dtype: its rounding (2^-8 for bf16, 2^-11 for fp16) on top of
# the fp32 math, whose absolute error is ~1e-6 of the upstream gradient's scale.
GRAD_TOL = {torch.float32: (2e-6, 1e-4), torch.bfloat16: (2e-6, 8e-3),
            torch.float16: (2e-6, 2e-3), torch.float64: (1e-9, 1e-6)}


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: tuple[float, float],
                 *, scale: float = 1.0, allow_nan: bool = False) -> None:
    """Elementwise check; ``scale`` multiplies atol (the size of the upstream gradient)."""
    atol, rtol = tol
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if not allow_nan:
        assert not torch.isnan(ref).any(), f"{name}: NaN in the reference"
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{name}: NaN where ref is not"
    finite = torch.isfinite(ref)
    assert torch.equal(got[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)]), \
        f"{name}: infinities differ"
    err = (got[finite] - ref[finite]).abs()
    bound = atol * scale + rtol * ref[finite].abs()
    bad = err > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {err.numel()} elements out of "
                           f"tolerance; worst error {err[bad].max().item():.3g} where "
                           f"|ref| = {ref[finite][bad][err[bad].argmax()].abs().item():.3g}")
