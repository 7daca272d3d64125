"""`rkan-dist submit`: multi-node training on Slurm through submitit, with checkpoint-and-requeue.

    rkan-dist submit --config CONFIG [--nodes N] [--gpus-per-node G] [--partition P] [--time MIN]
                     [--dry-run] [--sweep key=v1,v2,...] [section.key=value ...]

The submission pickles a `TrainingJob` that holds only the resolved config (never model state);
inside the job every task builds the Trainer, whose process group `rkan_dist.distributed` builds
from Slurm's environment. The preemption protocol, the same for submitit and slurm/rkan_dist.sbatch:

- USR2 (Slurm's `--signal`, `scancel --signal=USR2`, `job._interrupt()`) reaches every task. Each
  asks its Trainer to stop; the ranks agree through the per-micro-batch all-reduce, finish the
  step, save a complete checkpoint collectively and return. submitit's own handler would
  checkpoint on rank 0 only and leave the other ranks training, so the job replaces it.
- SIGTERM never kills a training rank (it would cut a save in half): it is noted and ignored, so
  USR2 or KillWait's SIGKILL decides. A hard `scontrol requeue` therefore resumes from the last
  periodic checkpoint.
- After the checkpoint, rank 0 tells a time limit (little time left, no SIGTERM first) from a
  preemption, counts it in `<run_dir>/requeues.json`, and runs `scontrol requeue` once: unlimited
  for preemptions, at most `slurm.max_num_timeout` for time limits. Every rank then exits; the
  requeued job (same id, SLURM_RESTART_COUNT + 1) resumes with train.resume=auto.
"""

from __future__ import annotations

# First, before anything slow: in a Slurm task (the sbatch template runs `python -m rkan_dist.submit
# task`) its import notes USR2 and SIGTERM from here on, see rkan_dist.stops._EarlySignals.
from rkan_dist.stops import StopSignals, lost_peer, lost_peer_line  # isort: skip

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from rkan_dist.config import (
    Config,
    ConfigError,
    SlurmConfig,
    check_data_paths,
    config_from_dict,
    config_to_dict,
    load_config,
)
from rkan_dist.ledger import LEDGER_NAME, Fault, RequeueLedger, pending_failure, slurm_job  # noqa: F401 - also imported from here

log = logging.getLogger(__name__)

EXIT_USAGE = 2
# A stop counts as a time limit when at most this much more than the signal delay was left.
TIMEOUT_MARGIN_S = 60
# CLI flag -> config key; flags are applied after the YAML file and the overrides, so they win.
FLAG_KEYS = {
    "nodes": "slurm.nodes", "gpus_per_node": "slurm.gpus_per_node", "tasks_per_node": "slurm.tasks_per_node",
    "cpus_per_task": "slurm.cpus_per_task", "partition": "slurm.partition", "time": "slurm.time_minutes",
    "account": "slurm.account", "qos": "slurm.qos", "constraint": "slurm.constraint", "mem": "slurm.mem",
    "exclude": "slurm.exclude", "signal_delay": "slurm.signal_delay_s",
}


class SubmitError(ConfigError):
    """A submission that Slurm would refuse or that would be unsafe; printed, exit code 2."""


# ----------------------------------------------------------------------------- pure helpers

def tasks_per_node(slurm: SlurmConfig) -> int:
    """One task per GPU; one per node on CPU; an explicit slurm.tasks_per_node wins."""
    return slurm.tasks_per_node or slurm.gpus_per_node or 1


def sbatch_parameters(slurm: SlurmConfig, job_name: str, run_dirs: list[Path] | None = None) -> dict[str, Any]:
    """The submitit SlurmExecutor parameters (= sbatch flags, plus the lines around srun) for a SlurmConfig.

    srun ends the step as soon as one task fails (--kill-on-bad-exit: a SIGKILL also ends a
    stopped task, which a hung collective would otherwise keep waiting for); the batch script
    then runs `after-srun`, which restarts the job from its latest checkpoint (see after_srun)."""
    params: dict[str, Any] = {
        "job_name": job_name, "nodes": slurm.nodes, "ntasks_per_node": tasks_per_node(slurm),
        "cpus_per_task": slurm.cpus_per_task, "time": slurm.time_minutes,
        "signal_delay_s": slurm.signal_delay_s, "additional_parameters": {"requeue": True},
        "srun_args": ["--kill-on-bad-exit=1"], "setup": batch_setup_lines(),
    }
    if run_dirs:
        params["teardown"] = batch_teardown_lines(run_dirs, slurm.max_num_failures)
    if slurm.gpus_per_node > 0:
        params["gres"] = f"gpu:{slurm.gpus_per_node}"
    for name in ("partition", "account", "qos", "constraint", "mem", "exclude"):
        if getattr(slurm, name):
            params[name] = getattr(slurm, name)
    return params


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """`--nodes 2` -> 'slurm.nodes=2'; strings are quoted so YAML keeps 'n[1-2]' or '0' a string."""
    overrides = []
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    return overrides


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """'optim.lr=0.1,0.2' -> ('optim.lr', ['0.1', '0.2'])."""
    key, sep, values = text.partition("=")
    items = [value.strip() for value in values.split(",") if value.strip()]
    if not sep or key.count(".") != 1 or not items:
        raise SubmitError(f"--sweep {text!r} must look like section.key=v1,v2,... (e.g. optim.lr=0.1,0.2)")
    if len(set(items)) != len(items):
        raise SubmitError(f"--sweep {text!r} repeats a value")
    return key.strip(), items


def sweep_run_dir(base: str | os.PathLike, key: str, value: str) -> Path:
    """One run folder per swept value, inside the base run folder: runs/x/optim.lr=0.1."""
    return Path(base) / f"{key}={re.sub(r'[^A-Za-z0-9._=+-]', '_', value)}"


def parse_slurm_duration(text: str) -> float | None:
    """squeue's time left ('1-02:03:04', '12:34', '0:45', 'UNLIMITED') in seconds; None if unknown."""
    text = text.strip()
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text)
    if match is None:
        return None
    days, hours, minutes, seconds = (int(part) if part else 0 for part in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


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


def writable_by_others(path: Path) -> bool:
    return bool(path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def check_folder_safe(path: Path) -> None:
    """The folder holds pickles the job executes: nobody but the owner may write into it."""
    if path.exists() and writable_by_others(path):
        raise SubmitError(f"refusing to submit into {path}: it is writable by group or others "
                          f"(mode {stat.filemode(path.stat().st_mode)}); run `chmod go-w {path}` or choose "
                          "another train.run_dir")


def make_private_folder(path: Path) -> None:
    """Create `path` (and parents) without group/other write permission; tighten it if it exists."""
    path.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o022:
        path.chmod(mode & ~0o022)


@contextlib.contextmanager
def restrictive_umask(mask: int = 0o022):
    """Files submitit and sbatch create meanwhile (pickles, job folders) get no group/other write."""
    previous = os.umask(mask)
    os.umask(previous | mask)
    try:
        yield
    finally:
        os.umask(previous)


# ----------------------------------------------------------------------------- cluster checks

def _scontrol_records(*args: str) -> list[dict[str, str]]:
    output = _slurm_command("scontrol", "show", *args, "-o")
    records = []
    for line in output.splitlines():
        fields = dict(re.findall(r"(\S+?)=(\S*)", line))
        if fields:
            records.append(fields)
    return records


def _slurm_command(*args: str) -> str:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise SubmitError(f"'{args[0]}' not found: submit from a machine with the Slurm client tools") from None
    except subprocess.TimeoutExpired:
        raise SubmitError(f"'{' '.join(args)}' timed out: is slurmctld reachable?") from None
    if result.returncode != 0:
        raise SubmitError(f"'{' '.join(args)}' failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def gpus_in_gres(gres: str) -> int:
    """GPUs in sinfo's %G of a node: '(null)' -> 0, 'gpu:8' -> 8, 'gpu:a100:4(S:0-1),gpu:v100:2' -> 6."""
    total = 0
    for item in re.split(r",(?![^(]*\))", gres):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def memory_mb(text: str) -> int | None:
    """slurm.mem ('400G', '64000', '512M', '1T') in MB, Slurm's unit when none is given; None if unparsable."""
    match = re.fullmatch(r"(\d+)([KMGT]?)B?", text.strip(), flags=re.IGNORECASE)
    if match is None:
        return None
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2}[match.group(2).upper()]
    return int(int(match.group(1)) * scale)


def check_against_cluster(slurm: SlurmConfig) -> str:
    """Fail before queuing what Slurm would reject or never run; returns the partition used.

    Nodes, CPUs, GPUs (gres), memory and the time limit are checked against what the
    partition's nodes have, so a recipe made for another cluster is one line, not a pending job
    or an sbatch error.
    """
    partitions = _scontrol_records("partition")
    names = [record.get("PartitionName", "") for record in partitions]
    if slurm.partition:
        matching = [record for record in partitions if record.get("PartitionName") == slurm.partition]
        if not matching:
            raise SubmitError(f"slurm.partition={slurm.partition!r} does not exist; partitions: {', '.join(names)}")
    else:
        matching = [record for record in partitions if record.get("Default") == "YES"]
        if not matching:
            raise SubmitError(f"the cluster has no default partition; set --partition (one of {', '.join(names)})")
    partition = matching[0]
    name = partition["PartitionName"]
    total_nodes = int(partition.get("TotalNodes", "0") or 0)
    if slurm.nodes > total_nodes:
        raise SubmitError(f"slurm.nodes={slurm.nodes} but partition {name!r} has {total_nodes} node(s)")
    max_time = parse_slurm_duration(partition.get("MaxTime", ""))
    if max_time is not None and slurm.time_minutes * 60 > max_time:
        raise SubmitError(f"slurm.time_minutes={slurm.time_minutes} exceeds partition {name!r}'s limit of "
                          f"{partition['MaxTime']} ({max_time / 60:.0f} minutes); pass --time")
    nodes = [line.split("|") for line in _slurm_command("sinfo", "-h", "-N", "-p", name, "-o", "%c|%m|%G").splitlines()
             if line.count("|") == 2]
    # GPUs first: the task count (one per GPU) and so the CPUs needed follow from them.
    node_gpus = [gpus_in_gres(gres) for _, _, gres in nodes]
    if slurm.gpus_per_node > 0 and nodes and slurm.gpus_per_node > max(node_gpus):
        have = f"at most {max(node_gpus)}" if max(node_gpus) else "none (no gpu gres)"
        raise SubmitError(f"slurm.gpus_per_node={slurm.gpus_per_node} but nodes of {name!r} have {have}; "
                          f"for CPU training (gloo) pass --gpus-per-node 0")
    node_cpus = [int(cpus) for cpus, _, _ in nodes if cpus.isdigit()]
    cpus_needed = tasks_per_node(slurm) * slurm.cpus_per_task
    if node_cpus and cpus_needed > max(node_cpus):
        raise SubmitError(f"{tasks_per_node(slurm)} task(s) per node x slurm.cpus_per_task={slurm.cpus_per_task} "
                          f"needs {cpus_needed} CPUs per node; nodes of {name!r} have at most {max(node_cpus)}")
    if slurm.mem:
        wanted = memory_mb(slurm.mem)
        if wanted is None:
            raise SubmitError(f"slurm.mem={slurm.mem!r} is not a Slurm memory size (e.g. 64G, 512M, 64000)")
        node_mem = [int(mem) for _, mem, _ in nodes if mem.isdigit()]
        if node_mem and wanted > max(node_mem):
            raise SubmitError(f"slurm.mem={slurm.mem} is {wanted} MB per node; nodes of {name!r} have at most "
                              f"{max(node_mem)} MB")
    return name


def sbatch_refusal(err: Exception, stderr: str) -> str:
    """sbatch's own error lines ('sbatch: error: ...') as one line, for a job Slurm refused."""
    text = "\n".join(filter(None, (str(err), stderr)))
    lines = [line.strip() for line in text.splitlines() if "error" in line.lower() and line.strip()]
    if not lines:
        lines = [line.strip() for line in text.splitlines() if line.strip()][:1] or [type(err).__name__]
    return "; ".join(dict.fromkeys(lines))  # without repeats, in order


# ----------------------------------------------------------------------------- after srun: crash -> restart

ATTEMPT_STARTED_ENV = "RKAN_ATTEMPT_STARTED"  # set by the batch script: when this run of the job began
SRUN_ERR_OFFSET_ENV = "RKAN_SRUN_ERR_OFFSET"  # ... and how long its stderr file was then
_PROCESS_STARTED = time.time()
# srun's report of a failed task in the batch script's stderr: "srun: error: n2: task 1: Killed",
# "srun: error: n1: tasks 0-1: Exited with exit code 2". Task numbers are global ranks.
_USR2_DEATH = "User defined signal 2"  # srun's words for a task killed by USR2
_SRUN_TASK_ERROR = re.compile(r"^srun: error: (\S+): tasks? (\d+)\S*: (.+)$", re.MULTILINE)


def batch_setup_lines() -> list[str]:
    return ["# rkan-dist: when this run of the job started, and where srun's messages begin in this script's stderr",
            f"export {ATTEMPT_STARTED_ENV}=$(date +%s.%N)",
            f"export {SRUN_ERR_OFFSET_ENV}=$(stat -L -c %s /proc/$$/fd/2 2>/dev/null || echo 0)"]


def batch_teardown_lines(run_dirs: list[Path], max_num_failures: int) -> list[str]:
    """The line after srun (`$?` is srun's status): restart the job after a failed step (after_srun)."""
    dirs = " ".join(f"--run-dir {shlex.quote(str(run_dir))}" for run_dir in run_dirs)
    return [f"{shlex.quote(sys.executable)} -m rkan_dist.submit after-srun --status $? "
            f"--max-failures {max_num_failures} {dirs}"]


def attempt_started(env: dict[str, str] | os._Environ = os.environ) -> float:
    """When this run of the job began (the batch script's note), else when this process started."""
    with contextlib.suppress(KeyError, ValueError):
        return float(env[ATTEMPT_STARTED_ENV])
    return _PROCESS_STARTED


def first_failed_task(srun_messages: str) -> tuple[int | None, str]:
    """(rank, what srun said) of the first task srun reported failed, e.g. (1, 'Killed'); the first
    is the cause, the ones after it are the peers srun ended because of it."""
    match = _SRUN_TASK_ERROR.search(srun_messages)
    if match is None:
        return None, "srun failed"
    return int(match.group(2)), match.group(3).strip()


def srun_messages(env: dict[str, str] | os._Environ = os.environ) -> str:
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
    recent = [event for event in events if event.get("time", 0) >= started - 1e-3]
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


def after_srun(status: int, run_dir: Path, max_failures: int, env: dict[str, str] | os._Environ = os.environ) -> int:
    """`python -m rkan_dist.submit after-srun`: in the batch script, after srun. A failed step (a rank
    killed, crashed, hung or unable to save) requeues the job, which resumes from its latest valid
    checkpoint, at most slurm.max_num_failures times per job; then one line names the failures.
    Returns the batch script's exit status (srun's, or 0 once requeued)."""
    from rkan_dist.manifest import latest_valid
    from rkan_dist.stops import describe_failure, failure_cause, failure_step, give_up_message

    job = slurm_job(env)
    job_id, started = job.get("job_id", ""), attempt_started(env)
    ledger = RequeueLedger(run_dir)
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
    rank, what = first_failed_task(srun_messages(env))
    latest = latest_valid(run_dir)
    checkpoint = latest.path if latest is not None else None
    rank_wrote_why = event is not None and event.get("time", 0) >= started - 1e-3
    if not rank_wrote_why and what == _USR2_DEATH:
        # A USR2 that reached a task in the interpreter's first milliseconds, before any handler: the
        # preemption it asked for, from the latest checkpoint; not a failure of the run.
        ledger.append({"event": "stop", **job, "step": latest.step if latest is not None else 0, "kind": "preemption",
                       "requeue": True, "reason": f"USR2 before rank {rank}'s handler was installed"},
                      count="preemptions")
        return _requeue(job_id, f"rank {rank} was stopped by USR2 while starting", checkpoint, status)
    if not rank_wrote_why:  # srun's report is all there is
        events = ledger.record_failure("crash", rank, failure_step(run_dir, started), exit=what)["events"]
        event = events[-1]
        decision, _ = restart_after_srun(status, events, started, job_id, max_failures)
    failures = job_failures(events, job_id)
    if decision == "give_up":
        ledger.append({"event": "gave_up", "failures": len(failures), "budget": max_failures, **job})
        print(f"rkan-dist: {give_up_message(failures, checkpoint)} (slurm.max_num_failures={max_failures})",
              file=sys.stderr, flush=True)
        return status
    return _requeue(job_id, f"{describe_failure(event)} ({failure_cause(event, what)}); restart {len(failures)} of "
                            f"{max_failures}",
                    checkpoint, status)


def _requeue(job_id: str, why: str, checkpoint: Path | None, status: int) -> int:
    """Say why and requeue the job; returns the batch script's exit status (0 once requeued)."""
    print(f"rkan-dist: {why} from {checkpoint or 'the start (no checkpoint yet)'}: requeueing job {job_id}",
          file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue's SIGTERM must not cut this short
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60, capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or err
        print(f"rkan-dist: could not requeue job {job_id}: {str(detail).strip()}; submit again to continue from "
              f"{checkpoint}", file=sys.stderr, flush=True)
        return status
    return 0


def after_srun_main(argv: list[str]) -> int:
    """`python -m rkan_dist.submit after-srun --status S (--run-dir D ... --max-failures N | --config C [overrides])`."""
    parser = argparse.ArgumentParser(prog="python -m rkan_dist.submit after-srun",
                                     description="After a job's srun: restart the job after a failure.")
    parser.add_argument("--status", type=int, required=True, help="srun's exit status")
    parser.add_argument("--run-dir", action="append", default=[], help="the run folder (one per array task)")
    parser.add_argument("--max-failures", type=int)
    parser.add_argument("--config", help="instead of --run-dir/--max-failures: the recipe (the sbatch template)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    if args.config:
        try:
            config = load_config(args.config, args.overrides)
        except ConfigError as err:  # the tasks said it already
            print(f"rkan-dist: not restarted: {err}", file=sys.stderr)
            return args.status
        run_dir, max_failures = Path(config.train.run_dir), config.slurm.max_num_failures
    else:
        index = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0") or 0) if len(args.run_dir) > 1 else 0
        run_dir, max_failures = Path(args.run_dir[index]), args.max_failures or 0
    return after_srun(args.status, run_dir, max_failures)


# ----------------------------------------------------------------------------- inside the job

def _job_id() -> str:
    return slurm_job().get("job_id", "")


def _seconds_left(job_id: str) -> float | None:
    try:
        result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_slurm_duration(result.stdout) if result.returncode == 0 else None


def run_training_task(config: Config) -> dict[str, Any]:
    """One task of a Slurm step: train, and on USR2 checkpoint, requeue once and exit (status 0).

    Shared by `TrainingJob` (submitit) and `python -m rkan_dist.submit task` (the sbatch template).
    What no restart can fix (a configuration or bad-input error, a non-finite loss under
    train.nonfinite=stop) is written to the ledger as an "error", so after_srun does not restart
    the job, and ends the task with one line and exit 2; a collective that failed because another
    rank died ends with one line and exit 1 (that rank's death is the fault after_srun records).
    """
    signals = StopSignals("slurm").install()  # before the slow imports below
    from rkan_dist.trainer import NonFiniteLossError

    try:
        check_data_paths(config)  # a data path that disappeared since the submission
        return _train_task(config, signals)
    except (ConfigError, NonFiniteLossError) as err:
        kind = "config" if isinstance(err, ConfigError) else "nonfinite"
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        with contextlib.suppress(OSError, ValueError):
            RequeueLedger(config.train.run_dir).record_error(kind, rank, str(err), since=attempt_started())
        _leave(EXIT_USAGE, f"rkan-dist task: error: {err}" if rank == 0 or kind == "config" else None)
    except RuntimeError as err:
        if not lost_peer(err):
            raise
        _leave(1, lost_peer_line(os.environ.get("SLURM_PROCID", "?"), err))


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

    job_id, restart_count = _job_id(), int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    ledger = RequeueLedger(config.train.run_dir)
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
                kind = classify_stop(_seconds_left(job_id), config.slurm.signal_delay_s, signals.saw_sigterm)
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
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
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


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rkan-dist submit", description="Submit a (multi-node) training job "
                                     "to Slurm through submitit; it checkpoints and requeues itself on "
                                     "preemption and at its time limit.")
    parser.add_argument("--config", required=True, help="YAML recipe")
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--gpus-per-node", dest="gpus_per_node", type=int, help="0 = CPU with gloo")
    parser.add_argument("--tasks-per-node", dest="tasks_per_node", type=int, help="default: one per GPU, 1 on CPU")
    parser.add_argument("--cpus-per-task", dest="cpus_per_task", type=int)
    parser.add_argument("--partition")
    parser.add_argument("--time", type=int, metavar="MINUTES", help="time limit per job")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--constraint")
    parser.add_argument("--mem", help="memory per node, e.g. 400G")
    parser.add_argument("--exclude", metavar="NODES")
    parser.add_argument("--signal-delay", dest="signal_delay", type=int, metavar="S",
                        help="USR2 this many seconds before the time limit (default 120)")
    parser.add_argument("--sweep", metavar="KEY=V1,V2,...", help="a job array, one run folder per value")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


@dataclass
class Submission:
    configs: list[Config]  # one per array task (one without --sweep)
    folder: Path  # submitit folder: <run_dir>/slurm/%j
    parameters: dict[str, Any]


def prepare(args: argparse.Namespace) -> Submission:
    """Resolve, validate and check everything; creates nothing."""
    overrides = [*args.overrides, *flag_overrides(args)]
    base = load_config(args.config, overrides, check_paths=True)
    base_dir = Path(base.train.run_dir).expanduser().absolute()
    overrides.append(f"train.run_dir={json.dumps(str(base_dir))}")
    if args.sweep:
        key, values = parse_sweep(args.sweep)
        configs = [load_config(args.config, [*overrides, f"{key}={value}",
                                             f"train.run_dir={json.dumps(str(sweep_run_dir(base_dir, key, value)))}"],
                               check_paths=True) for value in values]
    else:
        configs = [load_config(args.config, overrides, check_paths=True)]
    for config in configs:
        for folder in (Path(config.train.run_dir), Path(config.train.run_dir) / "slurm"):
            check_folder_safe(folder)
    check_folder_safe(base_dir / "slurm")
    parameters = sbatch_parameters(base.slurm, job_name=f"rkan-dist-{base_dir.name}",
                                   run_dirs=[Path(config.train.run_dir) for config in configs])
    return Submission(configs, base_dir / "slurm" / "%j", parameters)


def sbatch_script(submission: Submission) -> str:
    """The script submitit will hand to sbatch (for --dry-run; needs no Slurm on this machine)."""
    from submitit.slurm.slurm import _make_sbatch_string

    parameters = dict(submission.parameters)
    if len(submission.configs) > 1:
        parameters["map_count"] = len(submission.configs)
    command = " ".join([task_python(), "-u -m submitit.core._submit", shlex.quote(str(submission.folder))])
    return _make_sbatch_string(command=command, folder=submission.folder, **parameters)


def task_python() -> str:
    """The Python command submitit runs each task with: signal-safe from its first import (rkan_dist.task_start)."""
    return f"{shlex.quote(sys.executable)} -u -m rkan_dist.task_start"


def submit(submission: Submission) -> list[submitit.Job]:
    """Queue the job (or job array) with every folder private; returns submitit's jobs."""
    check_against_cluster(config_slurm(submission))
    with restrictive_umask():
        for config in submission.configs:
            make_private_folder(Path(config.train.run_dir))
        make_private_folder(submission.folder.parent)
        executor = submitit.AutoExecutor(folder=submission.folder, cluster="slurm",
                                         slurm_max_num_timeout=config_slurm(submission).max_num_timeout,
                                         slurm_python=task_python())
        executor.update_parameters(**{f"slurm_{name}": value for name, value in submission.parameters.items()})
        # submitit prints sbatch's stderr itself before raising: keep it, and say it once, in one line.
        sbatch_stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(sbatch_stderr), (
                    executor.batch() if len(submission.configs) > 1 else contextlib.nullcontext()):
                jobs = [executor.submit(TrainingJob(config_to_dict(config))) for config in submission.configs]
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError,
                subprocess.CalledProcessError, OSError) as err:
            raise SubmitError(f"sbatch refused the job: {sbatch_refusal(err, sbatch_stderr.getvalue())}") from None
        for job in jobs:
            make_private_folder(job.paths.folder)
    return jobs


def config_slurm(submission: Submission) -> SlurmConfig:
    return submission.configs[0].slurm


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        submission = prepare(args)
        if args.dry_run:
            print(sbatch_script(submission))
            for config in submission.configs:
                print(f"# run folder: {config.train.run_dir}")
            print(f"# submitit folder: {submission.folder} (dry run: nothing submitted)")
            return 0
        jobs = submit(submission)
    except ConfigError as err:
        print(f"rkan-dist submit: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    for job, config in zip(jobs, submission.configs):
        run_dir = Path(config.train.run_dir)
        print(f"submitted job {job.job_id}")
        print(f"  run folder: {run_dir}")
        print(f"  logs:       {job.paths.stdout} / {job.paths.stderr}")
        print(f"  tensorboard --logdir {run_dir / 'tb'}")
    return 0


def task_main(argv: list[str] | None = None) -> int:
    """`python -m rkan_dist.submit task --config C [overrides]`: one srun task (slurm/rkan_dist.sbatch)."""
    parser = argparse.ArgumentParser(prog="python -m rkan_dist.submit task",
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
    try:
        result = run_training_task(config)
    except Fault as err:  # every rank raises it (a refused save); one prints it, and the step fails
        if err.report:
            print(f"rkan-dist task: {err}", file=sys.stderr, flush=True)
        return 1
    print(f"status: {result['status']} at step {result['step']}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["task"]:
        sys.exit(task_main(sys.argv[2:]))
    if sys.argv[1:2] == ["after-srun"]:
        sys.exit(after_srun_main(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
