"""The commands on a GPU node whose driver torch cannot use, played by a stand-in nvidia-smi
(tests/fake_nvidia.py, R550) on the PATH of each subprocess only:

- `rkan-dist train` and `rkan-dist bench` with `device: auto`: one line, exit 2, no traceback,
  before any data is read or run folder made; `train.device=cpu` still trains;
- `bench/gpu_check.sh`: its header names the driver, torch's CUDA version, torch and the GPUs, then
  the line, exit 1 (it used to report every part "skipped: no CUDA" and exit 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_nvidia import H100, OLD_DRIVER, fake_nvidia_smi, path_with

from rkan_dist.nvidia import SLURM_GPU_VARIABLES

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
BUILD = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"


def gpu_node_env(tmp_path: Path) -> dict[str, str]:
    """This machine's environment with the stand-in nvidia-smi first on PATH and no GPU variable."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("CUDA_VISIBLE_DEVICES", *SLURM_GPU_VARIABLES)}
    return {**env, "PATH": path_with(fake_nvidia_smi(tmp_path / "bin")), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable}


def run(command: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def the_line(result: subprocess.CompletedProcess, prefix: str) -> str:
    """The one line `result` printed on stderr, checked to be just that."""
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{prefix}: error: this process has NVIDIA GPUs (2 x {H100}, driver {OLD_DRIVER}; "
                           "seen by nvidia-smi) but "), line
    assert f"torch {torch.__version__}, {BUILD}, cannot use them" in line, line
    return line


def test_train_auto_stops_with_one_line_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    result = run([sys.executable, "-m", "rkan_dist.cli", "train", "--config", str(DEMO),
                  f"train.run_dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}"], gpu_node_env(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert the_line(result, "rkan-dist").endswith("or set train.device=cpu to run on the CPU")
    assert result.stdout == ""
    assert not run_dir.exists() and not (tmp_path / "cache").exists()  # stopped before the run folder and the data


def test_train_device_cpu_still_trains_beside_the_gpus(tmp_path, digits_cache):
    result = run([sys.executable, "-m", "rkan_dist.cli", "train", "--config", str(DEMO), "train.device=cpu",
                  f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={digits_cache}", "train.max_steps=1",
                  "train.eval_every=100", "checkpoint.every_steps=0", "logging.progress_bar=false",
                  "train.precision=fp32", "data.num_workers=1"], gpu_node_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cannot use them" not in result.stdout + result.stderr


def test_bench_auto_stops_with_one_line(tmp_path):
    result = run([sys.executable, "-m", "rkan_dist.cli", "bench", "kan_conv", "--quick"], gpu_node_env(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert the_line(result, "rkan-dist").endswith("or pass --device cpu to run on the CPU")


def test_gpu_check_names_driver_cuda_torch_and_gpus_then_fails_with_the_line(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = run(["bash", "bench/gpu_check.sh", "--parts", "kan_conv", "--out", str(out)], gpu_node_env(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    (header_line,) = result.stdout.splitlines()  # the header, and no part run
    header = json.loads(header_line)
    assert header["part"] == "header" and header["cuda"] is False
    assert (header["driver"], header["gpus"]) == (OLD_DRIVER, [H100, H100])
    assert header["torch"] == torch.__version__
    assert header["torch_cuda"] == (torch.version.cuda or "a CPU-only build")
    assert the_line(result, "gpu_check").endswith("or pass --device cpu to run on the CPU")
    assert not out.exists()
