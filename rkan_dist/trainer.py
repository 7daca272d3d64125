"""The Trainer: one training loop from one CPU process to many GPU nodes, DDP or DeepSpeed.

The Trainer owns its components (process group, model, engine, loaders, metrics, checkpoints)
and closes them on the success and the error path. Everything is counted in optimizer steps:
the lr is a pure function of the global step, the data position is (epoch, samples of it read by
all ranks together), and the randomness of mixing is derived from (seed, rank, step), so a run
resumed from a checkpoint continues exactly as if it had never stopped - on another world size
too, with the checkpoint's global batch kept (rkan_dist.resume).

Ctrl-C or SIGTERM (outside Slurm) stops every rank at the next step boundary with a checkpoint,
and `train()` raises `Interrupted` (see rkan_dist.stops, which says which layer handles which stop).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rkan_dist import __version__
from rkan_dist import distributed as dist_utils
from rkan_dist.checkpoint import (
    MANIFEST,
    CheckpointManager,
    CheckpointSaveError,
    checkpoint_config,
    checkpoint_time,
    latest_valid,
)
from rkan_dist.config import Config, ConfigError, config_to_dict, save_config
from rkan_dist.evaluate import evaluate_loader, forward_in_precision
from rkan_dist.ledger import LEDGER_NAME, RequeueLedger, restart_count, slurm_job
from rkan_dist.ledger import summary as ledger_summary
from rkan_dist.log import setup_logging
from rkan_dist.metrics import LOG_NAMES, MetricsLogger, Throughput, format_summary, memory_gib, set_aside
from rkan_dist.optim import ModelEma, build_optimizer, mix_batch, mix_generator, soft_cross_entropy
from rkan_dist.precision import resolve_precision, slow_precision_warning
from rkan_dist.resume import describe_resize, epoch_position, layout_of, resumed_layout, zero_stage_of
from rkan_dist.schedules import lr_at_step, scaled_lr
from rkan_dist.stops import Interrupted, StopSignals
from rkan_dist.threads import configure_threads
from rkan_dist.watchdog import HANGS, HangWatchdog, hang_timeout_for

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """train.nonfinite=stop: the loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainState:
    """Where the run is: everything else about the position is derived from these."""

    global_step: int = 0  # optimizer steps taken
    epoch: int = 0  # the epoch in progress
    epoch_sample: int = 0  # samples of `epoch` read so far, all ranks together (the data position)
    restarts: int = 0  # how many times this run has been resumed
    skipped_steps: int = 0  # steps dropped for a non-finite loss


@dataclass
class TrainResult:
    status: str  # "finished" | "stopped" (a stop was requested, e.g. by Slurm) | "nonfinite"
    global_step: int
    final_eval: dict[str, float] | None
    run_dir: Path
    checkpoint: Path | None = None  # for "stopped": the checkpoint of global_step (None before any step)

    @property
    def summary(self) -> str:
        top1 = f"{self.final_eval['eval/top1'] * 100:.2f}%" if self.final_eval else "n/a"
        return (f"status: {self.status} at step {self.global_step}\nfinal val top-1: {top1}\n"
                f"run folder: {self.run_dir}\nTensorBoard: tensorboard --logdir {self.run_dir / 'tb'}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain types (weights_only-loadable)."""
    numpy_state = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": [torch.from_numpy(numpy_state[1].astype(np.int64)), int(numpy_state[2]),
                  int(numpy_state[3]), float(numpy_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # This process's GPU only: with one GPU per process the others belong to other ranks, and a
        # run resumed on a node that shows fewer GPUs (one per task) must still load it.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    keys, version, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    keys_np, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys_np.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_state = state["cuda"]
        if isinstance(cuda_state, list | tuple):  # older checkpoints: every GPU the process saw
            index = torch.cuda.current_device()
            cuda_state = cuda_state[index] if index < len(cuda_state) else None
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)


class Trainer:
    """Build with a validated Config; use as a context manager (or call close())."""

    def __init__(self, config: Config):
        self.config = config
        self.dist = dist_utils.init(config.train.device, config.parallel.hang_timeout_s)
        self._closed = False
        self.watchdog: HangWatchdog | None = None  # armed while train() runs (rkan_dist.watchdog)
        self._stop_requested = False
        self._last_save = time.monotonic()  # checkpoint.every_minutes counts from the start or the last save
        self.stop_signals: StopSignals | None = None  # set by StopSignals.attach
        self._saved: tuple[int, Path] | None = None  # (step, path) of this process's last checkpoint
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ construction
    def _build(self) -> None:
        config, dist = self.config, self.dist
        setup_logging(config.logging.level, dist.rank)
        # compute + data threads of all local processes within the node's cores (see rkan_dist.threads)
        self.threads = configure_threads(config.data.num_workers)
        self.run_dir = Path(config.train.run_dir)
        self.device = dist.device
        # train.precision=auto becomes the concrete precision here, so config.yaml, checkpoints and the
        # logs all name the one trained in. A resumed run re-resolves `auto` from its recipe: moved to
        # another machine it takes the precision that machine is fast at (DDP checkpoints hold fp32
        # weights and optimizer state whatever the autocast precision).
        try:
            precision, self.precision_reason = resolve_precision(config.train.precision, self.device,
                                                                 config.parallel.backend)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.config = config = dataclasses.replace(config, train=dataclasses.replace(config.train, precision=precision))
        warning = slow_precision_warning(precision, self.device) if self.precision_reason.startswith("set") else None
        if warning and dist.is_main:
            log.warning(warning)
        if config.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # Shapes are static within an epoch (fixed batch, one resolution per epoch): cuDNN's
        # autotuner times each convolution once per shape and keeps the fastest kernel. Its choice
        # may vary between runs, so not for deterministic runs.
        torch.backends.cudnn.benchmark = not config.train.deterministic
        seed_everything(config.train.seed)  # same init on every rank (DDP also broadcasts it)
        self.checkpoints = CheckpointManager(self.run_dir, config.checkpoint.keep, rank=dist.rank,
                                             world_size=dist.world_size)
        self._resume_path = self._find_resume_point()
        self.config = config = self._keep_global_batch(config)  # before the loaders and engine use the batch

        from rkan_dist.data import build_loaders
        from rkan_dist.models import build_model
        from rkan_dist.parallel import wrap

        model = build_model(config.model)
        # channels_last on CUDA only, where it is measured to be fast. The gradients agree with NCHW
        # on CPU as well (float64: to 1e-14; the 1e-3 fp32 differences once blamed on oneDNN were a
        # ReLU input within rounding of zero, see tests/unit/test_cuda_paths.py); CPU speed is unmeasured.
        self.channels_last = config.train.channels_last and self.device.type == "cuda"
        if config.train.channels_last and not self.channels_last:
            log.info("train.channels_last applies on CUDA only; %s runs NCHW", self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = model.to(self.device)
        optimizer = build_optimizer(model, config.optim)
        self.train_loader, self.val_loader = build_loaders(
            dataclasses.replace(config.data, num_workers=self.threads.data), seed=config.train.seed,
            device=self.device, channels_last=self.channels_last)
        accum = config.train.grad_accum
        self.steps_per_epoch = self.train_loader.steps_per_epoch // accum
        if self.steps_per_epoch < 1:
            raise ConfigError(f"an epoch has {self.train_loader.steps_per_epoch} batches per rank, fewer than "
                              f"train.grad_accum={accum}; lower data.batch_size or train.grad_accum")
        self.total_steps = config.train.max_steps or config.train.max_epochs * self.steps_per_epoch
        self.global_batch = config.data.batch_size * dist.world_size * accum
        self.epoch_samples = self.steps_per_epoch * self.global_batch  # whole steps; see sampling.epoch_samples
        self.peak_lr = scaled_lr(config.optim.lr, self.global_batch, config.optim.scale_lr)
        self.engine = wrap(model, optimizer, parallel_config=config.parallel, precision=config.train.precision,
                           grad_accum=accum, grad_clip=config.train.grad_clip, device=self.device,
                           dist_info=dist, micro_batch_size=config.data.batch_size)
        if config.train.compile:
            self.engine.module.compile()
        from rkan_dist.models.rkan import rkan_stages

        self._rkan_stages = rkan_stages(self.engine.module)
        self.ema = ModelEma(self.engine.module, config.train.ema_decay) if config.train.ema_decay > 0 else None
        self.criterion = soft_cross_entropy
        self.state = TrainState()
        self._resume()
        self.ledger = RequeueLedger(self.run_dir)
        if dist.is_main:  # every start; after a crash, hang or failed save also the restart and what the fault cost
            self._write_ledger(self.ledger.append, {"event": "start", **slurm_job(), "step": self.state.global_step,
                                                    "world_size": dist.world_size})
            self._write_ledger(self.ledger.record_restart, self.state.global_step,
                               checkpoint_time(self.checkpoints.resumed_from))
        if dist.is_main:
            save_config(config, self.run_dir, notes=[f"train.precision: {precision} ({self.precision_reason})"])
        # A resumed run's first new step is global_step + 1: what the killed run logged after its
        # checkpoint (from there on) is dropped, what it logged up to the checkpoint stays.
        first_new_step = self.state.global_step + 1 if self.state.global_step > 0 else 0
        self.metrics = MetricsLogger(self.run_dir, enabled=dist.is_main, tensorboard=config.logging.tensorboard,
                                     start_step=first_new_step)
        parameters = list(self.engine.module.parameters())
        self.metrics.text(first_new_step, "run/precision", f"{precision} ({self.precision_reason})")
        log.info("model %s: %.2fM parameters (%.2fM trainable); %d steps (%d per epoch), global batch %d, peak lr "
                 "%.4g, %s, precision %s (%s), world size %d on %s", config.model.name, sum(p.numel() for p in parameters) / 1e6,
                 sum(p.numel() for p in parameters if p.requires_grad) / 1e6, self.total_steps,
                 self.steps_per_epoch, self.global_batch, self.peak_lr, config.parallel.backend,
                 precision, self.precision_reason, dist.world_size, self.device)

    def _find_resume_point(self) -> Path | None:
        """Where this start begins. train.resume is how the run's first start begins; a restart (a
        requeue after a preemption, time limit or crash, or a crash restart of `--nproc`) continues
        the run from its own latest valid checkpoint whatever that setting: resume=none would start
        it over (and with overwrite=true move its own checkpoints aside), resume=PATH go back."""
        train = self.config.train
        restarts = restart_count()
        if restarts:
            latest = latest_valid(self.run_dir)
            if latest is not None:
                if train.resume != "auto" and self.dist.is_main:
                    log.info("restart %d continues from its latest checkpoint %s (train.resume=%s was for the "
                             "first start)", restarts, latest.path, train.resume)
                return latest.path
        if train.resume == "none":
            earlier_run = self.checkpoints.has_checkpoints()
            if earlier_run and not (train.overwrite or restarts):
                raise ConfigError(f"{self.run_dir} already holds checkpoints; use train.resume=auto to continue, "
                                  "a new train.run_dir, or train.overwrite=true to start over")
            dist_utils.barrier()  # every rank has looked before rank 0 moves anything
            if earlier_run and self.dist.is_main:
                # Its checkpoints would otherwise mix with this run's: a later step of the old run
                # would outlive this run's pruning and be what a restart resumes from. The ledger
                # would count the old run's time limits and failures against this one's budgets.
                names = (self.checkpoints.root.name, HANGS, *LOG_NAMES, *(() if restarts else (LEDGER_NAME,)))
                set_aside(self.run_dir, names, "checkpoints of an earlier run (train.overwrite=true)")
                self.checkpoints.root.mkdir()
            dist_utils.barrier()
        return self.checkpoints.find_resume_point(train.resume)

    def _keep_global_batch(self, config: Config) -> Config:
        """Resuming on another world size: the checkpoint's global batch, split for this one."""
        self.saved_layout, self.resize_note = None, None
        if self._resume_path is None:
            return config
        manifest = json.loads((self._resume_path / MANIFEST).read_text())
        saved_config = checkpoint_config(self._resume_path)
        self.saved_layout = layout_of(manifest, saved_config)
        if self.saved_layout is None:  # an older checkpoint that does not record it: as configured
            return config
        now = resumed_layout(self.saved_layout, self.dist.world_size, config.data.batch_size,
                             config.train.grad_accum, self._resume_path, zero_stage_of(saved_config))
        self.resize_note = describe_resize(self.saved_layout, now)
        recipe = (config.data.batch_size, config.train.grad_accum)
        if self.dist.world_size == self.saved_layout.world_size and recipe != (now.batch_size, now.grad_accum) \
                and self.dist.is_main:  # the recipe changed, not the world size: say that it is not followed
            log.warning("resuming %s with its global batch of %d: data.batch_size=%d, train.grad_accum=%d of the "
                        "recipe are not used (a new global batch is a new run: give it another train.run_dir)",
                        self._resume_path, now.global_batch, *recipe)
        return dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=now.batch_size),
                                   train=dataclasses.replace(config.train, grad_accum=now.grad_accum))

    def _resume(self) -> None:
        path = self._resume_path
        if path is None:
            return
        try:
            client_state = self.engine.load_state(path)
        except RuntimeError as err:  # load_state_dict names the missing, unexpected and mis-shaped keys
            if "state_dict" not in str(err):
                raise
            raise ConfigError(f"checkpoint {path} does not fit model {self.config.model.name!r}: "
                              + " ".join(str(err).split())[:1500]) from None
        trainer_state = dict(client_state["trainer"])
        saved = self.saved_layout or layout_of(client_state, client_state.get("config"))
        trainer_state["epoch_sample"] = epoch_position(trainer_state, saved)
        trainer_state.pop("next_batch", None)  # older checkpoints counted micro-batches per rank
        self.state = TrainState(**trainer_state)
        self.state.restarts += 1
        if self.ema is not None and "ema" in client_state:
            self.ema.load_state_dict(client_state["ema"])
        rank_state = self.checkpoints.load_rank_state(path)
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        self.checkpoints.resumed_from = path
        self._saved = (self.state.global_step, path)  # this step's checkpoint: a stop right away saves nothing new
        log.info("resumed from %s: step %d, epoch %d, sample %d of %d (restart %d)%s", path, self.state.global_step,
                 self.state.epoch, self.state.epoch_sample, self.epoch_samples, self.state.restarts,
                 f"; {self.resize_note}" if self.resize_note else "")

    # ------------------------------------------------------------------ public API
    def request_stop(self) -> None:
        """Ask every rank to stop at the next step boundary with a checkpoint (what StopSignals calls)."""
        self._stop_requested = True

    def lr_at(self, step: int) -> float:
        schedule = self.config.schedule
        return lr_at_step(step, peak_lr=self.peak_lr, total_steps=self.total_steps,
                          steps_per_epoch=self.steps_per_epoch, name=schedule.name,
                          warmup_epochs=schedule.warmup_epochs, warmup_start_ratio=schedule.warmup_start_ratio,
                          min_lr_ratio=schedule.min_lr_ratio, step_epochs=schedule.step_epochs,
                          step_gamma=schedule.step_gamma, peak_epoch=schedule.peak_epoch)

    def train(self) -> TrainResult:
        """Train to the last step; returns the result (status "finished", or "stopped" for a stop a caller
        asked for, e.g. Slurm's USR2 through StopSignals("slurm")).

        Ctrl-C or SIGTERM: every rank stops at the next step boundary, the checkpoint of that step is
        saved, the ledger records the stop, and this raises `Interrupted` (a KeyboardInterrupt) with
        `.step` and `.checkpoint`; a second Ctrl-C raises `Aborted` at once. Unless a caller attached
        its own StopSignals, the handlers are installed for the duration of the call (main thread only)
        and the previous ones put back after.
        """
        own = None
        if self.stop_signals is None and threading.current_thread() is threading.main_thread():
            own = StopSignals("local").install()
            own.attach(self)
        try:
            self._arm_watchdog()
            result = self._train()
        finally:
            self._disarm_watchdog()
            if own is not None:
                own.restore()
                self.stop_signals = None
        signals = own or self.stop_signals
        if result.status == "stopped" and signals is not None and signals.mode == "local":
            if self.dist.is_main:
                self._write_ledger(self.ledger.append, {
                    "event": "stop", "kind": "interrupt", "signal": signals.signal_name, "step": result.global_step,
                    "checkpoint": str(result.checkpoint) if result.checkpoint else None, "requeue": False})
            raise Interrupted(result.global_step, result.checkpoint, signals.signal_name)
        return result

    def _arm_watchdog(self) -> None:
        """From the first step on, a rank that finishes no step or collective for parallel.hang_timeout_s
        is hung (start-up is bounded by the collective timeout, twice that and at least 10 minutes).

        Only in a launched job (a process group: torchrun, Slurm, submitit), where exiting 1 is the
        crash path that restarts it; one plain process (a notebook) has no peer to hang on and nothing
        to restart it, and ending it would only lose the session."""
        timeout = hang_timeout_for(self.config.parallel.hang_timeout_s, self.device.type)
        if timeout > 0 and self.watchdog is None and self.dist.backend is not None:
            self.watchdog = HangWatchdog(self.run_dir, self.dist.rank, self.dist.world_size, timeout,
                                         device_type=self.device.type).start(self.state.global_step)

    def _disarm_watchdog(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None

    def _mark_progress(self, waiting: str | None = None) -> None:
        """A step or collective finished; `waiting`: what this rank is about to wait in."""
        if self.watchdog is not None:
            self.watchdog.progress(self.state.global_step)
            if waiting is not None:
                self.watchdog.waiting(waiting)

    def _train(self) -> TrainResult:
        config, state = self.config, self.state
        final_eval = None
        if state.global_step >= self.total_steps:
            log.info("nothing to do: step %d of %d already reached", state.global_step, self.total_steps)
            return TrainResult("finished", state.global_step, self.evaluate(), self.run_dir)
        self.metrics.scalars(state.global_step, {"job/restarts": state.restarts, **self._fault_totals()}, kind="job")
        self.engine.train()
        if self._stop_agreed():  # asked for while the Trainer was built: no step is started
            return self._stopped()
        while state.global_step < self.total_steps:
            status = self._train_epoch()
            if status == "stopped":
                return self._stopped()
            if status != "epoch_done":
                return TrainResult(status, state.global_step, None, self.run_dir)
            finished = state.global_step >= self.total_steps
            if finished or (state.epoch % config.train.eval_every == 0):
                final_eval = self.evaluate()
            if config.checkpoint.at_epoch_end or finished:
                self.save_checkpoint()
            if not finished and self._stop_agreed():  # asked for during the evaluation
                return self._stopped()
        self.metrics.flush()
        return TrainResult("finished", state.global_step, final_eval, self.run_dir)

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it at the same point)."""
        return dist_utils.all_reduce_flag(self._stop_requested)

    def _stopped(self) -> TrainResult:
        """Every stop ends here: the checkpoint of the current step (saved unless it exists)."""
        checkpoint = self.save_checkpoint() if self.state.global_step > 0 else None
        self.metrics.flush()
        return TrainResult("stopped", self.state.global_step, None, self.run_dir, checkpoint)

    # ------------------------------------------------------------------ one epoch
    def _train_epoch(self) -> str:
        config, state = self.config, self.state
        micro_batch_samples = config.data.batch_size * self.dist.world_size  # one micro-batch of every rank
        progress = self._progress_bar(state.epoch, state.epoch_sample // self.global_batch)
        throughput = Throughput()
        loss_sum = torch.zeros((), device=self.device)
        correct_sum = torch.zeros((), device=self.device)
        seen = 0
        waiting_since = time.perf_counter()
        stop_seen = save_seen = False
        for images, labels in self.train_loader.batches(state.epoch, state.epoch_sample):
            if state.epoch_sample >= self.epoch_samples:  # the loader's last partial accumulation window
                break
            data_wait = time.perf_counter() - waiting_since
            if state.global_step == 0 and state.epoch_sample == 0 and config.logging.image_grid:
                self.metrics.images(0, "train/input_batch", images, config.data.mean, config.data.std)
            lr = self.lr_at(state.global_step)
            self.engine.set_lr(lr)
            logs_this_step = (state.global_step + 1) % config.logging.every_steps == 0
            self._record_branch_norms(logs_this_step)
            loss, logits = self._forward_loss(images, labels)
            if self.watchdog is not None:  # backward holds DDP's gradient all-reduce, then the flags'
                self.watchdog.waiting("backward and all-reduce")
            self.engine.backward(loss)
            # One collective per micro-batch carries both flags, so the ranks agree on skipping
            # a non-finite micro-batch (its gradients go with the window, never applied) and on
            # stopping at the next boundary. It waits for backward, not between forward and
            # backward: a host sync there left the GPU idle while backward was launched; here, on
            # the accumulation boundary, step() reads the gradient norm (a sync) anyway.
            # The third flag: some rank's clock says a time-based save is due. Clocks differ; the sum
            # makes every rank save at the same step boundary.
            flags = torch.stack([torch.isfinite(loss.detach()).logical_not().float(),
                                 torch.full((), float(self._stop_requested), device=self.device),
                                 torch.full((), float(self._save_due()), device=self.device)])
            nonfinite, stop_flag, save_flag = (dist_utils.all_reduce_sum(flags) > 0).tolist()
            self._mark_progress()
            stop_seen = stop_seen or stop_flag
            save_seen = save_seen or save_flag
            state.epoch_sample += micro_batch_samples
            if nonfinite:
                if config.train.nonfinite == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss at step {state.global_step} (epoch {state.epoch}, batch "
                        f"{state.epoch_sample // micro_batch_samples - 1}); the last good checkpoint is kept in "
                        f"{self.checkpoints.root}")
                log.warning("non-finite loss at step %d: skipping this micro-batch", state.global_step)
                state.skipped_steps += 1
                self.engine.zero_grad()
                waiting_since = time.perf_counter()
                continue
            result = self.engine.step()
            loss_sum += loss.detach().float()
            correct_sum += (logits.detach().argmax(1) == labels).sum()
            seen += labels.shape[0]
            throughput.add(labels.shape[0], data_wait)
            if result.applied:
                state.global_step += 1
                self._mark_progress()
                self.engine.zero_grad()
                if self.ema is not None:
                    self.ema.update(self.engine.module)
                progress.update(1)
                if state.global_step % config.logging.every_steps == 0 or state.global_step == self.total_steps:
                    self._log_train(loss_sum, correct_sum, seen, lr, result, throughput, progress)
                    loss_sum.zero_(), correct_sum.zero_()
                    seen = 0
                epoch_ends = state.epoch_sample >= self.epoch_samples
                periodic = config.checkpoint.every_steps and state.global_step % config.checkpoint.every_steps == 0
                if (periodic or save_seen) and not (epoch_ends and config.checkpoint.at_epoch_end):  # that save comes next
                    self.save_checkpoint()
                save_seen = False
                if stop_seen:
                    progress.close()
                    log.warning("stop requested: saving a checkpoint at step %d and exiting", state.global_step)
                    return "stopped"
                if state.global_step >= self.total_steps:
                    break
            waiting_since = time.perf_counter()
        else:  # the loader has nothing more this epoch
            state.epoch_sample = max(state.epoch_sample, self.epoch_samples)
        progress.close()
        if state.epoch_sample >= self.epoch_samples:  # not when max_steps ended the run mid-epoch
            state.epoch += 1
            state.epoch_sample = 0
        return "epoch_done"

    def _forward_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        micro_batch = self.state.epoch_sample // (config.data.batch_size * self.dist.world_size)
        generator = mix_generator(config.train.seed, self.dist.rank, self.state.epoch, micro_batch)
        images, targets = mix_batch(images, labels, config.model.num_classes, mixup_alpha=config.train.mixup_alpha,
                                    cutmix_alpha=config.train.cutmix_alpha, mix_prob=config.train.mix_prob,
                                    label_smoothing=config.train.label_smoothing, generator=generator)
        logits = self.engine.forward(images)
        return self.criterion(logits, targets), logits

    def _log_train(self, loss_sum, correct_sum, seen, lr, result, throughput, progress) -> None:
        config, state = self.config, self.state
        totals = dist_utils.all_reduce_sum(torch.stack([loss_sum, correct_sum, torch.tensor(float(seen), device=self.device)]))
        micro_batches = max(float(totals[2]) / config.data.batch_size, 1.0)
        values = {
            "train/loss": float(totals[0]) / micro_batches,
            "train/top1": float(totals[1]) / max(float(totals[2]), 1.0),
            "train/lr": lr,
            "train/grad_norm": result.grad_norm,
            "train/loss_scale": result.loss_scale,
            "train/memory_gib": memory_gib(self.device),
            "train/epoch": state.global_step / self.steps_per_epoch,
            "train/skipped_steps": state.skipped_steps,
        }
        values.update(throughput.report(self.dist.world_size))
        values.update(self._branch_ratios())
        self.metrics.scalars(state.global_step, values)
        every = config.logging.histograms_every
        if every and state.global_step % every == 0:
            self.metrics.histograms(state.global_step, {
                f"rkan/{name}": parameter for name, parameter in self.engine.module.named_parameters()
                if name.endswith("poly_weight")})
        progress.set_postfix(loss=f"{values['train/loss']:.3f}", lr=f"{lr:.3g}",
                             img_s=f"{values['train/images_per_s']:.0f}", refresh=False)

    def _record_branch_norms(self, enabled: bool) -> None:
        """Norms cost a reduction per stage, so the stages record them only on logging steps."""
        for stage in self._rkan_stages.values():
            stage.record_norms = enabled

    def _branch_ratios(self) -> dict[str, float]:
        """||RKAN branch output|| / ||stage output|| per augmented stage, from the last forward."""
        ratios = {}
        for name, stage in self._rkan_stages.items():
            branch, output = getattr(stage, "last_branch_norm", None), getattr(stage, "last_stage_norm", None)
            if branch is not None and output is not None:
                ratios[f"rkan/{name}/branch_ratio"] = float(branch) / max(float(output), 1e-12)
        return ratios

    def _progress_bar(self, epoch: int, initial: int):
        if self.dist.is_main and self.config.logging.progress_bar:
            from tqdm import tqdm

            return tqdm(total=self.steps_per_epoch, initial=initial, desc=f"epoch {epoch}", unit="step",
                        dynamic_ncols=True, leave=False)
        return _NullProgress()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1/top-5/loss over the whole val set, exact across ranks (and of the EMA weights)."""
        flip_tta = self.config.train.flip_tta
        self._mark_progress()
        dist_utils.broadcast_buffers(self.engine.module)  # evaluate the model the checkpoint holds: rank 0's
        self.engine.eval()
        results = {f"eval/{k}": v for k, v in
                   evaluate_loader(self._eval_batches(self.engine.forward), self.val_loader, self.device,
                                   flip_tta).items()}
        if self.ema is not None:
            ema_forward = forward_in_precision(self.ema.module, self.config.train.precision, self.device)
            results.update({f"eval_ema/{k}": v for k, v in
                            evaluate_loader(self._eval_batches(ema_forward), self.val_loader, self.device,
                                            flip_tta).items()})
        self._mark_progress()
        self.engine.train()
        self.metrics.scalars(self.state.global_step, results, kind="eval")
        self.metrics.flush()
        log.info("eval at step %d (epoch %d): %s", self.state.global_step, self.state.epoch, format_summary(results))
        return results

    def _eval_batches(self, forward):
        """`forward` that marks progress at every evaluation batch (no collective in between)."""
        if self.watchdog is None:
            return forward

        def forward_with_progress(images):
            self._mark_progress()
            return forward(images)

        return forward_with_progress

    # ------------------------------------------------------------------ checkpoints
    def _save_due(self) -> bool:
        minutes = self.config.checkpoint.every_minutes
        return minutes > 0 and time.monotonic() - self._last_save >= 60 * minutes

    def save_checkpoint(self) -> Path:
        """Save the current step once: a last step that is also a periodic (or stop) checkpoint step
        reaches here twice, from the step loop and from the end of the run, with the same weights."""
        if self._saved is not None and self._saved[0] == self.state.global_step:
            return self._saved[1]
        client_state = {
            "trainer": dict(vars(self.state)),
            "config": config_to_dict(self.config),
            "version": __version__,
            "world_size": self.dist.world_size,
            "backend": self.config.parallel.backend,
            "data_seed": self.config.train.seed,
        }
        if self.ema is not None:
            client_state["ema"] = self.ema.state_dict()
        self._mark_progress("checkpoint save")  # a save must take less than parallel.hang_timeout_s
        try:
            path = self.checkpoints.save(self.state.global_step, self.engine, client_state, {"rng": rng_state()})
            self._last_save = time.monotonic()
            self._mark_progress()
        except CheckpointSaveError as err:  # every rank raises it; the crash path takes over from here
            if self.dist.is_main:
                self._write_ledger(self.ledger.record_failure, "save", err.rank, self.state.global_step,
                                   error=str(err))
            raise
        self.metrics.scalars(self.state.global_step, {"checkpoint/save_seconds": self.checkpoints.last_save_seconds},
                             kind="checkpoint")
        self._saved = (self.state.global_step, path)
        return path

    def _write_ledger(self, record, *args: Any, **kwargs: Any) -> None:
        """A ledger entry that cannot be written (the disk that refused a checkpoint) is logged, not raised."""
        try:
            record(*args, **kwargs)
        except OSError as err:
            log.warning("could not write %s (%s): %s", self.ledger.path, err.strerror or err, args[:3])

    def _fault_totals(self) -> dict[str, float]:
        """job/failures and job/lost_seconds from the ledger (rank 0 logs metrics)."""
        if not self.dist.is_main:
            return {}
        try:
            totals = ledger_summary(self.ledger.read())
        except (OSError, ValueError) as err:
            log.warning("could not read %s: %s", self.ledger.path, err)
            return {}
        return {"job/failures": sum(totals["failures"].values()), "job/lost_seconds": totals["lost_seconds"]}

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._disarm_watchdog()
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()
        # A live DDP or DeepSpeed engine keeps the gloo process group, and gloo's worker threads,
        # alive past destroy_process_group; an engine torn down during interpreter finalization
        # now and then aborts the finished process ("terminate called without an active
        # exception": a Slurm task failing after "Job completed successfully"). Dropping the
        # components first frees them here, and destroy_process_group then joins gloo's threads
        # (DDP: all of them; DeepSpeed: torch keeps one group's).
        for name in ("engine", "ema", "_rkan_stages", "train_loader", "val_loader"):
            self.__dict__.pop(name, None)
        gc.collect()
        dist_utils.shutdown()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _NullProgress:
    def update(self, *_: Any) -> None: ...
    def set_postfix(self, *_: Any, **__: Any) -> None: ...
    def close(self) -> None: ...

