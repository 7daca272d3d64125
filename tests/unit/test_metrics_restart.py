"""A run that starts over in a folder with logs moves them aside; a resumed one drops what it will redo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rkan_dist.metrics import MetricsLogger

pytestmark = pytest.mark.unit


def write_steps(run_dir: Path, steps: range, start_step: int = 0) -> None:
    logger = MetricsLogger(run_dir, enabled=True, tensorboard=True, start_step=start_step)
    for step in steps:
        logger.scalars(step, {"train/loss": float(step)})
    logger.close()


def logged(run_dir: Path) -> tuple[list[int], list[int]]:
    """(steps in metrics.jsonl, steps in TensorBoard) of train/loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    accumulator.Reload()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines], [event.step for event in accumulator.Scalars("train/loss")]


def test_a_start_from_step_0_moves_the_old_logs_aside(tmp_path):
    write_steps(tmp_path, range(1, 4))  # stopped before its first checkpoint
    write_steps(tmp_path, range(1, 3))  # the re-run starts at step 0 again
    assert logged(tmp_path) == ([1, 2], [1, 2])
    (old,) = (tmp_path / "superseded").iterdir()
    assert sorted(path.name for path in old.iterdir()) == ["metrics.jsonl", "tb"]
    assert logged(old) == ([1, 2, 3], [1, 2, 3])


def test_a_resume_keeps_the_steps_up_to_its_checkpoint_once(tmp_path):
    write_steps(tmp_path, range(1, 6))  # killed after step 5, last checkpoint at step 3
    write_steps(tmp_path, range(4, 7), start_step=4)
    assert logged(tmp_path) == ([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6])
    assert not (tmp_path / "superseded").exists()
