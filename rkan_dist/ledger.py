"""`<run_dir>/events.json`: the run's ledger, every start, stop, failure, error and restart in order.

    {"timeouts": 2, "preemptions": 1, "events": [
      {"time": 1764500000.1, "event": "start", "step": 0, ...},
      {"time": ..., "event": "stop", "kind": "preemption" | "timeout" | "interrupt", "step": 40, ...},
      {"time": ..., "event": "failure", "kind": "crash" | "hang" | "save", "rank": 1, "node": "n2", "step": 40},
      {"time": ..., "event": "restart", "after": "crash", "step": 30, "steps_lost": 10, "lost_seconds": 41.2},
      {"time": ..., "event": "error", "kind": "config" | "nonfinite", "rank": 0, "message": "..."},
      {"time": ..., "event": "gave_up", "failures": 4, "budget": 3},
      {"time": ..., "event": "evict", "node": "n2", "reason": "crash of rank 1 at step 40", "excluded": "n2"},
      {"time": ..., "event": "straggler", "rank": 5, "node": "n2", "score": 0.41, "windows": 3}]}

An "error" is what no restart can fix (a configuration or bad-input error, a non-finite loss under
train.nonfinite=stop): the run ends once, with its message. "gave_up": the failure budget is spent.
"evict": a node excluded from the job before it restarted (rkan_dist.eviction); "straggler": a rank
that computed persistently slower than the fastest one (rkan_dist.stragglers).

Rank 0 writes it for Slurm jobs and local runs alike (a failure, by the rank or launcher that sees
it); `rkan-dist status RUN_DIR` and TensorBoard's `job/failures` and `job/lost_seconds` read it.
The counters are kept for the requeue decisions that need them; everything else (failures by kind,
restarts, time lost) is derived from the events, so the file never holds two versions of one fact.
A run folder written under the ledger's earlier name (`requeues.json`) is read, and renamed on its
next write. Standard library only: reading it must not import torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rkan_dist.nodes import node_of_rank

LEDGER_NAME = "events.json"
EARLIER_LEDGER_NAME = "requeues.json"
FAILURE_KINDS = ("crash", "hang", "save")
ATTEMPT_STARTED_ENV = "RKAN_ATTEMPT_STARTED"  # set by the batch script: when this run of the job began
RESTART_ENV = "RKAN_DIST_RESTART_COUNT"  # set by `rkan-dist train --nproc` on the workers of a restart
_PROCESS_STARTED = time.time()
log = logging.getLogger(__name__)


def written_since(event: Mapping[str, Any] | None, since: float) -> bool:
    """Whether a ledger event was written at or after `since` (an attempt's start): the ledger keeps
    times to the millisecond, rounded, so one written right after `since` may read as just before it."""
    return event is not None and float(event.get("time", 0)) >= since - 1e-3


def attempt_started(env: Mapping[str, str] = os.environ) -> float:
    """When this attempt of the run began: the batch script's note for a run of a Slurm job, else
    when this process started."""
    with contextlib.suppress(KeyError, ValueError):
        return float(env[ATTEMPT_STARTED_ENV])
    return _PROCESS_STARTED


class EventLedger:
    """Reads and appends the ledger; appends are atomic (write then rename) and serialised by a lock
    file, so a launcher recording a failure never loses the event a rank wrote at the same moment."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LEDGER_NAME
        self._earlier_path = Path(run_dir) / EARLIER_LEDGER_NAME

    def read(self) -> dict[str, Any]:
        for path in (self.path, self._earlier_path):
            if path.is_file():
                return json.loads(path.read_text())
        return {"timeouts": 0, "preemptions": 0, "events": []}

    def append(self, event: dict[str, Any], count: str | None = None) -> dict[str, Any]:
        with self._locked():
            return self._append_holding_lock(event, count)

    def _append_holding_lock(self, event: dict[str, Any], count: str | None = None) -> dict[str, Any]:
        data = self.read()
        if count is not None:
            data[count] += 1
        data["events"].append({"time": round(time.time(), 3), **event})
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)
        self._earlier_path.unlink(missing_ok=True)  # its events are in the new file now
        return data

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def record_failure(self, kind: str, rank: int | None, step: int | None, **detail: Any) -> dict[str, Any]:
        """A rank crashed, hung or could not save at `step` (None where unknown, e.g. a launcher
        that saw only an exit status); `detail` adds e.g. the one-line error."""
        return self.append(_failure_event(kind, rank, step, detail))

    def record_failure_once(self, kind: str, rank: int | None, step: int | None, since: float,
                            **detail: Any) -> dict[str, Any]:
        """record_failure, unless a failure not yet followed by a restart was recorded at or after
        `since` (the attempt's start): several ranks that see one hang write it once. Returns the
        event that stands."""
        with self._locked():
            written = pending_failure(self.read()["events"])
            if written_since(written, since):
                return written
            return self._append_holding_lock(_failure_event(kind, rank, step, detail))["events"][-1]

    def append_once(self, event: dict[str, Any], since: float) -> dict[str, Any]:
        """append, unless an event of the same type and kind was written at or after `since` (the
        attempt's start): every rank that hits one configuration error reports it, the ledger
        holds it once. Returns the event that stands."""
        with self._locked():
            for written in reversed(self.read()["events"]):
                if not written_since(written, since):
                    break
                if (written.get("event"), written.get("kind")) == (event.get("event"), event.get("kind")):
                    return written
            return self._append_holding_lock(event)["events"][-1]

    def record_error(self, kind: str, rank: int, message: str, since: float | None = None) -> dict[str, Any]:
        """What no restart can fix ("config": a configuration or bad-input error, "nonfinite": a
        non-finite loss under train.nonfinite=stop). With `since` (the attempt's start), written once
        however many ranks report it (append_once). Returns the event that stands."""
        event = {"event": "error", "kind": kind, "rank": rank, "message": message, **slurm_job()}
        if since is None:
            return self.append(event)["events"][-1]
        return self.append_once(event, since)

    def record_restart(self, step: int, checkpoint_time: float | None) -> dict[str, Any] | None:
        """Training resumes at `step` from a checkpoint written at `checkpoint_time` (None: from scratch).

        Only after a failure: the event names it and what it cost, the steps between the checkpoint and
        the fault and the wall time from the checkpoint to now. Returns the event, or None when no
        failure came before this start (a first start, a preemption: nothing was lost)."""
        data = self.read()
        failure = pending_failure(data["events"])
        if failure is None:
            return None
        now = time.time()
        since = checkpoint_time if checkpoint_time is not None else _run_start(data["events"], failure)
        event = {"event": "restart", "after": failure["kind"], "step": step,
                 "steps_lost": failure["step"] - step if failure.get("step") is not None else None,
                 "lost_seconds": round(max(now - since, 0.0), 3)}
        self.append(event)
        return event


def record_or_warn(ledger: EventLedger, record: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`record(*args, **kwargs)` (a method of `ledger`), or None with a warning when the ledger
    cannot be written: the disk that refused a checkpoint must not also turn its one line into a
    traceback."""
    try:
        return record(*args, **kwargs)
    except OSError as err:
        log.warning("could not write %s (%s): %s", ledger.path, err.strerror or err, args[:3])
        return None


class TrainingLedger:
    """The ledger as one training process writes it: rank 0 writes, the other ranks nothing, and an
    entry that cannot be written (the disk that refused a checkpoint) is logged, not raised."""

    def __init__(self, run_dir: str | os.PathLike, writes: bool):
        self.ledger = EventLedger(run_dir)
        self.writes = writes

    def _write(self, record: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self.writes:
            record_or_warn(self.ledger, record, *args, **kwargs)

    def record_start(self, step: int, world_size: int, checkpoint_time: float | None) -> None:
        """Every start; after a crash, hang or failed save also the restart and what the fault cost."""
        # With the job's nodes: a node failure Slurm requeued the job after is found from them (rkan_dist.eviction).
        nodes = {"nodes": os.environ["SLURM_JOB_NODELIST"]} if os.environ.get("SLURM_JOB_NODELIST") else {}
        self._write(self.ledger.append, {"event": "start", **slurm_job(), **nodes, "step": step,
                                         "world_size": world_size})
        self._write(self.ledger.record_restart, step, checkpoint_time)

    def record_interrupt(self, signal_name: str | None, step: int, checkpoint: os.PathLike | None) -> None:
        self._write(self.ledger.append, {"event": "stop", "kind": "interrupt", "signal": signal_name, "step": step,
                                         "checkpoint": str(checkpoint) if checkpoint else None, "requeue": False})

    def record_save_failure(self, rank: int | None, step: int, error: str) -> None:
        self._write(self.ledger.record_failure, "save", rank, step, error=error)

    def fault_totals(self) -> dict[str, float]:
        """job/failures and job/lost_seconds for TensorBoard (rank 0 logs metrics)."""
        if not self.writes:
            return {}
        try:
            totals = summary(self.ledger.read())
        except (OSError, ValueError) as err:
            log.warning("could not read %s: %s", self.ledger.path, err)
            return {}
        return {"job/failures": sum(totals["failures"].values()), "job/lost_seconds": totals["lost_seconds"]}


def _failure_event(kind: str, rank: int | None, step: int | None, detail: Mapping[str, Any]) -> dict[str, Any]:
    if kind not in FAILURE_KINDS:
        raise ValueError(f"failure kind {kind!r} is not one of {', '.join(FAILURE_KINDS)}")
    # With the Slurm job it happened in: slurm.max_num_failures is a budget per job (a resubmission
    # starts a fresh one), counted from these events. With the culprit's node: a node that keeps
    # failing is excluded from the job (rkan_dist.eviction).
    detail = dict(detail)
    node = detail.pop("node", None) or node_of_rank(rank)
    return {"event": "failure", "kind": kind, "rank": rank, "node": node, "step": step, **slurm_job(), **detail}


def slurm_job(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """{"job_id", "restart_count"} of the Slurm job this process runs in (an array task as JOB_TASK);
    {} outside Slurm. A start event carries it, so status can ask Slurm about the job."""
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{array_task}" if array_job and array_task else env.get("SLURM_JOB_ID", "")
    if not job_id:
        return {}
    return {"job_id": job_id, "restart_count": int(env.get("SLURM_RESTART_COUNT", "0") or 0)}


def restart_count(env: Mapping[str, str] = os.environ) -> int:
    """How many times this run's launcher has started it again: Slurm's requeue count (a preemption,
    a time limit or a crash requeued by after-srun) or `rkan-dist train --nproc`'s crash restarts."""
    return int(env.get(RESTART_ENV) or env.get("SLURM_RESTART_COUNT") or 0)


def pending_failure(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The latest failure not yet followed by a restart."""
    for event in reversed(events):
        if event.get("event") == "restart":
            return None
        if event.get("event") == "failure":
            return event
    return None


def _run_start(events: list[dict[str, Any]], failure: dict[str, Any]) -> float:
    """With no checkpoint to go back to, everything since the run's first event is lost."""
    return events[0]["time"] if events else failure["time"]


def summary(data: dict[str, Any]) -> dict[str, Any]:
    """What the ledger says in totals: failures by kind, restarts and the time and steps they cost."""
    events = data.get("events", [])
    restarts = [event for event in events if event.get("event") == "restart"]
    return {
        "failures": dict(Counter(event["kind"] for event in events if event.get("event") == "failure")),
        "restarts": dict(Counter(event["after"] for event in restarts)),
        "lost_seconds": round(sum(event.get("lost_seconds") or 0.0 for event in restarts), 3),
        "steps_lost": sum(event.get("steps_lost") or 0 for event in restarts),
        "timeouts": data.get("timeouts", 0),
        "preemptions": data.get("preemptions", 0),
    }
