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

import torch
from torch import nn

from rkan_dist import distributed as dist_utils
from rkan_dist.metrics import topk_correct


@torch.no_grad()
def evaluate_loader(forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device,
                    flip_tta: bool = False) -> dict[str, float]:
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, samples
    for images, labels in loader:
        logits = forward(images).float()
        if flip_tta:
            logits = (logits + forward(images.flip(3)).float()) / 2
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        top1, top5 = topk_correct(logits, labels, (1, 5))
        totals += torch.tensor([float(loss), top1, top5, labels.shape[0]], dtype=torch.float64, device=device)
    totals = dist_utils.all_reduce_sum(totals)
    samples = max(float(totals[3]), 1.0)
    return {"top1": float(totals[1]) / samples, "top5": float(totals[2]) / samples,
            "loss": float(totals[0]) / samples, "samples": float(totals[3])}


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def main(argv: list[str] | None = None) -> int:
    from rkan_dist.checkpoint import CheckpointError, load_model_state
    from rkan_dist.config import ConfigError, load_config
    from rkan_dist.data import build_loaders
    from rkan_dist.models import build_model

    parser = argparse.ArgumentParser(prog="rkan-dist eval", description="Evaluate a step-N checkpoint folder or an "
                                     "exported state_dict on the val set of a config (exact across ranks).")
    parser.add_argument("weights", help="checkpoint folder (runs/x/checkpoints/step-N) or exported .pt")
    parser.add_argument("--config", required=True, help="the recipe (model and data sections are used)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)
    try:
        config = load_config(args.config, args.overrides, check_paths=True)
        state = load_model_state(args.weights)
    except (ConfigError, CheckpointError) as err:
        print(f"rkan-dist: error: {err}", file=sys.stderr)
        return 2
    info = dist_utils.init(config.train.device)
    try:
        model = build_model(config.model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            print(f"rkan-dist: error: the weights do not fit model {config.model.name!r}: missing {missing[:8]}, "
                  f"unexpected {unexpected[:8]}", file=sys.stderr)
            return 2
        model = model.to(info.device).eval()
        channels_last = config.train.channels_last and info.device.type == "cuda"  # as the trainer decides
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        _, val_loader = build_loaders(config.data, seed=config.train.seed, device=info.device,
                                      channels_last=channels_last)

        def forward(images: torch.Tensor) -> torch.Tensor:
            with autocast_for(config.train.precision, info.device):
                return model(images)

        result = evaluate_loader(forward, val_loader, info.device, config.train.flip_tta)
        if info.is_main:
            # full precision: multi-rank and single-process evaluations are compared for equality
            print(f"top1={result['top1']!r} top5={result['top5']!r} loss={result['loss']!r} "
                  f"samples={int(result['samples'])}")
        return 0
    finally:
        dist_utils.shutdown()
