"""A resumed run is the same run, also on another number of processes.

A checkpoint fixes the global batch it was trained with (per-process batch x processes x
grad_accum). A resume on another world size keeps it: `fit_global_batch` picks the per-process
batch and grad_accum for the new world size, so the peak lr (scaled to the global batch), the
steps per epoch and with them the whole lr schedule stay what they were. The data position is a
number of samples of the epoch, counted over all ranks (`data/sampling.py` explains why that is
the same position whatever the world size), so the resumed run reads exactly the rest of the
interrupted epoch: every sample once.

The Trainer plans its start here: `resume_point` (which checkpoint, if any), `plan_resume` (the
batch layout that keeps its global batch) and `resumed_trainer_state` (its position, in samples).

Standard library only: `rkan-dist train --nproc N` checks a resume before it starts torchrun,
and a world size that cannot keep the global batch is one line (exit 2), not N failing workers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rkan_dist.config import ConfigError
from rkan_dist.ledger import EARLIER_LEDGER_NAME, LEDGER_NAME
from rkan_dist.manifest import MANIFEST, latest_valid, list_checkpoints
from rkan_dist.watchdog import HANGS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch is split: per-process batch x processes x micro-batches per step."""

    world_size: int
    batch_size: int
    grad_accum: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.grad_accum

    def __str__(self) -> str:
        processes = "process" if self.world_size == 1 else "processes"
        return f"{self.batch_size} per process x {self.world_size} {processes} x grad_accum {self.grad_accum}"


def fit_global_batch(global_batch: int, world_size: int, batch_size: int, grad_accum: int) -> tuple[int, int]:
    """(batch_size, grad_accum) that give `global_batch` images per step on `world_size` processes.

    The configured pair when it fits; else the same per-process batch with another grad_accum
    (the same micro-batches, so the same BatchNorm statistics and memory); else the largest
    per-process batch below the configured one that divides evenly (the fewest micro-batches
    that fit in the same memory). ValueError when global_batch is not a multiple of world_size.
    """
    if batch_size * world_size * grad_accum == global_batch:
        return batch_size, grad_accum
    if global_batch % world_size:
        raise ValueError(f"a global batch of {global_batch} cannot be split evenly over {world_size} processes")
    per_process = global_batch // world_size
    if per_process % batch_size == 0:
        return batch_size, per_process // batch_size
    size = next(size for size in range(min(batch_size, per_process), 0, -1) if per_process % size == 0)
    return size, per_process // size


def world_sizes_for(global_batch: int, near: int, count: int = 6) -> list[int]:
    """The `count` world sizes closest to `near` that split `global_batch` evenly, ascending."""
    divisors = [size for size in range(1, global_batch + 1) if global_batch % size == 0]
    return sorted(sorted(divisors, key=lambda size: (abs(size - near), size))[:count])


def layout_of(manifest: dict[str, Any], config: dict[str, Any] | None) -> BatchLayout | None:
    """The layout a checkpoint was trained with, from its manifest and resolved config; None if unrecorded."""
    try:
        return BatchLayout(int(manifest["world_size"]), int(config["data"]["batch_size"]),
                           int(config["train"]["grad_accum"]))
    except (KeyError, TypeError, ValueError):
        return None


def zero_stage_of(config: dict[str, Any] | None) -> int:
    """The DeepSpeed ZeRO stage a checkpoint's optimizer state is partitioned with (0: not partitioned)."""
    parallel = (config or {}).get("parallel") or {}
    return int(parallel.get("zero_stage", 0) or 0) if parallel.get("backend") == "deepspeed" else 0


def resumed_layout(saved: BatchLayout, world_size: int, batch_size: int, grad_accum: int,
                   checkpoint: str | os.PathLike, zero_stage: int = 0) -> BatchLayout:
    """The layout for resuming `saved` on `world_size` processes: the same global batch, split as
    close to the configured (batch_size, grad_accum) as it fits; ConfigError naming the choices.

    A checkpoint whose optimizer state DeepSpeed ZeRO partitioned (`zero_stage` >= 1) holds one
    partition per process of its world size and resumes on that world size only.
    """
    if zero_stage and world_size != saved.world_size:
        raise ConfigError(f"{checkpoint} holds DeepSpeed ZeRO-{zero_stage} optimizer state partitioned over "
                          f"{saved.world_size} processes; resume it on {saved.world_size} processes, or start a new "
                          f"run in another train.run_dir")
    try:
        batch_size, grad_accum = fit_global_batch(saved.global_batch, world_size, batch_size, grad_accum)
    except ValueError:
        choices = world_sizes_for(saved.global_batch, world_size)
        raise ConfigError(
            f"{checkpoint} was trained with a global batch of {saved.global_batch} ({saved}), which {world_size} "
            f"processes cannot keep; resume on {', '.join(map(str, choices[:-1]))} or {choices[-1]} processes "
            f"(--nproc, or Slurm nodes x tasks per node), or start a new run in another train.run_dir") from None
    return BatchLayout(world_size, batch_size, grad_accum)


def describe_resize(saved: BatchLayout, now: BatchLayout) -> str | None:
    """What a resume changed, for its log line; None when nothing did."""
    if saved == now:
        return None
    changes = [f"{name} {before} -> {after}" for name, before, after in (
        ("world size", saved.world_size, now.world_size), ("data.batch_size", saved.batch_size, now.batch_size),
        ("train.grad_accum", saved.grad_accum, now.grad_accum)) if before != after]
    return (f"{', '.join(changes)}; kept: global batch {now.global_batch}, the lr schedule and the position in the "
            f"epoch (in samples)")


def epoch_position(trainer_state: dict[str, Any], saved: BatchLayout | None) -> int:
    """Samples of the current epoch read so far (all ranks), from a checkpoint's trainer state.

    Checkpoints written before the position was kept in samples count micro-batches per rank
    (`next_batch`); with the layout they were written with, that is next_batch x batch x world.
    """
    if "epoch_sample" in trainer_state:
        return int(trainer_state["epoch_sample"])
    next_batch = int(trainer_state.get("next_batch", 0))
    if next_batch and saved is None:
        raise ConfigError("the checkpoint records its data position in batches but not the batch size and world "
                          "size that position was counted in; resume it with the world size it was written with")
    return next_batch * saved.batch_size * saved.world_size if next_batch else 0


def check_resume(run_dir: str | os.PathLike, resume: str, world_size: int, batch_size: int, grad_accum: int) -> None:
    """Before launching `world_size` processes: ConfigError if the checkpoint they would resume from
    has a global batch they cannot keep (no torch, no process group, no data loaders needed)."""
    if resume == "none":
        return
    if resume == "auto":  # the newest; the Trainer validates it, and passes over a damaged one
        found = list_checkpoints(run_dir)
        checkpoint = found[-1].path if found else None
    else:
        checkpoint = Path(resume)
    if checkpoint is None or not (checkpoint / MANIFEST).is_file():
        return
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return  # the Trainer reports or passes over a damaged checkpoint
    saved = layout_of(manifest, manifest.get("config"))
    if saved is not None:
        resumed_layout(saved, world_size, batch_size, grad_accum, checkpoint, zero_stage_of(manifest.get("config")))


# ----------------------------------------------------------------------------- the Trainer's start

def resume_point(run_dir: Path, resume: str, overwrite: bool, restarts: int, checkpoints: Any, *,
                 is_main: bool, barrier: Callable[[], None]) -> Path | None:
    """Where this start begins. train.resume is how the run's first start begins; a restart (a
    requeue after a preemption, time limit or crash, or a crash restart of `--nproc`) continues
    the run from its own latest valid checkpoint whatever that setting: resume=none would start
    it over (and with overwrite=true move its own checkpoints aside), resume=PATH go back.

    `checkpoints` is the run's CheckpointManager; `barrier` a collective every rank calls here."""
    if restarts:
        latest = latest_valid(run_dir)
        if latest is not None:
            if resume != "auto" and is_main:
                log.info("restart %d continues from its latest checkpoint %s (train.resume=%s was for the "
                         "first start)", restarts, latest.path, resume)
            return latest.path
    if resume == "none":
        earlier_run = checkpoints.has_checkpoints()
        if earlier_run and not (overwrite or restarts):
            raise ConfigError(f"{run_dir} already holds checkpoints; use train.resume=auto to continue, "
                              "a new train.run_dir, or train.overwrite=true to start over")
        barrier()  # every rank has looked before rank 0 moves anything
        if earlier_run and is_main:
            from rkan_dist.metrics import LOG_NAMES, set_aside

            # Its checkpoints would otherwise mix with this run's: a later step of the old run
            # would outlive this run's pruning and be what a restart resumes from. The ledger
            # would count the old run's time limits and failures against this one's budgets.
            names = (checkpoints.root.name, HANGS, *LOG_NAMES, *(() if restarts else (LEDGER_NAME, EARLIER_LEDGER_NAME)))
            set_aside(run_dir, names, "checkpoints of an earlier run (train.overwrite=true)")
            checkpoints.root.mkdir()
        barrier()
    return checkpoints.find_resume_point(resume)


@dataclass(frozen=True)
class ResumePlan:
    """How a start resumes: from which checkpoint, trained with which layout, continued with which."""

    checkpoint: Path | None = None  # None: a fresh start
    saved: BatchLayout | None = None  # the checkpoint's layout; None when it does not record it
    layout: BatchLayout | None = None  # this start's: the saved global batch, split for this world size

    @property
    def note(self) -> str | None:
        """What the resume changed, for its log line; None when nothing did."""
        return describe_resize(self.saved, self.layout) if self.saved and self.layout else None

    def apply(self, config: Any) -> Any:
        """`config` with this start's batch size and grad_accum (as configured when there is no layout)."""
        if self.layout is None:
            return config
        return dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=self.layout.batch_size),
                                   train=dataclasses.replace(config.train, grad_accum=self.layout.grad_accum))


def plan_resume(checkpoint: Path | None, saved_config: dict[str, Any] | None, world_size: int, batch_size: int,
                grad_accum: int, *, is_main: bool) -> ResumePlan:
    """Resuming `checkpoint` (trained with `saved_config`) on `world_size` processes: its global
    batch, split for this world size; as configured for a checkpoint that does not record its layout."""
    if checkpoint is None:
        return ResumePlan()
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    saved = layout_of(manifest, saved_config)
    if saved is None:
        return ResumePlan(checkpoint)
    now = resumed_layout(saved, world_size, batch_size, grad_accum, checkpoint, zero_stage_of(saved_config))
    recipe = (batch_size, grad_accum)
    if world_size == saved.world_size and recipe != (now.batch_size, now.grad_accum) \
            and is_main:  # the recipe changed, not the world size: say that it is not followed
        log.warning("resuming %s with its global batch of %d: data.batch_size=%d, train.grad_accum=%d of the "
                    "recipe are not used (a new global batch is a new run: give it another train.run_dir)",
                    checkpoint, now.global_batch, *recipe)
    return ResumePlan(checkpoint, saved, now)


def load_engine_state(engine: Any, checkpoint: Path, model_name: str) -> dict[str, Any]:
    """Load `checkpoint` into `engine`; its client state. ConfigError when its weights do not fit the model."""
    try:
        return engine.load_state(checkpoint)
    except RuntimeError as err:  # load_state_dict names the missing, unexpected and mis-shaped keys
        if "state_dict" not in str(err):
            raise
        raise ConfigError(f"checkpoint {checkpoint} does not fit model {model_name!r}: "
                          + " ".join(str(err).split())[:1500]) from None


def resumed_trainer_state(client_state: dict[str, Any], saved: BatchLayout | None) -> dict[str, Any]:
    """A checkpoint's trainer state with its data position in samples; `saved`: its layout if known."""
    trainer_state = dict(client_state["trainer"])
    saved = saved or layout_of(client_state, client_state.get("config"))
    trainer_state["epoch_sample"] = epoch_position(trainer_state, saved)
    trainer_state.pop("next_batch", None)  # the position in micro-batches per rank, replaced by epoch_sample
    return trainer_state
