"""model.freeze_backbone=true on the demo (2 processes, DDP, gloo, fp32): across 10 steps only the
RKAN branch and the classifier change, the backbone's BatchNorm statistics stay as initialised,
and a run resumed from a step-4 checkpoint ends bitwise where the uninterrupted run does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainrun import DEMO, base_overrides, run_train, train_losses

from rkan_dist.config import load_config
from rkan_dist.models import build_model
from rkan_dist.rng import seed_everything
from rkan_dist.weights import load_model_state

pytestmark = pytest.mark.integration

STEPS = 10


def overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return base_overrides(run_dir, cache, steps=STEPS) + ["model.freeze_backbone=true", "checkpoint.every_steps=4",
                                                         "checkpoint.keep=5", *extra]


def initial_state(run_overrides: list[str]) -> dict[str, torch.Tensor]:
    """The weights the run started from: the Trainer seeds with train.seed, then builds the model."""
    config = load_config(DEMO, run_overrides)
    seed_everything(config.train.seed)
    return {k: v.clone() for k, v in build_model(config.model).state_dict().items()}


@pytest.mark.timeout(600)
@pytest.mark.numerics
def test_freeze_backbone_trains_only_branch_and_classifier_and_resumes_exactly(tmp_path, digits_cache):
    run_dir = tmp_path / "uninterrupted"
    run_train(2, overrides(run_dir, digits_cache))
    initial = initial_state(overrides(run_dir, digits_cache))
    final = load_model_state(run_dir / "checkpoints" / f"step-{STEPS}")
    assert final.keys() == initial.keys()
    changed = {k for k in final if not torch.equal(final[k], initial[k])}
    trainable = {k for k in final if ".rkan." in k or k.startswith("fc.")}
    parameters = {name for name, _ in build_model(load_config(DEMO, overrides(run_dir, digits_cache)).model)
                  .named_parameters()}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    assert trainable & parameters <= changed  # every branch and classifier parameter trained
    backbone_bn = [k for k in final if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                   and ".rkan." not in k]
    assert len(backbone_bn) == 3 * 20 and not changed & set(backbone_bn)  # resnet18's 20 BatchNorm layers
    assert "layer4.rkan.norm2.running_var" in changed  # the branch's own BatchNorm does train

    # resume from the step-4 checkpoint of that run, in a new folder: the same steps 5-10, bitwise
    resumed_dir = tmp_path / "resumed"
    result = run_train(2, overrides(resumed_dir, digits_cache, f"train.resume={run_dir / 'checkpoints' / 'step-4'}"))
    assert "resumed from" in result.stderr and "step 4," in result.stderr
    resumed = load_model_state(resumed_dir / "checkpoints" / f"step-{STEPS}")
    assert [k for k in final if not torch.equal(final[k], resumed[k])] == []
    losses, expected = train_losses(resumed_dir), train_losses(run_dir)
    assert sorted(losses) == list(range(5, STEPS + 1))
    assert all(losses[step] == expected[step] for step in losses)
