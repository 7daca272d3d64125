"""FFCV and folder loaders on the real digits files: content, labels, resume, resizing, errors."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rkan_dist.config import DataConfig
from rkan_dist.data import build_loaders
from rkan_dist.data.beton import read_labels
from rkan_dist.data.demo import digits_split
from rkan_dist.data.ffcv_loaders import FFCVTrainLoader
from rkan_dist.data.images import load_rgb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def digits_config(digits_data, **overrides) -> DataConfig:
    options = dict(dataset="digits", format="ffcv", cache_dir=str(digits_data.train_beton.parent.parent),
                   batch_size=32, val_batch_size=50, num_workers=1, min_res=32, max_res=32, val_res=32,
                   crop_ratio=1.0, min_crop_scale=0.35, hflip=True, mean=MEAN, std=STD)
    options.update(overrides)
    return DataConfig(**options)


def source_pixels(folder: Path) -> tuple[np.ndarray, list[int]]:
    """Every image of an ImageFolder tree, in ImageFolder order, with its class index."""
    from torchvision.datasets import ImageFolder

    samples = ImageFolder(str(folder)).samples
    return np.stack([load_rgb(path) for path, _ in samples]), [label for _, label in samples]


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: NCHW float -> NHWC uint8."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() * std + mean).mul(255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module", params=["ffcv", "folder"])
def loaders(request, digits_data):
    return request.param, *build_loaders(digits_config(digits_data, format=request.param), seed=11,
                                         device=torch.device("cpu"), channels_last=True)


def test_demo_split_is_stratified_and_matches_the_files(digits_data):
    train_images, train_labels, val_images, val_labels = digits_split()
    assert (len(train_labels), len(val_labels)) == (1437, 360)
    assert np.array_equal(np.bincount(val_labels) * 4, np.bincount(train_labels)) or \
        np.abs(np.bincount(val_labels) / 360 - np.bincount(train_labels) / 1437).max() < 0.01
    assert read_labels(digits_data.train_beton).tolist() == sorted(train_labels.tolist())
    assert read_labels(digits_data.val_beton).tolist() == sorted(val_labels.tolist())
    assert sum(1 for _ in digits_data.val_dir.rglob("*.jpg")) == 360
    assert digits_data.classes == [str(digit) for digit in range(10)]


def test_train_batches_have_the_right_shapes_dtypes_and_labels(loaders, digits_data):
    kind, train, _ = loaders
    labels = read_labels(digits_data.train_beton)
    assert train.num_samples == 1437 and train.steps_per_epoch == 1437 // 32
    batches = 0
    for index, (images, batch_labels) in enumerate(train.batches(0)):
        assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert batch_labels.dtype == torch.int64
        assert batch_labels.tolist() == labels[train.shard(0)[index * 32:(index + 1) * 32]].tolist(), kind
        batches += 1
    assert batches == train.steps_per_epoch
    assert -3 < images.mean().item() < 3 and images.std().item() > 0.3  # normalised, not 0-255


def test_val_images_and_labels_are_the_source_images(loaders, digits_data):
    kind, _, val = loaders
    expected_pixels, expected_labels = source_pixels(digits_data.val_dir)
    pixels, labels = [], []
    for images, batch_labels in val:
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
        pixels.append(to_pixels(images))
        labels += batch_labels.tolist()
    assert val.num_samples == 360 and val.classes == digits_data.classes
    assert labels == expected_labels
    difference = np.abs(np.concatenate(pixels).astype(int) - expected_pixels.astype(int))
    assert difference.max() <= (0 if kind == "ffcv" else 1), kind  # exact copy; folder: float rounding


def test_resume_mid_epoch_yields_the_same_batches(loaders):
    kind, train, _ = loaders
    full = [(images.clone(), labels.clone()) for images, labels in train.batches(3)]
    start = 17
    resumed = [(images.clone(), labels.clone()) for images, labels in train.batches(3, start_sample=start * 32)]
    assert len(resumed) == len(full) - start
    for (images, labels), (expected_images, expected_labels) in zip(resumed, full[start:]):
        assert torch.equal(labels, expected_labels)
        assert torch.equal(images, expected_images), kind
    another_epoch = next(iter(train.batches(4)))[1]
    assert not torch.equal(another_epoch, full[0][1])


def test_resume_of_one_rank_of_two_reads_only_its_shard(digits_data):
    options = dict(batch_size=16, num_workers=1, os_cache=False, seed=5, world_size=2, device=torch.device("cpu"),
                   channels_last=False, drop_last=True, min_res=32, max_res=32, start_ramp_epoch=0, end_ramp_epoch=0,
                   min_crop_scale=0.5, hflip=True, mean=MEAN, std=STD)
    rank1 = FFCVTrainLoader(str(digits_data.train_beton), rank=1, **options)
    full = [(images.clone(), labels.clone()) for images, labels in rank1.batches(2)]
    resumed = [(images.clone(), labels.clone()) for images, labels in rank1.batches(2, start_sample=40 * 16 * 2)]
    assert rank1.steps_per_epoch == 1437 // 2 // 16 == len(full)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, full[40:]))
    assert len(resumed) == len(full) - 40 > 0


def test_ffcv_and_folder_loaders_agree_on_order_and_crops(digits_data):
    batches = {}
    for kind in ("ffcv", "folder"):
        train, _ = build_loaders(digits_config(digits_data, format=kind), seed=2, device=torch.device("cpu"),
                                 channels_last=False)
        batches[kind] = [(images.clone(), labels.clone()) for _, (images, labels) in zip(range(5), train.batches(1))]
    for (ffcv_images, ffcv_labels), (folder_images, folder_labels) in zip(batches["ffcv"], batches["folder"]):
        assert torch.equal(ffcv_labels, folder_labels)
        # same boxes and flips; only the resize filter differs (OpenCV area vs. antialiased bilinear)
        assert (ffcv_images - folder_images).abs().mean().item() < 0.1


def test_progressive_resizing_changes_the_train_resolution_at_the_scheduled_epochs(digits_data):
    config = digits_config(digits_data, min_res=32, max_res=96, start_ramp_epoch=1, end_ramp_epoch=3, val_res=48)
    train, val = build_loaders(config, seed=0, device=torch.device("cpu"), channels_last=True)
    sizes = []
    for epoch in range(5):
        images, _ = next(iter(train.batches(epoch)))  # abandoning the epoch after one batch is allowed
        sizes.append(tuple(images.shape[2:]))
        assert train.resolution(epoch) == images.shape[-1]
    assert sizes == [(32, 32), (32, 32), (64, 64), (96, 96), (96, 96)]
    assert next(iter(val))[0].shape[2:] == (48, 48)


def test_loaders_leave_torch_thread_count_alone(digits_data):
    torch.set_num_threads(2)
    train, val = build_loaders(digits_config(digits_data), seed=0, device=torch.device("cpu"), channels_last=False)
    for _ in train.batches(0):
        pass
    assert torch.get_num_threads() == 2


def test_missing_truncated_and_wrong_beton_files_are_clear_errors(digits_data, tmp_path):
    def build(train_path, val_path=digits_data.val_beton):
        config = DataConfig(dataset="files", format="ffcv", train_path=str(train_path), val_path=str(val_path),
                            batch_size=8, num_workers=1)
        return build_loaders(config, seed=0, device=torch.device("cpu"), channels_last=False)

    with pytest.raises(ValueError, match="no such .beton file"):
        build(tmp_path / "nowhere.beton")
    truncated = tmp_path / "cut.beton"
    data = digits_data.train_beton.read_bytes()
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        build(truncated)
    wrong = tmp_path / "wrong.beton"
    _write_with_ffcv(wrong)
    with pytest.raises(ValueError, match="wrong fields"):
        build(wrong)
    with pytest.raises(ValueError, match="truncated"):
        (tmp_path / "tiny.beton").write_bytes(b"\x02\x00")
        build(tmp_path / "tiny.beton")


def _write_with_ffcv(path: Path) -> None:
    from ffcv.fields import FloatField, IntField
    from ffcv.writer import DatasetWriter

    dataset = [(float(index), index) for index in range(10)]
    DatasetWriter(str(path), {"score": FloatField(), "label": IntField()}, num_workers=1).from_indexed_dataset(dataset)


def test_train_and_val_with_different_classes_are_refused(digits_data, tmp_path):
    for split in ("train", "val"):
        shutil.copy(getattr(digits_data, f"{split}_beton"), tmp_path / f"{split}.beton")
        shutil.copy(f"{getattr(digits_data, f'{split}_beton')}.classes.json", tmp_path / f"{split}.beton.classes.json")
    (tmp_path / "val.beton.classes.json").write_text('["0","1","2","3","4","5","6","7","8","nine"]')
    config = DataConfig(dataset="files", format="ffcv", train_path=str(tmp_path / "train.beton"),
                        val_path=str(tmp_path / "val.beton"), batch_size=8, num_workers=1)
    with pytest.raises(ValueError, match="class lists differ"):
        build_loaders(config, seed=0, device=torch.device("cpu"), channels_last=False)


def test_val_shards_of_two_ranks_cover_the_set_once(digits_data):
    from rkan_dist.data.ffcv_loaders import FFCVValLoader

    labels = []
    for rank in range(2):
        val = FFCVValLoader(str(digits_data.val_beton), batch_size=64, num_workers=1, os_cache=False, rank=rank,
                            world_size=2, device=torch.device("cpu"), channels_last=False, val_res=32, crop_ratio=1.0,
                            mean=MEAN, std=STD, classes=digits_data.classes)
        labels.append([label for _, batch in val for label in batch.tolist()])
        assert len(val) == math.ceil(180 / 64)
    assert sorted(labels[0] + labels[1]) == read_labels(digits_data.val_beton).tolist()


def test_a_pass_left_early_ends_ffcvs_reader_thread(digits_data):
    """Stopping mid-epoch (max_steps, a USR2 stop) must not leave FFCV's daemon reader decoding
    ahead: a daemon thread inside a torch op at interpreter exit aborts the process."""
    import threading

    from ffcv.loader.epoch_iterator import EpochIterator

    train, _ = build_loaders(digits_config(digits_data, format="ffcv", batch_size=8), seed=3,
                             device=torch.device("cpu"), channels_last=True)
    before = {thread for thread in threading.enumerate() if isinstance(thread, EpochIterator)}
    batches = train.batches(epoch=0)
    next(batches)  # the reader has started and decodes ahead (the epoch has 179 batches)
    readers = [thread for thread in threading.enumerate() if isinstance(thread, EpochIterator)
               and thread not in before]
    assert len(readers) == 1 and readers[0].is_alive()
    batches.close()  # what leaving a for loop over the pass does
    assert not readers[0].is_alive()
