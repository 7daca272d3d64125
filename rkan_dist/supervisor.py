"""`rkan-dist train --nproc N`: the parent process that runs torchrun's agent, relays Ctrl-C and
SIGTERM to the workers, and restarts the run after a crash (docs/FAULTS.md has the whole table).

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
the resume tests prove exact. What the parent can know of a crash: the rank the agent saw fail
(one killed by a signal before a peer that exited 1 after losing it), its exit status, and the
last step rank 0 logged in metrics.jsonl (a lower bound when logging.every_steps > 1).
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
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rkan_dist.faults import (
    EXIT_GAVE_UP,
    EXIT_INTERRUPTED,
    EXIT_LOST_PEER,
    EXIT_USAGE,
    abort_message,
    describe_exit,
    give_up_message,
    restart_line,
    resume_point,
)
from rkan_dist.ledger import RESTART_ENV, EventLedger, record_or_warn, written_since
from rkan_dist.status import failure_step

log = logging.getLogger(__name__)
_POLL_S = 0.1


def last_interrupt(run_dir: str | os.PathLike, since: float) -> dict[str, Any] | None:
    """The ledger's interrupt stop written at or after `since`, if that is how the run ended."""
    try:
        events = EventLedger(run_dir).read()["events"]
    except (OSError, ValueError, KeyError):
        return None
    last = events[-1] if events else None
    if last and last.get("event") == "stop" and last.get("kind") == "interrupt" and written_since(last, since):
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
            print(f"rkan-dist: {abort_message()}", file=sys.stderr, flush=True)
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

    A rank killed by a signal (negative status) comes before one that exited with an error, and that
    before a lost peer's echo: when one rank dies, its peers' next collective fails with a lost
    connection, and a peer that noticed before the agent's poll is reported too, with
    EXIT_LOST_PEER. Ties go to the lowest rank."""
    if not exit_codes:
        return None, None
    rank = min(exit_codes, key=lambda r: (exit_codes[r] >= 0, exit_codes[r] == EXIT_LOST_PEER, r))
    return rank, exit_codes[rank]


def failed_workers(report: Path) -> dict[int, int]:
    """rank -> exit status from rkan_dist.agent's report; {} when the agent wrote none (it died)."""
    try:
        return {int(rank): int(failure["exitcode"]) for rank, failure in json.loads(report.read_text()).items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def record_failure(run_dir: Path, since: float, exit_codes: Mapping[int, int]) -> dict[str, Any]:
    """The ledger's failure event for an attempt that started at `since`: the one a rank wrote itself
    (a refused save, with its rank and step), else a crash recorded here from the exit statuses."""
    rank, code = root_cause(exit_codes)
    step = failure_step(run_dir, since)
    event = {"event": "failure", "kind": "crash", "rank": rank, "step": step, "exit": describe_exit(code)}
    ledger = EventLedger(run_dir)
    return record_or_warn(ledger, ledger.record_failure_once, "crash", rank, step, since, exit=event["exit"]) or event


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
            # The workers of a restart continue the run whatever train.resume says (rkan_dist.resume).
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
            _, status = root_cause(exit_codes)
            print(f"rkan-dist: {restart_line(failures[-1], describe_exit(status), len(failures), max_restarts)} "
                  f"from {resume_point(checkpoint)}", file=sys.stderr, flush=True)
