"""Hang detection: a rank that finishes no step or collective for `parallel.hang_timeout_s` is hung.

Every rank runs one `HangWatchdog`, a daemon thread. The training thread only stores a step and a
time when a collective or a step finishes (`progress`), and what it is about to wait in
(`waiting`); the thread does all the file work: every `interval` seconds it writes the rank's
heartbeat `<run_dir>/heartbeats/rank<R>.json`, and checks whether the rank's own progress is older
than the timeout or whether another rank already declared a hang of this attempt.

On expiry, before anything is killed:

1. the culprit is chosen from the heartbeats (`choose_culprit`): a rank whose heartbeat is stale (its
   process is stopped or dead: the thread would otherwise beat) or missing, else a rank that is not
   waiting in a collective while others are, else the one behind in steps, else "unknown";
2. the ranks agree on one folder `<run_dir>/hangs/<UTC time>` (`agree_on_folder`): the earliest
   folder of this attempt (named after the arming time), created by whichever rank fired first;
3. each rank writes its Python stacks to `rank<R>.txt`; a rank that sees the folder before its own
   timeout expires joins in, so every reachable rank is dumped, the slow one included;
4. it logs one ERROR line and records one `hang` failure in the ledger (`record_failure_once`: N
   ranks, one event) - before anything that can block: a hang that is recorded gets its restart;
5. it gathers the diagnostics that can block (on CUDA the NCCL flight recorder's dump, when this
   torch has one: it waits on NCCL and the driver, and a wedged driver never returns) for
   `dump_timeout_s` at most, as PyTorch bounds its own dump; should the dump hold the GIL so that
   Python cannot act on that limit, faulthandler's C thread ends the process (exit 1) at twice it;
6. it waits (a few intervals at most) for the other live ranks' dumps, SIGKILLs the culprit when it
   is a stopped process on this host, and exits 1 - the crash path: under
   `rkan-dist train --nproc N` the parent (rkan_dist.supervisor) finds the pending failure in
   the ledger and restarts the run from its latest valid checkpoint; under Slurm srun ends the step
   (--kill-on-bad-exit) and the batch script's after-srun (rkan_dist.after_srun) requeues the job.

Start-up and rendezvous are not watched (the thread is armed when training starts): the process
group's collective timeout, twice the hang timeout and at least 10 minutes (`collective_timeout_s`),
is their bound, and the backstop should the watchdog itself not act.

The heartbeat also carries the rank's compute time per step (`ComputeTimer`: the model's forward,
apart from every collective) in windows of steps, from which rank 0's thread scores the ranks
against each other (rkan_dist.stragglers): TensorBoard's ranks/slowest_score and ranks/slowest_rank,
and one "straggler" event in the ledger per persistently slow rank and attempt. With
`parallel.hang_timeout_s: 0` the thread still beats (every 30 s) and scores, but never declares a
hang: turning hang detection off keeps `rkan-dist status` and the straggler scores.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rkan_dist.nodes import this_node
from rkan_dist.stragglers import (
    WINDOW_STEPS,
    beat_windows,
    persistent_stragglers,
    slowest,
    window_end,
    window_median,
)

log = logging.getLogger(__name__)

DEFAULT_HANG_TIMEOUT_S = {"cuda": 600.0, "cpu": 1800.0}  # 1800: gloo's default collective timeout
OFF_COLLECTIVE_TIMEOUT_S = 1800.0  # the process group's timeout when hang detection is off
MIN_COLLECTIVE_TIMEOUT_S = 600.0  # start-up is bounded by it alone (see collective_timeout_s)
STALE_INTERVALS = 3  # a heartbeat older than this many intervals: its process is stopped or dead
DUMP_TIMEOUT_S = 60.0  # the diagnostics that can block (the NCCL flight recorder) get this long
# A heartbeat carries the compute windows of its last CARRY_INTERVALS intervals (at least the last
# CARRY_WINDOWS, at most MAX_WINDOWS): beats written up to an interval apart then share windows to compare.
CARRY_INTERVALS, CARRY_WINDOWS, MAX_WINDOWS = 4, 4, 256
SLOW_RANK_ENV = "RKAN_TEST_SLOW_RANK"  # test only: see slow_rank_delay
HEARTBEATS = "heartbeats"
HANGS = "hangs"
_NAME_FORMAT = "%Y%m%dT%H%M%S"


# ----------------------------------------------------------------------------- pure helpers

def hang_timeout_for(configured: float | None, device_type: str) -> float:
    """The hang timeout in seconds (0 = off): the configured one, or the device's default."""
    if configured is None:
        return DEFAULT_HANG_TIMEOUT_S["cuda" if device_type == "cuda" else "cpu"]
    return float(configured)


def collective_timeout_s(configured: float | None, device_type: str) -> float:
    """The process group's timeout: twice the hang timeout, so that the watchdog always acts first
    (stacks, ledger, restart) and a collective's own timeout is only the backstop; 30 minutes when off.

    At least 10 minutes: it is also the only bound on what the watchdog does not watch (rendezvous,
    building the loaders and engine, loading a checkpoint from a cold file system), which a small
    hang timeout, chosen for the steps, must not cut short."""
    timeout = hang_timeout_for(configured, device_type)
    return max(2 * timeout, MIN_COLLECTIVE_TIMEOUT_S) if timeout > 0 else OFF_COLLECTIVE_TIMEOUT_S


MAX_BEAT_INTERVAL_S = 30.0


def beat_interval(timeout: float) -> float:
    """How often a rank writes its heartbeat and checks: timeout / 20, within [1, 30] s; 30 s when hang
    detection is off (0: the heartbeat then serves only status and the straggler scores)."""
    if timeout <= 0:
        return MAX_BEAT_INTERVAL_S
    return min(max(timeout / 20, 1.0), MAX_BEAT_INTERVAL_S)


def folder_name(wall_time: float) -> str:
    """'20261130T211232.123Z': sorts as it happened."""
    stamp = datetime.datetime.fromtimestamp(wall_time, datetime.timezone.utc)
    return f"{stamp.strftime(_NAME_FORMAT)}.{stamp.microsecond // 1000:03d}Z"


def folder_time(name: str) -> float | None:
    """The wall time a hang folder is named after; None for anything else."""
    try:
        stamp = datetime.datetime.strptime(name[:-1], _NAME_FORMAT + ".%f") if name.endswith("Z") else None
    except ValueError:
        return None
    return stamp.replace(tzinfo=datetime.timezone.utc).timestamp() if stamp else None


def hang_folders(hangs_dir: Path, since: float) -> list[Path]:
    """This attempt's hang folders (named at or after `since`), earliest first."""
    try:
        names = os.listdir(hangs_dir)
    except OSError:
        return []
    found = [(folder_time(name), name) for name in names]
    return [hangs_dir / name for at, name in sorted(found) if at is not None and at >= since - 1e-3]


def agree_on_folder(hangs_dir: Path, since: float, settle_s: float, now: Callable[[], float] = time.time,
                    sleep: Callable[[float], None] = time.sleep) -> Path:
    """The folder every rank of this attempt (armed at `since`) dumps into.

    The earliest folder named at or after `since`: a rank that finds none creates one named now,
    then every rank waits `settle_s` (two ranks creating at once, a shared file system showing a
    new folder late) and takes the earliest it sees; a creator whose folder lost removes it."""
    created = None
    if not hang_folders(hangs_dir, since):
        created = hangs_dir / folder_name(max(now(), since))
        created.mkdir(parents=True, exist_ok=True)
    sleep(settle_s)
    chosen = hang_folders(hangs_dir, since)[0]
    if created is not None and created != chosen:
        with contextlib.suppress(OSError):  # not empty: a rank that saw it first wrote there anyway
            created.rmdir()
    return chosen


def read_heartbeats(heartbeats_dir: Path) -> dict[int, dict[str, Any]]:
    beats = {}
    with contextlib.suppress(OSError):
        for path in heartbeats_dir.glob("rank*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                beat = json.loads(path.read_text())
                beats[int(beat["rank"])] = beat
    return beats


def beat_progress(beat: Mapping[str, Any]) -> tuple[float, float]:
    """(step, wall time of the last progress) a heartbeat reports; step -1 before the first is known."""
    step = beat.get("step")
    return float(step if step is not None else -1), float(beat.get("progress_time") or 0.0)


def beat_is_stale(beat: Mapping[str, Any], now: float, stale_after: float | None = None) -> bool:
    """Whether a heartbeat went stale: older than `stale_after` seconds, by default STALE_INTERVALS
    of the interval it was written at (the longest there is, if it does not say). Its watchdog
    thread would otherwise have renewed it, so its process is stopped or dead."""
    if stale_after is None:
        stale_after = STALE_INTERVALS * float(beat.get("interval") or MAX_BEAT_INTERVAL_S)
    return now - float(beat.get("beat_time") or 0.0) > stale_after


def choose_culprit(beats: Mapping[int, Mapping[str, Any]], world_size: int, now: float,
                   stale_after: float) -> int | None:
    """The rank that stopped progressing, from the heartbeats (rank -> heartbeat), or None if unknown.

    1. A rank whose heartbeat is missing or older than `stale_after` (its process is stopped, dead
       or never started training: its watchdog thread would otherwise write it), the one with the
       least progress among them;
    2. else a rank computing or loading (`waiting` null) while another waits in a collective for it;
    3. else the one rank behind in steps; else None.
    """
    ranks = range(world_size)

    def behind(rank: int) -> tuple[float, float]:
        beat = beats.get(rank)
        return (-1.0, -1.0) if beat is None else beat_progress(beat)

    silent = [rank for rank in ranks if rank not in beats or beat_is_stale(beats[rank], now, stale_after)]
    if silent:
        return min(silent, key=lambda rank: (behind(rank), rank))
    computing = [rank for rank in ranks if not beats[rank].get("waiting")]
    if computing and len(computing) < world_size:
        return min(computing, key=lambda rank: (behind(rank), rank))
    steps = {rank: behind(rank)[0] for rank in ranks}
    least = min(steps.values(), default=None)
    laggards = [rank for rank, step in steps.items() if step == least]
    return laggards[0] if len(laggards) == 1 and world_size > 1 else None


def process_start_ticks(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (/proc/<pid>/stat field 22), to tell it from a
    later process that reused its pid; None without /proc."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    return None


def process_state(pid: int) -> str | None:
    """'R', 'S', 'T' (stopped), ... from /proc/<pid>/stat; None when gone or without /proc."""
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2]
    return None


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- compute time

def slow_rank_delay(rank: int, env: Mapping[str, str] = os.environ) -> float:
    """Test only: with RKAN_TEST_SLOW_RANK=R:S, rank R sleeps S seconds in each training forward, inside
    the timed compute region, so that a test can make one rank a straggler; 0 for every other rank,
    and when unset. On CUDA the GPU sits idle through the sleep (each micro-batch's flags all-reduce
    drains its queue), so the events time it too."""
    value = env.get(SLOW_RANK_ENV, "").strip()
    if not value:
        return 0.0
    try:
        target, seconds = value.split(":")
        return float(seconds) if int(target) == rank else 0.0
    except ValueError:
        raise ValueError(f"{SLOW_RANK_ENV}={value!r}: expected RANK:SECONDS (a test-only setting)") from None


class ComputeTimer:
    """Times one rank's training forward passes apart from every collective, and keeps the median
    compute time per step of its recent windows (rkan_dist.stragglers: WINDOW_STEPS steps each).

    The timed region is the plain model's forward (`engine.module`, between a forward pre-hook and a
    forward hook), in training only. Not the engine's wrapper around it: DDP's forward first broadcasts
    rank 0's buffers (broadcast_buffers: BatchNorm's running statistics), a collective whose wait
    depends on when rank 0 arrives (rank 0 alone writes metrics and checkpoints), and DeepSpeed's keeps
    its own books. Not backward: DDP and DeepSpeed reduce gradient buckets while it runs. Not the
    loss: microseconds beside the forward, and outside the module. A forward with SyncBatchNorm
    all-reduces inside the model, so with parallel.sync_bn nothing is timed (see HangWatch.arm). One
    collective does sit inside the model: on CUDA the KAN convolution's dispatcher broadcasts rank 0's
    choice the first time a layer meets a new input shape (rkan_dist.models.kan_conv), a step or two
    per resolution, which a window's median leaves out.

    The hooks are `torch.compiler.disable`d, so a compiled model runs them as they are (one graph break
    at each end of the forward). On CUDA each forward records two events on the current stream, read
    at a later forward once `query()` says they finished (the flags' all-reduce after backward has
    synchronised the host with the GPU by then): the step path never waits for the GPU. On the CPU it
    reads perf_counter. A step's time is the sum over its micro-batches. Everything runs in the
    training thread, a few microseconds per forward; the watchdog thread only reads `windows`, a tuple
    replaced whole once per window."""

    def __init__(self, device_type: str = "cpu", delay_s: float = 0.0, window_steps: int = WINDOW_STEPS,
                 clock: Callable[[], float] = time.monotonic):
        self.cuda = device_type == "cuda"
        self.delay_s, self.window_steps, self._clock = delay_s, window_steps, clock
        self.completed = 0  # optimizer steps completed: a forward belongs to step completed + 1
        self.windows: tuple[tuple[int, float, float], ...] = ()  # (end step, median s, clock time), oldest first
        self._open: tuple[int, Any] | None = None  # (step, start event or perf_counter) of the forward running
        self._pending: list[tuple[int, Any, Any]] = []  # CUDA: (step, start, end) not read yet
        self._step: int | None = None  # the step whose micro-batches are being summed
        self._step_seconds = 0.0
        self._window: list[float] = []  # per-step seconds of the window in progress
        self._handles: list[Any] = []

    def attach(self, module: Any) -> ComputeTimer:
        import torch

        self._grad_enabled, self._event = torch.is_grad_enabled, torch.cuda.Event
        self._handles = [module.register_forward_pre_hook(torch.compiler.disable(self._before)),
                         module.register_forward_hook(torch.compiler.disable(self._after))]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---------------------------------------------------------------- the training thread's side
    def _before(self, module: Any, args: Any) -> None:
        if not (module.training and self._grad_enabled()):
            return
        if self._pending:
            self._read_finished_events()
        if self.cuda:
            start = self._event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        self._open = (self.completed + 1, start)
        if self.delay_s:
            time.sleep(self.delay_s)  # RKAN_TEST_SLOW_RANK: a slow rank, for tests

    def _after(self, module: Any, args: Any, output: Any) -> None:
        if self._open is None or not (module.training and self._grad_enabled()):
            return
        step, start = self._open
        self._open = None
        if self.cuda:
            end = self._event(enable_timing=True)
            end.record()
            self._pending.append((step, start, end))
            del self._pending[:-64]  # events that never finish (a wedged GPU: the hang watchdog's case)
        else:
            self.add(step, time.perf_counter() - start)

    def _read_finished_events(self) -> None:
        while self._pending and self._pending[0][2].query():
            step, start, end = self._pending.pop(0)
            self.add(step, start.elapsed_time(end) / 1000.0)

    def add(self, step: int, seconds: float) -> None:
        """One micro-batch's forward of `step` took `seconds`; steps come in order."""
        if step != self._step:
            if self._step is not None:
                self._close_step(step)
            self._step, self._step_seconds = step, 0.0
        self._step_seconds += seconds

    def _close_step(self, next_step: int) -> None:
        self._window.append(self._step_seconds)
        end = window_end(self._step, self.window_steps)
        if window_end(next_step, self.window_steps) != end:
            median = window_median(self._window, self.window_steps)
            self._window = []
            if median is not None:
                self.windows = (*self.windows[-(MAX_WINDOWS - 1):], (end, median, self._clock()))

    # ---------------------------------------------------------------- the watchdog thread's side
    def beat_entries(self, span_s: float) -> list[dict[str, Any]]:
        """The heartbeat's "compute" list: the windows that ended in the last `span_s` seconds, at least
        the last CARRY_WINDOWS."""
        windows, since = self.windows, self._clock() - span_s  # one read: the tuple may be replaced meanwhile
        recent = [window for window in windows if window[2] >= since]
        if len(recent) < CARRY_WINDOWS:
            recent = list(windows[-CARRY_WINDOWS:])
        return [{"end_step": end, "median_s": round(median, 6)} for end, median, _ in recent]


# ----------------------------------------------------------------------------- the watchdog

class HangWatchdog:
    """One per rank; `start()` arms it, `progress()` / `waiting()` are all the training thread does.

    `timeout` 0: beats only, never a hang (parallel.hang_timeout_s: 0). `timer`: the rank's
    ComputeTimer, whose windows the heartbeat carries. `straggler_threshold` (rank 0's): after each
    beat the thread scores the ranks' heartbeats (`rank_scores`, for TensorBoard) and records each
    persistent straggler once in the ledger; None scores nothing.
    `interval` defaults to `beat_interval(timeout)`; `exit` is what ends the process after a hang
    (os._exit; tests inject one that returns); `clock` measures the time without progress
    (time.monotonic; tests inject one they advance, so that no test depends on the machine's speed).
    `dumps`: the diagnostics that can block, (file suffix, function writing that file) each, run
    after the hang is recorded for `dump_timeout_s` in all (by default the NCCL flight recorder on
    CUDA, nothing on CPU). The C-level deadline at twice that ends the process as os._exit(1) does,
    so it is armed only when `exit` is os._exit: a test's exit keeps its process."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, world_size: int, timeout: float, *,
                 device_type: str = "cpu", interval: float | None = None,
                 exit: Callable[[int], Any] = os._exit,  # noqa: A002
                 clock: Callable[[], float] = time.monotonic,
                 dumps: Sequence[tuple[str, Callable[[Path], Any]]] | None = None,
                 dump_timeout_s: float = DUMP_TIMEOUT_S, timer: ComputeTimer | None = None,
                 straggler_threshold: float | None = None):
        if timeout < 0:
            raise ValueError(f"a HangWatchdog needs a timeout >= 0 (0: beats only), got {timeout}")
        self.run_dir, self.rank, self.world_size, self.timeout = Path(run_dir), rank, world_size, float(timeout)
        self.device_type = device_type
        self.interval = interval if interval is not None else beat_interval(self.timeout)
        self.heartbeat_path = self.run_dir / HEARTBEATS / f"rank{rank}.json"
        self.hangs_dir = self.run_dir / HANGS
        self._exit, self._clock = exit, clock
        if dumps is None:
            dumps = (("nccl_trace.pkl", self._dump_nccl_trace),) if device_type == "cuda" else ()
        self._dumps, self.dump_timeout_s = tuple(dumps), float(dump_timeout_s)
        self._mark: tuple[int, float] = (0, clock())  # (step, monotonic time): one store, atomic
        self._waiting: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.armed_at = 0.0  # wall time: this attempt's hang folders are named after it
        self.fired: Path | None = None  # the folder of the hang this rank reported
        self._beat_failed = False
        self.timer, self.straggler_threshold = timer, straggler_threshold
        self.rank_scores: dict[str, float] = {}  # rank 0: the latest window's slowest rank, for TensorBoard
        self._stragglers_recorded: set[int] = set()  # this attempt's, each once
        self._identity = {"rank": rank, "host": this_node(), "pid": os.getpid(),
                          "start_ticks": process_start_ticks(os.getpid()), "timeout": self.timeout,
                          "interval": self.interval}  # what `rkan-dist status` needs to judge a beat

    # ---------------------------------------------------------------- the training thread's side
    def progress(self, step: int) -> None:
        """A step or a collective finished (cheap: one tuple stored, no I/O)."""
        self._mark = (step, self._clock())
        self._waiting = None

    def waiting(self, what: str) -> None:
        """About to wait in `what` (a collective, a save), for the heartbeat's culprit choice."""
        self._waiting = what

    # ---------------------------------------------------------------- lifetime
    def start(self, step: int) -> HangWatchdog:
        """Arm: from now on, `timeout` without progress is a hang."""
        self.armed_at = time.time()
        self.progress(step)
        self.heartbeat_path.parent.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread = threading.Thread(target=self._run, name=f"hang-watchdog-rank{self.rank}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Disarm, and remove the heartbeat (a finished rank is not a hung one)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 5)
        self._thread = None
        with contextlib.suppress(OSError):
            self.heartbeat_path.unlink()
        with contextlib.suppress(OSError):  # the last rank out removes the folder; a live rank's beat keeps it
            self.heartbeat_path.parent.rmdir()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                if self.straggler_threshold is not None:
                    self._score_ranks()
                if self.timeout <= 0:  # hang detection off: beats only
                    continue
                stalled = self._clock() - self._mark[1]
                joined = None if stalled > self.timeout else hang_folders(self.hangs_dir, self.armed_at)
                if stalled > self.timeout or joined:
                    self.fire(stalled)
                    return
            except Exception:  # a watchdog that dies silently would leave the hang to the collective timeout
                log.exception("hang watchdog of rank %d failed; the collective timeout remains", self.rank)
                return

    # ---------------------------------------------------------------- the thread's side
    def _progress_wall_time(self) -> float:
        return time.time() - (self._clock() - self._mark[1])

    def _beat(self) -> None:
        """Write the heartbeat; a failed write (a full disk) is logged once and does not stop the watching."""
        beat = {**self._identity, "step": self._mark[0], "progress_time": round(self._progress_wall_time(), 3),
                "beat_time": round(time.time(), 3), "waiting": self._waiting}
        if self.timer is not None:
            beat["compute"] = self.timer.beat_entries(CARRY_INTERVALS * self.interval)
        try:
            try:
                write_json_atomic(self.heartbeat_path, beat)
            except FileNotFoundError:  # a finishing peer removed the empty folder a moment ago
                self.heartbeat_path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(self.heartbeat_path, beat)
        except OSError as err:
            if not self._beat_failed:
                log.warning("could not write the heartbeat %s: %s", self.heartbeat_path, err)
            self._beat_failed = True

    def _score_ranks(self) -> None:
        """Rank 0: score the live ranks' compute windows (rkan_dist.stragglers); record each rank that
        became a persistent straggler once (log line and ledger event), for eviction at the next requeue
        (rkan_dist.eviction, slurm.exclude_stragglers). Heartbeats gone stale are left out: their
        process is stopped or dead, and its windows are old."""
        now = time.time()
        beats = {rank: beat for rank, beat in read_heartbeats(self.run_dir / HEARTBEATS).items()
                 if rank < self.world_size and not beat_is_stale(beat, now)}
        per_rank = {rank: windows for rank, beat in beats.items() if (windows := beat_windows(beat))}
        found = slowest(per_rank)
        self.rank_scores = {} if found is None else {"ranks/slowest_score": round(found.score, 4),
                                                     "ranks/slowest_rank": found.rank}
        for straggler in persistent_stragglers(per_rank, self.straggler_threshold):
            if straggler.rank in self._stragglers_recorded:
                continue
            self._stragglers_recorded.add(straggler.rank)
            node = beats[straggler.rank].get("host")
            log.warning("straggler: rank %d on %s computes at %.2f of the fastest rank's speed or less, %d windows "
                        "of %d steps in a row up to step %d (parallel.straggler_threshold %g)", straggler.rank, node,
                        straggler.score, straggler.windows, WINDOW_STEPS, straggler.end_step, self.straggler_threshold)
            from rkan_dist.ledger import EventLedger, slurm_job

            try:
                EventLedger(self.run_dir).append({"event": "straggler", "rank": straggler.rank, "node": node,
                                                  "score": round(straggler.score, 3), "windows": straggler.windows,
                                                  "step": straggler.end_step, **slurm_job()})
            except OSError as err:
                log.warning("could not write the ledger in %s: %s", self.run_dir, err)

    def fire(self, stalled: float) -> None:
        """Dump, wait for the others' dumps, log, record, exit 1 (see the module docstring)."""
        step = self._mark[0]
        folder = agree_on_folder(self.hangs_dir, self.armed_at, settle_s=min(self.interval, 2.0))
        beats = read_heartbeats(self.run_dir / HEARTBEATS)
        stale_after = STALE_INTERVALS * self.interval
        culprit = choose_culprit(beats, self.world_size, time.time(), stale_after)
        who = f"rank {culprit}" if culprit is not None else "an unknown rank"
        # The job's step is this rank's: a stale heartbeat may be a step or two behind what its rank did.
        culprit_beat = beats.get(culprit) if culprit is not None else None
        fresh = culprit_beat is not None and not beat_is_stale(culprit_beat, time.time(), stale_after)
        at_step = culprit_beat.get("step", step) if fresh else step
        silent_for = stalled  # a rank that joined before its own timeout reports how long the culprit went without
        if culprit in beats:
            silent_for = max(stalled, time.time() - float(beats[culprit].get("progress_time", time.time())))
        self.fired = folder
        self._dump(folder / f"rank{self.rank}.txt", step, stalled, culprit)
        log.error("hang: %s stopped progressing at step %s (no step or collective finished for %.0f s); stacks in %s",
                  who, at_step, silent_for, folder)
        from rkan_dist.ledger import EventLedger

        try:
            EventLedger(self.run_dir).record_failure_once(
                "hang", culprit, at_step, since=self.armed_at, detected_by=self.rank,
                stalled_seconds=round(silent_for, 1), stacks=str(folder))
        except OSError as err:
            log.warning("could not write the ledger in %s: %s", self.run_dir, err)
        self._flush_output()  # what a deadline's _exit would lose
        self._bounded_dumps(folder)
        self._await_dumps(folder, beats, stale_after)
        if culprit is not None:
            self._kill_if_stopped(beats.get(culprit))
        self._flush_output()
        self._exit(1)

    @staticmethod
    def _flush_output() -> None:
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()

    def _dump(self, path: Path, step: int, stalled: float, culprit: int | None) -> None:
        with open(path, "w") as out:
            out.write(f"rank {self.rank} on {self._identity['host']}, pid {os.getpid()}, step {step}: no step or "
                      f"collective finished for {stalled:.1f} s (timeout {self.timeout:g} s); waiting in: "
                      f"{self._waiting or 'nothing (computing or loading data)'}; culprit: "
                      f"{'rank ' + str(culprit) if culprit is not None else 'unknown'}\n\n")
            out.flush()
            faulthandler.dump_traceback(out, all_threads=True)

    def _bounded_dumps(self, folder: Path) -> list[str]:
        """Run `dumps` in a daemon thread and wait `dump_timeout_s` for them at most; returns the
        names of those that did not finish. `rank<R>.dump_timeout.txt` says which and holds the
        stacks at that moment (where the dump is stuck); it is removed when all finish in time.

        Two limits, as a dump can block in two ways: one that blocks with the GIL released (a wait
        in C++ code that lets Python run) is left behind by this thread at `dump_timeout_s`; one
        that holds the GIL stops every Python thread, this one included, so faulthandler's own C
        thread (it needs no GIL) ends the process at twice the limit, writing the stacks first.
        The hang is recorded before either: the restart follows whichever way this ends."""
        if not self._dumps:
            return []
        names = [name for name, _ in self._dumps]
        finished, done = threading.Event(), []

        def run() -> None:
            for name, dump in self._dumps:
                try:
                    dump(folder / f"rank{self.rank}.{name}")
                except Exception as err:  # a best effort: the stacks and the ledger are written already
                    log.warning("hang: the %s dump failed: %s", name, err)
                done.append(name)
            finished.set()

        note_path = folder / f"rank{self.rank}.dump_timeout.txt"
        hard_exit = self._exit is os._exit
        note = None
        with contextlib.suppress(OSError):
            note = open(note_path, "w")  # noqa: SIM115 - faulthandler writes into it until cancelled
            note.write(f"rank {self.rank}: the diagnostics {', '.join(names)} did not finish within "
                       f"{self.dump_timeout_s:g} s (a wedged driver or NCCL); the hang was recorded before them.\n")
            if hard_exit:
                note.write(f"Unless a line 'After ...' follows, they held the GIL and faulthandler's thread ended "
                           f"this process (exit 1) at {2 * self.dump_timeout_s:g} s; the stacks below are its.\n\n")
            note.flush()
        if hard_exit:
            faulthandler.dump_traceback_later(2 * self.dump_timeout_s, exit=True,
                                              file=note if note is not None else sys.stderr)
        thread = threading.Thread(target=run, name=f"hang-dumps-rank{self.rank}", daemon=True)
        try:
            thread.start()
            finished.wait(self.dump_timeout_s)
        finally:
            if hard_exit:
                faulthandler.cancel_dump_traceback_later()
        unfinished = [name for name in names if name not in done]
        if unfinished:
            log.error("hang: the %s dump did not finish within %g s; exiting without it", ", ".join(unfinished),
                      self.dump_timeout_s)
            if note is not None:
                with contextlib.suppress(OSError, ValueError):
                    note.write(f"After {self.dump_timeout_s:g} s {', '.join(unfinished)} had not finished; the "
                               f"process exited without it. Stacks at that moment:\n\n")
                    note.flush()
                    faulthandler.dump_traceback(note, all_threads=True)
        if note is not None:
            note.close()
            if not unfinished:
                with contextlib.suppress(OSError):
                    note_path.unlink()
        return unfinished

    @staticmethod
    def _dump_nccl_trace(path: Path) -> None:
        """The NCCL flight recorder's record of the last collectives (recorded only when
        TORCH_NCCL_TRACE_BUFFER_SIZE > 0); read with torch's tools/flight_recorder. Not on CPU.
        It can block (it asks NCCL and the driver): run only under _bounded_dumps' limits."""
        try:
            from torch._C._distributed_c10d import _dump_nccl_trace
        except ImportError:
            return
        path.write_bytes(_dump_nccl_trace())

    def _await_dumps(self, folder: Path, beats: Mapping[int, Mapping[str, Any]], stale_after: float) -> None:
        """Until every rank whose heartbeat is fresh has written its stacks (they find the folder at
        their next beat), for a few intervals at most: exiting first would cut their collectives."""
        now = time.time()
        live = [rank for rank, beat in beats.items() if rank < self.world_size and rank != self.rank
                and not beat_is_stale(beat, now, stale_after)]
        deadline = time.monotonic() + STALE_INTERVALS * self.interval + 2.0
        while time.monotonic() < deadline and not all((folder / f"rank{rank}.txt").exists() for rank in live):
            time.sleep(min(0.2, self.interval))

    def _kill_if_stopped(self, beat: Mapping[str, Any] | None) -> None:
        """SIGKILL the culprit when it is a stopped (SIGSTOP, state T) process on this host.

        A stopped process cannot act on the SIGTERM torchrun's agent sends when this rank exits: the
        agent SIGKILLs it only 30 s later, and Slurm's --kill-on-bad-exit kills it anyway, so the
        restart would wait for nothing. Its stacks cannot be dumped (it runs no code), the others'
        are written, and the ledger names it: killing it now loses nothing. Never a traced process
        (state t: a debugger), nor one whose start time differs from its heartbeat's (a reused pid)."""
        if not beat or beat.get("host") != self._identity["host"] or beat.get("pid") == os.getpid():
            return
        pid = int(beat.get("pid", 0))
        if pid <= 0 or process_state(pid) != "T" or process_start_ticks(pid) != beat.get("start_ticks"):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            log.error("hang: rank %s (pid %d) was stopped (SIGSTOP); killed it so the restart need not wait",
                      beat.get("rank"), pid)


# ----------------------------------------------------------------------------- the training loop's side

class HangWatch:
    """What the training loop holds: the rank's HangWatchdog while armed, nothing otherwise, so the
    loop marks its progress the same way whether hangs are watched or not."""

    def __init__(self) -> None:
        self.watchdog: HangWatchdog | None = None
        self.timer: ComputeTimer | None = None

    def arm(self, run_dir: str | os.PathLike, rank: int, world_size: int, configured_timeout: float | None,
            device_type: str, step: int, *, launched: bool, module: Any = None, sync_bn: bool = False,
            straggler_threshold: float | None = None) -> None:
        """From `step` on, a rank that finishes no step or collective for the hang timeout is hung
        (start-up is bounded by the collective timeout, twice that and at least 10 minutes); with the
        timeout 0 (off) the heartbeat is still written, for status and the straggler scores.

        Only in a launched job (`launched`: a process group of torchrun, Slurm or submitit), where
        exiting 1 is the crash path that restarts it; one plain process (a notebook) has no peer to
        hang on and nothing to restart it, and ending it would only lose the session.

        `module` (the engine's plain model): its training forwards are timed for the straggler scores
        (ComputeTimer), and rank 0 scores the ranks with `straggler_threshold`. Not with `sync_bn`:
        SyncBatchNorm all-reduces inside every forward, so a slow rank would make every rank's forward
        as slow as its own and no score would tell it; the heartbeats then carry no compute times, and
        neither TensorBoard nor status shows straggler scores."""
        timeout = hang_timeout_for(configured_timeout, device_type)
        if self.watchdog is not None or not launched:
            return
        if module is not None and not sync_bn:
            self.timer = ComputeTimer(device_type, slow_rank_delay(rank)).attach(module)
            self.timer.completed = step
        elif module is not None and rank == 0:
            log.info("parallel.sync_bn: compute time is not measured (SyncBatchNorm's all-reduces sit inside every "
                     "forward), so no straggler scores")
        self.watchdog = HangWatchdog(run_dir, rank, world_size, timeout, device_type=device_type, timer=self.timer,
                                     straggler_threshold=straggler_threshold if rank == 0 else None).start(step)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.detach()
            self.timer = None
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None

    def rank_scores(self) -> dict[str, float]:
        """Rank 0, while armed: {"ranks/slowest_score", "ranks/slowest_rank"} of the latest window every
        rank reported (from the heartbeats, no collective); {} elsewhere and before there is one."""
        return self.watchdog.rank_scores if self.watchdog is not None else {}

    def progress(self, step: int, waiting: str | None = None) -> None:
        """A step or collective finished; `waiting`: what this rank is about to wait in."""
        if self.timer is not None:
            self.timer.completed = step
        if self.watchdog is not None:
            self.watchdog.progress(step)
            if waiting is not None:
                self.watchdog.waiting(waiting)

    def waiting(self, what: str) -> None:
        if self.watchdog is not None:
            self.watchdog.waiting(what)

    def each_call(self, forward: Callable[[Any], Any], step: int) -> Callable[[Any], Any]:
        """`forward` that marks progress at every call (evaluation batches: no collective in between)."""
        if self.watchdog is None:
            return forward

        def forward_with_progress(images: Any) -> Any:
            self.progress(step)
            return forward(images)

        return forward_with_progress
