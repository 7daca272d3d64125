"""Exact evaluation over the whole val set, and `rkan-dist eval CHECKPOINT_OR_EXPORT --config ...`.

Every rank sums loss and top-1/top-5 hits over its own shard (the val loaders give each sample
to exactly one rank) and a single all-reduce adds the shards: the result is the same for any
number of ranks, with no sample dropped or counted twice.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `rkan-dist eval`'s user errors come before it
    import torch
    from torch import nn


def evaluate_loader(forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device,
                    flip_tta: bool = False) -> dict[str, float]:
    import torch

    from rkan_dist import distributed as dist_utils
    from rkan_dist.metrics import topk_correct

    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, samples
    with torch.no_grad():
        for images, labels in loader:
            logits = forward(images).float()
            if flip_tta:
                logits = (logits + forward(images.flip(3)).float()) / 2
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            top1, top5 = topk_correct(logits, labels, (1, 5))
            totals += torch.tensor([float(loss), top1, top5, labels.shape[0]], dtype=torch.float64, device=device)
    totals = dist_utils.all_reduce_sum(totals)
    samples = max(float(totals[3]), 1.0)
    return {"top1": float(totals[1]) / samples, "top5": float(totals[2]) / samples,
            "loss": float(totals[0]) / samples, "samples": float(totals[3])}


def autocast_for(precision: str, device: torch.device):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def forward_in_precision(module: nn.Module, precision: str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module` as the training engines run it: under autocast for bf16/fp16, on fp32 images for fp32
    (the CUDA loaders yield fp16 images)."""
    from rkan_dist.engines.base import input_for_precision

    def forward(images: torch.Tensor) -> torch.Tensor:
        with autocast_for(precision, device):
            return module(input_for_precision(images, precision))

    return forward


def _check_val_data(config) -> None:
    """Eval reads only the val data: that alone must exist (a missing train file is no concern here)."""
    from pathlib import Path

    from rkan_dist.config import ConfigError

    if config.data.dataset == "digits":
        return
    value = config.data.val_path
    if not value:
        raise ConfigError("data.val_path is not set (the val data to evaluate on)")
    path = Path(value).expanduser()
    if config.data.format == "ffcv" and not path.is_file():
        raise ConfigError(f"data.val_path: no such .beton file {value!r}")
    if config.data.format == "folder" and not path.is_dir():
        raise ConfigError(f"data.val_path: no such ImageFolder directory {value!r}")


def main(argv: list[str] | None = None) -> int:
    import dataclasses
    from pathlib import Path

    from rkan_dist.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="rkan-dist eval", description="Evaluate a step-N checkpoint folder or an "
                                     "export on the val data (exact across ranks). Reads only the val data.")
    parser.add_argument("weights", help="checkpoint folder (runs/x/checkpoints/step-N), run folder (runs/x: its "
                                        "latest valid checkpoint) or `rkan-dist export` file")
    parser.add_argument("--config", default=None,
                        help="recipe whose model and data sections are used; the weights must fit its model. "
                             "Default: a checkpoint's own run config (runs/x/config.yaml); for an export, the model "
                             "stored in it and the data from the overrides (data.val_path=...)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)
    weights = Path(args.weights)
    config_path = args.config
    if config_path is None and weights.is_dir():  # a run's own config: runs/x/config.yaml
        run_dir = weights if (weights / "checkpoints").is_dir() else weights.parent.parent
        config_path = run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else None
    try:
        if not weights.exists():
            raise ConfigError(f"no checkpoint, run folder or export at {weights}")
        config = load_config(config_path, args.overrides)
        _check_val_data(config)
    except ConfigError as err:
        print(f"rkan-dist eval: error: {err}", file=sys.stderr)
        return 2

    from rkan_dist import distributed as dist_utils
    from rkan_dist.data import build_val_loader
    from rkan_dist.export import describe_model, model_config_from_options
    from rkan_dist.manifest import CheckpointError
    from rkan_dist.models import build_model
    from rkan_dist.threads import configure_threads
    from rkan_dist.weights import first_mismatch, read_weights, resolve_checkpoint

    try:
        state, options = read_weights(weights)
        if args.config is None and options is not None:
            config.model = model_config_from_options(options)  # the weights say which model they are
        elif config_path is None:
            raise CheckpointError(f"{weights} records no model options (a bare state_dict): pass --config with "
                                  "the recipe it was trained with")
        # The weights replace whatever `pretrained` would load: build without it.
        model = build_model(dataclasses.replace(config.model, pretrained=""))
        mismatch = first_mismatch(model.state_dict(), state)
        if mismatch is not None:
            saved = f"; the weights were saved from {describe_model(options)}" if options else ""
            raise CheckpointError(f"{weights} does not fit the configured model ({describe_model(vars(config.model))}): "
                                  f"{mismatch}{saved}")
        model.load_state_dict(state, strict=True)
    except CheckpointError as err:
        print(f"rkan-dist eval: error: {err}", file=sys.stderr)
        return 2
    info = dist_utils.init(config.train.device)
    try:
        model = model.to(info.device).eval()
        channels_last = config.train.channels_last and info.device.type == "cuda"  # as the trainer decides
        if channels_last:
            import torch

            model = model.to(memory_format=torch.channels_last)
        try:
            threads = configure_threads(config.data.num_workers)  # this node's cores, shared by its ranks
            val_loader = build_val_loader(dataclasses.replace(config.data, num_workers=threads.data),
                                          device=info.device, channels_last=channels_last)
        except ValueError as err:  # an unreadable or truncated val file, a class list that does not parse
            print(f"rkan-dist eval: error: {str(err).splitlines()[0]}", file=sys.stderr)
            return 2

        from rkan_dist.precision import resolve_precision

        precision, _ = resolve_precision(config.train.precision, info.device)  # auto: what this machine is fast at
        forward = forward_in_precision(model, precision, info.device)
        result = evaluate_loader(forward, val_loader, info.device, config.train.flip_tta)
        if info.is_main:
            # full precision: multi-rank and single-process evaluations are compared for equality
            print(f"top1={result['top1']!r} top5={result['top5']!r} loss={result['loss']!r} "
                  f"samples={int(result['samples'])}")
            checkpoint = resolve_checkpoint(weights)
            if checkpoint.parent.name == "checkpoints" and (checkpoint.parent.parent / "config.yaml").is_file():
                from rkan_dist.run_summary import record_evaluation

                record_evaluation(checkpoint.parent.parent, checkpoint, result)  # a run's checkpoint: its summary
        return 0
    finally:
        dist_utils.shutdown()
