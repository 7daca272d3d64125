"""torchvision ImageFolder loaders with the FFCV loaders' interface (data.format=folder).

For users without .beton files yet, and as the baseline of bench/loaders.py. Same augmentations
(random-resized crop + optional flip for train; centre crop of crop_ratio * short side for val),
same sample order and sharding, same exact mid-epoch resume: the order comes from
`sampling.train_shard` (DistributedSampler's stride rule, computed for (seed, epoch) and cut at
the epoch's sample start_sample), and each request handed to the workers is (sample id, epoch,
resolution), so a worker computes the crop box and flip from `sampling` exactly as the FFCV
decoder does. Crops are resized with torchvision's antialiased bilinear resize (FFCV uses
OpenCV's INTER_AREA), so the two loaders agree on boxes, not bit for bit on pixels.

Workers return uint8 CHW tensors (4x less to pass between processes); the batch is normalised
in the consuming process, on the GPU when the device is CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from rkan_dist.data.sampling import (
    center_crop_box,
    train_augmentation,
    train_batches_per_rank,
    train_shard,
    val_shard,
)
from rkan_dist.schedules import resolution_for_epoch


def open_image_folder(root: str, what: str) -> ImageFolder:
    try:
        return ImageFolder(root)
    except FileNotFoundError as err:  # torchvision's message for a missing root or a class without images
        raise ValueError(f"{what}: {err}") from None


class _AugmentedFolder(Dataset):
    """Index = (sample id, epoch, resolution) -> (uint8 CHW image, label)."""

    def __init__(self, folder: ImageFolder, train: bool, seed: int, min_crop_scale: float, hflip: bool,
                 crop_ratio: float):
        self.folder = folder
        self.train = train
        self.seed = seed
        self.scale = (min_crop_scale, 1.0)
        self.log_ratio = (math.log(3 / 4), math.log(4 / 3))
        self.hflip = hflip
        self.crop_ratio = crop_ratio

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, request: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        sample_id, epoch, resolution = request
        path, label = self.folder.samples[sample_id]
        image = self.folder.loader(path)
        width, height = image.size
        flip = False
        if self.train:
            top, left, crop_h, crop_w, flip = train_augmentation(self.seed, epoch, sample_id, height, width,
                                                                 *self.scale, *self.log_ratio, self.hflip)
        else:
            top, left, crop_h, crop_w = center_crop_box(height, width, self.crop_ratio)
        image = F.resized_crop(image, top, left, crop_h, crop_w, [resolution, resolution],
                               interpolation=InterpolationMode.BILINEAR, antialias=True)
        if flip:
            image = F.hflip(image)
        return F.pil_to_tensor(image), label


class _PlannedSampler(Sampler):
    """Yields the requests planned for the next pass (read in the main process at each iter)."""

    def __init__(self):
        self.planned: list[tuple[int, int, int]] = []

    def __iter__(self):
        return iter(self.planned)

    def __len__(self) -> int:
        return len(self.planned)


class _FolderBatches:
    def __init__(self, dataset: _AugmentedFolder, *, batch_size: int, num_workers: int, device: torch.device,
                 channels_last: bool, mean, std, persistent: bool):
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.channels_last = channels_last
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self._mean = torch.tensor(mean, dtype=dtype, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(std, dtype=dtype, device=self.device).view(1, 3, 1, 1) * 255
        self._dtype = dtype
        self.sampler = _PlannedSampler()
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                                 drop_last=False, pin_memory=self.device.type == "cuda",
                                 persistent_workers=persistent and num_workers > 0)

    def _run(self, requests: list[tuple[int, int, int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not requests:
            return
        self.sampler.planned = requests
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
            images = images.to(self._dtype, memory_format=memory_format).sub_(self._mean).div_(self._std)
            yield images, labels.to(self.device, dtype=torch.int64, non_blocking=True)


class FolderTrainLoader(_FolderBatches):
    def __init__(self, root: str, *, batch_size: int, num_workers: int, seed: int, rank: int, world_size: int,
                 device: torch.device, channels_last: bool, drop_last: bool, min_res: int, max_res: int,
                 start_ramp_epoch: int, end_ramp_epoch: int, min_crop_scale: float, hflip: bool, mean, std):
        folder = open_image_folder(root, "data.train_path")
        self.classes = folder.classes
        self.num_samples = len(folder.samples)
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last
        self._ramp = (min_res, max_res, start_ramp_epoch, end_ramp_epoch)
        dataset = _AugmentedFolder(folder, train=True, seed=seed, min_crop_scale=min_crop_scale, hflip=hflip,
                                   crop_ratio=1.0)
        # Compile the jitted crop functions here, once, so forked workers inherit them.
        train_augmentation(0, 0, 0, 10, 10, 0.5, 1.0, -0.1, 0.1, True)
        super().__init__(dataset, batch_size=batch_size, num_workers=num_workers, device=device,
                         channels_last=channels_last, mean=mean, std=std, persistent=True)
        self.steps_per_epoch = train_batches_per_rank(self.num_samples, world_size, batch_size, drop_last)

    def resolution(self, epoch: int) -> int:
        return resolution_for_epoch(epoch, *self._ramp)

    def shard(self, epoch: int, start_sample: int = 0):
        return train_shard(self.seed, epoch, self.num_samples, self.rank, self.world_size, self.batch_size,
                           self.drop_last, start_sample)

    def batches(self, epoch: int, start_sample: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        resolution = self.resolution(epoch)
        return self._run([(int(sample_id), epoch, resolution) for sample_id in self.shard(epoch, start_sample)])


class FolderValLoader(_FolderBatches):
    def __init__(self, root: str, *, batch_size: int, num_workers: int, rank: int, world_size: int,
                 device: torch.device, channels_last: bool, val_res: int, crop_ratio: float, mean, std):
        folder = open_image_folder(root, "data.val_path")
        self.classes = folder.classes
        self.num_samples = len(folder.samples)
        self.shard = val_shard(self.num_samples, rank, world_size)
        self.val_res = val_res
        dataset = _AugmentedFolder(folder, train=False, seed=0, min_crop_scale=1.0, hflip=False, crop_ratio=crop_ratio)
        super().__init__(dataset, batch_size=batch_size, num_workers=num_workers, device=device,
                         channels_last=channels_last, mean=mean, std=std, persistent=False)

    def __len__(self) -> int:
        return -(-len(self.shard) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._run([(int(sample_id), 0, self.val_res) for sample_id in self.shard])
