"""One task of a Slurm step: train, and on USR2 checkpoint, requeue the job once and exit.

    python -m rkan_dist.slurm_task --config CONFIG [overrides]     (slurm/rkan_dist.sbatch)
    TrainingJob(config)()                                           (what `rkan-dist submit` pickles)

The preemption protocol, the same under submitit and the sbatch template (docs/FAULTS.md):

- USR2 (Slurm's `--signal`, `scancel --signal=USR2`, `job._interrupt()`) reaches every task. Each
  asks its Trainer to stop; the ranks agree through the per-micro-batch all-reduce, finish the
  step, save a complete checkpoint collectively and return. submitit's own handler would
  checkpoint on rank 0 only and leave the other ranks training, so the task replaces it (and
  holds the signals until it has: rkan_dist.stops.hold_slurm_signals).
- SIGTERM never kills a training rank (it would cut a save in half): it is noted and ignored, so
  USR2 or KillWait's SIGKILL decides. A hard `scontrol requeue` therefore resumes from the last
  periodic checkpoint.
- After the checkpoint, rank 0 tells a time limit (little time left, no SIGTERM first) from a
  preemption, records the stop in the run's ledger, and requeues the job once: always for a
  preemption, at most `slurm.max_num_timeout` times for time limits. Every rank then exits; the
  requeued job (same id, SLURM_RESTART_COUNT + 1) resumes from the checkpoint.
"""

from __future__ import annotations

# First, before anything slow: in a Slurm task its import holds USR2 and SIGTERM for StopSignals.
from rkan_dist.stops import StopSignals  # isort: skip

import argparse
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import submitit

from rkan_dist.config import Config, check_data_paths, config_from_dict, load_config
from rkan_dist.eviction import EvictionPolicy, requeue_evicting
from rkan_dist.faults import EXIT_FAULT, EXIT_USAGE, ConfigError, outcome_of, requeue_refused_line
from rkan_dist.ledger import EventLedger, attempt_started, slurm_job
from rkan_dist.slurm_cluster import seconds_left

log = logging.getLogger(__name__)

# A stop counts as a time limit when at most this much more than the signal delay was left.
TIMEOUT_MARGIN_S = 60


def classify_stop(seconds_left: float | None, signal_delay_s: int, saw_sigterm: bool) -> str:
    """'timeout' when the job was near its limit and nothing preempted it first, else 'preemption'.

    Slurm sends the time-limit USR2 `signal_delay_s` before the end (its timer may be late, never
    early); a preemption (submitit's `_interrupt()`, a preempting scheduler) sends SIGTERM first.
    """
    if saw_sigterm or seconds_left is None:
        return "preemption"
    return "timeout" if seconds_left <= signal_delay_s + TIMEOUT_MARGIN_S else "preemption"


@dataclass(frozen=True)
class RequeueDecision:
    requeue: bool
    kind: str  # "timeout" | "preemption"
    reason: str


def decide_requeue(kind: str, timeouts_so_far: int, max_num_timeout: int) -> RequeueDecision:
    """Preemptions always requeue; time limits only while fewer than max_num_timeout happened."""
    if kind == "preemption":
        return RequeueDecision(True, kind, "preempted")
    if timeouts_so_far < max_num_timeout:
        return RequeueDecision(True, kind, f"time limit {timeouts_so_far + 1} of {max_num_timeout}")
    return RequeueDecision(False, kind, f"time limit reached {timeouts_so_far + 1} times; "
                                        f"slurm.max_num_timeout={max_num_timeout} allows {max_num_timeout} requeues")


def run_training_task(config: Config) -> dict[str, Any]:
    """One task of a Slurm step: train, and on USR2 checkpoint, requeue once and exit (status 0).

    Shared by `TrainingJob` (submitit) and `python -m rkan_dist.slurm_task` (the sbatch template).
    Anything else ends as rkan_dist.faults.outcome_of says: what no restart can fix (a
    configuration or bad-input error, a non-finite loss under train.nonfinite=stop) is written to
    the ledger as an "error", so after_srun does not restart the job; a fault (a refused save) or a
    collective that failed because another rank died ends with one line and exit 1, the crash
    path after_srun restarts.
    """
    signals = StopSignals("slurm").install()  # before the slow imports below
    try:
        check_data_paths(config)  # a data path that disappeared since the submission
        return _train_task(config, signals)
    except Exception as err:
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        outcome = outcome_of(err, rank, prefix="rkan-dist task")
        if outcome is None:
            raise
        if outcome.error_kind is not None:
            with contextlib.suppress(OSError, ValueError):
                EventLedger(config.train.run_dir).record_error(outcome.error_kind, rank, str(err),
                                                               since=attempt_started())
        _leave(outcome.code, outcome.line)


def _leave(code: int, line: str | None) -> None:
    """Print `line` and exit at once: the error is in the ledger, and a teardown of torn collectives
    or loader threads would only add noise (or hang) after it."""
    if line:
        print(line, file=sys.stderr, flush=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _train_task(config: Config, signals: StopSignals) -> dict[str, Any]:
    from rkan_dist import distributed as dist_utils
    from rkan_dist.trainer import Trainer

    job = slurm_job()
    job_id, restart_count = job.get("job_id", ""), job.get("restart_count", 0)
    ledger = EventLedger(config.train.run_dir)
    decision: RequeueDecision | None = None
    with Trainer(config) as trainer:
        signals.attach(trainer)
        if trainer.dist.is_main:
            counts = ledger.read()  # the Trainer recorded this start (with the job id and restart count)
            log.info("slurm job %s, restart %d: resuming at step %d (time limits so far %d of %d, "
                     "preemptions %d)", job_id, restart_count, trainer.state.global_step, counts["timeouts"],
                     config.slurm.max_num_timeout, counts["preemptions"])
            trainer.metrics.scalars(trainer.state.global_step, {
                "job/slurm_restart_count": restart_count, "job/timeouts": counts["timeouts"],
                "job/preemptions": counts["preemptions"]}, kind="job")
        result = trainer.train()
        if result.status == "stopped":
            if trainer.dist.is_main:
                kind = classify_stop(seconds_left(job_id), config.slurm.signal_delay_s, signals.saw_sigterm)
                decision = decide_requeue(kind, ledger.read()["timeouts"], config.slurm.max_num_timeout)
                ledger.append({"event": "stop", "job_id": job_id, "restart_count": restart_count,
                               "step": result.global_step, "kind": kind, "requeue": decision.requeue,
                               "reason": decision.reason}, count=kind + "s" if decision.requeue else None)
            decision = dist_utils.broadcast_object(decision)
    # The process group is closed: the checkpoint is complete on every rank before anyone requeues.
    # Only exiting is left; a late USR2 (the time-limit timer) must not kill a finished task.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if decision is None:
        return {"status": result.status, "step": result.global_step, "run_dir": str(result.run_dir),
                "final_eval": result.final_eval}
    # From here on only exiting is left: the requeue's SIGTERM must not turn a clean exit into a
    # kill. SIG_IGN (unlike a Python handler) survives interpreter shutdown.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not decision.requeue:
        raise RuntimeError(f"not requeued: {decision.reason}; the checkpoint of step {result.global_step} is in "
                           f"{result.run_dir}/checkpoints (submit again to continue)")
    if int(os.environ.get("SLURM_PROCID", "0")) == 0:
        log.warning("checkpoint of step %d complete; requeueing job %s (%s)", result.global_step, job_id,
                    decision.reason)
        # With slurm.exclude_stragglers, a persistent straggler's node is left behind here.
        refused = requeue_evicting(job_id, ledger, None, EvictionPolicy.of(config.slurm), attempt_started())
        if refused is not None:
            _leave(EXIT_FAULT, f"rkan-dist task: {requeue_refused_line(job_id, refused, result.checkpoint)}")
    # No result file: for submitit the job is not over, it continues in the requeued run. Leave at
    # once: the checkpoint, metrics and ledger are closed and on disk, and a slow interpreter
    # teardown (loader threads) would only give the requeue's srun a task to SIGKILL.
    _leave(0, None)


class TrainingJob(submitit.helpers.Checkpointable):
    """What `rkan-dist submit` pickles: the resolved config as plain data, nothing else."""

    def __init__(self, config_dict: dict[str, Any]):
        self.config_dict = config_dict

    def __call__(self) -> dict[str, Any]:
        # submitit installed its own USR2 handler (rank 0 only); run_training_task replaces it first thing.
        return run_training_task(config_from_dict(self.config_dict))

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """submitit's hook: a fresh instance; the state lives in the run folder's checkpoints."""
        return submitit.helpers.DelayedSubmission(type(self)(self.config_dict))


def main(argv: list[str] | None = None) -> int:
    """`python -m rkan_dist.slurm_task --config C [overrides]`: one srun task (slurm/rkan_dist.sbatch)."""
    parser = argparse.ArgumentParser(prog="python -m rkan_dist.slurm_task",
                                     description="Train as one task of a Slurm step, checkpointing and "
                                                 "requeueing the job on USR2.")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    from rkan_dist.log import setup_logging

    setup_logging()
    try:  # the data paths are checked by run_training_task, which can then write the error to the ledger
        config = load_config(args.config, args.overrides)
    except ConfigError as err:  # no run folder to write it to; after-srun meets the same error and stops
        print(f"rkan-dist task: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    result = run_training_task(config)
    print(f"status: {result['status']} at step {result['step']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
