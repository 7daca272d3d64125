"""Every RKAN aggregation trains under DDP on 2 gloo processes, all in one torchrun launch.

    torchrun --standalone --nproc_per_node 2 aggregation_checks.py OUT_DIR

For each aggregation (and once more with freeze_backbone and scaling) a small RKAN-ResNet-18 with
branches on stages 1 and 4 takes two optimizer steps through the DDP engine, each rank on its own
data. Rank 0 writes OUT_DIR/aggregations.json; tests/integration/test_aggregations_ddp.py asserts.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from rkan_dist import distributed, parallel
from rkan_dist.config import OptimConfig, ParallelConfig
from rkan_dist.models import create_model
from rkan_dist.models.rkan import AGGREGATIONS
from rkan_dist.optim import build_optimizer

PER_RANK_BATCH = 4
IMAGE_SIZE = 16
STEPS = 2


def checksums(model: torch.nn.Module) -> dict[str, list[float]]:
    """fp64 sum and sum of squares of every parameter: equal tensors give equal sums. (BatchNorm
    statistics differ between the ranks until DDP broadcasts rank 0's at the next forward.)"""
    return {name: [float(p.detach().double().sum()), float(p.detach().double().square().sum())]
            for name, p in model.named_parameters()}


def run(info, name: str, **options) -> dict:
    torch.manual_seed(0)  # the same initial weights on both ranks (DDP broadcasts rank 0's anyway)
    model = create_model("rkan_resnet18", num_classes=10, small_input=True, rkan_stages=(1, 4), aggregation=name,
                         **options)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, OptimConfig(lr=0.05, weight_decay=5e-4))
    engine = parallel.wrap(model, optimizer, parallel_config=ParallelConfig(backend="ddp"), precision="fp32",
                           grad_accum=1, grad_clip=0.0, device=info.device, dist_info=info,
                           micro_batch_size=PER_RANK_BATCH)
    generator = torch.Generator().manual_seed(100 + info.rank)  # each rank its own data
    engine.train()
    losses, without_grad = [], set()
    for _ in range(STEPS):
        images = torch.randn(PER_RANK_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        labels = torch.randint(0, 10, (PER_RANK_BATCH,), generator=generator)
        loss = F.cross_entropy(engine.forward(images), labels)
        engine.backward(loss)
        without_grad |= {n for n, p in engine.module.named_parameters() if p.requires_grad and p.grad is None}
        result = engine.step()
        assert result.applied
        losses.append(float(distributed.all_reduce_sum(loss.detach().reshape(1).clone())) / info.world_size)
    after = engine.module.state_dict()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    mine, rank0 = checksums(engine.module), distributed.broadcast_object(checksums(engine.module))
    agree = distributed.all_reduce_sum(torch.tensor([float(mine == rank0)]))
    return {
        "losses": losses,
        "finite": all(math.isfinite(v) for v in losses),
        "without_grad": sorted(without_grad),
        "ranks_agree": int(agree.item()) == info.world_size,
        "changed": changed,
        "aggregation_parameters": sorted(n for n, _ in engine.module.named_parameters() if ".aggregate." in n),
        "trainable": sorted(n for n, p in engine.module.named_parameters() if p.requires_grad),
        "backbone_bn_train": sorted({m.training for n, m in engine.module.named_modules()
                                     if isinstance(m, torch.nn.BatchNorm2d) and ".rkan." not in n}),
    }


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    info = distributed.init("cpu")
    try:
        results = {name: run(info, name) for name in AGGREGATIONS}
        results["cbam+freeze_backbone+scaling"] = run(info, "cbam", freeze_backbone=True, scaling=True)
        if info.is_main:
            (out / "aggregations.json").write_text(json.dumps(results, indent=1))
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
    # As engine_checks.py: leave without interpreter teardown of the engines made here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
