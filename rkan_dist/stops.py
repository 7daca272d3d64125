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
a rank dies under `train --nproc N`      its peers: their collective fails, one line     the parent records a "crash" failure
(a signal, an uncaught exception, a      each (`lost_peer`); torchrun's agent stops the  (rank, step; a refused save is rank 0's
refused save: exit 1)                    rest and reports the exit codes to the parent   "save") and starts the agent again: every
                                         (rkan_dist.agent); the parent (`supervise`)     rank resumes from the latest valid
                                         decides (`restart_decision`)                    checkpoint, train.max_restarts times at
                                                                                         most, then `gave up after ...`; exit 1
a worker's configuration or bad-input    the worker: one line, exit 2; the parent        exit 2, no restart: it would fail the same
error (under `train --nproc N`)          sees the 2 and does not restart                 way every time
a rank dies in a Slurm step (submit or   srun ends the step (--kill-on-bad-exit); the    the batch script's `after-srun` records the
the sbatch template; a refused save)     survivors print one line each (`lost_peer`)     failure (rank from srun's report, step)
                                                                                         and requeues the job: it resumes from the
                                                                                         latest valid checkpoint, at most
                                                                                         slurm.max_num_failures times per job, then
                                                                                         `gave up after ...`; job FAILED
a rank hangs: no step or collective for  every live rank's watchdog (rkan_dist.watchdog) as a crash, through the launcher's path
parallel.hang_timeout_s (SIGSTOP, a      writes its stacks to hangs/<time>/, the ledger  above (`--nproc`: supervise; Slurm: srun
stuck collective or file system)         one "hang" naming the rank, and exits 1; a      ends the step, after-srun requeues)
                                         stopped rank on the same host is SIGKILLed
a configuration or bad-input error, or   the task: ledger "error", one line, exit 2      no restart (local: exit 2; Slurm:
a non-finite loss (nonfinite=stop)                                                       `after-srun` reads the error, job FAILED)
USR2 or SIGTERM while a Slurm task       noted from the first import (`_EarlySignals`,   the stop or requeue as above; a USR2 in
starts (imports, rendezvous, loaders)    rkan_dist.task_start); the Trainer acts on it   the interpreter's own first ms kills the
                                         before its first step                           task: after-srun requeues it as a
                                                                                         preemption from the latest checkpoint
SIGKILL of the whole command             nothing                                         the next start resumes from the latest
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

Why the parent restarts a crashed run, not torchrun's agent (--max-restarts): the agent sees only
exit statuses and would restart a worker's configuration error (exit 2) as readily as a crash, and
it can neither write the ledger nor end with one line; its own report of a failure is a
ChildFailedError traceback. The parent runs the agent through rkan_dist.agent, which hands it the
failed ranks' exit statuses as JSON instead, and starts a fresh agent (a new rendezvous, every
worker new) after a crash, so every restart is the resume from the latest valid checkpoint that
the resume tests already prove exact. What the parent can know of a crash: the rank the agent saw
fail (one killed by a signal before a peer that exited 1 after losing it), its exit status, and
the last step rank 0 logged in metrics.jsonl (a lower bound when logging.every_steps > 1).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rkan_dist.ledger import RESTART_ENV, RequeueLedger, pending_failure

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
EXIT_USAGE = 2  # a configuration or bad-input error (rkan_dist.cli): restarting cannot fix it
EXIT_GAVE_UP = 1  # the restart budget is spent
log = logging.getLogger(__name__)
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


class _EarlySignals:
    """USR2 and SIGTERM noted from the moment this module is imported in a Slurm task, until
    StopSignals takes over.

    A Slurm task imports it first thing (rkan_dist.task_start under submitit, rkan_dist.submit's
    first import under the sbatch template), seconds before the trainer exists; a USR2 in between
    (a preemption during start-up, a time limit shorter than the signal delay plus start-up) or a
    SIGTERM would otherwise kill the task with no checkpoint. What is left is the interpreter's own
    start (tens of ms, before any Python code runs): a task killed there ends in the job's
    restart from its latest checkpoint (`rkan_dist.submit after_srun`), not in a lost job.
    """

    usr2 = False
    sigterm = False

    @classmethod
    def note(cls, signum: int, _frame: Any = None) -> None:
        if signum == signal.SIGUSR2:
            cls.usr2 = True
        else:
            cls.sigterm = True

    @classmethod
    def install(cls) -> None:
        """Note (not act on) USR2 and SIGTERM from now on; only in a Slurm step's main thread."""
        if "SLURM_STEP_ID" in os.environ and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR2, cls.note)
            signal.signal(signal.SIGTERM, cls.note)


_EarlySignals.install()


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
        self.stop_requested = mode == "slurm" and _EarlySignals.usr2  # it came during start-up
        self.signal_name: str | None = "SIGUSR2" if self.stop_requested else None
        self.saw_sigterm = mode == "slurm" and _EarlySignals.sigterm
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

    def __init__(self, command: list[str], run_dir: str | os.PathLike, env: dict[str, str] | None = None):
        import psutil  # here, not first in a signal handler

        self._psutil = psutil
        self.command, self.run_dir, self.env = command, Path(run_dir), env
        self.signal_name: str | None = None
        self.aborted = False
        self._relayed: set[int] = set()

    def run(self) -> int:
        started = time.time()
        linux = sys.platform.startswith("linux")
        self.agent = subprocess.Popen(self.command, start_new_session=True, env=self.env,
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


# ---------------------------------------------------------------------- crash -> restart (train --nproc N)
# What a rank's next collective raises once a peer is gone (gloo; NCCL): the peer's death is the fault,
# this rank's error only its echo, so it ends with one line instead of a second traceback.
_LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
              "remote process exited or there was a network error")


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another rank died."""
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _LOST_PEER)


def lost_peer_line(rank: object, error: BaseException) -> str:
    """The one line a rank prints when its collective failed because another rank died (`lost_peer`):
    that death is the fault the launcher records; this rank's error is only its echo."""
    return (f"rkan-dist: rank {rank}: stopped, another process of the run is gone "
            f"({' '.join(str(error).split())[:200]})")


def restart_decision(exit_codes: Mapping[int, int], restarts_done: int, budget: int) -> str:
    """What the parent does after torchrun's agent reported failed workers (rank -> exit status;
    empty when the agent itself died): "usage" (a worker's configuration or bad-input error, exit
    2: the same error again on every restart, so never), "restart" while `restarts_done < budget`,
    else "give_up"."""
    if any(code == EXIT_USAGE for code in exit_codes.values()):
        return "usage"
    return "restart" if restarts_done < budget else "give_up"


def root_cause(exit_codes: Mapping[int, int]) -> tuple[int | None, int | None]:
    """(rank, exit status) to blame among the workers the agent saw failed in one poll.

    A rank killed by a signal (negative status) comes before one that exited with an error: when
    one rank dies, its peers' next collective fails with a lost connection, and a peer that noticed
    before the agent's poll is reported too, with exit 1. Ties go to the lowest rank."""
    if not exit_codes:
        return None, None
    rank = min(exit_codes, key=lambda r: (exit_codes[r] >= 0, r))
    return rank, exit_codes[rank]


def describe_exit(code: int | None) -> str:
    if code is None:
        return "torchrun's agent died"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit {code}"


def describe_failure(event: Mapping[str, Any]) -> str:
    """'crash of rank 1 at step 6' from a ledger failure event."""
    rank = event.get("rank")
    who = f"rank {rank}" if rank is not None else "an unknown rank"
    step = event.get("step")
    what = {"save": "refused save on"}.get(event.get("kind", "crash"), f"{event.get('kind', 'crash')} of")
    return f"{what} {who}" + (f" at step {step}" if step is not None else "")


def failure_cause(event: Mapping[str, Any], fallback: str) -> str:
    """What a restart line says in brackets: a hang's own account where a rank wrote one, else
    `fallback` (the exit status the launcher saw, which for a hang is only the detecting rank's exit)."""
    if event.get("kind") == "hang" and event.get("stalled_seconds") is not None:
        return (f"no step or collective finished for {event['stalled_seconds']:.0f} s; stacks in "
                f"{event.get('stacks', 'hangs/')}")
    return fallback


def give_up_message(failures: Sequence[Mapping[str, Any]], checkpoint: str | os.PathLike | None) -> str:
    where = checkpoint if checkpoint is not None else "none"
    listed = ", ".join(describe_failure(failure) for failure in failures)
    return (f"gave up after {len(failures)} failure{'s' if len(failures) != 1 else ''} ({listed}); "
            f"latest checkpoint {where}; fix the cause and re-run the same command")


def failed_workers(report: Path) -> dict[int, int]:
    """rank -> exit status from rkan_dist.agent's report; {} when the agent wrote none (it died)."""
    try:
        return {int(rank): int(failure["exitcode"]) for rank, failure in json.loads(report.read_text()).items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def failure_step(run_dir: Path, since: float) -> int | None:
    """The step a failed attempt had reached, as far as the parent can know it: the last step rank 0
    logged (metrics.jsonl, every logging.every_steps, so the ranks may have gone a few steps
    further); with none logged by this attempt, the latest valid checkpoint's step (where it
    resumed; None without one)."""
    from rkan_dist.manifest import latest_valid
    from rkan_dist.status import last_logged_step

    logged = last_logged_step(run_dir)
    if logged is not None and logged[1] >= since:
        return logged[0]
    latest = latest_valid(run_dir)
    return latest.step if latest is not None else None


def record_failure(run_dir: Path, since: float, exit_codes: Mapping[int, int]) -> dict[str, Any]:
    """The ledger's failure event for an attempt that started at `since`: the one a rank wrote itself
    (a refused save, with its rank and step), else a crash recorded here from the exit statuses."""
    ledger = RequeueLedger(run_dir)
    with contextlib.suppress(OSError, ValueError, KeyError):
        written = pending_failure(ledger.read()["events"])
        if written is not None and written.get("time", 0) > since - 1e-3:
            return written
    rank, code = root_cause(exit_codes)
    event = {"event": "failure", "kind": "crash", "rank": rank, "step": failure_step(run_dir, since),
             "exit": describe_exit(code)}
    try:
        ledger.record_failure("crash", rank, event["step"], exit=event["exit"])
    except OSError as err:
        log.warning("could not write %s (%s)", ledger.path, err.strerror or err)
    return event


def supervise(torchrun_args: Sequence[str], run_dir: str | os.PathLike, max_restarts: int) -> int:
    """`rkan-dist train --nproc N`: run torchrun's agent (AgentRelay) and, after a crash, start it again,
    at most `max_restarts` times; every worker then resumes from the latest valid checkpoint.

    The parent restarts rather than the agent (torchrun --max-restarts) because only here can the
    failure be told apart (exit 2, a configuration error, must not loop), written to the ledger, and
    reported in one line when the budget is spent. Returns the command's exit status."""
    from rkan_dist.manifest import latest_valid

    run_dir = Path(run_dir)
    failures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rkan-dist-agent-") as reports:
        while True:
            report = Path(reports) / f"attempt-{len(failures)}.json"
            started = time.time()
            # The workers of a restart continue the run whatever train.resume says (Trainer._find_resume_point).
            relay = AgentRelay([sys.executable, "-m", "rkan_dist.agent", str(report), *torchrun_args], run_dir,
                               env=dict(os.environ, **{RESTART_ENV: str(len(failures))}))
            code = relay.run()
            if code == 0 or relay.signal_name is not None:  # finished, or stopped as a person asked
                return code
            exit_codes = failed_workers(report)
            decision = restart_decision(exit_codes, len(failures), max_restarts)
            if decision == "usage":  # the worker printed its one line
                return EXIT_USAGE
            failures.append(record_failure(run_dir, started, exit_codes))
            latest = latest_valid(run_dir)
            checkpoint = latest.path if latest is not None else None
            if decision == "give_up":
                print(f"rkan-dist: {give_up_message(failures, checkpoint)}", file=sys.stderr, flush=True)
                return EXIT_GAVE_UP
            rank, status = root_cause(exit_codes)
            print(f"rkan-dist: {describe_failure(failures[-1])} ({failure_cause(failures[-1], describe_exit(status))}); restart "
                  f"{len(failures)} of {max_restarts} from {checkpoint or 'the start (no checkpoint yet)'}",
                  file=sys.stderr, flush=True)
