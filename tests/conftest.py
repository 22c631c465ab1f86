"""Test configuration: Triton runs in its CPU interpreter unless HAPO_TEST_CUDA=1.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection.
"""

import os

if os.environ.get("HAPO_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available() and not INTERPRETING


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


HAS_TRITON = _triton_importable()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and HAPO_TEST_CUDA=1")

# (impl, device) pairs every kernel-backed test runs on, where available.
IMPL_DEVICES = [pytest.param("torch", "cpu", id="torch-cpu")]
if HAS_TRITON and INTERPRETING:
    IMPL_DEVICES.append(pytest.param("triton", "cpu", id="triton-interpreter"))
if HAS_CUDA:
    IMPL_DEVICES += [pytest.param("torch", "cuda", id="torch-cuda"),
                     pytest.param("triton", "cuda", id="triton-cuda")]
