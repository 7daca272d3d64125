"""Training stall per checkpoint save, in units of one training step, against model size.

For each model: the median time of a training step (one process, DDP engine, fp32, CPU) and the
median time of a complete CheckpointManager.save (model + optimizer + RNG files, fsync, manifest
with SHA-256, rename) side by side in one run. The demo row (rkan_resnet18, 16 px, batch 32 as
configs/demo.yaml) gives `checkpoint_stall_steps`.

    python -m bench.checkpoint [--quick] [--json FILE]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import bench_main

# (model, input px, batch, small_input): the demo setting first, then ImageNet-sized models.
CASES = [
    ("rkan_resnet18", 16, 32, True),
    ("rkan_resnet50", 64, 8, False),
    ("rkan_resnet101", 64, 8, False),
]


def measure(name: str, resolution: int, batch: int, small_input: bool, repeats: int, folder: Path) -> dict:
    from rkan_dist import distributed
    from rkan_dist.checkpoint import CheckpointManager
    from rkan_dist.config import OptimConfig, ParallelConfig
    from rkan_dist.models import create_model
    from rkan_dist.optim import build_optimizer
    from rkan_dist.parallel import wrap
    from rkan_dist.rng import rng_state

    info = distributed.init("cpu")
    model = create_model(name, num_classes=10 if small_input else 1000, small_input=small_input)
    engine = wrap(model, build_optimizer(model, OptimConfig()), parallel_config=ParallelConfig(), precision="fp32",
                  grad_accum=1, grad_clip=0.0, device=info.device, dist_info=info, micro_batch_size=batch)
    images = torch.randn(batch, 3, resolution, resolution)
    labels = torch.randint(0, 10, (batch,))

    def train_step() -> None:
        loss = torch.nn.functional.cross_entropy(engine.forward(images), labels)
        engine.backward(loss)
        engine.step()

    manager = CheckpointManager(folder / name, keep=2, rank=0, world_size=1)
    train_step()  # warm-up: allocations and optimizer state exist before timing
    step_times, save_times = [], []
    for index in range(repeats):
        started = time.perf_counter()
        train_step()
        step_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        path = manager.save(index + 1, engine, {"trainer": {"global_step": index + 1}}, {"rng": rng_state()})
        save_times.append(time.perf_counter() - started)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    step_s, save_s = statistics.median(step_times), statistics.median(save_times)
    return {"model": name, "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "checkpoint_mb": size / 1e6, "step_s": step_s, "save_s": save_s, "stall_steps": save_s / step_s}


def run(quick: bool = False) -> dict:
    repeats = 3 if quick else 5
    cases = CASES[:2] if quick else CASES
    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(*case, repeats=repeats, folder=Path(folder)) for case in cases]
    print(f"{'model':16s} {'params M':>9s} {'ckpt MB':>8s} {'step s':>8s} {'save s':>8s} {'stall (steps)':>14s}")
    for row in rows:
        print(f"{row['model']:16s} {row['parameters_m']:9.2f} {row['checkpoint_mb']:8.1f} {row['step_s']:8.3f} "
              f"{row['save_s']:8.3f} {row['stall_steps']:14.2f}")
    demo = rows[0]
    print(f"demo stall per save: {demo['stall_steps']:.2f} steps (goal <= 1; saves are synchronous)")
    return {"checkpoint_stall_steps": demo["stall_steps"], "rows": rows}


def main(argv: list[str] | None = None) -> int:
    return bench_main(run, __doc__, 'two models, 3 saves each', argv)


if __name__ == "__main__":
    sys.exit(main())
