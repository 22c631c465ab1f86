#!/usr/bin/env bash
# Integration tests with the real trainer frameworks: verl 0.9.x and TRL 1.16.x, on CPU.
# One virtual environment, .venv-integrations, holds both (verl needs transformers
# >=5.5.3,<5.11, TRL 1.16 accepts that range; the main environment's newer transformers
# is outside it). As in .ci/run, the CPU torch wheel is installed first where the machine
# keeps one, so that pip never fetches a multi-GB CUDA build.
#
# verl's declared dependencies are large (ray[default], wandb, tensorboard, peft, pandas,
# vllm-era pins, ...), so verl is installed with --no-deps plus the list below, which is
# what `import verl`, its estimator registry, its config machinery (hydra), the actor
# loss utilities and the v1 trainer registry need on CPU (checked against verl 0.9.1:
# `import verl.trainer.ppo.v1` succeeds with exactly these):
#   ray (plain, not [default]), tensordict, hydra-core (omegaconf), codetiming, pillow,
#   torchdata, TransferQueue (--no-deps) with pyzmq, msgspec, psutil, prometheus_client,
#   cachetools, fastapi, uvicorn, aiohttp, peft.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-integrations
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip >/dev/null

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
cpu_torch=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$cpu_torch" ]; then
  python -m pip install -q "$cpu_torch"
  echo "torch==2.13.0" > "$constraints"
fi

# TRL with its dependencies, transformers inside verl's range, the test tools.
python -m pip install -q -c "$constraints" \
  "trl>=1.16,<1.17" "transformers>=5.5.3,<5.11,!=5.6.0" "pytest>=7" "hypothesis>=6"
# verl without its dependency set, then what it needs here (see above).
python -m pip install -q --no-deps "verl>=0.9,<0.10" "transferqueue>=0.1.10"
python -m pip install -q -c "$constraints" \
  ray "tensordict>=0.8.0,!=0.9.0,<=0.10.0" hydra-core codetiming pillow torchdata \
  pyzmq msgspec psutil prometheus_client cachetools fastapi uvicorn aiohttp peft
# hapo-ops itself (its entry point registers the verl plugin); its own dependencies
# (torch, numpy) are already there and triton is not needed on CPU.
python -m pip install -q --no-deps -e .

python -m pytest -q -p no:cacheprovider tests/test_verl_integration.py tests/test_trl_integration.py
