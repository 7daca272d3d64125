"""train.precision=auto picks what the hardware is fast at; every process's threads fit the node's cores."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rkan_dist import precision as precision_module
from rkan_dist import threads
from rkan_dist.precision import resolve_precision, slow_precision_warning
from rkan_dist.threads import plan_threads

pytestmark = pytest.mark.unit


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with (native=True) or without native bf16 in oneDNN."""
    def make(native: bool, capability: str = "AVX2"):
        monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native)
        monkeypatch.setattr(precision_module, "cpu_capability", lambda: capability)
    return make


@pytest.fixture
def gpu(monkeypatch):
    def make(bf16: bool):
        monkeypatch.setattr(precision_module, "cuda_supports_bf16", lambda device: bf16)
    return make


def test_auto_on_an_avx2_cpu_is_fp32_and_says_why(cpu):
    cpu(native=False, capability="AVX2")
    precision, reason = resolve_precision("auto", "cpu")
    assert precision == "fp32"
    assert "no native bf16" in reason and "AVX2" in reason


def test_auto_on_a_cpu_with_native_bf16_is_bf16(cpu):
    cpu(native=True, capability="AVX512")
    assert resolve_precision("auto", "cpu") == ("bf16", "auto: oneDNN has native bf16 on this CPU (AVX512)")


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_is_bf16_where_supported_else_fp16(gpu, cpu, bf16, expected):
    gpu(bf16)
    cpu(native=False)  # the CPU's capability plays no part on a GPU
    precision, reason = resolve_precision("auto", "cuda:0")
    assert precision == expected
    assert ("loss scaling" in reason) == (expected == "fp16")


def test_an_explicit_precision_is_kept_and_bf16_on_avx2_warns(cpu):
    cpu(native=False)
    for requested in ("fp32", "bf16", "fp16"):
        assert resolve_precision(requested, "cpu") == (requested, "set by train.precision")
    assert "will be slow" in slow_precision_warning("bf16", "cpu")
    assert slow_precision_warning("fp32", "cpu") is None
    cpu(native=True)
    assert slow_precision_warning("bf16", "cpu") is None


def test_deepspeed_fp16_on_cpu_is_refused_and_auto_never_picks_it(cpu):
    cpu(native=False)
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_precision("fp16", "cpu", backend="deepspeed")
    assert resolve_precision("auto", "cpu", backend="deepspeed")[0] == "fp32"
    with pytest.raises(ValueError, match="choose one of auto, fp32, bf16, fp16"):
        resolve_precision("fp8", "cpu")


def test_the_real_probe_says_no_on_an_avx2_cpu_and_auto_follows_it():
    """The probe itself, not a stand-in: oneDNN capped at AVX2 (what an AMD EPYC Milan has) has no
    bf16, so auto trains in fp32 there; uncapped, auto follows whatever the probe answers."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("ONEDNN_MAX_CPU_ISA=AVX2 is an x86 setting")
    code = "from rkan_dist.precision import cpu_has_native_bf16, resolve_precision as r; " \
           "print(cpu_has_native_bf16(), r('auto', 'cpu')[0])"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout.split() == ["False", "fp32"], result.stdout + result.stderr[-2000:]
    native = precision_module.cpu_has_native_bf16()
    assert resolve_precision("auto", "cpu")[0] == ("bf16" if native else "fp32")


@pytest.mark.parametrize(("cores", "local", "workers", "compute", "data"), [
    (2, 1, 1, 1, 1),     # the README's snippet on 2 cores: 2 threads, not 22
    (2, 2, 1, 1, 1),     # make demo: one core per process still needs one decoder thread
    (2, 1, 8, 1, 1),     # a recipe asking for 8 data threads on 2 cores
    (64, 8, 8, 1, 7),    # 8 GPUs on 64 cores: data first, one core of compute
    (80, 8, 8, 2, 8),
    (16, 1, 4, 12, 4),   # one CPU process: the rest computes
    (4, 2, 0, 2, 0),     # no data threads (synthetic data, export)
])
def test_thread_plan_fits_the_node(cores, local, workers, compute, data):
    plan = plan_threads(cores, local, workers)
    assert (plan.compute, plan.data) == (compute, data)
    if cores // local >= 2:
        assert local * (plan.compute + plan.data) <= cores


def test_omp_num_threads_caps_compute_only():
    plan = plan_threads(16, 1, 4, compute_cap=2)
    assert (plan.compute, plan.data) == (2, 4)
    assert plan_threads(16, 1, 4, compute_cap=None).compute == 12


def test_cores_follow_affinity_and_slurm_and_local_world_size(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(threads, "_cgroup_cpu_limit", lambda: None)
    assert threads.available_cores({}) == 6
    assert threads.available_cores({"SLURM_CPUS_PER_TASK": "2"}) == 2
    monkeypatch.setattr(threads, "_cgroup_cpu_limit", lambda: 3)
    assert threads.available_cores({}) == 3
    assert threads.local_processes({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert threads.local_processes({}) == 1


def test_cgroup_quota_is_read_in_whole_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads._cgroup_cpu_limit(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_cpu_limit(tmp_path) is None


def test_configure_threads_sets_torch_from_the_plan(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "available_cores", lambda env: 8)
    try:
        plan = threads.configure_threads(1, env={"LOCAL_WORLD_SIZE": "2"})
        assert (plan.compute, plan.data) == (3, 1)
        assert torch.get_num_threads() == 3
        plan = threads.configure_threads(1, env={"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"})
        assert (plan.compute, plan.data) == (1, 1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_compiled_code_is_cached_per_cpu_instruction_set(tmp_path) -> None:
    """torch 2.14 reuses compiled CPU code across instruction sets (wrong gradients): each gets a folder."""
    import torch

    from rkan_dist.precision import separate_inductor_cache_per_cpu

    capability = torch.backends.cpu.get_cpu_capability()
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "shared")}
    assert separate_inductor_cache_per_cpu(env) == str(tmp_path / "shared" / f"cpu-{capability}")
    assert separate_inductor_cache_per_cpu(env) == str(tmp_path / "shared" / f"cpu-{capability}")  # not nested
    default: dict[str, str] = {}
    assert separate_inductor_cache_per_cpu(default).endswith(f"cpu-{capability}")
    assert default["TORCHINDUCTOR_CACHE_DIR"].startswith(str(Path(tempfile.gettempdir())))
