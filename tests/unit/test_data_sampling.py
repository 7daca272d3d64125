"""Order, shards and augmentation parameters: the pure functions behind exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rkan_dist.data.sampling import (
    batches_per_rank,
    center_crop_box,
    epoch_permutation,
    train_augmentation,
    train_shard,
    val_shard,
)
from rkan_dist.schedules import resolution_for_epoch

pytestmark = pytest.mark.unit
LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert np.array_equal(epoch_permutation(3, 5, 100), epoch_permutation(3, 5, 100))
    assert not np.array_equal(epoch_permutation(3, 5, 100), epoch_permutation(3, 6, 100))
    assert not np.array_equal(epoch_permutation(3, 5, 100), epoch_permutation(4, 5, 100))
    assert sorted(epoch_permutation(0, 0, 100)) == list(range(100))


@pytest.mark.parametrize("num_samples, world_size, batch_size", [(100, 2, 10), (96, 4, 8), (17, 1, 4)])
def test_train_shards_are_disjoint_and_cover_the_whole_batches(num_samples, world_size, batch_size):
    shards = [train_shard(7, 2, num_samples, rank, world_size, batch_size) for rank in range(world_size)]
    steps = batches_per_rank(num_samples, world_size, batch_size, drop_last=True)
    seen = np.concatenate(shards)
    assert all(len(shard) == steps * batch_size for shard in shards)
    assert len(set(seen.tolist())) == len(seen)  # disjoint
    if num_samples % (world_size * batch_size) == 0:
        assert sorted(seen.tolist()) == list(range(num_samples))  # covering
    else:
        assert num_samples - len(seen) < world_size * batch_size + world_size


def test_train_shard_without_drop_last_pads_so_every_rank_has_the_same_batches():
    shards = [train_shard(0, 0, 11, rank, 2, 4, drop_last=False) for rank in range(2)]
    assert [len(shard) for shard in shards] == [6, 6]
    assert set(np.concatenate(shards).tolist()) == set(range(11))
    assert batches_per_rank(11, 2, 4, drop_last=False) == 2


def test_resumed_shard_is_the_suffix_of_the_full_one():
    full = train_shard(1, 4, 1000, 1, 3, 16)
    for start_batch in (0, 1, 5, len(full) // 16):
        assert np.array_equal(train_shard(1, 4, 1000, 1, 3, 16, start_batch=start_batch), full[start_batch * 16:])


def test_bad_rank_or_start_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="rank"):
        train_shard(0, 0, 10, 2, 2, 2)
    with pytest.raises(ValueError, match="start_batch"):
        train_shard(0, 0, 10, 0, 1, 2, start_batch=6)


def test_val_shards_hold_every_sample_exactly_once():
    for world_size in (1, 2, 3, 7):
        seen = np.concatenate([val_shard(101, rank, world_size) for rank in range(world_size)])
        assert sorted(seen.tolist()) == list(range(101))


def test_augmentation_is_a_function_of_seed_epoch_and_sample():
    args = (300, 400, 0.08, 1.0, *LOG_RATIO, True)
    assert train_augmentation(0, 1, 5, *args) == train_augmentation(0, 1, 5, *args)
    boxes = {train_augmentation(0, epoch, 5, *args) for epoch in range(20)}
    assert len(boxes) == 20
    for sample in range(500):
        top, left, height, width, _ = train_augmentation(3, 0, sample, *args)
        assert top >= 0 and top + height <= 300 and left >= 0 and left + width <= 400 and height > 0 and width > 0
    flips = [train_augmentation(3, 0, sample, *args)[4] for sample in range(2000)]
    assert 0.45 < np.mean(flips) < 0.55
    assert not any(train_augmentation(3, 0, sample, 300, 400, 0.08, 1.0, *LOG_RATIO, False)[4] for sample in range(200))


def test_full_scale_crop_of_a_square_keeps_the_whole_image_often():
    box = train_augmentation(0, 0, 0, 32, 32, 1.0, 1.0, 0.0, 0.0, False)
    assert box[:4] == (0, 0, 32, 32)


def test_center_crop_box():
    assert center_crop_box(256, 512, 0.875) == (16, 144, 224, 224)
    assert center_crop_box(32, 32, 1.0) == (0, 0, 32, 32)


def test_progressive_resizing_schedule_used_by_the_train_loaders():
    sizes = [resolution_for_epoch(epoch, 160, 192, 2, 6) for epoch in range(8)]
    assert sizes[:3] == [160, 160, 160] and sizes[-2:] == [192, 192]
    assert all(size % 32 == 0 for size in sizes)


def test_train_loader_needs_one_batch_per_rank():
    from rkan_dist.data.sampling import train_batches_per_rank

    assert train_batches_per_rank(100, 2, 16, drop_last=True) == 3
    with pytest.raises(ValueError, match="fewer than one batch of 64 per rank for 2 rank"):
        train_batches_per_rank(100, 2, 64, drop_last=True)
