"""Data parallelism with DeepSpeed: ZeRO stage 0/1/2, bf16/fp16 through DeepSpeed's own config.

What stays ours: the torch optimizer (no DeepSpeed optimizer) and the learning-rate schedule (no
DeepSpeed scheduler; `set_lr` writes the rate into our optimizer's param groups, which ZeRO steps).
What DeepSpeed does: gradient accumulation (`gradient_accumulation_steps`), the 1/k loss scaling,
clipping (`gradient_clipping`), the fp32 master weights under bf16/fp16 and the fp16 loss scale.

BatchNorm under bf16/fp16: DeepSpeed casts parameters to the low precision and keeps buffers in
fp32, and torch's CPU batch_norm refuses that mix. Low-precision running statistics would also
drift (bf16 keeps ~3 significant digits). So BatchNorm layers compute with fp32 parameters and
fp32 running statistics on the low-precision activations (apex's "keep_batchnorm_fp32").

The patches of DeepSpeed's private code live in one module each, pinned to the release they were
tested on: deepspeed_zero_gloo (ZeRO-1/2 over gloo) and deepspeed_checkpoint_writes (a failed
write fails the save on every rank).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import get_total_norm

from rkan_dist import distributed
from rkan_dist.engines import deepspeed_checkpoint_writes
from rkan_dist.engines.base import (
    AUTOCAST_DTYPES,
    Engine,
    StepResult,
    as_float,
    check_precision,
    check_sync_bn,
    gradients,
    state_to_cpu,
)
from rkan_dist.engines.deepspeed_checkpoint_writes import write_errors_held_back
from rkan_dist.engines.deepspeed_zero_gloo import adapt_zero_to_gloo, overlap_gloo_reductions
from rkan_dist.optim import align_state_to_parameters
from rkan_dist.upstream_versions import require

CHECKPOINT_TAG = "engine"
CLIENT_KEY = "rkan_client_state"  # DeepSpeed hands back its own metadata with ours: keep ours under one key


class _Fp32BatchNormMixin:
    """BatchNorm with fp32 parameters and statistics whatever the input and parameter dtype; same state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and (self.weight is None or self.weight.dtype == torch.float32):
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        # a bf16/fp16 input with fp32 parameters and statistics is a mix torch's batch_norm computes
        # natively (statistics in fp32): no fp32 copy of the activations in or out
        return F.batch_norm(x, self.running_mean if track else None, self.running_var if track else None,
                            None if self.weight is None else self.weight.float(),
                            None if self.bias is None else self.bias.float(),
                            use_batch_stats, momentum, self.eps)


_FP32_BN_CLASSES: dict[type, type] = {}


def keep_batchnorm_fp32(model: nn.Module) -> int:
    """Make every (non-synced) BatchNorm compute in fp32 with fp32 running stats; returns how many."""
    converted = 0
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not isinstance(module, nn.SyncBatchNorm | _Fp32BatchNormMixin):
            cls = type(module)
            if cls not in _FP32_BN_CLASSES:
                _FP32_BN_CLASSES[cls] = type(f"{cls.__name__}Fp32", (_Fp32BatchNormMixin, cls), {})
            module.__class__ = _FP32_BN_CLASSES[cls]
            converted += 1
    return converted


def contiguous_parameters(model: nn.Module) -> None:
    """Give channels_last parameters the plain layout DeepSpeed needs.

    DeepSpeed broadcasts each parameter at start-up as bytes (`p.data.view(torch.uint8)`), which
    fails for a channels_last conv weight ("stride(-1) must be 1"; a 1x1 kernel's counts as
    contiguous and still fails), and ZeRO-1/2 copy all of them into one flat buffer anyway. The
    activations stay channels_last: a convolution's output follows its channels_last input
    whatever the weight's layout.
    """
    for parameter in model.parameters():
        if parameter.dim() > 0 and (parameter.stride(-1) != 1 or not parameter.is_contiguous()):
            parameter.data = torch.empty_like(parameter.data, memory_format=torch.contiguous_format).copy_(parameter.data)


def _fp32_running_stats(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            for name in ("running_mean", "running_var"):
                buffer = getattr(module, name)
                if buffer is not None and buffer.dtype != torch.float32:
                    buffer.data = buffer.data.float()


def build_deepspeed_config(*, micro_batch_size: int, grad_accum: int, grad_clip: float, zero_stage: int,
                           precision: str, bucket_cap_mb: int, on_cuda: bool = False) -> dict:
    """DeepSpeed's JSON config from our settings (pure; unit-tested).

    `overlap_comm` reduces gradient buckets during the backward pass (what DDP does by default): on
    a side stream on CUDA, through `OverlappedGlooReductions` over gloo. `contiguous_gradients`
    copies every gradient into one buffer to spare the CUDA caching allocator fragmentation; on CPU
    there is none to avoid, the copy costs time (ZeRO-1 fp32 steps 1.24x DDP's instead of 1.15x on
    2 CPU processes, measured with DeepSpeed's own reductions) and DeepSpeed would reduce such
    buckets itself (`average_tensor`), past `OverlappedGlooReductions`: it is on for CUDA only.
    """
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage {zero_stage!r} is not valid; choose one of 0, 1, 2")
    check_precision(precision)
    bucket_elements = int(bucket_cap_mb * 2**20 // 4)  # DeepSpeed sizes buckets in elements, DDP in MiB
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": bucket_elements,
                              "allgather_bucket_size": bucket_elements, "overlap_comm": True,
                              "contiguous_gradients": on_cuda},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,  # our torch SGD/AdamW, not a DeepSpeed fused optimizer
        "steps_per_print": 2**31 - 1,  # our metrics do the reporting
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(Engine):
    backend = "deepspeed"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, precision: str, grad_accum: int,
                 grad_clip: float, device: torch.device, micro_batch_size: int, zero_stage: int = 0,
                 sync_bn: bool = False, bucket_cap_mb: int = 25) -> None:
        check_precision(precision)
        check_sync_bn(sync_bn, device)
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("precision=fp16 with parallel.backend=deepspeed needs CUDA (DeepSpeed's fp16 "
                             "optimizer has no CPU path); use precision=bf16 or backend=ddp on CPU")
        if micro_batch_size is None or micro_batch_size < 1:
            raise ValueError(f"the deepspeed backend needs micro_batch_size >= 1 (data.batch_size), got {micro_batch_size}")
        # every save goes through write_errors_held_back: an untested DeepSpeed is refused here,
        # before anything is trained, rather than at the first save
        require(deepspeed_checkpoint_writes.TESTED)
        import deepspeed  # slow import: only when this backend is chosen

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        distributed.ensure_process_group(device)  # DeepSpeed needs a group even for one process
        if sync_bn:
            from rkan_dist.models.registry import convert_sync_batchnorm  # a frozen backbone's BN stays as is

            model = convert_sync_batchnorm(model)
        if precision != "fp32":
            keep_batchnorm_fp32(model)
        contiguous_parameters(model)
        self.precision, self.grad_accum, self.grad_clip, self.device = precision, grad_accum, grad_clip, device
        self.zero_stage = zero_stage
        self.input_dtype = AUTOCAST_DTYPES[precision] or torch.float32
        self.config = build_deepspeed_config(micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                                             grad_clip=grad_clip, zero_stage=zero_stage, precision=precision,
                                             bucket_cap_mb=bucket_cap_mb, on_cuda=device.type == "cuda")
        if zero_stage > 0:
            adapt_zero_to_gloo()
        self.ds, _, _, _ = deepspeed.initialize(model=model.to(device), optimizer=optimizer, config=self.config)
        self._gloo_reductions = overlap_gloo_reductions(self.ds)  # None unless gloo carries ZeRO-1/2
        _fp32_running_stats(self.ds.module)
        self.module = self.ds.module
        self.optimizer = optimizer  # the torch optimizer that ZeRO / the bf16 wrapper steps

    # ------------------------------------------------------------------ training step

    def is_accumulation_boundary(self) -> bool:
        return bool(self.ds.is_gradient_accumulation_boundary())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point() and images.dtype != self.input_dtype:
            images = images.to(self.input_dtype)  # DeepSpeed runs the module itself in bf16/fp16
        training = torch.is_grad_enabled() and self.module.training
        logits = self.ds(images) if training else self.module(images)  # eval needs no engine bookkeeping
        return logits.float()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself

    def step(self) -> StepResult:
        boundary = self.is_accumulation_boundary()
        own_norm = None
        if boundary and self.precision == "fp32" and self.zero_stage == 0:
            # Plain fp32 without ZeRO leaves the averaged grads in .grad and reports no norm itself.
            grads = gradients(self.module)
            own_norm = as_float(get_total_norm(grads)) if grads else 0.0
        self.ds.step()
        if not boundary:
            return StepResult(False, None, self._loss_scale())
        grad_norm = own_norm if own_norm is not None else as_float(self.ds.get_global_grad_norm())
        return StepResult(bool(self.ds.was_step_applied()), grad_norm, self._loss_scale())

    def zero_grad(self) -> None:
        # ZeRO and the mixed-precision wrappers keep accumulated gradients outside .grad; their own
        # zero_grad clears those (what DeepSpeed's step does after applying).
        wrapper = self.ds.optimizer
        if self.zero_stage > 0 or self.precision != "fp32":
            wrapper.zero_grad()
        self.ds.zero_grad()
        # ZeRO-2 also reduces inside the window into per-partition accumulators; drop them the way
        # DeepSpeed's own fp16-overflow skip does (stage_1_and_2.py), or they leak into the next step.
        if hasattr(wrapper, "_release_preflattened_grad_buffers"):
            wrapper._release_preflattened_grad_buffers()
        for accumulators in (getattr(wrapper, "averaged_gradients", None), getattr(wrapper, "all_grad_tensors", None)):
            if isinstance(accumulators, dict):
                for key in accumulators:
                    accumulators[key] = None
        self.ds.micro_steps -= self.ds.micro_steps % self.grad_accum  # restart the accumulation window

    def _loss_scale(self) -> float | None:
        if self.precision != "fp16":
            return None
        return as_float(getattr(self.ds.optimizer, "cur_scale", None) or getattr(self.ds.optimizer, "loss_scale", None))

    # ------------------------------------------------------------------ checkpoints

    def save_state(self, folder: Path, client_state: dict) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with write_errors_held_back(self.ds) as errors:
            self.ds.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, client_state={CLIENT_KEY: client_state},
                                    save_latest=False)
        distributed.barrier()
        if errors:
            raise errors[0]

    def load_state(self, folder: Path) -> dict:
        folder = Path(folder)
        if not (folder / CHECKPOINT_TAG).is_dir():
            hint = " (it holds a DDP checkpoint: set parallel.backend=ddp)" if (folder / "model.pt").is_file() else ""
            raise ValueError(f"{folder} is not a DeepSpeed engine checkpoint: no '{CHECKPOINT_TAG}' folder{hint}")
        path, client_state = self.ds.load_checkpoint(str(folder), tag=CHECKPOINT_TAG)
        if path is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint in {folder}")
        # The torch optimizer's parameters are the module's own (ZeRO-0 fp32), fp32 copies of them
        # (ZeRO-0 bf16) or flat partitions (ZeRO-1/2): state follows whichever it steps.
        align_state_to_parameters(self.optimizer)
        _fp32_running_stats(self.module)
        return dict((client_state or {}).get(CLIENT_KEY, {}))

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 weights: the master copies under bf16/fp16 (gathered across ZeRO partitions)."""
        state = state_to_cpu(self.module.state_dict())
        if self.precision == "fp32":
            return state
        from deepspeed.utils import safe_get_full_fp32_param

        # ZeRO 0 + bf16/fp16 uses DeepSpeed's unfused fp16 optimizer, whose fp32 copies sit in
        # fp32_groups (one-to-one with fp16_groups) rather than behind safe_get_full_fp32_param.
        wrapper = self.ds.optimizer
        unfused_masters = {}
        for low_group, high_group in zip(getattr(wrapper, "fp16_groups", []), getattr(wrapper, "fp32_groups", [])):
            if isinstance(low_group, list) and isinstance(high_group, list):
                unfused_masters.update({id(low): high for low, high in zip(low_group, high_group)})
        for name, param in self.module.named_parameters():
            master = safe_get_full_fp32_param(param)  # collective under ZeRO 1/2
            if master is None:
                master = unfused_masters.get(id(param), param)
            state[name] = master.detach().float().cpu().clone()
        return state
