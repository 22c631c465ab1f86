# Sourced by the CI scripts. fresh_venv DIR: a new virtual environment, activated, with the
# CPU build of torch 2.13.0 installed first where the machine keeps one (this project's CI
# machines), so that pip never fetches a multi-GB CUDA build; elsewhere pip resolves torch
# itself. $constraints: a constraints file for later installs, pinning that torch.
cpu_torch=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT

fresh_venv() {
  python3 -m venv "$1"
  . "$1/bin/activate"
  python -m pip install -q --upgrade pip >/dev/null
  if [ -n "$cpu_torch" ]; then
    python -m pip install -q "$cpu_torch"
    echo "torch==2.13.0" > "$constraints"
  fi
}
