"""The Engine interface in one process: accumulation, clipping, precision, skips, state round trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rkan_dist import parallel
from rkan_dist.config import ParallelConfig
from rkan_dist.distributed import DistInfo
from rkan_dist.engines.deepspeed_engine import build_deepspeed_config, keep_batchnorm_fp32

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
ONE_PROCESS = DistInfo(0, 1, 0, CPU, None, True)


def tiny_net(batch_norm: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8) if batch_norm else nn.Identity(), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def ddp_engine(model=None, precision="fp32", grad_accum=1, grad_clip=0.0, lr=0.1, momentum=0.9, **config):
    model = model if model is not None else tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return parallel.wrap(model, optimizer, parallel_config=ParallelConfig(**config), precision=precision,
                         grad_accum=grad_accum, grad_clip=grad_clip, device=CPU, dist_info=ONE_PROCESS)


def data(seed: int = 1, n: int = 8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def micro_step(engine, images, labels):
    loss = F.cross_entropy(engine.forward(images), labels)
    engine.backward(loss)
    return engine.step()


def parameters(engine):
    return [p.detach().clone() for p in engine.module.parameters()]


# ----------------------------------------------------------------------------- argument checks

def test_wrap_rejects_bad_arguments_with_the_valid_choices():
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        ddp_engine(precision="fp8")
    with pytest.raises(ValueError, match="grad_accum"):
        ddp_engine(grad_accum=0)
    with pytest.raises(ValueError, match="grad_clip"):
        ddp_engine(grad_clip=-1.0)


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_sync_bn_on_cpu_is_a_clear_error(backend):
    with pytest.raises(ValueError, match="sync_bn.*CUDA"):
        model = tiny_net()
        parallel.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      parallel_config=ParallelConfig(backend=backend, sync_bn=True), precision="fp32", grad_accum=1,
                      grad_clip=0.0, device=CPU, dist_info=ONE_PROCESS, micro_batch_size=8)


def test_deepspeed_needs_cuda_for_fp16_and_a_micro_batch_size():
    model = tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        parallel.wrap(model, optimizer, parallel_config=ParallelConfig(backend="deepspeed"), precision="fp16",
                      grad_accum=1, grad_clip=0.0, device=CPU, dist_info=ONE_PROCESS, micro_batch_size=8)
    with pytest.raises(ValueError, match="micro_batch_size"):
        parallel.wrap(model, optimizer, parallel_config=ParallelConfig(backend="deepspeed"), precision="bf16",
                      grad_accum=1, grad_clip=0.0, device=CPU, dist_info=ONE_PROCESS)


def test_deepspeed_config_from_our_settings():
    config = build_deepspeed_config(micro_batch_size=32, grad_accum=4, grad_clip=1.5, zero_stage=2,
                                    precision="bf16", bucket_cap_mb=25)
    assert config["train_micro_batch_size_per_gpu"] == 32
    assert config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 1.5
    assert config["zero_optimization"]["stage"] == 2
    assert config["zero_optimization"]["reduce_bucket_size"] == 25 * 2**20 // 4
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert config["zero_allow_untested_optimizer"] is True
    assert config["zero_optimization"]["overlap_comm"] is True  # CUDA: side stream; gloo: _OverlappedGlooReductions
    assert config["zero_optimization"]["contiguous_gradients"] is False  # a copy that only pays off on CUDA
    on_cuda = build_deepspeed_config(micro_batch_size=32, grad_accum=4, grad_clip=1.5, zero_stage=2,
                                     precision="bf16", bucket_cap_mb=25, on_cuda=True)["zero_optimization"]
    assert on_cuda["overlap_comm"] is True and on_cuda["contiguous_gradients"] is True
    assert "scheduler" not in config and "optimizer" not in config  # ours, not DeepSpeed's
    with pytest.raises(ValueError, match="0, 1, 2"):
        build_deepspeed_config(micro_batch_size=1, grad_accum=1, grad_clip=0, zero_stage=3, precision="fp32",
                               bucket_cap_mb=25)


# ----------------------------------------------------------------------------- DDP engine, one process

def test_one_process_skips_the_ddp_wrapper():
    engine = ddp_engine()
    assert engine._ddp is None
    assert isinstance(engine.module, nn.Sequential)


def test_step_applies_only_on_the_accumulation_boundary():
    engine = ddp_engine(grad_accum=3)
    images, labels = data()
    start = parameters(engine)
    results = []
    for micro in range(3):
        assert engine.is_accumulation_boundary() == (micro == 2)
        results.append(micro_step(engine, images, labels))
        if micro < 2:
            assert all(torch.equal(a, b) for a, b in zip(start, parameters(engine)))
    assert [r.applied for r in results] == [False, False, True]
    assert results[0].grad_norm is None and results[2].grad_norm > 0
    assert all(p.grad is None for p in engine.module.parameters()), "step() clears gradients after applying"


@pytest.mark.numerics
def test_two_half_batches_equal_one_full_batch():
    images, labels = data(n=8)
    full = ddp_engine(tiny_net(batch_norm=False), grad_accum=1)
    half = ddp_engine(tiny_net(batch_norm=False), grad_accum=2)
    for _ in range(3):
        micro_step(full, images, labels)
        micro_step(half, images[:4], labels[:4])
        micro_step(half, images[4:], labels[4:])
    for a, b in zip(parameters(full), parameters(half)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.numerics
def test_gradient_clipping_bounds_the_update():
    engine = ddp_engine(grad_clip=1e-3, lr=1.0, momentum=0.0)
    images, labels = data()
    start = parameters(engine)
    result = micro_step(engine, images, labels)
    assert result.grad_norm > 1e-3  # reported before clipping
    moved = torch.cat([(a - b).flatten() for a, b in zip(parameters(engine), start)]).norm()
    assert moved == pytest.approx(1e-3, rel=1e-3)


def test_set_lr_writes_every_group_with_its_scale():
    model = tiny_net()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[5].parameters()), "lr_scale": 0.5}]
    engine = parallel.wrap(model, torch.optim.SGD(groups, lr=1.0), parallel_config=ParallelConfig(),
                           precision="fp32", grad_accum=1, grad_clip=0.0, device=CPU, dist_info=ONE_PROCESS)
    engine.set_lr(0.2)
    assert [g["lr"] for g in engine.optimizer.param_groups] == [0.2, 0.1]
    assert engine.lr == 0.2


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_returns_fp32_logits_and_trains(precision):
    engine = ddp_engine(precision=precision)
    images, labels = data()
    logits = engine.forward(images)
    assert logits.dtype == torch.float32
    engine.backward(F.cross_entropy(logits, labels))
    result = engine.step()
    assert result.applied and result.grad_norm > 0
    assert (result.loss_scale == 65536.0) if precision == "fp16" else (result.loss_scale is None)


def test_eval_forward_works_under_no_grad():
    engine = ddp_engine(precision="bf16")
    engine.eval()
    with torch.no_grad():
        logits = engine.forward(data()[0])
    assert logits.shape == (8, 4) and not logits.requires_grad
    engine.train()
    assert engine.module.training


def _poison_gradients(engine, images, labels):
    engine.backward(F.cross_entropy(engine.forward(images), labels))
    next(engine.module.parameters()).grad[0].fill_(float("inf"))
    return engine.step()


def test_fp16_overflow_skips_the_update_and_backs_off_the_scale():
    engine = ddp_engine(precision="fp16")
    start = parameters(engine)
    result = _poison_gradients(engine, *data())
    assert not result.applied
    assert result.loss_scale == 32768.0
    assert all(torch.equal(a, b) for a, b in zip(start, parameters(engine)))


def test_non_finite_gradient_without_scaler_is_not_applied():
    engine = ddp_engine(precision="fp32")
    start = parameters(engine)
    result = _poison_gradients(engine, *data())
    assert not result.applied and result.grad_norm == float("inf")
    assert all(torch.equal(a, b) for a, b in zip(start, parameters(engine)))


def test_zero_grad_drops_the_window_and_restarts_it():
    engine = ddp_engine(grad_accum=2)
    images, labels = data()
    micro_step(engine, images, labels)  # first half of a window
    assert engine.is_accumulation_boundary()
    engine.zero_grad()
    assert not engine.is_accumulation_boundary(), "a new window starts at its first micro-batch"
    assert all(p.grad is None for p in engine.module.parameters())


def test_save_and_load_state_round_trip_with_scaler(tmp_path):
    engine = ddp_engine(precision="fp16")
    images, labels = data()
    for _ in range(2):
        micro_step(engine, images, labels)
    _poison_gradients(engine, images, labels)  # moves the loss scale off its default
    engine.save_state(tmp_path / "state", {"epoch": 4, "rng": torch.tensor([1, 2])})
    restored = ddp_engine(tiny_net(seed=5), precision="fp16")
    client_state = restored.load_state(tmp_path / "state")
    assert client_state["epoch"] == 4 and torch.equal(client_state["rng"], torch.tensor([1, 2]))
    assert restored.scaler.get_scale() == engine.scaler.get_scale() == 32768.0
    for a, b in zip(parameters(engine), parameters(restored)):
        assert torch.equal(a, b)
    assert micro_step(engine, images, labels).grad_norm == micro_step(restored, images, labels).grad_norm
    for a, b in zip(parameters(engine), parameters(restored)):
        assert torch.equal(a, b)


def test_load_state_names_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="not a DDP engine checkpoint: missing model.pt"):
        ddp_engine().load_state(tmp_path)


def test_consolidated_state_dict_is_a_detached_cpu_copy():
    engine = ddp_engine()
    state = engine.consolidated_state_dict()
    assert state.keys() == engine.module.state_dict().keys()
    state["0.weight"].zero_()
    assert engine.module[0].weight.abs().sum() > 0


# ----------------------------------------------------------------------------- BatchNorm kept in fp32

@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.numerics
def test_fp32_batchnorm_under_bf16_matches_fp32_batchnorm(momentum):
    reference = nn.BatchNorm2d(4, momentum=momentum)
    converted = nn.BatchNorm2d(4, momentum=momentum)
    assert keep_batchnorm_fp32(nn.Sequential(converted)) == 1
    assert isinstance(converted, nn.BatchNorm2d) and converted.state_dict().keys() == reference.state_dict().keys()
    converted.weight.data = converted.weight.data.bfloat16()  # what DeepSpeed does to parameters
    converted.bias.data = converted.bias.data.bfloat16()
    for step in range(3):
        images = (torch.randn(6, 4, 5, 5, generator=torch.Generator().manual_seed(step)) * 3 + 1).bfloat16()
        out = converted(images)
        expected = reference(images.float())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    assert converted.running_mean.dtype == torch.float32
    torch.testing.assert_close(converted.running_mean, reference.running_mean)
    torch.testing.assert_close(converted.running_var, reference.running_var)
    assert converted.num_batches_tracked.item() == 3
    converted.eval()
    reference.eval()
    images = torch.randn(2, 4, 5, 5).bfloat16()
    torch.testing.assert_close(converted(images).float(), reference(images.float()), atol=0.05, rtol=0.02)
