"""bench/gpu_check.sh without a GPU: the same script runs every part tiny on the CPU and prints one JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], check=True)


def test_gpu_check_cpu_fallback_prints_one_json_with_every_part(digits_cache):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2")
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cache", str(digits_cache)],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["device"].startswith("cpu")
    assert report["kan_conv"]["kan_conv_speedup"] > 0
    assert report["model_throughput"]["rkan_resnet50_throughput_ratio"] > 0
    assert report["ffcv_pipeline"]["ffcv_img_s"] > 0
    assert report["ddp_one_gpu"]["ddp_run_ok"] is True
