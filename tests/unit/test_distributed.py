"""Process-group set-up: launcher detection, Slurm nodelists and ports, and real one-process groups."""

from __future__ import annotations

import socket

import pytest
import torch

from rkan_dist import distributed
from rkan_dist.distributed import (
    detect_launcher,
    parse_nodelist,
    port_from_job_id,
    resolve_launch,
)

pytestmark = pytest.mark.unit

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                    "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID", "SUBMITIT_EXECUTOR")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; whatever init() exports is undone after the test (set first, so that
    monkeypatch records the variable and removes what init() writes: delenv of an absent one records
    nothing, and a MASTER_PORT left behind reached every later Slurm job of the session)."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    yield monkeypatch
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ----------------------------------------------------------------------------- nodelists and ports

@pytest.mark.parametrize("nodelist, hosts", [
    ("n[1-2,5]", ["n1", "n2", "n5"]),
    ("a1,b2", ["a1", "b2"]),
    ("localhost", ["localhost"]),
    ("node[01-03]", ["node01", "node02", "node03"]),
    ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("n[7]", ["n7"]),
])
def test_parse_nodelist(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "n[1-", "n1]", "n[3-1]", "n[a-b]", "n[1,x]"])
def test_parse_nodelist_rejects_malformed_lists(nodelist):
    with pytest.raises(ValueError, match="nodelist"):
        parse_nodelist(nodelist)


def test_slurm_hostnames_expands_with_or_without_scontrol():
    assert distributed.slurm_hostnames("n[1-2]") == ["n1", "n2"]


@pytest.mark.parametrize("job_id, port", [("12345", 27345), (35000, 30000), ("1234_7", 16234), ("0", 15000)])
def test_port_from_job_id(job_id, port):
    assert port_from_job_id(job_id) == port


def test_port_from_job_id_stays_in_its_range_and_rejects_garbage():
    assert all(15000 <= port_from_job_id(job) < 35000 for job in range(0, 100000, 997))
    with pytest.raises(ValueError, match="job id"):
        port_from_job_id("abc")


def test_resolvable_address():
    assert distributed.resolvable_address("localhost") == "localhost"
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        distributed.resolvable_address("no-such-node.invalid")


# ----------------------------------------------------------------------------- launcher detection

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "n[1-2]",
         "SLURM_JOB_ID": "4321"}


@pytest.mark.parametrize("env, launcher", [
    ({**SLURM, **TORCHRUN}, "torchrun"),  # torchrun inside a Slurm allocation
    (SLURM, "slurm"),
    ({**SLURM, "SUBMITIT_EXECUTOR": "slurm"}, "slurm"),
    ({"SUBMITIT_EXECUTOR": "local"}, "submitit"),
    ({}, "single"),
    ({"RANK": "0"}, "single"),  # half a torchrun description is not one
])
def test_detect_launcher_order(env, launcher):
    assert detect_launcher(env) == launcher


def test_resolve_torchrun():
    spec = resolve_launch(TORCHRUN)
    assert (spec.launcher, spec.rank, spec.world_size, spec.local_rank) == ("torchrun", 3, 8, 1)
    assert (spec.master_addr, spec.master_port) == ("10.0.0.1", 29400)


def test_resolve_slurm_uses_first_host_and_job_port():
    looked_up = []

    def node_address(node):
        looked_up.append(node)
        return "127.0.0.1"  # what NodeAddr gives for the dev cluster's logical nodes

    spec = resolve_launch(SLURM, expand_hosts=parse_nodelist, node_address=node_address)
    assert (spec.launcher, spec.rank, spec.world_size, spec.local_rank) == ("slurm", 5, 8, 1)
    assert looked_up == ["n1"]
    assert (spec.master_addr, spec.master_port) == ("127.0.0.1", 15000 + 4321)


def test_resolve_slurm_honours_explicit_master():
    env = {**SLURM, "MASTER_PORT": "23456", "MASTER_ADDR": "head"}
    spec = resolve_launch(env, expand_hosts=parse_nodelist, node_address=lambda node: node)
    assert (spec.master_addr, spec.master_port) == ("head", 23456)


def test_resolve_submitit_reads_the_real_job_environment(clean_env):
    for name, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "4",
                        "SUBMITIT_LOCAL_GLOBALID": "2", "SUBMITIT_LOCAL_LOCALID": "2"}.items():
        clean_env.setenv(name, value)
    import os

    spec = resolve_launch(os.environ)
    assert (spec.launcher, spec.rank, spec.world_size, spec.local_rank) == ("submitit", 2, 4, 2)
    assert spec.master_port == 15000 + 4242
    assert spec.master_addr == socket.gethostname()


def test_resolve_single_and_bad_integers():
    assert resolve_launch({}).world_size == 1
    with pytest.raises(ValueError, match="RANK='x'"):
        resolve_launch({**TORCHRUN, "RANK": "x"})
    with pytest.raises(ValueError, match="SLURM_NTASKS"):
        resolve_launch({**SLURM, "SLURM_NTASKS": ""}, expand_hosts=parse_nodelist, node_address=lambda n: n)


def test_choose_device():
    assert distributed.choose_device("cpu", 0) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert distributed.choose_device("auto", 1) == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            distributed.choose_device("cuda", 0)
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        distributed.choose_device("tpu", 0)


@pytest.mark.parametrize("visible", [1, 8])
def test_choose_device_with_one_gpu_per_task_or_all_gpus_visible(visible, monkeypatch):
    """The CUDA branch on CPU: Slurm with per-task binding shows local rank 7 one GPU (cuda:0);
    with all 8 visible each local rank takes its own; more ranks than GPUs is an error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    for local_rank in range(8):
        expected = 0 if visible == 1 else local_rank
        assert distributed.choose_device("cuda", local_rank) == torch.device("cuda", expected)
        assert distributed.choose_device("auto", local_rank) == torch.device("cuda", expected)
    if visible > 1:
        with pytest.raises(ValueError, match="local rank 8 has no GPU: this process sees 8"):
            distributed.choose_device("cuda", 8)


# ----------------------------------------------------------------------------- real groups in this process

def test_single_process_needs_no_group_and_helpers_are_no_ops(clean_env):
    info = distributed.init("cpu")
    assert info == distributed.DistInfo(0, 1, 0, torch.device("cpu"), None, True)
    assert not distributed.is_initialized()
    tensor = torch.tensor([2.0])
    assert distributed.all_reduce_sum(tensor) is tensor and tensor.item() == 2.0
    assert distributed.all_reduce_flag(True) is True and distributed.all_reduce_flag(False) is False
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.barrier()
    assert distributed.is_main() and distributed.rank() == 0 and distributed.world_size() == 1
    distributed.shutdown()
    distributed.shutdown()


def test_torchrun_env_with_one_process_creates_a_gloo_group_idempotently(clean_env):
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port())}.items():
        clean_env.setenv(name, value)
    info = distributed.init("cpu")
    assert (info.backend, info.world_size, info.is_main) == ("gloo", 1, True)
    assert distributed.is_initialized()
    assert distributed.init("cpu") == info  # joins the existing group
    assert distributed.all_reduce_sum(torch.tensor([3.0])).item() == 3.0
    distributed.shutdown()
    assert not distributed.is_initialized()
    distributed.shutdown()  # twice is fine


def test_slurm_env_exports_torchrun_variables_and_forms_a_group(clean_env):
    import os

    port = _free_port()
    for name, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
                        "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "77", "MASTER_PORT": str(port)}.items():
        clean_env.setenv(name, value)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        clean_env.delenv(name, raising=False)
    info = distributed.init("cpu")
    assert info.backend == "gloo" and info.rank == 0
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "localhost")
    assert os.environ["MASTER_PORT"] == str(port)


def test_ensure_process_group_for_libraries_that_need_one(clean_env):
    distributed.ensure_process_group(torch.device("cpu"))
    assert distributed.is_initialized() and distributed.world_size() == 1
    distributed.ensure_process_group(torch.device("cpu"))  # already there: nothing happens
    distributed.shutdown()


EXIT_ORDER_SCRIPT = """
import atexit, gc, sys, weakref
import torch
from rkan_dist import distributed

engine = []
# Registered before the process group exists, so it runs after rkan_dist's own exit handler.
atexit.register(lambda: print("engine freed before finalization:", engine[0]() is None, flush=True))
gc.disable()  # automatic passes would free the cycle by chance; only an explicit pass may here


def main():
    distributed.ensure_process_group(torch.device("cpu"))
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    ddp(torch.randn(2, 4)).sum().backward()
    engine.append(weakref.ref(ddp))
    distributed.shutdown()


main()  # ddp is now unreachable, but DDP sits in a reference cycle
print("after main, engine alive:", engine[0]() is not None, flush=True)
"""


def test_an_engine_left_in_a_reference_cycle_is_freed_before_interpreter_finalization(clean_env):
    """Freed during finalization instead, DDP's teardown sometimes aborts a finished process
    (std::terminate); rkan_dist's exit-time gc pass frees it while the interpreter is whole."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", EXIT_ORDER_SCRIPT], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "after main, engine alive: True" in result.stdout  # the premise: only a gc pass frees it
    assert "engine freed before finalization: True" in result.stdout, result.stdout


def test_a_cpu_process_keeps_freed_memory_for_reuse(clean_env):
    """glibc accepts the settings, and init on CPU applies them (their effect on ZeRO's step time
    is measured by bench.engines, not timed here)."""
    distributed.init("cpu")
    assert distributed.keep_freed_memory_for_reuse.cache_info().currsize == 1  # init applied them
    assert distributed.keep_freed_memory_for_reuse()  # once per process; later calls just report
