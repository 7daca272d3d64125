"""No silent fallback to the CPU: where this process has NVIDIA GPUs that torch cannot use,
`device: auto` stops with one line (rkan_dist.nvidia, rkan_dist.distributed.choose_device); where it
has none, or CUDA_VISIBLE_DEVICES hides them, or `device: cpu` asks for the CPU, it runs there.

A stand-in nvidia-smi (tests/fake_nvidia.py) plays a GPU node with an R550 driver; torch's own
`cuda.is_available()` is held False, as it is on such a node (and on this machine)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from fake_nvidia import H100, OLD_DRIVER, calls, fake_nvidia_smi, path_with

from rkan_dist import distributed, nvidia
from rkan_dist.bench import choose_device as bench_choose_device
from rkan_dist.faults import ConfigError

pytestmark = pytest.mark.unit

GPU_VARIABLES = ("CUDA_VISIBLE_DEVICES", *nvidia.SLURM_GPU_VARIABLES)


@pytest.fixture
def node(tmp_path, monkeypatch) -> Path:
    """This test's process as a task on a GPU node whose driver torch cannot use: the stand-in
    nvidia-smi first on PATH, no GPU variable set, CUDA unavailable to torch. Returns the folder of
    the stand-in (its calls.log)."""
    folder = fake_nvidia_smi(tmp_path / "bin")
    monkeypatch.setenv("PATH", path_with(folder))
    for name in GPU_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return folder


def no_device_files(tmp_path: Path) -> Path:
    (tmp_path / "dev").mkdir(exist_ok=True)
    return tmp_path / "dev"


# ----------------------------------------------------------------------------- the environment

@pytest.mark.parametrize("value, devices", [
    (None, None),  # unset: every GPU visible
    ("", []), ("-1", []), (" -1 ", []),  # none
    ("0,1", ["0", "1"]), ("0, 1", ["0", "1"]), ("3", ["3"]),
    ("0,-1,2", ["0"]), ("1,,2", ["1"]),  # CUDA stops at the first invalid entry
    ("GPU-8c1e4f2a,MIG-2b9d", ["GPU-8c1e4f2a", "MIG-2b9d"]),
    ("NoDevFiles", []),  # Slurm's word for a GPU gres without device files: CUDA sees no device in it
])
def test_cuda_visible_devices_names_devices_as_cuda_reads_it(value, devices):
    assert nvidia.visible_devices(value) == devices


def test_slurm_and_cuda_visible_devices_assign_gpus():
    assert nvidia.assigned_by_environment({}) == []
    assert nvidia.assigned_by_environment({"SLURM_GPUS_ON_NODE": "0", "SLURM_JOB_GPUS": "",
                                           "CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert nvidia.assigned_by_environment({"SLURM_JOB_GPUS": "0,1", "SLURM_GPUS_ON_NODE": "2",
                                           "CUDA_VISIBLE_DEVICES": "0,1"}) == [
        "SLURM_JOB_GPUS=0,1", "SLURM_GPUS_ON_NODE=2", "CUDA_VISIBLE_DEVICES=0,1"]
    assert nvidia.assigned_by_environment({"SLURM_STEP_GPUS": "3"}) == ["SLURM_STEP_GPUS=3"]


def test_device_files_are_the_numbered_ones(tmp_path):
    dev = no_device_files(tmp_path)
    for name in ("nvidiactl", "nvidia-uvm", "nvidia-caps", "nvidia3", "nvidia10"):
        (dev / name).touch()
    assert nvidia.device_files(dev) == [str(dev / "nvidia3"), str(dev / "nvidia10")]
    assert nvidia.device_files(tmp_path / "missing") == []


# ----------------------------------------------------------------------------- nvidia-smi

def test_nvidia_smi_gives_names_and_driver(node):
    assert nvidia.query_nvidia_smi() == ([H100, H100], OLD_DRIVER)
    assert calls(node) == ["--query-gpu=driver_version,name --format=csv,noheader"]  # one call


def test_missing_nvidia_smi_is_no_gpu_and_no_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert nvidia.query_nvidia_smi() == ([], None)
    assert not nvidia.probe({}, dev=no_device_files(tmp_path)).present


def test_a_hanging_nvidia_smi_is_cut_off(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", path_with(fake_nvidia_smi(tmp_path / "bin", hang=True)))
    started = time.monotonic()
    assert nvidia.query_nvidia_smi(timeout_s=0.5) == ([], None)
    assert time.monotonic() - started < 10


def test_names_from_the_listing_where_the_query_fails(tmp_path, monkeypatch):
    folder = fake_nvidia_smi(tmp_path / "bin")
    script = folder / "nvidia-smi"
    script.write_text(script.read_text().replace('"--query-gpu=driver_version,name', '"--unknown'))
    monkeypatch.setenv("PATH", path_with(folder))
    assert nvidia.query_nvidia_smi() == ([H100, H100], None)


# ----------------------------------------------------------------------------- the one line

def test_the_line_names_gpus_driver_torch_cuda_and_what_to_do(node):
    gpus = nvidia.probe({}, dev=no_device_files(node))
    assert gpus.present and gpus.evidence == ("nvidia-smi",)
    line = nvidia.unusable_gpus_line("2.14.1+cu130", "13.0", gpus=gpus)
    assert "\n" not in line
    assert f"2 x {H100}, driver {OLD_DRIVER}" in line
    assert "torch 2.14.1+cu130, built for CUDA 13.0, cannot use them" in line
    assert "`make setup` on this node names it" in line and nvidia.README_SECTION in line
    assert line.endswith("or set train.device=cpu to run on the CPU")
    cpu_only = nvidia.unusable_gpus_line("2.14.1+cpu", None, cpu_hint="pass --device cpu", gpus=gpus)
    assert "torch 2.14.1+cpu, a CPU-only build, cannot use them" in cpu_only
    assert cpu_only.endswith("or pass --device cpu to run on the CPU")


def test_without_nvidia_smi_the_other_signs_still_count(tmp_path):
    dev = no_device_files(tmp_path)
    (dev / "nvidia2").touch()
    gpus = nvidia.probe({"SLURM_JOB_GPUS": "2"}, dev=dev)
    assert gpus.present and gpus.driver is None
    line = nvidia.unusable_gpus_line("2.14.1", "13.0", gpus=gpus)
    assert f"(driver unknown, no answer from nvidia-smi; seen by {dev / 'nvidia2'}, SLURM_JOB_GPUS=2)" in line


# ----------------------------------------------------------------------------- choose_device

def test_auto_stops_with_the_line_where_torch_cannot_use_the_gpus(node):
    with pytest.raises(ConfigError) as raised:
        distributed.choose_device("auto", 0)
    line = str(raised.value)
    assert "\n" not in line
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    assert f"(2 x {H100}, driver {OLD_DRIVER}; seen by nvidia-smi" in line
    assert f"torch {torch.__version__}, {build}, cannot use them" in line and "train.device=cpu" in line
    with pytest.raises(ConfigError, match="cannot use them"):  # asked for by name: the same line
        distributed.choose_device("cuda", 0)


def test_device_cpu_still_runs_on_the_cpu_with_the_gpus_there(node):
    assert distributed.choose_device("cpu", 0) == torch.device("cpu")
    assert calls(node) == []  # the CPU on purpose: no GPU question asked


@pytest.mark.parametrize("hidden", ["", "-1"])
def test_cuda_visible_devices_that_names_none_means_the_cpu(node, monkeypatch, hidden):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
    monkeypatch.setenv("SLURM_JOB_GPUS", "0,1")  # hidden from CUDA all the same
    assert distributed.choose_device("auto", 0) == torch.device("cpu")
    assert calls(node) == []  # decided from the environment alone


def test_a_cpu_node_runs_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    for name in GPU_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if nvidia.device_files():
        pytest.skip("this machine has /dev/nvidia<N>: not a CPU node")
    assert distributed.choose_device("auto", 0) == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available here"):
        distributed.choose_device("cuda", 0)


@pytest.mark.parametrize("variable, value", [("CUDA_VISIBLE_DEVICES", "0"), ("SLURM_GPUS_ON_NODE", "8"),
                                             ("SLURM_STEP_GPUS", "0,1,2,3")])
def test_gpus_assigned_by_slurm_or_cuda_visible_devices_stop_auto_without_nvidia_smi(tmp_path, monkeypatch,
                                                                                    variable, value):
    monkeypatch.setenv("PATH", str(tmp_path))
    for name in GPU_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=f"driver unknown, no answer from nvidia-smi; seen by .*{variable}={value}"):
        distributed.choose_device("auto", 0)


# ----------------------------------------------------------------------------- rkan-dist bench

def test_bench_auto_stops_and_bench_cpu_hides_the_gpus(node, monkeypatch):
    with pytest.raises(ConfigError, match="or pass --device cpu to run on the CPU$"):
        bench_choose_device("auto")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # put back (unset) after the test
    bench_choose_device("cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # this process and the benchmarks' own processes
    assert distributed.choose_device("auto", 0) == torch.device("cpu")
