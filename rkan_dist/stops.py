"""The signals that stop a run at a step boundary: StopSignals, and a Slurm task's start-up hold.

Which layer handles which stop (the Trainer, the `--nproc` supervisor, srun, after-srun) is
written down in docs/FAULTS.md; exit codes and wording live in rkan_dist.faults. The ranks agree
on stopping through the flag every micro-batch already all-reduces, so a signal that reaches one
rank stops them all at the same step, and the checkpoint is saved collectively. A stop asked for
before the first step (while the Trainer is built) ends before any step, with the checkpoint the
run resumed from.

Standard library only: a Slurm task imports this module first thing (rkan_dist.task_start under
submitit, rkan_dist.slurm_task under the sbatch template).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from rkan_dist.faults import Aborted, abort_message

# Slurm's preemption / time-limit signal, and the SIGTERM that comes before a preemption's SIGKILL.
_SLURM_STOP_SIGNALS = frozenset({signal.SIGUSR2, signal.SIGTERM})


def _in_slurm_step_main_thread() -> bool:
    return "SLURM_STEP_ID" in os.environ and threading.current_thread() is threading.main_thread()


def hold_slurm_signals() -> None:
    """Block USR2 and SIGTERM in a Slurm task until StopSignals("slurm") installs its handlers.

    A task imports this module seconds before its Trainer exists; a USR2 in between (a preemption
    during start-up, a time limit shorter than the signal delay plus start-up) or a SIGTERM would
    otherwise kill it with no checkpoint, or reach a handler that is not ours: submitit installs
    one before it calls the job, which requeues the job without a ledger event. Blocked, the
    signal waits in the kernel and reaches StopSignals' handler the moment it is installed, however
    late; nothing can take it in between. Threads started meanwhile inherit the block, so the
    signal can only land on the main thread, where Python runs its handlers anyway.

    What is left is the interpreter's own start (tens of ms, before any Python code runs): a task
    killed there ends in the job's restart from its latest checkpoint (rkan_dist.after_srun), not
    in a lost job."""
    if _in_slurm_step_main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, _SLURM_STOP_SIGNALS)


hold_slurm_signals()


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
        self.stop_requested = False
        self.signal_name: str | None = None
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
        if self.mode == "slurm" and _in_slurm_step_main_thread():
            # What came during start-up is delivered now, to the handlers just installed.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SLURM_STOP_SIGNALS)
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
            raise Aborted(abort_message(name))
        self._request(name)
        if "RANK" not in os.environ:  # one process: say at once that it was heard (no logging in a handler)
            os.write(2, f"\n{name}: stopping at the next step boundary with a checkpoint "
                        "(again to abort at once)\n".encode())
