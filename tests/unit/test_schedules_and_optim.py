"""LR/resolution schedules at chosen steps, top-k accuracy, mixup/cutmix label mixing, EMA, LAMB."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rkan_dist.config import OptimConfig
from rkan_dist.metrics import topk_correct
from rkan_dist.optim import (
    Lamb,
    ModelEma,
    build_optimizer,
    mix_batch,
    mix_generator,
    parameter_groups,
    soft_cross_entropy,
)
from rkan_dist.schedules import lr_at_step, resolution_for_epoch, scaled_lr

pytestmark = pytest.mark.unit

COMMON = dict(peak_lr=1.0, total_steps=1000, steps_per_epoch=100)


def test_cosine_with_warmup():
    lr = lambda step: lr_at_step(step, name="cosine", warmup_epochs=1, min_lr_ratio=0.0, **COMMON)  # noqa: E731
    assert lr(0) == 0.0
    assert lr(50) == pytest.approx(0.5)
    assert lr(100) == pytest.approx(1.0)
    assert lr(550) == pytest.approx(0.5)  # halfway through the cosine part
    assert lr(1000) == pytest.approx(0.0, abs=1e-12)
    assert all(lr(s) >= lr(s + 1) for s in range(100, 1000))


def test_step_schedule_drops_at_epoch_boundaries():
    lr = lambda step: lr_at_step(step, name="step", step_epochs=[3, 6], step_gamma=0.1, **COMMON)  # noqa: E731
    assert lr(299) == 1.0 and lr(300) == pytest.approx(0.1) and lr(600) == pytest.approx(0.01)


def test_cyclic_is_ffcv_triangle():
    lr = lambda step: lr_at_step(step, name="cyclic", peak_epoch=2, min_lr_ratio=0.0, **COMMON)  # noqa: E731
    assert lr(0) == 0.0 and lr(100) == pytest.approx(0.5) and lr(200) == pytest.approx(1.0)
    assert lr(600) == pytest.approx(0.5) and lr(1000) == pytest.approx(0.0)


def test_onecycle_peaks_then_anneals():
    lr = lambda step: lr_at_step(step, name="onecycle", peak_epoch=2, warmup_start_ratio=0.1, **COMMON)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(200) == pytest.approx(1.0)
    assert lr(600) == pytest.approx(0.5) and lr(1000) == pytest.approx(0.0, abs=1e-12)


def test_constant_and_unknown():
    assert lr_at_step(777, name="constant", **COMMON) == 1.0
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_at_step(0, name="linear", **COMMON)


def test_linear_scaling_rule():
    assert scaled_lr(0.1, 1024, True) == pytest.approx(0.4)
    assert scaled_lr(0.1, 1024, False) == 0.1


def test_progressive_resizing_as_ffcv():
    res = lambda epoch: resolution_for_epoch(epoch, 160, 192, 2, 13)  # noqa: E731
    assert [res(e) for e in (0, 1, 2)] == [160, 160, 160]
    assert res(13) == res(15) == 192
    assert all(res(e) % 32 == 0 and 160 <= res(e) <= 192 for e in range(16))
    assert resolution_for_epoch(5, 32, 32, 0, 0) == 32


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    assert topk_correct(logits, labels, (1, 2, 5)) == [1, 2, 3]  # k capped at the class count


def test_mix_batch_without_mixing_is_label_smoothing():
    labels = torch.tensor([0, 2])
    _, targets = mix_batch(torch.zeros(2, 3, 4, 4), labels, 4, mixup_alpha=0, cutmix_alpha=0, mix_prob=1.0,
                           label_smoothing=0.2, generator=mix_generator(0, 0, 0, 0))
    assert torch.allclose(targets.sum(1), torch.ones(2))
    assert targets[0, 0] == pytest.approx(0.85) and targets[0, 1] == pytest.approx(0.05)


def test_mixup_mixes_images_and_labels_with_the_same_weight():
    images = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    labels = torch.tensor([0, 1])
    mixed, targets = mix_batch(images, labels, 2, mixup_alpha=0.4, cutmix_alpha=0, mix_prob=1.0,
                               label_smoothing=0.0, generator=mix_generator(1, 0, 0, 3))
    lam = 1.0 - float(mixed[0].mean())  # sample 0 = lam * zeros + (1 - lam) * ones
    assert targets[0, 0] == pytest.approx(lam, abs=1e-6) and targets[0, 1] == pytest.approx(1 - lam, abs=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(2))


def test_cutmix_label_weight_is_the_pasted_area():
    images = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16)])
    labels = torch.tensor([0, 1])
    for batch in range(5):
        mixed, targets = mix_batch(images, labels, 2, mixup_alpha=0, cutmix_alpha=1.0, mix_prob=1.0,
                                   label_smoothing=0.0, generator=mix_generator(0, 0, 0, batch))
        pasted = float(mixed[0, 0].mean())  # fraction of sample 0 that came from sample 1
        assert targets[0, 1] == pytest.approx(pasted, abs=1e-6)


def test_mixing_is_a_function_of_position_only():
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    run = lambda: mix_batch(images, labels, 4, mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.5,  # noqa: E731
                            label_smoothing=0.1, generator=mix_generator(7, 1, 3, 11))
    first, second = run(), run()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.numerics
def test_soft_cross_entropy_equals_hard_ce_for_one_hot():
    logits, labels = torch.randn(5, 7), torch.randint(0, 7, (5,))
    one_hot = nn.functional.one_hot(labels, 7).float()
    assert soft_cross_entropy(logits, one_hot) == pytest.approx(float(nn.functional.cross_entropy(logits, labels)), rel=1e-6)


def test_no_weight_decay_for_bn_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    decay, no_decay = parameter_groups(model, 1e-4, True)
    assert {p.ndim for p in decay["params"]} == {2, 4} and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 4  # bn weight+bias, conv bias, linear bias


def test_ema_tracks_parameters_and_copies_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.5)
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, before + 0.5)
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 3.0))


def test_lamb_reduces_a_quadratic():
    weight = nn.Parameter(torch.tensor([3.0, -2.0]))
    optimizer = Lamb([weight], lr=0.1)
    for _ in range(100):
        optimizer.zero_grad()
        (weight**2).sum().backward()
        optimizer.step()
    final = float(weight.detach().norm())
    assert final < 0.5 and math.isfinite(final)


@pytest.mark.parametrize("settings", [{"name": "sgd", "nesterov": True}, {"name": "adamw", "lr": 1e-3}])
@pytest.mark.numerics
def test_built_optimizers_are_fused_and_step_as_the_per_tensor_path_does(settings):
    def trained(fused: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        # no conv bias before BatchNorm: its gradient is rounding noise, which Adam would normalise up
        model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
        optimizer = build_optimizer(model, OptimConfig(weight_decay=1e-2, **settings))
        assert optimizer.defaults["fused"] is True
        if not fused:
            for group in optimizer.param_groups:
                group["fused"] = False
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(4, 3, 8, 8)).square().mean().backward()
            optimizer.step()
        return [param.detach().clone() for param in model.parameters()]

    for fused, per_tensor in zip(trained(True), trained(False)):
        torch.testing.assert_close(fused, per_tensor, rtol=1e-5, atol=1e-6)
