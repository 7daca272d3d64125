"""Reading step checkpoints without torch: list them, check them against their manifests, find the latest valid one.

`rkan-dist status` and the launchers read checkpoints through this module alone, so they stay
quick; rkan_dist.checkpoint writes them (see there for the layout) and re-exports these names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("rkan_dist.checkpoint")

MANIFEST = "manifest.json"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason."""


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def list_checkpoints(run_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """Complete-looking checkpoints (renamed, with a manifest), oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for path in root.iterdir():
            name = path.name
            if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit() and (path / MANIFEST).is_file():
                found.append(CheckpointInfo(int(name[len(STEP_PREFIX):]), path))
    return sorted(found, key=lambda info: info.step)


def validate(path: str | os.PathLike) -> dict:
    """The manifest of a complete checkpoint whose files all match it; CheckpointError otherwise."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (the save did not complete)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable ({err})") from None
    for relative, expected in manifest["files"].items():
        file = path / relative
        if not file.is_file():
            raise CheckpointError(f"{path}: missing file {relative}")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"{path}: {relative} has {file.stat().st_size} bytes, expected {expected['bytes']}")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch in {relative}")
    return manifest


def checkpoint_time(path: str | os.PathLike | None) -> float | None:
    """When a complete checkpoint was written (its manifest's `created`); None for no checkpoint."""
    if path is None:
        return None
    with contextlib.suppress(OSError, ValueError, TypeError):
        return float(json.loads((Path(path) / MANIFEST).read_text())["created"])
    return None


def latest_valid(run_dir: str | os.PathLike) -> CheckpointInfo | None:
    """The newest checkpoint that validates; corrupt newer ones are reported and passed over."""
    for info in reversed(list_checkpoints(run_dir)):
        try:
            validate(info.path)
            return info
        except CheckpointError as err:
            log.warning("skipping corrupt checkpoint: %s", err)
    return None
