"""Seconds per optimizer step: DDP vs DeepSpeed ZeRO-1 / ZeRO-2, fp32 and `auto`'s precision, 2 processes.

    python -m bench.engines [--quick] [--json FILE]

Runs one torchrun launch (2 processes; gloo on CPU, nccl on GPUs) that times every engine on the
same model and synthetic 32 px data, in interleaved rounds (a few steps of each engine in turn, so
that the machine's drifting load falls on all of them alike); the medians exclude warm-up steps. Goal (issue 5): ZeRO-1 at
most 1.10 x DDP at the same precision. `zero1_vs_ddp_step_ratio` is the worse of the two precisions.
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

ENGINES = (("ddp", "ddp", 0), ("zero1", "deepspeed", 1), ("zero2", "deepspeed", 2))  # (name, backend, zero stage)


def measured_precisions(device) -> tuple[list[str], str]:
    """fp32, and the precision `train.precision: auto` trains in on `device` when that is another
    (bf16 on a CPU with native bf16 or a bf16 GPU, fp16 on an older GPU): the trainer's rule."""
    from rkan_dist.precision import resolve_precision

    auto, reason = resolve_precision("auto", device, "deepspeed")
    return ["fp32"] + ([auto] if auto != "fp32" else []), f"auto -> {auto} ({reason})"
IMAGE_SIZE = 32
ROUNDS = 5
NUM_CLASSES = 10


def _model():
    """torchvision ResNet-18 (11.7 M parameters: enough gradient traffic for the engines to differ)."""
    import torchvision

    return torchvision.models.resnet18(num_classes=NUM_CLASSES)


def _worker(out: Path, batch_size: int, warmup: int, steps: int) -> None:
    """Runs inside each torchrun process."""
    import torch
    import torch.nn.functional as F

    from rkan_dist import distributed, parallel
    from rkan_dist.config import OptimConfig, ParallelConfig
    from rkan_dist.optim import build_optimizer
    from rkan_dist.threads import configure_threads

    configure_threads(num_workers=0)  # synthetic data: each process's share of the cores computes
    info = distributed.init("auto")
    precisions, auto_note = measured_precisions(info.device)
    generator = torch.Generator().manual_seed(info.rank)
    images = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(info.device)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator).to(info.device)
    results = {}
    try:
        engines = {}
        for (engine_name, backend, stage), precision in ((engine, p) for p in precisions for engine in ENGINES):
            name = f"{engine_name}_{precision}"
            torch.manual_seed(0)
            model = _model()
            optimizer = build_optimizer(model, OptimConfig(lr=0.01))  # the trainer's: fused SGD, momentum 0.9
            engines[name] = parallel.wrap(model, optimizer, parallel_config=ParallelConfig(backend=backend, zero_stage=stage),
                                          precision=precision, grad_accum=1, grad_clip=0.0, device=info.device,
                                          dist_info=info, micro_batch_size=batch_size)
            engines[name].train()
        # Rounds of a few steps of every engine in turn: the machine's load drifts over minutes, and
        # timing one engine after the other would put that drift into the ratios.
        times = {name: [] for name in engines}
        steps_per_round = max(1, steps // ROUNDS)
        for round_index in range(ROUNDS):
            for name, engine in engines.items():
                for step in range(steps_per_round + (warmup if round_index == 0 else 0)):
                    distributed.barrier()  # every step starts together, so a slow rank shows up in the time
                    if info.device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    engine.backward(F.cross_entropy(engine.forward(images), labels))
                    engine.step()
                    if info.device.type == "cuda":
                        torch.cuda.synchronize()
                    if round_index > 0 or step >= warmup:
                        times[name].append(time.perf_counter() - start)
        for name, measured in times.items():
            measured = torch.tensor(measured)
            distributed.all_reduce_sum(measured)  # mean over ranks per step, then the median over steps
            results[name] = {"s_per_step": statistics.median((measured / info.world_size).tolist()),
                             "steps": len(measured), "warmup": warmup}
        if info.is_main:
            out.write_text(json.dumps({"results": results, "world_size": info.world_size, "precisions": precisions,
                                       "auto_precision": auto_note, "device": str(info.device),
                                       "batch_size": batch_size}))
    finally:
        distributed.shutdown()


def run(quick: bool) -> dict:
    """Launch 2 processes with torchrun, time every engine, return the figures."""
    batch_size, warmup, steps = (16, 2, 5) if quick else (32, 3, 60)  # 60: the spread between runs was 0.1 at 20
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "engines.json"
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "bench.engines", "--worker", str(out), "--batch-size", str(batch_size),
                   "--warmup", str(warmup), "--steps", str(steps)]
        started = time.perf_counter()
        completed = subprocess.run(command, env=env, cwd=Path(__file__).resolve().parent.parent,
                                   capture_output=True, text=True)
        if completed.returncode != 0 or not out.is_file():
            raise RuntimeError(f"benchmark launch failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
        measured = json.loads(out.read_text())
    results, precisions = measured["results"], measured["precisions"]
    ratios = {precision: results[f"zero1_{precision}"]["s_per_step"] / results[f"ddp_{precision}"]["s_per_step"]
              for precision in precisions}
    zero2 = {precision: results[f"zero2_{precision}"]["s_per_step"] / results[f"ddp_{precision}"]["s_per_step"]
             for precision in precisions}
    figures = {
        "zero1_vs_ddp_step_ratio": max(ratios.values()),
        **{f"zero1_vs_ddp_step_ratio_{p}": ratio for p, ratio in ratios.items()},
        **{f"zero2_vs_ddp_step_ratio_{p}": ratio for p, ratio in zero2.items()},
        **{f"{name}_s_per_step": values["s_per_step"] for name, values in results.items()},
        "precisions": precisions, "auto_precision": measured["auto_precision"],
        "model": "resnet18", "image_size": IMAGE_SIZE, "batch_size_per_process": measured["batch_size"],
        "processes": measured["world_size"], "device": measured["device"], "quick": quick,
        "steps_timed": steps, "warmup_steps": warmup, "wall_s": time.perf_counter() - started,
    }
    print_table(figures)
    return figures


def print_table(figures: dict) -> None:
    print(f"engines: resnet18, {figures['image_size']} px, batch {figures['batch_size_per_process']}/process, "
          f"{figures['processes']} processes on {figures['device']}, median of {figures['steps_timed']} steps")
    precisions = figures["precisions"]
    print(f"precisions measured: {', '.join(precisions)}; {figures['auto_precision']}")
    print(f"{'engine':<12}" + "".join(f"{p + ' s/step':>14}" for p in precisions)
          + "".join(f"{p + ' x DDP':>12}" for p in precisions))
    for engine, _, _ in ENGINES:
        row = [figures[f"{engine}_{p}_s_per_step"] for p in precisions]
        base = [figures[f"ddp_{p}_s_per_step"] for p in precisions]
        print(f"{engine:<12}" + "".join(f"{value:>14.4f}" for value in row)
              + "".join(f"{value / ddp:>12.3f}" for value, ddp in zip(row, base)))
    verdict = "meets" if figures["zero1_vs_ddp_step_ratio"] <= 1.10 else "misses"
    print(f"zero1_vs_ddp_step_ratio = {figures['zero1_vs_ddp_step_ratio']:.3f} ({verdict} the 1.10 goal)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch, fewer steps")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=15, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        _worker(args.worker, args.batch_size, args.warmup, args.steps)
        return
    figures = run(args.quick)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
