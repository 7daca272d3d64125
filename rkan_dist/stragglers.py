"""Straggler scores: which rank computes persistently slower than its peers.

Under data parallelism every rank waits for the slowest one in each collective, so every rank's step
takes as long as the slowest rank's and a slow GPU hides in the step time. Each rank therefore times
its own compute apart from the collectives (rkan_dist.watchdog.ComputeTimer) and publishes, in its
heartbeat, the median compute time per step of each window of `WINDOW_STEPS` optimizer steps:

    "compute": [{"end_step": 400, "median_s": 0.031}, {"end_step": 420, "median_s": 0.030}, ...]

Windows end at multiples of WINDOW_STEPS, and the ranks step in lockstep, so one `end_step` names the
same steps on every rank. Per window, a rank's score is the fastest rank's median divided by its own
(1 for the fastest, 0.5 for a rank that takes twice as long); a rank is a persistent straggler when
its score is below `parallel.straggler_threshold` in each of the last PERSISTENT_WINDOWS windows that
every rank reported. Rank 0 scores the heartbeats (TensorBoard's ranks/slowest_score and
ranks/slowest_rank, a "straggler" event in the ledger), and so does `rkan-dist status` while a run
trains. Pure functions, standard library only: status imports this without torch.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

WINDOW_STEPS = 20  # optimizer steps per window: a median over 20 shrugs off a compile, a save or a GC pause
PERSISTENT_WINDOWS = 3  # below the threshold in this many windows in a row: a persistent straggler
MIN_WINDOW_FRACTION = 0.5  # a window with fewer of its steps timed (a resumed run's first) is not published


def window_end(step: int, window_steps: int = WINDOW_STEPS) -> int:
    """The end step of the window that optimizer step `step` (1-based) belongs to."""
    return -(-step // window_steps) * window_steps


def window_median(step_seconds: Iterable[float], window_steps: int = WINDOW_STEPS) -> float | None:
    """The median compute time of one window's steps; None when fewer than half its steps were timed."""
    values = list(step_seconds)
    if not values or len(values) < MIN_WINDOW_FRACTION * window_steps:
        return None
    return statistics.median(values)


def beat_windows(beat: Mapping[str, Any]) -> dict[int, float]:
    """{end_step: median seconds} of one heartbeat's "compute" list; {} when it has none (a rank whose
    compute is not timed, a heartbeat from before straggler scores); malformed entries are skipped."""
    windows = {}
    for entry in beat.get("compute") or ():
        try:
            end_step, median_s = int(entry["end_step"]), float(entry["median_s"])
        except (KeyError, TypeError, ValueError):
            continue
        if median_s > 0:
            windows[end_step] = median_s
    return windows


def aligned_ends(per_rank: Mapping[int, Mapping[int, float]]) -> list[int]:
    """The end steps every rank reported, oldest first: only these compare like with like."""
    if not per_rank:
        return []
    common = set.intersection(*(set(windows) for windows in per_rank.values()))
    return sorted(common)


def window_scores(per_rank: Mapping[int, Mapping[int, float]], end_step: int) -> dict[int, float]:
    """rank -> the fastest rank's median / this rank's, in the window ending at `end_step`."""
    medians = {rank: windows[end_step] for rank, windows in per_rank.items() if end_step in windows}
    fastest = min(medians.values(), default=0.0)
    return {rank: fastest / median for rank, median in medians.items()}


@dataclass(frozen=True)
class Slowest:
    """The slowest rank of the latest aligned window (what TensorBoard plots)."""

    rank: int
    score: float
    end_step: int


def slowest(per_rank: Mapping[int, Mapping[int, float]]) -> Slowest | None:
    """The lowest-scoring rank of the latest window every rank reported (the lowest rank on a tie);
    None before there is one."""
    ends = aligned_ends(per_rank)
    if not ends:
        return None
    scores = window_scores(per_rank, ends[-1])
    rank = min(scores, key=lambda r: (scores[r], r))
    return Slowest(rank, scores[rank], ends[-1])


@dataclass(frozen=True)
class Straggler:
    rank: int
    score: float  # its highest score over the windows: below the threshold in each of them
    windows: int  # how many windows in a row it scored below the threshold (at least PERSISTENT_WINDOWS)
    end_step: int  # the last of those windows


def persistent_stragglers(per_rank: Mapping[int, Mapping[int, float]], threshold: float,
                          windows: int = PERSISTENT_WINDOWS) -> list[Straggler]:
    """The ranks that scored below `threshold` in each of the last `windows` windows every rank reported,
    by rank. `Straggler.windows` counts how far back the run of low scores goes among the aligned
    windows (at least `windows`)."""
    ends = aligned_ends(per_rank)
    if len(ends) < windows:
        return []
    scores = {end: window_scores(per_rank, end) for end in ends}
    found = []
    for rank in sorted(per_rank):
        low = []
        for end in reversed(ends):
            if scores[end][rank] >= threshold:
                break
            low.append(scores[end][rank])
        if len(low) >= windows:
            found.append(Straggler(rank, max(low), len(low), ends[-1]))
    return found
