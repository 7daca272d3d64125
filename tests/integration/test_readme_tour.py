"""The README's tour runs as written, each command after the ones before it: write a (generated,
tiny) ImageNet tree to FFCV, train, watch, resume, evaluate, export and load. Step 4 (submit) needs
the Slurm dev cluster: tests/slurm/test_readme_tour_submit.py runs it."""

from __future__ import annotations

import json

import pytest
from readme_tour import (
    REPO,
    SYNSETS,
    TRAIN_PER_CLASS,
    VAL_PER_CLASS,
    localize,
    make_imagenet_tree,
    run,
    scaled,
    tour_steps,
    workspace,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_the_tour_names_the_files_the_recipes_read():
    from rkan_dist.config import load_config

    steps = tour_steps()
    assert sorted(steps) == [1, 2, 3, 4, 5, 6], steps
    recipe = load_config(REPO / "configs" / "imagenet" / "rkan_resnet50.yaml").data
    written = " ".join(steps[1])
    assert f"--out {recipe.train_path}" in written and f"--out {recipe.val_path}" in written
    for step in (2, 4, 5):  # train, submit and resume read the same data
        (command,) = steps[step]
        assert f"data.train_path={recipe.train_path}" in command and f"data.val_path={recipe.val_path}" in command


def train_steps(run_dir) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["step"] for record in records if record.get("kind") == "train"]


def test_readme_tour_runs_as_written(tmp_path):
    steps = tour_steps()
    make_imagenet_tree(tmp_path)
    work = workspace(tmp_path)
    run_dir = work / "runs" / "imagenet" / "rkan_resnet50"

    outputs = [run(scaled(localize(command, tmp_path), max_steps=0), work).stdout for command in steps[1]]
    assert f"wrote {TRAIN_PER_CLASS * len(SYNSETS)} images" in outputs[1] and "skipped 0" in outputs[1]
    assert f"wrote {VAL_PER_CLASS * len(SYNSETS)} images" in outputs[2] and "skipped 0" in outputs[2]

    (train,) = steps[2]
    trained = run(scaled(localize(train, tmp_path), max_steps=2), work)
    assert "final val top-1" in trained.stdout
    assert (run_dir / "checkpoints" / "step-2" / "manifest.json").is_file()

    (watch,) = steps[3]
    inspected = run(scaled(localize(watch, tmp_path), max_steps=0), work, timeout=120)
    assert "train/loss" in inspected.stdout, inspected.stdout[-2000:]

    (resume,) = steps[5]
    resumed = run(scaled(localize(resume, tmp_path), max_steps=4), work)
    assert "resumed from" in resumed.stdout + resumed.stderr and "step-2" in resumed.stdout + resumed.stderr
    assert train_steps(run_dir) == [1, 2, 3, 4]  # continued, not restarted, and no step twice

    evaluated, exported, loaded = (run(scaled(localize(command, tmp_path), max_steps=0), work) for command in steps[6])
    fields = dict(item.split("=") for item in evaluated.stdout.split())
    assert int(fields["samples"]) == VAL_PER_CLASS * len(SYNSETS)
    assert "rkan_resnet18, num_classes=4" in exported.stdout and "step-4" in exported.stdout
    assert loaded.stdout.strip() == "ResNet"
