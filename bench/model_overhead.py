"""Training throughput, FLOPs and activation memory of rkan_X over X (resnet50, regnet_y_800mf).

    python -m bench.model_overhead [--quick] [--json FILE]

Throughput: SGD training steps of both models interleaved in one process, median step time
after a warm-up step (CPU fp32 NCHW here; CUDA bf16 channels_last when a GPU is present).
Activation memory: bytes autograd saves for backward in one training forward (distinct
storages, parameters excluded, via saved_tensors_hooks). FLOPs: torch.utils.flop_counter at 224 px.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time

import torch

from bench.common import bench_main, saved_storages
from rkan_dist.models import create_model

BACKBONES = ("resnet50", "regnet_y_800mf")


def device_settings() -> tuple[torch.device, torch.dtype | None, torch.memory_format]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16, torch.channels_last
    return torch.device("cpu"), None, torch.contiguous_format


def train_step_seconds(model, optimizer, images, labels, device, autocast_dtype) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def throughput(backbone: str, batch: int, size: int, steps: int) -> dict:
    device, autocast_dtype, memory_format = device_settings()
    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (batch,), device=device)
    runs = {}
    for name in (backbone, "rkan_" + backbone):
        model = create_model(name).to(device, memory_format=memory_format).train()
        runs[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    for model, optimizer in runs.values():  # warm-up (allocator, oneDNN primitives), not timed
        train_step_seconds(model, optimizer, images, labels, device, autocast_dtype)
    times = {name: [] for name in runs}
    for _ in range(steps):  # interleaved so both see the same machine load
        for name, (model, optimizer) in runs.items():
            times[name].append(train_step_seconds(model, optimizer, images, labels, device, autocast_dtype))
    rates = {name: batch / statistics.median(values) for name, values in times.items()}
    return {"backbone_img_s": rates[backbone], "rkan_img_s": rates["rkan_" + backbone],
            "throughput_ratio": rates["rkan_" + backbone] / rates[backbone]}


def saved_activation_bytes(model: torch.nn.Module, images: torch.Tensor) -> int:
    return sum(saved_storages(lambda: model.train()(images), model.parameters())[1].values())


def activation_memory(backbone: str, batch: int) -> dict:
    images = torch.randn(batch, 3, 224, 224)
    sizes = {}
    for name in (backbone, "rkan_" + backbone):
        sizes[name] = saved_activation_bytes(create_model(name), images)
        gc.collect()
    return {"backbone_gib": sizes[backbone] / 2**30, "rkan_gib": sizes["rkan_" + backbone] / 2**30,
            "activation_memory_ratio": sizes["rkan_" + backbone] / sizes[backbone], "memory_batch": batch}


def flops_and_parameters(backbone: str) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    result = {}
    for name in (backbone, "rkan_" + backbone):
        model = create_model(name).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.randn(1, 3, 224, 224))
        result[name] = (counter.get_total_flops(), sum(p.numel() for p in model.parameters()))
    return {"flop_ratio": result["rkan_" + backbone][0] / result[backbone][0],
            "backbone_gflops": result[backbone][0] / 1e9, "backbone_params": result[backbone][1],
            "rkan_params": result["rkan_" + backbone][1]}


def run(quick: bool) -> dict:
    batch, size, steps = (4, 160, 3) if quick else (8, 224, 5)
    memory_batch = 2 if quick else 32
    device, autocast_dtype, memory_format = device_settings()
    figures = {"quick": quick, "device": device.type, "threads": torch.get_num_threads(), "batch": batch,
               "image_size": size, "steps": steps, "autocast": str(autocast_dtype), "channels_last":
               memory_format == torch.channels_last}
    print(f"rkan_X / X on {device.type} ({'bf16 channels_last' if autocast_dtype else 'fp32 NCHW'}), "
          f"train batch {batch} at {size} px, median of {steps} interleaved steps; "
          f"activation memory = bytes saved for backward (saved_tensors_hooks), batch {memory_batch}, 224 px")
    print(f"{'backbone':16} {'X img/s':>8} {'rkan img/s':>10} {'ratio':>6} {'FLOP ratio':>10} {'params X':>11} "
          f"{'params rkan':>12} {'act. mem ratio':>14}")
    for backbone in BACKBONES:
        row = {**throughput(backbone, batch, size, steps), **flops_and_parameters(backbone)}
        if backbone == "resnet50":
            row.update(activation_memory(backbone, memory_batch))
        for key, value in row.items():
            figures[f"rkan_{backbone}_{key}"] = value
        memory = f"{row['activation_memory_ratio']:14.3f}" if "activation_memory_ratio" in row else f"{'-':>14}"
        print(f"{backbone:16} {row['backbone_img_s']:8.2f} {row['rkan_img_s']:10.2f} {row['throughput_ratio']:6.3f} "
              f"{row['flop_ratio']:10.3f} {row['backbone_params']:11,} {row['rkan_params']:12,} {memory}")
    return figures


def main(argv: list[str] | None = None) -> int:
    return bench_main(run, __doc__, 'batch 4 at 160 px, 3 steps (under a minute)', argv)


if __name__ == "__main__":
    sys.exit(main())
