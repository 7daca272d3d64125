"""Data parallelism with torch DDP (or no wrapper at all for one process) and torch autocast.

Gradient accumulation skips DDP's all-reduce on all but the last micro-batch of a window
(`require_backward_grad_sync`, what `no_sync()` toggles), so accumulating k micro-batches costs one
all-reduce. fp16 adds a GradScaler; bf16 needs none. fp16 autocast also works on CPU (slowly).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from rkan_dist import distributed
from rkan_dist.engines.base import (
    AUTOCAST_DTYPES,
    Engine,
    StepResult,
    as_float,
    check_precision,
    check_sync_bn,
    gradients,
    input_for_precision,
    state_to_cpu,
)
from rkan_dist.optim import align_state_to_parameters

MODEL_FILE, OPTIMIZER_FILE, SCALER_FILE, CLIENT_FILE = "model.pt", "optimizer.pt", "scaler.pt", "client_state.pt"


class DDPEngine(Engine):
    backend = "ddp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, precision: str, grad_accum: int,
                 grad_clip: float, device: torch.device, world_size: int, sync_bn: bool = False,
                 bucket_cap_mb: int = 25) -> None:
        check_precision(precision)
        check_sync_bn(sync_bn, device)
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        if sync_bn:  # convert_sync_batchnorm reuses the Parameter objects, so the optimizer stays valid
            from rkan_dist.models.registry import convert_sync_batchnorm  # a frozen backbone's BN stays as is

            model = convert_sync_batchnorm(model)
        self.module = model.to(device)
        self.optimizer = optimizer
        self.precision, self.grad_accum, self.grad_clip, self.device = precision, grad_accum, grad_clip, device
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self._micro_step = 0  # micro-batches since the start of training (or the last load/zero_grad)
        self._ddp: DistributedDataParallel | None = None
        if world_size > 1:
            self._ddp = DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=False, gradient_as_bucket_view=True, bucket_cap_mb=bucket_cap_mb)

    # ------------------------------------------------------------------ training step

    def is_accumulation_boundary(self) -> bool:
        return (self._micro_step + 1) % self.grad_accum == 0

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        training = torch.is_grad_enabled() and self.module.training
        # Eval goes around the DDP wrapper: its forward broadcasts buffers, a collective that would
        # hang when ranks evaluate different numbers of batches.
        network = self._ddp if (self._ddp is not None and training) else self.module
        if self._ddp is not None and training:
            self._ddp.require_backward_grad_sync = self.is_accumulation_boundary()
        images = input_for_precision(images, self.precision)
        with self._autocast():
            logits = network(images)
        return logits.float()

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.grad_accum
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def step(self) -> StepResult:
        boundary = self.is_accumulation_boundary()
        self._micro_step += 1
        if not boundary:
            return StepResult(False, None, self._loss_scale())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = gradients(self.module)
        norm = get_total_norm(grads) if grads else torch.zeros(())
        grad_norm = as_float(norm)
        if self.scaler is not None:
            if self.grad_clip > 0 and math.isfinite(grad_norm):
                clip_grads_with_norm_(self.module.parameters(), self.grad_clip, norm)
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the update itself when a gradient is inf/nan
            self.scaler.update()
            applied = self.scaler.get_scale() >= scale_before
        elif math.isfinite(grad_norm):
            if self.grad_clip > 0:
                clip_grads_with_norm_(self.module.parameters(), self.grad_clip, norm)
            self.optimizer.step()
            applied = True
        else:  # a non-finite gradient without a scaler would poison the weights: skip the update
            applied = False
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(applied, grad_norm, self._loss_scale())

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._micro_step -= self._micro_step % self.grad_accum

    def _loss_scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    # ------------------------------------------------------------------ checkpoints

    def save_state(self, folder: Path, client_state: dict) -> None:
        folder = Path(folder)
        if distributed.is_main():  # the state is replicated: one copy is the whole state
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(state_to_cpu(self.module.state_dict()), folder / MODEL_FILE)
            torch.save(state_to_cpu(self.optimizer.state_dict()), folder / OPTIMIZER_FILE)
            torch.save(self.scaler.state_dict() if self.scaler is not None else {}, folder / SCALER_FILE)
            torch.save(client_state, folder / CLIENT_FILE)
        # No barrier here: CheckpointManager.save gathers every rank's outcome next, which also
        # keeps the other ranks from reading the folder early. A barrier would leave them waiting
        # in it while a rank 0 whose write failed (disk full) joined that gather instead.

    def load_state(self, folder: Path) -> dict:
        folder = Path(folder)
        missing = [name for name in (MODEL_FILE, OPTIMIZER_FILE, CLIENT_FILE) if not (folder / name).is_file()]
        if missing:
            hint = (" (it holds a DeepSpeed checkpoint: set parallel.backend=deepspeed)"
                    if (folder / "engine").is_dir() else "")
            raise ValueError(f"{folder} is not a DDP engine checkpoint: missing {', '.join(missing)}{hint}")

        def load(name: str):
            return torch.load(folder / name, map_location="cpu", weights_only=True)

        self.module.load_state_dict(load(MODEL_FILE))
        self.optimizer.load_state_dict(load(OPTIMIZER_FILE))  # moves state onto the parameters' device
        align_state_to_parameters(self.optimizer)  # and into their layout, which may not be the saved one
        scaler_state = load(SCALER_FILE) if (folder / SCALER_FILE).is_file() else {}
        if self.scaler is not None and scaler_state:
            self.scaler.load_state_dict(scaler_state)
        self._micro_step = 0
        return load(CLIENT_FILE)

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        return state_to_cpu(self.module.state_dict())
