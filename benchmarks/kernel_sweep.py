"""Launch-configuration sweep of the log-prob + entropy kernels and the sampler, on one GPU.

    python -m benchmarks.kernel_sweep [--out DIR] [--budget-s S] [--best-to FILE]

Times each kernel alone (``triton.testing.do_bench``, median; kernel-only timing, so these
are tuning data, not the op's time: the README's numbers come from ``python -m benchmarks``)
at the target shape (bf16, N=16384, V=151936) and at fp32 (N=8192, V=151936), each pass with
its own list of configurations, the shipped one (``pick_config``'s rule) always first, next
to a device-to-device copy of the same bytes measured in the same run:

  forward   reads the logits once                  (% of copy: N·V·itemsize over copy GB/s)
  backward  reads them once, writes the gradient   (2·N·V·itemsize)
  sample    the sampler kernel, two reads          (2·B·V·itemsize, B = 1024, bf16 only)

``--best-to`` writes the fastest configuration per pass and dtype in the
``HAPO_OPS_KERNEL_CONFIG`` format (``pass:dtype:BLOCKxWARPSxSTAGES``), as a proposal for the
rule; the benchmarks themselves always run the shipped rule. Without a CUDA GPU the sweep
prints why and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator

FORWARD_CONFIGS_2B = ((1024, 2, 3), (512, 2, 3), (1024, 4, 3), (2048, 4, 3), (2048, 8, 3),
                      (1024, 2, 4))
BACKWARD_CONFIGS = ((4096, 16, 3), (2048, 8, 3), (4096, 8, 3), (8192, 16, 3), (4096, 16, 2))
FORWARD_CONFIGS_4B = ((1024, 4, 3), (2048, 4, 3), (2048, 8, 3))
SAMPLE_CONFIGS = ((1024, 2, 3), (2048, 4, 3), (1024, 4, 3), (512, 2, 3))


def cases():
    """(dtype, N, V, share of the budget, {pass: configs})."""
    import torch
    return (
        (torch.bfloat16, 16384, 151936, 0.6,
         {"forward": FORWARD_CONFIGS_2B, "backward": BACKWARD_CONFIGS}),
        (torch.bfloat16, 1024, 151936, 0.15, {"sample": SAMPLE_CONFIGS}),
        (torch.float32, 8192, 151936, 0.25,
         {"forward": FORWARD_CONFIGS_4B, "backward": BACKWARD_CONFIGS[:3]}),
    )


@contextlib.contextmanager
def shipped_rule() -> Iterator[None]:
    """Without ``HAPO_OPS_KERNEL_CONFIG`` while inside: ``pick_config`` gives the shipped rule."""
    saved = os.environ.pop("HAPO_OPS_KERNEL_CONFIG", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["HAPO_OPS_KERNEL_CONFIG"] = saved


def cuda_unavailable() -> str | None:
    """Why no kernel can be timed here, or None."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return f"torch does not import ({exc})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set (the interpreter times nothing meaningful)"
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"triton does not import ({exc})"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_sweep",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write kernel_sweep.json here")
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--best-to", metavar="FILE",
                        help="write the fastest config per pass and dtype here, in the "
                             "HAPO_OPS_KERNEL_CONFIG format (a proposal; nothing reads it)")
    args = parser.parse_args(argv)
    why = cuda_unavailable()
    if why is not None:
        print(f"kernel_sweep: needs a CUDA GPU with Triton: {why}. Nothing was timed.",
              file=sys.stderr)
        return 2

    import torch
    import triton.testing

    from hapo_ops.kernels._common import KernelConfig, pick_config
    from hapo_ops.kernels.logprob_entropy import (logprob_entropy_backward,
                                                  logprob_entropy_forward)
    from hapo_ops.kernels.sampling import adaptive_sample_forward

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, return_mode="median")

    rows = []
    for dtype, n_rows, vocab, share, passes in cases():
        started = time.monotonic()
        dtype_name = str(dtype).removeprefix("torch.")
        logits = (torch.randn(n_rows, vocab, device="cuda") * 2).to(dtype)
        labels = torch.randint(0, vocab, (n_rows,), device="cuda")
        nbytes = logits.numel() * logits.element_size()
        copy_dst = torch.empty_like(logits)
        copy_ms = bench(lambda: copy_dst.copy_(logits))
        copy_gbps = 2 * nbytes / copy_ms / 1e6
        del copy_dst
        g = torch.randn(n_rows, device="cuda")
        seed = torch.tensor([1234], device="cuda")
        row_ids = torch.arange(n_rows, device="cuda")
        print(f"# {dtype_name} N={n_rows} V={vocab}: copy {copy_ms:.3f} ms = {copy_gbps:.0f} "
              f"GB/s (read + write)", file=sys.stderr)
        for pass_, configs in passes.items():
            with shipped_rule():
                shipped = pick_config(vocab, dtype, pass_)
            ordered = [shipped] + [KernelConfig(*c) for c in configs
                                   if KernelConfig(*c) != shipped]
            traffic = nbytes if pass_ == "forward" else 2 * nbytes
            _, entropy, state = logprob_entropy_forward(logits, labels, None, 1.0, -100)
            for config in ordered:
                if time.monotonic() - started > args.budget_s * share:
                    print(f"# {dtype_name} {pass_}: budget spent", file=sys.stderr)
                    break
                if pass_ == "forward":
                    def fn(config=config):
                        logprob_entropy_forward(logits, labels, None, 1.0, -100, config=config)
                elif pass_ == "backward":
                    def fn(config=config):
                        logprob_entropy_backward(logits, labels, None, 1.0, state, entropy,
                                                 g, g, -100, config=config)
                else:
                    def fn(config=config):
                        adaptive_sample_forward(logits, None, seed, row_ids,
                                                base_temperature=1.0, tau=0.05, paper=True,
                                                eps=1e-8, config=config)
                try:
                    fn()
                    torch.cuda.synchronize()
                    ms = bench(fn)
                except Exception as exc:  # noqa: BLE001 - a config the compiler rejects
                    print(f"{dtype_name} {pass_} {tuple(config)} failed: {str(exc)[:120]}",
                          file=sys.stderr)
                    continue
                pct = 100 * (traffic / ms / 1e6) / copy_gbps
                row = dict(pass_=pass_, dtype=dtype_name, n=n_rows, v=vocab,
                           block_v=config.block_v, num_warps=config.num_warps,
                           num_stages=config.num_stages, ms=ms, pct_copy=pct,
                           copy_gbps=copy_gbps, shipped=config == shipped)
                rows.append(row)
                print(f"{dtype_name:>8} {pass_:<8} {config.block_v:5d}x{config.num_warps:<2d}"
                      f"x{config.num_stages} | {ms:7.3f} ms {pct:5.1f}% of copy"
                      f"{'  <- shipped' if row['shipped'] else ''}", flush=True)
        del logits, labels, g
        torch.cuda.empty_cache()
    best: dict[tuple[str, str], dict] = {}
    for row in rows:
        key = (row["pass_"], row["dtype"])
        if key not in best or row["ms"] < best[key]["ms"]:
            best[key] = row
    proposal = ",".join(f"{p}:{d}:{r['block_v']}x{r['num_warps']}x{r['num_stages']}"
                        for (p, d), r in best.items())
    print(f"# fastest per pass (a proposal, not applied): {proposal}", file=sys.stderr)
    if args.best_to and rows:
        with open(args.best_to, "w") as handle:
            handle.write(proposal + "\n")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernel_sweep.json"), "w") as handle:
            json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                           triton=triton.__version__, timing="kernel only, do_bench median",
                           rows=rows, fastest=proposal), handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
