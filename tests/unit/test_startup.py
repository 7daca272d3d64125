"""Fast to answer: the static name tables match torch's, and user errors come before heavy imports."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

HEAVY = ("torch", "torchvision", "ffcv", "numba", "deepspeed")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_", "TORCHELASTIC_", "SLURM_",
                      "SUBMITIT_")


def test_static_backbone_names_are_torchvisions():
    from rkan_dist.models.registry import backbone_names
    from rkan_dist.names import BACKBONES, list_models

    assert sorted(BACKBONES) == backbone_names()
    assert list_models() == sorted(backbone_names() + ["rkan_" + name for name in backbone_names()])


def test_list_models_is_cheap():
    heavy, result = _heavy_modules_after("import rkan_dist\nassert 'rkan_resnet50' in rkan_dist.list_models()")
    assert result.returncode == 0, result.stderr
    assert heavy == []


def test_static_aggregation_names_are_the_models():
    from rkan_dist.models.rkan import AGGREGATIONS
    from rkan_dist.names import AGGREGATIONS as NAMES

    assert tuple(AGGREGATIONS) == NAMES


def _heavy_modules_after(code: str) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run `code` in a fresh interpreter; which heavy packages did it import?"""
    probe = code + f"\nimport sys\nprint('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    # a fresh command line's environment: no launcher variables an earlier test exported in this process
    env = {name: value for name, value in os.environ.items() if not name.startswith(LAUNCHER_VARIABLES)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    line = next(line for line in result.stdout.splitlines() if line.startswith("HEAVY="))
    return [name for name in line[len("HEAVY="):].split(",") if name], result


@pytest.mark.parametrize("argv", [
    ["train", "--config", "no/such.yaml"],
    ["train", "--config", "configs/demo.yaml", "train.bogus=1"],
    ["train", "--config", "configs/demo.yaml", "model.name=rkan_resnet5O"],
    ["train", "--config", "configs/demo.yaml", "data.dataset=files", "data.train_path=/no/such.beton"],
    ["train", "--config", "configs/demo.yaml", "--nproc", "2", "train.precision=fp8"],
    ["config", "show", "configs/demo.yaml", "optim.lr=-1"],
])
def test_user_errors_come_before_heavy_imports(argv):
    heavy, result = _heavy_modules_after(
        f"from rkan_dist.cli import main\nprint('RC=%d' % main({argv!r}))")
    assert "RC=2" in result.stdout, result.stdout + result.stderr
    assert result.stderr.startswith("rkan-dist: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert heavy == [], f"{argv} imported {heavy} before reporting: {result.stderr}"


@pytest.mark.parametrize("argv", [
    ["write", "--src", "/no/such/folder", "--out", "/tmp/x.beton"],
    ["write", "--src", ".", "--out", "/tmp/x.beton", "--quality", "101"],
    ["submit", "--config", "no/such.yaml"],
    ["export", "/no/such/run", "--out", "/tmp/x.pt"],
    ["eval", "/no/such/run", "--config", "configs/demo.yaml"],
])
def test_delegated_commands_check_their_arguments_before_heavy_imports(argv):
    heavy, result = _heavy_modules_after(f"from rkan_dist.cli import main\nprint('RC=%d' % main({argv!r}))")
    assert "RC=2" in result.stdout, result.stdout + result.stderr
    assert "error" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert heavy == [], f"{argv} imported {heavy} before reporting: {result.stderr}"


def test_parent_relaunches_under_torchrun_without_importing_torch(tmp_path):
    argv = ["train", "--config", "configs/demo.yaml", "--nproc", "2", "train.max_steps=1", f"train.run_dir={tmp_path}"]
    heavy, result = _heavy_modules_after(
        "from rkan_dist import cli\n"
        "cli._relaunch_with_torchrun = lambda nproc, argv, run_dir, max_restarts: print('RELAUNCH', nproc, argv) or 0\n"
        f"print('RC=%d' % cli.main({argv!r}))")
    assert "RELAUNCH 2" in result.stdout and "RC=0" in result.stdout, result.stdout + result.stderr
    assert heavy == []


def test_every_name_the_package_exports_resolves() -> None:
    """rkan_dist's public names are imported on first use from the module named in its table; a name
    whose module moved must still resolve (the Python API imports `Interrupted` from the package)."""
    import rkan_dist

    for name in rkan_dist.__all__:
        assert getattr(rkan_dist, name) is not None, name
