"""The stop path's pieces: the signals a run stops on, the line it prints, the ledger the parent reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from rkan_dist.ledger import RequeueLedger
from rkan_dist.stops import Aborted, Interrupted, StopSignals, _catches, interrupt_message, last_interrupt

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
    ledger = RequeueLedger(tmp_path)
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
