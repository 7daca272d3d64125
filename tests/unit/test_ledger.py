"""The run ledger (<run_dir>/events.json): failures, the restarts that follow them and what they cost."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rkan_dist.ledger import RESTART_ENV, EventLedger, pending_failure, restart_count, summary
from rkan_dist.nodes import this_node


def test_failure_then_restart_records_steps_and_seconds_lost(tmp_path: Path) -> None:
    ledger = EventLedger(tmp_path)
    ledger.append({"event": "start", "step": 0})
    checkpoint_time = time.time() - 30.0  # the step-30 checkpoint was written 30 s ago
    ledger.record_failure("crash", rank=1, step=42)
    assert pending_failure(ledger.read()["events"])["rank"] == 1
    restart = ledger.record_restart(30, checkpoint_time)
    assert restart["after"] == "crash" and restart["step"] == 30 and restart["steps_lost"] == 12
    assert 30.0 <= restart["lost_seconds"] < 40.0
    events = json.loads((tmp_path / "events.json").read_text())["events"]
    assert [event["event"] for event in events] == ["start", "failure", "restart"]
    # Outside Slurm every rank runs on this machine: the failure names it.
    assert events[1] | {"time": 0} == {"time": 0, "event": "failure", "kind": "crash", "rank": 1,
                                       "node": this_node(), "step": 42}
    assert pending_failure(events) is None


def test_a_start_without_a_failure_records_no_restart(tmp_path: Path) -> None:
    ledger = EventLedger(tmp_path)
    assert ledger.record_restart(0, None) is None
    ledger.append({"event": "stop", "kind": "preemption"}, count="preemptions")
    assert ledger.record_restart(10, time.time()) is None
    assert [event["event"] for event in ledger.read()["events"]] == ["stop"]


def test_restart_without_a_checkpoint_loses_everything_since_the_first_event(tmp_path: Path) -> None:
    ledger = EventLedger(tmp_path)
    ledger.append({"event": "start", "step": 0})
    data = ledger.read()
    data["events"][0]["time"] -= 100.0  # the run started 100 s ago
    (tmp_path / "events.json").write_text(json.dumps(data))
    ledger.record_failure("hang", rank=0, step=None)
    restart = ledger.record_restart(0, None)
    assert restart["steps_lost"] is None and restart["lost_seconds"] >= 100.0


def test_summary_counts_failures_by_kind_and_sums_the_losses(tmp_path: Path) -> None:
    ledger = EventLedger(tmp_path)
    for kind, failed_at, resumed_at in (("crash", 12, 10), ("save", 20, 10), ("crash", 25, 20)):
        ledger.record_failure(kind, rank=0, step=failed_at)
        ledger.record_restart(resumed_at, time.time() - 5.0)
    ledger.append({"event": "stop", "kind": "timeout"}, count="timeouts")
    totals = summary(ledger.read())
    assert totals["failures"] == {"crash": 2, "save": 1} and totals["restarts"] == {"crash": 2, "save": 1}
    assert totals["steps_lost"] == 2 + 10 + 5 and 15.0 <= totals["lost_seconds"] < 20.0
    assert totals["timeouts"] == 1 and totals["preemptions"] == 0


def test_unknown_failure_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="oom"):
        EventLedger(tmp_path).record_failure("oom", rank=0, step=1)


def _append_many(run_dir: str, tag: int) -> None:
    ledger = EventLedger(run_dir)
    for index in range(25):
        ledger.append({"event": "start", "writer": tag, "index": index})


def test_concurrent_writers_lose_no_event(tmp_path: Path) -> None:
    # e.g. a launcher recording a crash while rank 0 of the next attempt records its start
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_append_many, args=(str(tmp_path), tag)) for tag in range(3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
    assert [writer.exitcode for writer in writers] == [0, 0, 0]
    events = EventLedger(tmp_path).read()["events"]
    assert sorted((event["writer"], event["index"]) for event in events) == \
        [(tag, index) for tag in range(3) for index in range(25)]


def test_a_run_written_under_the_earlier_name_still_reads_and_moves_on_its_next_write(tmp_path: Path) -> None:
    earlier = {"timeouts": 1, "preemptions": 2, "events": [{"time": 1.0, "event": "start", "step": 0}]}
    (tmp_path / "requeues.json").write_text(json.dumps(earlier))
    ledger = EventLedger(tmp_path)
    assert ledger.read() == earlier
    ledger.append({"event": "stop", "kind": "preemption", "step": 5}, count="preemptions")
    assert not (tmp_path / "requeues.json").exists()
    data = json.loads((tmp_path / "events.json").read_text())
    assert (data["timeouts"], data["preemptions"]) == (1, 3)
    assert [event["event"] for event in data["events"]] == ["start", "stop"]


def test_reading_the_ledger_does_not_import_torch() -> None:
    code = "import sys, rkan_dist.ledger; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_failure_budgets_default_to_three_and_refuse_negatives() -> None:
    from rkan_dist.config import ConfigError, load_config

    config = load_config(None)
    assert (config.slurm.max_num_failures, config.train.max_restarts) == (3, 3)
    for key in ("slurm.max_num_failures", "train.max_restarts"):
        with pytest.raises(ConfigError, match=f"{key} must be >= 0"):
            load_config(None, [f"{key}=-1"])


def test_a_start_names_the_slurm_job_it_runs_in() -> None:
    from rkan_dist.ledger import slurm_job

    assert slurm_job({}) == {}
    assert slurm_job({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2"}) == {"job_id": "42", "restart_count": 2}
    assert slurm_job({"SLURM_JOB_ID": "43", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3"}) == \
        {"job_id": "40_3", "restart_count": 0}


def test_the_restart_count_comes_from_slurm_or_from_the_local_launcher():
    assert restart_count({}) == 0  # a first start anywhere
    assert restart_count({"SLURM_RESTART_COUNT": "0"}) == 0
    assert restart_count({"SLURM_RESTART_COUNT": "2"}) == 2  # requeued twice
    assert restart_count({RESTART_ENV: "1"}) == 1  # `train --nproc` after a crash
    assert restart_count({RESTART_ENV: "1", "SLURM_RESTART_COUNT": "0"}) == 1  # --nproc inside an allocation
