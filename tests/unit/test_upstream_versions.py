"""The patches of DeepSpeed's and FFCV's private code accept the release they were tested on, refuse
any other with one line, and pyproject.toml and constraints.txt pin that same release."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rkan_dist import upstream_versions
from rkan_dist.config import ConfigError
from rkan_dist.data import ffcv_loader_patch
from rkan_dist.engines import deepspeed_checkpoint_writes, deepspeed_zero_gloo

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PINS = [deepspeed_zero_gloo.TESTED, deepspeed_checkpoint_writes.TESTED, ffcv_loader_patch.TESTED]


@pytest.mark.parametrize("tested", PINS, ids=lambda tested: tested.patched_by)
def test_the_installed_release_is_the_tested_one(tested):
    upstream_versions.require(tested)  # what each patch runs before it applies
    upstream_versions.check_version(tested, upstream_versions.installed_version(tested.package))


@pytest.mark.parametrize("tested", PINS, ids=lambda tested: tested.patched_by)
def test_a_local_build_of_the_tested_release_passes(tested):
    upstream_versions.check_version(tested, f"{tested.version}+cu128")


@pytest.mark.parametrize("installed", ["0.19.7", "0.19.9", "0.20.0", "0.15.4", "0.19.8rc1", "0.19.8.post1",
                                       "0.19.8.dev0", "not-a-version", None])
def test_any_other_deepspeed_fails_with_one_line_naming_both_releases(installed):
    tested = deepspeed_zero_gloo.TESTED
    with pytest.raises(upstream_versions.UntestedVersionError) as caught:
        upstream_versions.check_version(tested, installed)
    line = str(caught.value)
    assert isinstance(caught.value, ConfigError)  # the CLI prints it as one error line, exit 2
    assert "\n" not in line
    assert line.startswith(f"deepspeed {installed} is installed, " if installed else "no installed deepspeed release")
    assert "rkan_dist/engines/deepspeed_zero_gloo.py patches " in line
    assert "is tested on deepspeed 0.19.8 only; `make setup` installs the tested versions" in line


@pytest.mark.parametrize("installed", ["1.0.0", "1.0.3", "1.1.0"])
def test_any_other_ffcv_fails_with_one_line_naming_both_releases(installed):
    with pytest.raises(upstream_versions.UntestedVersionError, match=rf"^ffcv {re.escape(installed)} is installed, but "
                       r"rkan_dist/data/ffcv_loader_patch\.py patches .* and is tested on ffcv 1\.0\.2 only; "):
        upstream_versions.check_version(ffcv_loader_patch.TESTED, installed)


@pytest.mark.parametrize("tested", PINS, ids=lambda tested: tested.patched_by)
def test_pyproject_and_constraints_pin_the_tested_release(tested):
    tomllib = pytest.importorskip("tomllib")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert tested.requirement in dependencies
    constraints = (ROOT / "constraints.txt").read_text().splitlines()
    assert tested.requirement in constraints
