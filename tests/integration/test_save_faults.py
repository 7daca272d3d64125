"""A save the disk refuses (a file-size limit, a folder without write permission) keeps the previous
checkpoint valid, removes its partial folder and says why in one line with the free space; a real
2-process run then stops with exit 1 and a ledger entry, and the next run resumes from that checkpoint.

The file-size limit and the dropped privileges stay in child processes."""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from trainrun import base_overrides, checkpoint_steps, kill_group, run_train, start_train, wait_until

pytestmark = pytest.mark.integration

NOBODY = 65534


def _engine():
    import torch
    from torch import nn

    from rkan_dist import parallel
    from rkan_dist.config import ParallelConfig
    from rkan_dist.distributed import DistInfo

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))  # model.pt: about 300 KB
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cpu = torch.device("cpu")
    return parallel.wrap(model, optimizer, parallel_config=ParallelConfig(), precision="fp32", grad_accum=1,
                         grad_clip=0.0, device=cpu, dist_info=DistInfo(0, 1, 0, cpu, None, True))


def _save_twice(run_dir: str, fault: str, results) -> None:
    """Save step 1, then step 2 under `fault`; report step 2's error message (or None)."""
    from rkan_dist.checkpoint import CheckpointManager, CheckpointSaveError

    engine = _engine()
    manager = CheckpointManager(run_dir, keep=3, rank=0, world_size=1)
    manager.save(1, engine, {"trainer": {"global_step": 1}}, {"rng": {}})
    if fault == "file_size":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
    elif fault == "permission":
        os.chmod(manager.root, 0o755)  # nobody may not create the step folder (root may: it drops to nobody)
        if os.geteuid() == 0:
            os.setegid(NOBODY)
            os.seteuid(NOBODY)
        else:
            os.chmod(manager.root, 0o555)
    try:
        manager.save(2, engine, {"trainer": {"global_step": 2}}, {"rng": {}})
        results.put(None)
    except CheckpointSaveError as err:
        results.put((str(err), err.rank, err.report, err.kind))


def _run_fault(run_dir: Path, fault: str):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_save_twice, args=(str(run_dir), fault, results))
    child.start()
    outcome = results.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    return outcome


@pytest.fixture
def run_dir():
    # Not under pytest's tmp_path: its 0700 parents would keep the unprivileged child out altogether.
    folder = Path(tempfile.mkdtemp(prefix="rkan-save-fault-"))
    folder.chmod(0o755)
    yield folder / "run"
    import shutil

    for path in folder.rglob("*"):
        if path.is_dir():
            path.chmod(0o755)
    shutil.rmtree(folder)


def assert_previous_checkpoint_kept(run_dir: Path) -> None:
    from rkan_dist.checkpoint import latest_valid
    from rkan_dist.weights import load_model_state

    checkpoints = run_dir / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step-1"]  # no .tmp-step-2 left behind
    assert latest_valid(run_dir).step == 1
    assert len(load_model_state(checkpoints / "step-1")) == 4


@pytest.mark.parametrize("fault, reason", [("file_size", "could not write a file in full"),
                                           ("permission", "Permission denied")])
def test_a_refused_save_keeps_the_previous_checkpoint(run_dir, fault, reason):
    outcome = _run_fault(run_dir, fault)
    assert outcome is not None, "the save under the fault succeeded"
    message, rank, report, kind = outcome
    assert "\n" not in message and reason in message, message
    assert f"not saved to {run_dir / 'checkpoints'}" in message and " free of " in message, message
    assert "(step-1 took " in message and "step-1 stays the latest checkpoint" in message
    assert (rank, report, kind) == (0, True, "save")
    assert_previous_checkpoint_kept(run_dir)


def test_a_full_tmpfs_keeps_the_previous_checkpoint(tmp_path):
    """A real ENOSPC: a 400 KiB tmpfs holds one checkpoint of the 280 KB model, not two (needs mount rights)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        run_dir = mount_point / "run"
        message, rank, report, kind = _run_fault(run_dir, "tmpfs")
        assert "No space left on device" in message or "could not write a file in full" in message, message
        assert " free of 0.4 MiB on its file system (step-1 took 0.3 MiB)" in message, message
        assert_previous_checkpoint_kept(run_dir)
    finally:
        subprocess.run(["umount", str(mount_point)], check=True, timeout=30)


def _limit_file_size_after_step_3(run_dir: Path, overrides: list[str], log_path: Path, limited_pids,
                                  limit: int) -> tuple[int, str, list[str]]:
    """A 2-process run whose processes `limited_pids(launcher_pid)` may write no file past `limit` bytes
    once step 3's checkpoint exists: its exit code, its output and its "not saved" lines for step 6."""
    process = start_train(2, overrides, log_path)
    try:
        wait_until(lambda: 3 in checkpoint_steps(run_dir), timeout=400, process=process, poll=0.02)
        for pid in limited_pids(process.pid):
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        returncode = process.wait(timeout=400)
    finally:
        if process.poll() is None:
            kill_group(process)
    output = log_path.read_text()
    refused = [line for line in output.splitlines() if line.startswith("rkan-dist: checkpoint of step 6 not saved")]
    return returncode, output, refused


def test_a_full_disk_stops_the_run_and_the_rerun_resumes_from_the_previous_checkpoint(tmp_path, digits_cache):
    import psutil
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rkan_dist.checkpoint import validate
    from rkan_dist.ledger import EventLedger

    run_dir = tmp_path / "run"
    # No restart: the limit stays on torchrun's agent, so every restart would be refused the same save.
    overrides = base_overrides(run_dir, digits_cache, steps=6) + ["checkpoint.every_steps=3", "train.max_restarts=0"]

    def launcher_and_workers(launcher: int) -> list[int]:
        return [launcher, *(child.pid for child in psutil.Process(launcher).children(recursive=True))]

    # No file may grow past 4 MiB: step 6's model.pt (45 MB, written by rank 0 only) fails while
    # rank 1's few-KB RNG file is written, so the ranks must agree on the failure.
    returncode, output, lines = _limit_file_size_after_step_3(run_dir, overrides, tmp_path / "faulted.log",
                                                              launcher_and_workers, 4 << 20)
    assert returncode == 1, output[-3000:]
    assert len(lines) == 1, output[-3000:]
    assert f"to {run_dir / 'checkpoints'}: rank 0: " in lines[0] and " free of " in lines[0], lines[0]
    # No process prints a traceback; the parent names the failure and the budget it spent.
    assert "Traceback" not in output and "CheckpointSaveError" not in output, output[-3000:]
    assert f"rkan-dist: gave up after 1 failure (refused save on rank 0 at step 6); latest checkpoint " \
           f"{run_dir / 'checkpoints' / 'step-3'}; fix the cause" in output, output[-3000:]
    assert checkpoint_steps(run_dir) == [3] and not list((run_dir / "checkpoints").glob(".tmp-*"))
    validate(run_dir / "checkpoints" / "step-3")
    failure = EventLedger(run_dir).read()["events"][-1]
    assert (failure["event"], failure["kind"], failure["rank"], failure["step"]) == ("failure", "save", 0, 6)

    rerun = run_train(2, overrides)
    assert f"resumed from {run_dir / 'checkpoints' / 'step-3'}: step 3" in rerun.stderr
    assert checkpoint_steps(run_dir)[-1] == 6
    restart = EventLedger(run_dir).read()["events"][-1]
    assert (restart["event"], restart["after"], restart["step"], restart["steps_lost"]) == ("restart", "save", 3, 3)
    assert restart["lost_seconds"] > 0
    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    accumulator.Reload()
    assert [event.value for event in accumulator.Scalars("job/failures")][-1] == 1
    assert [event.value for event in accumulator.Scalars("job/lost_seconds")][-1] == pytest.approx(
        restart["lost_seconds"], abs=0.01)


def test_a_save_refused_to_one_deepspeed_rank_alone_fails_at_once_and_the_restart_resumes(tmp_path, digits_cache):
    """ZeRO-1: each rank writes its own optimizer shard. Only rank 1 gets a file-size limit, so rank 0
    writes everything and waits in DeepSpeed's barriers: the ranks must still agree on the failure
    at once (it was a hang until the watchdog fired), then the restart resumes from step 3."""
    import json

    from rkan_dist.checkpoint import validate
    from rkan_dist.ledger import EventLedger

    run_dir = tmp_path / "run"
    # a hang would be recorded as one after 10 minutes; the save failure must be recorded as a save
    overrides = base_overrides(run_dir, digits_cache, steps=6) + [
        "checkpoint.every_steps=3", "train.max_restarts=1", "parallel.backend=deepspeed", "parallel.zero_stage=1",
        "parallel.hang_timeout_s=600"]

    def rank_1(_launcher: int) -> list[int]:
        return [json.loads((run_dir / "heartbeats" / "rank1.json").read_text())["pid"]]

    # rank 1's optimizer shard of step 6 (45 MB) fails; its heartbeats and RNG file (a few KB) do not. The
    # restarted workers are new processes, without the limit.
    returncode, output, lines = _limit_file_size_after_step_3(run_dir, overrides, tmp_path / "faulted.log", rank_1,
                                                              1 << 20)
    assert returncode == 0, output[-3000:]
    assert len(lines) == 1 and f"to {run_dir / 'checkpoints'}: rank 1: " in lines[0], output[-3000:]
    assert "step-3 stays the latest checkpoint" in lines[0], lines[0]
    assert "ERROR rkan_dist.watchdog: hang" not in output and not (run_dir / "hangs").exists(), output[-3000:]
    events = EventLedger(run_dir).read()["events"]
    failure, restart = [event for event in events if event["event"] in ("failure", "restart")]
    assert (failure["kind"], failure["rank"], failure["step"]) == ("save", 1, 6)
    assert (restart["after"], restart["step"], restart["steps_lost"]) == ("save", 3, 3)
    assert checkpoint_steps(run_dir)[-1] == 6 and not list((run_dir / "checkpoints").glob(".tmp-*"))
    validate(run_dir / "checkpoints" / "step-6")
