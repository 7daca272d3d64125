"""Reading a model's weights: an `rkan-dist export` file, a step-N checkpoint folder or a run folder.

The reading side of checkpoints and exports. It depends on torch and rkan_dist.manifest alone, so
that the model registry (whose pretrained weights may be an export), evaluation, export and the
trainer can all read weights here without an import cycle through the config and the models.
rkan_dist.checkpoint writes step checkpoints; rkan_dist.export writes exports and rebuilds models.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from rkan_dist.manifest import MANIFEST, CheckpointError, latest_valid, validate


class _ImportedOnFirstUse:
    """A module imported when first used: `rkan-dist export` imports this module and reports a bad
    path in a fraction of a second, before torch is imported."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        import importlib

        return getattr(importlib.import_module(self._name), attribute)


torch = _ImportedOnFirstUse("torch")

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
