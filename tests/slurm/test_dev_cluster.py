"""The dev cluster behaves like the real Slurm features the product relies on: tasks spread
over two nodes, a requeued batch job runs again with SLURM_RESTART_COUNT set,
`scancel --signal=USR2` reaches the tasks of a job step, four nodes take 16 one-CPU tasks on
this 2-core host, and a node killed under a running job fails the way a real one does (its
processes die, the others' live, srun names it) and comes back. Real jobs, no mocks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEV_CLUSTER, parse_scontrol_record

pytestmark = pytest.mark.timeout(120)

# A requeued job may start again only after its old credential expires (cred_expire=10) and
# the scheduler's next pass (sched_interval=2); with Slurm's defaults it took 136 s here.
MAX_REQUEUE_RESTART_S = 60


def wait_for_files(paths: list[Path], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        if time.monotonic() >= deadline:
            missing = [str(path) for path in paths if not path.exists()]
            raise AssertionError(f"{what}: {missing} missing after {timeout} s")
        time.sleep(0.1)


def test_srun_spreads_tasks_over_both_logical_nodes(slurm) -> None:
    result = subprocess.run(
        ["srun", "-N2", "-n2", "bash", "-c", 'echo "$SLURM_PROCID $SLURM_NODEID $SLURMD_NODENAME $(id -u)"'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    tasks = sorted(tuple(line.split()) for line in result.stdout.splitlines())
    # rank 0 on n1, rank 1 on n2, both run as root (the tests' own user).
    assert tasks == [("0", "0", "n1", "0"), ("1", "1", "n2", "0")], result.stdout


def test_requeued_batch_job_runs_again_with_restart_count(slurm, tmp_path: Path) -> None:
    runs_log = tmp_path / "runs.log"
    script = """
echo "run ${SLURM_RESTART_COUNT:-0} $(date +%s.%N)" >> runs.log
# The first run waits to be requeued; the second finishes at once.
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then sleep 300; fi
"""
    job_id = slurm.sbatch(script, "--requeue", "-N1", "-o", "slurm-%j.out", cwd=tmp_path)
    slurm.wait_for(job_id, "RUNNING", timeout=30)
    wait_for_files([runs_log], timeout=15, what="first run's log line")

    requeued_at = time.time()
    slurm.run("scontrol", "requeue", str(job_id))
    record = slurm.wait_for(job_id, "COMPLETED", timeout=MAX_REQUEUE_RESTART_S + 15, min_restarts=1)

    runs = [line.split() for line in runs_log.read_text().splitlines()]
    assert [run[1] for run in runs] == ["0", "1"], runs
    assert record["Restarts"] == "1"
    assert record["JobId"] == str(job_id)
    restart_delay_s = float(runs[1][2]) - requeued_at
    print(f"requeue -> second run started after {restart_delay_s:.1f} s")
    assert restart_delay_s < MAX_REQUEUE_RESTART_S


USR2_TASK = """
import os, signal, sys, time
from pathlib import Path

rank, node = os.environ["SLURM_PROCID"], os.environ["SLURMD_NODENAME"]

def on_usr2(signum, frame):
    Path(f"usr2-rank{rank}-{node}").write_text("USR2\\n")
    sys.exit(0)

signal.signal(signal.SIGUSR2, on_usr2)
Path(f"ready-rank{rank}").touch()
time.sleep(60)
"""


def test_scancel_usr2_reaches_every_task_of_a_step(slurm, tmp_path: Path) -> None:
    (tmp_path / "usr2_task.py").write_text(USR2_TASK)
    # The batch shell traps USR2 too: plain `scancel --signal` must leave it alone (only
    # --batch/--full signal the shell), so the srun step sees the signal and the shell does not.
    script = f"""
trap 'echo USR2 > batch-shell-usr2' USR2
srun {sys.executable} usr2_task.py &
wait
"""
    job_id = slurm.sbatch(script, "-N2", "--ntasks-per-node=1", "-o", "slurm-%j.out", cwd=tmp_path)
    wait_for_files(
        [tmp_path / "ready-rank0", tmp_path / "ready-rank1"],
        timeout=30,
        what="tasks ready to trap USR2",
    )
    slurm.run("scancel", "--signal=USR2", str(job_id))
    slurm.wait_for(job_id, "COMPLETED", timeout=30)

    assert (tmp_path / "usr2-rank0-n1").read_text() == "USR2\n"
    assert (tmp_path / "usr2-rank1-n2").read_text() == "USR2\n"
    assert not (tmp_path / "batch-shell-usr2").exists()


def test_start_is_idempotent_and_restarts_for_another_node_count(slurm) -> None:
    export_line = f"export SLURM_CONF={slurm.conf}"
    before = slurm.daemon_pids()
    # Same node count: nothing restarts, clients get the same export line.
    assert slurm.start(slurm.nodes) == export_line
    assert slurm.daemon_pids() == before

    session_nodes = slurm.nodes
    try:
        assert slurm.start(1) == export_line
        assert slurm.idle_nodes() == ["n1"]
        # The old daemons are gone, not merely orphaned.
        survivors = [
            pid
            for pid in before.values()
            if os.path.exists(f"/proc/{pid}/cmdline")
            and str(slurm.state_dir) in Path(f"/proc/{pid}/cmdline").read_text()
        ]
        assert survivors == []
    finally:
        # Later tests share this cluster: give it back with every node.
        assert slurm.start(session_nodes) == export_line
    assert slurm.idle_nodes() == ["n1", "n2"]


def test_start_in_another_folder_names_the_running_cluster_and_starts_nothing(slurm, tmp_path) -> None:
    before = slurm.daemon_pids()
    other = tmp_path / "other"
    script = Path(__file__).resolve().parents[2] / "slurm" / "dev-cluster"
    result = subprocess.run([str(script / "start.sh")], env={**os.environ, "RKAN_SLURM_DIR": str(other)},
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (1, "")
    (line,) = result.stderr.splitlines()
    assert f"a dev cluster already runs in {slurm.state_dir} " in line, line
    assert f"`RKAN_SLURM_DIR={slurm.state_dir} {script}/stop.sh`" in line, line
    assert not other.exists()
    assert slurm.daemon_pids() == before


@pytest.mark.slurm_nodes(4)
def test_four_nodes_come_up_idle_advertising_four_cpus_and_run_sixteen_tasks(slurm) -> None:
    assert slurm.node_states() == {"n1": "idle", "n2": "idle", "n3": "idle", "n4": "idle"}
    for node in ("n1", "n2", "n3", "n4"):
        record = parse_scontrol_record(slurm.run("scontrol", "show", "node", "-o", node).strip())
        assert int(record["CPUTot"]) >= 4, record  # overcommitted on purpose (start.sh)
    result = subprocess.run(
        ["srun", "-N4", "--ntasks-per-node=4", "--cpus-per-task=1", "bash", "-c",
         'echo "$SLURM_PROCID $SLURMD_NODENAME"'],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    ranks = sorted((int(rank), node) for rank, node in (line.split() for line in result.stdout.splitlines()))
    # Block distribution: ranks 0-3 on n1, 4-7 on n2, ...
    assert ranks == [(rank, f"n{rank // 4 + 1}") for rank in range(16)], result.stdout


# A node killed by node.sh is set DOWN only when it misses pings for SlurmdTimeout (60 s); it took
# 70-80 s here, and srun reports the failure only then.
NODE_FAILURE_DETECTED_S = 150

KILLED_NODE_JOB = """
srun --kill-on-bad-exit=1 bash -c 'echo $$ > pid-$SLURMD_NODENAME; exec sleep 300'
echo "srun status $?"
"""


@pytest.mark.slurm_nodes(3)
@pytest.mark.timeout(300)
def test_a_killed_node_ends_its_processes_only_srun_names_it_and_revive_brings_it_back(slurm, tmp_path) -> None:
    # --no-kill: the job outlives the node's loss, so its batch script sees srun return.
    job_id = slurm.sbatch(KILLED_NODE_JOB, "-N3", "--ntasks-per-node=1", "--no-kill", "-o", "slurm-%j.out",
                          cwd=tmp_path)
    pid_files = [tmp_path / f"pid-n{number}" for number in (1, 2, 3)]
    wait_for_files(pid_files, timeout=30, what="a task on each node")
    time.sleep(0.2)  # the pid is written by then
    tasks = {path.name.removeprefix("pid-"): int(path.read_text()) for path in pid_files}
    daemons = slurm.daemon_pids()

    slurm.kill_node("n3")
    assert not process_alive(tasks["n3"]) and not process_alive(daemons["slurmd-n3"])
    assert all(process_alive(pid) for pid in (tasks["n1"], tasks["n2"], daemons["slurmd-n1"], daemons["slurmd-n2"],
                                               daemons["slurmctld"]))

    log = tmp_path / f"slurm-{job_id}.out"
    deadline = time.monotonic() + NODE_FAILURE_DETECTED_S
    while "srun status" not in (text := log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, f"srun still running {NODE_FAILURE_DETECTED_S} s after n3 died:\n{text}"
        time.sleep(1)
    # srun names the lost node only in this line; "srun: error: nX: task N: Killed" follows for
    # the tasks it then kills on the surviving nodes.
    assert "srun: error: Node failure on n3\n" in text, text
    assert "srun status 137" in text, text
    assert slurm.node_states()["n3"].startswith("down"), slurm.node_states()

    slurm.revive_node("n3")
    slurm.wait_for(job_id, "COMPLETED", timeout=30)
    slurm.wait_idle()
    result = subprocess.run(["srun", "-N3", "bash", "-c", "echo $SLURMD_NODENAME"], capture_output=True, text=True,
                            timeout=60)
    assert sorted(result.stdout.split()) == ["n1", "n2", "n3"], result.stderr


def test_down_and_drained_nodes_are_revived_and_bad_input_is_one_line(slurm) -> None:
    slurm.down_node("n2", "test: down")
    assert slurm.node_states()["n2"] == "down"
    slurm.drain_node("n1", "test: drain")
    assert slurm.node_states()["n1"] == "drained"
    # What the per-test fixture runs after every test.
    assert slurm.revive_lost_nodes() == ["n1", "n2"]
    assert slurm.node_states() == {"n1": "idle", "n2": "idle"}

    for args, message in [
        (["kill", "n9"], "no node 'n9' in the cluster of"),
        (["explode", "n1"], "usage: node.sh kill|down|drain|revive nX [reason]"),
    ]:
        result = subprocess.run([str(DEV_CLUSTER / "node.sh"), *args], capture_output=True, text=True, timeout=60,
                                env={**os.environ, **slurm.script_env})
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr, result.stderr
    result = subprocess.run([str(DEV_CLUSTER / "start.sh"), "--nodes", "5"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, **slurm.script_env})
    assert (result.returncode, result.stderr) == (1, "dev-cluster: error: --nodes must be 1 to 4, got '5'\n")


def process_alive(pid: int) -> bool:
    """Alive and no zombie: this machine's init reaps orphans late, so a killed one may linger as Z."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False
