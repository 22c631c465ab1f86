"""Block size / warps / stages sweep of the log-prob + entropy kernels on one GPU.

    python -m benchmarks.kernel_sweep [--out DIR] [--budget-s S]

Times the forward and the backward kernels alone (``triton.testing.do_bench``, median) at
the target shape (bf16, N=16384, V=151936) and at fp32 (N=8192, V=151936), next to a
device-to-device copy of the same bytes, so that ``pick_config``'s rule can be checked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

# (dtype, N, V, share of the time budget, configs)
CASES = (
    (torch.bfloat16, 16384, 151936, 0.7,
     ((512, 2, 3), (1024, 2, 3), (1024, 4, 3), (2048, 4, 3), (2048, 8, 3), (4096, 8, 3))),
    (torch.float32, 8192, 151936, 0.3, ((1024, 4, 3), (2048, 4, 3), (2048, 8, 3))),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_sweep")
    parser.add_argument("--out")
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--best-to", metavar="FILE",
                        help="write the fastest forward config per dtype here, in the "
                             "HAPO_OPS_KERNEL_CONFIG format")
    args = parser.parse_args(argv)

    import triton.testing

    from hapo_ops.kernels._common import KernelConfig, pick_config
    from hapo_ops.kernels.logprob_entropy import (logprob_entropy_backward,
                                                  logprob_entropy_forward)

    rows = []
    for dtype, n_rows, vocab, share, configs in CASES:
        started = time.monotonic()
        logits = (torch.randn(n_rows, vocab, device="cuda") * 2).to(dtype)
        labels = torch.randint(0, vocab, (n_rows,), device="cuda")
        nbytes = logits.numel() * logits.element_size()
        copy_dst = torch.empty_like(logits)
        copy_ms = triton.testing.do_bench(lambda: copy_dst.copy_(logits), return_mode="median")
        copy_gbps = 2 * nbytes / copy_ms / 1e6
        del copy_dst
        grad = torch.empty_like(logits)
        g = torch.randn(n_rows, device="cuda")
        default = pick_config(vocab, dtype, "forward")
        print(f"# {dtype} N={n_rows} V={vocab}: copy {copy_ms:.3f} ms = {copy_gbps:.0f} GB/s "
              f"(read+write); rule picks {tuple(default)}", file=sys.stderr)
        for block, warps, stages in configs:
            if time.monotonic() - started > args.budget_s * share:
                print("# budget spent", file=sys.stderr)
                break
            config = KernelConfig(block, warps, stages)
            try:
                _, entropy, state = logprob_entropy_forward(logits, labels, None, 1.0, -100,
                                                            config=config)
                fwd = triton.testing.do_bench(
                    lambda: logprob_entropy_forward(logits, labels, None, 1.0, -100,
                                                    config=config), return_mode="median")
                bwd = triton.testing.do_bench(
                    lambda: logprob_entropy_backward(logits, labels, None, 1.0, state, entropy,
                                                     g, g, -100, config=config),
                    return_mode="median")
            except Exception as exc:  # a config the compiler rejects (e.g. shared memory)
                print(f"{dtype} {tuple(config)} failed: {str(exc)[:120]}", file=sys.stderr)
                continue
            row = dict(dtype=str(dtype).replace("torch.", ""), n=n_rows, v=vocab,
                       block_v=block, num_warps=warps, num_stages=stages,
                       forward_ms=fwd, backward_ms=bwd,
                       forward_pct_copy=100 * (nbytes / fwd / 1e6) / copy_gbps,
                       backward_pct_copy=100 * (2 * nbytes / bwd / 1e6) / copy_gbps,
                       copy_gbps=copy_gbps, rule=config == default)
            rows.append(row)
            print(f"{row['dtype']:>8} block {block:5d} warps {warps:2d} stages {stages} | "
                  f"fwd {fwd:7.3f} ms {row['forward_pct_copy']:5.1f}% | bwd {bwd:7.3f} ms "
                  f"{row['backward_pct_copy']:5.1f}%{'  <- rule' if row['rule'] else ''}",
                  flush=True)
        del logits, grad
        torch.cuda.empty_cache()
    if args.best_to and rows:
        best = {}
        for row in rows:
            if row["dtype"] not in best or row["forward_ms"] < best[row["dtype"]]["forward_ms"]:
                best[row["dtype"]] = row
        with open(args.best_to, "w") as handle:
            handle.write(",".join(f"{d}:{r['block_v']}x{r['num_warps']}" for d, r in best.items()))
    if args.out:
        with open(f"{args.out}/kernel_sweep.json", "w") as handle:
            json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                           rows=rows), handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
