"""Step checkpoints that survive crashes: `<run_dir>/checkpoints/step-<N>/`, atomic, keep-k, latest-valid.

A save writes everything into `.tmp-step-<N>/` (the engine's files, collectively for DeepSpeed
ZeRO; one small file of RNG state per rank), fsyncs it, then rank 0 writes `manifest.json` with a
SHA-256 of every file and renames the folder to `step-<N>`. A folder without a manifest, or whose
files do not match it, is never resumed from: a crash at any moment leaves the previous
checkpoint loadable. Our files hold only tensors and plain types and load with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rkan_dist import __version__
from rkan_dist import distributed as dist_utils

log = logging.getLogger(__name__)

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


def _fsync_and_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return _sha256(path)


def _seal_tree(folder: Path) -> dict[str, dict]:
    """fsync every file and folder under `folder`; {relative path: sha256 and size} of the files.

    Files are done in parallel threads (hashlib and fsync release the GIL): the model and the
    optimizer state are hashed side by side, which keeps a save at the demo scale under one step.
    """
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(files)))) as pool:
        digests = list(pool.map(_fsync_and_sha256, files))
    for sub in sorted({path.parent for path in files} | {folder}, reverse=True):
        _fsync_dir(sub)
    return {str(path.relative_to(folder)): {"sha256": digest, "bytes": path.stat().st_size}
            for path, digest in zip(files, digests)}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def latest_valid(run_dir: str | os.PathLike) -> CheckpointInfo | None:
    """The newest checkpoint that validates; corrupt newer ones are reported and passed over."""
    for info in reversed(list_checkpoints(run_dir)):
        try:
            validate(info.path)
            return info
        except CheckpointError as err:
            log.warning("skipping corrupt checkpoint: %s", err)
    return None


class CheckpointManager:
    """Saves and finds step checkpoints of one run; every rank holds one and calls save() together."""

    def __init__(self, run_dir: str | os.PathLike, keep: int, *, rank: int, world_size: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        self.resumed_from: Path | None = None
        self.last_save_seconds = 0.0
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(TMP_PREFIX + "*"):  # a save that was killed mid-way
                log.warning("removing incomplete checkpoint %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
        dist_utils.barrier()

    def has_checkpoints(self) -> bool:
        return bool(list_checkpoints(self.root.parent))

    def save(self, step: int, engine: Any, client_state: dict, rank_state: dict) -> Path:
        """Collective: the engine's state, our state as its client state, each rank's RNG state."""
        started = time.perf_counter()
        final = self.root / f"{STEP_PREFIX}{step}"
        tmp = self.root / f"{TMP_PREFIX}{step}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist_utils.barrier()
        engine.save_state(tmp, client_state)
        torch.save(rank_state, tmp / f"rank-{self.rank}.pt")
        dist_utils.barrier()
        if self.rank == 0:
            files = _seal_tree(tmp)
            manifest = {"step": step, "world_size": self.world_size, "version": __version__,
                        "created": time.time(), "files": files}
            with open(tmp / MANIFEST, "w") as handle:  # written last: it marks the checkpoint complete
                json.dump(manifest, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            if final.exists():  # a re-save of the same step (e.g. a signal right after a periodic save)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        dist_utils.barrier()
        self.last_save_seconds = time.perf_counter() - started
        log.info("saved checkpoint %s in %.2fs", final, self.last_save_seconds)
        return final

    def _prune(self) -> None:
        complete = list_checkpoints(self.root.parent)
        for info in complete[: max(len(complete) - self.keep, 0)]:
            # The checkpoint we resumed from stays until a newer one is complete; by the time we
            # prune, the save that triggered this is complete, so it may go now.
            shutil.rmtree(info.path, ignore_errors=True)

    def find_resume_point(self, resume: str) -> Path | None:
        """train.resume: 'auto' -> latest valid here; 'none' -> fresh start; else a given step folder."""
        if resume == "none":
            return None
        if resume == "auto":
            info = latest_valid(self.root.parent)
            if info is None:
                return None
            newest = list_checkpoints(self.root.parent)[-1]
            if newest.step != info.step:
                log.warning("the latest checkpoint (step %d) is unusable; resuming from step %d instead",
                            newest.step, info.step)
            return info.path
        path = Path(resume)
        validate(path)
        return path

    def load_rank_state(self, path: Path) -> dict | None:
        file = path / f"rank-{self.rank}.pt"
        if not file.is_file():  # resumed on more ranks than saved: this rank starts its RNG fresh
            return None
        return torch.load(file, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# Export: a plain state_dict that create_model(...) loads with strict=True.


def load_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Model weights from a checkpoint folder (DDP or DeepSpeed) or an exported .pt file."""
    path = Path(path)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("model", state) if isinstance(state, dict) and "model" in state else state
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint or export at {path}")
    validate(path)
    if (path / "model.pt").is_file():
        state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    elif (path / "engine").is_dir():  # DeepSpeed: consolidate the fp32 weights from the ZeRO shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="engine")
    else:
        raise CheckpointError(f"{path}: neither model.pt (DDP) nor engine/ (DeepSpeed) found")
    return {key.removeprefix("module."): value.float() if value.is_floating_point() else value
            for key, value in state.items()}


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rkan-dist export",
                                     description="Write a checkpoint's model weights as a plain state_dict.")
    parser.add_argument("checkpoint", help="a step-N checkpoint folder")
    parser.add_argument("--out", required=True, help="output .pt file (loads with create_model(...) strict=True)")
    args = parser.parse_args(argv)
    try:
        state = load_model_state(args.checkpoint)
    except CheckpointError as err:
        print(f"rkan-dist: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    print(f"exported {len(state)} tensors to {out}")
    return 0
