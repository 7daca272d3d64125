"""Config loading, dotted overrides, and one clear error (exit code 2, no traceback) per bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rkan_dist.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    field_help,
    load_config,
    save_config,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"


def write_yaml(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_load_without_a_file():
    config = load_config()
    assert isinstance(config, Config)
    assert config.model.name == "rkan_resnet50"
    assert config.model.rkan_stages == [4] and config.model.reduce_factor == 2
    assert config.checkpoint.keep == 3 and config.slurm.max_num_timeout == 3


def test_yaml_then_overrides_in_order():
    config = load_config(DEMO, ["optim.lr=0.2", "train.max_steps=100", "model.rkan_stages=[3,4]"])
    assert config.optim.lr == 0.2
    assert config.train.max_steps == 100
    assert config.model.rkan_stages == [3, 4]
    assert config.model.name == "rkan_resnet18"  # from the file
    assert config.schedule.name == "onecycle"


def test_every_field_has_a_one_line_doc():
    docs = field_help()
    assert len(docs) > 60
    undocumented = [key for key, text in docs.items() if not text or "\n" in text]
    assert undocumented == []


@pytest.mark.parametrize("recipe", sorted(path for path in (REPO / "configs").rglob("*.yaml")
                                           if "ablations" not in path.parts),  # grid files: tests/unit/test_grid.py
                         ids=lambda p: p.name)
def test_every_recipe_validates(recipe):
    config = load_config(recipe)  # data paths are only checked when a run starts
    assert config.train.max_epochs >= 1
    text = recipe.read_text()
    assert "Aims at" in text or "aim as" in text, f"{recipe.name} should name the number it aims at"


def test_resolved_config_round_trips_through_the_run_folder(tmp_path):
    config = load_config(DEMO, ["optim.lr=0.3"])
    path = save_config(config, tmp_path / "run")
    assert path.name == "config.yaml"
    again = load_config(path)
    assert again == config
    assert config_from_dict(config_to_dict(config)) == config
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == 0.3


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["optim.lrr=0.2"], "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        (["optm.lr=0.1"], "unknown key 'optm'; did you mean 'optim'?"),
        (["lr=0.1"], "did you mean 'optim.lr'?"),
        (["model.xyzzy=1"], "valid keys in 'model'"),
        (["optim.lr=fast"], "wrong type for 'optim.lr'"),
        (["train.max_steps=1.5"], "wrong type for 'train.max_steps'"),
        (["optim.lr=-1"], "optim.lr must be > 0"),
        (["train.precision=fp8"], "choose one of auto, fp32, bf16, fp16"),
        (["model.rkan_stages=[5]"], "model.rkan_stages entries must be in 1..4"),
        (["data.min_res=256", "data.max_res=128"], "data.min_res (256) must be <= data.max_res (128)"),
        (["parallel.zero_stage=3"], "parallel.zero_stage=3 is not valid"),
        (["optim.lr"], "must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_problem(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, overrides)
    assert expected in str(info.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = write_yaml(tmp_path, "model:\n  nam: resnet50\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'model\.nam'; did you mean 'model\.name'\?"):
        load_config(path)


def test_unreadable_yaml_gives_file_and_line(tmp_path):
    path = write_yaml(tmp_path, "model:\n  name: resnet50\n  num_classes: [1,\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+:\d+"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write_yaml(tmp_path, "- a\n- b\n"))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("no/such/recipe.yaml")


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["model.name=rkan_resnet5O"])
    message = str(info.value)
    assert "model.name='rkan_resnet5O' is not a registered model" in message
    assert "rkan_resnet50" in message and "regnet_y_800mf" in message


def test_missing_data_path_is_checked_when_a_run_starts(tmp_path):
    overrides = ["data.dataset=files", f"data.train_path={tmp_path}/train.beton", f"data.val_path={tmp_path}/val.beton"]
    load_config(DEMO, overrides)  # `config show` does not need the data
    with pytest.raises(ConfigError, match="data.train_path: no such .beton file"):
        load_config(DEMO, overrides, check_paths=True)
    with pytest.raises(ConfigError, match="data.train_path is not set"):
        load_config(DEMO, ["data.dataset=files"], check_paths=True)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rkan_dist.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["config", "show", str(DEMO), "optim.lrr=1"], "did you mean 'optim.lr'?"),
        (["config", "show", str(DEMO), "optim.lr=abc"], "wrong type for 'optim.lr'"),
        (["config", "show", str(DEMO), "optim.momentum=1.5"], "optim.momentum must be in [0, 1)"),
        (["config", "show", str(DEMO), "model.name=resnet9000"], "valid names:"),
        (["train", "--config", str(DEMO), "data.dataset=files", "data.train_path=/nope.beton", "data.val_path=/nope.beton"],
         "no such .beton file '/nope.beton'"),
        (["config", "show", "missing.yaml"], "config file not found"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_no_traceback(args, expected):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("rkan-dist: error:") == 1


def test_cli_unreadable_yaml_exit_2(tmp_path):
    path = write_yaml(tmp_path, "train:\n  seed: [\n")
    result = run_cli("config", "show", str(path))
    assert result.returncode == 2 and f"{path}:" in result.stderr and "Traceback" not in result.stderr


def test_cli_config_show_prints_the_resolved_config():
    result = run_cli("config", "show", str(DEMO), "optim.lr=0.25")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["optim"]["lr"] == 0.25 and shown["model"]["name"] == "rkan_resnet18"
    assert set(shown) == {"model", "data", "optim", "schedule", "train", "parallel", "checkpoint", "logging", "slurm"}


def test_cli_help_for_each_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in ("train", "write", "eval", "export", "submit", "bench", "config"):
        assert name in result.stdout
    train_help = run_cli("train", "--help")
    assert "--nproc" in train_help.stdout and "section.key=value" in train_help.stdout


def test_notebook_api_imports():
    import rkan_dist
    from rkan_dist import Trainer, create_model, load_config

    assert callable(create_model) and callable(load_config) and isinstance(Trainer, type)
    assert rkan_dist.__version__
    with pytest.raises(AttributeError):
        rkan_dist.no_such_name  # noqa: B018
