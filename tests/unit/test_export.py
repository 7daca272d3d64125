"""Self-describing exports without a training run: what makes weights not fit a model, and
load_model on an export file written the way `rkan-dist export` writes it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rkan_dist.checkpoint import CheckpointError
from rkan_dist.config import ModelConfig
from rkan_dist.export import load_model, model_config_from_options
from rkan_dist.models import build_model
from rkan_dist.weights import EXPORT_FORMAT, first_mismatch, read_export

pytestmark = pytest.mark.unit


def small_config(**changes) -> ModelConfig:
    return dataclasses.replace(ModelConfig(name="rkan_resnet18", num_classes=10, small_input=True), **changes)


def test_first_mismatch_names_the_key_and_both_shapes() -> None:
    expected = build_model(ModelConfig(name="resnet18", num_classes=10, small_input=True)).state_dict()
    assert first_mismatch(expected, dict(expected)) is None
    other = build_model(ModelConfig(name="resnet18", num_classes=100, small_input=True)).state_dict()
    assert first_mismatch(expected, other) == "fc.weight has shape [100, 512] in the weights but [10, 512] in the model"
    missing = {key: value for key, value in expected.items() if key != "conv1.weight"}
    assert first_mismatch(expected, missing).startswith("conv1.weight (shape [64, 3, 3, 3] in the model) is missing")
    extra = dict(expected, **{"head.weight": torch.zeros(2, 3)})
    assert first_mismatch(expected, extra) == "head.weight (shape [2, 3] in the weights) is not in the model"


def write_export(path, config: ModelConfig, state: dict, **stored) -> None:
    options = dataclasses.asdict(config) | stored
    torch.save({"format": EXPORT_FORMAT, "model_config": options, "state_dict": state}, path)


@pytest.mark.numerics
def test_load_model_rebuilds_every_option_and_ignores_pretrained(tmp_path) -> None:
    """`pretrained` only said where the first weights came from; that file need not exist any more."""
    config = small_config(rkan_stages=[3, 4], degree=2)
    model = build_model(config)
    write_export(tmp_path / "model.pt", config, model.state_dict(), pretrained="/gone/weights.pth")
    loaded = load_model(tmp_path / "model.pt")
    assert not loaded.training
    images = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded(images), model.eval()(images), rtol=0, atol=0)
    state, options = read_export(tmp_path / "model.pt")
    assert options["pretrained"] == "/gone/weights.pth" and state.keys() == model.state_dict().keys()


def test_load_model_refuses_weights_that_do_not_fit_their_description(tmp_path) -> None:
    state = build_model(small_config(num_classes=100)).state_dict()
    write_export(tmp_path / "model.pt", small_config(), state)
    with pytest.raises(CheckpointError, match=r"do not fit rkan_resnet18, num_classes=10: fc.weight has shape "
                                              r"\[100, 512\] in the weights but \[10, 512\] in the model"):
        load_model(tmp_path / "model.pt")


def test_unknown_or_invalid_options_are_one_line(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not know: warp_drive"):
        model_config_from_options({"name": "rkan_resnet18", "num_classes": 10, "warp_drive": True})
    with pytest.raises(CheckpointError, match="not valid here.*degree"):
        model_config_from_options({"name": "rkan_resnet18", "num_classes": 10, "degree": 99})
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a checkpoint or export"):
        read_export(tmp_path / "junk.pt")


@pytest.mark.parametrize("argv", [
    ["eval", "/no/such/model.pt", "--config", "configs/demo.yaml"],
    ["eval", "configs", "data.val_path=/no/such/val.beton"],
    ["eval", "configs", "--config", "configs/demo.yaml", "optim.lr=-1"],
])
def test_eval_user_errors_are_one_line_before_torch_is_imported(argv) -> None:
    import subprocess
    import sys

    probe = (f"import sys\nfrom rkan_dist.cli import main\nprint('RC=%d' % main({argv!r}))\n"
             "print('HEAVY=' + ','.join(m for m in ('torch', 'ffcv', 'numba', 'deepspeed') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "RC=2" in result.stdout and "HEAVY=\n" in result.stdout + "\n", result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "error: " in result.stderr, result.stderr


def test_an_export_starts_a_new_run_as_pretrained_weights(tmp_path) -> None:
    """model.pretrained=<export>.pt: fine-tuning from our own export, on another number of classes."""
    config = small_config()
    source = build_model(config)
    write_export(tmp_path / "model.pt", config, source.state_dict())
    target = build_model(small_config(num_classes=5, pretrained=str(tmp_path / "model.pt")))
    assert target.fc.out_features == 5
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)


def test_pretrained_that_is_no_state_dict_is_one_line(tmp_path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state_dict") as err:
        build_model(small_config(pretrained=str(tmp_path / "list.pt")))
    assert "\n" not in str(err.value)
