"""One metrics object: rank 0 writes TensorBoard events and `metrics.jsonl`; other ranks do nothing.

Every number the trainer reports goes through `MetricsLogger`, at the step it belongs to, so the
TensorBoard curves and the JSON lines always agree. On resume the writer is reopened with
`purge_step` at the resumed global step: TensorBoard drops events the killed run wrote after its
last checkpoint, and the curves continue without overlapping. A run that starts at step 0 in a
folder that already holds logs (stopped before its first checkpoint, or started over) moves them
to `superseded/<time>/` first, so two runs never share one curve.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# The scalar tags the trainer writes (tests read them back with TensorBoard's own reader).
TRAIN_TAGS = (
    "train/loss", "train/top1", "train/lr", "train/images_per_s", "train/data_wait_fraction",
    "train/step_time_s", "train/memory_gib", "train/grad_norm",
)
EVAL_TAGS = ("eval/top1", "eval/top5", "eval/loss")


class MetricsLogger:
    """TensorBoard + JSON lines on the main rank; a no-op object elsewhere."""

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool, tensorboard: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            set_aside(run_dir, LOG_NAMES, "logs of a run with no checkpoint to continue from")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step if start_step > 0 else None)
        self.jsonl_path = run_dir / "metrics.jsonl"
        if start_step > 0:
            _truncate_jsonl_after(self.jsonl_path, start_step)
        self.jsonl = open(self.jsonl_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the logger

    def scalars(self, step: int, values: dict[str, float | None], kind: str = "train") -> None:
        """Write {tag: value}; None values (e.g. loss scale without fp16) are left out."""
        if not self.enabled:
            return
        clean = {tag: float(value) for tag, value in values.items() if value is not None}
        if self.writer is not None:
            for tag, value in clean.items():
                self.writer.add_scalar(tag, value, step)
        record = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        record.update({tag: (value if math.isfinite(value) else str(value)) for tag, value in clean.items()})
        self.jsonl.write(json.dumps(record) + "\n")

    def text(self, step: int, tag: str, text: str) -> None:
        """A note about the run (e.g. the precision chosen and why): TensorBoard's text tab and a jsonl record."""
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.add_text(tag, text, step)
        self.jsonl.write(json.dumps({"kind": "text", "step": step, "time": round(time.time(), 3), tag: text}) + "\n")

    def histograms(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        if self.enabled and self.writer is not None:
            for tag, tensor in tensors.items():
                self.writer.add_histogram(tag, tensor.detach().float().cpu(), step)

    def images(self, step: int, tag: str, images: torch.Tensor, mean: list[float], std: list[float]) -> None:
        """A grid of (normalised) input images, un-normalised for display."""
        if not (self.enabled and self.writer is not None):
            return
        import torchvision

        images = images.detach().float().cpu()[:16]
        images = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        grid = torchvision.utils.make_grid(images.clamp(0, 1), nrow=8)
        self.writer.add_image(tag, grid, step)

    def flush(self) -> None:
        if self.enabled and self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


LOG_NAMES = ("metrics.jsonl", "tb")


def set_aside(run_dir: Path, names: tuple[str, ...], what: str) -> Path | None:
    """Move what an earlier run left under `names` to run_dir/superseded/<UTC time>/, nothing deleted;
    that folder, or None when there was nothing to move."""
    old = [run_dir / name for name in names if (run_dir / name).exists()]
    if not old:
        return None
    folder = run_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    while folder.exists():  # two starts within a second
        folder = folder.with_name(folder.name + "+")
    folder.mkdir(parents=True)
    for path in old:
        os.replace(path, folder / path.name)
    log.warning("%s held %s; moved them to %s", run_dir, what, folder)
    return folder


def _truncate_jsonl_after(path: Path, step: int) -> None:
    """Drop the lines a killed run wrote at or after the resumed step, as TensorBoard's purge does."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if record.get("step", -1) < step or record.get("kind") == "job":
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def memory_gib(device: torch.device) -> float:
    """Peak CUDA memory on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at #classes)."""
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return [int(hits[:, : min(k, max_k)].any(dim=1).sum()) for k in ks]


class Throughput:
    """Images/s, step time and the fraction of time spent waiting for data, between two reports."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.images = 0
        self.steps = 0

    def add(self, images: int, data_wait: float) -> None:
        self.images += images
        self.data_wait += data_wait
        self.steps += 1

    def report(self, world_size: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {
            "train/images_per_s": self.images * world_size / elapsed,
            "train/data_wait_fraction": self.data_wait / elapsed,
            "train/step_time_s": elapsed / max(self.steps, 1),
        }
        self.reset()
        return out


def format_summary(values: dict[str, Any]) -> str:
    return " ".join(f"{k.split('/')[-1]}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


class EpochLog:
    """One epoch's training log on this rank: the progress bar (when shown), images/s and data wait
    (`throughput`), and the loss and correct predictions since the last logging step, summed on the
    device (no host sync per step)."""

    def __init__(self, device: torch.device, *, show_bar: bool, steps: int, done: int, epoch: int) -> None:
        self.bar = _NullProgress()
        if show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch}", unit="step", dynamic_ncols=True,
                            leave=False)
        self.throughput = Throughput()
        self.device = device
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.seen = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, data_wait: float) -> None:
        """A micro-batch whose gradients count."""
        self.loss += loss.detach().float()
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.seen += labels.shape[0]
        self.throughput.add(labels.shape[0], data_wait)

    def totals(self) -> torch.Tensor:
        """(loss, correct, seen) since the last logging step, to be summed over the ranks."""
        return torch.stack([self.loss, self.correct, torch.tensor(float(self.seen), device=self.device)])

    def report(self, summed: torch.Tensor, batch_size: int) -> dict[str, float]:
        """Loss per micro-batch and top-1 from `totals()` summed over the ranks; like Throughput.report,
        it starts the next window."""
        micro_batches = max(float(summed[2]) / batch_size, 1.0)
        values = {"train/loss": float(summed[0]) / micro_batches,
                  "train/top1": float(summed[1]) / max(float(summed[2]), 1.0)}
        self.loss.zero_(), self.correct.zero_()
        self.seen = 0
        return values

    def show(self, values: dict[str, float]) -> None:
        self.bar.set_postfix(loss=f"{values['train/loss']:.3f}", lr=f"{values['train/lr']:.3g}",
                             img_s=f"{values['train/images_per_s']:.0f}", refresh=False)


class _NullProgress:
    def update(self, *_: Any) -> None: ...
    def set_postfix(self, *_: Any, **__: Any) -> None: ...
    def close(self) -> None: ...
