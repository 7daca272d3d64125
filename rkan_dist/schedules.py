"""Learning rate and resolution as pure functions of the training position.

Everything here is a plain function of integers and floats, so the value at any step can be
recomputed after a resume without stored schedule state, and unit-tested at chosen steps.
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("cosine", "step", "onecycle", "cyclic", "constant")


def resolution_for_epoch(epoch: int, min_res: int, max_res: int, start_ramp_epoch: int, end_ramp_epoch: int) -> int:
    """Progressive resizing as in the FFCV ImageNet recipe: min_res until start_ramp_epoch,
    a linear ramp to max_res at end_ramp_epoch, rounded down to a multiple of 32 (but never below
    min_res, so small inputs such as 32 px digits keep their size)."""
    if epoch <= start_ramp_epoch or max_res == min_res:
        return min_res
    if epoch >= end_ramp_epoch:
        return max_res
    fraction = (epoch - start_ramp_epoch) / (end_ramp_epoch - start_ramp_epoch)
    res = min_res + fraction * (max_res - min_res)
    return max(min_res, int(res) // 32 * 32)


def scaled_lr(base_lr: float, global_batch: int, scale: bool) -> float:
    """The linear scaling rule: base_lr is given per 256 images."""
    return base_lr * global_batch / 256 if scale else base_lr


def lr_at_step(
    step: int,
    *,
    peak_lr: float,
    total_steps: int,
    steps_per_epoch: int,
    name: str = "cosine",
    warmup_epochs: float = 0.0,
    warmup_start_ratio: float = 0.0,
    min_lr_ratio: float = 0.0,
    step_epochs: tuple[int, ...] | list[int] = (30, 60, 90),
    step_gamma: float = 0.1,
    peak_epoch: float = 2.0,
) -> float:
    """The learning rate for optimizer step `step` (0-based) of a run of `total_steps`."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; choose one of {', '.join(LR_SCHEDULES)}")
    total_steps = max(total_steps, 1)
    steps_per_epoch = max(steps_per_epoch, 1)
    min_lr = peak_lr * min_lr_ratio
    epoch = step / steps_per_epoch  # fractional epoch: the schedules are smooth within an epoch

    if name == "cyclic":  # FFCV's triangular schedule: 0 -> peak at peak_epoch -> min at the end
        end_epoch = total_steps / steps_per_epoch
        return float(_interp(epoch, [0.0, peak_epoch, end_epoch], [peak_lr * warmup_start_ratio, peak_lr, min_lr]))
    if name == "onecycle":  # cosine up to the peak, cosine down to min_lr
        peak_step = min(peak_epoch * steps_per_epoch, total_steps)
        start = peak_lr * warmup_start_ratio
        if step < peak_step:
            return start + (peak_lr - start) * (1 - math.cos(math.pi * step / peak_step)) / 2
        progress = (step - peak_step) / max(total_steps - peak_step, 1)
        return min_lr + (peak_lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2

    warmup_steps = warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        start = peak_lr * warmup_start_ratio
        return start + (peak_lr - start) * step / warmup_steps
    if name == "constant":
        return peak_lr
    if name == "step":
        drops = sum(1 for boundary in step_epochs if epoch >= boundary)
        return peak_lr * step_gamma**drops
    # cosine from the end of warmup to the last step
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + (peak_lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return ys[-1]
