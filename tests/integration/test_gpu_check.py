"""bench/gpu_check.sh without a GPU: every part says it was skipped and the script exits 0; a part
made to fail gives exit 1 with the other parts still reported; `--device cpu` runs the parts'
code at toy sizes (two gloo processes instead of NCCL) so the GPU check itself is tested."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PARTS = ["kan_conv", "throughput", "distributed", "ffcv_decode", "throughput_compiled"]


def gpu_check(*args: str, fail: str = "", timeout: int = 120) -> tuple[int, list[dict], str]:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="",
               RKAN_GPU_CHECK_FAIL=fail)
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
