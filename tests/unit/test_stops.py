"""The stop path's pieces: the signals a run stops on, the line it prints, the ledger the parent reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rkan_dist.faults import (
    EXIT_LOST_PEER,
    Aborted,
    Interrupted,
    describe_exit,
    give_up_message,
    interrupt_message,
    lost_peer,
)
from rkan_dist.ledger import EventLedger
from rkan_dist.stops import StopSignals
from rkan_dist.supervisor import _catches, last_interrupt, record_failure, restart_decision, root_cause

pytestmark = pytest.mark.unit


class FakeTrainer:
    stop_signals = None
    stops = 0

    def request_stop(self) -> None:
        self.stops += 1


def deliver(signum: int) -> None:
    """Send `signum` to this process and let Python run its handler."""
    os.kill(os.getpid(), signum)
    time.sleep(0.01)


def test_the_line_names_the_step_and_the_checkpoint():
    assert interrupt_message(7, "runs/x/checkpoints/step-7") == \
        "interrupted at step 7; checkpoint runs/x/checkpoints/step-7; re-run the same command to continue"
    assert "checkpoint none (no step was finished)" in interrupt_message(0, None)
    stop = Interrupted(7, None, "SIGINT")
    assert isinstance(stop, KeyboardInterrupt) and not isinstance(stop, Exception)  # `except Exception` lets it by
    assert (stop.step, stop.checkpoint, stop.signal_name) == (7, None, "SIGINT") and str(stop).startswith("interrupted")


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_local_first_signal_asks_for_a_stop_second_aborts_and_restore_puts_handlers_back(first):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    trainer = FakeTrainer()
    signals = StopSignals("local").install()
    try:
        assert _catches(os.getpid(), signal.SIGTERM)  # what the parent waits for before it relays
        signals.attach(trainer)
        assert trainer.stop_signals is signals and trainer.stops == 0
        deliver(first)
        assert signals.stop_requested and trainer.stops == 1 and signals.signal_name == first.name
        with pytest.raises(Aborted, match="second SIGINT"):
            deliver(signal.SIGINT)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # the second restored
    finally:
        signals.restore()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_stop_asked_for_before_the_trainer_exists_applies_when_it_is_attached():
    signals = StopSignals("local").install()
    try:
        deliver(signal.SIGTERM)
        trainer = FakeTrainer()
        signals.attach(trainer)
        assert trainer.stops == 1
    finally:
        signals.restore()


def test_slurm_mode_stops_on_usr2_and_only_notes_sigterm():
    trainer = FakeTrainer()
    signals = StopSignals("slurm").install()
    try:
        signals.attach(trainer)
        deliver(signal.SIGTERM)
        assert signals.saw_sigterm and not signals.stop_requested and trainer.stops == 0
        deliver(signal.SIGUSR2)
        assert signals.stop_requested and trainer.stops == 1 and signals.signal_name == "SIGUSR2"
    finally:
        signals.restore()
    with pytest.raises(ValueError, match="mode"):
        StopSignals("elsewhere")


def test_the_parent_reads_an_interrupt_from_the_ledger_only_if_it_ended_this_launch(tmp_path):
    started = time.time()
    ledger = EventLedger(tmp_path)
    assert last_interrupt(tmp_path, started) is None
    ledger.append({"event": "stop", "kind": "interrupt", "step": 3})
    assert last_interrupt(tmp_path, started)["step"] == 3
    assert last_interrupt(tmp_path, time.time() + 60) is None  # one from an earlier launch
    ledger.append({"event": "start", "step": 3})
    assert last_interrupt(tmp_path, started) is None  # the run went on after it


def test_a_fresh_python_process_catches_sigint_but_not_sigterm():
    """Why the parent looks at SIGTERM: Python catches SIGINT from its start, StopSignals adds SIGTERM."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while not _catches(child.pid, signal.SIGINT) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _catches(child.pid, signal.SIGINT) and not _catches(child.pid, signal.SIGTERM)
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("exit_codes, restarts_done, budget, decision", [
    ({1: -9}, 0, 3, "restart"),
    ({1: -9}, 2, 3, "restart"),
    ({1: -9}, 3, 3, "give_up"),
    ({0: 1, 1: -9}, 0, 0, "give_up"),  # train.max_restarts=0: the first crash ends the run
    ({}, 0, 3, "restart"),  # the agent itself died and reported nothing: a crash all the same
    ({0: 2}, 0, 3, "usage"),  # a configuration error is the same error on every restart
    ({0: -15, 1: 2}, 0, 3, "usage"),
])
def test_restart_decision(exit_codes, restarts_done, budget, decision):
    assert restart_decision(exit_codes, restarts_done, budget) == decision


def test_the_rank_killed_by_a_signal_is_blamed_before_a_peer_that_lost_it():
    assert root_cause({0: 1, 1: -9}) == (1, -9)
    assert root_cause({0: 1, 1: 1}) == (0, 1)
    assert root_cause({0: EXIT_LOST_PEER, 1: 1}) == (1, 1)  # a peer's echo is not the cause
    assert root_cause({0: EXIT_LOST_PEER, 1: EXIT_LOST_PEER}) == (0, EXIT_LOST_PEER)
    assert root_cause({}) == (None, None)
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(1) == "exit 1"


def test_the_give_up_line_names_every_failure_and_the_checkpoint():
    failures = [{"kind": "crash", "rank": 1, "step": 6}, {"kind": "save", "rank": 0, "step": 9},
                {"kind": "crash", "rank": None, "step": None}]
    assert give_up_message(failures, "/runs/a/checkpoints/step-9") == (
        "gave up after 3 failures (crash of rank 1 at step 6, refused save on rank 0 at step 9, crash of an "
        "unknown rank); latest checkpoint /runs/a/checkpoints/step-9; fix the cause and re-run the same command")
    assert give_up_message(failures[:1], None).startswith("gave up after 1 failure (crash of rank 1 at step 6); "
                                                          "latest checkpoint none;")


def test_a_lost_peer_is_told_from_a_bug():
    assert lost_peer(RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:1: Connection reset by peer"))
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not lost_peer(ValueError("Connection reset by peer"))


def test_the_parent_records_a_crash_unless_a_rank_recorded_the_failure_itself(tmp_path):
    ledger = EventLedger(tmp_path)
    since = time.time()
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 7, "time": since + 1}) + "\n")
    event = record_failure(tmp_path, since, {0: 1, 1: -9})
    assert (event["kind"], event["rank"], event["step"], event["exit"]) == ("crash", 1, 7, "killed by SIGKILL")
    ledger.record_failure("save", 0, 9, error="disk full")  # a rank's own record of a refused save
    assert record_failure(tmp_path, since, {0: 1, 1: 1})["kind"] == "save"
    assert [event["kind"] for event in ledger.read()["events"]] == ["crash", "save"]
    # a step logged before this attempt started says nothing about it: no checkpoint, so no step
    assert record_failure(tmp_path, since + 5, {1: -9})["step"] is None


def test_a_restart_line_gives_a_hangs_own_account_not_the_detecting_ranks_exit() -> None:
    from rkan_dist.faults import failure_cause

    hang = {"kind": "hang", "rank": 1, "step": 5, "stalled_seconds": 68.2, "stacks": "/r/hangs/20261130T212643Z"}
    assert failure_cause(hang, "exit 1") == "no step or collective finished for 68 s; stacks in /r/hangs/20261130T212643Z"
    assert failure_cause({"kind": "crash", "exit": "Killed"}, "Killed") == "Killed"
