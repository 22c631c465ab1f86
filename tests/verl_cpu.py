"""verl 0.9 has no CPU platform: the test-only one the verl and Megatron test suites register
(device "cpu", gloo, Ray resource "CPU"), so that verl's real workers and engines run on a
CPU. It changes nothing verl computes. (The whole-step run uses the example's own platform,
``examples/verl_cpu_platform.py``, which also hands Ray's "GPU" resource to vLLM.)"""

from __future__ import annotations

import contextlib
import types

import torch


def install_verl_cpu_platform() -> None:
    """Register the CPU platform with verl's PlatformRegistry and make it current (once)."""
    from verl.plugin.platform import platform_manager
    from verl.plugin.platform.platform_base import PlatformBase

    if isinstance(platform_manager._current_platform, PlatformBase) and (
            platform_manager._current_platform.device_name == "cpu"):
        return

    class CPUDeviceModule(types.ModuleType):
        """torch.cpu plus the memory and name queries verl makes of its device module."""

        def __getattr__(self, name):
            if name == "mem_get_info":
                return lambda *a, **k: (0, 0)
            if name.startswith(("memory_", "max_memory_", "reset_")) or name == "empty_cache":
                return lambda *a, **k: 0
            if name == "get_device_name":
                return lambda *a, **k: "CPU"
            if name in ("get_rng_state", "set_rng_state"):  # verl's checkpoint keeps the RNG
                return getattr(torch, name)
            return getattr(torch.cpu, name)

    class PlatformCPU(PlatformBase):
        device_name = "cpu"
        vendor_name = "cpu"
        device_module = CPUDeviceModule("verl_cpu_device")

        def is_available(self): return True
        def is_platform_available(self, use_smi_check=False): return False
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
        def visible_devices_envvar(self): return "CPU_VISIBLE_DEVICES"
        def nvtx_range(self, msg): return contextlib.nullcontext()
        def profiler_start(self): pass
        def profiler_stop(self): pass
        def ray_resource_name(self): return "CPU"
        def ray_noset_envvars(self): return []
        def is_ipc_supported(self): return False
        def cudart(self): return None

    platform_manager.PlatformRegistry.register("cpu")(PlatformCPU)
    platform_manager.set_platform(PlatformCPU())
