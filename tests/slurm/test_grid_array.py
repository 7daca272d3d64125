"""A 2x2 grid (aggregation x seed) as one job array on the dev cluster: a re-run while it is queued
submits nothing, one element whose rank is killed mid-run is restarted by its batch script and
finishes, every run ends with a finished summary, a re-run after the end submits nothing, and
`compare` groups the four runs into two groups of two."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_slurm_submit import logged_steps, wait_until

from bench.faults import task_pid
from rkan_dist import submit
from rkan_dist.run_summary import SUMMARY_NAME

pytestmark = pytest.mark.timeout(900)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "configs" / "demo.yaml"
STEPS = 12
EVERY = 4
RUNS = [f"model.aggregation={aggregation},train.seed={seed}" for aggregation in ("addition", "gating")
        for seed in (0, 1)]
JOB_TIMEOUT_S = 600


def grid_args(folder: Path, cache: Path) -> list[str]:
    return ["--config", str(DEMO), "--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "1",
            "--grid", "model.aggregation=addition,gating", "--grid", "train.seed=0,1",
            f"train.run_dir={folder}", f"data.cache_dir={cache}", f"train.max_steps={STEPS}",
            f"checkpoint.every_steps={EVERY}", "data.batch_size=16", "data.val_batch_size=360",
            "data.num_workers=1", "logging.every_steps=1", "logging.progress_bar=false",
            "logging.histograms_every=0", "logging.image_grid=false", "train.precision=fp32"]


def submit_grid(*args: str) -> str:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = submit.main(list(args))
    assert code == 0, output.getvalue()
    return output.getvalue()


def test_a_grid_is_one_array_whose_killed_element_heals_and_a_rerun_submits_nothing(slurm, tmp_path,
                                                                                     digits_cache) -> None:
    folder = tmp_path / "grid"
    out = submit_grid(*grid_args(folder, digits_cache))
    job_ids = [line.split()[-1] for line in out.splitlines() if line.startswith("submitted job ")]
    array = job_ids[0].split("_")[0]
    assert job_ids == [f"{array}_{task}" for task in range(4)], out  # one array, one element per run
    record = json.loads((folder / "grid.json").read_text())
    assert record["jobs"] == dict(zip(RUNS, job_ids))

    # While it is queued or running, the same command submits nothing.
    again = submit_grid(*grid_args(folder, digits_cache))
    assert "4 queued" in again and "nothing to submit" in again and "submitted job" not in again

    # Kill element 0's only rank after a checkpoint: its batch script requeues it, it resumes and finishes.
    first = folder / RUNS[0]
    wait_until(lambda: max(logged_steps(first), default=-1) > EVERY, timeout=JOB_TIMEOUT_S, what="element 0 to train")
    pid = wait_until(lambda: task_pid(folder, 0, array_task=0), timeout=30, what="element 0's process")
    os.kill(pid, 9)
    for task, job_id in enumerate(job_ids):
        state = slurm.wait_for(job_id, "COMPLETED", timeout=JOB_TIMEOUT_S, min_restarts=1 if task == 0 else 0)
        assert state["ExitCode"] == "0:0"
    summaries = {name: json.loads((folder / name / SUMMARY_NAME).read_text()) for name in RUNS}
    assert all(summary["status"] == "finished" and summary["steps"] == STEPS for summary in summaries.values())
    assert (summaries[RUNS[0]]["failures"], summaries[RUNS[0]]["restarts"]) == (1, 1)
    assert summaries[RUNS[0]]["faults"]["failures"] == {"crash": 1}
    assert all((summary["failures"], summary["restarts"]) == (0, 0) for summary in list(summaries.values())[1:])

    # Finished: the same command submits nothing, and Slurm holds no job.
    again = submit_grid(*grid_args(folder, digits_cache))
    assert "4 finished" in again and "nothing to submit" in again
    assert slurm.active_jobs() == []

    result = subprocess.run([sys.executable, "-m", "rkan_dist.cli", "compare", str(folder), "--format", "json"],
                            capture_output=True, text=True, timeout=120, check=True)
    groups = {group["model.aggregation"]: group for group in json.loads(result.stdout)["groups"]}
    assert {name: group["n"] for name, group in groups.items()} == {"addition": 2, "gating": 2}
    assert groups["addition"]["top1_mean"] == pytest.approx(
        50 * (summaries[RUNS[0]]["top1"] + summaries[RUNS[1]]["top1"]))
