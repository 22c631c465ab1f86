#!/usr/bin/env bash
# verl integration tests: verl 0.9.x's own worker, engine, trainer classes and agent loop on
# CPU (tests/test_verl_integration.py). Its own environment, .venv-verl: verl pins
# transformers >=5.5.3,<5.11, and TRL stays out of it (verl's monkey_patch.py imports a
# class that TRL 1.16 removed). As in .ci/run, the CPU torch wheel is installed first where
# the machine keeps one, so that pip never fetches a multi-GB CUDA build.
#
# verl's declared dependencies are large (ray[default], wandb, tensorboard, vllm-era pins),
# so verl is installed with --no-deps plus what its trainer, worker, FSDP engine and agent
# loop import on CPU (checked against verl 0.9.1): ray (plain), tensordict, hydra-core,
# codetiming, pillow, torchdata, datasets, peft, TransferQueue (--no-deps) with pyzmq,
# msgspec, psutil, prometheus_client, and cachetools, fastapi, uvicorn, aiohttp (the v1
# trainer's imports that verl does not declare; the "verl" extra lists those).
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/common.sh

fresh_venv .venv-verl

python -m pip install -q -c "$constraints" \
  "transformers>=5.5.3,<5.11,!=5.6.0" "pytest>=7" "hypothesis>=6"
python -m pip install -q --no-deps "verl>=0.9,<0.10" "transferqueue>=0.1.10"
python -m pip install -q -c "$constraints" \
  ray "tensordict>=0.8.0,!=0.9.0,<=0.10.0" hydra-core codetiming pillow torchdata datasets peft \
  pyzmq msgspec psutil prometheus_client cachetools fastapi uvicorn aiohttp
# hapo-ops itself (its entry point registers the verl plugin); torch and numpy are there,
# triton is not needed on CPU.
python -m pip install -q --no-deps -e .

python -m pytest -q -p no:cacheprovider tests/test_verl_integration.py tests/test_verl_ray.py
