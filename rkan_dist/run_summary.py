"""`<run_dir>/summary.json`: one small file per run, the only thing `rkan-dist compare` reads.

Rank 0 writes it whenever `Trainer.train()` returns (finished, or stopped for a requeue), so a
run's summary says how far it got even while it waits in the queue:

    {"status": "finished", "name": "model.aggregation=gating,train.seed=1",
     "overrides": {"model.aggregation": "gating", "train.seed": 1},
     "model": "rkan_resnet18", "params": 11272342, "flops": 1.2e8, "flops_resolution": 16,
     "top1": 0.93, "top1_best": 0.94, "top5": 0.99, "top5_best": 0.99, "ema_top1": null, ...,
     "steps": 20, "total_steps": 20, "epochs": 0.45, "images_per_s": 180.2,
     "wall_seconds": 61.0, "train_seconds": 58.2, "device_hours": 0.032, "device_hours_unit": "CPU-hours",
     "failures": 1, "restarts": 1, "faults": {...ledger totals...},
     "git_commit": "e7c6412...", "git_dirty": false, "versions": {...}, "config": {...resolved...}}

Where the numbers come from, so that a restarted run reports the same as an uninterrupted one:
accuracies from the eval records of metrics.jsonl (a resumed run has dropped what the killed
attempt logged after its checkpoint, as TensorBoard has), images/s as the median of the logged
train windows, times and faults from the ledger (events.json: wall time from the first start,
training time as the sum of the attempts, each from its start to its last event). FLOPs are
torch's FlopCounterMode count of one forward pass of one image at data.val_res (2 FLOPs per
multiply-add; the RKAN convolution is counted through its registered formula).

A finished run also writes its hyperparameters (the grid's overrides) for TensorBoard's HParams
tab, once, into an event file of its own inside `<run_dir>/tb`: the tab then lists the run once,
beside its scalars. torch's `SummaryWriter.add_hparams` would write them into a timestamped
sub-folder, a second "run" without the scalars (pytorch#32651).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rkan_dist.ledger import LEDGER_NAME, EventLedger, summary

if TYPE_CHECKING:
    from rkan_dist.config import Config

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"
RUN_NAME = "run.json"  # written by a grid into each of its run folders: the run's name and overrides
HPARAMS_SUFFIX = ".hparams"  # the event file of <run_dir>/tb that holds the HParams summaries
VERSION_PACKAGES = ("torch", "torchvision", "numpy", "ffcv", "deepspeed", "numba", "rkan-dist")


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(run_dir) / SUMMARY_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def read_run_name(run_dir: str | os.PathLike) -> dict[str, Any]:
    """{"name", "overrides"} a grid gave this run folder; {} for a run started on its own."""
    path = Path(run_dir) / RUN_NAME
    with contextlib.suppress(FileNotFoundError):
        return json.loads(path.read_text())
    return {}


def _write_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def record_evaluation(run_dir: str | os.PathLike, checkpoint: str | os.PathLike, result: dict[str, float],
                      now: float | None = None) -> Path | None:
    """`rkan-dist eval` of one of a run's checkpoints: the figures join the run's summary.json under
    "evaluations" (every one kept, newest last), beside what training measured. A run folder without
    a summary yet (a run from before summaries, or one still training) gets one holding only them."""
    path = Path(run_dir) / SUMMARY_NAME
    try:
        data = read_summary(run_dir) or {"status": "evaluated", "name": read_run_name(run_dir).get("name", Path(run_dir).name)}
        data.setdefault("evaluations", []).append({
            "time": round(time.time() if now is None else now, 3), "checkpoint": str(checkpoint),
            **{key: result[key] for key in ("top1", "top5", "loss", "samples") if key in result}})
        _write_atomically(path, data)
    except (OSError, ValueError) as err:
        log.warning("could not write %s: %s", path, err)
        return None
    return path


def write_summary(trainer: Any, result: Any) -> Path | None:  # a Trainer and its TrainResult
    """Rank 0: write <run_dir>/summary.json for the run `trainer` trained (and, once it has finished,
    its HParams summaries). A summary that cannot be written is a warning: the training is done."""
    if not trainer.dist.is_main:
        return None
    try:
        data = run_summary(trainer, result)
        path = Path(trainer.run_dir) / SUMMARY_NAME
        earlier = read_summary(trainer.run_dir) or {}
        if "evaluations" in earlier:  # what `rkan-dist eval` recorded stays
            data["evaluations"] = earlier["evaluations"]
        _write_atomically(path, data)
        if result.status == "finished" and trainer.config.logging.tensorboard:
            write_hparams(Path(trainer.run_dir) / "tb", data)
    except (OSError, ValueError) as err:
        log.warning("could not write %s: %s", Path(trainer.run_dir) / SUMMARY_NAME, err)
        return None
    return path


def run_summary(trainer: Any, result: Any) -> dict[str, Any]:
    from rkan_dist.config import config_to_dict

    config, run_dir = trainer.config, Path(trainer.run_dir)
    named = read_run_name(run_dir)
    parameters = list(trainer.engine.module.parameters())
    evals = eval_records(run_dir)
    ledger = EventLedger(run_dir).read()
    wall, train_seconds = run_times(ledger["events"])
    device = trainer.device.type
    # GPU-hours: one GPU per process; CPU-hours: the cores each process computes and decodes with.
    units_per_process = 1 if device == "cuda" else trainer.threads.compute + trainer.threads.data
    faults = summary(ledger)
    return {
        "status": result.status,
        "name": named.get("name", run_dir.name),
        "overrides": named.get("overrides", {}),
        "model": config.model.name,
        "params": sum(p.numel() for p in parameters),
        "trainable_params": sum(p.numel() for p in parameters if p.requires_grad),
        "flops": forward_flops(config),
        "flops_resolution": config.data.val_res,
        **accuracies(evals, "eval/"),
        **{f"ema_{key}": value for key, value in accuracies(evals, "eval_ema/").items()},
        "steps": result.global_step,
        "total_steps": trainer.total_steps,
        "epochs": round(result.global_step / trainer.steps_per_epoch, 4),
        "global_batch": trainer.global_batch,
        "world_size": trainer.dist.world_size,
        "device": device,
        "precision": config.train.precision,
        "images_per_s": median_images_per_s(run_dir),
        "wall_seconds": round(wall, 3),
        "train_seconds": round(train_seconds, 3),
        "device_hours": round(train_seconds * trainer.dist.world_size * units_per_process / 3600, 6),
        "device_hours_unit": "GPU-hours" if device == "cuda" else "CPU-hours",
        "failures": sum(faults["failures"].values()),
        "restarts": sum(faults["restarts"].values()),
        "faults": faults,
        **git_state(),
        "versions": versions(),
        "written": round(time.time(), 3),
        "config": config_to_dict(config),
    }


def eval_records(run_dir: Path) -> list[dict[str, Any]]:
    """The eval records of metrics.jsonl in order (a record cut short by a kill is skipped)."""
    records = []
    with contextlib.suppress(FileNotFoundError), open(run_dir / "metrics.jsonl") as lines:
        for line in lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("kind") == "eval":
                    records.append(record)
    return records


def accuracies(evals: list[dict[str, Any]], prefix: str) -> dict[str, float | None]:
    """Final (the last evaluation) and best top-1/top-5 under `prefix`; None where never evaluated."""
    out: dict[str, float | None] = {}
    for metric in ("top1", "top5"):
        values = [record[prefix + metric] for record in evals if isinstance(record.get(prefix + metric), float | int)]
        out[metric] = values[-1] if values else None
        out[f"{metric}_best"] = max(values) if values else None
    return out


def median_images_per_s(run_dir: Path) -> float | None:
    """The median logged train throughput: robust to the first window's warm-up and to a loaded machine."""
    values = []
    with contextlib.suppress(FileNotFoundError), open(run_dir / "metrics.jsonl") as lines:
        for line in lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("kind") == "train" and isinstance(record.get("train/images_per_s"), float | int):
                    values.append(record["train/images_per_s"])
    return round(statistics.median(values), 3) if values else None


def run_times(events: list[dict[str, Any]], now: float | None = None) -> tuple[float, float]:
    """(wall seconds since the first start, seconds the attempts ran). An attempt runs from its
    start event to the last event before the next start (a stop, the failure a launcher recorded);
    the last attempt runs until `now`. Time in the queue between attempts is not training time."""
    now = time.time() if now is None else now
    starts = [index for index, event in enumerate(events) if event.get("event") == "start"]
    if not starts:
        return 0.0, 0.0
    ran = 0.0
    for position, index in enumerate(starts):
        if position + 1 < len(starts):
            end = events[starts[position + 1] - 1]["time"]
        else:
            end = now
        ran += max(end - events[index]["time"], 0.0)
    return now - events[starts[0]]["time"], ran


def forward_flops(config: Config) -> int | None:
    """FLOPs of one forward pass of one image at data.val_res (torch's FlopCounterMode), on a fresh
    CPU copy of the model: counting the live one would run its kernels (and a compiled graph) for it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rkan_dist.models.registry import create_model, model_options_from_config

    try:
        model = create_model(config.model.name, config.model.num_classes,
                             **model_options_from_config(config.model)).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, 3, config.data.val_res, config.data.val_res))
        return int(counter.get_total_flops())
    except Exception as err:  # a model the counter cannot trace: the summary says so, the run is not failed
        log.warning("could not count the FLOPs of %s: %s", config.model.name, err)
        return None


def git_state() -> dict[str, Any]:
    """The commit of the source tree rkan_dist runs from (None when it is not a git checkout)."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return {"git_commit": None, "git_dirty": None}
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no", "."],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSION_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    import torch

    found["cuda"] = torch.version.cuda
    return found


def hparams_of(data: dict[str, Any]) -> dict[str, bool | float | str]:
    """What the HParams tab shows for a run: its overrides (lists as text), and the model's name."""
    values: dict[str, bool | float | str] = {"model.name": data["model"]}
    for key, value in data.get("overrides", {}).items():
        values[key] = value if isinstance(value, bool | int | float | str) else json.dumps(value)
    return values


def write_hparams(tb_dir: Path, data: dict[str, Any]) -> Path | None:
    """The run's session start (its hparams) and end (success) for TensorBoard's HParams tab, in an
    event file of its own in the run's tb folder, at step 0 (below any resume's purge step); once:
    the plugin reads a tag's metadata from its first event, so a second write would change nothing."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.plugins.hparams.summary_v2 import hparams_pb
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    if any(tb_dir.glob(f"events.out.tfevents.*{HPARAMS_SUFFIX}")):
        return None
    start = data["written"] - data["wall_seconds"]
    session_start = hparams_pb(hparams_of(data), trial_id=data["name"], start_time_secs=start)
    end = Summary()
    end.value.add(tag=metadata.SESSION_END_INFO_TAG, tensor=metadata.NULL_TENSOR,
                  metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(
                      session_end_info=plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS,
                                                                      end_time_secs=data["written"]))))
    writer = EventFileWriter(str(tb_dir), filename_suffix=HPARAMS_SUFFIX)
    for summary_pb in (session_start, end):
        writer.add_event(Event(wall_time=time.time(), step=0, summary=summary_pb))
    writer.close()
    return Path(writer.get_logdir())


def ledger_state(run_dir: Path) -> str | None:
    """How a run without a finished summary stands, from its ledger: 'failed' (it gave up, or met an
    error no restart fixes), 'started' (it trained, or trains), or None (never started)."""
    path = run_dir / LEDGER_NAME
    if not path.is_file():
        return None
    try:
        events = EventLedger(run_dir).read()["events"]
    except (OSError, ValueError):
        return "started"
    last_start = max((index for index, event in enumerate(events) if event.get("event") == "start"), default=-1)
    if any(event.get("event") in ("gave_up", "error") for event in events[last_start + 1:]):
        return "failed"
    return "started"
