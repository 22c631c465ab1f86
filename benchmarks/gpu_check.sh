#!/usr/bin/env bash
# GPU check, one call: install, every CUDA test, the kernel sweep, the GPU benchmark, and the
# README's benchmark section generated from that one run.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (from the repository root)
#
# Designed to end within 9 minutes on an H200 (each step runs under `timeout`; the benchmark
# starts no new case after BENCH_BUDGET_S and writes partial results if it is stopped).
# Worst case: env + install ~20 s, pytest ≤ PYTEST_TIMEOUT_S (150), sweep ≤ SWEEP_BUDGET_S +
# 40 (90), benchmark ≤ BENCH_TIMEOUT_S (270), report ~5 s: 535 s.
#
# What it measures, all in one results folder, with the shipped kernel configurations
# (HAPO_OPS_KERNEL_CONFIG is unset; the configurations used are recorded in results.json):
#   - HAPO_TEST_CUDA=1 python -m pytest -q tests/  (all CUDA tests, the batch-invariance
#     test at 16384 rows included)
#   - kernel sweep: forward, backward and sampler kernels alone, each pass with its own list
#     of configurations, the shipped one first (tuning data only: never in the README table)
#   - the copy bandwidth, measured once at the start of the benchmark; every kernel row's %
#     of it (targets: forward ≥ 95%, forward+backward ≥ 90%, sampler ≥ 85% of copy counting
#     its two reads)
#   - log-prob + entropy at bf16 N=16384 V=151936 (forward, forward+backward, in place) and
#     at TRL's shape [8, 1024, 151936] (N=8192) beside TRL's published 0.89 ms (H100), on a
#     separate "published" line; then fp32 and other vocabularies while the budget lasts;
#     peers: torch eager, torch.compile (dynamic=False), Liger-Kernel if its wheel is in .whl/
#   - the fused linear head against the cuBLAS products alone and against cuBLAS + the logits
#     kernel (target: ≤ 1.3× the latter), Liger's fused linear cross entropy if present
#   - the adaptive-temperature sampler (B = 256, 1024) against torch eager
#
# OUT_DIR (default benchmarks/results/gpu-<date>) gets 8 files (the device tool returns at
# most 8 from a folder):
#   env.txt            GPU name, driver, torch / triton / CUDA versions, date, commit, install
#   pytest.log         the CUDA test run
#   gpu_check.log      progress of every step, the sweep's table, the benchmark's tables
#   kernel_sweep.json  the sweep
#   results.json       the benchmark (metadata: GPU, versions, date, kernel configs, copy BW)
#   results.md         its tables
#   README_section.md  python -m benchmarks.report OUT_DIR: what the README pastes
#   logprob_bandwidth_bf16_forward.png  (when matplotlib imports)
#
# Environment: PYTHON (python3), PYTEST_TIMEOUT_S (150), SWEEP_BUDGET_S (50),
# BENCH_BUDGET_S (190), BENCH_TIMEOUT_S (270), PYTEST_ARGS, BENCH_ARGS (default
# "--only logprob,linear,sampler --quick"), DRY_RUN=1 (CPU: checks the plumbing with tiny
# shapes under Triton's interpreter; nothing it prints is a GPU number).

set -u -o pipefail
export PYTHONUNBUFFERED=1
unset HAPO_OPS_KERNEL_CONFIG   # the shipped rule, always

cd "$(dirname "$0")/.."
OUT_DIR="${1:-benchmarks/results/gpu-$(date +%F)}"
PY="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
started=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - started ))s] $*" | tee -a "$LOG" >&2; }

# --- environment --------------------------------------------------------------------------
{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo none)"
    git status --short 2>/dev/null | head -n 20
    nvidia-smi -q 2>&1 | head -n 40
    nvidia-smi 2>&1
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton import failed:", exc)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
} > "$OUT_DIR/env.txt" 2>&1
say "$(grep -E '^(torch|triton|gpu) ' "$OUT_DIR/env.txt" | tr '\n' ';')"

# --- install ------------------------------------------------------------------------------
import_check() { (cd /tmp && "$PY" -c "import hapo_ops, hapo_ops.kernels; print(hapo_ops.__file__)"); }
RUN_DIR="$PWD"
if [ "$DRY_RUN" = 1 ]; then
    import_check >> "$OUT_DIR/env.txt" 2>&1
    install_rc=$?
else
    { "$PY" -m pip install -q --no-build-isolation --no-deps -e . && import_check; } \
        >> "$OUT_DIR/env.txt" 2>&1
    install_rc=$?
fi
if [ $install_rc -ne 0 ]; then
    # Fallback (e.g. a setuptools too old for this pyproject): lay the package out by hand in
    # a copy of the tree, and run from there (python -m puts the working directory first on
    # sys.path, where ./hapo_ops lacks the kernels subpackage).
    say "editable install failed; running from a hand-made copy (see env.txt)"
    RUN_DIR=/tmp/hapo_ops_run
    rm -rf "$RUN_DIR" && mkdir -p "$RUN_DIR"
    cp -r hapo_ops tests benchmarks pyproject.toml "$RUN_DIR/" \
        && cp -r kernels "$RUN_DIR/hapo_ops/kernels"
    export PYTHONPATH="$RUN_DIR${PYTHONPATH:+:$PYTHONPATH}"
    import_check >> "$OUT_DIR/env.txt" 2>&1 || say "hapo_ops does not import (env.txt)"
fi
if ls .whl/liger_kernel-*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/liger_site \
        .whl/liger_kernel-*.whl >> "$OUT_DIR/env.txt" 2>&1 \
        && export PYTHONPATH="/tmp/liger_site${PYTHONPATH:+:$PYTHONPATH}"
fi
say "installed"
cd "$RUN_DIR"

# --- tests --------------------------------------------------------------------------------
if [ "$DRY_RUN" = 1 ]; then
    say "pytest: dry run, the batch-invariance test only (skips without CUDA)"
    timeout -k 10 "${PYTEST_TIMEOUT_S:-150}" "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_batch_invariance.py 2>&1 | tee "$OUT_DIR/pytest.log" | tail -n 3
    test_rc=$?
else
    say "pytest, all CUDA tests (limit ${PYTEST_TIMEOUT_S:-150} s)"
    HAPO_TEST_CUDA=1 timeout -k 10 "${PYTEST_TIMEOUT_S:-150}" \
        "$PY" -m pytest -q -p no:cacheprovider tests/ ${PYTEST_ARGS:-} 2>&1 \
        | tee "$OUT_DIR/pytest.log" | tail -n 5
    test_rc=$?
fi
say "pytest rc=$test_rc: $(tail -n 1 "$OUT_DIR/pytest.log")"

# --- kernel configuration sweep -------------------------------------------------------------
# Kernel-only tuning data (forward, backward and sampler, each with its own configurations);
# it proposes configurations (best_config in gpu_check.log) but the benchmark below never
# uses them: it runs the shipped rule.
say "kernel sweep (budget ${SWEEP_BUDGET_S:-50} s)"
timeout -k 10 "$(( ${SWEEP_BUDGET_S:-50} + 40 ))" "$PY" -m benchmarks.kernel_sweep \
    --budget-s "${SWEEP_BUDGET_S:-50}" --out "$OUT_DIR" 2>&1 | tee -a "$LOG"
sweep_rc=$?
say "sweep rc=$sweep_rc (2: no GPU)"

# --- benchmark ----------------------------------------------------------------------------
bench_args="${BENCH_ARGS:---only logprob,linear,sampler --quick}"
device_args="--device cuda"
if [ "$DRY_RUN" = 1 ]; then bench_args="--only logprob,linear,sampler --smoke"; device_args=""; fi
say "benchmark $bench_args (budget ${BENCH_BUDGET_S:-190} s, limit ${BENCH_TIMEOUT_S:-270} s)"
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout -k 20 "${BENCH_TIMEOUT_S:-270}" \
    "$PY" -m benchmarks $device_args $bench_args --budget-s "${BENCH_BUDGET_S:-190}" \
    --out "$OUT_DIR" 2>&1 | tee -a "$LOG"
bench_rc=$?
say "benchmark rc=$bench_rc"

# --- the README section, from this folder alone ----------------------------------------------
"$PY" -m benchmarks.report "$OUT_DIR" > "$OUT_DIR/README_section.md" 2>> "$LOG"
report_rc=$?
say "report rc=$report_rc -> README_section.md"

ls -la "$OUT_DIR" >&2
say "done: pytest rc=$test_rc, sweep rc=$sweep_rc, benchmark rc=$bench_rc, report rc=$report_rc"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$report_rc" -eq 0 ]
