#!/usr/bin/env bash
# GPU check: install, run the test suite on CUDA, benchmark log-prob + entropy.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (from the repository root)
#
# Everything lands in OUT_DIR (default benchmarks/results/gpu-<date>), 8 files:
#   env.txt      nvidia-smi -q header, GPU name, torch / triton / CUDA versions, install log
#   pytest.log   HAPO_TEST_CUDA=1 python -m pytest tests -q
#   bench.log    python -m benchmarks --device cuda --only logprob (progress + tables)
#   sweep.log    python -m benchmarks.kernel_sweep (block sizes and warps of the kernels)
#   results.json, results.md, logprob_bandwidth_bf16_forward.png, kernel_sweep.json
# Designed to end in under 8 minutes: each step runs under `timeout`, the benchmark starts
# no new case after BENCH_BUDGET_S and writes partial results if it is stopped.
# Optional: Liger-Kernel wheels in .whl/ (liger_kernel-*.whl) are installed to a temp dir.
#
# Environment: PYTHON (default python3), PYTEST_TIMEOUT_S (150), BENCH_BUDGET_S (180),
# SWEEP_BUDGET_S (50), BENCH_TIMEOUT_S (250), PYTEST_ARGS (extra pytest arguments),
# BENCH_ARGS (default "--only logprob --quick"; "--quick" adds the trainer-side ops, ~20 s).

set -u -o pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.."
OUT_DIR="${1:-benchmarks/results/gpu-$(date +%F)}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
started=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - started ))s] $*" >&2; }

# --- environment --------------------------------------------------------------------------
{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo none)"
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
{
    "$PY" -m pip install -q --no-build-isolation --no-deps -e . && import_check
} >> "$OUT_DIR/env.txt" 2>&1
install_rc=$?
RUN_DIR="$PWD"
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

# --- tests --------------------------------------------------------------------------------
say "pytest (limit ${PYTEST_TIMEOUT_S:-150} s)"
cd "$RUN_DIR"
HAPO_TEST_CUDA=1 timeout -k 10 "${PYTEST_TIMEOUT_S:-150}" \
    "$PY" -m pytest tests -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$OUT_DIR/pytest.log" | tail -n 5
test_rc=$?
say "pytest rc=$test_rc"

# --- kernel configuration sweep -------------------------------------------------------------
# Times block sizes and warps of the kernels alone; the fastest forward config per dtype is
# then used by the benchmark below (HAPO_OPS_KERNEL_CONFIG), so that pick_config's rule can
# be updated from these numbers.
say "kernel sweep (budget ${SWEEP_BUDGET_S:-50} s)"
timeout -k 10 "$(( ${SWEEP_BUDGET_S:-50} + 40 ))" "$PY" -m benchmarks.kernel_sweep \
    --budget-s "${SWEEP_BUDGET_S:-50}" --out "$OUT_DIR" --best-to /tmp/hapo_best_config \
    2>&1 | tee "$OUT_DIR/sweep.log"
say "sweep rc=$?"
if [ -s /tmp/hapo_best_config ]; then
    export HAPO_OPS_KERNEL_CONFIG="$(cat /tmp/hapo_best_config)"
    say "benchmark uses HAPO_OPS_KERNEL_CONFIG=$HAPO_OPS_KERNEL_CONFIG"
fi

# --- benchmark ----------------------------------------------------------------------------
say "benchmark (budget ${BENCH_BUDGET_S:-180} s, limit ${BENCH_TIMEOUT_S:-250} s)"
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout -k 20 "${BENCH_TIMEOUT_S:-250}" \
    "$PY" -m benchmarks --device cuda ${BENCH_ARGS:---only logprob --quick} \
    --budget-s "${BENCH_BUDGET_S:-180}" --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench.log"
bench_rc=$?
say "benchmark rc=$bench_rc"

ls -la "$OUT_DIR" >&2
say "done: pytest rc=$test_rc, benchmark rc=$bench_rc"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
