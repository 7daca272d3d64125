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
    ledger.record_failure("crash", rank=1, step=7, node="n2")
    ledger.record_restart(6, now - 300)
    ledger.record_failure("save", rank=0, step=9, node="n1")
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
    assert "last event: failure (save) of rank 0 on n1 at step 9" in text, text
    assert "nodes:      n1 save 1; n2 crash 1" in text, text
    assert "straggler" not in text, text


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


def compute(*medians: float) -> list[dict]:
    return [{"end_step": 20 * (index + 1), "median_s": median} for index, median in enumerate(medians)]


def test_status_names_a_persistent_straggler_and_no_other_rank_while_the_run_trains(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    now = time.time()
    EventLedger(run_dir).append({"event": "start", "step": 0, "time": now - 1000})
    (run_dir / "config.yaml").write_text("parallel:\n  straggler_threshold: 0.6\n")
    beats = {0: compute(0.10, 0.10, 0.10, 0.10), 1: compute(0.10, 0.20, 0.25, 0.20),  # 1: 0.5, 0.4, 0.5
             2: compute(0.15, 0.15, 0.15, 0.15),  # 0.67: above this run's threshold, below the default 0.75
             3: compute(0.30, 0.30, 0.10, 0.30)}  # below in the last window only
    for rank, windows in beats.items():
        write_beat(run_dir, rank, step=80, progress_time=now - 1, beat_time=now - 1, interval=1.0, timeout=0.0,
                   compute=windows)
    lines = status.report(run_dir, now=now)
    stragglers = [line for line in lines if "of the fastest rank's speed" in line]
    assert stragglers == ["straggler:  rank 1 on node1 computes at 0.50 of the fastest rank's speed (below 0.6 in 3 "
                          "windows of 20 steps in a row, to step 80)"], lines
    assert [line for line in lines if line.startswith("ranks:")][0].startswith(
        "ranks:      4 beating every 1 s, hang detection off; ")
    (run_dir / "config.yaml").unlink()  # the default threshold, 0.75: rank 2 too
    assert [line.split(" computes")[0].split("rank ")[1] for line in status.report(run_dir, now=now)
            if "of the fastest rank's speed" in line] == ["1 on node1", "2 on node2"]
    # beats gone stale (stopped processes) name no straggler; nor do beats without compute times
    assert not [line for line in status.report(run_dir, now=now + 60) if "fastest rank's speed" in line]


def test_status_names_the_straggler_rank_zero_recorded_once_the_run_ended(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    now = time.time()
    ledger = EventLedger(run_dir)
    ledger.append({"event": "start", "step": 0, "time": now - 1000})
    ledger.append({"event": "straggler", "rank": 3, "node": "n1", "score": 0.3, "windows": 3, "step": 60,
                   "time": now - 900})  # an earlier attempt's
    ledger.append({"event": "start", "step": 60, "time": now - 500})
    ledger.append({"event": "straggler", "rank": 5, "node": "n2", "score": 0.41, "windows": 3, "step": 400,
                   "job_id": "77"})
    lines = status.report(run_dir, now=now)
    assert [line for line in lines if "fastest rank's speed" in line] == [
        "last event: straggler: rank 5 on n2 at 0.41 of the fastest rank's speed for 3 windows, to step 400, "
        f"{status._clock(ledger.read()['events'][-1]['time'])}",
        "straggler:  rank 5 on n2 computes at 0.41 of the fastest rank's speed (below 0.75 in 3 windows of 20 steps "
        "in a row, to step 400)"], lines
    assert not [line for line in lines if line.startswith("nodes:")]  # no failure names a node


def test_the_nodes_line_counts_failures_stragglers_and_exclusions_per_node() -> None:
    events = [{"event": "failure", "kind": "crash", "rank": 4, "node": "n3", "step": 10},
              {"event": "evict", "node": "n3", "reason": "crash of rank 4 at step 10", "excluded": "n3"},
              {"event": "failure", "kind": "save", "rank": 0, "node": "n2", "step": 20},
              {"event": "failure", "kind": "hang", "rank": 5, "node": "n3", "step": 30},
              {"event": "straggler", "rank": 9, "node": "n10", "score": 0.5, "windows": 3, "step": 40},
              {"event": "evict", "node": "n10", "reason": "straggler", "skipped": "too few nodes left"},
              {"event": "failure", "kind": "crash", "rank": 1, "node": None, "step": 50}]
    assert status.node_lines(events) == ["nodes:      n3 crash 1, hang 1 (excluded); n10 straggler 1 (exclusion "
                                         "skipped); n2 save 1"]
    assert status.node_lines([{"event": "failure", "kind": "crash", "rank": 1, "step": 5}]) == []
    assert status.node_lines(events[4:6]) == []  # only once a failure names a node


def test_the_last_event_names_a_failures_node_and_describes_an_eviction() -> None:
    from rkan_dist.status import _describe

    assert _describe({"event": "failure", "kind": "hang", "rank": 5, "node": "n3", "step": 30}) == \
        "failure (hang) of rank 5 on n3 at step 30"
    assert _describe({"event": "evict", "node": "n3", "reason": "hang of rank 5 at step 30", "excluded": "n3"}) == \
        "node n3 excluded (hang of rank 5 at step 30)"
    assert _describe({"event": "evict", "node": "n3", "reason": "hang of rank 5 at step 30",
                      "skipped": "that would leave 1 of the partition's 2 nodes"}) == \
        "node n3 not excluded (hang of rank 5 at step 30): that would leave 1 of the partition's 2 nodes"
