"""Straggler scores: the pure scoring (rkan_dist.stragglers), the compute timer on a real model, and
rank 0's watchdog thread turning real heartbeat files into TensorBoard values and one ledger event."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from rkan_dist.ledger import EventLedger
from rkan_dist.stragglers import (
    PERSISTENT_WINDOWS,
    Slowest,
    Straggler,
    aligned_ends,
    beat_windows,
    persistent_stragglers,
    slowest,
    window_end,
    window_median,
    window_scores,
)
from rkan_dist.watchdog import (
    CARRY_WINDOWS,
    HEARTBEATS,
    ComputeTimer,
    HangWatch,
    HangWatchdog,
    slow_rank_delay,
    write_json_atomic,
)

pytestmark = pytest.mark.unit


def windows(*medians: float, first_end: int = 20) -> dict[int, float]:
    return {first_end + 20 * index: median for index, median in enumerate(medians)}


# ----------------------------------------------------------------------------- pure scoring

def test_windows_end_at_multiples_of_the_window_and_a_half_timed_window_has_no_median() -> None:
    assert [window_end(step, 20) for step in (1, 19, 20, 21, 40)] == [20, 20, 20, 40, 40]
    assert window_median([0.3, 0.1, 0.2, 9.0], window_steps=4) == pytest.approx(0.25)  # one compile step: no matter
    assert window_median([0.1] * 10, window_steps=20) == pytest.approx(0.1)
    assert window_median([0.1] * 9, window_steps=20) is None  # a resumed run's first, partial window
    assert window_median([], window_steps=20) is None


def test_a_score_is_the_fastest_median_over_the_ranks_own_in_windows_every_rank_reported() -> None:
    per_rank = {0: windows(0.10, 0.10, 0.10), 1: windows(0.20, 0.40, 0.10), 2: windows(0.10, 0.10)}
    assert aligned_ends(per_rank) == [20, 40]  # rank 2 has not reported the window ending at 60 yet
    assert window_scores(per_rank, 40) == {0: 1.0, 1: 0.25, 2: 1.0}
    assert slowest(per_rank) == Slowest(rank=1, score=0.25, end_step=40)
    assert slowest({0: windows(0.1), 1: windows(0.1)}) == Slowest(0, 1.0, 20)  # a tie: the lowest rank
    assert slowest({}) is None and slowest({0: {20: 0.1}, 1: {40: 0.1}}) is None


def test_a_persistent_straggler_scores_below_the_threshold_in_each_of_the_last_three_windows() -> None:
    per_rank = {
        0: windows(0.10, 0.10, 0.10, 0.10, 0.10),
        1: windows(0.10, 0.20, 0.25, 0.20, 0.30),  # below 0.75 in the last 4 windows
        2: windows(0.30, 0.30, 0.10, 0.30, 0.30),  # below in the last 2 only (it recovered in between)
        3: windows(0.11, 0.13, 0.13, 0.13, 0.13),  # slower, but above the threshold: 0.77
        4: windows(0.10, 0.10, 0.10, 0.10, 0.10, 0.50),  # its latest window is not comparable yet
    }
    assert persistent_stragglers(per_rank, threshold=0.75) == [Straggler(rank=1, score=0.5, windows=4, end_step=100)]
    assert [s.rank for s in persistent_stragglers(per_rank, threshold=0.8)] == [1, 3]
    assert persistent_stragglers(per_rank, threshold=0.75, windows=2) == [
        Straggler(1, 0.5, 4, 100), Straggler(2, pytest.approx(1 / 3), 2, 100)]


def test_no_straggler_before_three_windows_every_rank_reported_nor_with_one_rank() -> None:
    assert PERSISTENT_WINDOWS == 3
    assert persistent_stragglers({0: windows(0.1, 0.1), 1: windows(0.9, 0.9)}, 0.75) == []
    assert persistent_stragglers({0: windows(0.1, 0.1, 0.1), 1: windows(0.9, 0.9, first_end=60)}, 0.75) == []
    assert persistent_stragglers({0: windows(0.9, 0.9, 0.9)}, 0.75) == []  # alone, it is the fastest


def test_a_heartbeats_compute_windows_skip_what_cannot_be_scored() -> None:
    beat = {"compute": [{"end_step": 20, "median_s": 0.03}, {"end_step": 40}, {"end_step": "x", "median_s": 1},
                        {"end_step": 60, "median_s": 0.0}, None, {"end_step": 80, "median_s": "0.05"}]}
    assert beat_windows(beat) == {20: 0.03, 80: 0.05}
    assert beat_windows({}) == {} and beat_windows({"compute": None}) == {}


def test_the_slow_rank_hook_is_read_in_one_place_and_refuses_a_typo() -> None:
    assert slow_rank_delay(5, {"RKAN_TEST_SLOW_RANK": "5:0.05"}) == 0.05
    assert slow_rank_delay(4, {"RKAN_TEST_SLOW_RANK": "5:0.05"}) == 0.0
    assert slow_rank_delay(0, {}) == 0.0
    with pytest.raises(ValueError, match="RANK:SECONDS"):
        slow_rank_delay(0, {"RKAN_TEST_SLOW_RANK": "0.05"})


# ----------------------------------------------------------------------------- the compute timer

class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_timer_sums_a_steps_micro_batches_and_publishes_a_window_once_the_next_begins() -> None:
    clock = ManualClock()
    timer = ComputeTimer(window_steps=2, clock=clock)
    for step, seconds in ((1, 0.1), (1, 0.1), (2, 0.3), (3, 0.5)):  # step 1: two micro-batches
        timer.add(step, seconds)
    assert timer.windows == ((2, pytest.approx(0.25), 1000.0),)  # median of 0.2 and 0.3
    for step in (4, 5, 6, 7):
        clock.now += 10
        timer.add(step, 0.1)
    assert [end for end, _, _ in timer.windows] == [2, 4, 6]
    # the heartbeat carries the windows of the last span, at least the last CARRY_WINDOWS
    assert timer.beat_entries(span_s=5.0) == [{"end_step": end, "median_s": median} for end, median, _ in
                                              timer.windows][-CARRY_WINDOWS:]
    clock.now += 1000
    assert [entry["end_step"] for entry in timer.beat_entries(span_s=5.0)] == [2, 4, 6]


class RecordingTimer(ComputeTimer):
    """The real timer, keeping each forward it timed as (step, seconds)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.timed: list[tuple[int, float]] = []

    def add(self, step: int, seconds: float) -> None:
        self.timed.append((step, seconds))
        super().add(step, seconds)


def test_the_timer_times_training_forwards_of_a_real_model_with_the_test_delay_and_not_eval() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    timer = RecordingTimer(delay_s=0.02, window_steps=2).attach(model)
    x = torch.randn(4, 8)
    for step in range(4):  # steps 1..4, two micro-batches each, and an evaluation after each
        timer.completed = step
        for _ in range(2):
            model(x).sum().backward()
        with torch.no_grad():
            model(x)
        model.eval()
        model(x)
        model.train()
    timer.completed = 4
    model(x)  # step 5 opens: the window of steps 3-4 closes
    assert [step for step, _ in timer.timed] == [1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert all(seconds >= 0.02 for _, seconds in timer.timed)  # the delay sleeps inside the timed region
    assert [end for end, _, _ in timer.windows] == [2, 4]
    assert all(median >= 0.04 for _, median, _ in timer.windows)  # a step: the sum of its micro-batches
    timer.detach()
    model(x)
    assert len(timer.timed) == 9  # no hooks left


def test_a_compiled_model_runs_the_timers_hooks_at_every_forward() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    timer = ComputeTimer(delay_s=0.01, window_steps=1).attach(model)
    model.compile()
    x = torch.randn(4, 8)
    for step in range(4):
        timer.completed = step
        model(x).sum().backward()
    assert [end for end, _, _ in timer.windows] == [1, 2, 3]
    assert all(median >= 0.01 for _, median, _ in timer.windows[1:])  # the first holds the compilation


# ----------------------------------------------------------------------------- rank 0's thread

def write_beat(run_dir: Path, rank: int, medians: dict[int, float], node: str, age: float = 0.0) -> None:
    (run_dir / HEARTBEATS).mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / HEARTBEATS / f"rank{rank}.json", {
        "rank": rank, "host": node, "pid": 1, "step": 100, "progress_time": time.time() - age, "interval": 1.0,
        "beat_time": time.time() - age, "timeout": 0.0,
        "compute": [{"end_step": end, "median_s": median} for end, median in medians.items()]})


def straggler_events(run_dir: Path) -> list[dict]:
    return [event for event in EventLedger(run_dir).read()["events"] if event["event"] == "straggler"]


def test_rank_zero_scores_the_heartbeats_and_records_a_persistent_straggler_once(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """Rank 0 is a real watchdog (hang detection off: beats only) with its own timer; ranks 1-3 are
    heartbeat files: rank 2 on n2 is slow in the last 3 windows, rank 3's beat is stale (its windows old)."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run_dir = tmp_path
    timer = ComputeTimer(window_steps=20)
    for step in range(1, 62):
        timer.add(step, 0.1)  # windows 20, 40, 60 at 0.1 s
    write_beat(run_dir, 1, windows(0.1, 0.1, 0.1), "n1")
    write_beat(run_dir, 2, windows(0.1, 0.3, 0.4), "n2")  # scores 1, 0.33, 0.25: two windows below
    write_beat(run_dir, 3, windows(0.9, 0.9, 0.9), "n3", age=60)
    watchdog = HangWatchdog(run_dir, 0, 4, timeout=0, interval=0.05, timer=timer, straggler_threshold=0.75)
    assert watchdog.interval == 0.05
    watchdog.start(61)
    try:
        deadline = time.monotonic() + 30
        while watchdog.rank_scores != {"ranks/slowest_score": 0.25, "ranks/slowest_rank": 2}:
            assert time.monotonic() < deadline, watchdog.rank_scores
            time.sleep(0.01)
        assert straggler_events(run_dir) == []  # below in 2 windows only
        write_beat(run_dir, 2, windows(0.1, 0.3, 0.4, 0.5), "n2")
        for step in range(62, 82):
            timer.add(step, 0.1)  # rank 0's window 80
        write_beat(run_dir, 1, windows(0.1, 0.1, 0.1, 0.1), "n1")
        while not straggler_events(run_dir):
            assert time.monotonic() < deadline, watchdog.rank_scores
            time.sleep(0.01)
        time.sleep(0.3)  # several more beats: still one event
    finally:
        watchdog.stop()
    event, = straggler_events(run_dir)
    assert {key: event[key] for key in ("rank", "node", "score", "windows", "step", "job_id")} == \
        {"rank": 2, "node": "n2", "score": 0.333, "windows": 3, "step": 80, "job_id": "4242"}
    assert not watchdog.heartbeat_path.exists()  # hang detection off still removes its beat when it stops


def test_hang_watch_times_the_model_unless_sync_bn_and_only_rank_zero_scores(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    for rank, sync_bn, timed, scores in ((0, False, True, True), (1, False, True, False), (0, True, False, True)):
        watch = HangWatch()
        watch.arm(tmp_path, rank, 2, 0, "cpu", 7, launched=True, module=model, sync_bn=sync_bn,
                  straggler_threshold=0.75)
        try:
            assert (watch.timer is not None) == timed
            assert (watch.watchdog.straggler_threshold is not None) == scores
            assert watch.watchdog.timeout == 0 and watch.watchdog.interval == 30.0  # off: beats every 30 s
            beat = json.loads(watch.watchdog.heartbeat_path.read_text())
            assert ("compute" in beat) == timed
            if timed:
                assert watch.timer.completed == 7 and len(model._forward_pre_hooks) == 1
        finally:
            watch.disarm()
        assert not model._forward_pre_hooks and not model._forward_hooks and watch.rank_scores() == {}
    watch = HangWatch()
    watch.arm(tmp_path, 0, 1, 0, "cpu", 0, launched=False, module=model)  # one plain process: nothing
    assert watch.watchdog is None and watch.timer is None and not model._forward_pre_hooks


def test_nothing_on_the_step_path_waits_for_the_watchdog_thread(tmp_path: Path) -> None:
    """The thread reads `windows` while the training thread replaces it: never an error, never a torn list."""
    timer = ComputeTimer(window_steps=1)
    stop = threading.Event()
    seen, errors = [], []

    def read() -> None:
        while not stop.is_set():
            try:
                entries = timer.beat_entries(1.0)
                ends = [entry["end_step"] for entry in entries]
                assert ends == list(range(ends[0], ends[0] + len(ends))) if ends else True, ends
                seen.append(len(entries))
            except Exception as err:  # reported to the test below
                errors.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    for step in range(1, 3000):
        timer.add(step, 0.001)
    stop.set()
    reader.join()
    assert not errors and seen and max(seen) <= 256 and len(timer.windows) == 256
