"""`rkan-dist status` reads a job's state from the real Slurm of the dev cluster, while it runs and after."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rkan_dist.ledger import EventLedger

pytestmark = pytest.mark.timeout(120)


def status_screen(run_dir: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "rkan_dist.cli", "status", str(run_dir)], capture_output=True,
                            text=True, timeout=60)  # SLURM_CONF, set by the fixture, reaches the dev cluster
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_status_shows_the_slurm_state_of_the_runs_job(slurm, tmp_path: Path) -> None:
    job_id = slurm.sbatch("sleep 8\n", "--nodes=1", "--ntasks=1", "--cpus-per-task=1", f"--output={tmp_path}/%j.out")
    run_dir = tmp_path / "run"
    EventLedger(run_dir).append({"event": "start", "job_id": str(job_id), "restart_count": 0, "step": 0})
    slurm.wait_for(job_id, "RUNNING", timeout=60)
    assert f"job:        {job_id} RUNNING (Slurm)" in status_screen(run_dir)
    slurm.wait_for(job_id, "COMPLETED", timeout=60)
    assert f"job:        {job_id} COMPLETED (Slurm)" in status_screen(run_dir)
