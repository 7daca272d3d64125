"""What rkan-dist asks of Slurm: the cluster checks before a submission, a job's state and time
left, and the requeue. Each Slurm command is called from here, with one timeout and one way of
reporting that it failed. Standard library only (status and after-srun import it).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING

from rkan_dist.faults import ConfigError

if TYPE_CHECKING:
    from rkan_dist.config import SlurmConfig

SLURM_TIMEOUT_S = 30  # a command slurmctld does not answer within this is reported, never waited on
STATE_TIMEOUT_S = 5  # `rkan-dist status` answers beside a running job: a few seconds at most
# A held requeue's ExcNodeList update may wait in slurmctld (a job still completing, accounting not
# yet caught up); the requeue's SIGTERM comes KillWait (30 s by default, 5 on the dev cluster) before
# the batch script's SIGKILL, and the release must come first: past this, release without it.
EXCLUDE_TIMEOUT_S = 3


class SubmitError(ConfigError):
    """A submission that Slurm would refuse or that would be unsafe; printed, exit code 2."""


def tasks_per_node(slurm: SlurmConfig) -> int:
    """One task per GPU; one per node on CPU; an explicit slurm.tasks_per_node wins."""
    return slurm.tasks_per_node or slurm.gpus_per_node or 1


def parse_slurm_duration(text: str) -> float | None:
    """squeue's time left ('1-02:03:04', '12:34', '0:45', 'UNLIMITED') in seconds; None if unknown."""
    text = text.strip()
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text)
    if match is None:
        return None
    days, hours, minutes, seconds = (int(part) if part else 0 for part in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


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
        result = subprocess.run(args, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
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



def requeue_job(job_id: str, exclude: str = "", exclusion_refused: Callable[[str], None] | None = None) -> str | None:
    """`scontrol requeue JOB`: the job keeps its id and starts again (SLURM_RESTART_COUNT + 1).
    With `exclude` (a node list), the job starts again on no node of it: Slurm takes ExcNodeList only
    from a pending job, and a requeued job may start at once on the node it left, so it is requeued
    held, updated, then released (released also when the update fails: a requeue without the
    exclusion beats a job left held). Returns None once requeued, else why not in one line; an
    exclusion Slurm refused goes to `exclusion_refused`, in one line, and the job is still requeued.

    A job Slurm already requeued itself (after a node failure, a --requeue job is) is pending: that
    is the requeue asked for, and it is held where it waits for the exclusion."""
    if not exclude:
        refused = _scontrol_action("requeue", job_id)
        return None if refused is None or _ALREADY_PENDING in refused else refused
    refused = _scontrol_action("requeuehold", job_id)
    if refused is not None and _ALREADY_PENDING in refused:
        refused = _scontrol_action("hold", job_id)
    if refused is not None:
        return refused
    # Bounded well inside any KillWait: the requeue's SIGKILL must not find the job still held.
    not_excluded = _scontrol_action("update", f"JobId={job_id}", f"ExcNodeList={exclude}", timeout=EXCLUDE_TIMEOUT_S)
    released = _scontrol_action("release", job_id)
    if released is not None:
        return f"requeued held, but `scontrol release {job_id}` failed ({released}): release it by hand"
    if not_excluded is not None and exclusion_refused is not None:
        exclusion_refused(f"Slurm refused to exclude {exclude} from job {job_id} ({not_excluded}); "
                          "requeued without the exclusion")
    return None


_ALREADY_PENDING = "Job is pending execution"  # scontrol's words for a job Slurm requeued already


def _scontrol_action(*args: str, timeout: float = SLURM_TIMEOUT_S) -> str | None:
    """`scontrol ARGS`: None when it succeeded, else why not in one line."""
    try:
        result = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as err:
        return str(err)
    return None if result.returncode == 0 else (result.stderr.strip() or result.stdout.strip() or
                                                f"scontrol exited {result.returncode}")


def job_record(job_id: str) -> dict[str, str]:
    """`scontrol show job JOB` as {field: value} ({} when Slurm does not answer): ExcNodeList,
    Partition, NodeList, NumNodes, ..."""
    try:
        records = _scontrol_records("job", job_id)
    except SubmitError:
        return {}
    return records[0] if records else {}


def failed_nodes(nodes: list[str]) -> list[str] | None:
    """Those of `nodes` Slurm holds down, failed, not responding or drained (None when Slurm does not answer)."""
    if not nodes:
        return []
    try:
        records = _scontrol_records("node", ",".join(nodes))
    except SubmitError:
        return None
    return [record["NodeName"] for record in records
            if record.get("NodeName") in nodes and _FAILED_STATES & set(record.get("State", "").split("+"))]


_FAILED_STATES = {"DOWN", "FAIL", "FAILING", "NOT_RESPONDING", "DRAIN", "DRAINED", "DRAINING"}


def partition_nodes(partition: str) -> list[str] | None:
    """The nodes of `partition` (None when Slurm does not answer)."""
    from rkan_dist.nodes import parse_nodelist

    try:
        records = _scontrol_records("partition", partition)
    except SubmitError:
        return None
    nodes = records[0].get("Nodes", "") if records else ""
    try:
        return parse_nodelist(nodes) if nodes and nodes != "(null)" else None
    except ValueError:
        return None


def seconds_left(job_id: str) -> float | None:
    """The job's time left (squeue's %L) in seconds; None if Slurm does not say."""
    try:
        result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True,
                                timeout=SLURM_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_slurm_duration(result.stdout) if result.returncode == 0 else None


def slurm_state(job_id: str) -> str | None:
    """The job's state: from sacct where Slurm keeps accounting (also long after the job ended), else
    from scontrol while slurmctld still holds the job (queued, running, or ended within MinJobAge);
    None when neither answers within a few seconds."""
    commands = (["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], ["scontrol", "show", "job", "-o", job_id])
    for command in commands:
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=STATE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError):
            continue
        if result.returncode != 0:
            continue
        if command[0] == "sacct":
            states = [line.strip() for line in result.stdout.splitlines() if line.strip()]
            if states:
                return states[-1]  # a requeued job lists each attempt; the last is the current one
        elif match := re.search(r"\bJobState=(\S+)", result.stdout):
            return match.group(1)
    return None
