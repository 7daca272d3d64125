"""Run configuration: one dataclass per section, YAML + dotted overrides, validated in one place.

OmegaConf does the plumbing (YAML, merging, dotted overrides, type checks against the
dataclasses); this module turns its exceptions into one-line `ConfigError`s that name the bad
key and suggest the closest valid one. Range checks live in each section's `__post_init__`,
which runs when the merged config is turned back into dataclass instances.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from rkan_dist.faults import ConfigError  # noqa: F401 - the error this module raises, defined with the other outcomes
from rkan_dist.names import AGGREGATIONS, is_weights_name, list_models


def doc(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best at the call sites
    """A dataclass field with its one-line documentation kept next to the default."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(section: str, name: str, value: Any, choices: tuple) -> None:
    _require(value in choices, f"{section}.{name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


@dataclass
class ModelConfig:
    name: str = doc("rkan_resnet50", "registry name: a torchvision backbone (resnet50, regnet_y_800mf, ...) or it with the prefix rkan_")
    num_classes: int = doc(1000, "number of output classes")
    rkan_stages: list[int] = doc([4], "backbone stages (1-4) that get an RKAN branch in parallel")
    reduce_factor: int = doc(2, "bottleneck width C_mid = C_in // reduce_factor")
    inverse_bottleneck: bool = doc(False, "widen instead: C_mid = C_in * inv_factor (the paper's 2xL/4xL/6xL variants)")
    inv_factor: int = doc(4, "widening factor used when inverse_bottleneck is true (the authors' default 4)")
    aggregation: Any = doc("addition", "how the branch r joins the stage output y: one name, or a list with "
                           "one per entry of rkan_stages (same order): " + " | ".join(AGGREGATIONS))
    degree: int = doc(3, "polynomial degree of the first KAN convolution of each block")
    n_convs: int = doc(1, "number of KAN kernels in the first KAN convolution (outputs concatenated)")
    polynomial: str = doc("chebyshev", "polynomial family: chebyshev | legendre | hermite | jacobi")
    per_channel: bool = doc(False, "give every channel its own KAN function instead of one shared function")
    shortcut: bool = doc(False, "add a strided 1x1 conv + BN shortcut inside the RKAN branch")
    scaling: bool = doc(False, "multiply each branch output r by a learnable scalar (initialised to 1) before the aggregation")
    small_input: bool = doc(False, "for 32-64 px inputs: a 3x3 stride-1 stem without max-pool (RegNet: its stem conv at "
                            "stride 1); small_input_variant says whether stage 1 keeps its stride")
    small_input_variant: str = doc("stem", "with small_input: stem (only the stem changes) | stem_and_stage1 (also "
                                   "stride 1 in stage 1's first block, as the authors' RegNet; same as stem on ResNet)")
    freeze_backbone: bool = doc(False, "fine-tuning: only the RKAN branches and the classifier train; the backbone's "
                                "parameters are frozen and its BatchNorm layers stay in eval mode")
    pretrained: str = doc("", "start the backbone from: a torchvision state_dict file, or a torchvision weights name "
                          "(IMAGENET1K_V2, DEFAULT) read from torchvision's cache, never downloaded ('' = random init)")

    def __post_init__(self) -> None:
        _require(self.num_classes >= 2, f"model.num_classes must be >= 2, got {self.num_classes}")
        _require(len(self.rkan_stages) == len(set(self.rkan_stages)), f"model.rkan_stages has duplicates: {self.rkan_stages}")
        for stage in self.rkan_stages:
            _require(1 <= stage <= 4, f"model.rkan_stages entries must be in 1..4, got {stage}")
        _require(self.reduce_factor >= 1, f"model.reduce_factor must be >= 1, got {self.reduce_factor}")
        _require(self.inv_factor >= 1, f"model.inv_factor must be >= 1, got {self.inv_factor}")
        _require(0 <= self.degree <= 8, f"model.degree must be in 0..8, got {self.degree}")
        _require(1 <= self.n_convs <= 8, f"model.n_convs must be in 1..8, got {self.n_convs}")
        names = self.aggregation if isinstance(self.aggregation, list | tuple) else [self.aggregation]
        _require(all(isinstance(name, str) for name in names),
                 f"model.aggregation must be a name or a list of names, got {self.aggregation!r}")
        for name in names:
            _one_of("model", "aggregation", name, AGGREGATIONS)
        if isinstance(self.aggregation, list | tuple):
            self.aggregation = list(self.aggregation)
            _require(len(self.aggregation) == len(self.rkan_stages),
                     f"model.aggregation lists {len(self.aggregation)} names for {len(self.rkan_stages)} rkan_stages "
                     f"{self.rkan_stages}: give one name, or one per stage")
        _one_of("model", "polynomial", self.polynomial, ("chebyshev", "legendre", "hermite", "jacobi"))
        _one_of("model", "small_input_variant", self.small_input_variant, ("stem", "stem_and_stage1"))
        if self.pretrained:
            _require(Path(self.pretrained).is_file() or is_weights_name(self.pretrained),
                     f"model.pretrained: no such file {self.pretrained!r} (nor a torchvision weights name such as IMAGENET1K_V2)")


@dataclass
class DataConfig:
    dataset: str = doc("files", "'files' reads train_path/val_path; 'digits' uses the embedded scikit-learn digits (written on first use)")
    format: str = doc("ffcv", "loader: ffcv (.beton files) | folder (torchvision ImageFolder trees)")
    train_path: str = doc("", "train .beton file (format=ffcv) or ImageFolder root (format=folder)")
    val_path: str = doc("", "val .beton file (format=ffcv) or ImageFolder root (format=folder)")
    cache_dir: str = doc("~/.cache/rkan-dist", "where the embedded demo dataset is written")
    batch_size: int = doc(256, "train images per process per step (global batch = batch_size * world_size * grad_accum)")
    val_batch_size: int = doc(256, "val images per process per step")
    num_workers: int = doc(8, "decoding threads (FFCV) or worker processes (folder) per process")
    os_cache: bool = doc(False, "FFCV: read the .beton through the OS page cache (True when the file fits in RAM)")
    min_res: int = doc(224, "progressive resizing: train resolution at start_ramp_epoch and before")
    max_res: int = doc(224, "progressive resizing: train resolution at end_ramp_epoch and after")
    start_ramp_epoch: int = doc(0, "first epoch of the resolution ramp")
    end_ramp_epoch: int = doc(0, "epoch at which the ramp reaches max_res")
    val_res: int = doc(224, "val crop size in pixels")
    crop_ratio: float = doc(224 / 256, "val center-crop ratio (crop side / resized side)")
    min_crop_scale: float = doc(0.08, "random-resized-crop: smallest crop area as a fraction of the image")
    hflip: bool = doc(True, "random horizontal flip in training (off for digits and text)")
    mean: list[float] = doc([0.485, 0.456, 0.406], "per-channel mean (0-1 scale) for normalisation")
    std: list[float] = doc([0.229, 0.224, 0.225], "per-channel std (0-1 scale) for normalisation")

    def __post_init__(self) -> None:
        _one_of("data", "dataset", self.dataset, ("files", "digits"))
        _one_of("data", "format", self.format, ("ffcv", "folder"))
        for name in ("batch_size", "val_batch_size", "min_res", "max_res", "val_res"):
            _require(getattr(self, name) >= 1, f"data.{name} must be >= 1, got {getattr(self, name)}")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(self.min_res <= self.max_res, f"data.min_res ({self.min_res}) must be <= data.max_res ({self.max_res})")
        _require(self.start_ramp_epoch <= self.end_ramp_epoch,
                 f"data.start_ramp_epoch ({self.start_ramp_epoch}) must be <= data.end_ramp_epoch ({self.end_ramp_epoch})")
        _require(0.0 < self.crop_ratio <= 1.0, f"data.crop_ratio must be in (0, 1], got {self.crop_ratio}")
        _require(0.0 < self.min_crop_scale <= 1.0, f"data.min_crop_scale must be in (0, 1], got {self.min_crop_scale}")
        _require(len(self.mean) == 3 and len(self.std) == 3, "data.mean and data.std need 3 values each")


@dataclass
class OptimConfig:
    name: str = doc("sgd", "optimizer: sgd | adamw | lamb")
    lr: float = doc(0.5, "peak learning rate (per 256 images when scale_lr is true)")
    scale_lr: bool = doc(True, "multiply lr by global_batch / 256 (the linear scaling rule)")
    momentum: float = doc(0.9, "SGD momentum")
    nesterov: bool = doc(False, "SGD Nesterov momentum")
    betas: list[float] = doc([0.9, 0.999], "AdamW/LAMB betas")
    eps: float = doc(1e-8, "AdamW/LAMB epsilon")
    weight_decay: float = doc(5e-5, "weight decay")
    no_decay_bn_bias: bool = doc(True, "exclude BatchNorm parameters and biases from weight decay")

    def __post_init__(self) -> None:
        _one_of("optim", "name", self.name, ("sgd", "adamw", "lamb"))
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1), got {self.momentum}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"optim.betas must be two values in [0, 1), got {self.betas}")


@dataclass
class ScheduleConfig:
    name: str = doc("cosine", "lr schedule after warmup: cosine | step | onecycle | cyclic | constant")
    warmup_epochs: float = doc(0.0, "linear warmup from warmup_start_ratio * lr to lr over this many epochs")
    warmup_start_ratio: float = doc(0.0, "lr at step 0, as a fraction of the peak lr")
    min_lr_ratio: float = doc(0.0, "final lr of cosine/onecycle/cyclic, as a fraction of the peak lr")
    step_epochs: list[int] = doc([30, 60, 90], "step schedule: epochs at which lr is multiplied by step_gamma")
    step_gamma: float = doc(0.1, "step schedule: multiplier at each step epoch")
    peak_epoch: float = doc(2.0, "cyclic (FFCV triangular) and onecycle: epoch of the peak lr")

    def __post_init__(self) -> None:
        _one_of("schedule", "name", self.name, ("cosine", "step", "onecycle", "cyclic", "constant"))
        _require(self.warmup_epochs >= 0, f"schedule.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _require(0 <= self.warmup_start_ratio <= 1, f"schedule.warmup_start_ratio must be in [0, 1], got {self.warmup_start_ratio}")
        _require(0 <= self.min_lr_ratio <= 1, f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(0 < self.step_gamma <= 1, f"schedule.step_gamma must be in (0, 1], got {self.step_gamma}")
        _require(self.peak_epoch >= 0, f"schedule.peak_epoch must be >= 0, got {self.peak_epoch}")


@dataclass
class TrainConfig:
    run_dir: str = doc("runs/default", "run folder: config.yaml, checkpoints/, tb/, metrics.jsonl, slurm/")
    max_epochs: int = doc(90, "train this many epochs (ignored when max_steps > 0)")
    max_steps: int = doc(0, "train this many optimizer steps; 0 = max_epochs * steps_per_epoch")
    seed: int = doc(0, "seed for init, data order and augmentation (every rank derives its own from it)")
    device: str = doc("auto", "auto (cuda when available) | cpu | cuda")
    precision: str = doc("auto", "auto (bf16 on CUDA with bf16, else fp16; on CPU bf16 only where oneDNN has native "
                         "bf16, else fp32) | fp32 | bf16 | fp16 (autocast; fp16 adds loss scaling)")
    grad_accum: int = doc(1, "micro-batches per optimizer step")
    grad_clip: float = doc(0.0, "clip the global grad norm to this value; 0 = off")
    label_smoothing: float = doc(0.1, "cross-entropy label smoothing")
    mixup_alpha: float = doc(0.0, "mixup Beta(alpha, alpha); 0 = off")
    cutmix_alpha: float = doc(0.0, "cutmix Beta(alpha, alpha); 0 = off")
    mix_prob: float = doc(1.0, "probability that a batch is mixed when mixup or cutmix is on")
    ema_decay: float = doc(0.0, "EMA of weights with this decay per step, also evaluated; 0 = off")
    channels_last: bool = doc(True, "NHWC memory format for model and inputs (CUDA only; CPU runs stay NCHW)")
    compile: bool = doc(False, "torch.compile the model")
    eval_every: int = doc(1, "evaluate every this many epochs (and always at the end)")
    flip_tta: bool = doc(False, "evaluate on the image and its horizontal flip, averaging the logits")
    nonfinite: str = doc("skip", "on a NaN/inf loss: skip the step, or stop (keeping the last good checkpoint)")
    resume: str = doc("auto", "how the run's first start begins: auto (latest valid checkpoint in run_dir) | none | PATH "
                      "of a step-N checkpoint; a restart (requeue, crash restart) always continues from run_dir's latest")
    overwrite: bool = doc(False, "with resume=none, start over in a run folder that holds checkpoints: the earlier run's "
                          "checkpoints, ledger and logs move to run_dir/superseded/<time>/")
    max_restarts: int = doc(3, "without Slurm: restart from the latest valid checkpoint at most this many times after a "
                            "crash, hang or refused save, then stop with one line naming the failures")
    deterministic: bool = doc(False, "use deterministic algorithms (slower; bitwise-repeatable on GPU too)")

    def __post_init__(self) -> None:
        _require(bool(self.run_dir), "train.run_dir must not be empty")
        _require(self.max_epochs >= 1 or self.max_steps >= 1, "set train.max_epochs >= 1 or train.max_steps >= 1")
        _require(self.max_steps >= 0, f"train.max_steps must be >= 0, got {self.max_steps}")
        _one_of("train", "device", self.device, ("auto", "cpu", "cuda"))
        _one_of("train", "precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _one_of("train", "nonfinite", self.nonfinite, ("skip", "stop"))
        _require(self.max_restarts >= 0, f"train.max_restarts must be >= 0, got {self.max_restarts}")
        _require(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _require(self.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.grad_clip}")
        _require(0 <= self.label_smoothing < 1, f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _require(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "train.mixup_alpha and train.cutmix_alpha must be >= 0")
        _require(0 <= self.mix_prob <= 1, f"train.mix_prob must be in [0, 1], got {self.mix_prob}")
        _require(0 <= self.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        _require(self.eval_every >= 1, f"train.eval_every must be >= 1, got {self.eval_every}")


@dataclass
class ParallelConfig:
    backend: str = doc("ddp", "ddp | deepspeed (the training loop is the same for both)")
    zero_stage: int = doc(0, "DeepSpeed ZeRO stage 0, 1 or 2")
    sync_bn: bool = doc(False, "convert BatchNorm to SyncBatchNorm (CUDA only)")
    bucket_cap_mb: int = doc(25, "DDP gradient bucket size in MiB")
    hang_timeout_s: float | None = doc(None, "a rank that finishes no step or collective for this long is hung: every "
                                       "rank dumps its stacks under <run_dir>/hangs and the run restarts (rkan_dist."
                                       "watchdog); null = 600 on CUDA, 1800 on CPU; 0 = off; the collective timeout "
                                       "is twice this, at least 600")
    straggler_threshold: float = doc(0.75, "a rank whose compute time per step scores below this (the fastest rank's "
                                     "median / its own) for 3 windows in a row is a straggler: named by `rkan-dist "
                                     "status`, evicted at the next requeue with slurm.exclude_stragglers")

    def __post_init__(self) -> None:
        _one_of("parallel", "backend", self.backend, ("ddp", "deepspeed"))
        _one_of("parallel", "zero_stage", self.zero_stage, (0, 1, 2))
        _require(self.bucket_cap_mb >= 1, f"parallel.bucket_cap_mb must be >= 1, got {self.bucket_cap_mb}")
        _require(self.hang_timeout_s is None or self.hang_timeout_s == 0 or self.hang_timeout_s >= 10,
                 f"parallel.hang_timeout_s must be 0 (off) or >= 10 seconds (null: the device's default), "
                 f"got {self.hang_timeout_s}")
        _require(0 < self.straggler_threshold <= 1,
                 f"parallel.straggler_threshold must be in (0, 1], got {self.straggler_threshold}")


@dataclass
class CheckpointConfig:
    every_steps: int = doc(1000, "save every this many optimizer steps; 0 = only at epoch ends and on signals")
    every_minutes: float = doc(15.0, "also save once this many minutes have passed since the last save, at the next "
                               "step: bounds the work a crash or hang loses however slow a step is; 0 = off")
    at_epoch_end: bool = doc(True, "also save at the end of every epoch")
    keep: int = doc(3, "keep the latest this many complete checkpoints")

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        _require(self.every_minutes >= 0, f"checkpoint.every_minutes must be >= 0, got {self.every_minutes}")
        _require(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass
class LoggingConfig:
    every_steps: int = doc(50, "write train metrics every this many steps")
    level: str = doc("INFO", "log level on rank 0 (other ranks log WARNING and above)")
    tensorboard: bool = doc(True, "write TensorBoard events under <run_dir>/tb")
    histograms_every: int = doc(500, "KAN polynomial-weight histograms every this many steps; 0 = off")
    image_grid: bool = doc(True, "write a grid of the first training batch (to catch bad augmentation)")
    progress_bar: bool = doc(True, "tqdm progress bar on rank 0")

    def __post_init__(self) -> None:
        _require(self.every_steps >= 1, f"logging.every_steps must be >= 1, got {self.every_steps}")
        _one_of("logging", "level", self.level, ("DEBUG", "INFO", "WARNING", "ERROR"))
        _require(self.histograms_every >= 0, f"logging.histograms_every must be >= 0, got {self.histograms_every}")


@dataclass
class SlurmConfig:
    partition: str = doc("", "partition to submit to ('' = the cluster's default)")
    nodes: int = doc(1, "number of nodes")
    gpus_per_node: int = doc(8, "GPUs per node; 0 runs on CPUs (gloo)")
    tasks_per_node: int = doc(0, "tasks per node; 0 = gpus_per_node, or 1 on CPU")
    cpus_per_task: int = doc(10, "CPU cores per task (FFCV decoding threads)")
    time_minutes: int = doc(1440, "time limit per job in minutes; the job checkpoints and requeues itself at the limit")
    account: str = doc("", "Slurm account ('' = default)")
    qos: str = doc("", "Slurm QOS ('' = default)")
    constraint: str = doc("", "node feature constraint ('' = none)")
    mem: str = doc("", "memory per node, e.g. 400G ('' = the partition's default)")
    exclude: str = doc("", "nodes to exclude, e.g. node[01-03]")
    signal_delay_s: int = doc(120, "USR2 is sent this many seconds before the time limit")
    max_num_timeout: int = doc(3, "requeue at most this many times after a time limit (preemptions are unlimited)")
    max_num_failures: int = doc(3, "restart the job at most this many times after a crash, hang or refused save "
                                "(counted in events.json), then end it with one line naming the failures")
    min_nodes: int = doc(0, "run on as few as this many nodes when no more are free (sbatch --nodes=min-max), keeping "
                         "the global batch; 0 = slurm.nodes (never shrink)")
    exclude_after_failures: int = doc(1, "a node that this many crashes or hangs are attributed to is excluded from "
                                      "the job before it restarts; 0 = never exclude")
    exclude_stragglers: bool = doc(False, "also exclude a persistent straggler's node (parallel.straggler_threshold) "
                                   "at the job's next requeue; never stops a job by itself")
    array_parallelism: int = doc(256, "a grid's job array runs at most this many of its runs at once (sbatch --array=0-N%P)")

    def __post_init__(self) -> None:
        _require(self.nodes >= 1, f"slurm.nodes must be >= 1, got {self.nodes}")
        _require(self.gpus_per_node >= 0, f"slurm.gpus_per_node must be >= 0, got {self.gpus_per_node}")
        _require(self.tasks_per_node >= 0, f"slurm.tasks_per_node must be >= 0, got {self.tasks_per_node}")
        _require(self.cpus_per_task >= 1, f"slurm.cpus_per_task must be >= 1, got {self.cpus_per_task}")
        _require(self.time_minutes >= 1, f"slurm.time_minutes must be >= 1, got {self.time_minutes}")
        _require(self.signal_delay_s >= 0, f"slurm.signal_delay_s must be >= 0, got {self.signal_delay_s}")
        _require(self.max_num_timeout >= 0, f"slurm.max_num_timeout must be >= 0, got {self.max_num_timeout}")
        _require(self.max_num_failures >= 0, f"slurm.max_num_failures must be >= 0, got {self.max_num_failures}")
        _require(0 <= self.min_nodes <= self.nodes,
                 f"slurm.min_nodes must be between 0 (= slurm.nodes) and slurm.nodes={self.nodes}, got {self.min_nodes}")
        _require(self.exclude_after_failures >= 0,
                 f"slurm.exclude_after_failures must be >= 0, got {self.exclude_after_failures}")
        _require(self.array_parallelism >= 1, f"slurm.array_parallelism must be >= 1, got {self.array_parallelism}")

    @property
    def fewest_nodes(self) -> int:
        """The fewest nodes the job runs on (slurm.min_nodes, 0 meaning slurm.nodes)."""
        return self.min_nodes or self.nodes


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def _section_class(section: dataclasses.Field) -> type:
    # `from __future__ import annotations` turns field types into strings; resolve them here.
    return globals()[section.type] if isinstance(section.type, str) else section.type


def field_help() -> dict[str, str]:
    """Every dotted key a config may set ('optim.lr', ...) with its one-line documentation."""
    return {
        f"{section.name}.{f.name}": f.metadata.get("help", "")
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(_section_class(section))
    }


def valid_keys() -> list[str]:
    return list(field_help())


def _suggest(key: str) -> str:
    """'; did you mean ...' for a mistyped key, else the valid keys of its section."""
    keys = valid_keys()
    if key in SECTIONS:
        fields = [k.split(".", 1)[1] for k in keys if k.startswith(key + ".")]
        return f"; '{key}' is a section, its keys are: {', '.join(fields)}"
    section = key.split(".", 1)[0]
    candidates = keys if section in SECTIONS else keys + list(SECTIONS)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:  # a wrong or missing section: match the field name alone
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        leaves = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[leaves[0]]] if leaves else []
    if close:
        return f"; did you mean '{close[0]}'?"
    if section in SECTIONS:
        fields = [k.split(".", 1)[1] for k in keys if k.startswith(section + ".")]
        return f"; valid keys in '{section}': {', '.join(fields)}"
    return f"; valid sections: {', '.join(SECTIONS)} (see `rkan-dist config keys`)"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"cannot parse YAML at {where}: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse YAML in {path}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _explain(err: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError | ConfigAttributeError):
        return ConfigError(f"{origin}: unknown key '{key}'{_suggest(key)}")
    if isinstance(err, ValidationError):
        return ConfigError(f"{origin}: wrong type for '{key}': {str(err).splitlines()[0]}")
    return ConfigError(f"{origin}: {str(err).splitlines()[0]} (key '{key}')")


def _parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=0.2)")
    key, value = text.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise ConfigError(f"override key {key!r} must be section.key{_suggest(key)}")
    return key, value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                check_paths: bool = False) -> Config:
    """Defaults <- YAML file <- dotted overrides, type-checked and range-checked.

    With `check_paths`, the data files the run will read must exist (train/eval need them;
    `config show` does not).
    """
    merged = OmegaConf.structured(Config)
    if path is not None:
        origin = str(path)
        data = _read_yaml(Path(path))
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(data))
        except OmegaConfBaseException as err:
            raise _explain(err, origin) from None
    for text in overrides:
        key, value = _parse_override(text)
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        try:
            OmegaConf.update(merged, key, parsed, merge=False, force_add=False)
        except OmegaConfBaseException as err:
            if not getattr(err, "full_key", None):
                err.full_key = key  # type: ignore[attr-defined]
            raise _explain(err, f"override {text!r}") from None
    missing = OmegaConf.missing_keys(merged)
    if missing:
        raise ConfigError(f"required keys are not set: {', '.join(sorted(missing))}")
    try:
        config: Config = OmegaConf.to_object(merged)  # runs every section's __post_init__
    except OmegaConfBaseException as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise _explain(err, "config") from None
    _check_model_name(config.model.name)
    _check_pretrained(config.model)
    if check_paths:
        check_data_paths(config)
    return config


def _check_model_name(name: str) -> None:
    names = list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"model.name={name!r} is not a registered model{hint}; valid names: {', '.join(names)}")


def _check_pretrained(model: ModelConfig) -> None:
    """A weights name must exist for the backbone (its cached file is looked for when the model is built)."""
    if model.pretrained and not Path(model.pretrained).is_file() and is_weights_name(model.pretrained):
        from rkan_dist.models.registry import torchvision_weights  # torchvision: only when a name is given

        try:
            torchvision_weights(model.pretrained, model.name)
        except ValueError as err:
            raise ConfigError(f"model.pretrained: {err}") from None


def check_data_paths(config: Config) -> None:
    """Fail early, before any process group or loader exists, when the data is not there."""
    if config.data.dataset == "digits":
        return
    for name in ("train_path", "val_path"):
        value = getattr(config.data, name)
        _require(bool(value), f"data.{name} is not set (or use data.dataset=digits for the embedded demo data)")
        path = Path(value).expanduser()
        if config.data.format == "ffcv":
            _require(path.is_file(), f"data.{name}: no such .beton file {value!r}")
        else:
            _require(path.is_dir(), f"data.{name}: no such ImageFolder directory {value!r}")


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: Config, run_dir: str | os.PathLike, notes: list[str] | tuple[str, ...] = ()) -> Path:
    """Write the resolved config to <run_dir>/config.yaml (rank 0 calls this), atomically; `notes`
    become comment lines at the top (how an `auto` value was resolved, and why)."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text("".join(f"# {note}\n" for note in notes) + to_yaml(config))
    os.replace(tmp, path)
    return path


def config_to_dict(config: Config) -> dict:
    """Plain nested dict (for checkpoints: only plain types, loadable with weights_only=True)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def config_from_dict(data: dict) -> Config:
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data)))
    except OmegaConfBaseException as err:
        raise _explain(err, "stored config") from None


__all__ = [
    "Config", "ConfigError", "ModelConfig", "DataConfig", "OptimConfig", "ScheduleConfig",
    "TrainConfig", "ParallelConfig", "CheckpointConfig", "LoggingConfig", "SlurmConfig",
    "load_config", "save_config", "to_yaml", "valid_keys", "field_help", "check_data_paths",
    "config_to_dict", "config_from_dict",
]
