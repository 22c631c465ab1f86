"""Install hapo-ops from this clone, with the PyTorch build that suits this machine.

    python install.py                  # the package (PyTorch, NumPy)
    python install.py test             # with extras, comma-separated, as in pip's ".[test]"
    python install.py --dry-run test   # print the pip commands, run nothing

Two pip commands, run with this Python (so inside whatever virtual environment is active):

1. PyTorch, only if this Python has none yet. On Linux without an NVIDIA driver
   (``nvidia-smi`` missing or failing) the CPU build, from PyTorch's CPU index
   (``pip install torch --index-url https://download.pytorch.org/whl/cpu``): a plain
   ``pip install torch`` there would bring the CUDA build, several GB of CUDA libraries a
   CPU cannot use. The newest ``+cpu`` version pip can see is asked for by its exact
   version, so that a pip configured with further indexes or local wheel folders (which
   ``--index-url`` does not replace) still gets a CPU build. Everywhere else nothing is done here and step 2 takes PyPI's torch (the
   CUDA build on Linux with an NVIDIA GPU, which also brings Triton; the CPU/MPS build on
   macOS and Windows). An installed torch is always kept, whatever its build (ROCm, a
   custom CUDA, a pinned version): install such a build first, then run this.
2. ``pip install -e ".[EXTRAS]"``: this package in editable mode, with torch's own
   dependencies and the extras' packages from PyPI.

``--torch cpu`` or ``--torch pypi`` overrides the detection of step 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
ROOT = os.path.dirname(os.path.abspath(__file__))


def has_nvidia_gpu() -> bool:
    """True when ``nvidia-smi -L`` runs and lists a GPU (a driver and a device)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def torch_build(*, has_torch: bool, system: str, nvidia_gpu: bool, choice: str = "auto") -> str | None:
    """Where step 1 takes torch from: "cpu" (PyTorch's CPU index) or None (nothing to do in
    step 1: torch is installed, or step 2 takes PyPI's build)."""
    if choice not in ("auto", "cpu", "pypi"):
        raise ValueError(f"--torch must be one of ('auto', 'cpu', 'pypi'), got {choice!r}")
    if has_torch or choice == "pypi":
        return None
    if choice == "cpu" or (system == "Linux" and not nvidia_gpu):
        return "cpu"
    return None


def newest_cpu_version(index_versions_output: str) -> str | None:
    """The first (newest) ``+cpu`` version in the output of ``pip index versions torch``
    ("Available versions: 2.9.1+cpu, 2.9.0+cpu, ..."), or None."""
    listed = re.search(r"Available versions:(.*)", index_versions_output)
    if listed is None:
        return None
    versions = [v.strip() for v in listed.group(1).split(",")]
    return next((v for v in versions if v.endswith("+cpu")), None)


def cpu_torch_requirement(python: str = sys.executable) -> str:
    """``torch==<newest +cpu version>`` as pip sees it with PyTorch's CPU index, or plain
    ``torch`` when that cannot be told (``pip index`` missing or failing)."""
    try:
        listed = subprocess.run([python, "-m", "pip", "index", "versions", "torch",
                                 "--index-url", CPU_INDEX], capture_output=True, text=True,
                                timeout=600)
    except (OSError, subprocess.SubprocessError):
        return "torch"
    version = newest_cpu_version(listed.stdout) if listed.returncode == 0 else None
    return f"torch=={version}" if version else "torch"


def pip_commands(extras: str, build: str | None, python: str = sys.executable,
                 cpu_torch: str = "torch") -> list[list[str]]:
    """The pip command lines: step 1 (only for the CPU build, installing ``cpu_torch``)
    and step 2."""
    extras = extras.strip()
    if extras and not re.fullmatch(r"[A-Za-z0-9_-]+(,[A-Za-z0-9_-]+)*", extras):
        raise ValueError(f"extras must be comma-separated extra names such as 'test' or "
                         f"'test,plot', got {extras!r}")
    pip = [python, "-m", "pip", "install"]
    commands = []
    if build == "cpu":
        # --no-deps: only torch comes from PyTorch's index; step 2 takes its dependencies
        # (filelock, sympy, ...) from PyPI like every other package.
        commands.append(pip + ["--no-deps", cpu_torch, "--index-url", CPU_INDEX])
    commands.append(pip + ["-e", f".[{extras}]" if extras else "."])
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Install hapo-ops from this clone with the PyTorch build for this machine.")
    parser.add_argument("extras", nargs="?", default="",
                        help="extras, comma-separated: test, triton, plot, transformers, ...")
    parser.add_argument("--torch", default="auto", choices=("auto", "cpu", "pypi"),
                        help="where torch comes from when it is not installed: auto (CPU "
                             "index on Linux without an NVIDIA GPU, else PyPI), cpu, pypi")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)

    has_torch = importlib.util.find_spec("torch") is not None
    nvidia_gpu = has_nvidia_gpu()
    build = torch_build(has_torch=has_torch, system=platform.system(), nvidia_gpu=nvidia_gpu,
                        choice=args.torch)
    if has_torch:
        why = "torch is installed: kept"
    elif build == "cpu":
        why = "no torch; " + ("--torch cpu" if args.torch == "cpu" else "no NVIDIA GPU") + \
              ": the CPU build from PyTorch's CPU index"
    else:
        why = "no torch; " + ("--torch pypi" if args.torch == "pypi" else
                              "NVIDIA GPU" if nvidia_gpu else platform.system()) + \
              ": PyPI's build"
    print(f"[install.py] {why}", flush=True)
    try:
        pip_commands(args.extras, None)  # the extras are checked before pip is asked anything
        cpu_torch = cpu_torch_requirement() if build == "cpu" else "torch"
        commands = pip_commands(args.extras, build, cpu_torch=cpu_torch)
    except ValueError as exc:
        parser.error(str(exc))
    for command in commands:
        print("[install.py] " + " ".join(command), flush=True)
        if not args.dry_run:
            done = subprocess.run(command, cwd=ROOT)
            if done.returncode:
                return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
