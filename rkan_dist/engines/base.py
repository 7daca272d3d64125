"""The Engine interface the training loop talks to, whatever does the data parallelism underneath.

Call order per micro-batch: `logits = engine.forward(images)`, `engine.backward(loss)`,
`result = engine.step()`. `step()` applies the optimizer only on the last micro-batch of an
accumulation window (`result.applied`), and clears the gradients after applying them.
`zero_grad()` throws away the window accumulated so far (e.g. after a non-finite loss on any
rank) and starts a new one, so the loop never needs to know how the backend counts micro-batches.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepResult:
    applied: bool  # the optimizer stepped (False inside an accumulation window or on an overflow/non-finite skip)
    grad_norm: float | None  # global L2 norm of the gradients before clipping, on the boundary only
    loss_scale: float | None  # fp16 loss scale; None for fp32/bf16


class Engine(ABC):
    """One optimizer, one model, one data-parallel strategy."""

    module: nn.Module  # the plain model (no DDP/DeepSpeed wrapper), for metrics, hooks and export
    optimizer: torch.optim.Optimizer
    precision: str
    grad_accum: int
    grad_clip: float
    device: torch.device

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """fp32 logits; mixed precision happens inside. Also fine for eval under torch.no_grad()."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images)

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is the mean loss of one micro-batch; the 1/grad_accum scaling happens here."""

    @abstractmethod
    def step(self) -> StepResult:
        """Call after every micro-batch; steps the optimizer on the accumulation boundary only."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Drop the gradients of the current accumulation window and start a new window."""

    @abstractmethod
    def is_accumulation_boundary(self) -> bool:
        """Whether the micro-batch about to run (or just run, before step()) ends the window."""

    @abstractmethod
    def save_state(self, folder: Path, client_state: dict) -> None:
        """Collective: every rank calls it; writes the engine's state into `folder`.

        Ends without a barrier of its own: the caller gathers every rank's outcome afterwards, and
        a rank whose write failed goes straight there."""

    @abstractmethod
    def load_state(self, folder: Path) -> dict:
        """Collective: restore model, optimizer and loss-scaler state; return the client_state saved."""

    @abstractmethod
    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the full fp32 model state_dict on CPU (for export and EMA seeding)."""

    def set_lr(self, lr: float) -> None:
        """Our schedule drives the learning rate; a group's optional 'lr_scale' multiplies it."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not valid; choose one of {', '.join(PRECISIONS)}")


def check_sync_bn(sync_bn: bool, device: torch.device) -> None:
    if sync_bn and device.type != "cuda":
        raise ValueError("parallel.sync_bn=true needs CUDA (SyncBatchNorm has no CPU kernel); "
                         "set parallel.sync_bn=false for CPU runs")


def input_for_precision(images: torch.Tensor, precision: str) -> torch.Tensor:
    """fp32 images for an fp32 run: the CUDA loaders yield fp16 (normalised on the GPU in half the
    bytes), which an fp32 convolution refuses; under autocast the first layer casts them itself."""
    if precision == "fp32" and images.is_floating_point() and images.dtype != torch.float32:
        return images.float()
    return images


def gradients(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters() if p.grad is not None]


def as_float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def is_finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def state_to_cpu(state: dict) -> dict:
    """Detached CPU copies of the tensors in a (nested) state dict, plain values unchanged."""
    def convert(value):
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {key: convert(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(convert(item) for item in value)
        return value
    return convert(state)
