"""bench/gpu_check.sh without a GPU: every part says it was skipped and the script exits 0; a part
made to fail gives exit 1 with the other parts still reported; `--device cpu` runs the parts'
code at toy sizes (two gloo processes instead of NCCL) so the GPU check itself is tested. The
script finds the project's venv as the make targets do; a distributed part that runs past its
time limit leaves no process behind; one GPU skips the distributed part; the KAN conv part
back-propagates channels_last gradients."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from bench import gpu_check as check

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PARTS = ["kan_conv", "throughput", "distributed", "ffcv_decode", "throughput_compiled"]


def gpu_check(*args: str, fail: str = "", timeout: int = 120, **extra_env: str) -> tuple[int, list[dict], str]:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="",
               RKAN_GPU_CHECK_FAIL=fail, **extra_env)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=timeout)
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # every stdout line is one JSON object
    return result.returncode, lines, result.stdout + result.stderr[-3000:]


def test_without_cuda_every_part_is_skipped_and_the_check_passes(tmp_path):
    code, lines, output = gpu_check("--out", str(tmp_path / "check.json"))
    assert code == 0, output
    assert [line["part"] for line in lines] == ["header", *PARTS, "summary"]
    assert all(line["status"] == "skipped: no CUDA" for line in lines[1:-1]), output
    saved = json.loads((tmp_path / "check.json").read_text())
    assert list(saved["parts"]) == PARTS and (saved["device"], saved["cuda"]) == ("no CUDA", False)


def test_a_failing_part_fails_the_check_and_hides_no_other_part(tmp_path):
    code, lines, output = gpu_check("--out", str(tmp_path / "check.json"), fail="throughput")
    assert code == 1, output
    by_part = {line["part"]: line for line in lines}
    assert by_part["throughput"]["status"] == "failed"
    assert "RKAN_GPU_CHECK_FAIL" in by_part["throughput"]["error"]
    assert [by_part[part]["status"] for part in PARTS if part != "throughput"] == ["skipped: no CUDA"] * 4
    assert by_part["summary"]["failed"] == ["throughput"]
    assert json.loads((tmp_path / "check.json").read_text())["parts"]["throughput"]["status"] == "failed"


@pytest.mark.timeout(420)
def test_every_part_runs_at_toy_sizes_on_the_cpu(tmp_path):
    code, lines, output = gpu_check("--device", "cpu", "--out", str(tmp_path / "check.json"), timeout=400)
    assert code == 0, output
    by_part = {line["part"]: line for line in lines}
    assert all(by_part[part]["status"] == "ok" for part in PARTS if part != "throughput_compiled"), output
    assert by_part["throughput_compiled"]["status"].startswith("skipped: torch.compile is not run at toy sizes")
    assert by_part["kan_conv"]["output_gradient"] == "channels_last"
    cases = by_part["kan_conv"]["cases"]
    assert {case["name"] for case in cases} == {"layer4.rkan.kan1", "layer4.rkan.kan2"}  # stage 4, read off the model
    assert all(case[impl]["ms"] > 0 for case in cases for impl in ("cpu", "grouped", "auto"))
    assert by_part["throughput"]["rkan_resnet18_throughput_ratio"] > 0  # toy sizes: the ResNet-18 pair
    distributed = by_part["distributed"]
    assert (distributed["world_size"], distributed["backend"], distributed["ddp_wrapped"]) == (2, "gloo", True)
    assert distributed["zero1_vs_ddp_step_ratio"] > 0
    decode = by_part["ffcv_decode"]
    assert decode["images_per_s_per_core"] > 0 and decode["images_timed"] == 2 * 16 // 8 * 8
    assert 20 < decode["jpeg_kib"] < 200, "ImageNet-like JPEG sizes, not flat images"


# ----------------------------------------------------------------------------- finding the venv

FAKE_PYTHON = '#!/bin/sh\necho "{name} $*"\n'


def fake_checkout(tmp_path: Path) -> Path:
    """gpu_check.sh in a checkout of its own, beside the dependency files that key the cached venv."""
    checkout = tmp_path / "checkout"
    (checkout / "bench").mkdir(parents=True)
    shutil.copy(REPO / "bench" / "gpu_check.sh", checkout / "bench" / "gpu_check.sh")
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, checkout / name)
    return checkout


def fake_venv(folder: Path, name: str) -> None:
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").write_text(FAKE_PYTHON.format(name=name))
    (folder / "bin" / "python").chmod(0o755)


def run_script(checkout: Path, **env: str) -> subprocess.CompletedProcess:
    """The script from a shell with no venv activated: PATH's python (if any) cannot import torch."""
    base = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(["bash", str(checkout / "bench" / "gpu_check.sh"), "--parts", "kan_conv"],
                          capture_output=True, text=True, env={**base, **env}, timeout=60)


def test_the_script_finds_the_venv_as_the_make_targets_do(tmp_path):
    checkout = fake_checkout(tmp_path)
    cache = tmp_path / "cache"
    deps_hash = subprocess.run("cat pyproject.toml constraints.txt | sha256sum | cut -c1-16", shell=True,
                               cwd=checkout, capture_output=True, text=True, check=True).stdout.strip()
    fake_venv(cache / f"venv-{deps_hash}", "cached")  # .ci/run's venv for these dependency files
    fake_venv(cache / "venv-0000000000000000", "stale")  # another dependency set's
    assert run_script(checkout, RKAN_DIST_CACHE=str(cache)).stdout == "cached -m bench.gpu_check --parts kan_conv\n"
    fake_venv(checkout / ".venv", "dotvenv")  # `make setup`'s default
    assert run_script(checkout, RKAN_DIST_CACHE=str(cache)).stdout.startswith("dotvenv -m bench.gpu_check")
    fake_venv(tmp_path / "elsewhere", "VENV")
    assert run_script(checkout, RKAN_DIST_CACHE=str(cache), VENV=str(tmp_path / "elsewhere")).stdout.startswith(
        "VENV -m bench.gpu_check")
    fake_venv(tmp_path / "chosen", "PYTHON")
    assert run_script(checkout, RKAN_DIST_CACHE=str(cache), VENV=str(tmp_path / "elsewhere"),
                      PYTHON=str(tmp_path / "chosen" / "bin" / "python")).stdout.startswith("PYTHON -m bench.gpu_check")


def test_without_a_venv_the_script_says_to_run_make_setup(tmp_path):
    checkout = fake_checkout(tmp_path)
    result = run_script(checkout, RKAN_DIST_CACHE=str(tmp_path / "empty-cache"))
    assert result.returncode == 2 and result.stdout == ""
    line, = result.stderr.splitlines()
    assert line.startswith("gpu_check: error: no venv at .venv or ") and "run `make setup` first" in line


def test_the_real_script_runs_outside_an_activated_venv(tmp_path):
    """As the README has it after `make setup`: no PYTHON, no activated venv, PATH without the venv.
    The venv is this checkout's .venv, or the one `make` or .ci/run passes down as VENV or caches."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("PYTHON", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PATH="/usr/bin:/bin", CUDA_VISIBLE_DEVICES="", RKAN_GPU_CHECK_FAIL="")
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--parts", "throughput_compiled",
                             "--out", str(tmp_path / "check.json")], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ModuleNotFoundError" not in result.stderr
    assert [json.loads(line)["part"] for line in result.stdout.splitlines()] == ["header", "throughput_compiled",
                                                                                 "summary"]


# ----------------------------------------------------------------------------- a part past its time limit

def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended: only its exit status is left for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def tagged_processes(tag: str) -> list[int]:
    """The running processes whose environment holds `tag`: everything a test run started."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                environ = Path(f"/proc/{name}/environ").read_bytes()
            except OSError:
                continue
            if tag.encode() in environ and alive(int(name)):
                found.append(int(name))
    return found


def test_ending_a_process_tree_reaches_a_child_in_its_own_session_that_ignores_sigterm():
    """What torch's elastic agent does to its workers (start_new_session=True), and a worker stuck in
    a collective (deaf to SIGTERM)."""
    child = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
             "time.sleep(600)")
    parent = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', sys.argv[1]], "
              "start_new_session=True); print(child.pid, flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", parent, child], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        child_pid = int(process.stdout.readline())
        assert process.stdout.readline() == "ready\n"  # the child inherited the pipe: it runs, SIGTERM ignored
        assert os.getsid(child_pid) == child_pid != os.getsid(process.pid)
        ended, running = check.end_process_tree(process.pid)
        assert set(ended) == {process.pid, child_pid} and running == []
        assert not alive(child_pid)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


@pytest.mark.timeout(300)
def test_a_distributed_part_past_its_time_limit_leaves_no_worker_running(tmp_path):
    """Rank 1 hangs (deaf to SIGTERM) and rank 0 waits for it: at the time limit the part fails, torchrun
    and both workers are ended before the next part starts, and no process of the run is left."""
    tag = f"rkan-gpu-check-test-{uuid.uuid4().hex}"
    code, lines, output = gpu_check("--device", "cpu", "--parts", "distributed,throughput_compiled", "--out",
                                    str(tmp_path / "check.json"), timeout=240, RKAN_GPU_CHECK_HANG="distributed",
                                    RKAN_GPU_CHECK_TIMEOUT_S="45", RKAN_GPU_CHECK_TEST_TAG=tag)
    assert code == 1, output
    by_part = {line["part"]: line for line in lines}
    distributed = by_part["distributed"]
    assert distributed["status"] == "failed" and "ran past 45 s" in distributed["error"], output
    assert "hangs on purpose" in distributed["output_tail"], "rank 1 had not started when the limit came"
    assert len(distributed["ended_pids"]) >= 3 and distributed["still_running_pids"] == []  # torchrun, 2 workers
    assert by_part["throughput_compiled"]["status"].startswith("skipped")  # the next part ran after it
    assert tagged_processes(tag) == []
    assert not any(alive(pid) for pid in distributed["ended_pids"])


# ----------------------------------------------------------------------------- one GPU, the KAN conv gradient

def test_on_one_gpu_the_distributed_part_is_skipped_and_publishes_no_ratio(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # what a one-GPU node reports
    result = check.run_part("distributed", torch.device("cuda", 0), check.GPU_SIZES, set())
    assert result["status"] == "skipped: needs 2 or more GPUs"
    assert not any("ratio" in key or "step_s" in key for key in result)


def test_the_kan_conv_part_back_propagates_channels_last_gradients_as_training_does():
    from rkan_dist.models.kan_conv import KANConv2d

    for stride, n_convs in ((1, 1), (2, 2)):
        conv = KANConv2d(8, degree=3, stride=stride, n_convs=n_convs).to(memory_format=torch.channels_last)
        x = torch.randn(2, 8, 7, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
        gradients = []

        def keep_gradient(module, args, out, seen=gradients):
            out.register_hook(seen.append)  # returns None: the output stays as it is

        conv.register_forward_hook(keep_gradient)
        check.kan_conv_step(conv, x, check.output_gradient(conv, x))()
        gradient, = gradients
        assert gradient.is_contiguous(memory_format=torch.channels_last) and not gradient.is_contiguous()
        assert x.grad is not None and conv.poly_weight.grad is not None
