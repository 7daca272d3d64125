"""The CUDA code paths that a CPU can check: dtype casts, RNG state, EMA, memory formats.

CUDA is not here, so each test forces the branch it checks (a patched `torch.cuda`, the CUDA
loader's fp16 output) and runs the rest for real.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from rkan_dist.models import create_model


@pytest.mark.numerics
def test_whole_model_gradients_are_the_same_in_channels_last_and_nchw_in_float64():
    """RKANet's math does not depend on the memory format: in float64 (no oneDNN, no rounding worth
    the name) channels_last and NCHW give the same gradients for every parameter.

    The 1-2% fp32 differences once seen on CPU were not the format: on rkan_resnet18 (seeds 0-3,
    4x3x64x64, AVX-512) fp32 gradients were 5-8e-6 off float64 in NCHW and 0.8-1.4e-5 in
    channels_last, except seed 0 in channels_last at 1.8e-3 - where exactly one ReLU input lay
    within fp32 rounding of zero and flipped. With stages 3 and 4 augmented (32 px, seeds 0-2) NCHW
    fp32 was as far off (9.8e-3, one flip) as channels_last; without a flip both stay near 1e-5,
    and oneDNN's depthwise and grouped convolutions agree with float64 to 1e-7 in either layout.
    A kink, not a bug of oneDNN or of the model.
    """
    torch.manual_seed(0)
    model = create_model("rkan_resnet18", num_classes=10).train().double()
    images = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    labels = torch.tensor([3, 7])

    def gradients(memory_format: torch.memory_format) -> dict[str, torch.Tensor]:
        replica = copy.deepcopy(model).to(memory_format=memory_format)
        F.cross_entropy(replica(images.contiguous(memory_format=memory_format)), labels).backward()
        return {name: p.grad for name, p in replica.named_parameters()}

    nchw, channels_last = gradients(torch.contiguous_format), gradients(torch.channels_last)
    assert any("rkan.kan" in name for name in nchw), "the model must have an RKAN branch"
    for name, reference in nchw.items():
        error = (channels_last[name] - reference).norm() / reference.norm().clamp_min(1e-300)
        assert error < 1e-10, f"{name}: channels_last gradient {error:.1e} off NCHW's in float64"


@pytest.fixture
def one_visible_gpu(monkeypatch):
    """torch.cuda as a process bound to one GPU sees it; get/set_rng_state act on a fake generator."""
    generator = {"state": torch.arange(16, dtype=torch.uint8), "restored": []}

    def refuse(*_, **__):
        raise AssertionError("the states of all visible GPUs are not this rank's to save or restore")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": generator["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": generator["restored"].append(state))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
    return generator


def test_rng_state_holds_this_processs_gpu_and_resumes_from_checkpoints_that_hold_more(one_visible_gpu, tmp_path):
    from rkan_dist.rng import rng_state, set_rng_state

    torch.save(rng_state(), tmp_path / "rank0.pt")
    saved = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert torch.equal(saved["cuda"], one_visible_gpu["state"])
    set_rng_state(saved)
    assert torch.equal(one_visible_gpu["restored"][-1], one_visible_gpu["state"])

    # written by the old code in a process that saw a node's 8 GPUs, resumed where it sees one
    older = dict(saved, cuda=[torch.full((16,), index, dtype=torch.uint8) for index in range(8)])
    torch.save(older, tmp_path / "older.pt")
    set_rng_state(torch.load(tmp_path / "older.pt", weights_only=True))
    assert torch.equal(one_visible_gpu["restored"][-1], torch.zeros(16, dtype=torch.uint8))  # cuda:0's


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.numerics
def test_ema_update_is_one_foreach_pass_and_averages_as_before():
    from rkan_dist.optim import ModelEma

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)) for _ in range(12)])
    ema = ModelEma(model, decay=0.9)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
        for block in model:
            block[1].running_mean.normal_()
    expected = {name: 0.9 * value + 0.1 * model.state_dict()[name] for name, value in ema.state_dict().items()
                if value.is_floating_point()}
    with _OpNames() as ops:
        ema.update(model)
    # 48 parameters and 36 buffers: one lerp and one copy for all of them, nothing per tensor
    assert ops.names.count("_foreach_lerp_") == 1 and ops.names.count("_foreach_copy_") == 1
    assert not {"mul_", "add_", "lerp_", "copy_"} & set(ops.names), ops.names
    state = ema.state_dict()
    for name, _ in model.named_parameters():
        assert torch.allclose(state[name], expected[name], rtol=1e-6, atol=1e-7), name
    for name, buffer in model.named_buffers():
        assert torch.equal(state[name], buffer), f"{name}: buffers are copied, not averaged"


@pytest.mark.numerics
def test_ema_of_a_bf16_model_averages_in_fp32():
    """DeepSpeed runs the module in bf16; the EMA keeps fp32 and averages the bf16 values in."""
    from rkan_dist.optim import ModelEma

    model = nn.Linear(8, 8)
    ema = ModelEma(model, decay=0.5)
    before = ema.module.weight.clone()
    model = model.to(torch.bfloat16)
    ema.update(model)
    assert ema.module.weight.dtype == torch.float32
    assert torch.equal(ema.module.weight, 0.5 * before + 0.5 * model.weight.float())


def test_channels_last_parameters_are_made_plain_for_deepspeed():
    """DeepSpeed's start-up broadcast views every parameter as bytes: it refused channels_last
    conv weights, 1x1 ones included (which count as contiguous)."""
    from rkan_dist.engines.deepspeed_engine import contiguous_parameters

    model = nn.Sequential(nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16)).to(
        memory_format=torch.channels_last)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="stride"):
        model[0].weight.data.view(torch.uint8)
    contiguous_parameters(model)
    for name, parameter in model.named_parameters():
        parameter.data.view(torch.uint8)  # what DeepSpeed's _broadcast_model does
        assert torch.equal(parameter, before[name]), name
    images = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    assert model(images).is_contiguous(memory_format=torch.channels_last), "activations stay channels_last"
