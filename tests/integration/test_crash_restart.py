"""A crashed rank restarts the whole `rkan-dist train --nproc 2` run from its latest valid checkpoint.

Real torchrun, 2 gloo processes, the demo scaled down (8 px, 48 images per rank per step). One
worker is SIGKILLed, as an OOM kill or a segfault looks: the run finishes by itself, bitwise as an
uninterrupted one. A budget of one restart with two crashes ends in one line. A configuration error
in a worker is not restarted. A stopped (hung) rank is detected, explained and restarted the same way.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
from trainrun import base_overrides, checkpoint_steps, last_step, run_train, start_train, wait_until

from rkan_dist.checkpoint import validate
from rkan_dist.watchdog import folder_time
from rkan_dist.weights import load_model_state

pytestmark = pytest.mark.integration

STEPS = 8
BATCH = 48


def overrides(run_dir: Path, cache: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return base_overrides(run_dir, cache, steps=steps, batch_size=BATCH) + [
        "checkpoint.every_steps=3", "checkpoint.keep=3", "data.min_res=8", "data.max_res=8", "data.val_res=8",
        "logging.image_grid=false", "logging.histograms_every=0", *extra]


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.json"
    return json.loads(path.read_text())["events"] if path.is_file() else []


def worker(process, rank: int) -> psutil.Process | None:
    """The live training process of global `rank` under the `rkan-dist` parent (torchrun's agent's child)."""
    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "rkan_dist.cli" in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def kill_rank(process, rank: int) -> int:
    """SIGKILL the worker of `rank`, as the kernel's OOM killer would; returns its pid."""
    wait_until(lambda: worker(process, rank) is not None, timeout=60, process=process)
    victim = worker(process, rank)
    victim.send_signal(signal.SIGKILL)
    return victim.pid


def finish(process, timeout: int = 300) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(2, overrides(run_dir, digits_cache))
    return run_dir


def test_a_killed_rank_restarts_the_run_which_finishes_bitwise_as_an_uninterrupted_one(reference, tmp_path,
                                                                                       digits_cache):
    run_dir = tmp_path / "run"
    log_path = tmp_path / "run.log"
    # Started over (resume=none, overwrite) in a folder holding a finished run: the restart must
    # continue this run from its own step-3 checkpoint, not start over again nor take the earlier
    # run's step 8, and the earlier run's ledger must not count against this one.
    shutil.copytree(reference, run_dir)
    process = start_train(2, overrides(run_dir, digits_cache, "train.resume=none", "train.overwrite=true"), log_path)
    try:
        # after the step-3 checkpoint, inside a later step (not during the save)
        # (the earlier run's ledger is the last thing set aside: from then on the folder is this run's)
        wait_until(lambda: any(run_dir.glob("superseded/*/events.json")) and 3 in checkpoint_steps(run_dir)
                   and last_step(run_dir) >= 4, timeout=300, process=process, poll=0.02)
        kill_rank(process, 1)
    finally:
        returncode = finish(process)
    output = log_path.read_text()
    assert returncode == 0, output[-4000:]
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-4000:]
    assert "rkan-dist: crash of rank 1 at step " in output and "restart 1 of 3 from " in output
    final, expected = (load_model_state(folder / "checkpoints" / f"step-{STEPS}") for folder in (run_dir, reference))
    assert final.keys() == expected.keys()
    assert [name for name in final if not torch.equal(final[name], expected[name])] == []
    failure, = [event for event in events(run_dir) if event["event"] == "failure"]
    assert (failure["kind"], failure["rank"], failure["exit"]) == ("crash", 1, "killed by SIGKILL")
    assert failure["step"] >= 4  # the last step rank 0 logged before the kill
    restart, = [event for event in events(run_dir) if event["event"] == "restart"]
    assert (restart["after"], restart["step"], restart["steps_lost"]) == ("crash", 3, failure["step"] - 3)
    assert restart["lost_seconds"] > 0
    earlier, = (run_dir / "superseded").iterdir()  # the finished run, set aside whole
    assert checkpoint_steps(earlier) == checkpoint_steps(reference)
    assert events(earlier) == events(reference)


def test_time_based_checkpoints_are_taken_together_and_change_no_number(reference, tmp_path, digits_cache):
    """checkpoint.every_minutes alone (no step cadence): each rank's clock decides differently, the
    flag all-reduce makes both ranks save at the same steps, and saving changes no weight."""
    run_dir = tmp_path / "run"
    run_train(2, overrides(run_dir, digits_cache, "checkpoint.every_steps=0", "checkpoint.at_epoch_end=false",
                           "checkpoint.every_minutes=0.002", "checkpoint.keep=20"))  # due after 0.12 s
    steps = checkpoint_steps(run_dir)
    assert len(steps) >= 3 and steps[-1] == STEPS, steps  # saved along the way, not only at the end
    for step in steps:
        validate(run_dir / "checkpoints" / f"step-{step}")  # each complete: both ranks took part
    final, expected = (load_model_state(folder / "checkpoints" / f"step-{STEPS}") for folder in (run_dir, reference))
    assert [name for name in final if not torch.equal(final[name], expected[name])] == []


def test_a_spent_budget_ends_with_one_line_naming_the_failures_and_keeps_the_checkpoints(tmp_path, digits_cache):
    run_dir = tmp_path / "run"
    log_path = tmp_path / "run.log"
    process = start_train(2, overrides(run_dir, digits_cache, "train.max_restarts=1", steps=12), log_path)
    try:
        wait_until(lambda: 3 in checkpoint_steps(run_dir) and last_step(run_dir) >= 4, timeout=300,
                   process=process, poll=0.02)
        first = kill_rank(process, 1)
        # the restarted run (new workers) has saved step 6: crash again, rank 0 this time
        wait_until(lambda: any(event["event"] == "restart" for event in events(run_dir))
                   and 6 in checkpoint_steps(run_dir), timeout=300, process=process, poll=0.02)
        assert kill_rank(process, 0) != first
    finally:
        returncode = finish(process)
    output = log_path.read_text()
    assert returncode == 1, output[-4000:]
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-4000:]
    failures = [event for event in events(run_dir) if event["event"] == "failure"]
    assert [(event["kind"], event["rank"]) for event in failures] == [("crash", 1), ("crash", 0)]
    latest = run_dir / "checkpoints" / f"step-{checkpoint_steps(run_dir)[-1]}"
    line = (f"rkan-dist: gave up after 2 failures (crash of rank 1 at step {failures[0]['step']}, crash of rank 0 "
            f"at step {failures[1]['step']}); latest checkpoint {latest}; fix the cause and re-run the same command")
    assert [text for text in output.splitlines() if "gave up" in text] == [line]
    assert checkpoint_steps(run_dir)[:2] == [3, 6]
    for step in checkpoint_steps(run_dir):
        validate(run_dir / "checkpoints" / f"step-{step}")


def test_a_configuration_error_in_a_worker_fails_once_with_exit_2(tmp_path, digits_cache, digits_data):
    """The train file is there when the parent checks and gone when the workers load the config."""
    train = tmp_path / "train.beton"
    shutil.copy(digits_data.train_beton, train)
    run_dir = tmp_path / "run"
    log_path = tmp_path / "run.log"
    files = ["data.dataset=files", f"data.train_path={train}", f"data.val_path={digits_data.val_beton}"]
    process = start_train(2, overrides(run_dir, digits_cache, *files), log_path)
    try:
        # the parent has checked the paths once it has started torchrun's agent
        wait_until(lambda: psutil.Process(process.pid).children(), timeout=60, process=process, poll=0.01)
        train.unlink()
    finally:
        returncode = finish(process)
    output = log_path.read_text()
    assert returncode == 2, output[-4000:]
    assert f"rkan-dist: error: data.train_path: no such .beton file '{train}'" in output, output[-4000:]
    assert "Traceback" not in output and "restart" not in output and "gave up" not in output, output[-4000:]
    assert [event for event in events(run_dir) if event["event"] == "failure"] == []


# ----------------------------------------------------------------------------- a hung rank
# Rank 1 is SIGSTOPped after the first checkpoint, as a hung collective, a stuck file system or a
# dead NIC looks: rank 0's watchdog notices within the hang timeout, dumps its stacks, names rank 1
# in the log and the ledger, and exits 1; the run restarts from its checkpoint and finishes by
# itself, bitwise as the uninterrupted reference (the hang timeout changes no numbers).

HANG_TIMEOUT_S = 30  # the first step after the restart (FFCV compiles its pipeline in it) must fit, on a 2x slower CPU too


def hang_overrides(run_dir: Path, cache: Path) -> list[str]:
    return overrides(run_dir, cache, f"parallel.hang_timeout_s={HANG_TIMEOUT_S}")


def test_a_stopped_rank_is_detected_dumped_and_restarted_and_the_run_finishes_bitwise(reference, tmp_path,
                                                                                    digits_cache):
    run_dir = tmp_path / "run"
    log_path = tmp_path / "run.log"
    process = start_train(2, hang_overrides(run_dir, digits_cache), log_path)
    victim = None
    try:
        wait_until(lambda: 3 in checkpoint_steps(run_dir) and last_step(run_dir) >= 4, timeout=300,
                   process=process, poll=0.02)
        victim = worker(process, 1)
        victim.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        returncode = finish(process)
    finally:
        if victim is not None:  # never leave a stopped process behind: SIGKILL acts on it, SIGCONT too
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.send_signal(signal.SIGKILL)
                victim.send_signal(signal.SIGCONT)
        with contextlib.suppress(psutil.NoSuchProcess):
            for leftover in psutil.Process(process.pid).children(recursive=True):
                leftover.kill()
        if process.poll() is None:
            process.kill()
    output = log_path.read_text()
    assert returncode == 0, output[-4000:]
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-4000:]

    # detected within twice the timeout, the stacks of the live rank dumped, the stopped rank named
    failure, = [event for event in events(run_dir) if event["event"] == "failure"]
    assert (failure["kind"], failure["rank"], failure["detected_by"]) == ("hang", 1, 0)
    assert failure["step"] >= 4
    folder = Path(failure["stacks"])
    assert folder.parent == run_dir / "hangs"
    assert stopped_at < folder_time(folder.name) and failure["time"] - stopped_at < 2 * HANG_TIMEOUT_S
    stacks = (folder / "rank0.txt").read_text()
    assert "culprit: rank 1" in stacks and "most recent call first" in stacks and "trainer.py" in stacks
    assert not (folder / "rank1.txt").exists()  # stopped: it runs no code
    hang_line = (f"hang: rank 1 stopped progressing at step {failure['step']} (no step or collective finished for ")
    assert any(hang_line in line and line.endswith(f"stacks in {folder}") for line in output.splitlines()), \
        output[-4000:]
    assert f"rkan-dist: hang of rank 1 at step {failure['step']}" in output and "restart 1 of 3 from " in output

    # then the crash path: restarted from the step-3 checkpoint, finished bitwise as the reference
    restart, = [event for event in events(run_dir) if event["event"] == "restart"]
    assert (restart["after"], restart["step"]) == ("hang", 3)
    final, expected = (load_model_state(folder / "checkpoints" / f"step-{STEPS}") for folder in (run_dir, reference))
    assert final.keys() == expected.keys()
    assert [name for name in final if not torch.equal(final[name], expected[name])] == []
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE
    assert json.loads((run_dir / "events.json").read_text())["events"][-1]["event"] != "failure"
    assert not (run_dir / "heartbeats").exists()  # finished ranks remove their heartbeats
