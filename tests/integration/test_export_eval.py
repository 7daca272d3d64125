"""Exports describe themselves: `rkan-dist export` -> `rkan_dist.load_model(path)` with no config, and
`rkan-dist eval` on an export or a checkpoint reads only the val data and refuses weights that do
not fit the configured model in one line (exit 2)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainrun import DEMO, REPO, base_overrides, eval_record, run_train
from trainrun import test_env as child_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
STEPS = 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_cache) -> Path:
    """One process, two steps, the demo's model: a real checkpoint to export and evaluate."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    run_train(1, base_overrides(run_dir, digits_cache, steps=STEPS, batch_size=8))
    return run_dir


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rkan_dist.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=child_env(), timeout=300)


def eval_fields(result: subprocess.CompletedProcess) -> dict[str, float]:
    assert result.returncode == 0, result.stderr[-3000:]
    return {key: float(value) for key, value in (item.split("=") for item in result.stdout.split())}


@pytest.fixture(scope="module")
def export(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "model.pt"
    result = cli("export", str(run_dir / "checkpoints" / f"step-{STEPS}"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rkan_resnet18, num_classes=10" in result.stdout
    return out


def test_export_holds_the_weights_and_every_model_option(run_dir, export):
    from rkan_dist.config import ModelConfig, load_config
    from rkan_dist.weights import load_model_state

    data = torch.load(export, map_location="cpu", weights_only=True)
    recipe = load_config(DEMO).model
    assert data["model_config"] == dataclasses.asdict(recipe)  # name, num_classes and every model.* value
    assert set(data["model_config"]) == {field.name for field in dataclasses.fields(ModelConfig)}
    state = load_model_state(run_dir / "checkpoints" / f"step-{STEPS}")
    assert data["state_dict"].keys() == state.keys()
    assert all(torch.equal(data["state_dict"][key], state[key]) for key in state)


@pytest.mark.numerics
def test_load_model_rebuilds_the_model_with_no_config(run_dir, export):
    from rkan_dist import create_model, load_model
    from rkan_dist.weights import load_model_state

    model = load_model(export)
    assert not model.training
    reference = create_model("rkan_resnet18", num_classes=10, small_input=True)
    reference.load_state_dict(load_model_state(run_dir / "checkpoints" / f"step-{STEPS}"), strict=True)
    images = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(model(images), reference.eval()(images), rtol=0, atol=0)
    for folder in (run_dir / "checkpoints" / f"step-{STEPS}", run_dir):  # a step folder, a run folder's latest
        torch.testing.assert_close(load_model(folder)(images), model(images), rtol=0, atol=0)


def test_load_model_of_a_bare_state_dict_says_what_to_do(tmp_path):
    from rkan_dist import create_model, load_model
    from rkan_dist.checkpoint import CheckpointError

    path = tmp_path / "bare.pt"
    torch.save(create_model("resnet18", num_classes=4).state_dict(), path)
    with pytest.raises(CheckpointError, match="records no model options.*create_model"):
        load_model(path)


@pytest.mark.numerics
def test_eval_of_an_export_needs_only_the_val_data(run_dir, export, digits_cache):
    """The train file does not exist; the export's model is used (no --config: it describes itself)."""
    from rkan_dist.data.demo import ensure_digits

    val = ensure_digits(digits_cache).val_beton
    result = cli("eval", str(export), "data.train_path=/nonexistent/train.beton", f"data.val_path={val}",
                 "data.val_res=16", "data.crop_ratio=1.0", "data.val_batch_size=128", "data.num_workers=1",
                 "train.precision=fp32")
    fields = eval_fields(result)
    trained = eval_record(run_dir)
    assert int(fields["samples"]) == 360
    assert fields["top1"] == trained["eval/top1"] and fields["top5"] == trained["eval/top5"]


def test_eval_of_a_run_folder_joins_its_summary(run_dir):
    """`rkan-dist eval RUN_DIR` evaluates its latest checkpoint and records the figures in the run's
    summary.json, beside what training measured (issue 21: a run writes its summary when it ends or
    is evaluated)."""
    import json

    fields = eval_fields(cli("eval", str(run_dir), "data.num_workers=1", "train.precision=fp32"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["model"] == "rkan_resnet18"
    (evaluation,) = summary["evaluations"]
    assert evaluation["checkpoint"] == str(run_dir / "checkpoints" / f"step-{STEPS}")
    assert (evaluation["top1"], evaluation["top5"], evaluation["samples"]) == (
        fields["top1"], fields["top5"], fields["samples"])


def test_eval_of_weights_that_do_not_fit_the_configured_model_is_one_line(run_dir, digits_cache):
    result = cli("eval", str(run_dir / "checkpoints" / f"step-{STEPS}"), "--config", str(DEMO),
                 "model.num_classes=100", f"data.cache_dir={digits_cache}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert "fc.weight has shape [10, 512] in the weights but [100, 512] in the model" in result.stderr
    assert "saved from rkan_resnet18, num_classes=10" in result.stderr


def test_export_of_a_missing_folder_exits_2(tmp_path):
    """(eval's user errors: tests/unit/test_export.py; eval of a run folder: the README tour test)"""
    result = cli("export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.pt"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert str(tmp_path / "nothing") in result.stderr and not (tmp_path / "x.pt").exists()
