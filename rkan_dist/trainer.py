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
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rkan_dist import __version__
from rkan_dist import distributed as dist_utils
from rkan_dist.checkpoint import CheckpointManager, CheckpointSaveError, checkpoint_time
from rkan_dist.config import Config, ConfigError, config_to_dict, save_config
from rkan_dist.evaluate import evaluate_loader, forward_in_precision
from rkan_dist.faults import Interrupted, NonFiniteLossError
from rkan_dist.ledger import TrainingLedger, restart_count
from rkan_dist.log import setup_logging
from rkan_dist.metrics import EpochLog, MetricsLogger, format_summary, memory_gib
from rkan_dist.models.kan_conv import shared_choices
from rkan_dist.optim import ModelEma, build_optimizer, mix_batch, mix_generator, soft_cross_entropy
from rkan_dist.precision import resolve_precision, separate_inductor_cache_per_cpu, slow_precision_warning
from rkan_dist.resume import load_engine_state, plan_resume, resume_point, resumed_trainer_state
from rkan_dist.rng import rng_state, seed_everything, set_rng_state
from rkan_dist.run_summary import write_summary
from rkan_dist.schedules import lr_at_step, scaled_lr
from rkan_dist.stops import StopSignals
from rkan_dist.threads import configure_threads
from rkan_dist.watchdog import HangWatch
from rkan_dist.weights import checkpoint_config

log = logging.getLogger(__name__)


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


class Trainer:
    """Build with a validated Config; use as a context manager (or call close())."""

    def __init__(self, config: Config):
        self.config = config
        self.dist = dist_utils.init(config.train.device, config.parallel.hang_timeout_s)
        self._closed = False
        self.hang_watch = HangWatch()  # armed while train() runs (rkan_dist.watchdog)
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
        self.config = config = self._resolve_precision(config)
        if config.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # Shapes are static within an epoch (fixed batch, one resolution per epoch): cuDNN's
        # autotuner times each convolution once per shape and keeps the fastest kernel. Its choice
        # may vary between runs, so not for deterministic runs.
        torch.backends.cudnn.benchmark = not config.train.deterministic
        seed_everything(config.train.seed)  # same init on every rank (DDP also broadcasts it)
        self.checkpoints = CheckpointManager(self.run_dir, config.checkpoint.keep, rank=dist.rank,
                                             world_size=dist.world_size)
        self.config = config = self._plan_resume(config)  # before the loaders and engine use the batch
        model, optimizer = self._build_model(config)
        self._build_loaders(config)
        self._build_engine(config, model, optimizer)
        self.state = TrainState()
        self._resume()
        self.ledger = TrainingLedger(self.run_dir, writes=dist.is_main)
        self.ledger.record_start(self.state.global_step, dist.world_size, checkpoint_time(self.checkpoints.resumed_from))
        if dist.is_main:
            save_config(config, self.run_dir, notes=[f"train.precision: {config.train.precision} "
                                                     f"({self.precision_reason})"])
        self._open_metrics(config)

    def _resolve_precision(self, config: Config) -> Config:
        """train.precision=auto becomes the concrete precision here, so config.yaml, checkpoints and the
        logs all name the one trained in. A resumed run re-resolves `auto` from its recipe: moved to
        another machine it takes the precision that machine is fast at (DDP checkpoints hold fp32
        weights and optimizer state whatever the autocast precision)."""
        try:
            precision, self.precision_reason = resolve_precision(config.train.precision, self.device,
                                                                 config.parallel.backend)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        warning = slow_precision_warning(precision, self.device) if self.precision_reason.startswith("set") else None
        if warning and self.dist.is_main:
            log.warning(warning)
        return dataclasses.replace(config, train=dataclasses.replace(config.train, precision=precision))

    def _plan_resume(self, config: Config) -> Config:
        """Which checkpoint this start resumes (rkan_dist.resume), and `config` with its global batch."""
        checkpoint = resume_point(self.run_dir, config.train.resume, config.train.overwrite, restart_count(),
                                  self.checkpoints, is_main=self.dist.is_main, barrier=dist_utils.barrier)
        self.resume_plan = plan_resume(checkpoint, checkpoint_config(checkpoint) if checkpoint else None,
                                       self.dist.world_size, config.data.batch_size, config.train.grad_accum,
                                       is_main=self.dist.is_main)
        return self.resume_plan.apply(config)

    def _build_model(self, config: Config) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        from rkan_dist.models import build_model

        model = build_model(config.model)
        # channels_last on CUDA only, where it is measured to be fast. On CPU its gradients agree with
        # NCHW (float64: to 1e-14; fp32 differs by ~1e-3 only where a ReLU input is within rounding of
        # zero, see tests/unit/test_cuda_paths.py), but its speed there is unmeasured.
        self.channels_last = config.train.channels_last and self.device.type == "cuda"
        if config.train.channels_last and not self.channels_last:
            log.info("train.channels_last applies on CUDA only; %s runs NCHW", self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = model.to(self.device)
        return model, build_optimizer(model, config.optim)

    def _build_loaders(self, config: Config) -> None:
        """The loaders, and the run's length and batch in steps and samples."""
        from rkan_dist.data import build_loaders

        self.train_loader, self.val_loader = build_loaders(
            dataclasses.replace(config.data, num_workers=self.threads.data), seed=config.train.seed,
            device=self.device, channels_last=self.channels_last)
        accum = config.train.grad_accum
        self.steps_per_epoch = self.train_loader.steps_per_epoch // accum
        if self.steps_per_epoch < 1:
            raise ConfigError(f"an epoch has {self.train_loader.steps_per_epoch} batches per rank, fewer than "
                              f"train.grad_accum={accum}; lower data.batch_size or train.grad_accum")
        self.total_steps = config.train.max_steps or config.train.max_epochs * self.steps_per_epoch
        self.micro_batch_samples = config.data.batch_size * self.dist.world_size  # one micro-batch of every rank
        self.global_batch = self.micro_batch_samples * accum
        self.epoch_samples = self.steps_per_epoch * self.global_batch  # whole steps; see sampling.epoch_samples
        self.peak_lr = scaled_lr(config.optim.lr, self.global_batch, config.optim.scale_lr)

    def _build_engine(self, config: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from rkan_dist.models.rkan import BranchTelemetry
        from rkan_dist.parallel import wrap

        self.engine = wrap(model, optimizer, parallel_config=config.parallel, precision=config.train.precision,
                           grad_accum=config.train.grad_accum, grad_clip=config.train.grad_clip, device=self.device,
                           dist_info=self.dist, micro_batch_size=config.data.batch_size)
        if config.train.compile:
            if self.device.type == "cpu":
                separate_inductor_cache_per_cpu()
            self.engine.module.compile()
        self.rkan = BranchTelemetry(self.engine.module)
        self.ema = ModelEma(self.engine.module, config.train.ema_decay) if config.train.ema_decay > 0 else None
        self.criterion = soft_cross_entropy

    def _resume(self) -> None:
        path = self.resume_plan.checkpoint
        if path is None:
            return
        client_state = load_engine_state(self.engine, path, self.config.model.name)
        self.state = TrainState(**resumed_trainer_state(client_state, self.resume_plan.saved))
        self.state.restarts += 1
        if self.ema is not None and "ema" in client_state:
            self.ema.load_state_dict(client_state["ema"])
        rank_state = self.checkpoints.load_rank_state(path)
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        self.checkpoints.resumed_from = path
        self._saved = (self.state.global_step, path)  # this step's checkpoint: a stop right away saves nothing new
        note = self.resume_plan.note
        log.info("resumed from %s: step %d, epoch %d, sample %d of %d (restart %d)%s", path, self.state.global_step,
                 self.state.epoch, self.state.epoch_sample, self.epoch_samples, self.state.restarts,
                 f"; {note}" if note else "")

    def _open_metrics(self, config: Config) -> None:
        # A resumed run's first new step is global_step + 1: what the killed run logged after its
        # checkpoint (from there on) is dropped, what it logged up to the checkpoint stays.
        first_new_step = self.state.global_step + 1 if self.state.global_step > 0 else 0
        self.metrics = MetricsLogger(self.run_dir, enabled=self.dist.is_main, tensorboard=config.logging.tensorboard,
                                     start_step=first_new_step)
        parameters = list(self.engine.module.parameters())
        precision = config.train.precision
        self.metrics.text(first_new_step, "run/precision", f"{precision} ({self.precision_reason})")
        log.info("model %s: %.2fM parameters (%.2fM trainable); %d steps (%d per epoch), global batch %d, peak lr "
                 "%.4g, %s, precision %s (%s), world size %d on %s", config.model.name, sum(p.numel() for p in parameters) / 1e6,
                 sum(p.numel() for p in parameters if p.requires_grad) / 1e6, self.total_steps,
                 self.steps_per_epoch, self.global_batch, self.peak_lr, config.parallel.backend,
                 precision, self.precision_reason, self.dist.world_size, self.device)

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
            self.hang_watch.arm(self.run_dir, self.dist.rank, self.dist.world_size, self.config.parallel.hang_timeout_s,
                                self.device.type, self.state.global_step, launched=self.dist.backend is not None,
                                module=self.engine.module, sync_bn=self.config.parallel.sync_bn,
                                straggler_threshold=self.config.parallel.straggler_threshold)
            result = self._train()
        finally:
            self.hang_watch.disarm()
            if own is not None:
                own.restore()
                self.stop_signals = None
        write_summary(self, result)  # rank 0: <run_dir>/summary.json, what `rkan-dist compare` reads
        signals = own or self.stop_signals
        if result.status == "stopped" and signals is not None and signals.mode == "local":
            self.ledger.record_interrupt(signals.signal_name, result.global_step, result.checkpoint)
            raise Interrupted(result.global_step, result.checkpoint, signals.signal_name)
        return result

    def _train(self) -> TrainResult:
        config, state = self.config, self.state
        final_eval = None
        if state.global_step >= self.total_steps:
            log.info("nothing to do: step %d of %d already reached", state.global_step, self.total_steps)
            return TrainResult("finished", state.global_step, self.evaluate(), self.run_dir)
        self.metrics.scalars(state.global_step, {"job/restarts": state.restarts, **self.ledger.fault_totals()}, kind="job")
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
        state = self.state
        epoch_log = EpochLog(self.device, show_bar=self.dist.is_main and self.config.logging.progress_bar,
                             steps=self.steps_per_epoch, done=state.epoch_sample // self.global_batch, epoch=state.epoch)
        waiting_since = time.perf_counter()
        stop_seen = save_seen = False
        for images, labels in self.train_loader.batches(state.epoch, state.epoch_sample):
            if state.epoch_sample >= self.epoch_samples:  # the loader's last partial accumulation window
                break
            data_wait = time.perf_counter() - waiting_since
            lr, loss, logits = self._micro_batch(images, labels)
            nonfinite, stop_flag, save_flag = self._agree(loss)
            stop_seen = stop_seen or stop_flag
            save_seen = save_seen or save_flag
            state.epoch_sample += self.micro_batch_samples
            if nonfinite:
                self._skip_micro_batch()
                waiting_since = time.perf_counter()
                continue
            result = self.engine.step()
            epoch_log.add(loss, logits, labels, data_wait)
            if result.applied:
                self._after_optimizer_step(lr, result, epoch_log, save_due=save_seen)
                save_seen = False
                if stop_seen:
                    epoch_log.bar.close()
                    log.warning("stop requested: saving a checkpoint at step %d and exiting", state.global_step)
                    return "stopped"
                if state.global_step >= self.total_steps:
                    break
            waiting_since = time.perf_counter()
        else:  # the loader has nothing more this epoch
            state.epoch_sample = max(state.epoch_sample, self.epoch_samples)
        epoch_log.bar.close()
        if state.epoch_sample >= self.epoch_samples:  # not when max_steps ended the run mid-epoch
            state.epoch += 1
            state.epoch_sample = 0
        return "epoch_done"

    def _micro_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Forward and backward of one micro-batch at the step's lr; (lr, loss, logits)."""
        config, state = self.config, self.state
        if state.global_step == 0 and state.epoch_sample == 0 and config.logging.image_grid:
            self.metrics.images(0, "train/input_batch", images, config.data.mean, config.data.std)
        lr = self.lr_at(state.global_step)
        self.engine.set_lr(lr)
        self.rkan.record_norms((state.global_step + 1) % config.logging.every_steps == 0)
        loss, logits = self._forward_loss(images, labels)
        self.hang_watch.waiting("backward and all-reduce")  # DDP's gradient all-reduce, then the flags'
        self.engine.backward(loss)
        return lr, loss, logits

    def _agree(self, loss: torch.Tensor) -> tuple[bool, bool, bool]:
        """(non-finite loss, stop requested, save due) on any rank: one collective per micro-batch.

        The ranks agree on skipping a non-finite micro-batch (its gradients go with the window,
        never applied) and on stopping at the next boundary. It waits for backward, not between
        forward and backward: a host sync there leaves the GPU idle while backward is launched;
        here, on the accumulation boundary, step() reads the gradient norm (a sync) anyway. Save
        due: some rank's clock says a time-based save is due; clocks differ, and the sum makes
        every rank save at the same step boundary."""
        flags = torch.stack([torch.isfinite(loss.detach()).logical_not().float(),
                             torch.full((), float(self._stop_requested), device=self.device),
                             torch.full((), float(self._save_due()), device=self.device)])
        nonfinite, stop_flag, save_flag = (dist_utils.all_reduce_sum(flags) > 0).tolist()
        self.hang_watch.progress(self.state.global_step)
        return nonfinite, stop_flag, save_flag

    def _skip_micro_batch(self) -> None:
        """A non-finite loss on some rank: stop (train.nonfinite=stop) or drop its accumulation window."""
        state = self.state
        if self.config.train.nonfinite == "stop":
            raise NonFiniteLossError(
                f"non-finite loss at step {state.global_step} (epoch {state.epoch}, batch "
                f"{state.epoch_sample // self.micro_batch_samples - 1}); the last good checkpoint is kept in "
                f"{self.checkpoints.root}")
        log.warning("non-finite loss at step %d: skipping this micro-batch", state.global_step)
        state.skipped_steps += 1
        self.engine.zero_grad()

    def _after_optimizer_step(self, lr: float, result, epoch_log: EpochLog, *, save_due: bool) -> None:
        """Count the step, update the EMA, log on logging steps, save on checkpoint steps."""
        config, state = self.config, self.state
        state.global_step += 1
        self.hang_watch.progress(state.global_step)
        self.engine.zero_grad()
        if self.ema is not None:
            self.ema.update(self.engine.module)
        epoch_log.bar.update(1)
        if state.global_step % config.logging.every_steps == 0 or state.global_step == self.total_steps:
            self._log_train(lr, result, epoch_log)
        epoch_ends = state.epoch_sample >= self.epoch_samples
        periodic = config.checkpoint.every_steps and state.global_step % config.checkpoint.every_steps == 0
        if (periodic or save_due) and not (epoch_ends and config.checkpoint.at_epoch_end):  # that save comes next
            self.save_checkpoint()

    def _forward_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixing's randomness is derived from (seed, rank, epoch, micro-batch), not drawn from a stream a
        restart would lose, so a resumed run mixes as if it had never stopped."""
        config = self.config
        micro_batch = self.state.epoch_sample // self.micro_batch_samples
        generator = mix_generator(config.train.seed, self.dist.rank, self.state.epoch, micro_batch)
        images, targets = mix_batch(images, labels, config.model.num_classes, mixup_alpha=config.train.mixup_alpha,
                                    cutmix_alpha=config.train.cutmix_alpha, mix_prob=config.train.mix_prob,
                                    label_smoothing=config.train.label_smoothing, generator=generator)
        with shared_choices():  # every rank runs this forward, same layers and shapes: see kan_conv
            logits = self.engine.forward(images)
        return self.criterion(logits, targets), logits

    def _log_train(self, lr: float, result, epoch_log: EpochLog) -> None:
        config, state = self.config, self.state
        summed = dist_utils.all_reduce_sum(epoch_log.totals())
        values = {
            **epoch_log.report(summed, config.data.batch_size),  # train/loss, train/top1
            "train/lr": lr,
            "train/grad_norm": result.grad_norm,
            "train/loss_scale": result.loss_scale,
            "train/memory_gib": memory_gib(self.device),
            "train/epoch": state.global_step / self.steps_per_epoch,
            "train/skipped_steps": state.skipped_steps,
            **epoch_log.throughput.report(self.dist.world_size),
            **self.rkan.branch_ratios(),
            **self.hang_watch.rank_scores(),  # ranks/slowest_score and _rank: rank 0's, from the heartbeats
        }
        self.metrics.scalars(state.global_step, values)
        every = config.logging.histograms_every
        if every and state.global_step % every == 0:
            self.metrics.histograms(state.global_step, self.rkan.poly_weights())
        epoch_log.show(values)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1/top-5/loss over the whole val set, exact across ranks (and of the EMA weights)."""
        flip_tta, step = self.config.train.flip_tta, self.state.global_step
        self.hang_watch.progress(step)
        dist_utils.broadcast_buffers(self.engine.module)  # evaluate the model the checkpoint holds: rank 0's
        self.engine.eval()
        results = {f"eval/{k}": v for k, v in
                   evaluate_loader(self.hang_watch.each_call(self.engine.forward, step), self.val_loader,
                                   self.device, flip_tta).items()}
        if self.ema is not None:
            ema_forward = forward_in_precision(self.ema.module, self.config.train.precision, self.device)
            results.update({f"eval_ema/{k}": v for k, v in
                            evaluate_loader(self.hang_watch.each_call(ema_forward, step), self.val_loader,
                                            self.device, flip_tta).items()})
        self.hang_watch.progress(step)
        self.engine.train()
        self.metrics.scalars(step, results, kind="eval")
        self.metrics.flush()
        log.info("eval at step %d (epoch %d): %s", step, self.state.epoch, format_summary(results))
        return results

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
        # a save must take less than parallel.hang_timeout_s
        self.hang_watch.progress(self.state.global_step, waiting="checkpoint save")
        try:
            path = self.checkpoints.save(self.state.global_step, self.engine, client_state, {"rng": rng_state()})
            self._last_save = time.monotonic()
            self.hang_watch.progress(self.state.global_step)
        except CheckpointSaveError as err:  # every rank raises it; the crash path takes over from here
            self.ledger.record_save_failure(err.rank, self.state.global_step, str(err))
            raise
        self.metrics.scalars(self.state.global_step, {"checkpoint/save_seconds": self.checkpoints.last_save_seconds},
                             kind="checkpoint")
        self._saved = (self.state.global_step, path)
        return path

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.hang_watch.disarm()
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()
        # A live DDP or DeepSpeed engine keeps the gloo process group, and gloo's worker threads,
        # alive past destroy_process_group; an engine torn down during interpreter finalization
        # now and then aborts the finished process ("terminate called without an active
        # exception": a Slurm task failing after "Job completed successfully"). Dropping the
        # components first frees them here, and destroy_process_group then joins gloo's threads
        # (DDP: all of them; DeepSpeed: torch keeps one group's).
        for name in ("engine", "ema", "rkan", "train_loader", "val_loader"):
            self.__dict__.pop(name, None)
        gc.collect()
        dist_utils.shutdown()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

