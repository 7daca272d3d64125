"""A slow rank is named: `rkan-dist train --nproc 3` (real torchrun, gloo, the demo scaled down) with
rank 1's compute slowed by the test-only hook (RKAN_TEST_SLOW_RANK sleeps inside its timed forward).

While the run trains, the heartbeats' compute windows score rank 1 below the threshold and `status`
names it; once the run has finished (the heartbeats removed), the ledger holds one "straggler" event
for it, `status` still names it and no other rank, and TensorBoard plots ranks/slowest_rank = 1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from trainrun import base_overrides, start_train, wait_until

from rkan_dist import status
from rkan_dist.nodes import this_node
from rkan_dist.stragglers import beat_windows, persistent_stragglers, slowest
from rkan_dist.watchdog import HEARTBEATS, SLOW_RANK_ENV, beat_is_stale, read_heartbeats

pytestmark = pytest.mark.integration

SLOW_RANK, DELAY_S = 1, 0.15  # the fast ranks' forward takes ~20 ms here: rank 1 scores ~0.12
THRESHOLD = 0.3  # clear of both: 3 ranks sharing 2 cores score down to 0.5 from scheduling alone
STEPS = 160  # 8 windows of 20 steps: 3 to become persistent, then time to watch it live


def live_scores(run_dir: Path, threshold: float) -> tuple[list[int], object]:
    """(persistent stragglers, the slowest rank of the latest window) from the live heartbeats."""
    beats = read_heartbeats(run_dir / HEARTBEATS)
    per_rank = {rank: beat_windows(beat) for rank, beat in beats.items() if not beat_is_stale(beat, time.time())}
    per_rank = {rank: windows for rank, windows in per_rank.items() if windows}
    if len(per_rank) < 3:
        return [], None
    return [s.rank for s in persistent_stragglers(per_rank, threshold)], slowest(per_rank)


def straggler_named(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith(("straggler:", "            rank"))
            and "of the fastest rank's speed" in line]


def test_a_slowed_rank_is_named_by_its_heartbeats_status_the_ledger_and_tensorboard(tmp_path, digits_cache,
                                                                                   monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv(SLOW_RANK_ENV, f"{SLOW_RANK}:{DELAY_S}")  # the workers inherit it (trainrun.test_env)
    overrides = base_overrides(run_dir, digits_cache, steps=STEPS) + [
        "data.min_res=8", "data.max_res=8", "data.val_res=8", "logging.image_grid=false", "logging.histograms_every=0",
        "parallel.hang_timeout_s=20",  # a heartbeat every second (timeout / 20)
        f"parallel.straggler_threshold={THRESHOLD}"]
    process = start_train(3, overrides, tmp_path / "run.log")
    seen_live: dict[str, object] = {}
    try:
        def named_live() -> bool:
            stragglers, latest = live_scores(run_dir, THRESHOLD)
            if stragglers:
                seen_live.update(stragglers=stragglers, latest=latest,
                                 status=straggler_named(status.report(run_dir)))
            return bool(seen_live.get("status"))

        wait_until(named_live, timeout=400, process=process, poll=0.1)
        returncode = process.wait(timeout=400)
    finally:
        if process.poll() is None:
            process.kill()
    output = (tmp_path / "run.log").read_text()
    assert returncode == 0, output[-4000:]
    node = this_node()

    # live: the heartbeats' scores name rank 1, and so does status
    assert seen_live["stragglers"] == [SLOW_RANK], seen_live
    assert seen_live["latest"].rank == SLOW_RANK and seen_live["latest"].score < THRESHOLD, seen_live
    assert [line.split(" computes")[0] for line in seen_live["status"]] == [f"straggler:  rank 1 on {node}"], seen_live

    # ended: one ledger event, the warning rank 0 logged, status names rank 1 and no other
    events = json.loads((run_dir / "events.json").read_text())["events"]
    straggler, = [event for event in events if event["event"] == "straggler"]
    assert (straggler["rank"], straggler["node"]) == (SLOW_RANK, node) and straggler["windows"] >= 3, straggler
    assert straggler["score"] < THRESHOLD and straggler["step"] % 20 == 0, straggler
    assert f"straggler: rank 1 on {node} computes at " in output, output[-4000:]
    assert not (run_dir / HEARTBEATS).exists()
    lines = straggler_named(status.report(run_dir))
    assert [line.split(" computes")[0] for line in lines] == [f"straggler:  rank 1 on {node}"], lines

    # TensorBoard: rank 0 logged the latest window's slowest rank at its logging steps, from the heartbeats
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    accumulator.Reload()
    ranks = [event.value for event in accumulator.Scalars("ranks/slowest_rank")]
    scores = [event.value for event in accumulator.Scalars("ranks/slowest_score")]
    # The first windows may name another rank: ranks sharing two cores start unevenly (seen under CI's
    # load: rank 0 the slowest in the first 3 of 140 values); from the slowed rank's first on, only it.
    settled = ranks.index(SLOW_RANK) if SLOW_RANK in ranks else len(ranks)
    assert len(ranks) >= 20 and settled <= len(ranks) // 4 and set(ranks[settled:]) == {SLOW_RANK}, ranks
    assert max(scores[settled:]) < THRESHOLD, scores
