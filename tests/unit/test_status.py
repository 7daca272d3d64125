"""`rkan-dist status RUN_DIR`: the screen a person reads after a night of faults, and its speed."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rkan_dist import slurm_cluster, status
from rkan_dist.ledger import EventLedger

pytestmark = pytest.mark.unit


def write_checkpoint(run_dir: Path, step: int, created: float) -> Path:
    """A step folder in the layout CheckpointManager writes: files plus a manifest of their sizes and SHA-256."""
    folder = run_dir / "checkpoints" / f"step-{step}"
    folder.mkdir(parents=True)
    payload = f"weights of step {step}".encode() * 100
    (folder / "model.pt").write_bytes(payload)
    files = {"model.pt": {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}}
    (folder / "manifest.json").write_text(json.dumps({"step": step, "created": created, "files": files}))
    return folder


@pytest.fixture
def faulted_run(tmp_path: Path) -> Path:
    """A Slurm run: started, preempted, crashed at step 7 (back to step 6), and a save at 9 refused."""
    run_dir = tmp_path / "run"
    now = time.time()
    write_checkpoint(run_dir, 3, now - 600)
    write_checkpoint(run_dir, 6, now - 300)
    corrupt = write_checkpoint(run_dir, 9, now - 10)
    (corrupt / "model.pt").write_bytes(b"truncated")  # a newer checkpoint that does not validate
    ledger = EventLedger(run_dir)
    ledger.append({"event": "start", "job_id": "987654", "restart_count": 0, "step": 0})
    ledger.append({"event": "stop", "kind": "preemption", "step": 3, "requeue": True}, count="preemptions")
    ledger.record_failure("crash", rank=1, step=7)
    ledger.record_restart(6, now - 300)
    ledger.record_failure("save", rank=0, step=9)
    records = [{"kind": "train", "step": step, "time": now - 20 + step, "train/loss": 1.0} for step in range(1, 10)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records)
                                           + '{"kind": "train", "step": 10, "ti')  # a line being written
    (run_dir / "config.yaml").write_text("train:\n  max_steps: 20\n")
    return run_dir


def test_status_tells_the_story_of_a_faulted_run(faulted_run: Path) -> None:
    lines = status.report(faulted_run)
    text = "\n".join(lines)
    assert len(lines) <= 24, text  # one screen
    # sacct/scontrol cannot reach a controller here (tests/conftest.py sees to it): the job id still shows.
    assert "job:        987654 (state unknown: Slurm is not reachable" in text, text
    assert "step:       9 (logged " in text and "of max_steps 20" in text, text
    assert "checkpoint: step-6 (written " in text and ", 5 min 0 s ago; files checked" in text, text
    assert any(line.strip().startswith("skipped:") and "step-9: model.pt has 9 bytes" in line for line in lines), text
    assert "restarts:   crash 1, preemption 1" in text, text
    assert "failures:   crash 1, save 1" in text, text
    assert "lost:       5 min 0 s of wall time and 1 steps to faults" in text, text
    assert "pending:    the save failure at step 9 has not been followed by a restart; the next run resumes " \
        "from step 6" in text, text
    assert "last event: failure (save) of rank 0 at step 9" in text, text


def test_status_asks_slurm_without_hanging_when_it_is_unreachable() -> None:
    started = time.monotonic()
    assert slurm_cluster.slurm_state("987654") is None  # tests/conftest.py: no controller outside tests/slurm
    # each of its two queries is cut at STATE_TIMEOUT_S; 10 s more for starting them on a loaded machine
    assert time.monotonic() - started < 2 * slurm_cluster.STATE_TIMEOUT_S + 10


def test_status_command_prints_the_screen_without_importing_torch(faulted_run: Path) -> None:
    code = ("import sys; from rkan_dist.cli import main; code = main(['status', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, str(faulted_run)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"run folder: {faulted_run}\n") and "failures:   crash 1, save 1" in result.stdout


def test_status_of_a_folder_that_holds_no_run_is_one_line(tmp_path: Path, capsys) -> None:
    assert status.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a run folder" in err


def test_durations_read_like_a_person_writes_them() -> None:
    assert [status.duration(s) for s in (0.4, 59, 61, 3600, 3725, 90061)] == \
        ["0 s", "59 s", "1 min 1 s", "1 h 0 min", "1 h 2 min", "25 h 1 min"]


def test_the_last_event_says_why_a_run_ended_without_a_restart() -> None:
    from rkan_dist.status import _describe

    error = {"event": "error", "kind": "config", "message": "data.train_path: no such .beton file '/x'"}
    assert _describe(error) == "error (config), not restarted: data.train_path: no such .beton file '/x'"
    assert _describe({"event": "gave_up", "failures": 2, "budget": 1}) == "gave up after 2 failures (budget 1)"


def write_beat(run_dir: Path, rank: int, **fields) -> None:
    from rkan_dist.watchdog import HEARTBEATS, write_json_atomic

    (run_dir / HEARTBEATS).mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / HEARTBEATS / f"rank{rank}.json", {"rank": rank, "host": f"node{rank}", **fields})


def test_status_names_the_rank_behind_and_a_stopped_one_while_the_run_trains(tmp_path: Path) -> None:
    from rkan_dist.watchdog import HangWatchdog

    run_dir = tmp_path / "run"
    now = time.time()
    EventLedger(run_dir).append({"event": "start", "step": 0, "time": now - 1000})
    write_beat(run_dir, 7, step=3, progress_time=now - 3600, beat_time=now - 3600, interval=1.0)  # an earlier attempt's
    # Rank 0 is a real watchdog (its thread writes the beat); rank 1 is slower; rank 2 stopped beating.
    watchdog = HangWatchdog(run_dir, rank=0, world_size=3, timeout=600).start(step=12)
    try:
        write_beat(run_dir, 1, step=11, progress_time=now - 41, beat_time=now - 1, interval=30.0, timeout=600.0,
                   waiting=None)
        write_beat(run_dir, 2, step=12, progress_time=now - 200, beat_time=now - 200, interval=30.0, timeout=600.0,
                   waiting="all_reduce", pid=4242)
        lines = status.report(run_dir, now=now + 0.5)
    finally:
        watchdog.stop()
    ranks = [line for line in lines if line.startswith("ranks:")]
    assert ranks == ["ranks:      2 beating every 30 s, hang timeout 10 min 0 s; longest without progress: rank 1 on "
                     "node1, 42 s since step 11 (computing at its last beat)"], lines
    stale = [line.strip() for line in lines if line.strip().startswith("stale:")]
    assert stale == ["stale: rank 2 on node2 (pid 4242), last beat 3 min 20 s ago: stopped or dead"], lines
    assert not (run_dir / "heartbeats" / "rank0.json").exists()  # a rank that stops removes its own


def test_status_of_a_run_whose_processes_all_went_silent_says_so_in_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    now = time.time()
    EventLedger(run_dir).append({"event": "start", "step": 0, "time": now - 1000})
    for rank, step in ((0, 20), (1, 19)):
        write_beat(run_dir, rank, step=step, progress_time=now - 95, beat_time=now - 90 - rank, interval=10.0)
    (line,) = [line for line in status.report(run_dir, now=now) if line.startswith("ranks:")]
    assert line == "ranks:      none beating: the last of 2 heartbeats was 1 min 30 s ago, at step 20 (the run's " \
        "processes are stopped, or were killed)"
    assert not [line for line in status.report(run_dir, now=now) if "stale:" in line]
