"""Whether this process was given NVIDIA GPUs that torch cannot use, and the one line that says so.

`device: auto` picks the CPU when `torch.cuda.is_available()` is False. On a GPU node whose driver
is older than the CUDA build of torch needs (or with a CPU-only torch) that would train on the CPU
with the GPUs idle; `rkan_dist.distributed.choose_device` asks `unusable_gpus_line` first and stops
with its line instead. Which torch build fits which driver is an install fact: `scripts/setup.sh`
holds it (and prints it where the driver is too old), the README's "GPU drivers and torch builds"
shows it.

GPUs count as given to this process when any of these says so:

- `nvidia-smi` lists GPUs (its driver version and names also go into the line);
- a device file /dev/nvidia<N> exists (a container may hold only the GPUs it was given, so not
  necessarily /dev/nvidia0);
- Slurm assigned GPUs to the job or step (SLURM_STEP_GPUS, SLURM_JOB_GPUS, SLURM_GPUS_ON_NODE);
- CUDA_VISIBLE_DEVICES names a device.

CUDA_VISIBLE_DEVICES that names none ("" or "-1") hides every GPU from CUDA, whatever the node
has: whoever set it chose the CPU, so then no GPU is given. Unset, it hides nothing (a CPU-only
node has no other evidence, so it has no GPUs either).

Standard library only, and every nvidia-smi call has a time limit: a wedged driver can make it
hang, and a missing nvidia-smi is the ordinary case of a CPU machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

NVIDIA_SMI_TIMEOUT_S = 10.0
README_SECTION = 'README, "GPU drivers and torch builds"'
SLURM_GPU_VARIABLES = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE")


@dataclass(frozen=True)
class NvidiaGpus:
    """What this machine and environment say about NVIDIA GPUs for this process."""

    names: tuple[str, ...]  # one per GPU nvidia-smi lists; empty where it is missing or did not answer
    driver: str | None  # nvidia-smi's driver_version, e.g. '550.54.15'
    evidence: tuple[str, ...]  # each sign of a GPU: 'nvidia-smi', '/dev/nvidia0', 'SLURM_JOB_GPUS=0,1', ...
    hidden_by: str | None  # 'CUDA_VISIBLE_DEVICES=""' where that variable names no device

    @property
    def present(self) -> bool:
        """GPUs were given to this process (and not hidden from CUDA)."""
        return bool(self.evidence) and self.hidden_by is None

    def describe(self) -> str:
        """'2 x NVIDIA H100 80GB HBM3, driver 550.54.15', or as much of it as is known."""
        names = ", ".join(f"{count} x {name}" for name, count in Counter(self.names).items())
        driver = f"driver {self.driver}" if self.driver else "driver unknown, no answer from nvidia-smi"
        return f"{names}, {driver}" if names else driver


def visible_devices(value: str | None) -> list[str] | None:
    """The devices CUDA_VISIBLE_DEVICES names, or None where it is unset (every GPU visible).

    CUDA reads the comma-separated list up to its first invalid entry: a negative index or an empty
    entry ends it, so "" and "-1" name none and "0,-1,2" names only "0". Indices, GPU-<uuid> and
    MIG-<uuid> entries are devices; any other word ends the list as CUDA's parser does.
    """
    if value is None:
        return None
    devices = []
    for entry in (part.strip() for part in value.split(",")):
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        devices.append(entry)
    return devices


def assigned_by_environment(env: Mapping[str, str]) -> list[str]:
    """Slurm's and CUDA_VISIBLE_DEVICES' statements that this process has GPUs, as 'NAME=value'."""
    evidence = []
    for name in SLURM_GPU_VARIABLES:
        value = env.get(name, "").strip()
        if not value:
            continue
        if name == "SLURM_GPUS_ON_NODE":  # a count; the other two list indices
            if value.isdigit() and int(value) > 0:
                evidence.append(f"{name}={value}")
        elif value.lower() not in ("none", "nodevfiles"):
            evidence.append(f"{name}={value}")
    if visible_devices(env.get("CUDA_VISIBLE_DEVICES")):
        evidence.append(f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}")
    return evidence


def device_files(dev: Path = Path("/dev")) -> list[str]:
    """The /dev/nvidia<N> files, in index order ('nvidiactl' and 'nvidia-uvm' are not GPUs)."""
    try:
        names = [entry.name for entry in dev.iterdir() if re.fullmatch(r"nvidia\d+", entry.name)]
    except OSError:
        return []
    return [str(dev / name) for name in sorted(names, key=lambda name: int(name[6:]))]


def query_nvidia_smi(timeout_s: float = NVIDIA_SMI_TIMEOUT_S,
                     run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> tuple[list[str], str | None]:
    """(GPU names, driver version) from nvidia-smi; ([], None) where it is missing, fails or hangs.

    `--query-gpu` gives both in one call; `-L` is asked only where the query lists nothing (a
    driver too old for a field), for the names."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return [], None

    def lines(*args: str) -> list[str]:
        try:
            result = run([executable, *args], capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.SubprocessError):
            return []
        return [line.strip() for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []

    names, driver = [], None
    for line in lines("--query-gpu=driver_version,name", "--format=csv,noheader"):
        version, _, name = (part.strip() for part in line.partition(","))
        if re.fullmatch(r"\d+(\.\d+)*", version):
            driver = driver or version
            names.append(name or "unnamed GPU")
    if not names:  # 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)'; MIG devices are listed under their GPU
        names = [match.group(1).strip() for line in lines("-L")
                 if (match := re.match(r"GPU \d+:\s*(.*?)\s*(\(UUID:.*)?$", line))]
    return names, driver


def probe(env: Mapping[str, str] | None = None, dev: Path = Path("/dev"),
          timeout_s: float = NVIDIA_SMI_TIMEOUT_S) -> NvidiaGpus:
    """What this machine says about NVIDIA GPUs for a process with environment `env`."""
    env = os.environ if env is None else env
    visible = visible_devices(env.get("CUDA_VISIBLE_DEVICES"))
    hidden_by = f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r}" if visible == [] else None
    names, driver = query_nvidia_smi(timeout_s)
    evidence = (["nvidia-smi"] if names else []) + device_files(dev)[:1] + assigned_by_environment(env)
    return NvidiaGpus(tuple(names), driver, tuple(evidence), hidden_by)


def torch_build(torch_version: str, torch_cuda: str | None) -> str:
    """'torch 2.14.1+cu130, built for CUDA 13.0' or '..., a CPU-only build'."""
    return f"torch {torch_version}, " + (f"built for CUDA {torch_cuda}" if torch_cuda else "a CPU-only build")


def unusable_gpus_line(torch_version: str, torch_cuda: str | None, cpu_hint: str = "set train.device=cpu",
                       gpus: NvidiaGpus | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The one line for a process that has NVIDIA GPUs torch cannot use, or None where it has none.

    Call it only where `torch.cuda.is_available()` is False: it does not ask torch. `cpu_hint` is
    how the command at hand runs on the CPU on purpose (`--device cpu` for the benchmarks). Without
    `gpus` it probes, but not where CUDA_VISIBLE_DEVICES already hides every GPU."""
    if gpus is None:
        env = os.environ if env is None else env
        if visible_devices(env.get("CUDA_VISIBLE_DEVICES")) == []:
            return None
        gpus = probe(env)
    if not gpus.present:
        return None
    return (f"this process has NVIDIA GPUs ({gpus.describe()}; seen by {', '.join(gpus.evidence)}) but "
            f"{torch_build(torch_version, torch_cuda)}, cannot use them (torch.cuda.is_available() is False): "
            f"install the torch build that fits this driver (`make setup` on this node names it; {README_SECTION}), "
            f"or {cpu_hint} to run on the CPU")
