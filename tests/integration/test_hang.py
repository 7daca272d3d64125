"""A hung rank is detected, explained and restarted under `rkan-dist train --nproc 2`.

Real torchrun, 2 gloo processes, the demo scaled down as in test_crash_restart. Rank 1 is
SIGSTOPped after the first checkpoint, as a hung collective, a stuck file system or a dead NIC
looks: rank 0's watchdog notices within the hang timeout, dumps its stacks, names rank 1 in the
log and the ledger, and exits 1; the run restarts from its checkpoint and finishes by itself,
bitwise as an uninterrupted one, with no process left stopped.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_crash_restart import STEPS, events, finish, overrides, worker
from trainrun import checkpoint_steps, last_step, run_train, start_train, wait_until

from rkan_dist.checkpoint import load_model_state
from rkan_dist.watchdog import folder_time

pytestmark = pytest.mark.integration

HANG_TIMEOUT_S = 15  # the first step after the restart must fit in it on a loaded 2-core machine


def hang_overrides(run_dir: Path, cache: Path) -> list[str]:
    return overrides(run_dir, cache, f"parallel.hang_timeout_s={HANG_TIMEOUT_S}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(2, hang_overrides(run_dir, digits_cache))
    return run_dir


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
    assert json.loads((run_dir / "requeues.json").read_text())["events"][-1]["event"] != "failure"
    assert not (run_dir / "heartbeats").exists()  # finished ranks remove their heartbeats
