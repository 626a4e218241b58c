#!/usr/bin/env python3
"""The one install step of run.sh and .ci/run: the right torch build for this machine, then the requirements.

    python3 tools/install.py             # torch + requirements.txt (what train_gpt.py needs)
    python3 tools/install.py --dev       # torch + requirements-dev.txt (adds pytest, scipy, matplotlib)
    python3 tools/install.py --dry-run   # say what it would install, install nothing

torch comes first, because a bare `torch` requirement makes pip take PyPI's Linux wheel, a CUDA build that pulls
~20 nvidia packages (GBs) even onto a machine without a GPU:
- an installed CUDA build of torch is never replaced, whether or not a GPU answers here (nvidia-smi can be
  missing in a container that has one): FlashAttention and other extensions are built against it. At MIN_TORCH
  or newer it is kept; older, one line says which version train_gpt.py needs and why, and nothing is installed;
- an installed CPU build at MIN_TORCH or newer is kept on a machine without a GPU;
- no NVIDIA GPU (nvidia-smi missing or failing): the CPU build torch==2.13.0+cpu, from PyTorch's CPU wheel index
  (download.pytorch.org/whl/cpu) when it answers within a few seconds, else from pip's own sources (a local wheel
  folder, a mirror); never a CUDA build: without a +cpu wheel anywhere pip fails with one line;
- an NVIDIA GPU and no CUDA torch: the CUDA build for the CUDA version the driver reports (nvidia-smi's "CUDA
  Version"): the newest of the CUDA_BUILDS the driver can run, from download.pytorch.org/whl/<build>; pip's
  default source when that index does not answer. A CPU build in the way is uninstalled first.
Then `pip install -r requirements.txt` (or -dev), skipped when every package listed there is already installed.
The decision is decide_torch(), a pure function (tests/test_install.py).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The oldest torch train_gpt.py runs on (its own start-up check says the same): scaled_dot_product_attention's and
# flex_attention's enable_gqa (grouped-query attention without copying K and V) came in torch 2.5.
MIN_TORCH = (2, 5)
MIN_TORCH_WHY = "scaled_dot_product_attention and flex_attention take enable_gqa from torch 2.5 on"
CPU_TORCH = "torch==2.13.0+cpu"  # the version the CPU tests run on
WHEEL_INDEX = "https://download.pytorch.org/whl"
# PyTorch's CUDA builds (index name, lowest driver CUDA version that runs it), newest first.
CUDA_BUILDS = (("cu130", (13, 0)), ("cu128", (12, 8)), ("cu126", (12, 6)))
PROBE_TIMEOUT_S = 4


@dataclass
class Plan:
    pip_args: list[str] = field(default_factory=list)  # arguments after `pip install`; empty: nothing to install
    why: str = ""
    uninstall_first: bool = False  # a torch build of the wrong kind is in the way


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def decide_torch(
    installed: str | None, installed_is_cuda: bool, driver_cuda: tuple[int, int] | None, reachable
) -> Plan:
    """What to install for torch. installed: the installed torch version (None: none); installed_is_cuda: it is a
    CUDA build; driver_cuda: the CUDA version the NVIDIA driver supports (None: no working NVIDIA GPU);
    reachable(url) -> bool: whether a wheel index answers."""
    recent = installed is not None and version_tuple(installed) >= MIN_TORCH
    needed = ".".join(map(str, MIN_TORCH))
    if installed is not None and installed_is_cuda and not recent:
        raise SystemExit(
            f"error: torch {installed} (a CUDA build) is installed, and train_gpt.py needs torch >= {needed} "
            f"({MIN_TORCH_WHY}); install.py never replaces a CUDA torch (extensions such as FlashAttention are "
            f"built against it): install torch >= {needed} for your CUDA yourself, then run this again"
        )
    if driver_cuda is None:
        if recent:
            return Plan(why=f"torch {installed} is installed (>= {needed}); no NVIDIA GPU")
        index = f"{WHEEL_INDEX}/cpu"
        if reachable(index):
            return Plan([CPU_TORCH, "--extra-index-url", index], f"no NVIDIA GPU: the CPU build from {index}")
        return Plan([CPU_TORCH], f"no NVIDIA GPU and {index} does not answer: the CPU build from pip's own sources")
    if recent and installed_is_cuda:
        return Plan(
            why=f"torch {installed} (a CUDA build) is installed; the driver supports CUDA "
            f"{driver_cuda[0]}.{driver_cuda[1]}"
        )
    build = next((name for name, lowest in CUDA_BUILDS if driver_cuda >= lowest), None)
    wanted = f"torch>={needed}"
    replace = installed is not None  # a CPU build on a GPU machine (a CUDA build was kept or refused above)
    if build is None:
        oldest = CUDA_BUILDS[-1]
        raise SystemExit(
            f"error: the NVIDIA driver supports CUDA {driver_cuda[0]}.{driver_cuda[1]}; the oldest "
            f"CUDA build of torch known here ({oldest[0]}) needs {oldest[1][0]}.{oldest[1][1]}: "
            f"update the driver, or install torch yourself and run this again"
        )
    index = f"{WHEEL_INDEX}/{build}"
    if reachable(index):
        return Plan(
            [wanted, "--index-url", index],
            f"driver CUDA {driver_cuda[0]}.{driver_cuda[1]}: the {build} build from {index}",
            replace,
        )
    return Plan(
        [wanted],
        f"driver CUDA {driver_cuda[0]}.{driver_cuda[1]} but {index} does not answer: torch from "
        f"pip's own sources (PyPI's Linux wheels are CUDA builds)",
        replace,
    )


# ----------------------------------------------------------------------------- what the machine has


def installed_torch() -> tuple[str | None, bool]:
    """(version, is a CUDA build) from the package metadata, without importing torch."""
    try:
        version = md.version("torch")
    except md.PackageNotFoundError:
        return None, False
    local = version.partition("+")[2]
    cuda = local.startswith("cu") or any(r.startswith("nvidia-") for r in md.requires("torch") or [])
    return version, cuda and local != "cpu"


def driver_cuda_version() -> tuple[int, int] | None:
    """The CUDA version the NVIDIA driver supports, from nvidia-smi; None without a working NVIDIA GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        r = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", r.stdout)
    return (int(m.group(1)), int(m.group(2))) if r.returncode == 0 and m else None


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/torch/", method="HEAD"), timeout=PROBE_TIMEOUT_S):
            return True
    except Exception:  # DNS failure, refused, timeout, HTTP error: not usable
        return False


def missing_requirements(path: Path) -> list[str]:
    """Names listed in a requirements file (and the files it includes with -r) that are not installed."""
    missing = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r"):
            missing += missing_requirements(path.parent / line[2:].strip())
        elif m := re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line):
            try:
                md.version(m.group(0))
            except md.PackageNotFoundError:
                missing.append(m.group(0))
    return missing


def pip(*args: str, dry_run: bool) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print("+ " + " ".join(command), flush=True)
    if not dry_run and subprocess.run(command).returncode != 0:
        raise SystemExit(f"error: `{' '.join(command)}` failed (its output is above)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--dev", action="store_true", help="requirements-dev.txt (tests, plots) instead of requirements.txt"
    )
    ap.add_argument("--dry-run", action="store_true", help="print the decisions and commands, install nothing")
    args = ap.parse_args(argv)
    version, is_cuda = installed_torch()
    plan = decide_torch(version, is_cuda, driver_cuda_version(), reachable)
    requirements = REPO_ROOT / ("requirements-dev.txt" if args.dev else "requirements.txt")
    missing = missing_requirements(requirements)
    if not (plan.pip_args or missing or args.dry_run):
        return 0  # everything is there: say nothing (run.sh calls this on every run)
    print(f"torch: {plan.why}", flush=True)
    if plan.uninstall_first:
        pip("uninstall", "-y", "torch", dry_run=args.dry_run)
    if plan.pip_args:
        pip("install", *plan.pip_args, dry_run=args.dry_run)
    if plan.pip_args and not args.dry_run:
        missing = missing_requirements(requirements)
    if missing:
        print(f"{requirements.name}: not installed yet: {', '.join(missing)}", flush=True)
        pip("install", "-r", str(requirements), dry_run=args.dry_run)
    else:
        print(f"{requirements.name}: everything is installed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
