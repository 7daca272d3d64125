"""The library releases rkan-dist's patches of private upstream code were tested on, and the check
that refuses any other release before a patch is applied.

The patches (rkan_dist.engines.deepspeed_zero_gloo, rkan_dist.engines.deepspeed_checkpoint_writes,
rkan_dist.data.ffcv_loader_patch) replace, wrap or copy code that is no public API: another
release may rename it, change its arguments or stop calling it, and the patch then fails inside a
training step or silently does nothing. Each patch module names the release it was tested on
(`TestedRelease`, the same pin as pyproject.toml and constraints.txt;
tests/unit/test_upstream_versions.py keeps them equal) and calls `require` where it patches, so
an install that took another release (`pip install .` next to an existing DeepSpeed) stops with
one line instead.

One release, not a range: DeepSpeed changes these internals within a minor series. 0.19.5's
ZeRO-1/2 converts gradients with `.double()` and has no `get_norm_dtype` to replace (the fp32
norms would silently not apply there), and its stage_1_and_2.py has 3153 lines against 0.19.8's
4115. A new release is taken by testing it, then moving each patch module's TESTED and the pins
in pyproject.toml and constraints.txt together.
"""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from rkan_dist.config import ConfigError


class UntestedVersionError(ConfigError):
    """An installed library release that a patch of its internals was not tested on."""


@dataclass(frozen=True)
class TestedRelease:
    """The one release of `package` that the patches in `patched_by` were tested on."""

    package: str  # the distribution name pip installs it under
    version: str  # the tested release; pyproject.toml pins "<package>==<version>"
    patches: str  # what the patches touch, for the error line
    patched_by: str  # the module holding the patches, for the error line

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def check_version(tested: TestedRelease, installed: str | None) -> None:
    """UntestedVersionError naming both releases unless `installed` is the tested one (pure).

    PEP 440 matching: a local build of the tested release (0.19.8+cu128) passes, as pip's own
    `==0.19.8` does; a pre-release, a post-release or any other release does not.
    """
    try:
        ok = installed is not None and Version(installed) in SpecifierSet(f"=={tested.version}")
    except InvalidVersion:
        ok = False
    if not ok:
        found = (f"{tested.package} {installed} is installed" if installed is not None
                 else f"no installed {tested.package} release is recorded (package metadata)")
        raise UntestedVersionError(
            f"{found}, but {tested.patched_by} patches {tested.patches} and is tested on {tested.package} "
            f"{tested.version} only; `make setup` installs the tested versions (constraints.txt)")


@functools.cache
def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def require(tested: TestedRelease) -> None:
    """`check_version` on the release this process imports (looked up once per package)."""
    check_version(tested, installed_version(tested.package))
