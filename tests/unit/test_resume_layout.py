"""A resume on another world size keeps the global batch, the lr schedule and the data position."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rkan_dist.config import ConfigError
from rkan_dist.resume import (
    BatchLayout,
    check_resume,
    describe_resize,
    epoch_position,
    fit_global_batch,
    layout_of,
    resumed_layout,
    world_sizes_for,
    zero_stage_of,
)

pytestmark = pytest.mark.unit


def test_fit_global_batch_keeps_what_it_can():
    assert fit_global_batch(64, 2, 32, 1) == (32, 1)  # fits as configured
    assert fit_global_batch(64, 1, 32, 1) == (32, 2)  # same micro-batch, more accumulation
    assert fit_global_batch(64, 4, 32, 1) == (16, 1)  # a smaller per-process batch
    assert fit_global_batch(96, 3, 32, 1) == (32, 1)
    assert fit_global_batch(60, 4, 32, 1) == (15, 1)
    assert fit_global_batch(64, 2, 24, 1) == (16, 2)  # 32 per process in micro-batches <= 24
    with pytest.raises(ValueError, match="64 cannot be split evenly over 3"):
        fit_global_batch(64, 3, 32, 1)


def test_world_sizes_for_lists_the_divisors_nearest_the_asked_size():
    assert world_sizes_for(64, 3) == [1, 2, 4, 8, 16, 32]
    assert world_sizes_for(48, 5, count=4) == [2, 3, 4, 6]


def test_resumed_layout_keeps_the_global_batch_or_names_the_choices():
    saved = BatchLayout(world_size=2, batch_size=32, grad_accum=1)
    assert resumed_layout(saved, 1, 32, 1, "ckpt") == BatchLayout(1, 32, 2)
    assert resumed_layout(saved, 4, 32, 1, "ckpt") == BatchLayout(4, 16, 1)
    assert resumed_layout(saved, 2, 32, 1, "ckpt") == saved
    with pytest.raises(ConfigError) as err:
        resumed_layout(saved, 3, 32, 1, "runs/x/checkpoints/step-5")
    message = str(err.value)
    assert "global batch of 64 (32 per process x 2 processes x grad_accum 1)" in message
    assert "which 3 processes cannot keep" in message and "1, 2, 4, 8, 16 or 32 processes" in message
    assert "\n" not in message


def test_a_zero_partitioned_checkpoint_resumes_on_its_own_world_size_only():
    saved = BatchLayout(2, 32, 1)
    assert zero_stage_of({"parallel": {"backend": "deepspeed", "zero_stage": 1}}) == 1
    assert zero_stage_of({"parallel": {"backend": "ddp", "zero_stage": 1}}) == 0 and zero_stage_of(None) == 0
    assert resumed_layout(saved, 2, 32, 1, "ckpt", zero_stage=2) == saved
    with pytest.raises(ConfigError, match="ZeRO-1 optimizer state partitioned over 2 processes; resume it on 2"):
        resumed_layout(saved, 4, 32, 1, "ckpt", zero_stage=1)


def test_the_resume_line_says_what_changed():
    saved = BatchLayout(2, 24, 1)
    assert describe_resize(saved, saved) is None
    text = describe_resize(saved, BatchLayout(3, 16, 1))
    assert text.startswith("world size 2 -> 3, data.batch_size 24 -> 16;") and "grad_accum" not in text.split(";")[0]
    assert "global batch 48" in text
    assert describe_resize(saved, BatchLayout(1, 24, 2)).startswith("world size 2 -> 1, train.grad_accum 1 -> 2;")


def test_position_in_samples_also_from_checkpoints_that_counted_batches():
    assert epoch_position({"epoch_sample": 96}, None) == 96
    assert epoch_position({"next_batch": 3}, BatchLayout(2, 16, 1)) == 96  # 3 micro-batches of 16 on 2 ranks
    assert epoch_position({"next_batch": 0}, None) == 0
    with pytest.raises(ConfigError, match="world size it was written with"):
        epoch_position({"next_batch": 3}, None)


def write_checkpoint(run_dir: Path, step: int, world_size: int, batch_size: int, grad_accum: int) -> Path:
    folder = run_dir / "checkpoints" / f"step-{step}"
    folder.mkdir(parents=True)
    config = {"data": {"batch_size": batch_size}, "train": {"grad_accum": grad_accum}}
    (folder / "manifest.json").write_text(json.dumps({"step": step, "world_size": world_size, "config": config}))
    return folder


def test_check_resume_reads_the_newest_manifest(tmp_path):
    check_resume(tmp_path, "auto", 3, 32, 1)  # nothing to resume: nothing to check
    write_checkpoint(tmp_path, 5, 2, 32, 1)
    newest = write_checkpoint(tmp_path, 10, 2, 32, 1)
    (tmp_path / "checkpoints" / ".tmp-step-15").mkdir()  # an unfinished save is not a checkpoint
    assert layout_of(json.loads((newest / "manifest.json").read_text()), {"data": {}}) is None
    check_resume(tmp_path, "auto", 4, 32, 1)
    check_resume(tmp_path, "none", 3, 32, 1)  # a fresh start keeps nothing
    with pytest.raises(ConfigError, match="step-10 was trained with a global batch of 64"):
        check_resume(tmp_path, "auto", 3, 32, 1)
    with pytest.raises(ConfigError, match="step-5 was trained"):
        check_resume(tmp_path, str(tmp_path / "checkpoints" / "step-5"), 3, 32, 1)


def test_the_resume_check_imports_no_torch():
    code = "import sys, rkan_dist.resume; print(sorted(m for m in ('torch', 'numba', 'ffcv') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr
