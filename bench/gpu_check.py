"""The GPU check (bench/gpu_check.sh runs it): one prepared run on a CUDA machine, in <= 8 minutes
on one GPU or one 8-GPU node, whose figures bench/REPORT.md can show.

Parts, each printed as one JSON line the moment it finishes (an outer timeout loses only the
part that was running) and all written to bench/results/gpu_check.json after each part:

  kan_conv     KANConv2d forward + backward at RKANet-50's stage-4 shapes (batch 128 and 256,
               bf16 autocast, channels_last input and output gradient, as in training) for each
               implementation (RKAN_KAN_CONV_IMPL), ms and peak memory, and what `auto` picks;
  throughput   rkan_resnet50 and resnet50 training images/s (bf16, channels_last, eager); the
               headline is rkan_resnet50 / resnet50 (throughput_compiled: the same under
               torch.compile, run last as compiling is the slowest part);
  distributed  DDP over NCCL with every visible GPU (torchrun, one process per GPU) against
               DeepSpeed ZeRO-1, step time, through the trainer's engines; skipped on one GPU
               (one process runs neither DDP nor a collective). Past its time limit torchrun and
               every process under it, the workers in their own sessions included, are killed
               before the next part starts;
  ffcv_decode  FFCV decoding generated ImageNet-size JPEGs (400x350, quality 90) to the GPU with
               the trainer's loader: images/s, and per CPU core.

The header names the driver, the CUDA version torch was built for, torch and the GPUs nvidia-smi
lists, in every case. Without NVIDIA GPUs every part reports "skipped: no CUDA" and the script
exits 0; with GPUs that torch cannot use (rkan_dist.nvidia: a driver too old for torch's CUDA build,
a CPU-only torch) it exits 1 after the header with one line saying what to do. It exits 1 if any
part fails. RKAN_GPU_CHECK_FAIL=part[,part] makes those parts fail on purpose (the tests check
that a failure is reported without hiding the other parts); RKAN_GPU_CHECK_HANG=distributed makes
rank 1 of the distributed part hang and RKAN_GPU_CHECK_TIMEOUT_S shortens that part's time limit
(the tests check that no worker outlives it). `--device cpu` runs every part at
toy sizes on the CPU (gloo instead of NCCL), which is how the tests exercise the code itself.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "gpu_check.json"
PARTS = ("kan_conv", "throughput", "distributed", "ffcv_decode", "throughput_compiled")  # compiling last: the slowest
FAIL_ENV = "RKAN_GPU_CHECK_FAIL"
HANG_ENV = "RKAN_GPU_CHECK_HANG"  # tests: "distributed" makes rank 1 of that part hang
TIMEOUT_ENV = "RKAN_GPU_CHECK_TIMEOUT_S"  # tests: the distributed part's time limit


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: the real sizes on CUDA, toy ones for the CPU smoke run."""

    kan_batches: tuple[int, ...]
    kan_channels_divisor: int  # stage-4 channel counts are divided by this
    kan_repeats: int
    models: tuple[str, str]  # (backbone, its RKAN version) for the throughput and distributed parts
    model_batch: int
    model_resolution: int
    model_steps: int
    compile: bool
    engine_batch: int
    engine_steps: int
    images: int  # JPEGs for the decode part
    decode_batch: int
    decode_resolution: int


GPU_SIZES = Sizes(kan_batches=(128, 256), kan_channels_divisor=1, kan_repeats=10,
                  models=("resnet50", "rkan_resnet50"), model_batch=128,
                  model_resolution=224, model_steps=20, compile=True, engine_batch=64, engine_steps=15,
                  images=2048, decode_batch=256, decode_resolution=192)
CPU_SIZES = Sizes(kan_batches=(2,), kan_channels_divisor=32, kan_repeats=1,
                  models=("resnet18", "rkan_resnet18"), model_batch=2, model_resolution=64,
                  model_steps=1, compile=False, engine_batch=2, engine_steps=1, images=16, decode_batch=8,
                  decode_resolution=64)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, function, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of `function` (after `warmup` calls), with the device drained around each."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return times


def peak_mib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- KAN conv

def stage4_kan_shapes(divisor: int) -> list[dict]:
    """The KAN convolutions of rkan_resnet50's stage-4 branch at 224 px: channels, input size, stride,
    degree and n_convs, read from the model itself (on the meta device) rather than restated."""
    import torch

    from rkan_dist.models import create_model
    from rkan_dist.models.kan_conv import KANConv2d

    with torch.device("meta"):
        model = create_model("rkan_resnet50")
    shapes, sizes = [], {}
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: sizes.__setitem__(name, args[0].shape[-1]))
             for name, module in model.named_modules() if isinstance(module, KANConv2d)]
    with torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device="meta"))
    for hook in hooks:
        hook.remove()
    for name, module in model.named_modules():
        if isinstance(module, KANConv2d) and name.startswith("layer4."):
            shapes.append({"name": name, "channels": module.channels // divisor, "size": sizes[name],
                           "stride": module.stride, "degree": module.degree, "n_convs": module.n_convs})
    if not shapes:
        raise RuntimeError("rkan_resnet50 has no KAN convolution in stage 4")
    return shapes


@contextlib.contextmanager
def kan_conv_implementation(name: str):
    """RKAN_KAN_CONV_IMPL=name for the block (the dispatcher reads it on every call), put back after."""
    from rkan_dist.models.kan_conv import IMPLEMENTATION_ENV

    before = os.environ.get(IMPLEMENTATION_ENV)
    os.environ[IMPLEMENTATION_ENV] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(IMPLEMENTATION_ENV, None)
        else:
            os.environ[IMPLEMENTATION_ENV] = before


def output_gradient(conv, x):
    """A fixed gradient for the convolution's output, channels_last as in training, where the layer
    after it (a convolution or batch norm of a channels_last model) hands back channels_last gradients.
    Back-propagating `out.sum()` instead would hand in an NCHW (or expanded) gradient, and every
    implementation would time a layout copy that training never pays."""
    import torch

    out_size = [(size - 1) // conv.stride + 1 for size in x.shape[2:]]
    shape = (x.shape[0], conv.channels * conv.n_convs, *out_size)
    gradient = torch.randn(shape, device=x.device, dtype=x.dtype)
    return gradient.contiguous(memory_format=torch.channels_last)


def kan_conv_step(conv, x, gradient):
    """One forward and backward of `conv` as training runs it: bf16 autocast on CUDA, the output's
    gradient `gradient` (output_gradient)."""
    import torch

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            out = conv(x)
        out.backward(gradient)

    return step


def kan_conv_part(device, sizes: Sizes) -> dict:
    import torch

    from rkan_dist.models import kan_conv
    from rkan_dist.models.kan_conv import KANConv2d

    candidates = kan_conv.CUDA_CANDIDATES if device.type == "cuda" else ("cpu", "grouped")
    implementations = (*candidates, "auto")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, failures = [], []
    for batch in sizes.kan_batches:
        for shape in stage4_kan_shapes(sizes.kan_channels_divisor):
            torch.manual_seed(0)
            conv = KANConv2d(shape["channels"], degree=shape["degree"], stride=shape["stride"],
                             n_convs=shape["n_convs"]).to(device).to(memory_format=torch.channels_last)
            x = torch.randn(batch, shape["channels"], shape["size"], shape["size"], device=device, dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
            row = {**shape, "batch": batch}
            step = kan_conv_step(conv, x, output_gradient(conv, x))

            for name in implementations:
                try:
                    decided = dict(kan_conv._CHOICES)  # auto's choices so far, per shape
                    # a training step, as the trainer runs it: where `auto` times a new shape
                    with kan_conv_implementation(name), kan_conv.shared_choices():
                        step()  # the first call compiles (Triton) or times the candidates (auto)
                        reset_peak(device)
                        times = timed(device, step, warmup=2, repeats=sizes.kan_repeats)
                        row[name] = {"ms": round(statistics.median(times) * 1e3, 3), "peak_mib": peak_mib(device)}
                        if name == "auto":  # what it chose for this shape's forward and backward
                            row[name]["picks"] = sorted({choice for key, choice in kan_conv._CHOICES.items()
                                                         if key not in decided}) or (
                                "by rule (auto times candidates on CUDA only)" if device.type == "cpu" else
                                "decided at an earlier batch size (kept per shape without the batch)")
                except Exception as err:
                    row[name] = {"error": f"{type(err).__name__}: {err}"}
                    failures.append(f"{shape['name']} batch {batch} {name}: {type(err).__name__}: {err}")
            rows.append(row)
    result = {"dtype": str(dtype), "channels_last": True, "output_gradient": "channels_last", "cases": rows}
    if failures:
        raise PartFailed(f"{len(failures)} KAN conv run(s) failed, first: {failures[0]}", result)
    return result


# ----------------------------------------------------------------------------- training throughput

def throughput_part(device, sizes: Sizes, compiled: bool = False) -> dict:
    """Training images/s of the backbone and its RKAN version, measured in turn with the same
    input, optimizer (fused SGD, as the trainer's) and precision; eager, or under torch.compile."""
    import torch
    import torch.nn.functional as F

    from rkan_dist.models import create_model

    batch, resolution = sizes.model_batch, sizes.model_resolution
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    images = torch.randn(batch, 3, resolution, resolution, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)
    suffix = "_compiled" if compiled else ""
    result: dict = {"batch": batch, "resolution": resolution, "dtype": "bf16" if device.type == "cuda" else "fp32",
                    "channels_last": True, "torch_compile": compiled}
    rates = {}
    for name in sizes.models:
        torch.manual_seed(0)
        model = create_model(name).to(device).to(memory_format=torch.channels_last).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
        forward = torch.compile(model) if compiled else model

        def step(forward=forward, optimizer=optimizer):
            with torch.autocast(**autocast):
                loss = F.cross_entropy(forward(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        reset_peak(device)
        times = timed(device, step, warmup=3, repeats=sizes.model_steps)  # compiling happens in the warm-up
        rates[name] = batch / statistics.median(times)
        result[f"{name}{suffix}_img_s"] = round(rates[name], 1)
        result[f"{name}{suffix}_peak_mib"] = peak_mib(device)
        del model, optimizer, forward
    baseline, rkan = sizes.models
    result[f"{rkan}_throughput_ratio{suffix}"] = round(rates[rkan] / rates[baseline], 4)
    return result


def compiled_throughput_part(device, sizes: Sizes) -> dict:
    if not sizes.compile:
        raise PartSkipped("torch.compile is not run at toy sizes (minutes of compiling on a CPU)")
    return throughput_part(device, sizes, compiled=True)


# ----------------------------------------------------------------------------- DDP / DeepSpeed over NCCL

def engine_worker(argv: list[str]) -> int:
    """One torchrun process: time DDP and DeepSpeed ZeRO-1 steps of an RKAN model through the
    trainer's engines; rank 0 prints one JSON line."""
    if "distributed" in os.environ.get(HANG_ENV, "").split(",") and os.environ.get("RANK") == "1":
        hang_forever()  # before any import: a test's short time limit finds it hanging, not importing
    import torch
    import torch.nn.functional as F

    from rkan_dist import distributed
    from rkan_dist.config import ParallelConfig
    from rkan_dist.models import create_model
    from rkan_dist.parallel import wrap

    device_pref, model_name, batch, steps, resolution = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    info = distributed.init(device_pref)
    precision = "bf16"
    try:
        images = torch.randn(batch, 3, resolution, resolution, device=info.device)
        images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 1000, (batch,), device=info.device)
        result = {"world_size": info.world_size, "backend": info.backend or "none", "device": str(info.device),
                  "per_rank_batch": batch, "precision": precision, "model": model_name}
        for name, parallel in (("ddp", ParallelConfig(backend="ddp")),
                               ("zero1", ParallelConfig(backend="deepspeed", zero_stage=1))):
            torch.manual_seed(0)
            model = create_model(model_name).to(memory_format=torch.channels_last)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            engine = wrap(model, optimizer, parallel_config=parallel, precision=precision, grad_accum=1,
                          grad_clip=0.0, device=info.device, dist_info=info, micro_batch_size=batch)
            engine.train()

            def step(engine=engine):
                engine.backward(F.cross_entropy(engine.forward(images), labels))
                assert engine.step().applied

            times = timed(info.device, step, warmup=3, repeats=steps)
            median = torch.tensor([statistics.median(times)], device=info.device)
            if info.world_size > 1:  # the slowest rank's median is the job's step time
                torch.distributed.all_reduce(median, op=torch.distributed.ReduceOp.MAX)
            result[f"{name}_step_s"] = median.item()
            if name == "ddp":
                result["ddp_wrapped"] = getattr(engine, "_ddp", None) is not None
            del engine, model, optimizer
        result["zero1_vs_ddp_step_ratio"] = result["zero1_step_s"] / result["ddp_step_s"]
        result["images_per_s_ddp"] = batch * info.world_size / result["ddp_step_s"]
        if info.is_main:
            print("ENGINE_RESULT " + json.dumps(result), flush=True)
    finally:
        distributed.shutdown()
    return 0


def hang_forever() -> None:
    """RKAN_GPU_CHECK_HANG=distributed (tests): rank 1 stops as a rank stuck in NCCL does, deaf to the
    SIGTERM that torchrun's agent sends its workers; its peer waits for it at the rendezvous."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"rank 1 (pid {os.getpid()}) hangs on purpose ({HANG_ENV})", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


def part_timeout_s(device) -> float:
    """How long a part that starts processes may run: a hung NCCL job must leave the later parts their
    share of the 480 s (the distributed part takes ~1 minute). RKAN_GPU_CHECK_TIMEOUT_S (tests) sets it."""
    configured = os.environ.get(TIMEOUT_ENV)
    return float(configured) if configured else 180.0 if device.type == "cuda" else 300.0


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, state) of every process, from /proc/<pid>/stat."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path("/proc", name, "stat").read_text()
                state, parent, _group, session = stat[stat.rindex(")") + 2:].split()[:4]
                table[int(name)] = (int(parent), int(session), state)
    return table


def process_tree(root: int, table: dict[int, tuple[int, int, str]]) -> list[int]:
    """`root` and every process below it, and every process in a session that one of them leads
    (a worker whose parent died is no longer below torchrun, but still in its own session)."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _session, _state) in table.items():
        children.setdefault(parent, []).append(pid)
    tree, frontier = [root], [root]
    while frontier:
        frontier = [child for pid in frontier for child in children.get(pid, ())]
        tree += frontier
    ours = os.getsid(0)
    sessions = {pid for pid in tree if table.get(pid, (0, 0, ""))[1] == pid and pid != ours}
    return tree + [pid for pid, (_, session, _) in table.items() if session in sessions and pid not in tree]


def end_process_tree(root: int, wait_s: float = 30.0) -> tuple[list[int], list[int]]:
    """SIGKILL `root` and every process of its tree (process_tree), then wait up to `wait_s` for them
    to go. torch's elastic agent starts each worker in a session of its own, so neither killing
    torchrun nor its process group reaches them: they would stay in a collective, holding the GPUs
    the next part measures on. Each process is stopped (SIGSTOP) as it is found, so that none starts
    another (the agent restarting a worker) while the tree is read. Returns (pids ended, pids still
    running after `wait_s`: stuck in the kernel, where even SIGKILL waits)."""
    found: list[int] = []
    while True:
        new = [pid for pid in process_tree(root, process_table()) if pid not in found]
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP)
        found += new
    for pid in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while True:
        table = process_table()
        running = [pid for pid in found if pid in table and table[pid][2] != "Z"]  # a zombie has ended
        if not running or time.monotonic() > deadline:
            return found, running
        time.sleep(0.05)


@contextlib.contextmanager
def sigterm_raises():
    """SIGTERM (gpu_check.sh's outer `timeout`) raises SystemExit in the main thread while the block
    runs, so that its `finally` still ends the part's processes; Python's default would exit on the
    spot and leave them running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_process_tree(command: list[str], env: dict[str, str], timeout: float) -> tuple[int | None, str, dict]:
    """Run `command` in a session of its own; (exit status or None when it ran past `timeout`, its
    stdout and stderr, what was ended). Whatever way this returns or raises (the timeout, SIGTERM,
    Ctrl-C), every process of the tree has been ended first, so the next part starts on an idle machine."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env=env, start_new_session=True)
    stdout, stderr, ended = "", "", {"ended_pids": [], "still_running_pids": []}
    try:
        with sigterm_raises():
            stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        # Only while `process` is not reaped (returncode None) does its pid still name it: once
        # reaped, the pid may be another process's. Reaped means torchrun exited by itself, and its
        # agent waits for its workers before it does.
        if process.returncode is None:
            pids, running = end_process_tree(process.pid)
            ended = {"ended_pids": pids, "still_running_pids": running}
            with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
                stdout, stderr = process.communicate(timeout=10)  # the pipes' writers are gone: EOF
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            returncode = None
        else:
            returncode = process.returncode
    return returncode, (stdout or "") + (stderr or ""), ended


def distributed_part(device, sizes: Sizes) -> dict:
    import torch

    processes = torch.cuda.device_count() if device.type == "cuda" else 2
    if processes < 2:  # one process is neither DDP nor an NCCL collective: no ratio to publish
        raise PartSkipped("needs 2 or more GPUs")
    env = dict(os.environ, OMP_NUM_THREADS="1" if device.type == "cpu" else os.environ.get("OMP_NUM_THREADS", "4"))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "bench.gpu_check", "--engine-worker", device.type, sizes.models[1], str(sizes.engine_batch),
               str(sizes.engine_steps), str(sizes.model_resolution)]
    timeout = part_timeout_s(device)
    returncode, output, ended = run_process_tree(command, env, timeout)
    if returncode is None:
        workers = len(ended["ended_pids"]) - 1
        raise PartFailed(f"torchrun with {processes} processes ran past {timeout:g} s; ended it and {workers} "
                         f"process(es) under it" + (f", {len(ended['still_running_pids'])} still running after "
                                                    f"SIGKILL" if ended["still_running_pids"] else ""),
                         {**ended, "output_tail": output[-2000:]})
    lines = [line for line in output.splitlines() if line.startswith("ENGINE_RESULT ")]
    if returncode != 0 or not lines:
        errors = [line for line in output.splitlines() if line.startswith("[rank") and "Error" in line]
        raise PartFailed(f"torchrun with {processes} processes exited {returncode}"
                         + (f": {errors[0]}" if errors else ""), {**ended, "output_tail": output[-2000:]})
    result = json.loads(lines[-1].removeprefix("ENGINE_RESULT "))
    expected_backend = "nccl" if device.type == "cuda" else "gloo"
    if result["world_size"] != processes or result["backend"] != expected_backend or not result["ddp_wrapped"]:
        raise PartFailed(f"{processes} processes did not train as DDP over {expected_backend}", result)
    return result


# ----------------------------------------------------------------------------- FFCV decode

def write_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    """`count` photo-like 400x350 JPEGs at quality 90 in 10 class folders: smooth colour fields with
    texture and noise, so the files are about the size of ImageNet's, not of flat images. At most
    128 distinct images, copied under new names: decoding costs the same, and making them is slow."""
    import shutil

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = 350, 400
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    for index in range(count):
        label = index % 10
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        path = folder / str(label) / f"{index:05d}.jpg"
        if index >= 128:
            shutil.copyfile(folder / str((index % 128) % 10) / f"{index % 128:05d}.jpg", path)
            continue
        frequencies = rng.uniform(0.005, 0.05, size=(3, 2))
        phases = rng.uniform(0, 2 * np.pi, size=3)
        channels = [127 + 90 * np.sin(rows * fy + columns * fx + phase)
                    for (fy, fx), phase in zip(frequencies, phases)]
        pixels = np.stack(channels, axis=-1) + rng.normal(0, 18, (height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def ffcv_decode_part(device, sizes: Sizes) -> dict:

    from rkan_dist.data.ffcv_loaders import FFCVTrainLoader
    from rkan_dist.data.write import write_beton

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="rkan-gpu-check-") as scratch:
        tree, beton = Path(scratch) / "jpegs", Path(scratch) / "train.beton"
        write_jpegs(tree, sizes.images)
        jpeg_kib = sum(p.stat().st_size for p in tree.rglob("*.jpg")) / sizes.images / 1024
        # raw JPEG bytes as written (mode jpg, no resize): the decode the trainer's loader pays
        write_beton(tree, beton, max_side=0, quality=90, mode="jpg", workers=cores, progress=False)
        loader = FFCVTrainLoader(str(beton), batch_size=sizes.decode_batch, num_workers=cores, os_cache=True, seed=0,
                                 rank=0, world_size=1, device=device, channels_last=True, drop_last=True,
                                 min_res=sizes.decode_resolution, max_res=sizes.decode_resolution,
                                 start_ramp_epoch=0, end_ramp_epoch=0, min_crop_scale=0.08, hflip=True,
                                 mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
        for _ in loader.batches(0):  # the first pass compiles the pipeline and fills the page cache
            pass
        images, started = 0, time.perf_counter()
        for epoch in (1, 2):
            for batch, _labels in loader.batches(epoch):
                images += batch.shape[0]
        synchronize(device)
        elapsed = time.perf_counter() - started
    if images == 0:
        raise PartFailed("the loader yielded no batches", {"images": sizes.images})
    return {"images_per_s": round(images / elapsed, 1), "cpu_cores": cores,
            "images_per_s_per_core": round(images / elapsed / cores, 1), "jpeg_kib": round(jpeg_kib, 1),
            "jpeg_size": "400x350", "quality": 90, "output": f"{sizes.decode_resolution} px, {batch.dtype}, "
            f"{batch.device}", "batch_size": sizes.decode_batch, "batches_device": str(batch.device),
            "images_timed": images}


# ----------------------------------------------------------------------------- driver

class PartSkipped(Exception):
    """A part that does not apply to this run; the reason is its status."""


class PartFailed(RuntimeError):
    """A part ran but its result is wrong or incomplete; `details` go into the JSON beside the error."""

    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


PART_FUNCTIONS = {"kan_conv": kan_conv_part, "throughput": throughput_part, "distributed": distributed_part,
                  "ffcv_decode": ffcv_decode_part, "throughput_compiled": compiled_throughput_part}


def run_part(name: str, device, sizes: Sizes | None, forced_failures: set[str]) -> dict:
    started = time.perf_counter()
    try:
        if name in forced_failures:
            raise RuntimeError(f"forced failure ({FAIL_ENV})")
        if sizes is None:
            result = {"status": "skipped: no CUDA"}
        else:
            result = {"status": "ok", **PART_FUNCTIONS[name](device, sizes)}
    except PartSkipped as err:
        result = {"status": f"skipped: {err}"}
    except PartFailed as err:
        result = {"status": "failed", "error": str(err), **err.details}
    except Exception as err:  # one failing part must not hide the others' figures
        result = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc(limit=6)[-2000:]}
    return {"part": name, **result, "wall_s": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--engine-worker"]:
        return engine_worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="auto: the GPU check (parts skipped without CUDA); cpu: every part at toy sizes on "
                             "the CPU, to test this script")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON file written after every part")
    args = parser.parse_args(argv)
    parts = [part for part in args.parts.split(",") if part]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    forced_failures = {part for part in os.environ.get(FAIL_ENV, "").split(",") if part}

    import torch

    from rkan_dist.nvidia import probe, unusable_gpus_line

    gpus = probe()  # the driver and GPU names the header shows in every case
    cuda = torch.cuda.is_available() and args.device == "auto"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    sizes = GPU_SIZES if cuda else CPU_SIZES if args.device == "cpu" else None
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the trainer trains
    report = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if cuda else
                         "cpu (toy sizes)" if sizes else "no CUDA"),
              "torch": torch.__version__, "torch_cuda": torch.version.cuda or "a CPU-only build",
              "driver": gpus.driver, "gpus": list(gpus.names), "cuda": cuda, "parts": {}}
    print(json.dumps({"part": "header", **{k: v for k, v in report.items() if k != "parts"}}), flush=True)
    if args.device == "auto" and not torch.cuda.is_available():
        # GPUs here that torch cannot use fail the check: "skipped: no CUDA" would read as a CPU box
        unusable = unusable_gpus_line(torch.__version__, torch.version.cuda, cpu_hint="pass --device cpu", gpus=gpus)
        if unusable is not None:
            print(f"gpu_check: error: {unusable}", file=sys.stderr, flush=True)
            return 1
    for name in parts:
        result = run_part(name, device, sizes, forced_failures)
        print(json.dumps(result, default=str), flush=True)
        report["parts"][name] = result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    failed = [name for name, result in report["parts"].items() if result["status"] == "failed"]
    print(json.dumps({"part": "summary", "failed": failed, "results": str(args.out)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
