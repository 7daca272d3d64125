"""Exact resume with real processes: SIGKILL a 2-process torchrun run, resume with train.resume=auto,
and compare the final weights bitwise with an uninterrupted run (fp32, CPU, gloo)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from trainrun import (
    base_overrides,
    checkpoint_steps,
    kill_group,
    last_step,
    run_train,
    start_train,
    train_losses,
    wait_until,
)

from rkan_dist.checkpoint import validate
from rkan_dist.weights import load_model_state

pytestmark = pytest.mark.integration

STEPS = 20
# 48 images per rank per step -> 14 steps per epoch on the 1,437 digits: the runs cross an epoch end.
BATCH = 48


def overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return base_overrides(run_dir, cache, steps=STEPS, batch_size=BATCH) + ["checkpoint.every_steps=3",
                                                                           "checkpoint.keep=3", *extra]


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    final, expected = load_model_state(run_dir / "checkpoints" / f"step-{STEPS}"), \
        load_model_state(reference / "checkpoints" / f"step-{STEPS}")
    assert final.keys() == expected.keys()
    different = [name for name in final if not torch.equal(final[name], expected[name])]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_same_losses_after(run_dir: Path, reference: Path, resumed_at: int) -> None:
    losses, expected = train_losses(run_dir), train_losses(reference)
    after = [step for step in expected if step > resumed_at]
    assert after and all(losses[step] == expected[step] for step in after), \
        [(s, losses.get(s), expected[s]) for s in after if losses.get(s) != expected[s]][:3]


def kill_then_resume(run_dir: Path, cache: Path, kill_when, *extra: str) -> int:
    """Run until kill_when(run_dir) holds, SIGKILL the whole process group, resume to the end.
    Returns the step the resumed run started from."""
    process = start_train(2, overrides(run_dir, cache, *extra), run_dir.parent / f"{run_dir.name}-killed.log")
    try:
        wait_until(lambda: kill_when(run_dir), timeout=400, process=process, poll=0.02)
    finally:
        kill_group(process)
    result = run_train(2, overrides(run_dir, cache, *extra))
    line = next(line for line in result.stderr.splitlines() if "resumed from" in line)
    return int(line.split("step ")[1].split(",")[0])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(2, overrides(run_dir, digits_cache))
    return run_dir


# Each kill point resumes from another position in the data; the arithmetic, and so what another CPU's
# kernels could change, is the same in each: one of them is enough for the AVX2 lane.
@pytest.mark.parametrize("kill_point", ["mid_epoch", "just_after_save",
                                        pytest.param("next_epoch", marks=pytest.mark.numerics)])
def test_sigkill_then_resume_is_bitwise_identical(kill_point, reference, tmp_path, digits_cache):
    run_dir = tmp_path / "run"
    conditions = {
        # a few steps after the first checkpoint, inside epoch 0 (14 steps)
        "mid_epoch": lambda d: checkpoint_steps(d) and last_step(d) >= 5,
        # the moment step-6 is complete
        "just_after_save": lambda d: 6 in checkpoint_steps(d),
        # in epoch 1, after the epoch-end checkpoint at step 14
        "next_epoch": lambda d: last_step(d) >= 16,
    }
    resumed_at = kill_then_resume(run_dir, digits_cache, conditions[kill_point])
    assert 3 <= resumed_at < STEPS
    assert_same_weights(run_dir, reference)
    assert_same_losses_after(run_dir, reference, resumed_at)
    assert_tensorboard_continues_without_overlap(run_dir)


def assert_tensorboard_continues_without_overlap(run_dir: Path) -> None:
    """The resumed run reopens the same folder; events the killed run wrote past the checkpoint are purged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    accumulator.Reload()
    steps = [event.step for event in accumulator.Scalars("train/loss")]
    assert steps == list(range(1, STEPS + 1))
    assert [event.value for event in accumulator.Scalars("job/restarts")][-1] == 1


def test_truncated_latest_checkpoint_falls_back_to_the_previous(reference, tmp_path, digits_cache):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    latest = run_dir / "checkpoints" / f"step-{STEPS}"
    model_file = latest / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    previous = checkpoint_steps(run_dir)[-2]
    # Continue the same run a little further: it must start from the previous checkpoint.
    result = run_train(2, overrides(run_dir, digits_cache))
    assert f"latest checkpoint (step {STEPS}) is unusable" in result.stderr
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{previous}'}" in result.stderr
    assert_same_weights(run_dir, reference)


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(reference, tmp_path, digits_cache):
    """Save every step, so a good share of the time is spent saving; kill until a kill lands mid-save."""
    run_dir = tmp_path / "run"
    for _ in range(6):
        shutil.rmtree(run_dir, ignore_errors=True)
        process = start_train(2, overrides(run_dir, digits_cache, "checkpoint.every_steps=1"), tmp_path / "killed.log")
        root = run_dir / "checkpoints"
        try:
            wait_until(lambda: len(checkpoint_steps(run_dir)) >= 2 and any(root.glob(".tmp-step-*")),  # noqa: B023
                       timeout=400, process=process, poll=0.005)
        finally:
            kill_group(process)
        if any(root.glob(".tmp-step-*")):
            break
    else:
        pytest.fail("no kill landed inside a save in 6 tries")
    for step in checkpoint_steps(run_dir):
        validate(root / f"step-{step}")  # every complete checkpoint still validates
    result = run_train(2, overrides(run_dir, digits_cache, "checkpoint.every_steps=1"))
    assert "removing incomplete checkpoint" in result.stderr
    assert not any(root.glob(".tmp-step-*"))
    assert_same_weights(run_dir, reference)


def test_resume_none_refuses_a_folder_with_checkpoints(reference, tmp_path, digits_cache):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    result = run_train(1, overrides(run_dir, digits_cache, "train.resume=none"), check=False)
    assert result.returncode == 2
    assert "already holds checkpoints" in result.stderr and "Traceback" not in result.stderr


def test_resume_on_one_process_from_a_two_process_checkpoint(reference, tmp_path, digits_cache):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for step in checkpoint_steps(run_dir)[1:]:  # keep the oldest, resume from there
        shutil.rmtree(run_dir / "checkpoints" / f"step-{step}")
    result = run_train(1, overrides(run_dir, digits_cache, f"train.max_steps={STEPS + 2}"))
    assert "resumed from" in result.stderr
    assert max(train_losses(run_dir)) == STEPS + 2


def test_checkpoint_from_another_model_names_the_mismatching_keys(reference, tmp_path, digits_cache):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    result = run_train(1, overrides(run_dir, digits_cache, "model.name=rkan_resnet34"), check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "does not fit" in result.stderr and "layer" in result.stderr and "Traceback" not in result.stderr


def test_deepspeed_zero1_sigkill_then_resume_is_bitwise_identical(tmp_path, digits_cache):
    extra = ("parallel.backend=deepspeed", "parallel.zero_stage=1")
    reference_dir = tmp_path / "reference"
    run_train(2, overrides(reference_dir, digits_cache, *extra))
    run_dir = tmp_path / "run"
    resumed_at = kill_then_resume(run_dir, digits_cache, lambda d: checkpoint_steps(d) and last_step(d) >= 8, *extra)
    assert resumed_at >= 3
    assert_same_weights(run_dir, reference_dir)
    assert_same_losses_after(run_dir, reference_dir, resumed_at)
