"""scripts/setup.sh for a user without root (a cluster login node): a missing Debian package is one
line naming it and what to do, exit 2, before anything is installed or created; SKIP_APT=1 goes on
without the check. Run for real as user nobody (as the tests' own user where that is not root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

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
