"""A bad node on the real dev cluster: a node that dies or a rank that hangs is attributed to its
node, the node is excluded from the job, and the job finishes by itself on the nodes left
(slurm.min_nodes), continuing at the exact sample; with slurm.exclude_after_failures=0 nothing is
excluded, as before (rkan_dist.eviction, rkan_dist.after_srun).

3 logical nodes x 1 task, gloo, CPU, digits; a global batch of 48 splits over 3 and 2 ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.faults import task_pid, wait_until
from rkan_dist import submit
from rkan_dist.data.sampling import epoch_permutation
from rkan_dist.ledger import LEDGER_NAME
from rkan_dist.manifest import latest_valid

pytestmark = [pytest.mark.timeout(600), pytest.mark.slurm_nodes(3)]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "configs" / "demo.yaml"
TRACE_SITE = Path(__file__).resolve().parent / "trace_site"
STEPS, EVERY, BATCH = 16, 4, 16
JOB_TIMEOUT_S = 420


def overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [f"train.run_dir={run_dir}", f"data.cache_dir={cache}", f"train.max_steps={STEPS}",
            f"checkpoint.every_steps={EVERY}", "checkpoint.keep=20", f"data.batch_size={BATCH}",
            "data.num_workers=1", "logging.progress_bar=false", "logging.every_steps=1", "train.eval_every=1000",
            "train.precision=fp32", "checkpoint.at_epoch_end=false", *extra]


def submit_job(run_dir: Path, cache: Path, nodes: int, *extra: str) -> int:
    args = submit.build_parser().parse_args(["--config", str(DEMO), "--nodes", str(nodes), "--gpus-per-node", "0",
                                             "--cpus-per-task", "1", *overrides(run_dir, cache, *extra)])
    (job,) = submit.submit(submit.prepare(args))
    return int(job.job_id)


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    path = run_dir / LEDGER_NAME
    found = json.loads(path.read_text())["events"] if path.is_file() else []
    return [event for event in found if kind is None or event["event"] == kind]


def past_a_checkpoint(run_dir: Path, restart: int = 0) -> int | None:
    """The step of a valid checkpoint written by run `restart` of the job, once training went past it."""
    starts = events(run_dir, "start")
    latest = latest_valid(run_dir) if len(starts) > restart else None
    return latest.step if latest is not None and latest.step > (starts[restart].get("step") or 0) else None


def status(run_dir: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "rkan_dist.cli", "status", str(run_dir)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> Path:
    from rkan_dist.data.demo import ensure_digits

    cache = tmp_path_factory.mktemp("digits")
    ensure_digits(cache)
    return cache


def test_a_dead_node_is_excluded_and_the_job_finishes_on_two_nodes_at_the_exact_sample(
        slurm, tmp_path, digits_cache, monkeypatch) -> None:
    """n3 dies (its slurmd and its task) after a checkpoint; slurm.min_nodes=2. Slurm declares it down
    and requeues the job itself (killing the batch script); the next run records the node failure,
    blames n3 and evicts it, continuing on n1 and n2 at the exact sample. A preemption later, the
    requeue carries the exclusion to Slurm; the job finishes COMPLETED, every sample read once."""
    run_dir, trace = tmp_path / "run", tmp_path / "trace"
    monkeypatch.setenv("PYTHONPATH", f"{TRACE_SITE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("RKAN_SAMPLE_TRACE", str(trace))  # sbatch passes the environment to the tasks
    job_id = submit_job(run_dir, digits_cache, 3, "slurm.min_nodes=2")
    wait_until(lambda: past_a_checkpoint(run_dir), JOB_TIMEOUT_S, "a checkpoint of the first run")
    slurm.kill_node("n3")
    wait_until(lambda: past_a_checkpoint(run_dir, 1), JOB_TIMEOUT_S, "a checkpoint of the run after the node died")
    slurm.run("scancel", "--signal=USR2", str(job_id))
    record = slurm.wait_for(job_id, "COMPLETED", timeout=JOB_TIMEOUT_S, min_restarts=2)
    assert record["Restarts"] == "2" and record["NodeList"] == "n[1-2]", slurm.job_output(record)
    assert record["ExcNodeList"] == "n3", slurm.job_output(record)

    (failure,) = events(run_dir, "failure")
    assert (failure["kind"], failure["rank"], failure["node"]) == ("crash", None, "n3"), failure
    (evict,) = events(run_dir, "evict")
    assert (evict["node"], evict["excluded"], evict["job_id"]) == ("n3", "n3", str(job_id)) and "skipped" not in evict
    starts = events(run_dir, "start")
    assert [start["world_size"] for start in starts] == [3, 2, 2]
    log = Path(record["StdErr"]).read_text(errors="replace")
    assert f"rkan-dist: excluding node n3 from job {job_id} at its next requeue" in log, log[-3000:]

    # Every sample of the epoch once: each run's steps up to where the next one resumed.
    records = [json.loads(line) for path in sorted(trace.glob("rank*.jsonl")) for line in path.open()]
    bounds = [start["step"] for start in starts[1:]] + [STEPS]
    kept = [r for r in records if r["step"] < bounds[r["restart"]]]
    assert [sorted({r["world_size"] for r in kept if r["restart"] == run}) for run in range(3)] == [[3], [2], [2]]
    assert sorted({r["step"] for r in kept}) == list(range(STEPS))
    read = [sample for r in kept for sample in r["ids"]]
    assert len(read) == len(set(read)) == STEPS * 3 * BATCH
    assert sorted(read) == sorted(first_samples(STEPS * 3 * BATCH))

    text = status(run_dir)
    assert "n3" in text, text


def first_samples(count: int) -> list[int]:
    """The first `count` samples of epoch 0's order (train.seed=0): what the run must have read."""
    from rkan_dist.data.demo import digits_split

    return epoch_permutation(0, 0, len(digits_split()[1]))[:count].tolist()


def test_a_hung_rank_is_attributed_to_its_node_which_is_excluded(slurm, tmp_path, digits_cache) -> None:
    """Rank 1 on n2 SIGSTOPped after a checkpoint: the watchdog names rank 1 (n2), n2 is excluded,
    and the job finishes on n1 and n3."""
    run_dir = tmp_path / "run"
    job_id = submit_job(run_dir, digits_cache, 3, "slurm.min_nodes=2", "parallel.hang_timeout_s=20")
    wait_until(lambda: past_a_checkpoint(run_dir), JOB_TIMEOUT_S, "a checkpoint of the first run")
    pid = wait_until(lambda: task_pid(run_dir, 1, 0), 30, "rank 1's process")
    os.kill(pid, signal.SIGSTOP)
    try:
        record = slurm.wait_for(job_id, "COMPLETED", timeout=JOB_TIMEOUT_S, min_restarts=1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert record["NodeList"] == "n[1,3]" and "n2" in record["ExcNodeList"], slurm.job_output(record)
    (failure,) = events(run_dir, "failure")
    assert (failure["kind"], failure["rank"], failure["node"]) == ("hang", 1, "n2"), failure
    (evict,) = events(run_dir, "evict")
    assert evict["node"] == "n2" and "hang of rank 1" in evict["reason"]
    assert "n2" in status(run_dir)


def test_without_eviction_a_node_that_fails_twice_is_kept(slurm, tmp_path, digits_cache) -> None:
    """slurm.exclude_after_failures=0: rank 1 killed twice, the job restarts twice on the same nodes
    and finishes, nothing excluded (what every job did before eviction existed)."""
    run_dir = tmp_path / "run"
    job_id = submit_job(run_dir, digits_cache, 2, "slurm.exclude_after_failures=0")
    for restart in (0, 1):
        wait_until(lambda r=restart: past_a_checkpoint(run_dir, r), JOB_TIMEOUT_S, f"a checkpoint of run {restart}")
        os.kill(wait_until(lambda r=restart: task_pid(run_dir, 1, r), 30, f"rank 1 of run {restart}"), signal.SIGKILL)
    record = slurm.wait_for(job_id, "COMPLETED", timeout=JOB_TIMEOUT_S, min_restarts=2)
    assert record["Restarts"] == "2" and record["ExcNodeList"] in ("(null)", ""), slurm.job_output(record)
    failures = events(run_dir, "failure")
    assert [(failure["rank"], failure["node"]) for failure in failures] == [(1, "n2"), (1, "n2")]
    assert events(run_dir, "evict") == []
