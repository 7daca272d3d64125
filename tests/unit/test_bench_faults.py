"""bench/faults.py's pure parts: the injection plan, goodput and each fault's cost read from a
synthetic ledger and metrics.jsonl (the bench itself needs the dev cluster and minutes: not run here)."""

from __future__ import annotations

import json
import math
import re

import pytest

from bench.faults import (
    fault_breakdown,
    goodput,
    parse_scontrol,
    plan,
    read_step_times,
    scaling_section,
    summarise,
)

pytestmark = pytest.mark.unit


def test_plan_puts_each_fault_half_an_interval_past_a_checkpoint_two_intervals_apart() -> None:
    assert plan(480, 40) == {"crash": 60, "hang": 140, "preemption": 220}
    with pytest.raises(ValueError):
        plan(200, 40)


def test_goodput_is_uninterrupted_over_faulted_wall() -> None:
    assert goodput(120.0, 300.0) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        goodput(0.0, 10.0)


# A job that crashed at step 61 (checkpoint 40), hung at 141 (checkpoint 120) and was preempted at 221.
EVENTS = [
    {"time": 1000.0, "event": "start", "step": 0},
    {"time": 1030.0, "event": "failure", "kind": "crash", "rank": 1, "step": 61},
    {"time": 1045.0, "event": "start", "step": 40},
    {"time": 1045.1, "event": "restart", "after": "crash", "step": 40, "steps_lost": 21, "lost_seconds": 25.1},
    {"time": 1140.0, "event": "failure", "kind": "hang", "rank": 1, "step": 141},
    {"time": 1158.0, "event": "start", "step": 120},
    {"time": 1158.2, "event": "restart", "after": "hang", "step": 120, "steps_lost": 21, "lost_seconds": 84.0},
    {"time": 1201.0, "event": "stop", "kind": "preemption", "step": 222, "requeue": True},
    {"time": 1220.0, "event": "start", "step": 222},
]
STEP_TIMES = {41: 1050.0, 121: 1165.0, 223: 1228.0}
INJECTIONS = [
    {"kind": "crash", "time": 1029.0, "step": 61, "task_seen": 1041.0},
    {"kind": "hang", "time": 1075.0, "step": 141, "task_seen": 1153.0},
    {"kind": "preemption", "time": 1200.0, "step": 221, "task_seen": 1214.0},
]


def test_fault_breakdown_reads_each_faults_cost_from_the_ledger() -> None:
    crash, hang, preemption = fault_breakdown(EVENTS, STEP_TIMES, INJECTIONS)
    assert (crash["lost_seconds"], crash["steps_lost"], crash["resumed_step"]) == (25.1, 21, 40)
    assert (crash["detected_s"], crash["requeue_s"], crash["task_start_s"], crash["ffcv_first_step_s"],
            crash["down_s"]) == (1.0, 11.0, 4.0, 5.0, 21.0)
    assert (hang["lost_seconds"], hang["detected_s"], hang["down_s"]) == (84.0, 65.0, 90.0)
    # A preemption loses no steps; its lost seconds run from the signal to the requeued run's start.
    assert (preemption["lost_seconds"], preemption["steps_lost"], preemption["resumed_step"]) == (20.0, 0, 222)
    assert (preemption["detected_s"], preemption["ffcv_first_step_s"]) == (1.0, 8.0)
    assert all(row["recorded"] for row in (crash, hang, preemption))


def test_a_fault_missing_from_the_ledger_is_reported_as_not_recorded() -> None:
    (hang,) = fault_breakdown(EVENTS[:4], STEP_TIMES, [{"kind": "hang", "time": 1075.0, "step": 141,
                                                         "task_seen": None}])
    assert hang["recorded"] is False and hang["lost_seconds"] is None and hang["down_s"] is None


def test_summary_and_scaling_section() -> None:
    rows = fault_breakdown(EVENTS, STEP_TIMES, INJECTIONS)
    figures = summarise(150.0, 300.0, rows)
    assert figures["fault_goodput"] == 0.5 and figures["extra_wall_s"] == 150.0
    assert figures["lost_seconds_total"] == pytest.approx(129.1)
    assert figures["lost_seconds"] == {"crash": 25.1, "hang": 84.0, "preemption": 20.0}
    text = scaling_section({**figures, "cases": rows, "faults": ["crash", "hang", "preemption"],
                            "fault_checkpoint_mb": 90.0, "fault_checkpoint_load_s": 0.3, "hang_timeout_s": 60})
    assert "## What a fault costs at 64 and 256 GPUs" in text and "**per hang**" in text and not re.search(r"\bnan\b", text)


def test_read_step_times_and_scontrol_parsing(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([json.dumps({"kind": "train", "step": 1, "time": 5.0}),
                               json.dumps({"kind": "text", "step": 1, "time": 5.1}), '{"kind": "tra']))
    assert read_step_times(path) == {1: 5.0}
    record = parse_scontrol("JobId=7 JobName=rkan-dist-run JobState=RUNNING Reason=None Restarts=2 ExitCode=0:0")
    assert (record["JobState"], record["Restarts"], record["ExitCode"]) == ("RUNNING", "2", "0:0")
    assert not math.isnan(goodput(1, 2))
