"""Process-group set-up from whichever launcher started us: torchrun, Slurm (srun), submitit, or none.

Every launcher describes the job with different environment variables. `resolve_launch` turns
them into one `LaunchSpec` (a pure function of the environment, unit-tested); `init` exports that
spec as torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, which
DeepSpeed also reads) and joins the group with `env://`. A plain `python train.py` needs no
process group at all: world size 1, and the collective helpers below become no-ops.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import gc
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from rkan_dist import nvidia
from rkan_dist.faults import ConfigError
from rkan_dist.nodes import parse_nodelist
from rkan_dist.watchdog import collective_timeout_s

LAUNCHERS = ("torchrun", "slurm", "submitit", "single")
_SLURM_PORT_BASE = 15000
_SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when running as one process without a process group
    is_main: bool


@dataclass(frozen=True)
class LaunchSpec:
    """What the launcher told us, before any process group exists."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


# ----------------------------------------------------------------------------- pure helpers

def port_from_job_id(job_id: str | int) -> int:
    """A rendezvous port every task of one job agrees on without talking: 15000 + id % 20000."""
    digits = re.match(r"\d+", str(job_id))  # array jobs look like '1234_7'
    if digits is None:
        raise ValueError(f"cannot derive a port from job id {job_id!r}")
    return _SLURM_PORT_BASE + int(digits.group()) % _SLURM_PORT_SPAN


def detect_launcher(env: Mapping[str, str]) -> str:
    """torchrun first (it may run inside a Slurm allocation), then srun, then submitit, else one process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_NODELIST" in env:
        return "slurm"
    if env.get("SUBMITIT_EXECUTOR"):
        return "submitit"
    return "single"


def resolve_launch(env: Mapping[str, str],
                   expand_hosts: Callable[[str], list[str]] | None = None,
                   node_address: Callable[[str], str] | None = None,
                   submitit_env: Callable[[], Any] | None = None) -> LaunchSpec:
    """The rank layout and rendezvous address described by `env` (pure apart from the injected lookups)."""
    launcher = detect_launcher(env)
    if launcher == "torchrun":
        return LaunchSpec("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"),
                          _int(env, "LOCAL_RANK", 0), env.get("MASTER_ADDR", "127.0.0.1"),
                          _int(env, "MASTER_PORT", 29500))
    if launcher == "slurm":
        hosts = (expand_hosts or slurm_hostnames)(env["SLURM_JOB_NODELIST"])
        address = (node_address or resolvable_address)(hosts[0])
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else port_from_job_id(env.get("SLURM_JOB_ID", "0"))
        return LaunchSpec("slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"),
                          _int(env, "SLURM_LOCALID", 0), env.get("MASTER_ADDR", address), port)
    if launcher == "submitit":
        import submitit

        job = (submitit_env or submitit.JobEnvironment)()
        address = (node_address or resolvable_address)(job.hostnames[0])
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else port_from_job_id(job.job_id)
        return LaunchSpec("submitit", job.global_rank, job.num_tasks, job.local_rank,
                          env.get("MASTER_ADDR", address), port)
    return LaunchSpec("single", 0, 1, 0, "127.0.0.1", 0)


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    if name not in env:
        if default is None:
            raise ValueError(f"environment variable {name} is not set")
        return default
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def choose_device(device_pref: str, local_rank: int) -> torch.device:
    """The device of the process with `local_rank`: 'cpu', 'cuda', or 'auto' (CUDA where torch can use it).

    'auto' takes the CPU only where this process has no NVIDIA GPU at all: GPUs that torch cannot
    use (a driver older than its CUDA build needs, a CPU-only torch) stop it with one line that
    says what to do (rkan_dist.nvidia), since training on the CPU beside idle GPUs is never what
    a GPU job meant; `device: cpu` still trains there, on purpose."""
    if device_pref not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device {device_pref!r} is not valid; choose one of auto, cpu, cuda")
    if device_pref == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        unusable = nvidia.unusable_gpus_line(torch.__version__, torch.version.cuda)
        if unusable is not None:
            raise ConfigError(unusable)
        if device_pref == "auto":
            return torch.device("cpu")
        raise ConfigError("device 'cuda' was asked for but CUDA is not available here (this process has no "
                          "NVIDIA GPU); use auto or cpu")
    count = torch.cuda.device_count()
    if count == 1:
        # One visible GPU is this process's whatever its local rank: a cluster that binds one GPU
        # per task (Slurm's --gpus-per-task=1, --gpu-bind) shows task 7 only its own, as cuda:0.
        return torch.device("cuda", 0)
    if local_rank >= count:
        raise ConfigError(f"local rank {local_rank} has no GPU: this process sees {count}; "
                          "launch at most one process per GPU")
    return torch.device("cuda", local_rank)


# ----------------------------------------------------------------------------- host lookups (Slurm)

def slurm_hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames` when it works, else the pure-Python parser."""
    if shutil.which("scontrol"):
        try:
            result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                    text=True, timeout=10, check=True)
            hosts = result.stdout.split()
            if hosts:
                return hosts
        except (subprocess.SubprocessError, OSError):
            pass
    return parse_nodelist(nodelist)


def resolvable_address(node: str) -> str:
    """The node name if DNS knows it; else Slurm's NodeAddr (logical nodes such as n1/n2 on one host)."""
    try:
        socket.getaddrinfo(node, None)
        return node
    except OSError:
        pass
    if shutil.which("scontrol"):
        try:
            result = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True,
                                    timeout=10, check=True)
            match = re.search(r"\bNodeAddr=(\S+)", result.stdout)
            if match:
                return match.group(1)
        except (subprocess.SubprocessError, OSError):
            pass
    raise ValueError(f"cannot resolve the master node {node!r}: not in DNS and no NodeAddr from scontrol; "
                     "set MASTER_ADDR")


# ----------------------------------------------------------------------------- process group

_device: torch.device | None = None  # the device collective tensors live on (CUDA for nccl)


@functools.cache
def _collect_engines_before_exit() -> None:
    """Once per process: a gc pass at exit, while the interpreter is still whole.

    A DDP or DeepSpeed engine that is no longer referenced but sits in a reference cycle (DDP
    does) is otherwise freed during interpreter finalization, and that aborts the process now
    and then ("terminate called without an active exception", after all work is done: 8 of 24
    two-rank torchrun launches here, 0 of 24 with this pass). atexit handlers run before
    finalization starts.
    """
    atexit.register(gc.collect)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest M_MMAP_THRESHOLD glibc accepts on 64-bit
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


@functools.cache
def keep_freed_memory_for_reuse() -> bool:
    """Once per CPU process: glibc keeps freed blocks of up to 32 MiB for reuse; True if it was set.

    A CPU training step allocates and frees tens of MB of temporaries (DeepSpeed's flattened
    gradient buckets and partitions, optimizer temporaries). Under glibc's adaptive defaults many
    of them go back to the OS and are faulted in again by the next step. Measured here (ResNet-18,
    2 gloo processes, fp32): a DeepSpeed ZeRO-1 step took 15,500 minor page faults on average and
    1.23-1.27x DDP's step time; with these settings 230 faults and 1.13-1.14x (DDP: unchanged).
    The price is a resident size that stays at its peak, which a training process reaches every
    step anyway. A no-op outside glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def _import_dynamo_before_the_group() -> None:
    """Import torch._dynamo before a process group exists.

    Measured (torch 2.14, gloo, tests/integration/test_trainer.py's teardown check): when
    torch._dynamo is first imported after init_process_group (it comes with torchvision and the
    KAN conv's torch.library op, which the Trainer now imports only once the group is up), the
    group outlives destroy_process_group and its gloo threads keep running into interpreter
    finalization, where torn-down collectives have aborted finished runs; imported before, the
    group and its threads go at shutdown(). The import costs nothing extra: every training
    process imports it anyway a moment later.
    """
    import torch._dynamo  # noqa: F401


def init(device_pref: str = "auto", hang_timeout_s: float | None = None) -> DistInfo:
    """Join (or create) the process group the launcher describes; idempotent.

    Its collective timeout is derived from `parallel.hang_timeout_s` (rkan_dist.watchdog.collective_timeout_s:
    twice the hang timeout and at least 10 minutes, so that the hang watchdog acts first and this
    timeout is the backstop, and a small hang timeout does not cut start-up short)."""
    global _device
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        _device = choose_device(device_pref, local_rank)
        if _device.type == "cuda":
            torch.cuda.set_device(_device)
        return DistInfo(rank, world_size, local_rank, _device, dist.get_backend(), rank == 0)

    spec = resolve_launch(os.environ)
    device = choose_device(device_pref, spec.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        keep_freed_memory_for_reuse()
    _device = device
    if spec.world_size == 1 and spec.launcher == "single":
        return DistInfo(0, 1, 0, device, None, True)

    # Export torchrun-style variables so DeepSpeed and env:// see one consistent description.
    os.environ.update({"RANK": str(spec.rank), "WORLD_SIZE": str(spec.world_size),
                       "LOCAL_RANK": str(spec.local_rank), "MASTER_ADDR": spec.master_addr,
                       "MASTER_PORT": str(spec.master_port)})
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        # NCCL's flight recorder keeps the last collectives only if asked before the group exists; the
        # hang watchdog dumps it next to the stacks (rkan_dist.watchdog). A user's own value wins.
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    _collect_engines_before_exit()
    _import_dynamo_before_the_group()
    dist.init_process_group(backend=backend, init_method="env://", rank=spec.rank,
                            world_size=spec.world_size,
                            timeout=timedelta(seconds=collective_timeout_s(hang_timeout_s, device.type)),
                            **({"device_id": device} if device.type == "cuda" else {}))
    return DistInfo(spec.rank, spec.world_size, spec.local_rank, device, backend, spec.rank == 0)


def ensure_process_group(device: torch.device) -> None:
    """A one-process group for libraries that insist on one (DeepSpeed), when no launcher made one."""
    global _device
    if dist.is_initialized():
        return
    with socket.socket() as probe:  # a free port on loopback; the group only talks to itself
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    _device = device
    if device.type != "cuda":
        keep_freed_memory_for_reuse()
    _collect_engines_before_exit()
    _import_dynamo_before_the_group()
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                            rank=0, world_size=1)


def shutdown() -> None:
    """Leave the process group; safe to call twice and when none was created.

    Through DeepSpeed when it was used: its own teardown also drops the references it keeps to
    the groups (world clone, data parallel), without which they and their gloo threads outlive
    this call (see Trainer.close for why that matters)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def _collective_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return _device if _device is not None and _device.type == "cuda" else torch.device("cuda")
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (moved to the backend's device and back) and return it."""
    if not is_initialized() or world_size() == 1:
        return tensor
    device = _collective_device()
    work = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce_flag(flag: bool) -> bool:
    """True on every rank if any rank passed True (preemption signals, non-finite losses)."""
    if not is_initialized() or world_size() == 1:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s (picklable) object on every rank."""
    if not is_initialized() or world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, device=_collective_device())
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's (picklable) object, in rank order, on every rank."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s buffers (BatchNorm running statistics).

    DDP broadcasts buffers at the start of each training forward, so after a step the other
    ranks hold statistics updated by their own last batch. Evaluating with those would mix
    several models; checkpoints hold rank 0's, so evaluation uses rank 0's too.
    """
    if not is_initialized() or world_size() == 1:
        return
    device = _collective_device()
    for buffer in module.buffers():
        work = buffer.data if buffer.device == device else buffer.data.to(device)
        dist.broadcast(work, src=src)
        if work is not buffer.data:
            buffer.data.copy_(work)


__all__ = [
    "DistInfo", "broadcast_buffers", "LaunchSpec", "LAUNCHERS", "init", "shutdown", "ensure_process_group", "is_initialized",
    "rank", "world_size", "is_main", "all_reduce_sum", "all_reduce_flag", "barrier", "broadcast_object", "all_gather_object",
    "parse_nodelist", "port_from_job_id", "detect_launcher", "resolve_launch", "choose_device",
    "slurm_hostnames", "resolvable_address",
]
