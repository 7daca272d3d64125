"""A bad node costs a restart, not the run: before a job is requeued, the node its failures (or a
persistent straggler) point to is added to the job's excluded nodes, so Slurm does not hand the
job that node again.

- A crash or hang is attributed to the culprit rank's node (the ledger's failure event names it).
  Once `slurm.exclude_after_failures` of them (counted over the run) name one node, that node is
  excluded before the job restarts; 0 turns this off.
- With `slurm.exclude_stragglers`, a node the Trainer recorded a persistent straggler on during this
  run of the job is excluded at the next requeue (a preemption, a time limit or a failure): a slow
  node alone never stops a job.
- Exclusions accumulate across the requeues of one job (Slurm keeps the job's ExcNodeList, and the
  user's --exclude is kept in it). No node is excluded when that would leave the job's partition
  fewer than `slurm.min_nodes` nodes: one line says so and the job is requeued with it.

Each exclusion is one line in the batch log and an event in the ledger:
`{"event": "evict", "node": "n3", "reason": "crash of rank 2 at step 40", "excluded": "n3"}`, or
with `"skipped": "<why>"` when it was not done. A resubmission of the run (`rkan-dist submit`, a new
job id) starts with the run's excluded nodes excluded (`excluded_by_run`). Standard library only:
after-srun imports it.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rkan_dist.faults import describe_failure
from rkan_dist.ledger import EventLedger, record_or_warn, written_since
from rkan_dist.nodes import join_nodes, parse_nodelist
from rkan_dist.slurm_cluster import job_record, partition_nodes, requeue_job

EVICTING_FAILURES = ("crash", "hang")  # a refused save is the file system's, rarely the node's


@dataclass(frozen=True)
class EvictionPolicy:
    exclude_after_failures: int = 1  # slurm.exclude_after_failures
    fewest_nodes: int = 1  # slurm.min_nodes (or slurm.nodes): never exclude below it
    exclude_stragglers: bool = False  # slurm.exclude_stragglers

    @classmethod
    def of(cls, slurm: Any) -> EvictionPolicy:
        """The policy of a SlurmConfig."""
        return cls(slurm.exclude_after_failures, slurm.fewest_nodes, slurm.exclude_stragglers)

    def flags(self) -> list[str]:
        """The after-srun flags that carry this policy into the batch script."""
        return ["--exclude-after-failures", str(self.exclude_after_failures), "--min-nodes", str(self.fewest_nodes),
                *(["--exclude-stragglers"] if self.exclude_stragglers else [])]


@dataclass(frozen=True)
class Eviction:
    node: str
    reason: str


def nodes_to_evict(events: list[Mapping[str, Any]], failure: Mapping[str, Any] | None, excluded: Iterable[str],
                   policy: EvictionPolicy, since: float) -> list[Eviction]:
    """The nodes to exclude before the job restarts, each once, none already excluded.

    `failure`: the failure that ends this run of the job (None for a preemption or time limit); its
    node is evicted once the run's crashes and hangs on that node reach exclude_after_failures.
    Stragglers: nodes of "straggler" events written at or after `since` (this run of the job)."""
    excluded = set(excluded)
    found: dict[str, str] = {}
    node = (failure or {}).get("node")
    if policy.exclude_after_failures and node and failure.get("kind") in EVICTING_FAILURES:
        count = Counter(event.get("node") for event in events
                        if event.get("event") == "failure" and event.get("kind") in EVICTING_FAILURES)[node]
        if count >= policy.exclude_after_failures:
            found[node] = describe_failure(failure) + (f", failure {count} on it" if count > 1 else "")
    if policy.exclude_stragglers:
        for event in events:
            if event.get("event") == "straggler" and event.get("node") and written_since(event, since):
                found.setdefault(event["node"], f"straggler: rank {event.get('rank')} computed at "
                                                f"{event.get('score')} of the fastest rank's speed")
    return [Eviction(node, reason) for node, reason in found.items() if node not in excluded]


def room_to_evict(partition: list[str] | None, excluded: Iterable[str], fewest_nodes: int) -> str | None:
    """Why excluding `excluded` would leave the job unable to run (fewer than `fewest_nodes` of the
    partition's nodes), or None when it can."""
    if partition is None:
        return "Slurm did not say which nodes the job's partition has"
    left = [node for node in partition if node not in set(excluded)]
    if len(left) < fewest_nodes:
        return (f"that would leave {len(left)} of the partition's {len(partition)} nodes, fewer than "
                f"slurm.min_nodes={fewest_nodes}")
    return None


def excluded_by_run(events: list[Mapping[str, Any]], job_id: str | None = None) -> list[str]:
    """The nodes the run's jobs excluded (what a resubmission excludes too); with `job_id`, that job's."""
    return sorted({event["node"] for event in events if event.get("event") == "evict" and not event.get("skipped")
                   and (job_id is None or str(event.get("job_id")) == job_id)})


def say_in_log(line: str) -> None:
    """One line to the batch script's log (its stderr)."""
    print(line, file=sys.stderr, flush=True)


def requeue_evicting(job_id: str, ledger: EventLedger, failure: Mapping[str, Any] | None, policy: EvictionPolicy,
                     since: float, say: Callable[[str], None] = say_in_log,
                     job: Mapping[str, Any] | None = None) -> str | None:
    """Requeue `job_id`, first excluding the nodes `nodes_to_evict` names (each said in one line and
    recorded) and those evicted earlier that Slurm's list lacks. Returns None once requeued, else
    Slurm's refusal in one line."""
    wanted, changed = evict(job_id, ledger, failure, policy, since, say, job)
    if not changed:
        return requeue_job(job_id)
    return requeue_job(job_id, exclude=join_nodes(wanted), exclusion_refused=lambda line: say(f"rkan-dist: {line}"))


def evict(job_id: str, ledger: EventLedger, failure: Mapping[str, Any] | None, policy: EvictionPolicy, since: float,
          say: Callable[[str], None], job: Mapping[str, Any] | None = None, later: str = "") -> tuple[set[str], bool]:
    """Decide, say and record this job's evictions; returns (the nodes the job should exclude, whether
    that differs from Slurm's ExcNodeList). The evictions of this job recorded earlier count too:
    one made while the job ran (`later`: the words saying when it takes effect) reaches Slurm at the
    job's next requeue."""
    try:
        events = ledger.read()["events"]
    except (OSError, ValueError):
        events = []
    record = job_record(job_id)
    in_slurm = set(_node_list(record.get("ExcNodeList", "")))
    wanted = in_slurm | set(excluded_by_run(events, job_id))
    evictions = nodes_to_evict(events, failure, wanted, policy, since)
    partition = partition_nodes(record["Partition"]) if evictions and record.get("Partition") else None
    fields = dict(job or {"job_id": job_id})
    for eviction in evictions:
        blocked = room_to_evict(partition, wanted | {eviction.node}, policy.fewest_nodes)
        if blocked is not None:
            say(f"rkan-dist: not excluding node {eviction.node} from job {job_id} ({eviction.reason}): {blocked}; "
                "requeueing with it")
            record_or_warn(ledger, ledger.append, {"event": "evict", "node": eviction.node, "reason": eviction.reason,
                                                   "skipped": blocked, **fields})
            continue
        wanted.add(eviction.node)
        say(f"rkan-dist: excluding node {eviction.node} from job {job_id}{later} ({eviction.reason}); "
            f"excluded now: {join_nodes(wanted)}")
        record_or_warn(ledger, ledger.append, {"event": "evict", "node": eviction.node, "reason": eviction.reason,
                                               "excluded": join_nodes(wanted), **fields})
    return wanted, wanted != in_slurm


ENDINGS = ("stop", "failure", "error", "gave_up")  # what a run of a job that ended through rkan-dist leaves


def unrecorded_end(events: list[Mapping[str, Any]], job_id: str, restart_count: int) -> Mapping[str, Any] | None:
    """The start event of this job's previous run when that run ended with nothing in the ledger after
    it (no stop, failure or error): Slurm requeued the job itself, as it does a --requeue job whose
    node failed, killing the batch script before after-srun could speak. None otherwise."""
    if restart_count < 1:
        return None
    for index in range(len(events) - 1, -1, -1):
        event = events[index]
        if event.get("event") == "start" and str(event.get("job_id")) == job_id:
            if event.get("restart_count") != restart_count - 1:
                return None
            return None if any(later.get("event") in ENDINGS for later in events[index + 1:]) else event
    return None


def _node_list(text: str) -> list[str]:
    if not text or text == "(null)":
        return []
    try:
        return parse_nodelist(text)
    except ValueError:
        return []

