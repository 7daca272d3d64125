"""Data parallelism with DeepSpeed: ZeRO stage 0/1/2, bf16/fp16 through DeepSpeed's own config.

What stays ours: the torch optimizer (no DeepSpeed optimizer) and the learning-rate schedule (no
DeepSpeed scheduler; `set_lr` writes the rate into our optimizer's param groups, which ZeRO steps).
What DeepSpeed does: gradient accumulation (`gradient_accumulation_steps`), the 1/k loss scaling,
clipping (`gradient_clipping`), the fp32 master weights under bf16/fp16 and the fp16 loss scale.

BatchNorm under bf16/fp16: DeepSpeed casts parameters to the low precision and keeps buffers in
fp32, and torch's CPU batch_norm refuses that mix. Low-precision running statistics would also
drift (bf16 keeps ~3 significant digits). So BatchNorm layers compute with fp32 parameters and
fp32 running statistics on the low-precision activations (apex's "keep_batchnorm_fp32").
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import get_total_norm

from rkan_dist import distributed
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


def _gather_partitions_by_broadcast(groups_flat, partitioned_param_groups, dp_process_group,
                                    start_alignment_factor=None, allgather_bucket_size=None) -> None:
    """ZeRO-1/2's end-of-step gather of the updated parameter partitions: one broadcast per rank.

    DeepSpeed gathers with all_gather_into_tensor. Over gloo that moves the same bytes 3.4x slower
    than one broadcast per partition does (2 processes, 47 MB: 50 vs 15 ms measured here), and it
    is the largest part of ZeRO's extra cost over DDP on CPU. The partitions are views into the
    flat buffer, so broadcasting each in place fills the buffer.
    """
    for flat, partitions, group in zip(groups_flat, partitioned_param_groups, dp_process_group):
        if torch.distributed.get_world_size(group) == 1:
            continue
        if any(p.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr() for p in partitions):
            # not views of the buffer (another DeepSpeed layout): gather the way DeepSpeed does
            own = partitions[torch.distributed.get_rank(group)]
            torch.distributed.all_gather_into_tensor(flat, own, group=group)
            continue
        ranks = torch.distributed.get_process_group_ranks(group)
        works = [torch.distributed.broadcast(partition, src=ranks[index], group=group, async_op=True)
                 for index, partition in enumerate(partitions)]
        for work in works:
            work.wait()


def _fp32_gradient_norms() -> torch.dtype:
    """The dtype ZeRO-1/2 computes each gradient's norm in, on CPU.

    DeepSpeed converts every gradient to fp64 first (`get_norm_dtype`), a copy twice the gradient's
    size that costs nothing next to a GPU step but made the norm of a 23 MB partition take 5-7 ms
    of a ~190 ms CPU step here, 6x the fp32 norm. The per-tensor norms are summed in fp32 as well,
    as `get_total_norm` does for DDP.
    """
    return torch.float32


def _adapt_zero_to_gloo() -> None:
    """When gloo carries ZeRO (CPU): `_gather_partitions_by_broadcast` for DeepSpeed's partition
    gather and `_fp32_gradient_norms` for its gradient norms."""
    from deepspeed.runtime.zero import stage_1_and_2

    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo":
        stage_1_and_2.all_gather_dp_groups = _gather_partitions_by_broadcast
        stage_1_and_2.get_norm_dtype = _fp32_gradient_norms


class _OverlappedGlooReductions:
    """ZeRO-1/2's gradient reductions over gloo: overlapped with the backward pass as DDP's are, and
    each gradient element sent only to the rank whose partition holds it.

    With `overlap_comm`, ZeRO reduces each gradient bucket from the backward hooks as it fills,
    but a reduction only leaves the backward pass's way on a CUDA side stream: over gloo on CPU
    every reduction blocks the pass. It is also an all-reduce of the whole bucket, although after
    it each rank reads only the gradients of its own partition (ZeRO-1 reads `params_in_partition`
    sliced to the partition, ZeRO-2 clears the rest): with the parameter gather at the end of
    the step, ZeRO moved 1.5x DDP's bytes.

    Installed on one ZeRO optimizer, `allreduce_and_copy` splits a bucket by owning partition and
    sends each rank's slices to their owner (isend/irecv, async; each contribution divided first,
    as DeepSpeed does). The epilogue waits for all of them and writes the owner's sums into its
    gradient slices before DeepSpeed reads any gradient. Slices of other partitions keep local,
    unreduced values that nothing reads. Buckets it cannot map (not plain contiguous gradients of
    this optimizer's groups, or a partition buffer to fill) take the all-reduce path, also async.

    Measured here (ResNet-18, 2 processes, fp32, per-tensor SGD, interleaved with DDP in one
    launch, with `distributed.keep_freed_memory_for_reuse` in effect): ZeRO-1 steps 1.01-1.08x
    DDP's, against 1.14-1.18x with DeepSpeed's blocking all-reduce and 1.12-1.16x with an async
    all-reduce of the whole bucket. Without the allocator setting the page faults of ZeRO's
    temporaries hid the gain (1.20-1.22x either way).
    """

    def __init__(self, zero_optimizer) -> None:
        self.zero = zero_optimizer
        self.pending: list[tuple] = []
        self._tag = 0
        self._blocking_allreduce_and_copy = zero_optimizer.allreduce_and_copy
        self._epilogue = zero_optimizer.independent_gradient_partition_epilogue
        self._partitions = self._partition_ranges()
        zero_optimizer.allreduce_and_copy = self.allreduce_and_copy
        zero_optimizer.independent_gradient_partition_epilogue = self.epilogue

    def _partition_ranges(self) -> list[list[tuple[int, int]]]:
        """Per parameter group: each rank's [start, end) in the group's flat buffer."""
        zero, ranges = self.zero, []
        for flat, partitions in zip(zero.bit16_groups_flat, zero.parallel_partitioned_bit16_groups):
            base, size = flat.data_ptr(), flat.element_size()
            ranges.append([((part.data_ptr() - base) // size, (part.data_ptr() - base) // size + part.numel())
                           for part in partitions])
        return ranges

    def _flat_offsets(self, grads) -> list[tuple[int, int] | None]:
        """(group index, offset of the parameter in the group's flat buffer) for each gradient."""
        zero, where = self.zero, {}
        for group_index, (flat, params) in enumerate(zip(zero.bit16_groups_flat, zero.bit16_groups)):
            base, size = flat.data_ptr(), flat.element_size()
            for param in params:
                grad = zero.get_gradient_for_reduction(param)
                if grad is not None:
                    where[id(grad)] = (group_index, (param.data_ptr() - base) // size)
        return [where.get(id(grad)) for grad in grads]

    def allreduce_and_copy(self, small_bucket, communication_data_type, rank=None, log=None, divide=True,
                           process_group=None, output_bucket=None):
        zero = self.zero
        if rank is not None:  # a reduce to one rank (not used by ZeRO-1/2 data parallelism): as DeepSpeed does
            return self._blocking_allreduce_and_copy(small_bucket, communication_data_type, rank=rank, log=log,
                                                     divide=divide, process_group=process_group,
                                                     output_bucket=output_bucket)
        zero._clear_previous_reduced_grads()  # what DeepSpeed does first under overlap_comm (ZeRO-2)
        group = zero.dp_process_group if process_group is None else process_group
        if zero.sequence_parallel_size > 1:
            communication_data_type = torch.float32  # as DeepSpeed's allreduce_bucket
        divisor = torch.distributed.get_world_size(group=group) / float(zero.sequence_parallel_size)
        divisor = divisor if divide and zero.gradient_average else None
        offsets = self._flat_offsets(small_bucket)
        mappable = (output_bucket is None or all(output is None for output in output_bucket)) and all(
            where is not None and grad.is_contiguous() for where, grad in zip(offsets, small_bucket))
        if mappable:
            self._reduce_to_owners(small_bucket, offsets, communication_data_type, divisor, group)
        else:
            self._all_reduce(small_bucket, communication_data_type, divisor, group, output_bucket)

    def _reduce_to_owners(self, grads, offsets, dtype, divisor, group) -> None:
        """A reduce-scatter by point-to-point: each rank's slices go to their owner, which sums the
        contributions in rank order. gloo's own reduce (42 ms for 2 x 23.5 MB here) and
        reduce_scatter (55 ms) are slower than its all-reduce of the whole 47 MB (27 ms); its
        send/recv move a half in ~5 ms."""
        me, world = torch.distributed.get_rank(group=group), torch.distributed.get_world_size(group=group)
        by_owner: dict[int, list[torch.Tensor]] = {owner: [] for owner in range(world)}
        for grad, (group_index, start) in zip(grads, offsets):
            flat_grad, end = grad.view(-1), start + grad.numel()
            for owner, (first, last) in enumerate(self._partitions[group_index]):
                low, high = max(start, first), min(end, last)
                if low < high:
                    by_owner[owner].append(flat_grad[low - start:high - start])
        self._tag = (self._tag + 1) % (1 << 30)  # same bucket sequence on every rank: pairs each send and recv
        works, contributions = [], [None] * world
        for owner, slices in by_owner.items():
            if not slices:
                continue
            mine = torch.cat(slices).to(dtype)
            if divisor is not None:
                mine.div_(divisor)
            if owner != me:
                works.append(torch.distributed.isend(mine, torch.distributed.get_global_rank(group, owner),
                                                     group=group, tag=self._tag))
                continue
            contributions[me] = mine
            for sender in range(world):
                if sender != me:
                    contributions[sender] = torch.empty_like(mine)
                    works.append(torch.distributed.irecv(contributions[sender], torch.distributed.get_global_rank(
                        group, sender), group=group, tag=self._tag))
        self.pending.append((works, contributions, by_owner[me], None))

    def _all_reduce(self, grads, dtype, divisor, group, output_bucket) -> None:
        zero = self.zero
        reduced = zero.flatten(grads).to(dtype)
        if divisor is not None:
            reduced.div_(divisor)
        work = torch.distributed.all_reduce(reduced, group=group, async_op=True)
        outputs = [None] * len(grads) if output_bucket is None else list(output_bucket)
        self.pending.append(([work], reduced, list(grads), outputs))

    def finish(self) -> None:
        """Wait for every launched reduction and write the sums into the gradients this rank reads."""
        zero = self.zero
        for works, reduced, targets, outputs in self.pending:
            for work in works:
                work.wait()
            if outputs is None:  # contributions to this rank's slices by rank (none: this bucket only sent)
                if not targets:
                    continue
                total = reduced[0]  # a scratch buffer (a cat or a recv): summed into in place
                for contribution in reduced[1:]:
                    total.add_(contribution)
                for target, synced in zip(targets, total.split([t.numel() for t in targets])):
                    target.copy_(synced.view_as(target))
                continue
            for grad, synced, output in zip(targets, zero.unflatten(reduced, targets), outputs):
                zero._add_to_grad_partition_buffer(output, synced)
                grad.copy_(synced)
        self.pending.clear()

    def epilogue(self) -> None:
        self.zero.reduce_ipg_grads()  # launch the last, partly filled bucket
        self.finish()
        self._epilogue()  # DeepSpeed's own: its reduce_ipg_grads now finds empty buckets


def _overlap_gloo_reductions(engine) -> _OverlappedGlooReductions | None:
    """Install `_OverlappedGlooReductions` on a ZeRO-1/2 engine whose gradients go through gloo."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = engine.optimizer
    if not isinstance(zero, DeepSpeedZeroOptimizer) or not zero.overlap_comm:
        return None
    if torch.distributed.get_backend(zero.dp_process_group) != "gloo" or zero.cpu_offload:
        return None
    return _OverlappedGlooReductions(zero)


def build_deepspeed_config(*, micro_batch_size: int, grad_accum: int, grad_clip: float, zero_stage: int,
                           precision: str, bucket_cap_mb: int, on_cuda: bool = False) -> dict:
    """DeepSpeed's JSON config from our settings (pure; unit-tested).

    `overlap_comm` reduces gradient buckets during the backward pass (what DDP does by default): on
    a side stream on CUDA, through `_OverlappedGlooReductions` over gloo. `contiguous_gradients`
    copies every gradient into one buffer to spare the CUDA caching allocator fragmentation; on CPU
    there is none to avoid, the copy costs time (ZeRO-1 fp32 steps 1.24x DDP's instead of 1.15x on
    2 CPU processes, measured before the gloo reductions above) and DeepSpeed would reduce such
    buckets itself (`average_tensor`), past `_OverlappedGlooReductions`: it is on for CUDA only.
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


@contextlib.contextmanager
def _write_errors_held_back(ds: Any) -> Iterator[list[BaseException]]:
    """For one DeepSpeed save: a write that fails on this rank (disk full, quota, permissions) is
    recorded in the yielded list and skips the rank's remaining writes, but not DeepSpeed's collectives.

    Raised inside save_checkpoint, it left the ranks that wrote their part in its final barrier and
    this rank in CheckpointManager's agreement (a different collective): measured on 2 CPU ranks
    under ZeRO-1, a hang until the watchdog fired, recorded as a hang of an unknown rank. Held back
    to the end, every rank leaves save_checkpoint, and the agreement fails the save on all of them.
    Wraps the checkpoint engine's save and makedirs (every shard and the model file go through
    them) and the recovery-script copy, DeepSpeed's one write of its own."""
    errors: list[BaseException] = []

    def held_back(write):
        @functools.wraps(write)
        def attempt(*args: Any, **kwargs: Any) -> Any:
            if errors:  # this checkpoint is lost already: write nothing more of it
                return None
            try:
                return write(*args, **kwargs)
            except Exception as err:  # torch.save reports ENOSPC as a RuntimeError
                errors.append(err)
                return None
        return attempt

    wrapped = [(owner, name) for owner, name in ((ds.checkpoint_engine, "save"), (ds.checkpoint_engine, "makedirs"),
                                                 (ds, "_copy_recovery_script")) if hasattr(owner, name)]
    for owner, name in wrapped:
        setattr(owner, name, held_back(getattr(owner, name)))
    try:
        yield errors
    finally:
        for owner, name in wrapped:
            delattr(owner, name)  # the class's own method shows through again


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
            _adapt_zero_to_gloo()
        self.ds, _, _, _ = deepspeed.initialize(model=model.to(device), optimizer=optimizer, config=self.config)
        self._gloo_reductions = _overlap_gloo_reductions(self.ds)  # None unless gloo carries ZeRO-1/2
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
        with _write_errors_held_back(self.ds) as errors:
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
