"""Optimizer state follows its parameter's memory format after a load (issue 23, item 3).

Weights are channels_last on CUDA and NCHW on CPU, and torch's `load_state_dict` keeps the strides
state was saved with. CUDA is not here: the layout a CUDA run would give is forced by building the
model channels_last (`model.to(memory_format=torch.channels_last)`, what the trainer does on CUDA)
and training it through the DDP engine, on CPU, with the fused optimizers `build_optimizer` makes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rkan_dist import parallel
from rkan_dist.config import OptimConfig, ParallelConfig
from rkan_dist.distributed import DistInfo
from rkan_dist.engines import ddp
from rkan_dist.engines.base import state_to_cpu
from rkan_dist.models import create_model
from rkan_dist.optim import align_state_to_parameters, build_optimizer

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
OPTIMIZERS = {
    "sgd": OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adamw": OptimConfig(name="adamw", lr=1e-2, weight_decay=5e-2),
}
CPU = DistInfo(0, 1, 0, torch.device("cpu"), None, True)


class LayoutNet(nn.Module):
    """The conv weights whose layouts differ: 3x3, depthwise (C, 1, 3, 3) and 1x1, whose
    channels_last strides differ from NCHW's although both count as contiguous in memory.

    One BatchNorm only: a BatchNorm after the depthwise conv would make the first one's scale
    invariant, its gradient pure rounding noise (~1e-6 of cancelling terms ~1e-3), which AdamW
    divides by its own tiny second moment into steps of lr size whatever the layout.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
            nn.Conv2d(16, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _stepped(model: nn.Module, config: OptimConfig, steps: int = 2) -> torch.optim.Optimizer:
    """An optimizer with state after `steps` updates from seeded gradients (no forward pass needed)."""
    optimizer = build_optimizer(model, config)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for param in model.parameters():
            # in its parameter's layout, as autograd lays gradients out
            param.grad = torch.empty_like(param).copy_(torch.randn(param.shape, generator=generator))
        optimizer.step()
    return optimizer


def _rkan_resnet18(layout: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model("rkan_resnet18", num_classes=10).to(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("optim", OPTIMIZERS)
@pytest.mark.parametrize(("saved", "resumed"), [("nchw", "channels_last"), ("channels_last", "nchw")])
def test_loaded_state_takes_each_parameters_strides_and_keeps_its_values(saved, resumed, optim):
    """On the real model (RKAN branches included): every state tensor shaped like its parameter gets
    the parameter's strides, dtype and device, bit for bit the values saved; 'step' stays as torch's
    load policy makes it (float32 on the parameter's device, the optimizers being fused)."""
    source = _rkan_resnet18(saved)
    saved_state = state_to_cpu(_stepped(source, OPTIMIZERS[optim]).state_dict())
    target = _rkan_resnet18(resumed)
    optimizer = build_optimizer(target, OPTIMIZERS[optim])
    assert all(group["fused"] for group in optimizer.param_groups)
    optimizer.load_state_dict(saved_state)
    copied = align_state_to_parameters(optimizer)

    params = [p for group in optimizer.param_groups for p in group["params"]]
    relaid = sum(s.stride() != t.stride() for s, t in zip(source.parameters(), target.parameters(), strict=True))
    keys_per_param = 1 if optim == "sgd" else 2  # momentum_buffer; exp_avg and exp_avg_sq
    assert copied == relaid * keys_per_param > 0, "the state of each re-laid parameter is copied, once"
    for index, param in enumerate(params):
        state = optimizer.state[param]
        assert state, f"parameter {index} has no state after the load"
        for key, value in state.items():
            saved_value = saved_state["state"][index][key]
            if key == "step":
                assert (value.dtype, value.device) == (torch.float32, param.device)
                assert torch.equal(value, saved_value.float())
                continue
            assert (value.shape, value.dtype, value.device, value.stride()) == (
                param.shape, param.dtype, param.device, param.stride()), f"parameter {index} {key}"
            assert torch.equal(value, saved_value), f"parameter {index} {key}: the values must be kept exactly"
    assert align_state_to_parameters(optimizer) == 0, "aligned state is left alone"


def test_state_of_another_shape_and_flat_state_stay_as_they_are():
    """A flat parameter (what DeepSpeed ZeRO-1/2 hands the torch optimizer) keeps its flat state; a
    state tensor not shaped like its parameter is not reshaped; 'step' is left as torch's load made it."""
    flat = nn.Parameter(torch.randn(40))
    weight = nn.Parameter(torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last))
    optimizer = torch.optim.Adam([flat, weight], lr=0.1)
    for param in (flat, weight):
        param.grad = torch.ones_like(param)
    optimizer.step()
    state = optimizer.state_dict()
    state["state"][1]["exp_avg"] = state["state"][1]["exp_avg"].contiguous()
    state["state"][1]["summary"] = torch.zeros(4, 27)  # not the parameter's shape: not its layout either
    optimizer.load_state_dict(state)
    flat_state, step = dict(optimizer.state[flat]), optimizer.state[weight]["step"]
    assert align_state_to_parameters(optimizer) == 1
    assert all(optimizer.state[flat][key] is value for key, value in flat_state.items())
    assert optimizer.state[weight]["exp_avg"].stride() == weight.stride()
    assert optimizer.state[weight]["summary"].shape == (4, 27)
    assert optimizer.state[weight]["step"] is step


# ----------------------------------------------------------------------------- a resume that changes layout

STEPS_BEFORE, STEPS_AFTER = 3, 4
# The runs compared differ only in the convolutions' memory format after the resume: the fused
# optimizer's update is elementwise and the same in either layout, but oneDNN sums a channels_last
# convolution in another order than an NCHW one, fp32 rounding that a few steps carry into the
# weights (|w| <= ~1). Measured: at most 6e-8 (1 ulp at 0.5-1) for SGD and AdamW, with AVX-512,
# AVX2 and default kernels alike. 1e-6 (~8 ulps) leaves room for other CPUs' orders of summation
# and stays far below what state in the wrong layout does (the `broken` runs: 1.8e-3 SGD, 4.7e-2
# AdamW).
TOLERANCE = 1e-6


def _batch(step: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    images = torch.randn(8, 3, 12, 12, generator=generator)
    labels = torch.randint(0, 10, (8,), generator=generator)
    return images.contiguous(memory_format=LAYOUTS[layout]), labels  # the loaders yield the model's layout


def _engine(layout: str, optim: str, seed: int):
    torch.manual_seed(seed)
    model = LayoutNet().to(memory_format=LAYOUTS[layout])
    return parallel.wrap(model, build_optimizer(model, OPTIMIZERS[optim]), parallel_config=ParallelConfig(),
                         precision="fp32", grad_accum=1, grad_clip=0.0, device=CPU.device, dist_info=CPU)


def _train(engine, layout: str, first: int, steps: int) -> None:
    engine.train()
    for step in range(first, first + steps):
        images, labels = _batch(step, layout)
        engine.backward(F.cross_entropy(engine.forward(images), labels))
        assert engine.step().applied


def _resumed_weights(checkpoint, layout: str, optim: str) -> dict[str, torch.Tensor]:
    engine = _engine(layout, optim, seed=7)  # other initial weights: everything must come from the load
    engine.load_state(checkpoint)
    for param in engine.module.parameters():
        for key, value in engine.optimizer.state[param].items():
            if key != "step":
                assert value.stride() == param.stride(), f"{key} is not in its parameter's layout"
    _train(engine, layout, STEPS_BEFORE, STEPS_AFTER)
    return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


def _max_difference(first: dict, second: dict) -> float:
    return max(float((first[name] - second[name]).abs().max()) for name in first)


@pytest.mark.numerics
@pytest.mark.parametrize("optim", OPTIMIZERS)
@pytest.mark.parametrize(("saved", "resumed"), [("nchw", "channels_last"), ("channels_last", "nchw")])
def test_a_resume_in_the_other_layout_continues_like_one_that_kept_its_layout(tmp_path, monkeypatch, saved,
                                                                              resumed, optim):
    engine = _engine(saved, optim, seed=0)
    _train(engine, saved, 0, STEPS_BEFORE)
    engine.save_state(tmp_path / "checkpoint", {})

    kept = _resumed_weights(tmp_path / "checkpoint", saved, optim)
    changed = _resumed_weights(tmp_path / "checkpoint", resumed, optim)
    difference = _max_difference(changed, kept)
    assert difference < TOLERANCE, f"{saved} -> {resumed} with {optim}: {difference:.2e} off the run that kept {saved}"

    # What the load without the alignment does on CPU: the fused kernel pairs each weight with
    # another weight's momentum and says nothing. This test would not see a regression otherwise.
    monkeypatch.setattr(ddp, "align_state_to_parameters", lambda optimizer: 0)
    broken = _engine(resumed, optim, seed=7)
    broken.load_state(tmp_path / "checkpoint")
    _train(broken, resumed, STEPS_BEFORE, STEPS_AFTER)
    broken_difference = _max_difference({n: p.detach() for n, p in broken.module.named_parameters()}, kept)
    assert broken_difference > 100 * TOLERANCE, f"unaligned state gave only {broken_difference:.2e}"
