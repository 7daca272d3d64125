"""Hang detection's pieces: the timeouts, the culprit, the folder the ranks agree on, and a real
watchdog thread that fires (with an injected exit, so that this process lives on)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rkan_dist.config import ConfigError, load_config
from rkan_dist.ledger import EventLedger
from rkan_dist.watchdog import (
    HangWatchdog,
    agree_on_folder,
    beat_interval,
    choose_culprit,
    collective_timeout_s,
    folder_name,
    folder_time,
    hang_folders,
    hang_timeout_for,
    process_start_ticks,
    process_state,
)

pytestmark = pytest.mark.unit

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def test_the_timeout_defaults_to_the_device_and_the_collective_timeout_is_twice_it() -> None:
    assert hang_timeout_for(None, "cuda") == 600 and hang_timeout_for(None, "cpu") == 1800
    assert hang_timeout_for(0, "cuda") == 0 and hang_timeout_for(45, "cpu") == 45
    assert collective_timeout_s(None, "cuda") == 1200 and collective_timeout_s(None, "cpu") == 3600
    assert collective_timeout_s(400, "cpu") == 800
    assert collective_timeout_s(10, "cpu") == 600  # start-up (unwatched) keeps 10 minutes
    assert collective_timeout_s(0, "cuda") == 1800  # off: gloo's and NCCL's usual 30 minutes
    assert [beat_interval(t) for t in (10, 60, 600, 1800, 7200, 0)] == [1.0, 3.0, 30.0, 30.0, 30.0, 30.0]


@pytest.mark.parametrize("value, expected", [("null", None), ("0", 0.0), ("10", 10.0), ("60.5", 60.5)])
def test_config_accepts_off_the_default_and_ten_seconds_or_more(value: str, expected) -> None:
    assert load_config(DEMO, [f"parallel.hang_timeout_s={value}"]).parallel.hang_timeout_s == expected


@pytest.mark.parametrize("value", ["5", "-1", "9.9"])
def test_config_refuses_timeouts_too_short_to_tell_a_hang_from_a_slow_step(value: str) -> None:
    with pytest.raises(ConfigError, match=r"parallel\.hang_timeout_s must be 0 \(off\) or >= 10"):
        load_config(DEMO, [f"parallel.hang_timeout_s={value}"])


def beat(rank: int, step: int, beat_time: float, waiting: str | None = None, progress_time: float = 0.0) -> dict:
    return {"rank": rank, "host": "h", "pid": 100 + rank, "step": step, "progress_time": progress_time,
            "beat_time": beat_time, "waiting": waiting}


def test_the_culprit_is_a_stopped_or_dead_rank_first() -> None:
    now = 1000.0
    beats = {0: beat(0, 5, now - 1, "backward and all-reduce"), 1: beat(1, 5, now - 30),
             2: beat(2, 5, now - 1, "backward and all-reduce")}
    assert choose_culprit(beats, 3, now, stale_after=3) == 1
    del beats[1]  # no heartbeat at all: it never started training, or its file is gone
    assert choose_culprit(beats, 3, now, stale_after=3) == 1


def test_the_culprit_among_live_ranks_is_the_one_not_waiting_in_a_collective() -> None:
    now = 1000.0
    beats = {0: beat(0, 5, now, "backward and all-reduce"), 1: beat(1, 5, now, "backward and all-reduce"),
             2: beat(2, 5, now, None)}  # stuck loading data or computing: the others wait for it
    assert choose_culprit(beats, 3, now, stale_after=3) == 2


def test_the_culprit_is_the_rank_behind_in_steps_else_unknown() -> None:
    now = 1000.0
    waiting = "checkpoint save"
    assert choose_culprit({0: beat(0, 7, now, waiting), 1: beat(1, 6, now, waiting)}, 2, now, 3) == 1
    assert choose_culprit({0: beat(0, 7, now, waiting), 1: beat(1, 7, now, waiting)}, 2, now, 3) is None
    assert choose_culprit({0: beat(0, 7, now), 1: beat(1, 7, now)}, 2, now, 3) is None  # all loading
    # a heartbeat of a rank beyond this world size (an earlier, larger run) is not a rank of this one
    assert choose_culprit({0: beat(0, 7, now, waiting), 1: beat(1, 7, now, waiting), 5: beat(5, 1, 0)},
                          2, now, 3) is None


def test_folder_names_sort_as_they_happened_and_read_back() -> None:
    t = 1_790_000_000.123
    assert abs(folder_time(folder_name(t)) - t) < 1e-3
    assert folder_name(t) < folder_name(t + 0.002) < folder_name(t + 3600)
    assert folder_time("notes.txt") is None and folder_time("x.Z") is None


def test_ranks_creating_a_folder_at_once_agree_on_one_and_older_attempts_do_not_count(tmp_path: Path) -> None:
    hangs = tmp_path / "hangs"
    since = time.time()
    (hangs / folder_name(since - 100)).mkdir(parents=True)  # the previous attempt's hang
    start = threading.Barrier(4)
    chosen: list[Path] = []
    clocks = [since + 20, since + 20.001, since + 20.5, since + 21]  # four ranks, four names

    def rank(index: int) -> None:
        start.wait()
        chosen.append(agree_on_folder(hangs, since, settle_s=0.3, now=lambda: clocks[index]))

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(chosen)) == 1
    # the earliest of those created (a rank that lists after another's mkdir creates none)
    assert chosen[0].name in {folder_name(clock) for clock in clocks}
    assert [p.name for p in hang_folders(hangs, since)] == [chosen[0].name]  # the losers removed theirs
    assert len(list(hangs.iterdir())) == 2  # and the previous attempt's is kept


def test_a_late_rank_reuses_the_folder_of_this_attempt(tmp_path: Path) -> None:
    hangs = tmp_path / "hangs"
    since = time.time() - 50
    first = agree_on_folder(hangs, since, settle_s=0)
    assert agree_on_folder(hangs, since, settle_s=0) == first


def read_events(run_dir: Path) -> list[dict]:
    return EventLedger(run_dir).read()["events"]


class ManualClock:
    """The watchdog's monotonic clock, moved by the test: how long a rank went without progress is then
    what the test says, however slowly a loaded machine runs the threads."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_for_checks(watchdog: HangWatchdog) -> None:
    """Return once the watchdog thread has looked at its clock since this call: it beats, then checks,
    so two heartbeats written after the call enclose one check (event-driven, 60 s at most)."""
    since = round(time.time(), 3)
    seen: set[float] = set()
    deadline = time.monotonic() + 60
    while len(seen) < 2:
        assert time.monotonic() < deadline, "the watchdog thread wrote no heartbeat for 60 s"
        with contextlib.suppress(OSError, ValueError):
            beat_time = json.loads(watchdog.heartbeat_path.read_text())["beat_time"]
            if beat_time > since:
                seen.add(beat_time)
        time.sleep(0.005)


def test_a_real_watchdog_thread_fires_dumps_logs_records_and_exits(tmp_path: Path, caplog) -> None:
    """Rank 0 of 2 stops progressing at step 5; rank 1's heartbeat is stale (a stopped process)."""
    (tmp_path / "heartbeats").mkdir()
    (tmp_path / "heartbeats" / "rank1.json").write_text(json.dumps(beat(1, 5, time.time() - 60)))
    exits: list[int] = []
    exited = threading.Event()
    clock = ManualClock()
    watchdog = HangWatchdog(tmp_path, 0, 2, timeout=10.0, interval=0.2,
                            exit=lambda code: (exits.append(code), exited.set()), clock=clock)
    with caplog.at_level(logging.ERROR, logger="rkan_dist.watchdog"):
        watchdog.start(4)
        watchdog.progress(5)
        heartbeat = json.loads(watchdog.heartbeat_path.read_text())
        clock.advance(9.9)
        wait_for_checks(watchdog)
        assert not exited.is_set(), "fired before the timeout"
        clock.advance(0.2)
        assert exited.wait(60)
    watchdog.stop()
    assert exits == [1]
    assert {k: heartbeat[k] for k in ("rank", "pid", "host")} == {"rank": 0, "pid": os.getpid(),
                                                                    "host": socket.gethostname()}
    assert heartbeat["step"] in (4, 5) and heartbeat["beat_time"] >= heartbeat["progress_time"]
    folder, = hang_folders(tmp_path / "hangs", watchdog.armed_at)
    stacks = (folder / "rank0.txt").read_text()
    assert stacks.startswith("rank 0 on ") and "step 5" in stacks and "culprit: rank 1" in stacks
    assert "most recent call first" in stacks and "test_watchdog.py" in stacks  # this test's thread, waiting
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hang: ")]
    assert lines == [f"hang: rank 1 stopped progressing at step 5 (no step or collective finished for "
                     f"{lines[0].split('for ')[1].split(' s)')[0]} s); stacks in {folder}"]
    failure, = [e for e in read_events(tmp_path) if e["event"] == "failure"]
    assert (failure["kind"], failure["rank"], failure["step"], failure["detected_by"]) == ("hang", 1, 5, 0)
    assert not watchdog.heartbeat_path.exists()  # stopped: a finished rank leaves no heartbeat


def test_a_live_rank_joins_the_dump_before_its_own_timeout_and_the_ledger_holds_one_hang(tmp_path: Path) -> None:
    """Rank 0 times out; rank 1 (long timeout, fresh progress) sees the folder and dumps too; rank 2 is stopped."""
    (tmp_path / "heartbeats").mkdir()
    (tmp_path / "heartbeats" / "rank2.json").write_text(json.dumps(beat(2, 3, time.time() - 60)))
    done = {0: threading.Event(), 1: threading.Event()}
    # Rank 1's clock never moves: it can only join. A 1 s interval makes its heartbeat stale (and rank 1
    # a culprit) only if its thread is starved for 3 s, which a loaded machine does not do.
    clocks = ManualClock(), ManualClock()
    first = HangWatchdog(tmp_path, 0, 3, timeout=10.0, interval=1.0, exit=lambda _: done[0].set(), clock=clocks[0])
    second = HangWatchdog(tmp_path, 1, 3, timeout=10.0, interval=1.0, exit=lambda _: done[1].set(), clock=clocks[1])
    second.start(3)
    first.start(3)
    clocks[0].advance(11)
    assert done[0].wait(60) and done[1].wait(60)
    first.stop(), second.stop()
    assert first.fired == second.fired
    assert sorted(p.name for p in first.fired.iterdir()) == ["rank0.txt", "rank1.txt"]
    failures = [e for e in read_events(tmp_path) if e["event"] == "failure"]
    assert [(e["kind"], e["rank"], e["step"]) for e in failures] == [("hang", 2, 3)]


def test_progress_keeps_a_watchdog_quiet(tmp_path: Path) -> None:
    """A step every 0.9 timeouts, for ten timeouts: never a hang (a missed progress would be one)."""
    fired = threading.Event()
    clock = ManualClock()
    watchdog = HangWatchdog(tmp_path, 0, 1, timeout=10.0, interval=0.02, exit=lambda _: fired.set(), clock=clock)
    watchdog.start(0)
    for step in range(1, 12):
        clock.advance(9.0)
        wait_for_checks(watchdog)
        watchdog.progress(step)
    watchdog.stop()
    assert not fired.is_set() and not (tmp_path / "hangs").exists()


def test_with_hang_detection_off_the_thread_beats_and_never_fires(tmp_path: Path) -> None:
    """parallel.hang_timeout_s: 0 keeps the heartbeat (status, straggler scores), never a hang."""
    fired = threading.Event()
    clock = ManualClock()
    watchdog = HangWatchdog(tmp_path, 0, 2, timeout=0, interval=0.02, exit=lambda _: fired.set(), clock=clock)
    watchdog.start(3)
    clock.advance(1e6)
    (tmp_path / "hangs" / folder_name(time.time() + 1)).mkdir(parents=True)  # another rank's hang: not joined either
    wait_for_checks(watchdog)
    heartbeat = json.loads(watchdog.heartbeat_path.read_text())
    watchdog.stop()
    assert not fired.is_set() and watchdog.fired is None
    assert (heartbeat["step"], heartbeat["timeout"]) == (3, 0) and "compute" not in heartbeat  # no timer given
    with pytest.raises(ValueError, match="timeout >= 0"):
        HangWatchdog(tmp_path, 0, 1, timeout=-1)


def test_a_stopped_culprit_on_this_host_is_killed_a_running_one_is_not(tmp_path: Path) -> None:
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        stopped, running = sleepers
        os.kill(stopped.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while process_state(stopped.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        watchdog = HangWatchdog(tmp_path, 0, 2, timeout=10)
        host = socket.gethostname()
        for process in sleepers:
            watchdog._kill_if_stopped({"rank": 1, "host": host, "pid": process.pid,
                                       "start_ticks": process_start_ticks(process.pid)})
        assert stopped.wait(timeout=5) == -signal.SIGKILL
        assert running.poll() is None
        # a reused pid (another start time) or another host is never killed
        os.kill(running.pid, signal.SIGSTOP)
        watchdog._kill_if_stopped({"rank": 1, "host": host, "pid": running.pid, "start_ticks": 1})
        watchdog._kill_if_stopped({"rank": 1, "host": host + "-other", "pid": running.pid,
                                   "start_ticks": process_start_ticks(running.pid)})
        time.sleep(0.2)
        assert running.poll() is None
    finally:
        for process in sleepers:
            if process.poll() is None:
                process.kill()
                os.kill(process.pid, signal.SIGCONT) if process.poll() is None else None
            process.wait(timeout=10)


def fire_with_dump(tmp_path: Path, dump, dump_timeout_s: float) -> tuple[HangWatchdog, list[int]]:
    """Rank 0 of 2 (rank 1 stopped at step 5) fires with `dump` as its one blocking diagnostic; returns
    once it has exited (60 s at most, far above any limit these tests configure)."""
    (tmp_path / "heartbeats").mkdir()
    (tmp_path / "heartbeats" / "rank1.json").write_text(json.dumps(beat(1, 5, time.time() - 60)))
    exits: list[int] = []
    exited = threading.Event()
    clock = ManualClock()
    watchdog = HangWatchdog(tmp_path, 0, 2, timeout=10.0, interval=0.2, clock=clock,
                            exit=lambda code: (exits.append(code), exited.set()),
                            dumps=[("nccl_trace.pkl", dump)], dump_timeout_s=dump_timeout_s)
    watchdog.start(5)
    clock.advance(10.5)
    assert exited.wait(60), "the watchdog did not exit"
    watchdog.stop()
    return watchdog, exits


def hang_failures(run_dir: Path) -> list[tuple]:
    return [(e["kind"], e["rank"], e["step"]) for e in read_events(run_dir) if e["event"] == "failure"]


def test_a_dump_is_written_after_the_hang_is_recorded(tmp_path: Path) -> None:
    recorded_before: list[list[tuple]] = []

    def dump(path: Path) -> None:
        recorded_before.append(hang_failures(tmp_path))
        path.write_bytes(b"flight recorder")

    watchdog, exits = fire_with_dump(tmp_path, dump, dump_timeout_s=30.0)
    assert exits == [1] and recorded_before == [[("hang", 1, 5)]]
    assert (watchdog.fired / "rank0.nccl_trace.pkl").read_bytes() == b"flight recorder"
    assert sorted(p.name for p in watchdog.fired.iterdir()) == ["rank0.nccl_trace.pkl", "rank0.txt"]  # no note


def test_a_dump_that_never_returns_is_left_behind_at_its_limit_and_the_hang_is_recorded(tmp_path: Path,
                                                                                      caplog) -> None:
    """A dump stuck in the driver (waiting with the GIL released): the hang is in the ledger before the
    dump starts, and the process exits once the limit has passed, without it."""
    release = threading.Event()
    recorded_before: list[list[tuple]] = []

    def wedged(path: Path) -> None:
        recorded_before.append(hang_failures(tmp_path))
        release.wait()

    try:
        with caplog.at_level(logging.ERROR, logger="rkan_dist.watchdog"):
            watchdog, exits = fire_with_dump(tmp_path, wedged, dump_timeout_s=0.5)
    finally:
        release.set()  # lets the abandoned dump thread end
    assert exits == [1] and recorded_before == [[("hang", 1, 5)]]
    assert hang_failures(tmp_path) == [("hang", 1, 5)]
    assert "hang: the nccl_trace.pkl dump did not finish within 0.5 s; exiting without it" in caplog.messages
    note = (watchdog.fired / "rank0.dump_timeout.txt").read_text()
    assert note.startswith("rank 0: the diagnostics nccl_trace.pkl did not finish within 0.5 s")
    assert "After 0.5 s nccl_trace.pkl had not finished" in note and "in wedged" in note  # where it was stuck
    assert not (watchdog.fired / "rank0.nccl_trace.pkl").exists()


WEDGED_HOLDING_THE_GIL = """
import ctypes, sys, time
from rkan_dist.watchdog import HangWatchdog

def wedged(path):
    ctypes.PyDLL(None).sleep(3600)  # a C call that blocks and never releases the GIL

now = [1000.0]
watchdog = HangWatchdog(sys.argv[1], 0, 1, timeout=10.0, interval=0.2, clock=lambda: now[0],
                        dumps=[("nccl_trace.pkl", wedged)], dump_timeout_s=1.0)
watchdog.start(3)
now[0] += 11
time.sleep(600)
"""


def test_a_dump_that_holds_the_gil_forever_still_ends_the_process_after_recording_the_hang(tmp_path: Path) -> None:
    """No Python thread runs while the dump holds the GIL: faulthandler's C thread ends the process (exit 1,
    the watchdog's own code) at twice the limit, the hang already in the ledger. A process of its own, as
    the real os._exit is what ends it."""
    result = subprocess.run([sys.executable, "-c", WEDGED_HOLDING_THE_GIL, str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    failure, = [e for e in read_events(tmp_path) if e["event"] == "failure"]
    assert (failure["kind"], failure["step"]) == ("hang", 3)
    folder, = (tmp_path / "hangs").iterdir()
    note = (folder / "rank0.dump_timeout.txt").read_text()
    assert "faulthandler's thread ended this process (exit 1) at 2 s" in note
    assert "After 1 s" not in note  # the Python-level limit could not act: the GIL was held
    assert "in wedged" in note  # faulthandler's stacks show where the dump was stuck
    assert (folder / "rank0.txt").read_text().startswith("rank 0 on ")
