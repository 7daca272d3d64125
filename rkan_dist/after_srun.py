"""After srun, in the batch script: a failed step (a rank killed, crashed, hung or unable to save)
requeues the job, which resumes from its latest valid checkpoint, at most slurm.max_num_failures
times per job; then one line names the failures (docs/FAULTS.md has the whole table).

    python -m rkan_dist.after_srun --status $? (--run-dir D ... --max-failures N | --config C [overrides])

`rkan-dist submit` writes this line after srun (submitit's `teardown`), as does
slurm/rkan_dist.sbatch; `batch_setup_lines` note where this run of the job starts, so that events
and srun messages of earlier runs are ignored. Standard library only, apart from the --config form.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rkan_dist.eviction import EvictionPolicy, evict, requeue_evicting, say_in_log, unrecorded_end
from rkan_dist.faults import (
    EXIT_LOST_PEER,
    ConfigError,
    describe_failure,
    give_up_message,
    requeue_refused_line,
    restart_line,
    resume_point,
)
from rkan_dist.ledger import (
    ATTEMPT_STARTED_ENV,
    EventLedger,
    attempt_started,
    pending_failure,
    slurm_job,
    written_since,
)
from rkan_dist.nodes import parse_nodelist

SRUN_ERR_OFFSET_ENV = "RKAN_SRUN_ERR_OFFSET"  # set by the batch script: how long its stderr file was when this run began

# srun's report of a failed task in the batch script's stderr: "srun: error: n2: task 1: Killed",
# "srun: error: n1: tasks 0-1: Exited with exit code 2". Task numbers are global ranks.
_USR2_DEATH = "User defined signal 2"  # srun's words for a task killed by USR2
_SRUN_TASK_ERROR = re.compile(r"^srun: error: (\S+): tasks? (\d+)\S*: (.+)$", re.MULTILINE)
_SRUN_NODE_FAILURE = re.compile(r"^srun: error: Node failure on (\S+)", re.MULTILINE)
_LOST_PEER_EXIT = f"Exited with exit code {EXIT_LOST_PEER}"  # an echo (rkan_dist.faults.EXIT_LOST_PEER)


def batch_setup_lines(run_dirs: list[Path] | None = None, policy: EvictionPolicy | None = None) -> list[str]:
    """The lines before srun: note where this run of the job starts; with the run folders, also
    record a node failure that made Slurm requeue the job itself (`record_node_failure`)."""
    lines = ["# rkan-dist: when this run of the job started, and where srun's messages begin in this script's stderr",
             f"export {ATTEMPT_STARTED_ENV}=$(date +%s.%N)",
             f"export {SRUN_ERR_OFFSET_ENV}=$(stat -L -c %s /proc/$$/fd/2 2>/dev/null || echo 0)"]
    if run_dirs:
        lines.append(f"{shlex.quote(sys.executable)} -m rkan_dist.after_srun --job-start "
                     f"{' '.join((policy or EvictionPolicy()).flags())} {_run_dir_flags(run_dirs)}")
    return lines


def batch_teardown_lines(run_dirs: list[Path], max_num_failures: int, policy: EvictionPolicy) -> list[str]:
    """The line after srun (`$?` is srun's status): restart the job after a failed step (after_srun),
    first excluding the node the failure points to (rkan_dist.eviction)."""
    return [f"{shlex.quote(sys.executable)} -m rkan_dist.after_srun --status $? "
            f"--max-failures {max_num_failures} {' '.join(policy.flags())} {_run_dir_flags(run_dirs)}"]


def _run_dir_flags(run_dirs: list[Path]) -> str:
    return " ".join(f"--run-dir {shlex.quote(str(run_dir))}" for run_dir in run_dirs)


def first_failed_task(srun_messages: str, nodes: list[str] | None = None) -> tuple[int | None, str | None, str]:
    """(rank, node, what srun said) of the task that failed first, e.g. (1, 'n2', 'Killed').

    srun names a task that died or exited with an error ("srun: error: n2: task 1: Killed"); the first
    is the cause, the ones after it are peers srun ended because of it. A peer whose collective
    failed because the cause died exits EXIT_LOST_PEER first, though: it is passed over. A node that
    died takes its tasks without a report (their slurmstepd died with it), so when only echoes were
    reported, the culprit is the node srun said it lost ("Node failure on n3"), else the one of the
    job's `nodes` none of whose tasks srun reported."""
    failures = [(int(match.group(2)), match.group(1), match.group(3).strip())
                for match in _SRUN_TASK_ERROR.finditer(srun_messages)]
    for failure in failures:
        if failure[2] != _LOST_PEER_EXIT:
            return failure
    lost = _SRUN_NODE_FAILURE.search(srun_messages)
    if lost is not None:
        return None, lost.group(1), "node failure"
    reported = {node for _, node, _ in failures}
    silent = [node for node in nodes or [] if node not in reported]
    if failures and len(silent) == 1:
        return None, silent[0], "no report from the node (its tasks ended without one)"
    return failures[0] if failures else (None, None, "srun failed")


def job_nodes(env: Mapping[str, str] = os.environ) -> list[str]:
    """The nodes of this job (SLURM_JOB_NODELIST); [] when Slurm does not say."""
    try:
        return parse_nodelist(env["SLURM_JOB_NODELIST"])
    except (KeyError, ValueError):
        return []


def srun_messages(env: Mapping[str, str] = os.environ) -> str:
    """What srun wrote to the batch script's stderr during this run of the job ('' if unreadable)."""
    try:
        offset = int(env.get(SRUN_ERR_OFFSET_ENV, "0") or 0)
        with open("/proc/self/fd/2", "rb") as err:  # the batch script's stderr, inherited
            err.seek(offset)
            return err.read(1 << 20).decode(errors="replace")
    except (OSError, ValueError):
        return ""


def restart_after_srun(status: int, events: list[dict[str, Any]], started: float, job_id: str,
                       max_failures: int) -> tuple[str, dict[str, Any] | None]:
    """What the batch script does once srun has ended: ("done" | "no_restart" | "restart" |
    "give_up", the event that decided it).

    `events` is the ledger; those at or after `started` belong to this run of the job. A stop (USR2:
    rank 0 has requeued, or decided not to) and a success need nothing. An "error" (configuration,
    bad input, non-finite loss) would fail the same way again: no restart. Otherwise the pending
    failure (a rank's "hang" or "save", or the "crash" after_srun recorded) restarts the job while
    the job's failures are within `max_failures`."""
    recent = [event for event in events if written_since(event, started)]
    if status == 0 or any(event.get("event") == "stop" for event in recent):
        return "done", None
    error = next((event for event in recent if event.get("event") == "error"), None)
    if error is not None:
        return "no_restart", error
    failure = pending_failure(events)
    return ("restart" if len(job_failures(events, job_id)) <= max_failures else "give_up"), failure


def job_failures(events: list[dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    """The failures of one Slurm job: slurm.max_num_failures budgets them (a resubmission starts afresh)."""
    return [event for event in events if event.get("event") == "failure" and str(event.get("job_id")) == job_id]


def after_srun(status: int, run_dir: Path, max_failures: int, policy: EvictionPolicy = EvictionPolicy(),
               env: Mapping[str, str] = os.environ) -> int:
    """After srun: requeue the job after a failed step, or give up with one line. Returns the batch
    script's exit status (srun's, or 0 once requeued)."""
    from rkan_dist.manifest import latest_valid
    from rkan_dist.status import failure_step

    job = slurm_job(env)
    job_id, started = job.get("job_id", ""), attempt_started(env)
    ledger = EventLedger(run_dir)
    try:
        events = ledger.read()["events"]
    except (OSError, ValueError):
        events = []
    decision, event = restart_after_srun(status, events, started, job_id, max_failures)
    if decision == "done":
        return status
    if decision == "no_restart":
        print(f"rkan-dist: not restarted: {event.get('message', event.get('kind'))}", file=sys.stderr, flush=True)
        return status
    rank, node, what = first_failed_task(srun_messages(env), job_nodes(env))
    latest = latest_valid(run_dir)
    checkpoint = latest.path if latest is not None else None
    rank_wrote_why = written_since(event, started)
    if not rank_wrote_why and what == _USR2_DEATH:
        # A USR2 that reached a task in the interpreter's first milliseconds, before any handler: the
        # preemption it asked for, from the latest checkpoint; not a failure of the run.
        ledger.append({"event": "stop", **job, "step": latest.step if latest is not None else 0, "kind": "preemption",
                       "requeue": True, "reason": f"USR2 before rank {rank}'s handler was installed"},
                      count="preemptions")
        return _requeue(job_id, f"rank {rank} was stopped by USR2 while starting", checkpoint, status,
                        ledger, None, policy, started, job)
    if not rank_wrote_why:  # srun's report is all there is
        events = ledger.record_failure("crash", rank, failure_step(run_dir, started), exit=what,
                                       node=node)["events"]
        event = events[-1]
        decision, _ = restart_after_srun(status, events, started, job_id, max_failures)
    failures = job_failures(events, job_id)
    if decision == "give_up":
        ledger.append({"event": "gave_up", "failures": len(failures), "budget": max_failures, **job})
        print(f"rkan-dist: {give_up_message(failures, checkpoint)} (slurm.max_num_failures={max_failures})",
              file=sys.stderr, flush=True)
        return status
    return _requeue(job_id, restart_line(event, what, len(failures), max_failures), checkpoint, status,
                    ledger, event, policy, started, job)


def record_node_failure(run_dir: Path, policy: EvictionPolicy, env: Mapping[str, str] = os.environ) -> None:
    """At the start of a run of the job (before srun): when the previous run ended unrecorded because
    Slurm requeued the job itself after a node failed (srun learns of a dead node only once Slurm has
    given up on it, and the requeue then kills this script), record that failure against the nodes
    Slurm holds down, and evict them as after-srun would have. A running job's excluded nodes cannot
    change (Slurm takes them only from a pending job): the eviction reaches Slurm at the job's next
    requeue; until then the node is down, and Slurm gives it to no job."""
    from rkan_dist.slurm_cluster import failed_nodes
    from rkan_dist.status import failure_step

    job = slurm_job(env)
    job_id = job.get("job_id", "")
    ledger = EventLedger(run_dir)
    try:
        events = ledger.read()["events"]
    except (OSError, ValueError):
        return
    previous = unrecorded_end(events, job_id, job.get("restart_count", 0)) if job_id else None
    if previous is None or not previous.get("nodes"):
        return
    try:
        nodes = parse_nodelist(previous["nodes"])
    except ValueError:
        return
    step = failure_step(run_dir, previous["time"])
    for node in failed_nodes(nodes) or []:  # none down: an administrator's requeue, not a failure
        failure = ledger.record_failure("crash", None, step, node=node, exit="node failure; Slurm requeued the job",
                                        job_id=job_id, restart_count=previous.get("restart_count"))["events"][-1]
        print(f"rkan-dist: node {node} failed during run {previous.get('restart_count')} of job {job_id} and Slurm "
              f"requeued the job without it: {describe_failure(failure)}", file=sys.stderr, flush=True)
        evict(job_id, ledger, failure, policy, previous["time"], say_in_log, job,
              later=" at its next requeue (a running job's excluded nodes cannot change)")


def _requeue(job_id: str, why: str, checkpoint: Path | None, status: int, ledger: EventLedger,
             failure: dict[str, Any] | None, policy: EvictionPolicy, started: float, job: dict[str, Any]) -> int:
    """Say why and requeue the job, without the nodes `failure` (or a straggler) points to;
    returns the batch script's exit status (0 once requeued)."""
    print(f"rkan-dist: {why} from {resume_point(checkpoint)}: requeueing job {job_id}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue's SIGTERM must not cut this short
    refused = requeue_evicting(job_id, ledger, failure, policy, started, job=job)
    if refused is not None:
        print(f"rkan-dist: {requeue_refused_line(job_id, refused, checkpoint)}", file=sys.stderr, flush=True)
        return status
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rkan_dist.after_srun",
                                     description="After a job's srun: restart the job after a failure.")
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--status", type=int, help="srun's exit status")
    when.add_argument("--job-start", action="store_true",
                      help="before srun: record a node failure after which Slurm requeued the job itself")
    parser.add_argument("--run-dir", action="append", default=[], help="the run folder (one per array task)")
    parser.add_argument("--max-failures", type=int)
    parser.add_argument("--exclude-after-failures", type=int, default=EvictionPolicy.exclude_after_failures)
    parser.add_argument("--min-nodes", type=int, default=EvictionPolicy.fewest_nodes)
    parser.add_argument("--exclude-stragglers", action="store_true")
    parser.add_argument("--config", help="instead of --run-dir/--max-failures: the recipe (the sbatch template)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    if args.config:
        from rkan_dist.config import load_config

        try:
            config = load_config(args.config, args.overrides)
        except ConfigError as err:  # the tasks say it
            if args.job_start:
                return 0
            print(f"rkan-dist: not restarted: {err}", file=sys.stderr)
            return args.status
        run_dir, max_failures = Path(config.train.run_dir), config.slurm.max_num_failures
        policy = EvictionPolicy.of(config.slurm)
    else:
        index = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0") or 0) if len(args.run_dir) > 1 else 0
        run_dir, max_failures = Path(args.run_dir[index]), args.max_failures or 0
        policy = EvictionPolicy(args.exclude_after_failures, args.min_nodes, args.exclude_stragglers)
    if args.job_start:
        record_node_failure(run_dir, policy)
        return 0
    return after_srun(args.status, run_dir, max_failures, policy)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
