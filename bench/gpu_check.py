"""One prepared GPU check (bench/gpu_check.sh runs it): prints ONE JSON object.

On a CUDA GPU (bf16, channels_last, as the ImageNet recipes train):
  1. KAN conv, fused vs the unfold reference, fwd+bwd time and peak memory at RKANet-50 shapes;
  2. rkan_resnet50 vs resnet50 training images/s, synthetic input, batch 128;
  3. the FFCV train pipeline on the GPU path (normalise on the GPU in fp16) over the digits .beton;
  4. one real DDP training run under torchrun on 1 GPU (NCCL) through the CLI.
Without a GPU every part runs tiny on the CPU, so the script itself stays tested.
Budget: under 8 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kan_conv_check(device: torch.device, full: bool) -> dict:
    from bench.kan_conv import CASES, unfold_kan_conv
    from rkan_dist.models.kan_conv import KANConv2d

    batch, repeats = (32, 10) if full else (2, 2)
    rows = []
    for label, channels, size, stride, degree in CASES:
        channels = channels if full else channels // 16
        conv = KANConv2d(channels, degree=degree, stride=stride).to(device)
        x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
        row = {"case": label}
        for name, fn in (("fused", conv), ("unfold", lambda inp, c=conv: unfold_kan_conv(inp, c))):
            times = []
            for index in range(repeats + 2):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                synchronize(device)
                started = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    out = fn(x)
                out.float().sum().backward()
                synchronize(device)
                if index >= 2:  # two warm-up rounds
                    times.append(time.perf_counter() - started)
            row[f"{name}_ms"] = statistics.median(times) * 1e3
            if device.type == "cuda":
                row[f"{name}_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["speedup"] = row["unfold_ms"] / row["fused_ms"]
        if "fused_peak_mib" in row:
            row["memory_ratio"] = row["unfold_peak_mib"] / row["fused_peak_mib"]
        rows.append(row)
    return {"cases": rows, "kan_conv_speedup": min(r["speedup"] for r in rows)}


def throughput_check(device: torch.device, full: bool) -> dict:
    from rkan_dist.models import create_model

    batch, resolution, steps = (128, 224, 15) if full else (2, 64, 2)
    rates = {}
    models = {}
    for name in ("resnet50", "rkan_resnet50"):
        model = create_model(name).to(device).to(memory_format=torch.channels_last)
        models[name] = (model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    images = torch.randn(batch, 3, resolution, resolution, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)
    timings = {name: [] for name in models}
    for index in range(steps + 3):
        for name, (model, optimizer) in models.items():  # interleaved: both see the same GPU state
            synchronize(device)
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            synchronize(device)
            if index >= 3:
                timings[name].append(time.perf_counter() - started)
    for name, values in timings.items():
        rates[name] = batch / statistics.median(values)
    return {"resnet50_img_s": rates["resnet50"], "rkan_resnet50_img_s": rates["rkan_resnet50"],
            "rkan_resnet50_throughput_ratio": rates["rkan_resnet50"] / rates["resnet50"], "batch": batch,
            "resolution": resolution}


def ffcv_check(device: torch.device, full: bool, cache: Path) -> dict:
    from rkan_dist.config import DataConfig
    from rkan_dist.data import build_loaders

    config = DataConfig(dataset="digits", cache_dir=str(cache), batch_size=256 if full else 32, num_workers=4 if full else 1,
                        min_res=32, max_res=32, val_res=32, crop_ratio=1.0)
    train_loader, _ = build_loaders(config, seed=0, device=device, channels_last=True)
    images_seen, started = 0, None
    for epoch in range(3 if full else 1):
        for index, (images, _) in enumerate(train_loader.batches(epoch)):
            if epoch == 0 and index == 0:  # the first batch pays for compiling the pipeline
                synchronize(device)
                started = time.perf_counter()
                continue
            images_seen += images.shape[0]
    synchronize(device)
    elapsed = time.perf_counter() - started
    return {"ffcv_img_s": images_seen / elapsed, "device_of_batches": str(images.device), "dtype": str(images.dtype)}


def ddp_check(device: torch.device, cache: Path) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   "-m", "rkan_dist.cli", "train", "--config", str(REPO / "configs" / "demo.yaml"),
                   f"train.run_dir={run_dir}", f"data.cache_dir={cache}", "train.max_steps=3",
                   f"train.device={device.type}", "train.precision=bf16" if device.type == "cuda" else "train.precision=fp32",
                   "logging.progress_bar=false", "data.num_workers=1", "checkpoint.every_steps=0"]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                                env=dict(os.environ, OMP_NUM_THREADS="2"))
        return {"ddp_run_ok": result.returncode == 0, "ddp_run_s": time.perf_counter() - started,
                "ddp_output_tail": (result.stdout + result.stderr)[-600:] if result.returncode else
                result.stdout.strip().splitlines()[-4:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "rkan-dist-gpu-check")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (fallback: tiny sizes)",
              "torch": torch.__version__}
    for name, check in (("kan_conv", lambda: kan_conv_check(device, cuda)),
                        ("model_throughput", lambda: throughput_check(device, cuda)),
                        ("ffcv_pipeline", lambda: ffcv_check(device, cuda, args.cache)),
                        ("ddp_one_gpu", lambda: ddp_check(device, args.cache))):
        started = time.perf_counter()
        try:
            report[name] = check()
        except Exception as err:  # one failing part must not hide the others' figures
            report[name] = {"error": f"{type(err).__name__}: {err}"}
        report[name]["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1, default=str))
    return 0 if all("error" not in value for value in report.values() if isinstance(value, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
