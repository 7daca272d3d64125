"""Goodput under faults: the demo on the local Slurm cluster, uninterrupted and with one crash, one
hang and one preemption injected.

    python -m bench.faults [--quick] [--skip-hang] [--keep DIR] [--json FILE]
    rkan-dist bench faults

Both jobs are `rkan-dist submit` runs of configs/demo.yaml on slurm/dev-cluster (2 nodes x 1 CPU
task, gloo, fp32, parallel.hang_timeout_s=60 on both: no cost when nothing hangs), submitted
in-process through rkan_dist.submit. Into the second job the bench injects, each once the run
before it has resumed and trained past a checkpoint:

1. crash: SIGKILL of rank 1's training process (an OOM kill, a segfault, a lost GPU);
2. hang: SIGSTOP of rank 1 (a hung collective, a stuck file system), left stopped: the watchdog
   of the live rank must detect it, dump stacks and end the step;
3. preemption: `scancel --signal=USR2 JOB` (what Slurm sends before preempting).

Wall time runs from just before submission to the job seen COMPLETED. goodput (JSON key
`fault_goodput`) = uninterrupted wall / faulted wall. Lost seconds per fault come from the job's
ledger (<run_dir>/events.json): for a crash or hang the `restart` event's `lost_seconds` (the last
checkpoint before the fault to training resuming), for the preemption the signal to the `start`
event of the requeued run (a preemption saves a checkpoint at the next step: no steps are lost).
Each fault's timeline is split into the pieces docs/SCALING.md extrapolates: detection, requeue
and scheduling, task start (imports, rendezvous, model, checkpoint load) and FFCV start with the
first step. Both jobs must end with bitwise-equal weights (`bitwise_equal`).

Then the node-loss case (`node_loss`, left out with --skip-node-loss): a 3-node job with
slurm.min_nodes=2, uninterrupted and again with node n3 killed (its slurmd and its task, as a
machine that dies) half an interval past a checkpoint: who was blamed, how long detection and the
restart took, whether the job shrank to 2 nodes or got a replacement, and its goodput.

The two jobs run one after the other, not side by side: the cluster's two logical nodes share this
machine's two cores, so two jobs at once would each run at about half speed and the faulted one,
running longer, would be slowed for part of its life only - the ratio would measure the load, not
the faults. The bench waits for the cluster to have no jobs at all before it starts. It starts the
cluster if none runs and stops it at the end; one it found running is left running (dev_cluster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
DEV_CLUSTER = REPO / "slurm" / "dev-cluster"
RESOURCES = ["--nodes", "2", "--tasks-per-node", "1", "--gpus-per-node", "0", "--cpus-per-task", "1"]
HANG_TIMEOUT_S = 60
# The crash, hang and preemption jobs restart on the nodes they had (2 of the cluster's 3): they
# measure what a restart costs, comparable with earlier figures, not where the job goes next.
CLASSIC = ("slurm.exclude_after_failures=0",)
# The node-loss case: 3 nodes, one dies; the job may continue on 2 (the global batch of 48 splits).
NODE_LOSS_RESOURCES = ["--nodes", "3", "--tasks-per-node", "1", "--gpus-per-node", "0", "--cpus-per-task", "1"]
NODE_LOSS = ("slurm.min_nodes=2",)
LOST_NODE = "n3"
FAULTS = ("crash", "hang", "preemption")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


# ----------------------------------------------------------------------------- pure parts (unit-tested)

def plan(steps: int, every: int) -> dict[str, int]:
    """The step each fault is injected at (or just after): half a checkpoint interval past a checkpoint,
    two intervals apart, so each lands after the previous run resumed and passed a checkpoint, and the
    steps lost are the average half interval."""
    first = every + every // 2
    targets = {kind: first + index * 2 * every for index, kind in enumerate(FAULTS)}
    if targets["preemption"] + every > steps:
        raise ValueError(f"{steps} steps leave no room for three faults {2 * every} steps apart after step {every}")
    return targets


def goodput(uninterrupted_wall_s: float, faulted_wall_s: float) -> float:
    """Uninterrupted wall / faulted wall: the fraction of the faulted run's wall time that was useful."""
    if uninterrupted_wall_s <= 0 or faulted_wall_s <= 0:
        raise ValueError("wall times must be positive")
    return uninterrupted_wall_s / faulted_wall_s


def _after(events: Iterable[Mapping], since: float, event: str, kind: str | None = None) -> Mapping | None:
    """The first ledger event of type `event` (and `kind`) written at or after `since`."""
    for item in events:
        if item.get("time", 0) >= since - 1e-3 and item.get("event") == event and (
                kind is None or item.get("kind") == kind):
            return item
    return None


def fault_breakdown(events: list[Mapping], step_times: Mapping[int, float],
                    injections: list[Mapping]) -> list[dict]:
    """One row per injected fault: what the ledger and metrics.jsonl say it cost.

    `events`: the ledger's events; `step_times`: {step: time} of the train records in metrics.jsonl
    (the final file: a resumed run overwrote what its killed predecessor logged past the checkpoint);
    `injections`: [{"kind", "time", "step", "task_seen"}] as the bench injected them (`task_seen`: when
    the requeued run's rank-0 process appeared, None if not seen).

    lost_seconds: for a crash or hang the restart event's (last checkpoint -> training resumed), for a
    preemption the signal -> the requeued run's start event. The pieces: detected_s (injection ->
    the failure, or the checkpoint-and-stop, in the ledger), requeue_s (-> the new task process),
    task_start_s (-> the Trainer's start event: imports, rendezvous, model, checkpoint load),
    ffcv_first_step_s (-> the first step after the resume: loader start and one step), down_s
    (injection -> that first step)."""
    rows = []
    for injection in injections:
        kind, sent = injection["kind"], float(injection["time"])
        row: dict = {"fault": kind, "at_step": injection.get("step")}
        if kind == "preemption":
            ended = _after(events, sent, "stop")
            start = _after(events, ended["time"], "start") if ended else None
            restart = None
            row.update(resumed_step=start and start.get("step"), steps_lost=0 if ended else None,
                       lost_seconds=round(start["time"] - sent, 3) if start else None)
        else:
            ended = _after(events, sent, "failure", kind)
            restart = _after(events, ended["time"], "restart") if ended else None
            start = _after(events, ended["time"], "start") if ended else None
            row.update(resumed_step=restart and restart.get("step"), steps_lost=restart and restart.get("steps_lost"),
                       lost_seconds=restart and restart.get("lost_seconds"))
        seen = injection.get("task_seen")
        first = step_times.get(start["step"] + 1) if start else None
        row["detected_s"] = round(ended["time"] - sent, 3) if ended else None
        row["requeue_s"] = round(seen - ended["time"], 3) if ended and seen else None
        row["task_start_s"] = round(start["time"] - seen, 3) if start and seen else None
        row["ffcv_first_step_s"] = round(first - start["time"], 3) if start and first else None
        row["down_s"] = round(first - sent, 3) if first else None
        row["recorded"] = ended is not None and start is not None and (kind == "preemption" or restart is not None)
        rows.append(row)
    return rows


def summarise(uninterrupted_wall_s: float, faulted_wall_s: float, rows: list[dict]) -> dict:
    """The headline figures: goodput, and how much of the extra wall the ledger's lost seconds explain."""
    lost = sum(row["lost_seconds"] or 0.0 for row in rows)
    extra = faulted_wall_s - uninterrupted_wall_s
    return {
        "fault_goodput": round(goodput(uninterrupted_wall_s, faulted_wall_s), 4),
        "uninterrupted_wall_s": round(uninterrupted_wall_s, 1),
        "faulted_wall_s": round(faulted_wall_s, 1),
        "extra_wall_s": round(extra, 1),
        "lost_seconds_total": round(lost, 1),
        "lost_seconds": {row["fault"]: row["lost_seconds"] for row in rows},
        "steps_lost": {row["fault"]: row["steps_lost"] for row in rows},
    }


def read_step_times(path: Path) -> dict[int, float]:
    """{step: time} of the train records of a metrics.jsonl (a line being written is skipped)."""
    times: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if record.get("kind") == "train":
                    times[record["step"]] = record["time"]
    return times


def parse_scontrol(line: str) -> dict[str, str]:
    """One `scontrol show job -o` line -> {key: value}."""
    matches = list(re.finditer(r"(?:^|\s)([A-Za-z][\w:/]*)=", line))
    return {match.group(1): line[match.end():(following.start() if following else len(line))].strip()
            for match, following in zip(matches, [*matches[1:], None])}


# ----------------------------------------------------------------------------- the cluster and the jobs

def _slurm(*args: str, timeout: float = 30, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


@contextlib.contextmanager
def dev_cluster(nodes: int = 2) -> Iterator[list[int]]:
    """The dev cluster of RKAN_SLURM_DIR with `nodes` nodes, SLURM_CONF pointing at it inside the
    block; yields the list the bench adds its job ids to.

    A cluster the bench started is stopped when the block ends, also on an error, Ctrl-C or SIGTERM.
    One it found running (slurm/dev-cluster/status.sh) is someone else's: it keeps running, and only
    the bench's own jobs are cancelled (start.sh restarts one of another node count with `nodes`)."""
    found = subprocess.run([str(DEV_CLUSTER / "status.sh")], capture_output=True, text=True, timeout=60)
    ours = found.returncode != 0
    previous_conf = os.environ.get("SLURM_CONF")
    # A killed bench (SIGTERM) takes the same way out as Ctrl-C, so a cluster it started never outlives it.
    previous_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    jobs: list[int] = []
    try:
        started = subprocess.run([str(DEV_CLUSTER / "start.sh"), "--nodes", str(nodes)], capture_output=True,
                                 text=True, timeout=180)
        if started.returncode != 0:
            raise RuntimeError(f"slurm/dev-cluster/start.sh failed:\n{started.stderr[-3000:]}")
        print(f"  dev cluster: {'started; stopped at the end' if ours else found.stdout.strip() + '; left running'}",
              flush=True)
        os.environ["SLURM_CONF"] = started.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
        yield jobs
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        if ours:
            stopped = subprocess.run([str(DEV_CLUSTER / "stop.sh")], capture_output=True, text=True, timeout=180)
        elif jobs:
            _slurm("scancel", *map(str, jobs), check=False)
        if previous_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous_conf
        if ours and stopped.returncode != 0:
            raise RuntimeError(f"slurm/dev-cluster/stop.sh failed; the cluster may still run:\n{stopped.stderr[-3000:]}")


def wait_for_empty_queue(timeout_s: float) -> None:
    """Other jobs share the two cores and the nodes: start only when the queue is empty."""
    deadline = time.monotonic() + timeout_s
    while (jobs := _slurm("squeue", "-h", "-o", "%i %u %j %T").strip()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the dev cluster still runs other jobs after {timeout_s:.0f} s:\n{jobs}")
        time.sleep(5)


def job_state(job_id: int) -> dict[str, str]:
    lines = [line for line in _slurm("scontrol", "show", "job", "-o", str(job_id), timeout=15).splitlines()
             if line.strip()]
    return parse_scontrol(lines[0]) if lines else {}


def job_logs(run_dir: Path, job_id: int, chars: int = 2500) -> str:
    logs = sorted((run_dir / "slurm" / str(job_id)).glob(f"{job_id}_*_log.*"))
    return "\n".join(f"--- {log} ---\n{log.read_text(errors='replace')[-chars:]}" for log in logs)


def wait_until(condition: Callable[[], object], timeout: float, what: str, poll: float = 0.25, job: tuple | None = None):
    """Poll `condition`; a job (run_dir, job_id) that ends in the meantime, or the timeout, raises."""
    deadline = time.monotonic() + timeout
    asked = time.monotonic()
    while True:
        value = condition()
        if value:
            return value
        if job is not None and time.monotonic() - asked > 2 and job_state(job[1]).get("JobState") in FINISHED:
            value = condition()
            if value:
                return value
            raise RuntimeError(f"job {job[1]} ended while waiting for {what}: {job_state(job[1])}\n{job_logs(*job)}")
        if job is not None and time.monotonic() - asked > 2:
            asked = time.monotonic()  # scontrol every 2 s at most: the machine has two cores
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}"
                               + (f"\n{job_logs(*job)}" if job else ""))
        time.sleep(poll)


def overrides(run_dir: Path, cache: Path, steps: int, every: int) -> list[str]:
    return [f"train.run_dir={run_dir}", f"data.cache_dir={cache}", f"train.max_steps={steps}",
            f"checkpoint.every_steps={every}", "checkpoint.at_epoch_end=false", "checkpoint.keep=3",
            "data.batch_size=16", "data.num_workers=1", "logging.progress_bar=false", "logging.every_steps=1",
            "train.eval_every=1000", "train.precision=fp32", f"parallel.hang_timeout_s={HANG_TIMEOUT_S}"]


def submit_job(run_dir: Path, cache: Path, steps: int, every: int, jobs: list[int],
               resources: list[str] = RESOURCES, extra: tuple[str, ...] = CLASSIC) -> int:
    """Submit the demo job for `run_dir`; its id goes to `jobs` too (dev_cluster's list)."""
    from rkan_dist import submit

    args = submit.build_parser().parse_args(["--config", str(DEMO), *resources,
                                             *overrides(run_dir, cache, steps, every), *extra])
    saved = os.environ.pop("OMP_NUM_THREADS", None)  # `make bench` sets 2: the tasks get their own from Slurm
    try:
        (job,) = submit.submit(submit.prepare(args))
    finally:
        if saved is not None:
            os.environ["OMP_NUM_THREADS"] = saved
    jobs.append(int(job.job_id))
    return int(job.job_id)


def ledger(run_dir: Path) -> list[dict]:
    path = run_dir / "events.json"
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return json.loads(path.read_text())["events"]
    return []


def task_pid(folder: Path, rank: int, restart: int | None = None, array_task: int | None = None) -> int | None:
    """Pid of the training process of Slurm task `rank` whose command line names `folder` (a run
    folder, or a grid's submitit folder), from /proc: only the one of the job's run `restart`
    (SLURM_RESTART_COUNT) or of array element `array_task` (SLURM_ARRAY_TASK_ID) when given.
    The one /proc scan of the bench and the Slurm tests."""
    wanted = {"SLURM_PROCID": str(rank)}
    if array_task is not None:
        wanted["SLURM_ARRAY_TASK_ID"] = str(array_task)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            # submitit's tasks run rkan_dist.task_start, the sbatch template's rkan_dist.slurm_task.
            if str(folder) not in cmdline or not ("rkan_dist.task_start" in cmdline or "rkan_dist.slurm_task" in cmdline):
                continue
            if not Path(cmdline.split()[0]).name.startswith("python"):  # srun's command line names them too
                continue
            env = dict(item.split("=", 1) for item in (proc / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in item)
            if all(env.get(key) == value for key, value in wanted.items()) and (
                    restart is None or env.get("SLURM_RESTART_COUNT", "0") == str(restart)):
                return int(proc.name)
    return None


def wait_completed(run_dir: Path, job_id: int, timeout: float) -> float:
    """Poll until COMPLETED; returns when it was seen. Any other end raises with the logs."""
    deadline = time.monotonic() + timeout
    while True:
        record = job_state(job_id)
        state = record.get("JobState", "")
        if state == "COMPLETED":
            return time.time()
        if state in FINISHED or time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} {state or 'unknown'} (restarts {record.get('Restarts')}), "
                               f"not COMPLETED\n{job_logs(run_dir, job_id)}")
        time.sleep(0.5)


def uninterrupted(run_dir: Path, cache: Path, steps: int, every: int, timeout: float, jobs: list[int]) -> dict:
    submitted = time.time()
    job_id = submit_job(run_dir, cache, steps, every, jobs)
    wall = wait_completed(run_dir, job_id, timeout) - submitted
    return {"job_id": job_id, "wall_s": wall, "events": ledger(run_dir)}


def faulted(run_dir: Path, cache: Path, steps: int, every: int, timeout: float, skip_hang: bool,
            jobs: list[int]) -> dict:
    targets = plan(steps, every)
    kinds = [kind for kind in FAULTS if not (skip_hang and kind == "hang")]
    submitted = time.time()
    job_id = submit_job(run_dir, cache, steps, every, jobs)
    job = (run_dir, job_id)
    injections = []
    for restart, kind in enumerate(kinds):
        target = targets[kind]
        # This run is up (its start event is in the ledger) and has trained past its fault's step.
        wait_until(lambda r=restart, t=target: len([e for e in ledger(run_dir) if e["event"] == "start"]) > r
                   and max(read_step_times(run_dir / "metrics.jsonl"), default=0) >= t,
                   timeout, f"run {restart} to pass step {target}", job=job)
        step = max(read_step_times(run_dir / "metrics.jsonl"))
        if kind == "preemption":
            sent = time.time()
            _slurm("scancel", "--signal=USR2", str(job_id))
        else:
            pid = wait_until(lambda r=restart: task_pid(run_dir, 1, r), 30, f"rank 1's process in run {restart}", job=job)
            sent = time.time()
            os.kill(pid, signal.SIGKILL if kind == "crash" else signal.SIGSTOP)  # a stopped rank is left stopped
        print(f"  {kind}: injected at step {step}, {sent - submitted:.0f} s after submission", flush=True)
        limit = timeout if kind != "hang" else 3 * HANG_TIMEOUT_S + 120
        seen_pid = wait_until(lambda r=restart: task_pid(run_dir, 0, r + 1), limit,
                              f"the run after the {kind} (restart {restart + 1})", poll=0.1, job=job)
        injections.append({"kind": kind, "time": sent, "step": step, "task_seen": time.time(), "pid": seen_pid})
    end = wait_completed(run_dir, job_id, timeout)
    return {"job_id": job_id, "wall_s": end - submitted, "events": ledger(run_dir), "injections": injections,
            "restarts": int(job_state(job_id).get("Restarts", "0") or 0),
            "hang_dumps": sorted(str(path.relative_to(run_dir)) for path in run_dir.glob("hangs/*/rank*.txt"))}


def node_loss(folder: Path, cache: Path, steps: int, every: int, timeout: float, jobs: list[int]) -> dict:
    """A 3-node job uninterrupted, then the same job losing node n3 (its slurmd and its task killed,
    slurm/dev-cluster/node.sh) half an interval past a checkpoint, with slurm.min_nodes=2.

    detected_s: the kill -> the failure in the ledger (after-srun's record, blaming n3);
    restart_s: -> the restarted run's start event; down_s: -> its first step. `shrank`: the restarted
    run had fewer ranks; `excluded`: the nodes the ledger's evict events excluded. Its weights are not
    compared with the uninterrupted run's: on 2 ranks of 24 images each BatchNorm normalises other
    batches than on 3 of 16, so a shrunk run is a different (equally valid) run."""
    target = every + every // 2
    plain_dir, lost_dir = folder / "node_loss_uninterrupted", folder / "node_loss"
    submitted = time.time()
    job_id = submit_job(plain_dir, cache, steps, every, jobs, NODE_LOSS_RESOURCES, NODE_LOSS)
    plain_wall = wait_completed(plain_dir, job_id, timeout) - submitted
    print(f"  node loss: uninterrupted 3-node run {plain_wall:.1f} s (job {job_id})", flush=True)
    submitted = time.time()
    job_id = submit_job(lost_dir, cache, steps, every, jobs, NODE_LOSS_RESOURCES, NODE_LOSS)
    job = (lost_dir, job_id)
    wait_until(lambda: max(read_step_times(lost_dir / "metrics.jsonl"), default=0) >= target, timeout,
               f"the 3-node run to pass step {target}", job=job)
    step = max(read_step_times(lost_dir / "metrics.jsonl"))
    sent = time.time()
    _slurm(str(DEV_CLUSTER / "node.sh"), "kill", LOST_NODE, timeout=120)
    print(f"  node loss: {LOST_NODE} killed at step {step}", flush=True)
    try:
        end = wait_completed(lost_dir, job_id, timeout)
        nodes_after = job_state(job_id).get("NodeList")
    finally:
        _slurm(str(DEV_CLUSTER / "node.sh"), "revive", LOST_NODE, timeout=120, check=False)
    events = ledger(lost_dir)
    failure = _after(events, sent, "failure")
    start = _after(events, sent, "start")
    restart = _after(events, sent, "restart")
    first = read_step_times(lost_dir / "metrics.jsonl").get(start["step"] + 1) if start else None
    starts = [event for event in events if event["event"] == "start"]
    return {
        "node_loss_uninterrupted_wall_s": round(plain_wall, 2),
        "node_loss_wall_s": round(end - submitted, 2),
        "node_loss_goodput": round(goodput(plain_wall, end - submitted), 4),
        "node_loss_at_step": step,
        "node_loss_blamed_node": failure and failure.get("node"),
        "node_loss_detected_s": round(failure["time"] - sent, 3) if failure else None,
        "node_loss_restart_s": round(start["time"] - sent, 3) if start else None,
        "node_loss_down_s": round(first - sent, 3) if first else None,
        "node_loss_steps_lost": restart and restart.get("steps_lost"),
        "node_loss_lost_seconds": restart and restart.get("lost_seconds"),
        "node_loss_world_sizes": [event.get("world_size") for event in starts],
        "node_loss_shrank": len(starts) > 1 and starts[-1].get("world_size", 0) < starts[0].get("world_size", 0),
        "node_loss_excluded": sorted({event["node"] for event in events if event["event"] == "evict"
                                      and not event.get("skipped")}),
        "node_loss_nodes_after": nodes_after,
    }


def bitwise_equal(first: Path, second: Path) -> bool:
    import torch

    from rkan_dist.weights import load_model_state

    a, b = load_model_state(first), load_model_state(second)
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def checkpoint_load(path: Path) -> dict:
    """Size and load time of one checkpoint folder (model and optimizer state, as a restart reads it)."""
    import torch

    files = [item for item in path.rglob("*.pt")]
    size = sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    started = time.perf_counter()
    for item in files:
        torch.load(item, map_location="cpu", weights_only=False)
    return {"fault_checkpoint_mb": round(size / 1e6, 1), "fault_checkpoint_load_s": round(time.perf_counter() - started, 3)}


def run(quick: bool, skip_hang: bool = False, keep: Path | None = None, skip_node_loss: bool = False) -> dict:
    import torch

    from rkan_dist.data.demo import ensure_digits

    if shutil.which("slurmctld") is None and shutil.which("slurmctld", path="/usr/sbin:/sbin") is None:
        print("skipped: Slurm is not installed (make test installs slurm-wlm, slurm-client and munge)")
        return {"skipped": "no Slurm"}
    steps, every = (240, 20) if quick else (480, 40)
    folder = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="rkan-bench-faults-"))
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    try:
        cache = folder / "cache"
        ensure_digits(cache)  # written once, outside both clocks
        timeout = 900
        # The folder goes only after the cluster has stopped or cancelled the jobs writing into it.
        # Three nodes: the node-loss case needs them; the 2-node jobs leave the third idle.
        with dev_cluster(nodes=3) as jobs:
            wait_for_empty_queue(600)
            print(f"  uninterrupted: {steps} steps, checkpoint every {every}", flush=True)
            plain = uninterrupted(folder / "uninterrupted", cache, steps, every, timeout, jobs)
            print(f"  uninterrupted: {plain['wall_s']:.1f} s (job {plain['job_id']})", flush=True)
            hurt = faulted(folder / "faulted", cache, steps, every, timeout, skip_hang, jobs)
            print(f"  faulted: {hurt['wall_s']:.1f} s (job {hurt['job_id']}, {hurt['restarts']} restarts)",
                  flush=True)
            lost_node = {} if skip_node_loss else node_loss(folder, cache, steps, every, timeout, jobs)
        rows = fault_breakdown(hurt["events"], read_step_times(folder / "faulted" / "metrics.jsonl"),
                               hurt["injections"])
        final = f"checkpoints/step-{steps}"
        same = bitwise_equal(folder / "uninterrupted" / final, folder / "faulted" / final)
        load = checkpoint_load(folder / "faulted" / final)
        plain_steps = read_step_times(folder / "uninterrupted" / "metrics.jsonl")
        step_s = (plain_steps[steps] - plain_steps[every]) / (steps - every)
        plain_start = next(e for e in plain["events"] if e["event"] == "start")
        ffcv_first_step_s = plain_steps[1] - plain_start["time"]
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    figures = {
        **summarise(plain["wall_s"], hurt["wall_s"], rows),
        "bitwise_equal": same,
        "cases": rows,
        "faults": [row["fault"] for row in rows],
        "hang_skipped": skip_hang,
        "hang_timeout_s": HANG_TIMEOUT_S,
        "hang_dumps": len(hurt["hang_dumps"]),
        "fault_restarts": hurt["restarts"],
        "fault_run_steps": steps,
        "checkpoint_every_steps": every,
        "fault_run_step_s": round(step_s, 4),
        "first_start_to_first_step_s": round(ffcv_first_step_s, 2),
        **load,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fault_run_tasks": 2,
        "quick": quick,
        **lost_node,
    }
    print(f"\n{'fault':<11}{'at step':>8}{'lost s':>8}{'steps lost':>11}{'detect s':>9}{'requeue s':>10}"
          f"{'task start s':>13}{'ffcv+step s':>12}{'down s':>8}")
    for row in rows:
        cells = [row[key] for key in ("at_step", "lost_seconds", "steps_lost", "detected_s", "requeue_s",
                                      "task_start_s", "ffcv_first_step_s", "down_s")]
        print(f"{row['fault']:<11}" + "".join(f"{'-' if c is None else c:>{w}}" for c, w in
                                           zip(cells, (8, 8, 11, 9, 10, 13, 12, 8))))
    print(f"demo on the dev cluster (2 nodes x 1 CPU task, {steps} steps, checkpoint every {every}, "
          f"{figures['cpu_capability']}): uninterrupted {figures['uninterrupted_wall_s']:.1f} s, with "
          f"{' + '.join(figures['faults'])} {figures['faulted_wall_s']:.1f} s: goodput {figures['fault_goodput']:.3f}; "
          f"lost seconds by the ledger {figures['lost_seconds_total']:.1f} of {figures['extra_wall_s']:.1f} s extra wall; "
          f"final weights bitwise equal: {same}")
    if lost_node:
        print(f"node loss (3 nodes x 1 task, slurm.min_nodes=2, {LOST_NODE} killed at step "
              f"{lost_node['node_loss_at_step']}): blamed {lost_node['node_loss_blamed_node']}, detected in "
              f"{lost_node['node_loss_detected_s']} s, first step after the restart {lost_node['node_loss_down_s']} s "
              f"after the kill, on {lost_node['node_loss_nodes_after']} (world sizes "
              f"{lost_node['node_loss_world_sizes']}, excluded {lost_node['node_loss_excluded']}); uninterrupted "
              f"{lost_node['node_loss_uninterrupted_wall_s']:.1f} s, with the node lost "
              f"{lost_node['node_loss_wall_s']:.1f} s: goodput {lost_node['node_loss_goodput']:.3f}")
    return figures


# ----------------------------------------------------------------------------- docs/SCALING.md's section

def scaling_section(figures: Mapping, checkpoint_mb: float = 217.5, step_ms: float = 53.1) -> str:
    """Markdown: what one fault costs at 64 and 256 GPUs, from the pieces measured here and stated assumptions.

    `checkpoint_mb`: the rkan_resnet50 checkpoint (model + SGD momentum, bench.checkpoint); `step_ms`: the
    plan's step time per GPU (docs/SCALING.md). Lines marked "measured" are this machine's figures."""
    rows = {row["fault"]: row for row in figures.get("cases", [])}

    def measured(kind: str, key: str) -> float:
        value = rows.get(kind, {}).get(key)
        return float(value) if value is not None else math.nan

    requeue = measured("crash", "requeue_s")
    task_start = measured("crash", "task_start_s")
    ffcv = measured("crash", "ffcv_first_step_s")
    load_mb_s = figures.get("fault_checkpoint_mb", math.nan) / max(figures.get("fault_checkpoint_load_s", math.nan), 1e-9)
    gpus = (64, 256)
    steps_per_epoch = {64: 156, 256: 39}  # 1,281,167 images / (128 per GPU x N), as in the plan above
    # Estimates per piece, seconds (assumptions in the notes below).
    scheduling = 60.0  # requeue + the scheduler placing the job again on healthy nodes (spare nodes in the partition)
    imports = 20.0     # Python + torch imports of N processes from a shared-FS venv or container layer
    rendezvous = {64: 2.0, 256: 5.0}  # TCPStore (libuv) at N ranks + NCCL communicator init
    fs_gb_s = 20.0     # aggregate parallel-FS read bandwidth the job gets
    ffcv_start = max(ffcv, 10.0) if not math.isnan(ffcv) else 10.0  # ImageNet pipelines compile more than the digits'
    detect = measured("crash", "detected_s")
    detect = detect if not math.isnan(detect) else 5.0
    lines = [
        "",
        "## What a fault costs at 64 and 256 GPUs",
        "",
        "From the newest `bench/results/faults/<date>.json` (bench/scaling.py appends it; "
        "`python -m bench.faults --scaling FILE` prints it alone).",
        "",
        f"Measured by `rkan-dist bench faults` (bench/faults.py) on the dev cluster: the demo (2 nodes x 1 CPU task, "
        f"{figures.get('fault_run_steps')} steps, a checkpoint every {figures.get('checkpoint_every_steps')}, "
        f"{figures.get('cpu_capability')}) ran {figures.get('uninterrupted_wall_s')} s uninterrupted and "
        f"{figures.get('faulted_wall_s')} s with {' + '.join(figures.get('faults', []))} injected: goodput "
        f"**{figures.get('fault_goodput')}**, final weights bitwise equal: {figures.get('bitwise_equal')}.",
        "",
        "| piece | measured here (per fault) | 64 GPUs (8 nodes), estimate | 256 GPUs (32 nodes), estimate |",
        "|---|---|---|---|",
        f"| detection: crash | {measured('crash', 'detected_s'):.1f} s (srun ends the step, after-srun records it) "
        f"| ~{detect:.0f} s (same mechanism) | ~{detect:.0f} s |",
        f"| detection: hang | {measured('hang', 'detected_s'):.1f} s (hang_timeout_s={figures.get('hang_timeout_s')}) "
        "| hang_timeout_s (default 600 s on CUDA) | hang_timeout_s (default 600 s on CUDA) |",
        f"| restart: requeue + scheduling | {requeue:.1f} s (one host, nodes free; Slurm holds a requeued job ~10 s) "
        f"| ~{scheduling:.0f} s | ~{scheduling:.0f} s |",
        f"| task start: imports, rendezvous, model, checkpoint load | {task_start:.1f} s "
        f"| ~{imports + rendezvous[64] + checkpoint_mb / 1e3 * 8 / fs_gb_s + checkpoint_mb / load_mb_s:.0f} s "
        f"| ~{imports + rendezvous[256] + checkpoint_mb / 1e3 * 32 / fs_gb_s + checkpoint_mb / load_mb_s:.0f} s |",
        f"| - of which rendezvous (TCPStore, gloo here; + NCCL init on GPUs) | part of the above | "
        f"~{rendezvous[64]:.0f} s | ~{rendezvous[256]:.0f} s |",
        f"| - of which checkpoint load ({checkpoint_mb:.0f} MB rkan_resnet50, every rank reads it) "
        f"| {figures.get('fault_checkpoint_mb')} MB in {figures.get('fault_checkpoint_load_s')} s ({load_mb_s:.0f} MB/s) "
        f"| {checkpoint_mb * 8 / 1e3:.1f} GB from the FS: ~{checkpoint_mb / 1e3 * 8 / fs_gb_s + checkpoint_mb / load_mb_s:.1f} s "
        f"| {checkpoint_mb * 32 / 1e3:.1f} GB from the FS: ~{checkpoint_mb / 1e3 * 32 / fs_gb_s + checkpoint_mb / load_mb_s:.1f} s |",
        f"| FFCV start + first step | {ffcv:.1f} s | ~{ffcv_start:.0f} s | ~{ffcv_start:.0f} s |",
    ]
    half = {n: steps_per_epoch[n] / 2 * step_ms / 1e3 for n in gpus}
    lines.append(f"| steps lost (half a checkpoint interval on average) | {measured('crash', 'steps_lost'):.0f} and "
                 f"{measured('hang', 'steps_lost'):.0f} steps (crash, hang) | {steps_per_epoch[64] // 2} steps = "
                 f"{half[64]:.1f} s | {steps_per_epoch[256] // 2} steps = {half[256]:.1f} s |")
    fixed = {n: scheduling + imports + rendezvous[n] + checkpoint_mb / 1e3 * (n // 8) / fs_gb_s
             + checkpoint_mb / load_mb_s + ffcv_start for n in gpus}
    lines.append(f"| **per crash** | {measured('crash', 'down_s'):.0f} s down, {measured('crash', 'lost_seconds'):.0f} s "
                 f"lost (ledger) | **~{detect + fixed[64] + half[64]:.0f} s** | **~{detect + fixed[256] + half[256]:.0f} s** |")
    lines.append(f"| **per hang** | {measured('hang', 'down_s'):.0f} s down, {measured('hang', 'lost_seconds'):.0f} s "
                 f"lost (ledger) | **~{600 + fixed[64] + half[64]:.0f} s** (600 s timeout) "
                 f"| **~{600 + fixed[256] + half[256]:.0f} s** (600 s timeout) |")
    lines.append(f"| **per preemption** | {measured('preemption', 'down_s'):.0f} s down, "
                 f"{measured('preemption', 'lost_seconds'):.0f} s signal to restart | **~{fixed[64]:.0f} s** + the wait "
                 f"for nodes | **~{fixed[256]:.0f} s** + the wait for nodes |")
    lines += [
        "",
        "Notes (the estimates and what they assume):",
        "",
        "- Measured here: one machine, both nodes on it, the job's nodes free when it is requeued; the pieces come "
        "from the ledger's failure/stop, start and restart events, the time the requeued task's process appeared, "
        "and the first step in metrics.jsonl, with other work sharing the two cores (one run each: noisy). The ledger's lost "
        f"seconds ({figures.get('lost_seconds_total')} s in all) count from the last checkpoint, so they include the "
        f"steps redone; the faulted job's extra wall was {figures.get('extra_wall_s')} s. The checkpoint load is "
        f"rkan_resnet18's {figures.get('fault_checkpoint_mb')} MB read back from the page cache (a restart on "
        "the same host reads it so too).",
        f"- Restart: Slurm's requeue of the same job (no resubmission); ~{scheduling:.0f} s assumes spare healthy "
        "nodes in the partition and the job at the head of the queue. A faulty node must first be drained "
        "(HealthCheckProgram, or `slurm.exclude`); without spares the job waits for nodes - unbounded, and the "
        "dominant cost in practice.",
        f"- Task start: ~{imports:.0f} s of imports assumes the venv on a shared FS or a container image (N processes "
        "importing torch at once); rendezvous assumes torch's libuv TCPStore on rank 0 (one connection per rank) "
        "plus NCCL communicator init over InfiniBand, a few seconds at these sizes.",
        f"- Checkpoint load: every DDP rank reads the whole {checkpoint_mb:.0f} MB checkpoint (model + SGD momentum, "
        f"bench.checkpoint); the 8 ranks of a node share the page cache, so the FS serves one copy per node "
        f"({checkpoint_mb * 8 / 1e3:.1f} / {checkpoint_mb * 32 / 1e3:.1f} GB) at an assumed {fs_gb_s:.0f} GB/s "
        "aggregate, plus deserialising at the rate measured here.",
        "- FFCV start: each process compiles its pipeline (numba) on its own cores, so it does not grow with N; the "
        f"{ffcv:.0f} s measured here (start event to first step, the digits' 16 px pipeline) is raised to "
        f"~{ffcv_start:.0f} s for ImageNet's JPEG decode and RandomResizedCrop pipelines.",
        f"- Steps lost: a checkpoint per epoch ({steps_per_epoch[64]} / {steps_per_epoch[256]} steps of {step_ms} ms, "
        "the plan above): half an epoch on average; each save stalls training ~0.9 steps (bench.checkpoint), 0.6% / "
        "2.2% of an epoch. The hang dominates everything: its cost is hang_timeout_s, which must exceed the longest "
        "legitimate pause (a first step under torch.compile, a save, an eval); 300 s would halve it.",
        "- How often: the Llama 3 report's 419 interruptions in 54 days on 16k GPUs are ~2e-5 per GPU-hour, i.e. one "
        "fault per ~800 h of a 64-GPU job and per ~200 h at 256 GPUs: a 100-epoch run (0.2 / 0.1 h) rarely meets "
        "one, and when it does it costs the minutes above, not a restart by hand.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="240 steps, a checkpoint every 20 (the hang still "
                        "takes hang_timeout_s=60 to detect)")
    parser.add_argument("--skip-hang", action="store_true", help="inject only the crash and the preemption")
    parser.add_argument("--skip-node-loss", action="store_true", help="leave out the 3-node job that loses a node")
    parser.add_argument("--keep", type=Path, help="run the jobs in this folder and keep it (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--scaling", type=Path, metavar="FIGURES_JSON",
                        help="print docs/SCALING.md's faults section from saved figures; run nothing")
    args = parser.parse_args(argv)
    if args.scaling:
        print(scaling_section(json.loads(args.scaling.read_text())), end="")
        return 0
    result = run(args.quick, skip_hang=args.skip_hang, keep=args.keep, skip_node_loss=args.skip_node_loss)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
