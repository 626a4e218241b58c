"""tools/install.py: which torch build the shared install step of run.sh and .ci/run picks, by its decision
function and by what it reads from the machine (a stand-in nvidia-smi); nothing is installed here."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("install", ROOT / "tools" / "install.py")
install = importlib.util.module_from_spec(spec)
sys.modules["install"] = install
spec.loader.exec_module(install)

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


class Probe:
    """reachable(url) for the decision: answers from a set, and records what was asked."""

    def __init__(self, *up: str):
        self.up, self.asked = set(up), []

    def __call__(self, url: str) -> bool:
        self.asked.append(url)
        return url in self.up


def no_cuda_anywhere(plan) -> bool:
    return not any(re.search(r"cu\d+|nvidia", arg) for arg in plan.pip_args)


def test_no_gpu_installs_the_cpu_build_from_the_cpu_index():
    probe = Probe(CPU_INDEX)
    plan = install.decide_torch(None, False, None, probe)
    assert plan.pip_args == ["torch==2.13.0+cpu", "--extra-index-url", CPU_INDEX]
    assert probe.asked == [CPU_INDEX]  # no CUDA index is even looked at
    assert not plan.uninstall_first


def test_no_gpu_and_no_cpu_index_still_asks_for_the_cpu_build_only():
    plan = install.decide_torch(None, False, None, Probe())
    assert plan.pip_args == ["torch==2.13.0+cpu"]  # pip's own sources (here: a local wheel); +cpu or nothing
    assert no_cuda_anywhere(plan) and "does not answer" in plan.why


@pytest.mark.parametrize(
    "installed, is_cuda", [("2.13.0+cpu", False), ("2.5.0+cpu", False), ("2.9.1+cu128", True), ("2.14.1", True)]
)
def test_no_gpu_keeps_a_recent_torch_whatever_its_build(installed, is_cuda):
    probe = Probe(CPU_INDEX)
    plan = install.decide_torch(installed, is_cuda, None, probe)
    assert plan.pip_args == [] and not plan.uninstall_first and probe.asked == []


def test_no_gpu_replaces_a_cpu_torch_older_than_2_5_with_the_cpu_build():
    plan = install.decide_torch("2.4.1+cpu", False, None, Probe(CPU_INDEX))
    assert plan.pip_args[0] == "torch==2.13.0+cpu" and no_cuda_anywhere(plan)


@pytest.mark.parametrize(
    "driver, build",
    [((13, 2), "cu130"), ((13, 0), "cu130"), ((12, 9), "cu128"), ((12, 8), "cu128"), ((12, 6), "cu126")],
)
def test_gpu_gets_the_newest_cuda_build_its_driver_runs(driver, build):
    index = f"https://download.pytorch.org/whl/{build}"
    probe = Probe(index)
    plan = install.decide_torch(None, False, driver, probe)
    assert plan.pip_args == ["torch>=2.5", "--index-url", index]
    assert probe.asked == [index] and CPU_INDEX not in probe.asked


def test_gpu_with_a_driver_too_old_for_any_build_stops_with_one_line():
    with pytest.raises(SystemExit) as stop:
        install.decide_torch(None, False, (12, 4), Probe())
    message = str(stop.value)
    assert message.startswith("error: ") and "12.4" in message and "update the driver" in message
    assert "\n" not in message


def test_gpu_replaces_a_cpu_build_and_keeps_a_cuda_build():
    index = "https://download.pytorch.org/whl/cu128"
    plan = install.decide_torch("2.13.0+cpu", False, (12, 8), Probe(index))
    assert plan.uninstall_first and plan.pip_args == ["torch>=2.5", "--index-url", index]
    kept = install.decide_torch("2.11.0", True, (12, 8), Probe(index))
    assert kept.pip_args == [] and not kept.uninstall_first


@pytest.mark.parametrize("driver", [(12, 8), None])
def test_an_old_but_working_cuda_torch_is_left_alone_and_the_requirement_said(driver, monkeypatch, capsys):
    """The field's FlashAttention 3 is built against its torch: install.py never replaces a CUDA build. At 2.5 or
    newer (the records' 2.9.1 among them) it is kept; older, one line says what train_gpt.py needs and why."""
    probe = Probe("https://download.pytorch.org/whl/cu128", CPU_INDEX)
    kept = install.decide_torch("2.9.1+cu128", True, driver, probe)
    assert kept.pip_args == [] and not kept.uninstall_first and probe.asked == []
    with pytest.raises(SystemExit) as stop:
        install.decide_torch("2.4.1+cu124", True, driver, probe)
    message = str(stop.value)
    assert "\n" not in message and message.startswith("error: torch 2.4.1+cu124 (a CUDA build) is installed")
    assert "needs torch >= 2.5 (scaled_dot_product_attention and flex_attention take enable_gqa" in message
    assert "never replaces a CUDA torch" in message and probe.asked == []
    # main() stops there: nothing is uninstalled or installed, requirements.txt included.
    calls = []
    monkeypatch.setattr(install, "pip", lambda *args, dry_run: calls.append(args))
    monkeypatch.setattr(install, "installed_torch", lambda: ("2.4.1+cu124", True))
    monkeypatch.setattr(install, "driver_cuda_version", lambda: driver)
    with pytest.raises(SystemExit):
        install.main([])
    assert calls == []


def test_the_floor_is_the_same_in_install_py_train_gpt_py_and_requirements(tmp_path):
    import train_gpt as tg

    assert install.MIN_TORCH == tg.MIN_TORCH
    floor = ".".join(map(str, install.MIN_TORCH))
    assert f"torch>={floor}" in (ROOT / "requirements.txt").read_text().splitlines()
    tg.check_torch_version(f"{floor}.0+cu124")
    with pytest.raises(tg.Fail, match=r"^torch 2\.4\.1\+cpu is too old: train_gpt.py needs torch >= 2\.5 "):
        tg.check_torch_version("2.4.1+cpu")


def test_gpu_without_the_cuda_index_falls_back_to_pips_sources():
    plan = install.decide_torch(None, False, (12, 8), Probe())
    assert plan.pip_args == ["torch>=2.5"] and "does not answer" in plan.why


# ----------------------------------------------------------------------------- what it reads from the machine


def fake_nvidia_smi(tmp_path, monkeypatch, output: str, status: int = 0):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\nexit {status}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


NVIDIA_SMI_HEADER = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 570.86.15              Driver Version: 570.86.15      CUDA Version: 12.8     |
+-----------------------------------------------------------------------------------------+"""


def test_driver_cuda_version_from_nvidia_smi(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, NVIDIA_SMI_HEADER)
    assert install.driver_cuda_version() == (12, 8)


def test_a_failing_nvidia_smi_means_no_gpu(tmp_path, monkeypatch):
    fake_nvidia_smi(
        tmp_path, monkeypatch, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", status=9
    )
    assert install.driver_cuda_version() is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert install.driver_cuda_version() is None


def test_missing_requirements_follows_includes(tmp_path):
    (tmp_path / "base.txt").write_text("# comment\npip>=1  # the installer itself\nno-such-package-xyz\n")
    (tmp_path / "dev.txt").write_text("-r base.txt\npytest\nanother-missing-one==1.0\n")
    assert install.missing_requirements(tmp_path / "dev.txt") == ["no-such-package-xyz", "another-missing-one"]


def test_dry_run_on_a_machine_without_gpu_installs_nothing_and_never_cuda(tmp_path):
    env = dict(
        os.environ,
        PATH=os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "nvidia-smi").exists()),
    )
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "install.py"), "--dev", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("torch: ") and "no NVIDIA GPU" in r.stdout
    assert not re.search(r"cu\d{3}|nvidia-", r.stdout)


def test_run_sh_and_ci_share_the_install_step():
    for script in ("run.sh", ".ci/run"):
        text = (ROOT / script).read_text()
        assert "tools/install.py" in text, script
        assert "pip install" not in text, f"{script} installs on its own besides tools/install.py"


def test_main_runs_the_plan_in_order_and_is_silent_when_nothing_is_missing(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(install, "pip", lambda *args, dry_run: calls.append(args))
    monkeypatch.setattr(install, "reachable", Probe("https://download.pytorch.org/whl/cu128"))
    monkeypatch.setattr(install, "installed_torch", lambda: ("2.13.0+cpu", False))
    monkeypatch.setattr(install, "driver_cuda_version", lambda: (12, 8))
    monkeypatch.setattr(
        install, "missing_requirements", lambda path: ["pytest"] if path.name.endswith("-dev.txt") else []
    )
    assert install.main(["--dev"]) == 0
    assert calls == [
        ("uninstall", "-y", "torch"),
        ("install", "torch>=2.5", "--index-url", "https://download.pytorch.org/whl/cu128"),
        ("install", "-r", str(ROOT / "requirements-dev.txt")),
    ]
    calls.clear()
    capsys.readouterr()
    monkeypatch.setattr(install, "installed_torch", lambda: ("2.13.0+cu128", True))
    assert install.main([]) == 0
    assert calls == [] and capsys.readouterr().out == ""
