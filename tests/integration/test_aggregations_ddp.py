"""Every aggregation trains forward and backward under DDP on 2 gloo processes (one torchrun launch
runs them all: tests/integration/scripts/aggregation_checks.py measures, this module asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rkan_dist.models.rkan import AGGREGATIONS

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).parent / "scripts" / "aggregation_checks.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("aggregations")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # a clean launch
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
               str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    if result.returncode != 0:
        pytest.fail(f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return json.loads((out / "aggregations.json").read_text())


@pytest.mark.timeout(450)
@pytest.mark.parametrize("name", list(AGGREGATIONS))
def test_aggregation_trains_two_ddp_steps_on_two_gloo_processes(results, name):
    run = results[name]
    assert run["finite"], run["losses"]
    assert run["without_grad"] == []  # DDP (find_unused_parameters=False) would also have failed step 2
    assert run["ranks_agree"], "the two ranks' weights differ after the DDP steps"
    changed = set(run["changed"])
    assert set(run["aggregation_parameters"]) <= changed  # the aggregation's own parameters trained
    assert {"layer1.rkan.conv_in.weight", "layer4.rkan.kan2.poly_weight", "layer2.0.conv1.weight", "fc.weight"} <= changed


@pytest.mark.timeout(450)
def test_frozen_backbone_with_scaling_under_ddp(results):
    run = results["cbam+freeze_backbone+scaling"]
    assert run["finite"] and run["ranks_agree"] and run["without_grad"] == []
    assert run["trainable"] and all(".rkan." in n or n.startswith("fc.") for n in run["trainable"])
    assert {"layer1.rkan.scale", "layer4.rkan.scale"} <= set(run["trainable"]) <= set(run["changed"])
    # only the branches (their parameters and BatchNorm statistics) and the classifier changed
    assert all(".rkan." in k or k.startswith("fc.") for k in run["changed"]), run["changed"]
    assert run["backbone_bn_train"] == [False]
