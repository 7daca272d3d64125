"""Step checkpoints that survive crashes: `<run_dir>/checkpoints/step-<N>/`, atomic, keep-k, latest-valid.

A save writes everything into `.tmp-step-<N>/` (the engine's files, collectively for DeepSpeed
ZeRO; one small file of RNG state per rank), fsyncs it, then rank 0 writes `manifest.json` with a
SHA-256 of every file and renames the folder to `step-<N>`. A folder without a manifest, or whose
files do not match it, is never resumed from: a crash at any moment leaves the previous
checkpoint loadable. A save that fails on any rank (disk full, quota, permissions) removes its
folder and raises CheckpointSaveError, one line naming the folder and the free space, on every
rank. Our files hold only tensors and plain types and load with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from rkan_dist import __version__
from rkan_dist import distributed as dist_utils
from rkan_dist.faults import Fault
from rkan_dist.manifest import (  # noqa: F401 - also imported from here
    MANIFEST,
    STEP_PREFIX,
    TMP_PREFIX,
    CheckpointError,
    CheckpointInfo,
    _sha256,
    checkpoint_time,
    latest_valid,
    list_checkpoints,
    validate,
)

log = logging.getLogger(__name__)


class CheckpointSaveError(Fault):
    """A save that could not be written (disk full, quota, permissions); the previous checkpoint is intact."""

    kind = "save"


def _attempt(action) -> str | None:
    """None if `action()` wrote what it had to; otherwise why not, in one line.

    torch.save reports a failed write (ENOSPC, EFBIG) as a RuntimeError of its stream writer
    rather than an OSError, so both count as a failed write here."""
    try:
        action()
    except OSError as err:
        return f"{err.strerror or type(err).__name__}: {err.filename}" if err.filename else str(err)
    except RuntimeError as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        return f"could not write a file in full ({first.split('] . ')[-1]})"
    return None


def _free_space(folder: Path) -> str:
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            usage = shutil.disk_usage(candidate)
            return f"{_mib(usage.free)} free of {_mib(usage.total)} on its file system"
    return "free space unknown"


def _checkpoint_bytes(path: Path) -> int:
    """The size its manifest records (0 if unreadable): about what the next save needs."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        return sum(int(entry["bytes"]) for entry in json.loads((path / MANIFEST).read_text())["files"].values())
    return 0


def _mib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


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
        """Collective: the engine's state, our state as its client state, each rank's RNG state.

        Raises CheckpointSaveError on every rank when any rank could not write its part (disk
        full, quota, permissions): the partial folder is removed and the previous checkpoint
        stays the latest. Between the phases the ranks gather each other's outcome instead of
        meeting in a barrier, so a rank that failed alone never leaves the others waiting. (Under
        DeepSpeed the engine holds its write errors back until save_checkpoint's own collectives
        are done: engines/deepspeed_checkpoint_writes.py, write_errors_held_back.)
        """
        started = time.perf_counter()
        final = self.root / f"{STEP_PREFIX}{step}"
        tmp = self.root / f"{TMP_PREFIX}{step}"

        def prepare() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

        def write() -> None:
            engine.save_state(tmp, client_state)
            torch.save(rank_state, tmp / f"rank-{self.rank}.pt")

        def seal() -> None:
            files = _seal_tree(tmp)
            # The resolved config (plain data) makes the checkpoint describe itself: export and
            # eval rebuild its model from it, without torch.load and for DDP and DeepSpeed alike.
            manifest = {"step": step, "world_size": self.world_size, "version": __version__,
                        "created": time.time(), "config": client_state.get("config"), "files": files}
            with open(tmp / MANIFEST, "w") as handle:  # written last: it marks the checkpoint complete
                json.dump(manifest, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            if final.exists():  # a re-save of the same step (e.g. a signal right after a periodic save)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)

        self._agree(step, tmp, _attempt(prepare) if self.rank == 0 else None)
        self._agree(step, tmp, _attempt(write))
        self._agree(step, tmp, _attempt(seal) if self.rank == 0 else None)
        if self.rank == 0:
            self._prune()
        self.last_save_seconds = time.perf_counter() - started
        log.info("saved checkpoint %s in %.2fs", final, self.last_save_seconds)
        return final

    def _agree(self, step: int, tmp: Path, error: str | None) -> None:
        """Every rank's outcome of a save phase on every rank; on any failure, all raise the same error."""
        failed = [(rank, text) for rank, text in enumerate(dist_utils.all_gather_object(error)) if text]
        if not failed:
            return
        free = _free_space(tmp.parent)  # before the partial folder goes: what the save ran into
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        rank, text = failed[0]
        latest = list_checkpoints(self.root.parent)
        if latest:
            size = _checkpoint_bytes(latest[-1].path)
            free += f" ({latest[-1].path.name} took {_mib(size)})" if size else ""
            kept = f"{latest[-1].path.name} stays the latest checkpoint"
        else:
            kept = "no earlier checkpoint exists"
        raise CheckpointSaveError(f"checkpoint of step {step} not saved to {tmp.parent}: rank {rank}: {text}; "
                                  f"{free}; the partial folder is removed and {kept}", rank=rank,
                                  report=self.rank == 0)

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
