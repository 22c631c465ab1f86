"""Triton kernels of hapo-ops, shipped as ``hapo_ops.kernels``.

Importing this package needs Triton; the public API in ``hapo_ops`` imports it lazily, so
the torch paths work without Triton installed.
"""

from hapo_ops.kernels.logprob_entropy import (KernelConfig, logprob_entropy_backward,
                                              logprob_entropy_forward, pick_config)

__all__ = ["KernelConfig", "logprob_entropy_backward", "logprob_entropy_forward", "pick_config"]
