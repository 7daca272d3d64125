"""Every stop takes one path: a step boundary on every rank, one complete checkpoint, one ledger
event, and an exit that says what happens next.

Which layer handles which stop
------------------------------
=======================================  ==============================================  ==========================================
What happens                             Who acts                                        How it ends
=======================================  ==============================================  ==========================================
the last step is reached                 the Trainer                                     final checkpoint; exit 0
USR2 in a Slurm step (preemption or      every rank (`StopSignals("slurm")`); rank 0     checkpoint, ledger "stop" (preemption |
time limit, slurm.signal_delay_s)        then requeues (rkan_dist.submit)                timeout), scontrol requeue; exit 0
SIGTERM in a Slurm step                  noted only: dying could cut a collective save   USR2 or KillWait's SIGKILL decides
Ctrl-C or SIGTERM anywhere else          one process: `StopSignals("local")`.            checkpoint, ledger "stop" (interrupt),
                                         `rkan-dist train --nproc N`: the parent         `interrupted at step N; checkpoint P;
                                         (`AgentRelay`) passes it to the workers,        re-run the same command to continue`;
                                         each stops through its StopSignals("local")     exit 130. Python API: Trainer.train()
                                                                                         raises Interrupted
a second Ctrl-C or SIGTERM               the parent: SIGKILL to torchrun's agent and     the step in progress is lost, the last
                                         the workers; one process: Aborted               complete checkpoint stays; exit 130
SIGKILL, a crashed or hung rank          nothing in the process                          the next start resumes from the latest
                                                                                         valid checkpoint
=======================================  ==============================================  ==========================================

The ranks agree on stopping through the flag every micro-batch already all-reduces (see
Trainer._train_epoch), so a signal that reaches one rank stops them all at the same step, and the
checkpoint is saved collectively. A stop asked for before the first step (while the Trainer is
built) ends before any step, with the checkpoint the run resumed from.

Why the parent relays: torchrun's agent turns SIGINT/SIGTERM into a SignalException traceback,
SIGTERMs the workers and SIGKILLs them 30 s later, saved or not; and it starts every worker in a
session of its own, so a terminal's Ctrl-C never reaches them. The parent therefore starts the
agent in a session of its own too (nothing but the parent signals it; it gets SIGTERM if the
parent dies) and passes the signal to the workers itself, once each has installed its handler. The
workers stop, save, and exit 0; the agent exits 0 without a word; the parent reads the stop in
the ledger and exits 130.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rkan_dist.ledger import RequeueLedger

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
_POLL_S = 0.1


def interrupt_message(step: int, checkpoint: str | os.PathLike | None) -> str:
    where = checkpoint if checkpoint is not None else "none (no step was finished)"
    return f"interrupted at step {step}; checkpoint {where}; re-run the same command to continue"


class Interrupted(KeyboardInterrupt):
    """Trainer.train() stopped by Ctrl-C or SIGTERM (outside Slurm): every rank stopped at a step
    boundary and `checkpoint` (None if no step was finished) is complete. A KeyboardInterrupt, so
    that `except Exception` does not swallow it; its message is the line the CLI prints."""

    def __init__(self, step: int, checkpoint: Path | None, signal_name: str | None = None):
        super().__init__(interrupt_message(step, checkpoint))
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


class Aborted(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM: stop at once, without waiting for the step boundary or the save."""


class _EarlyUsr2:
    """USR2 noted from the moment this module is imported in a Slurm task, until StopSignals takes over.

    submitit imports rkan_dist.submit (and so this module) when it unpickles the job, seconds
    before the trainer exists; a USR2 in between (a time limit shorter than the signal delay plus
    start-up, a preemption during start-up) would otherwise kill the task with no checkpoint and
    no requeue.
    """

    seen = False

    @classmethod
    def note(cls, *_: Any) -> None:
        cls.seen = True


if "SLURM_STEP_ID" in os.environ and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGUSR2, _EarlyUsr2.note)


class StopSignals:
    """The signals that ask this process's Trainer to stop at the next step boundary.

    "slurm" (a task of a Slurm step): USR2 stops, also one that came during start-up; SIGTERM
    is only noted (`saw_sigterm`, which tells a preemption from a time limit).
    "local" (anywhere else): SIGINT or SIGTERM stops; a second one raises Aborted at once.
    Install from the main thread; `restore()` puts the previous handlers back.
    """

    def __init__(self, mode: str = "slurm"):
        if mode not in ("slurm", "local"):
            raise ValueError(f"mode must be 'slurm' or 'local', got {mode!r}")
        self.mode = mode
        self.stop_requested = mode == "slurm" and _EarlyUsr2.seen  # it came during start-up
        self.signal_name: str | None = "SIGUSR2" if self.stop_requested else None
        self.saw_sigterm = False
        self._trainer: Any = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        if self.mode == "slurm":
            handlers = {signal.SIGUSR2: self._on_usr2, signal.SIGTERM: self._on_sigterm}
        else:
            handlers = {signal.SIGINT: self._on_interrupt, signal.SIGTERM: self._on_interrupt}
        for signum, handler in handlers.items():
            self._previous[signum] = signal.signal(signum, handler)
        return self

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def attach(self, trainer: Any) -> None:
        """The Trainer this process stops; a signal that came while it was built applies now."""
        self._trainer = trainer
        trainer.stop_signals = self
        if self.stop_requested:
            trainer.request_stop()

    def _request(self, name: str) -> None:
        self.stop_requested = True
        self.signal_name = name
        if self._trainer is not None:
            self._trainer.request_stop()

    def _on_usr2(self, *_: Any) -> None:
        self._request("SIGUSR2")

    def _on_sigterm(self, *_: Any) -> None:
        # Dying here could cut a collective save in half; USR2 or KillWait's SIGKILL decides instead.
        self.saw_sigterm = True

    def _on_interrupt(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.stop_requested:
            self.restore()
            raise Aborted(f"aborted by a second {name}: the step in progress is lost; re-run the same command "
                          "to continue from the last complete checkpoint")
        self._request(name)
        if "RANK" not in os.environ:  # one process: say at once that it was heard (no logging in a handler)
            os.write(2, f"\n{name}: stopping at the next step boundary with a checkpoint "
                        "(again to abort at once)\n".encode())


def last_interrupt(run_dir: str | os.PathLike, since: float) -> dict[str, Any] | None:
    """The ledger's interrupt stop written at or after `since`, if that is how the run ended."""
    try:
        events = RequeueLedger(run_dir).read()["events"]
    except (OSError, ValueError, KeyError):
        return None
    last = events[-1] if events else None
    # the ledger keeps times to the millisecond, rounded: one written right after `since` may read as before it
    if last and last.get("event") == "stop" and last.get("kind") == "interrupt" and last.get("time", 0) > since - 1e-3:
        return last
    return None


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (Linux: SigCgt in /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        return not Path("/proc/self/status").exists()  # no /proc: assume it does
    return False


def _set_parent_death_signal() -> None:
    """In the agent, before exec: SIGTERM when the parent dies (the agent then stops the workers)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class AgentRelay:
    """Runs torchrun's agent for `rkan-dist train --nproc N` and relays Ctrl-C / SIGTERM to its workers.

    First signal: the same signal to every worker, each once it has its StopSignals("local")
    handler (a worker still importing gets it a moment later, never a KeyboardInterrupt traceback).
    Second: SIGKILL to the agent and every process under it. The handlers only note the signal;
    the wait loop acts on it within _POLL_S, so nothing runs re-entered inside a handler.
    """

    def __init__(self, command: list[str], run_dir: str | os.PathLike):
        import psutil  # here, not first in a signal handler

        self._psutil = psutil
        self.command, self.run_dir = command, Path(run_dir)
        self.signal_name: str | None = None
        self.aborted = False
        self._relayed: set[int] = set()

    def run(self) -> int:
        started = time.time()
        linux = sys.platform.startswith("linux")
        self.agent = subprocess.Popen(self.command, start_new_session=True,
                                      preexec_fn=_set_parent_death_signal if linux else None)
        previous = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                try:
                    code = self.agent.wait(timeout=_POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    if self.aborted:
                        self._kill_all()
                    elif self.signal_name is not None:
                        self._relay()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if self.aborted:
            print("rkan-dist: aborted by a second interrupt: the step in progress is lost; re-run the same command "
                  "to continue from the last complete checkpoint", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        if code == 0 and last_interrupt(self.run_dir, started) is not None:
            return EXIT_INTERRUPTED  # rank 0 printed the line
        return code

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            os.write(2, f"\n{self.signal_name}: every process stops at the next step boundary with a checkpoint "
                        "(again to abort at once)\n".encode())
        else:
            self.aborted = True

    def _relay(self) -> None:
        # The same signal, to each worker whose StopSignals("local") is installed: it handles SIGINT
        # and SIGTERM alike, and a caught SIGTERM shows it is (Python catches SIGINT from the start).
        signum = signal.Signals[self.signal_name]
        try:
            workers = self._psutil.Process(self.agent.pid).children()
        except self._psutil.NoSuchProcess:
            return
        for worker in workers:
            if worker.pid not in self._relayed and _catches(worker.pid, signal.SIGTERM):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signum)
                self._relayed.add(worker.pid)

    def _kill_all(self) -> None:
        try:
            victims = [self._psutil.Process(self.agent.pid)]
            victims += victims[0].children(recursive=True)
        except self._psutil.NoSuchProcess:
            return
        for victim in victims:
            with contextlib.suppress(self._psutil.NoSuchProcess):
                victim.kill()
