"""One Engine interface over DDP and DeepSpeed; the training loop never branches on the backend.

    engine = parallel.wrap(model, optimizer, parallel_config=config.parallel,
                           precision=config.train.precision, grad_accum=config.train.grad_accum,
                           grad_clip=config.train.grad_clip, device=info.device, dist_info=info,
                           micro_batch_size=config.data.batch_size)
    for images, labels in loader:
        loss = criterion(engine.forward(images), labels)
        engine.backward(loss)
        result = engine.step()          # result.applied on the accumulation boundary

Implementations live in `rkan_dist.engines` (base, ddp, deepspeed_engine).
"""

from __future__ import annotations

import torch
from torch import nn

from rkan_dist.config import ParallelConfig
from rkan_dist.distributed import DistInfo
from rkan_dist.engines.base import PRECISIONS, Engine, StepResult, check_precision

BACKENDS = ("ddp", "deepspeed")


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer, *, parallel_config: ParallelConfig, precision: str,
         grad_accum: int, grad_clip: float, device: torch.device, dist_info: DistInfo,
         micro_batch_size: int | None = None) -> Engine:
    """Put `model` (already built, on any device) and its optimizer behind the chosen backend.

    `micro_batch_size` (images per process per micro-batch) is required by DeepSpeed's config.
    """
    check_precision(precision)
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0 (0 = off), got {grad_clip}")
    backend = parallel_config.backend
    if backend == "ddp":
        from rkan_dist.engines.ddp import DDPEngine

        return DDPEngine(model, optimizer, precision=precision, grad_accum=grad_accum, grad_clip=grad_clip,
                         device=device, world_size=dist_info.world_size, sync_bn=parallel_config.sync_bn,
                         bucket_cap_mb=parallel_config.bucket_cap_mb)
    if backend == "deepspeed":
        from rkan_dist.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, optimizer, precision=precision, grad_accum=grad_accum, grad_clip=grad_clip,
                               device=device, micro_batch_size=micro_batch_size,
                               zero_stage=parallel_config.zero_stage, sync_bn=parallel_config.sync_bn,
                               bucket_cap_mb=parallel_config.bucket_cap_mb)
    raise ValueError(f"parallel.backend={backend!r} is not valid; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "PRECISIONS", "Engine", "StepResult", "wrap"]
