"""Triton kernels of hapo-ops, shipped as ``hapo_ops.kernels``.

Importing this package needs Triton; the ops in ``hapo_ops`` import a kernel module only when
they launch it, so the torch paths work without Triton installed. ``_common`` holds what
every kernel shares (jit helpers of the per-row statistics, constants, row addressing,
launch configuration); each other module mirrors the op module of the same name in
``hapo_ops``.
"""
