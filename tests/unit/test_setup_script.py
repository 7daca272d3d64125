"""scripts/setup.sh for a user without root (a cluster login node): a missing Debian package is one
line naming it and what to do, exit 2, before anything is installed or created; SKIP_APT=1 goes on
without the check. Run for real as user nobody (as the tests' own user where that is not root).
On a GPU node with a driver the venv's torch cannot use, it names the build that fits and how to
install it; TORCH_CUDA installs that build (the tests of the last part of this file)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_nvidia import fake_nvidia_smi, path_with

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
NOT_INSTALLED = "rkan-dist-no-such-package"
NOBODY = 65534


@pytest.fixture
def checkout() -> Iterator[Path]:
    """The files setup.sh reads, in a folder user nobody can enter (the clone's parents may be closed)."""
    folder = Path(tempfile.mkdtemp(prefix="rkan-setup-"))
    try:
        (folder / "scripts").mkdir()
        shutil.copy2(REPO / "scripts" / "setup.sh", folder / "scripts" / "setup.sh")
        for name in ("pyproject.toml", "constraints.txt"):
            shutil.copy2(REPO / name, folder / name)
        for path in (folder, folder / "scripts"):
            path.chmod(0o755)
        yield folder
    finally:
        shutil.rmtree(folder)


def run_unprivileged(checkout: Path, **env: str) -> subprocess.CompletedProcess:
    command = ["bash", str(checkout / "scripts" / "setup.sh")]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root without setpriv (util-linux): no way to run the script as another user")
        command = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(checkout),
                   "VENV": str(checkout / "venv"), **env}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)


def test_a_missing_package_without_root_is_one_line_and_exit_2(checkout) -> None:
    result = run_unprivileged(checkout, EXTRA_APT=NOT_INSTALLED)
    assert (result.returncode, result.stdout) == (2, ""), result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("setup: error: missing Debian packages:") and f" {NOT_INSTALLED};" in line, line
    assert "ask an admin" in line and "conda-forge" in line and "SKIP_APT=1" in line, line
    assert not (checkout / "venv").exists()


def test_skip_apt_goes_on_to_the_venv_without_the_check(checkout) -> None:
    # PYTHON=false: the venv step fails at once, which shows the script got past the packages.
    result = run_unprivileged(checkout, EXTRA_APT=NOT_INSTALLED, SKIP_APT="1", PYTHON="false")
    assert "missing Debian packages" not in result.stderr, result.stderr
    assert result.stdout.startswith("setup: creating/updating venv"), result.stdout + result.stderr
    assert result.returncode == 1


# ----------------------------------------------------------------------------- the NVIDIA driver
# On a GPU node (a stand-in nvidia-smi first on PATH) setup.sh reads the driver and, where the torch
# of the venv cannot use it, says which build can and how to install it. Run as this user: nothing
# here needs the refusal's unprivileged user. PYTHON=false stops each run at the venv step, after
# the advice, so no venv is made; the TORCH_CUDA install runs against a stand-in venv python that
# records its pip commands instead of downloading.

def pinned(name: str) -> str:
    (line,) = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith(f"{name}==")]
    return line.split("==", 1)[1]


def run_on_gpu_node(checkout: Path, tmp_path: Path, driver: str | None, **env: str) -> subprocess.CompletedProcess:
    path = path_with(fake_nvidia_smi(tmp_path / "bin", driver=driver)) if driver else os.environ.get("PATH", "")
    environment = {"PATH": path, "HOME": str(checkout), "VENV": str(checkout / "venv"), "SKIP_APT": "1",
                   "PYTHON": "false", **env}
    return subprocess.run(["bash", str(checkout / "scripts" / "setup.sh")], env=environment, capture_output=True,
                          text=True, timeout=60)


def test_an_old_driver_is_told_the_build_that_fits_and_how_to_install_it(checkout, tmp_path) -> None:
    result = run_on_gpu_node(checkout, tmp_path, "550.54.15")
    torch, vision = pinned("torch"), pinned("torchvision")
    first, second = result.stderr.splitlines()
    assert first == (f"setup: NVIDIA driver 550.54.15 here, but the torch {torch} this venv gets is built for CUDA "
                     "13.0, which needs driver R580 or newer: it cannot use these GPUs (`device: auto` stops; "
                     "train.device=cpu trains on the CPU)")
    assert second == (f"setup: the build for driver R550: `TORCH_CUDA=cu126 make setup` installs torch=={torch}+cu126 "
                      f"and torchvision=={vision}+cu126 from https://download.pytorch.org/whl/cu126")
    assert result.stdout.startswith("setup: creating/updating venv")  # the advice holds nothing up


def test_a_driver_older_than_every_build_is_told_so(checkout, tmp_path) -> None:
    _, second = run_on_gpu_node(checkout, tmp_path, "470.256.02").stderr.splitlines()
    assert second.startswith(f"setup: no CUDA build of torch {pinned('torch')} runs on driver R470: ask for R580 or newer")


def test_a_driver_the_build_fits_and_a_cpu_machine_get_no_advice(checkout, tmp_path) -> None:
    assert run_on_gpu_node(checkout, tmp_path, "580.65.06").stderr == ""
    assert run_on_gpu_node(checkout, tmp_path, "550.54.15", TORCH_CUDA="cu126").stderr == ""
    assert run_on_gpu_node(checkout, tmp_path, None).stderr == ""  # no nvidia-smi: nothing changes


def test_the_venv_s_own_build_is_what_counts(checkout, tmp_path) -> None:
    version_file = checkout / "venv" / "lib" / "python3.11" / "site-packages" / "torch" / "version.py"
    version_file.parent.mkdir(parents=True)
    version_file.write_text("cuda: Optional[str] = '12.6'\n")
    assert run_on_gpu_node(checkout, tmp_path, "550.54.15").stderr == ""
    version_file.write_text("cuda: Optional[str] = None\n")
    first, second = run_on_gpu_node(checkout, tmp_path, "580.65.06").stderr.splitlines()
    assert "is a CPU-only build: it cannot use these GPUs" in first and "`TORCH_CUDA=cu130 make setup`" in second


def test_torch_cuda_installs_that_build_at_the_pinned_versions_and_is_remembered(checkout, tmp_path) -> None:
    bin_folder = checkout / "venv" / "bin"
    bin_folder.mkdir(parents=True)
    (bin_folder / "python").write_text(f'#!/bin/sh\necho "$*" >> {checkout / "pip.log"}\n')
    (bin_folder / "python").chmod(0o755)
    result = run_on_gpu_node(checkout, tmp_path, None, TORCH_CUDA="cu126")
    assert result.returncode == 0, result.stdout + result.stderr
    torch, vision = pinned("torch"), pinned("torchvision")
    constraints = checkout / "venv" / ".rkan-dist-constraints-cu126.txt"
    assert (checkout / "pip.log").read_text().splitlines()[1:3] == [
        f"-m pip install -q -c {constraints} --index-url https://download.pytorch.org/whl/cu126 "
        f"torch=={torch}+cu126 torchvision=={vision}+cu126",
        f"-m pip install -q -c {constraints} -e .[dev]"]
    kept = constraints.read_text().splitlines()
    assert f"torch=={torch}" in kept and not [line for line in kept if line.startswith(("nvidia-", "cuda-"))]
    (checkout / "pip.log").unlink()
    again = run_on_gpu_node(checkout, tmp_path, None)  # a later target, TORCH_CUDA unset: the build stays
    assert "creating/updating venv" not in again.stdout and "pip install -q -c" not in (checkout / "pip.log").read_text()


def test_an_unknown_torch_cuda_is_one_line_and_exit_2(checkout, tmp_path) -> None:
    result = run_on_gpu_node(checkout, tmp_path, None, TORCH_CUDA="cuda12")
    assert (result.returncode, result.stdout) == (2, ""), result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("setup: error: TORCH_CUDA=cuda12 names no torch build")
