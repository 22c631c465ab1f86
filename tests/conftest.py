"""Test configuration.

Triton kernels run in Triton's CPU interpreter unless ``HAPO_TEST_CUDA=1`` (then on the GPU).
``TRITON_INTERPRET`` must be set before triton is first imported, hence here, at collection,
and only where Triton is installed: without it every Triton test skips and the torch paths
run alone. Hypothesis is derandomized (``HYPOTHESIS_PROFILE=random`` draws afresh and prints
the seed of a failure), so a CI run is reproducible.
"""

import importlib.util
import os
import sys

from hypothesis import settings

# The repository's kernels/ folder (shipped as hapo_ops.kernels) is also a top-level package
# named "kernels" while the repository root is on sys.path, as `python -m pytest` run from
# the root puts it there; it then shadows Hugging Face's `kernels` package, which
# transformers 5 imports when it is installed (`from kernels import CUDAProperties`), and
# every transformers test fails at import. Keep the root on the path, after the installed
# packages.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_root_entries = [p for p in sys.path if os.path.abspath(p or os.curdir) == ROOT]
sys.path[:] = [p for p in sys.path if p not in _root_entries] + _root_entries

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and os.environ.get("HAPO_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None)
settings.register_profile("random", print_blob=True, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

INTERPRETING = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available() and HAS_TRITON and not INTERPRETING
TRITON_RUNS = INTERPRETING or HAS_CUDA
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and HAPO_TEST_CUDA=1")
requires_triton = pytest.mark.skipif(not TRITON_RUNS,
                                     reason="needs Triton (its CPU interpreter or CUDA)")

# (impl, device) pairs every kernel-backed test runs on, where available.
IMPL_DEVICES = [pytest.param("torch", "cpu", id="torch-cpu")]
if INTERPRETING:
    IMPL_DEVICES.append(pytest.param("triton", "cpu", id="triton-interpreter"))
if HAS_CUDA:
    IMPL_DEVICES += [pytest.param("torch", "cuda", id="torch-cuda"),
                     pytest.param("triton", "cuda", id="triton-cuda")]
