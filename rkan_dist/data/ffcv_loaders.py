"""FFCV train/val loaders: sharded by rank, progressive resizing, exact mid-epoch resume.

How exact resume works
----------------------
An FFCV Loader compiles its pipeline once; what it reads in an epoch is whatever its traversal
order returns. We replace that order with `PlannedOrder` (ffcv_loader_patch), which returns an
array we computed: `sampling.train_shard(seed, epoch, N, rank, world, batch_size, drop_last,
start_sample)` - this rank's stride of a permutation seeded by (seed, epoch), cut to whole
batches, from the epoch's sample start_sample (counted over all ranks) on. The loader therefore
never sees (or reads from disk, or decodes) the samples already trained on, and the batches it
yields are, one for one, the rest of the uninterrupted epoch - also when the run before had
another world size. The crops and flips are the same too: `SeededRandomResizedCropDecoder` keys
them by (seed, epoch, sample id) instead of drawing from per-thread generators.

Sharding is done by us rather than by FFCV's distributed=True (which wraps torch's
DistributedSampler inside its own orders and pads val with duplicates): train uses
DistributedSampler's stride rule, and val gives rank r the samples r, r+world, ... so every val
sample is evaluated exactly once. The process group, when there is one, only supplies rank/world.

Pipelines
---------
CPU: decode+crop -> NormalizeImage (numba, float32) -> ToTensor -> ToTorchImage (a channels_last
view). NormalizeImage must run before ToTensor on CPU: after ToTorchImage the loader hangs.
CUDA: decode+crop -> ToTensor -> ToDevice(cuda, non_blocking) -> ToTorchImage; the uint8 batch is
normalised on the GPU in fp16 with two in-place torch ops (FFCV's own GPU NormalizeImage needs
cupy). Not channels_last: one .contiguous() at the end. FFCV's reader thread runs on the rank's
GPU (`DeviceEpochIterator`, ffcv_loader_patch).

Batches live in FFCV's reusable buffers: a yielded tensor is overwritten a few batches later,
so clone() anything you keep.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
from ffcv.loader import OrderOption
from ffcv.transforms import NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage

from rkan_dist.data.beton import check_beton
from rkan_dist.data.ffcv_loader_patch import DeviceReaderLoader
from rkan_dist.data.ffcv_ops import SeededRandomResizedCropDecoder
from rkan_dist.data.sampling import train_batches_per_rank, train_shard, val_shard
from rkan_dist.schedules import resolution_for_epoch

log = logging.getLogger(__name__)


def pipeline_on_device(device: torch.device) -> bool:
    """Whether batches go to `device` as uint8 and are normalised there (fp16): on CUDA."""
    return device.type == "cuda"


@contextlib.contextmanager
def _keep_torch_threads():
    """FFCV's Loader sets torch's (process-wide) intra-op thread count to its worker count."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def stop_reader(iterator, timeout_s: float = 30.0) -> None:
    """End FFCV's reader thread (a daemon) before the pass is left behind, not only signal it.

    A pass left early (max_steps mid-epoch, a stop request) would leave the thread decoding ahead
    while the process exits; a daemon thread inside a torch op when the interpreter finalizes is
    killed through pthread_exit and aborts the process ("terminate called without an active
    exception"). After close() it finishes at most the batches its queue still has room for, then
    notices the event within FFCV's 0.5 s put timeout.
    """
    iterator.close()
    if iterator.is_alive():
        iterator.join(timeout_s)
        if iterator.is_alive():
            log.warning("FFCV reader thread still running %.0f s after its pass ended", timeout_s)


def _normalize_on_device(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return images.to(torch.float16).sub_(mean).div_(std)


class _Batches:
    """Shared plumbing: build the FFCV Loader, run one planned pass, finish tensors."""

    def __init__(self, path: str, what: str, *, batch_size: int, num_workers: int, os_cache: bool,
                 device: torch.device, channels_last: bool, mean, std, image_decoder, indices=None):
        self.num_samples = check_beton(path, what)
        self.path = str(path)
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.batch_size = batch_size
        self.on_cuda = pipeline_on_device(self.device)
        mean255 = np.array(mean, dtype=np.float64) * 255
        std255 = np.array(std, dtype=np.float64) * 255
        if self.on_cuda:
            image_pipeline = [image_decoder, ToTensor(), ToDevice(self.device, non_blocking=True), ToTorchImage()]
            label_pipeline = [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(self.device, non_blocking=True)]
            self._mean = torch.tensor(mean255, dtype=torch.float16, device=self.device).view(1, 3, 1, 1)
            self._std = torch.tensor(std255, dtype=torch.float16, device=self.device).view(1, 3, 1, 1)
        else:
            image_pipeline = [image_decoder, NormalizeImage(mean255, std255, np.float32), ToTensor(), ToTorchImage()]
            label_pipeline = [IntDecoder(), ToTensor(), Squeeze(1)]
        self.decoder = image_decoder
        with _keep_torch_threads():
            self.loader = DeviceReaderLoader(self.path, batch_size=batch_size, num_workers=max(num_workers, 1),
                                             os_cache=os_cache, order=OrderOption.SEQUENTIAL, distributed=False,
                                             indices=indices,
                                             drop_last=False,  # our planned orders are already cut to whole batches
                                             pipelines={"image": image_pipeline, "label": label_pipeline})
        if self.device.type == "cuda":
            self.loader.reader_device = self.device
        self.order = self.loader.planned_order

    def _run(self, order: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if len(order) == 0:
            return
        self.order.planned = np.asarray(order, dtype=np.uint64)
        threads = torch.get_num_threads()
        iterator = iter(self.loader)
        try:
            for images, labels in iterator:
                # FFCV's reader thread sets torch's (process-wide) thread count to its worker
                # count when it starts; the trainer's own setting should survive that.
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
                yield self._finish(images), labels
        finally:
            stop_reader(iterator)
            torch.set_num_threads(threads)

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        if self.on_cuda:
            images = _normalize_on_device(images, self._mean, self._std)
        return images if self.channels_last else images.contiguous()


class FFCVTrainLoader(_Batches):
    """Random-resized-crop + flip train batches of this rank; see the module docstring."""

    def __init__(self, path: str, *, batch_size: int, num_workers: int, os_cache: bool, seed: int, rank: int,
                 world_size: int, device: torch.device, channels_last: bool, drop_last: bool, min_res: int,
                 max_res: int, start_ramp_epoch: int, end_ramp_epoch: int, min_crop_scale: float, hflip: bool,
                 mean, std):
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last
        self._ramp = (min_res, max_res, start_ramp_epoch, end_ramp_epoch)
        decoder = SeededRandomResizedCropDecoder((min_res, min_res), seed, scale=(min_crop_scale, 1.0), flip=hflip)
        super().__init__(path, "data.train_path", batch_size=batch_size, num_workers=num_workers, os_cache=os_cache,
                         device=device, channels_last=channels_last, mean=mean, std=std, image_decoder=decoder)
        self.steps_per_epoch = train_batches_per_rank(self.num_samples, world_size, batch_size, drop_last)

    def resolution(self, epoch: int) -> int:
        return resolution_for_epoch(epoch, *self._ramp)

    def shard(self, epoch: int, start_sample: int = 0) -> np.ndarray:
        """Sample ids this rank reads in `epoch` once start_sample of its samples are read (in order)."""
        return train_shard(self.seed, epoch, self.num_samples, self.rank, self.world_size, self.batch_size,
                           self.drop_last, start_sample)

    def batches(self, epoch: int, start_sample: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.shard(epoch, start_sample)
        resolution = self.resolution(epoch)
        self.decoder.output_size = (resolution, resolution)
        self.decoder.epoch = epoch
        return self._run(order)


class FFCVValLoader(_Batches):
    """Center-crop val batches; over all ranks every sample exactly once, in file order."""

    def __init__(self, path: str, *, batch_size: int, num_workers: int, os_cache: bool, rank: int,
                 world_size: int, device: torch.device, channels_last: bool, val_res: int, crop_ratio: float,
                 mean, std, classes: list[str]):
        total = check_beton(path, "data.val_path")
        self.shard = val_shard(total, rank, world_size)
        decoder = CenterCropRGBImageDecoder((val_res, val_res), ratio=crop_ratio)
        # FFCV cannot build a loader over zero indices; a rank without val samples yields nothing.
        super().__init__(path, "data.val_path", batch_size=batch_size, num_workers=num_workers, os_cache=os_cache,
                         device=device, channels_last=channels_last, mean=mean, std=std, image_decoder=decoder,
                         indices=self.shard if len(self.shard) else np.arange(min(total, 1)))
        self.num_samples = total
        self.classes = classes

    def __len__(self) -> int:
        return -(-len(self.shard) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._run(self.shard)
