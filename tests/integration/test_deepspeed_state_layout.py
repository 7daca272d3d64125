"""DeepSpeed's optimizer state after a load has its parameters' layout, per ZeRO stage (issue 23, item 3).

Real DeepSpeed in one process over gloo, on CPU; the measuring is done by
tests/integration/scripts/state_layout_checks.py (DeepSpeed's start-up paid once).
What the torch optimizer steps under DeepSpeed, found there and asserted here:
- ZeRO-0 fp32: the module's own parameters, DeepSpeed wrapping nothing;
- ZeRO-0 bf16: fp32 copies of them, one per parameter and of its shape (FP16_UnfusedOptimizer);
- ZeRO-1/2 (fp32 and bf16): one flat fp32 partition per parameter group (DeepSpeedZeroOptimizer),
  its state flat as well: no state shaped like a model parameter, nothing 4-D to lay out.
The module's parameters are NCHW under DeepSpeed even for a channels_last model
(`contiguous_parameters`), so DeepSpeed writes NCHW state; a checkpoint whose state is
channels_last (another engine's) is made by rewriting the saved state, values unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).parent / "scripts" / "state_layout_checks.py"
CONV_WEIGHTS = [[16, 3, 3, 3], [32, 16, 3, 3]]  # engine_checks.TinyNet's 4-D parameters


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("state_layout")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(SCRIPT.parent),
                                                                            os.environ.get("PYTHONPATH", "")]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # one process, no launcher
        env.pop(name, None)
    result = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=400,
                            env=env, cwd=out)
    if result.returncode != 0:
        pytest.fail(f"state_layout_checks failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return json.loads((out / "state_layout.json").read_text())


@pytest.mark.timeout(450)
@pytest.mark.parametrize("case", ["zero0_fp32", "zero0_bf16"])
def test_zero0_state_is_per_parameter_and_a_channels_last_checkpoint_loads_into_its_layout(layouts, case):
    run = layouts[case]
    trained = run["trained"]
    assert trained["wrapper"] == ("SGD" if case.endswith("fp32") else "FP16_UnfusedOptimizer")
    assert trained["optimizer_param_shapes"] == trained["module_param_shapes"]
    assert all(trained["optimizer_steps_module_params"]) == case.endswith("fp32")  # bf16: fp32 copies
    assert trained["optimizer_param_dtypes"] == ["torch.float32"] and trained["module_params_contiguous"]
    assert [s["shape"] for s in trained["state"] if len(s["shape"]) == 4] == CONV_WEIGHTS

    assert run["relaid_in_file"] == len(CONV_WEIGHTS)
    assert run["as_saved"]["copied_at_load"] == [0], "NCHW state for NCHW parameters is left as it is"
    assert run["relaid"]["copied_at_load"] == [len(CONV_WEIGHTS)]
    for label in ("as_saved", "relaid"):
        assert all(state["same"] for state in run[label]["loaded"]["state"]), f"{case} {label}"
    # the same values in the same layout step the same kernels: bit for bit the same weights
    assert run["relaid_vs_as_saved"] == 0.0
    # DeepSpeed's load alone keeps the saved layout, and the CPU fused kernel gets it wrong silently
    assert not all(state["same"] for state in run["relaid_unaligned"]["loaded"]["state"])
    assert run["unaligned_vs_as_saved"] > 1e-3


@pytest.mark.timeout(450)
@pytest.mark.parametrize("case", ["zero1_fp32", "zero1_bf16", "zero2_fp32", "zero2_bf16"])
def test_zero1_and_2_keep_flat_state_only(layouts, case):
    run = layouts[case]
    for label in ("trained", "as_saved", "relaid"):
        described = run[label] if label == "trained" else run[label]["loaded"]
        assert described["wrapper"] == "DeepSpeedZeroOptimizer"
        assert all(len(shape) == 1 for shape in described["optimizer_param_shapes"]), "flat partitions"
        assert not any(described["optimizer_steps_module_params"])
        assert described["state"] and all(len(state["shape"]) == 1 and state["same"] for state in described["state"])
    assert run["relaid_in_file"] == 0, "no 4-D tensor in the saved optimizer state"
    assert run["as_saved"]["copied_at_load"] == run["relaid"]["copied_at_load"] == [0]
    assert run["relaid_vs_as_saved"] == 0.0
