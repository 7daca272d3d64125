"""The dev cluster is for trying it: the demo recipe submits unchanged to `start.sh --nodes 2`;
recipes asking for what the cluster lacks, and jobs sbatch refuses, are one line and exit 2 with
nothing queued; start.sh works with its state folder inside a folder only its owner can enter."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rkan_dist import submit

pytestmark = pytest.mark.timeout(300)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEV_CLUSTER = REPO_ROOT / "slurm" / "dev-cluster"
DEMO = REPO_ROOT / "configs" / "demo.yaml"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rkan_dist.cli", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_demo_recipe_submits_unchanged_and_runs_on_both_nodes(slurm, tmp_path, digits_cache) -> None:
    """`rkan-dist submit --config configs/demo.yaml --nodes 2`: no resource flags, only a shorter run."""
    run_dir = tmp_path / "run"
    result = cli("submit", "--config", str(DEMO), "--nodes", "2", f"train.run_dir={run_dir}",
                 f"data.cache_dir={digits_cache}", "train.max_steps=3", "train.eval_every=100",
                 "logging.progress_bar=false", "train.precision=fp32")
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = int(result.stdout.split("submitted job ")[1].split()[0])
    slurm.submitted.append(job_id)
    record = slurm.wait_for(job_id, "COMPLETED", timeout=240)
    assert record["NumNodes"] == "2" and record["ExitCode"] == "0:0"
    assert (run_dir / "checkpoints" / "step-3" / "manifest.json").is_file()


@pytest.mark.parametrize(("flags", "message"), [
    (["--gpus-per-node", "8"], "slurm.gpus_per_node=8 but nodes of 'debug' have none (no gpu gres); "
                               "for CPU training (gloo) pass --gpus-per-node 0"),
    (["--mem", "100T"], "slurm.mem=100T is 104857600 MB per node; nodes of 'debug' have at most"),
    (["--mem", "lots"], "slurm.mem='lots' is not a Slurm memory size"),
])
def test_recipes_asking_for_what_the_cluster_lacks_are_one_line(slurm, tmp_path, capsys, flags, message) -> None:
    before = slurm.active_jobs()
    assert submit.main(["--config", str(DEMO), "--nodes", "2", *flags, f"train.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert slurm.active_jobs() == before
    assert not (tmp_path / "run" / "slurm").exists()


def test_an_sbatch_refusal_is_one_line_without_a_traceback(slurm, tmp_path) -> None:
    """A constraint no node has passes our checks; sbatch itself refuses it."""
    before = slurm.active_jobs()
    result = cli("submit", "--config", str(DEMO), "--nodes", "2", "--constraint", "nosuchfeature",
                 f"train.run_dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("rkan-dist submit: error: sbatch refused the job: sbatch: error:")
    assert "feature" in result.stderr.lower()
    assert slurm.active_jobs() == before


def test_start_works_with_its_state_folder_inside_an_owner_only_folder(slurm_cluster, tmp_path) -> None:
    """munged runs as user munge, which cannot enter a 0700 folder of root's: start.sh must cope."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    env = dict(os.environ, RKAN_SLURM_DIR=str(private / "cluster"))
    env.pop("SLURM_CONF", None)

    def script(name: str, *args: str, environment: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(DEV_CLUSTER / name), *args], capture_output=True, text=True, timeout=180,
                              env=environment or env)

    session_env = dict(os.environ, RKAN_SLURM_DIR=str(slurm_cluster.state_dir))
    assert script("stop.sh", environment=session_env).returncode == 0  # one cluster at a time (fixed ports)
    try:
        started = script("start.sh", "--nodes", "2")
        assert started.returncode == 0, started.stderr
        conf = started.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
        assert conf == str(private / "cluster" / "etc" / "slurm.conf")
        tasks = subprocess.run(["srun", "-N2", "-n2", "bash", "-c", "echo $SLURMD_NODENAME"], capture_output=True,
                               text=True, timeout=60, env=dict(env, SLURM_CONF=conf))
        assert tasks.returncode == 0, tasks.stderr
        assert sorted(tasks.stdout.split()) == ["n1", "n2"]
    finally:
        stopped = script("stop.sh")
        restarted = slurm_cluster.start(slurm_cluster.nodes)  # give the session its cluster back
        munge_dir = Path(f"/tmp/rkan-dist-munge-{hashlib.sha256(env['RKAN_SLURM_DIR'].encode()).hexdigest()[:16]}")
        used_fallback = (munge_dir / "munge.key").is_file()
        shutil.rmtree(munge_dir, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr
    assert used_fallback, f"munged's files were expected in {munge_dir}"
    leftovers = [pid for pid in os.listdir("/proc") if pid.isdigit()
                 and "munged" in _read(f"/proc/{pid}/cmdline") and "rkan-dist-munge-" in _read(f"/proc/{pid}/cmdline")
                 and _state(pid) != "Z"]
    assert leftovers == [], "stop.sh left munged running"
    assert restarted == f"export SLURM_CONF={slurm_cluster.conf}"


def _read(path: str) -> str:
    try:
        return Path(path).read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _state(pid: str) -> str:
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else ""
