"""Data: the .beton writer, FFCV and ImageFolder loaders with one interface, the demo dataset.

`build_loaders(data_config, seed=..., device=..., channels_last=...)` is what the trainer calls:

- TrainLoader: `steps_per_epoch`, `num_samples`, `resolution(epoch)`, and
  `batches(epoch, start_sample=0)` -> (images float NCHW normalised, labels int64) for this rank:
  the rest of the uninterrupted epoch once start_sample of its samples (all ranks together) are
  read, whatever world size read them (see ffcv_loaders' and sampling's docstrings).
- ValLoader: iterable of (images, labels); over all ranks every sample once; `num_samples`
  (total over ranks) and `classes`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from rkan_dist.data.ffcv_import import import_ffcv

if TYPE_CHECKING:  # torch and FFCV are imported where used: `rkan-dist write` checks its arguments first
    from collections.abc import Iterator

    import torch

    from rkan_dist.config import DataConfig


class TrainLoader(Protocol):
    steps_per_epoch: int
    num_samples: int

    def resolution(self, epoch: int) -> int: ...

    def batches(self, epoch: int, start_sample: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class ValLoader(Protocol):
    num_samples: int
    classes: list[str]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def rank_and_world_size() -> tuple[int, int]:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def prepare_digits(cache_dir: str, image_size: int = 32):
    """ensure_digits on one process per node (LOCAL_RANK 0) while the others wait on a barrier."""
    from rkan_dist.data.demo import ensure_digits

    rank, _ = rank_and_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if local_rank == 0:
        paths = ensure_digits(cache_dir, image_size)
        _barrier()
    else:
        _barrier()
        paths = ensure_digits(cache_dir, image_size)  # already there: only returns the paths
    return paths


def _resolve_paths(data_config: DataConfig) -> tuple[str, str]:
    if data_config.dataset == "digits":
        paths = prepare_digits(data_config.cache_dir)  # 32 px files; the decoders resize to min_res..max_res
        if data_config.format == "ffcv":
            return str(paths.train_beton), str(paths.val_beton)
        return str(paths.train_dir), str(paths.val_dir)
    for name in ("train_path", "val_path"):
        if not getattr(data_config, name):
            raise ValueError(f"data.{name} is not set (or use data.dataset=digits for the embedded demo data)")
    return str(Path(data_config.train_path).expanduser()), str(Path(data_config.val_path).expanduser())


def _beton_classes(train_path: str, val_path: str) -> list[str]:
    """The class list stored beside the files; train and val must agree."""
    from rkan_dist.data.beton import read_labels
    from rkan_dist.data.write import classes_path, read_classes

    stored = {}
    for path in (train_path, val_path):
        if classes_path(path).is_file():
            stored[path] = read_classes(classes_path(path))
    if len(stored) == 2 and stored[train_path] != stored[val_path]:
        train, val = stored[train_path], stored[val_path]
        first = next((i for i, (a, b) in enumerate(zip(train, val)) if a != b), min(len(train), len(val)))
        raise ValueError(f"train and val class lists differ ({len(train)} vs {len(val)} classes; first difference at "
                         f"index {first}): {classes_path(train_path)} vs {classes_path(val_path)}. "
                         f"Write val with --classes {classes_path(train_path)}")
    if stored:
        return next(iter(stored.values()))
    # Files written by other tools (e.g. FFCV's write_imagenet.py) carry no names: number the classes.
    return [str(index) for index in range(int(read_labels(train_path).max()) + 1)]


def build_val_loader(data_config: DataConfig, *, device: torch.device, channels_last: bool) -> ValLoader:
    """The val loader alone (`rkan-dist eval`): reads nothing of the train data."""
    import torch

    import_ffcv()
    rank, world_size = rank_and_world_size()
    if data_config.dataset == "digits":
        val_path = _resolve_paths(data_config)[1]
    else:
        if not data_config.val_path:
            raise ValueError("data.val_path is not set")
        val_path = str(Path(data_config.val_path).expanduser())
    options = dict(batch_size=data_config.val_batch_size, val_res=data_config.val_res, crop_ratio=data_config.crop_ratio,
                   num_workers=data_config.num_workers, rank=rank, world_size=world_size, device=torch.device(device),
                   channels_last=channels_last, mean=list(data_config.mean), std=list(data_config.std))
    if data_config.format == "ffcv":
        from rkan_dist.data.beton import read_labels
        from rkan_dist.data.ffcv_loaders import FFCVValLoader
        from rkan_dist.data.write import classes_path, read_classes

        classes = (read_classes(classes_path(val_path)) if classes_path(val_path).is_file()
                   else [str(index) for index in range(int(read_labels(val_path).max()) + 1)])
        return FFCVValLoader(val_path, os_cache=data_config.os_cache, classes=classes, **options)
    from rkan_dist.data.folder_loaders import FolderValLoader

    return FolderValLoader(val_path, **options)


def build_loaders(data_config: DataConfig, *, seed: int, device: torch.device, channels_last: bool,
                  drop_last: bool = True) -> tuple[TrainLoader, ValLoader]:
    import torch

    import_ffcv()
    rank, world_size = rank_and_world_size()
    train_path, val_path = _resolve_paths(data_config)
    common = dict(num_workers=data_config.num_workers, rank=rank, world_size=world_size, device=torch.device(device),
                  channels_last=channels_last, mean=list(data_config.mean), std=list(data_config.std))
    train_options = dict(batch_size=data_config.batch_size, seed=seed, drop_last=drop_last,
                         min_res=data_config.min_res, max_res=data_config.max_res,
                         start_ramp_epoch=data_config.start_ramp_epoch, end_ramp_epoch=data_config.end_ramp_epoch,
                         min_crop_scale=data_config.min_crop_scale, hflip=data_config.hflip, **common)
    val_options = dict(batch_size=data_config.val_batch_size, val_res=data_config.val_res,
                       crop_ratio=data_config.crop_ratio, **common)
    if data_config.format == "ffcv":
        from rkan_dist.data.ffcv_loaders import FFCVTrainLoader, FFCVValLoader

        classes = _beton_classes(train_path, val_path)
        train = FFCVTrainLoader(train_path, os_cache=data_config.os_cache, **train_options)
        val = FFCVValLoader(val_path, os_cache=data_config.os_cache, classes=classes, **val_options)
        return train, val
    if data_config.format == "folder":
        from rkan_dist.data.folder_loaders import FolderTrainLoader, FolderValLoader

        train = FolderTrainLoader(train_path, **train_options)
        val = FolderValLoader(val_path, **val_options)
        if train.classes != val.classes:
            raise ValueError(f"train and val folders have different classes ({len(train.classes)} vs "
                             f"{len(val.classes)}): {train_path} vs {val_path}")
        return train, val
    raise ValueError(f"data.format={data_config.format!r} is not valid; choose one of ffcv, folder")


__all__ = ["TrainLoader", "ValLoader", "build_loaders", "build_val_loader", "import_ffcv", "prepare_digits",
           "rank_and_world_size"]
