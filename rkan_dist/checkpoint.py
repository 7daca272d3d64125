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

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rkan_dist import __version__
from rkan_dist.ledger import Fault
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


class _ImportedOnFirstUse:
    """A module imported when first used: `rkan-dist export` reports a bad path in a fraction of a
    second, before torch (and the process-group code) is imported."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        import importlib

        return getattr(importlib.import_module(self._name), attribute)


torch = _ImportedOnFirstUse("torch")
dist_utils = _ImportedOnFirstUse("rkan_dist.distributed")


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
        are done: engines/deepspeed_engine.py, _write_errors_held_back.)
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


# ---------------------------------------------------------------------------------------------
# Export: the fp32 weights plus the model options, so that load_model(path) rebuilds the model.

EXPORT_FORMAT = "rkan-dist-export/1"
RUN_CONFIG = "config.yaml"


def read_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state_dict, model options or None) of an exported .pt file.

    An export is `{"format": EXPORT_FORMAT, "model_config": {name, num_classes, every model.*
    value}, "state_dict": {name: tensor}}`; a bare state_dict (older exports, torchvision files)
    reads as (it, None). Both load with torch.load(weights_only=True).
    """
    try:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line for the user
        raise CheckpointError(f"{path}: not a checkpoint or export torch.load can read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        return data["state_dict"], data.get("model_config")
    if isinstance(data, dict) and isinstance(data.get("model"), dict):  # {"model": state_dict, ...}
        return data["model"], None
    if isinstance(data, dict) and all(isinstance(value, torch.Tensor) for value in data.values()):
        return data, None
    raise CheckpointError(f"{path}: expected an rkan-dist export or a state_dict (name -> tensor), "
                          f"got {type(data).__name__}")


def checkpoint_config(path: str | os.PathLike) -> dict | None:
    """The resolved config (plain dict) a step-N checkpoint was saved with, or None if unknown.

    Looked for in its manifest, then the DDP client state, then `<run_dir>/config.yaml`
    (checkpoints written before the manifest carried the config).
    """
    path = Path(path)
    manifest = path / MANIFEST
    if manifest.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            config = json.loads(manifest.read_text()).get("config")
            if isinstance(config, dict):
                return config
    client_state = path / "client_state.pt"
    if client_state.is_file():
        with contextlib.suppress(Exception):
            config = torch.load(client_state, map_location="cpu", weights_only=True).get("config")
            if isinstance(config, dict):
                return config
    run_config = path.parent.parent / RUN_CONFIG
    if run_config.is_file():
        import yaml

        with contextlib.suppress(OSError, yaml.YAMLError):
            config = yaml.safe_load(run_config.read_text())
            if isinstance(config, dict):
                return config
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run folder (one holding checkpoints/) stands for its latest valid checkpoint; anything else is itself."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoints").is_dir():
        info = latest_valid(path)
        if info is None:
            raise CheckpointError(f"{path}: no complete checkpoint in {path / 'checkpoints'}")
        return info.path
    return path


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(fp32 state_dict, model options or None) of an exported file, a checkpoint folder or a run folder."""
    path = resolve_checkpoint(path)
    if path.is_file():
        return read_export(path)
    state = load_model_state(path)
    config = checkpoint_config(path)
    return state, (config or {}).get("model")


def load_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Model weights from a checkpoint folder (DDP or DeepSpeed) or an exported .pt file."""
    path = Path(path)
    if path.is_file():
        return read_export(path)[0]
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


def _shape(tensor: torch.Tensor) -> str:
    return str(list(tensor.shape))


def first_mismatch(expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> str | None:
    """The first key (in the model's order) whose weights do not fit `expected`, with both shapes; None if all fit."""
    for key, value in expected.items():
        if key not in weights:
            return f"{key} (shape {_shape(value)} in the model) is missing from the weights"
        if weights[key].shape != value.shape:
            return f"{key} has shape {_shape(weights[key])} in the weights but {_shape(value)} in the model"
    for key, value in weights.items():
        if key not in expected:
            return f"{key} (shape {_shape(value)} in the weights) is not in the model"
    return None


def describe_model(options: dict | None) -> str:
    """'rkan_resnet18, num_classes=10' for messages."""
    if not options:
        return "an unrecorded model"
    return f"{options.get('name')!s}, num_classes={options.get('num_classes')}"


def model_config_from_options(options: dict):
    """A ModelConfig from stored options, with the init-only `pretrained` left at its default (the
    weights come from the export; the file or weights name it named may not exist here)."""
    from rkan_dist.config import Config, ConfigError, ModelConfig, config_from_dict

    known = {field.name for field in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(options) - known)
    options = {key: value for key, value in options.items() if key != "pretrained"}
    if unknown:
        raise CheckpointError(f"the weights record model options this version does not know: {', '.join(unknown)}")
    try:
        config: Config = config_from_dict({"model": options})
    except ConfigError as err:
        raise CheckpointError(f"the model options recorded with the weights are not valid here: {err}") from None
    return config.model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of an export (`rkan-dist export`), a step-N checkpoint or a run folder (its latest
    valid checkpoint), weights loaded, in eval mode.

    No config needed: the model is rebuilt from the options stored with the weights. Raises
    CheckpointError (one line) for a file without model options or weights that do not fit.
    """
    from rkan_dist.models import build_model

    state, options = read_weights(path)
    if options is None:
        raise CheckpointError(f"{path} records no model options (a bare state_dict): build the model with "
                              f"rkan_dist.create_model(name, num_classes, ...) and load_state_dict() it")
    model = build_model(model_config_from_options(options))
    mismatch = first_mismatch(model.state_dict(), state)
    if mismatch is not None:
        raise CheckpointError(f"{path}: the weights do not fit {describe_model(options)}: {mismatch}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rkan-dist export",
                                     description="Write a checkpoint's fp32 weights and model options to one file "
                                                 "that rkan_dist.load_model(path) rebuilds the model from.")
    parser.add_argument("checkpoint", help="a step-N checkpoint folder, or a run folder (its latest valid checkpoint)")
    parser.add_argument("--out", required=True, help="output .pt file: {'format', 'model_config', 'state_dict'}, "
                                                     "loadable with torch.load(weights_only=True)")
    args = parser.parse_args(argv)
    try:
        if not Path(args.checkpoint).is_dir():
            raise CheckpointError(f"{args.checkpoint}: not a checkpoint folder (runs/<name>/checkpoints/step-N) "
                                  f"or a run folder (runs/<name>)")
        from rkan_dist.threads import configure_threads

        configure_threads(num_workers=0)  # no data to read: the process's cores are all compute
        checkpoint = resolve_checkpoint(args.checkpoint)
        state, options = read_weights(checkpoint)
        if options is None:
            raise CheckpointError(f"{args.checkpoint}: no record of the model's options (no config in its manifest, "
                                  f"client state or run folder)")
        model_config = model_config_from_options(options)
    except CheckpointError as err:
        print(f"rkan-dist export: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    export = {"format": EXPORT_FORMAT, "version": __version__,
              "model_config": dataclasses.asdict(model_config) | {"pretrained": options.get("pretrained", "")},
              "state_dict": state}
    torch.save(export, tmp)
    os.replace(tmp, out)
    print(f"exported {len(state)} tensors of {describe_model(options)} from {checkpoint} to {out} "
          f"(rkan_dist.load_model({str(out)!r}) rebuilds it)")
    return 0
