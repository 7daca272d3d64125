"""Exports that describe themselves: `rkan-dist export` writes a checkpoint's fp32 weights with the
model options, and load_model(path) rebuilds the model from an export, a checkpoint or a run folder.

The one place that reads weights (rkan_dist.weights) and also needs the config and the models;
rkan_dist.models reads pretrained exports through rkan_dist.weights, never through here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rkan_dist import __version__
from rkan_dist.manifest import CheckpointError
from rkan_dist.weights import EXPORT_FORMAT, first_mismatch, read_weights, resolve_checkpoint

if TYPE_CHECKING:  # torch is imported where it is used: `rkan-dist export` reports a bad path before it
    import torch


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
    import torch

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
