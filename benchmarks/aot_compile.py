"""Compile every Triton kernel of hapo-ops ahead of time for a GPU architecture, without a GPU,
and report registers per thread, spills and shared memory (what occupancy depends on).

    python -m benchmarks.aot_compile [--arch 90] [--dtypes bf16,fp32]

Uses Triton's own compiler (which runs the ``ptxas`` it ships) and its ``cuobjdump`` to read
the resource usage of the cubin; no driver or device is needed, so a CPU machine can check that the kernels compile for sm_90 (the interpreter accepts programs the
compiler may reject) and watch register pressure before any GPU time is spent. Signatures are
derived from the kernels' argument names: pointers to logits, hidden, weight, bias, grad and
dz take the data dtype, ids and labels int64, everything else float32; integer scalars are
int32.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

DATA_POINTERS = ("logits_ptr", "hidden_ptr", "weight_ptr", "bias_ptr", "grad_ptr", "dz_ptr")
INT64_POINTERS = ("labels_ptr", "seed_ptr", "row_ids_ptr", "tokens_ptr", "kept_ids_ptr",
                  "top_k_ptr")
FLOAT_SCALARS = ("scalar_inv_temperature", "base_temperature", "tau", "eps")


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in DATA_POINTERS:
            signature[name] = f"*{dtype}"
        elif name in INT64_POINTERS:
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _variants(dtype: str):
    """(label, kernel, constexprs, num_warps, num_stages) of the shipped launch configs."""
    from hapo_ops.kernels import linear_logprob_entropy as linear
    from hapo_ops.kernels import logprob_entropy as logits
    from hapo_ops.kernels import sampling

    two_byte = dtype in ("bf16", "fp16")
    warps = 2 if two_byte else 4
    block_d = 64 if two_byte else 32
    precision = None if two_byte else "tf32x3"

    def defaults(fn, **given):
        """Every constexpr of ``fn`` that has a default keeps it unless given."""
        import inspect
        out = {}
        for name, param in inspect.signature(fn.fn).parameters.items():
            if param.default is not inspect.Parameter.empty:
                out[name] = param.default
        out.update(given)
        return out

    fwd = logits._logprob_entropy_fwd_kernel
    for per_token_t in (False, True):
        yield (f"logits forward T-tensor={per_token_t}", fwd,
               defaults(fwd, HAS_TEMPERATURE_TENSOR=per_token_t, BLOCK_V=1024), warps, 3)
    yield ("logits forward row statistics", fwd,
           defaults(fwd, HAS_TEMPERATURE_TENSOR=True, BLOCK_V=1024, ROW_STATISTICS=True),
           warps, 3)
    bwd = logits._logprob_entropy_bwd_kernel
    for grad_logp, grad_entropy, sharded in ((True, True, False), (True, False, False),
                                             (False, True, False), (True, True, True)):
        yield (f"logits backward logp={grad_logp} H={grad_entropy} sharded={sharded}", bwd,
               defaults(bwd, HAS_TEMPERATURE_TENSOR=True, HAS_GRAD_LOGP=grad_logp,
                        HAS_GRAD_ENTROPY=grad_entropy, BLOCK_V=4096, SHARDED=sharded), 16, 3)
    sample = sampling._adaptive_sample_kernel
    for has_stats in (False, True):
        yield (f"sampler stats={has_stats}", sample,
               defaults(sample, HAS_STATS=has_stats, PAPER=True, BLOCK_V=1024), warps, 3)
    forward = linear._linear_fwd_kernel
    yield ("linear head forward", forward,
           defaults(forward, HAS_BIAS=True, HAS_TEMPERATURE_TENSOR=True, BLOCK_N=128,
                    BLOCK_V=128, BLOCK_D=block_d, UPCAST=False, PRECISION=precision), 8, 3)
    dlogits = linear._linear_dlogits_kernel
    yield ("linear head dlogits", dlogits,
           defaults(dlogits, HAS_BIAS=True, HAS_TEMPERATURE_TENSOR=True, HAS_GRAD_LOGP=True,
                    HAS_GRAD_ENTROPY=True, BLOCK_N=128, BLOCK_V=128, BLOCK_D=block_d,
                    UPCAST=False, PRECISION=precision, SHARDED=False), 8, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--dtypes", default="bf16,fp32")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        print("needs Triton (pip install 'hapo-ops[triton]')", file=sys.stderr)
        return 2
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, sm_{args.arch}; local = spilled bytes per thread")
    print(f"{'kernel':52s} {'dtype':5s} {'regs':>5s} {'local B':>8s} {'smem B':>8s}")
    failed = 0
    for dtype in args.dtypes.split(","):
        for label, fn, constexprs, warps, stages in _variants(dtype):
            signature = _signature(fn, dtype, constexprs)
            try:
                source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            except TypeError:  # triton < 3.3 names them constants
                source = ASTSource(fn=fn, signature=signature, constants=constexprs)
            try:
                kernel = triton.compile(source, target=target,
                                        options={"num_warps": warps, "num_stages": stages})
            except Exception as error:  # noqa: BLE001 - report and go on
                failed += 1
                print(f"{label:52s} {dtype:5s} FAILED: {str(error).splitlines()[-1][:120]}")
                continue
            with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as handle:
                handle.write(kernel.asm["cubin"])
            report = subprocess.run([cuobjdump, "-res-usage", handle.name], capture_output=True,
                                    text=True).stdout
            os.unlink(handle.name)
            regs = re.findall(r"REG:(\d+)", report)
            local = re.findall(r"LOCAL:(\d+)", report)
            print(f"{label:52s} {dtype:5s} {regs[0] if regs else '?':>5s} "
                  f"{local[0] if local else '?':>8s} {kernel.metadata.shared:>8d}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
