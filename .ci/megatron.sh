#!/usr/bin/env bash
# verl's Megatron strategy with HAPO's engine: verl 0.9.x's real Megatron engine (legacy
# mbridge path, megatron-core) with tensor parallelism 2 on two gloo CPU processes
# (tests/test_verl_megatron.py; the CPU shims are in tests/megatron_cpu.py). Its own
# environment, .venv-megatron, on Python 3.12: megatron-core >= 0.17 requires it.
#
# No CPU build of torch for Python 3.12 lies on this project's CI machines, so pip installs
# PyPI's torch 2.13.0 (its CUDA libraries come along; the tests run on the CPU). verl,
# TransferQueue, megatron-core and mbridge are installed with --no-deps, plus what verl's
# Megatron engine imports on CPU (the list of .ci/verl.sh, and einops for mbridge).
# TransformerEngine, apex and Megatron-Bridge are not needed (a local layer spec, the
# legacy mbridge path).
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/common.sh

py312=""
for candidate in "${PYTHON312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
  if [ -n "$candidate" ] && "$candidate" -c \
      "import sys; sys.exit(sys.version_info[:2] != (3, 12))" >/dev/null 2>&1; then
    py312=$candidate
    break
  fi
done
if [ -z "$py312" ]; then
  echo "megatron-core needs Python 3.12: set PYTHON312 to a python3.12 interpreter" >&2
  exit 1
fi

"$py312" -m venv .venv-megatron
. .venv-megatron/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "torch==2.13.0"
echo "torch==2.13.0" > "$constraints"
python -m pip install -q -c "$constraints" \
  "transformers>=5.5.3,<5.11,!=5.6.0" "pytest>=7" "hypothesis>=6" einops
python -m pip install -q --no-deps "verl>=0.9,<0.10" "transferqueue>=0.1.10" \
  "megatron-core>=0.17,<0.20" "mbridge>=0.15,<0.16"
python -m pip install -q -c "$constraints" \
  ray "tensordict>=0.8.0,!=0.9.0,<=0.10.0" hydra-core codetiming pillow torchdata datasets peft \
  pyzmq msgspec psutil prometheus_client cachetools fastapi uvicorn aiohttp
python -m pip install -q --no-deps -e .

python -m pytest -q -p no:cacheprovider tests/test_verl_megatron.py
