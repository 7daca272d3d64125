"""`rkan-dist status RUN_DIR`: one screen on where a run stands and what faults have cost it.

    job:        4242 RUNNING (Slurm)
    step:       1200 (logged 18:04:10 UTC, 35 s ago) of max_steps 5000
    checkpoint: step-1000 (written 17:58:02 UTC, 6 min 8 s ago; files checked against its manifest)
    restarts:   crash 1, preemption 1, save 1, time limit 1
    failures:   crash 1, save 1
    lost:       3 min 2 s of wall time and 230 steps to faults
    last event: restart at step 1000 after save, 18:01:55 UTC
    ranks:      8 beating every 30 s, hang timeout 10 min 0 s; longest without progress: rank 5 on node03,
                41 s since step 1207 (computing at its last beat)
    straggler:  rank 5 on node03 computes at 0.41 of the fastest rank's speed (below 0.75 in 3 windows of
                20 steps in a row, to step 1200)
    nodes:      node03 crash 1, hang 1 (excluded); node02 save 1

While a run trains, its ranks' heartbeats (rkan_dist.watchdog) show which one has gone longest
without progress, before the hang timeout names it; a heartbeat gone stale is a process stopped or
dead, named on a line of its own. A persistent straggler (rkan_dist.stragglers) is named from the
live heartbeats' compute times, and after they are gone from the "straggler" event rank 0 wrote in
the run's latest attempt. The nodes line counts, per node, the failures, stragglers and exclusions
the ledger names (rkan_dist.eviction), once any of them names a node.

Reads only the run folder (events.json, metrics.jsonl, config.yaml, the checkpoint manifests) and
asks Slurm (sacct, then scontrol, a few seconds at most) for the job's state; it imports no torch, so
it answers in well under a second beside a running job.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from rkan_dist.faults import EXIT_USAGE
from rkan_dist.ledger import EARLIER_LEDGER_NAME, LEDGER_NAME, EventLedger, pending_failure, summary
from rkan_dist.manifest import STEP_PREFIX, CheckpointError, latest_valid, list_checkpoints, validate
from rkan_dist.slurm_cluster import slurm_state
from rkan_dist.stragglers import WINDOW_STEPS, beat_windows, persistent_stragglers
from rkan_dist.watchdog import HEARTBEATS, beat_is_stale, beat_progress, read_heartbeats

# The last step is in the last lines of metrics.jsonl; a long run's file is not read whole.
METRICS_TAIL_BYTES = 1 << 16


def last_logged_step(run_dir: Path) -> tuple[int, float] | None:
    """(step, time) of the newest train record in metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        handle.seek(max(handle.seek(0, 2) - METRICS_TAIL_BYTES, 0))
        lines = handle.read().decode("utf-8", "replace").splitlines()
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:  # the partial first line of the tail, or a line being written
            continue
        if record.get("kind") == "train":
            return int(record["step"]), float(record["time"])
    return None


def failure_step(run_dir: Path, since: float) -> int | None:
    """The step a failed attempt had reached, as far as a launcher can know it: the last step rank 0
    logged (metrics.jsonl, every logging.every_steps, so the ranks may have gone a few steps
    further); with none logged by this attempt, the latest valid checkpoint's step (where it
    resumed; None without one)."""
    logged = last_logged_step(run_dir)
    if logged is not None and logged[1] >= since:
        return logged[0]
    latest = latest_valid(run_dir)
    return latest.step if latest is not None else None


def latest_checkpoint(run_dir: Path) -> tuple[str, float | None, list[str]]:
    """(the latest valid checkpoint's name or 'none', its time, one note per newer unusable one)."""
    skipped = []
    for info in reversed(list_checkpoints(run_dir)):
        try:
            manifest = validate(info.path)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        return info.path.name, manifest.get("created"), skipped
    return "none", None, skipped


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config (config.yaml, as rank 0 wrote it); {} without a readable one."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return config if isinstance(config, dict) else {}


def planned_steps(run_dir: Path) -> str:
    train = run_config(run_dir).get("train") or {}
    if train.get("max_steps"):
        return f" of max_steps {train['max_steps']}"
    return f" (max_epochs {train['max_epochs']})" if train.get("max_epochs") else ""


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(seconds))


def duration(seconds: float) -> str:
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in sorted(counter.items())) or "none"


def straggler_threshold(run_dir: Path) -> float:
    """parallel.straggler_threshold of the run (its config.yaml), else the default."""
    configured = (run_config(run_dir).get("parallel") or {}).get("straggler_threshold")
    if isinstance(configured, int | float):
        return float(configured)
    from rkan_dist.config import ParallelConfig  # no torch: only the default's one home

    return ParallelConfig().straggler_threshold


def _on(event: dict[str, Any]) -> str:
    return f" on {event['node']}" if event.get("node") else ""


def _describe(event: dict[str, Any]) -> str:
    kind = event.get("event", "?")
    if kind == "failure":
        text = f"failure ({event.get('kind')}) of rank {event.get('rank')}{_on(event)} at step {event.get('step')}"
    elif kind == "evict":
        text = (f"node {event.get('node')} not excluded ({event.get('reason')}): {event['skipped']}" if event.get("skipped")
                else f"node {event.get('node')} excluded ({event.get('reason')})")
    elif kind == "straggler":
        text = (f"straggler: rank {event.get('rank')}{_on(event)} at {event.get('score')} of the fastest rank's "
                f"speed for {event.get('windows')} windows, to step {event.get('step')}")
    elif kind == "restart":
        text = f"restart at step {event.get('step')} after {event.get('after')}"
    elif kind == "error":  # not restarted: it would fail the same way again
        text = f"error ({event.get('kind')}), not restarted: {event.get('message', '')[:200]}"
    elif kind == "gave_up":
        text = f"gave up after {event.get('failures')} failures (budget {event.get('budget')})"
    elif kind == "stop":
        text = f"stop ({event.get('kind')}) at step {event.get('step')}" + (", requeued" if event.get("requeue") else "")
    else:
        text = f"{kind} at step {event.get('step')}" if "step" in event else kind
    return f"{text}, {_clock(event['time'])}" if "time" in event else text


def heartbeat_lines(run_dir: Path, now: float, since: float = 0.0) -> list[str]:
    """The ranks of a training run: the one longest without progress, and each whose heartbeat went
    stale. Nothing once the run ended cleanly (each rank removes its heartbeat as it stops), and
    heartbeats from before `since` (the run's latest start: an earlier attempt's ranks) are ignored."""
    beats = {rank: beat for rank, beat in read_heartbeats(run_dir / HEARTBEATS).items()
             if float(beat.get("beat_time") or 0.0) >= since}
    if not beats:
        return []

    def where(rank: int) -> str:
        return f"rank {rank} on {beats[rank].get('host', '?')}"

    def progress(rank: int) -> tuple[float, float]:
        return beat_progress(beats[rank])

    def silent_for(rank: int) -> float:
        return now - float(beats[rank].get("beat_time") or 0.0)

    stale = sorted(rank for rank, beat in beats.items() if beat_is_stale(beat, now))
    if len(stale) == len(beats):
        last = min(stale, key=silent_for)
        return [f"ranks:      none beating: the last of {len(beats)} heartbeats was {duration(silent_for(last))} ago, "
                f"at step {int(progress(last)[0])} (the run's processes are stopped, or were killed)"]
    # Beats are written every few seconds (up to 30) at different times, so their steps do not
    # compare; how long each rank had gone without progress does: a hung rank's only grows.
    timeouts = {float(beat["timeout"]) for beat in beats.values() if beat.get("timeout") is not None}
    timeout = (f", hang timeout {duration(max(timeouts))}" if timeouts and max(timeouts) > 0
               else ", hang detection off" if timeouts else "")
    intervals = {float(beat["interval"]) for beat in beats.values() if beat.get("interval")}
    every = f" every {duration(max(intervals))}" if intervals else ""
    behind = min((rank for rank in beats if rank not in stale), key=lambda rank: (progress(rank)[1], progress(rank)[0], rank))
    step, progressed = progress(behind)
    waiting = beats[behind].get("waiting")
    lines = [f"ranks:      {len(beats) - len(stale)} beating{every}{timeout}; longest without progress: {where(behind)}, "
             f"{duration(now - progressed)} since step {int(step)} ({'waiting in ' + waiting if waiting else 'computing'} "
             "at its last beat)"]
    lines += [f"            stale: {where(rank)} (pid {beats[rank].get('pid')}), last beat {duration(silent_for(rank))} "
              "ago: stopped or dead" for rank in stale]
    return lines


def straggler_lines(run_dir: Path, events: list[dict[str, Any]], now: float, since: float,
                    threshold: float) -> list[str]:
    """One line per persistent straggler of the run's latest attempt (started at `since`): from the
    live heartbeats' compute windows while the run trains, else (they are removed as the ranks stop)
    from the "straggler" events rank 0 recorded. None when no rank straggles."""
    beats = {rank: beat for rank, beat in read_heartbeats(run_dir / HEARTBEATS).items()
             if float(beat.get("beat_time") or 0.0) >= since and not beat_is_stale(beat, now)}
    per_rank = {rank: windows for rank, beat in beats.items() if (windows := beat_windows(beat))}
    found = {straggler.rank: (beats[straggler.rank].get("host", "?"), straggler.score, straggler.windows,
                              straggler.end_step) for straggler in persistent_stragglers(per_rank, threshold)}
    for event in events:
        rank = event.get("rank")
        if event.get("event") == "straggler" and isinstance(rank, int) and rank not in found \
                and float(event.get("time", 0.0)) >= since:
            found[rank] = (event.get("node", "?"), event.get("score"), event.get("windows"), event.get("step"))
    lines = []
    for rank, (node, score, windows, end_step) in sorted(found.items()):
        lines.append(f"{'straggler:' if not lines else '':<12}rank {rank} on {node} computes at {float(score):.2f} of the "
                     f"fastest rank's speed (below {threshold:g} in {windows} windows of {WINDOW_STEPS} steps in a row, "
                     f"to step {end_step})")
    return lines


def node_lines(events: list[dict[str, Any]]) -> list[str]:
    """Per node, the failures, stragglers and exclusions the ledger names: `n3 crash 1, hang 1
    (excluded); n2 save 1`, the node with the most first; none unless a failure names a node."""
    if not any(event.get("event") == "failure" and event.get("node") for event in events):
        return []
    counts: dict[str, Counter] = defaultdict(Counter)
    exclusion: dict[str, str] = {}
    for event in events:
        node = event.get("node")
        if not node:
            continue
        if event.get("event") == "failure":
            counts[node][str(event.get("kind"))] += 1
        elif event.get("event") == "straggler":
            counts[node]["straggler"] += 1
        elif event.get("event") == "evict":  # the latest decision about the node stands
            exclusion[node] = "exclusion skipped" if event.get("skipped") else "excluded"
    order = sorted(set(counts) | set(exclusion), key=lambda node: (-sum(counts[node].values()), node))
    parts = [" ".join(filter(None, (node, _counts(dict(counts[node])) if counts[node] else "",
                                    f"({exclusion[node]})" if node in exclusion else ""))) for node in order]
    return [f"nodes:      {'; '.join(parts)}"]


def report(run_dir: Path, now: float | None = None) -> list[str]:
    """The status screen's lines."""
    now = time.time() if now is None else now
    data = EventLedger(run_dir).read()
    events = data.get("events", [])
    job_id = next((str(event["job_id"]) for event in reversed(events) if event.get("job_id")), "")
    if job_id:
        state = slurm_state(job_id)
        job = f"{job_id} {state} (Slurm)" if state else f"{job_id} (state unknown: Slurm is not reachable from here or no longer knows the job)"
    else:
        job = "no Slurm job recorded (a local run)"
    logged = last_logged_step(run_dir)
    step = (f"{logged[0]} (logged {_clock(logged[1])}, {duration(now - logged[1])} ago){planned_steps(run_dir)}"
            if logged else "none logged yet")
    name, created, skipped = latest_checkpoint(run_dir)
    checkpoint = name if created is None else \
        f"{name} (written {_clock(created)}, {duration(now - created)} ago; files checked against its manifest)"
    totals = summary(data)
    restarts = {"preemption": totals["preemptions"], "time limit": totals["timeouts"], **totals["restarts"]}
    lines = [
        f"run folder: {run_dir}",
        f"job:        {job}",
        f"step:       {step}",
        f"checkpoint: {checkpoint}",
        *(f"            skipped: {note}" for note in skipped),
        f"restarts:   {_counts({kind: count for kind, count in restarts.items() if count})}",
        f"failures:   {_counts(totals['failures'])}",
        f"lost:       {duration(totals['lost_seconds'])} of wall time and {totals['steps_lost']} steps to faults",
    ]
    failure = pending_failure(events)
    if failure is not None:
        back = f"step {name.removeprefix(STEP_PREFIX)}" if created is not None else "step 0 (no valid checkpoint)"
        lines.append(f"pending:    the {failure.get('kind')} failure at step {failure.get('step')} has not been followed "
                     f"by a restart; the next run resumes from {back}")
    if events:
        lines.append(f"last event: {_describe(events[-1])}")
    started = max((float(event["time"]) for event in events if event.get("event") == "start" and "time" in event),
                  default=0.0)
    lines += heartbeat_lines(run_dir, now, since=started)[:8]  # one screen: the rank longest without progress, the first stale ones
    lines += straggler_lines(run_dir, events, now, started, straggler_threshold(run_dir))[:4]
    lines += node_lines(events)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rkan-dist status", description="Where a run stands: its Slurm job, "
                                     "last step, latest valid checkpoint, restarts and the time lost to faults.")
    parser.add_argument("run_dir", help="the run folder (train.run_dir)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    known = ("checkpoints", "metrics.jsonl", LEDGER_NAME, EARLIER_LEDGER_NAME, "config.yaml")
    if not run_dir.is_dir() or not any((run_dir / name).exists() for name in known):
        print(f"rkan-dist status: error: {run_dir} is not a run folder (none of {', '.join(known)} in it)",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        lines = report(run_dir)
    except (OSError, ValueError) as err:
        print(f"rkan-dist status: error: cannot read {run_dir}: {err}", file=sys.stderr)
        return EXIT_USAGE
    print("\n".join(lines))
    return 0
