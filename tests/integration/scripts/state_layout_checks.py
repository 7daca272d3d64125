"""What DeepSpeed's torch optimizer holds per ZeRO stage, and its state's layout after a load (one process).

    python state_layout_checks.py OUT_DIR

Writes OUT_DIR/state_layout.json; tests/integration/test_optimizer_state_layout_deepspeed.py asserts.
Each case trains a channels_last model (as the trainer prepares CUDA models) for 2 steps, saves,
and loads the checkpoint twice into engines built from other initial weights: as saved, and with
every saved state tensor of a 4-D parameter rewritten channels_last, as an engine stepping
channels_last parameters would have written it. Both continue for 2 steps.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import engine_checks as ec
import torch

from rkan_dist import distributed
from rkan_dist.engines import deepspeed_engine

CASES = [("zero0_fp32", 0, "fp32"), ("zero0_bf16", 0, "bf16"), ("zero1_fp32", 1, "fp32"), ("zero1_bf16", 1, "bf16"),
         ("zero2_fp32", 2, "fp32"), ("zero2_bf16", 2, "bf16")]

copied_at_load: list[int] = []
aligning = [True]  # False: load as DeepSpeed alone would, to show what the alignment is for
_align = deepspeed_engine.align_state_to_parameters


def _counting_align(optimizer) -> int:
    copied_at_load.append(_align(optimizer) if aligning[0] else 0)
    return copied_at_load[-1]


deepspeed_engine.align_state_to_parameters = _counting_align


def relay_saved_state(folder: Path) -> int:
    """Rewrite the 4-D tensors of the optimizer state in a DeepSpeed checkpoint channels_last (same
    values); how many. ZeRO-0 keeps that state in the model-states file, ZeRO-1/2 in optim-states files."""
    relaid = 0

    def relay(value):
        nonlocal relaid
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            relaid += 1
            return value.contiguous(memory_format=torch.channels_last)
        if isinstance(value, dict):
            return {key: relay(item) for key, item in value.items()}
        return value

    for path in (folder / deepspeed_engine.CHECKPOINT_TAG).glob("*.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        for key in ("optimizer", "optimizer_state_dict"):
            if isinstance(state.get(key), dict):
                state[key] = relay(state[key])
        torch.save(state, path)
    return relaid


def describe(engine) -> dict:
    """The torch optimizer's parameters (the module's own, copies, or flat) and its state's layout."""
    module_params = {id(p) for p in engine.module.parameters()}
    params = [p for group in engine.optimizer.param_groups for p in group["params"]]
    state = []
    for param in params:
        for key, value in engine.optimizer.state[param].items():
            if isinstance(value, torch.Tensor) and key != "step":
                state.append({"key": key, "shape": list(value.shape), "param_shape": list(param.shape),
                              "same": (value.shape, value.dtype, value.device, value.stride())
                              == (param.shape, param.dtype, param.device, param.stride())})
    return {"wrapper": type(engine.ds.optimizer).__name__,
            "module_param_shapes": [list(p.shape) for p in engine.module.parameters()],
            "module_params_contiguous": all(p.is_contiguous() for p in engine.module.parameters()),
            "optimizer_param_shapes": [list(p.shape) for p in params],
            "optimizer_steps_module_params": [id(p) in module_params for p in params],
            "optimizer_param_dtypes": sorted({str(p.dtype) for p in params}),
            "state": state}


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    info = distributed.init("cpu")
    result = {}
    try:
        for name, stage, precision in CASES:
            original = ec.make_engine(info, "deepspeed", stage, precision, channels_last=True)
            ec.train(original, info, steps=2)
            saved, relaid = out / f"{name}_saved", out / f"{name}_relaid"
            original.save_state(saved, {})
            shutil.copytree(saved, relaid)
            case = {"relaid_in_file": relay_saved_state(relaid), "trained": describe(original)}
            finals = {}
            for label, folder in (("as_saved", saved), ("relaid", relaid), ("relaid_unaligned", relaid)):
                engine = ec.make_engine(info, "deepspeed", stage, precision, seed=123, channels_last=True)
                del copied_at_load[:]
                aligning[0] = label != "relaid_unaligned"
                engine.load_state(folder)
                case[label] = {"copied_at_load": list(copied_at_load), "loaded": describe(engine)}
                ec.train(engine, info, steps=2, first_step=2)
                finals[label] = ec.weights(engine)
            case["relaid_vs_as_saved"] = ec.max_difference(finals["relaid"], finals["as_saved"])
            case["unaligned_vs_as_saved"] = ec.max_difference(finals["relaid_unaligned"], finals["as_saved"])
            result[name] = case
    finally:
        distributed.shutdown()
    (out / "state_layout.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
