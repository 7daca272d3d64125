"""How a run ends: the exit codes, the fault exceptions, the one-line wording, and the map from an
exception to its outcome that every launcher uses (`rkan-dist train`, its `--nproc` supervisor,
the Slurm task, after-srun).

Which layer handles which stop is written down in docs/FAULTS.md. The rule this module encodes:

=====================  ======  ==================================================================
what ended the process  exit    what the launcher does next
=====================  ======  ==================================================================
finished, or a Slurm    0       nothing (a stop has already requeued the job, or chose not to)
stop
a Fault, a lost peer    1       the crash path: restart from the latest valid checkpoint, within
                                the failure budget; a spent budget is also 1 (`gave up ...`)
ConfigError, a          2       never restarted: it would fail the same way again; the ledger
non-finite loss                 gets one "error" event
Ctrl-C / SIGTERM        130     nothing: re-running the same command continues the run
=====================  ======  ==================================================================

Standard library only: task start-up imports it before anything slow.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

EXIT_OK = 0
EXIT_FAULT = 1  # the crash path: a launcher may restart the run
EXIT_GAVE_UP = 1  # the failure budget is spent
EXIT_USAGE = 2  # a configuration or bad-input error: restarting cannot fix it
# A rank whose collective failed because another rank died: the echo of that death, never its cause.
# A launcher that sees several ranks fail blames one that did not exit with it (a node that died
# takes its ranks without a word, and its peers' echoes are all srun reports).
EXIT_LOST_PEER = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


# ---------------------------------------------------------------------------------------- exceptions
class ConfigError(ValueError):
    """A user-facing configuration or bad-input problem: one line, exit 2, never restarted."""


class NonFiniteLossError(RuntimeError):
    """train.nonfinite=stop: the loss became NaN/inf; the last good checkpoint is kept. Every rank
    stops at the same micro-batch and a restart would meet the same loss: an error, not a failure."""


class Fault(RuntimeError):
    """A fault the run stops for through the crash path (one line, exit 1, restartable). `report` is
    true on the one rank that prints the line, so that N ranks stopping together print it once."""

    kind = "crash"

    def __init__(self, message: str, *, rank: int = 0, report: bool = True):
        super().__init__(message)
        self.rank = rank
        self.report = report


class Interrupted(KeyboardInterrupt):
    """Trainer.train() stopped by Ctrl-C or SIGTERM (outside Slurm): every rank stopped at a step
    boundary and `checkpoint` (None if no step was finished) is complete. A KeyboardInterrupt, so
    that `except Exception` does not swallow it; its message is the line the CLI prints."""

    def __init__(self, step: int, checkpoint: Any, signal_name: str | None = None):
        super().__init__(interrupt_message(step, checkpoint))
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


class Aborted(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM: stop at once, without waiting for the step boundary or the save."""


# ---------------------------------------------------------------------------------------- wording
def interrupt_message(step: int, checkpoint: str | os.PathLike | None) -> str:
    where = checkpoint if checkpoint is not None else "none (no step was finished)"
    return f"interrupted at step {step}; checkpoint {where}; re-run the same command to continue"


def abort_message(signal_name: str = "interrupt") -> str:
    return (f"aborted by a second {signal_name}: the step in progress is lost; re-run the same command to "
            "continue from the last complete checkpoint")


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


def describe_exit(code: int | None) -> str:
    """An exit status as a person reads it: 'exit 1', 'killed by SIGKILL'."""
    if code is None:
        return "torchrun's agent died"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit {code}"


def describe_failure(event: Mapping[str, Any]) -> str:
    """'crash of rank 1 at step 6' from a ledger failure event ('of a rank on n3' where only its
    node is known: a node that died)."""
    rank = event.get("rank")
    who = f"rank {rank}" if rank is not None else f"a rank on {event['node']}" if event.get("node") else "an unknown rank"
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


def restart_line(failure: Mapping[str, Any], cause: str, restart: int, budget: int) -> str:
    """'crash of rank 1 at step 6 (killed by SIGKILL); restart 1 of 3'."""
    return f"{describe_failure(failure)} ({failure_cause(failure, cause)}); restart {restart} of {budget}"


def resume_point(checkpoint: str | os.PathLike | None) -> str:
    return str(checkpoint) if checkpoint is not None else "the start (no checkpoint yet)"


def requeue_refused_line(job_id: str, why: str, checkpoint: str | os.PathLike | None) -> str:
    return f"could not requeue job {job_id}: {why}; submit again to continue from {resume_point(checkpoint)}"


def give_up_message(failures: Sequence[Mapping[str, Any]], checkpoint: str | os.PathLike | None) -> str:
    where = checkpoint if checkpoint is not None else "none"
    listed = ", ".join(describe_failure(failure) for failure in failures)
    return (f"gave up after {len(failures)} failure{'s' if len(failures) != 1 else ''} ({listed}); "
            f"latest checkpoint {where}; fix the cause and re-run the same command")


# ---------------------------------------------------------------------------------------- outcomes
@dataclass(frozen=True)
class Outcome:
    """What a launcher does with an exception that ended training on one rank."""

    code: int  # the process's exit status
    line: str | None  # the one line this rank prints (None: another rank or the launcher says it)
    error_kind: str | None = None  # a ledger "error" event to write: "config" | "nonfinite"; None: none
    to_stdout: bool = False  # an interrupt is how a person asked the run to end, not an error


def outcome_of(error: BaseException, rank: int, prefix: str = "rkan-dist", under_launcher: bool = True) -> Outcome | None:
    """The outcome of `error` raised on `rank`, or None for an exception no launcher knows (a bug:
    let its traceback show).

    A configuration error is printed by every rank (it may be one node's missing file); the other
    lines by one rank only, since every rank raises them together. `under_launcher`: a worker of
    torchrun or srun, whose lost peer is the echo of another rank's death (a single process has no
    peer to lose), and whose interrupt exits 0, or torchrun's agent would report a failure with a
    traceback (its parent reads the stop in the ledger and exits 130)."""
    if isinstance(error, ConfigError):
        return Outcome(EXIT_USAGE, f"{prefix}: error: {error}", "config")
    if isinstance(error, NonFiniteLossError):
        return Outcome(EXIT_USAGE, f"{prefix}: error: {error}" if rank == 0 else None, "nonfinite")
    if isinstance(error, Fault):
        return Outcome(EXIT_FAULT, f"{prefix}: {error}" if error.report else None)
    if lost_peer(error) and under_launcher:
        return Outcome(EXIT_LOST_PEER, lost_peer_line(rank, error))
    if isinstance(error, Interrupted):
        return Outcome(EXIT_OK if under_launcher else EXIT_INTERRUPTED, str(error) if rank == 0 else None, to_stdout=True)
    if isinstance(error, KeyboardInterrupt):  # Aborted, or a Ctrl-C before any handler was installed
        return Outcome(EXIT_INTERRUPTED, f"{prefix}: {error or 'interrupted'}")
    return None
