"""`rkan-dist bench faults` and the dev cluster: a cluster the bench started is stopped when it ends
(returning or killed), one it found running is left running with only the bench's jobs cancelled.
Real clusters: the session's, and a second one on ports of its own beside it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.faults import dev_cluster

pytestmark = pytest.mark.timeout(180)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEV_CLUSTER = REPO_ROOT / "slurm" / "dev-cluster"
# The bench's block, run in a process of its own so that it can be killed as a user would kill it.
BENCH_BLOCK = """
import time
from bench.faults import dev_cluster
with dev_cluster():
    print("inside", flush=True)
    time.sleep(120)
"""


def free_port_base(count: int) -> int:
    """The first of `count` consecutive free TCP ports: a second cluster's, beside the session's."""
    for base in range(21000, 60000, 101):
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    stack.enter_context(socket.socket()).bind(("", port))
            except OSError:
                continue
            return base
    raise RuntimeError(f"no {count} consecutive free TCP ports in 21000-60000")


def processes_naming(folder: Path) -> list[str]:
    """Command lines of the live processes that name `folder` (a cluster's daemons name its state folder)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = cmdline.with_name("stat").read_text()
            if f"{folder}/" in text and stat.rsplit(")", 1)[1].split()[0] != "Z":  # zombies are gone
                found.append(text)
    return found


def status(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(DEV_CLUSTER / "status.sh")], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def own_cluster_env(slurm, monkeypatch) -> Iterator[tuple[Path, dict[str, str]]]:
    """A state folder and ports no cluster uses, in this process's environment and as an env dict;
    whatever a test leaves running there is stopped afterwards, and the folder removed."""
    folder = Path(tempfile.mkdtemp(prefix="rkan-bench-cluster-"))
    folder.chmod(0o755)  # user munge must enter it
    monkeypatch.setenv("RKAN_SLURM_DIR", str(folder))
    monkeypatch.setenv("RKAN_SLURM_PORT", str(free_port_base(3)))
    try:
        yield folder, dict(os.environ)
    finally:
        subprocess.run([str(DEV_CLUSTER / "stop.sh")], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def test_the_bench_leaves_a_cluster_it_found_running_and_cancels_only_its_jobs(slurm, tmp_path) -> None:
    before = slurm.daemon_pids()
    with dev_cluster() as jobs:
        assert os.environ["SLURM_CONF"] == str(slurm.conf)
        jobs.append(slurm.sbatch("sleep 300", "-N1", "-o", "slurm-%j.out", cwd=tmp_path))
        slurm.wait_for(jobs[0], "RUNNING", timeout=30)
    assert slurm.wait_for(jobs[0], "CANCELLED", timeout=30)["JobState"] == "CANCELLED"
    assert slurm.daemon_pids() == before
    assert os.environ["SLURM_CONF"] == str(slurm.conf)


def test_the_bench_stops_the_cluster_it_started(slurm, own_cluster_env) -> None:
    folder, env = own_cluster_env
    session_conf = os.environ["SLURM_CONF"]
    assert status(env).returncode == 1
    with dev_cluster():
        assert os.environ["SLURM_CONF"] == f"{folder}/etc/slurm.conf"
        assert status(env).stdout.strip() == f"running: 2 node(s), state in {folder}"
    assert status(env).returncode == 1
    assert processes_naming(folder) == []
    assert os.environ["SLURM_CONF"] == session_conf
    assert slurm.idle_nodes() == ["n1", "n2"]  # the session's cluster, beside it, kept running


def test_a_killed_bench_stops_the_cluster_it_started(slurm, own_cluster_env) -> None:
    folder, env = own_cluster_env
    bench = subprocess.Popen([sys.executable, "-c", BENCH_BLOCK], cwd=REPO_ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = []
        while (line := bench.stdout.readline()) and line.strip() != "inside":
            lines.append(line)
        assert line.strip() == "inside", "".join(lines) + bench.stderr.read()
        assert status(env).returncode == 0
        bench.send_signal(signal.SIGTERM)
        bench.wait(timeout=120)
    finally:
        bench.kill()
        bench.communicate()
    assert status(env).returncode == 1
    assert processes_naming(folder) == []
