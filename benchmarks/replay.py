"""Sampling replay: log-prob + entropy under the truncated distribution a rollout engine
sampled from, against the plain (full-vocabulary) op at the same shape.

Cases, each forward and forward+backward, per implementation (torch; Triton on CUDA, or
under ``--smoke`` in the interpreter):
  plain         logprobs_and_entropy(logits, labels, temperature=T)
  kept-K        ... kept_ids=(N, K) the engine's kept sets (K = 64 and 1024 ids, padded
                with -1): a gather of N·K logits, statistics over (N, K), and in backward
                a scatter into a zeroed N×V gradient
  top-k         ... top_k=50 (threshold search: one pass per 8 key bits in torch, per 4
                in Triton, only over the bits of the dtype: 2 or 4 passes for bf16)
  top-p         ... top_p=0.9 (a row-max pass, then the mass passes)
  top-k+top-p   ... top_k=50, top_p=0.9 (both searches)
The "vs plain" column is the case's time and memory over plain's (same impl, mode, shape).

Shapes: V = 151936 (Qwen), bf16; N = 64 on CPU (16 with --quick), 4096 on CUDA.
``python -m benchmarks.replay [--quick] [--device cpu|cuda]`` prints the table alone.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch

from benchmarks.common import Result, TimingConfig, log, measure, release_memory, short_error

VOCAB = 151936
TOP_K, TOP_P = 50, 0.9
KEPT_WIDTHS = (64, 1024)


def _kept_ids(logits: torch.Tensor, width: int) -> torch.Tensor:
    """(N, width) kept sets: the row's top (width - 8) ids, shuffled, padded with -1."""
    ids = logits.float().topk(width - 8, dim=-1).indices
    ids = ids.gather(-1, torch.rand(ids.shape, device=ids.device).argsort(-1))
    pad = torch.full((ids.shape[0], 8), -1, dtype=torch.int64, device=ids.device)
    return torch.cat([ids, pad], dim=-1)


def cases(logits: torch.Tensor) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = [("plain", {})]
    out += [(f"kept-{k}", {"kept_ids": _kept_ids(logits, k)}) for k in KEPT_WIDTHS]
    out += [("top-k", {"top_k": TOP_K}), ("top-p", {"top_p": TOP_P}),
            ("top-k+top-p", {"top_k": TOP_K, "top_p": TOP_P})]
    return out


def _call(logits: torch.Tensor, labels: torch.Tensor, temperature: torch.Tensor, impl: str,
          kwargs: dict, backward: bool) -> Callable[[], object]:
    from hapo_ops import logprobs_and_entropy

    def fn() -> object:
        leaf = logits.detach().requires_grad_(backward)
        logp, entropy = logprobs_and_entropy(leaf, labels, temperature=temperature, impl=impl,
                                             **kwargs)
        if backward:
            loss = torch.where(torch.isfinite(logp), logp, 0.0).sum() + entropy.sum()
            loss.backward()
            return leaf.grad
        return logp, entropy
    return fn


def plan(device: torch.device, *, quick: bool, smoke: bool) -> tuple[int, int, list[str]]:
    """(N, V, impls)."""
    if smoke:
        return 4, 3000, ["torch", "triton"]
    if device.type == "cuda":
        return 4096, VOCAB, ["triton", "torch"]
    return (16 if quick else 64), VOCAB, ["torch"]


def run(device: torch.device, config: TimingConfig, results: list[Result], *, quick: bool,
        smoke: bool, copy_gbps: float | None = None, deadline: float = math.inf) -> None:
    """Append one row per (impl, case, mode) to ``results``."""
    n_rows, vocab, impls = plan(device, quick=quick, smoke=smoke)
    dtype = torch.bfloat16
    log(f"replay: N={n_rows} V={vocab} impls {impls}")
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(n_rows, vocab, device=device, generator=gen).mul_(2.0).to(dtype)
        labels = torch.randint(0, vocab, (n_rows,), device=device, generator=gen)
        labels[: n_rows // 2] = logits[: n_rows // 2].argmax(-1)   # kept under every rule
        temperature = torch.rand(n_rows, device=device, generator=gen).add_(0.5)
        all_cases = cases(logits)
    except Exception as exc:  # noqa: BLE001
        log(f"replay inputs: {short_error(exc)}")
        return
    itemsize = logits.element_size()
    for impl in impls:
        for mode in ("forward", "forward+backward"):
            backward = mode != "forward"
            for name, kwargs in all_cases:
                result = Result(suite="replay", name=f"{impl}/{name}", mode=mode,
                                dtype=str(dtype).removeprefix("torch."),
                                shape=[n_rows, vocab],
                                baseline=None if name == "plain" else f"{impl}/plain")
                if time.monotonic() > deadline:
                    result.status, result.note = "skipped", "time budget spent"
                else:
                    measure(result, _call(logits, labels, temperature, impl, kwargs, backward),
                            device, config)
                result.set_bandwidth((3 if backward else 1) * n_rows * vocab * itemsize,
                                     copy_gbps)
                results.append(result)
                log(f"replay {impl:<6} {name:<12} {mode:<16}: "
                    + (f"{result.median_ms:.2f} ms" if result.median_ms else result.status))
    del logits
    release_memory(device)


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replay")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results: list[Result] = []
    run(device, TimingConfig.for_device(device, args.quick), results, quick=args.quick,
        smoke=False)
    from benchmarks import report
    print(report.replay_table({"results": [dataclasses.asdict(r) for r in results]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
