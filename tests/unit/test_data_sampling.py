"""Order, shards and augmentation parameters: the pure functions behind exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rkan_dist.data.sampling import (
    batches_per_rank,
    center_crop_box,
    epoch_permutation,
    epoch_samples,
    train_augmentation,
    train_shard,
    val_shard,
)
from rkan_dist.resume import fit_global_batch
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
        resumed = train_shard(1, 4, 1000, 1, 3, 16, start_sample=start_batch * 16 * 3)
        assert np.array_equal(resumed, full[start_batch * 16:])


def test_the_ranks_micro_batches_read_the_permutation_front_to_back():
    """Micro-batch k of all ranks together is perm[k*b*W : (k+1)*b*W]: the position is a sample count."""
    order = epoch_permutation(3, 1, 500)
    for world_size, batch_size in ((1, 8), (2, 8), (3, 5), (4, 4)):
        shards = [train_shard(3, 1, 500, rank, world_size, batch_size) for rank in range(world_size)]
        for k in range(len(shards[0]) // batch_size):
            read = np.concatenate([shard[k * batch_size:(k + 1) * batch_size] for shard in shards])
            block = order[k * batch_size * world_size:(k + 1) * batch_size * world_size]
            assert sorted(read.tolist()) == sorted(block.tolist())


def read_by_steps(seed, epoch, num_samples, world_size, batch_size, grad_accum, start_sample, steps):
    """Sample ids all ranks read in `steps` optimizer steps from `start_sample` on, as the trainer does."""
    micro_batches = steps * grad_accum
    shards = [train_shard(seed, epoch, num_samples, rank, world_size, batch_size, start_sample=start_sample)
              for rank in range(world_size)]
    assert all(len(shard) >= micro_batches * batch_size for shard in shards)
    return [int(i) for shard in shards for i in shard[:micro_batches * batch_size]]


@pytest.mark.parametrize("before, after", [
    ((2, 24, 1), (1, 24, 2)),  # 2 -> 1 process: same micro-batch, grad_accum doubles
    ((2, 24, 1), (3, 16, 1)),  # 2 -> 3 processes: a smaller per-process batch
    ((2, 16, 2), (4, 16, 1)),
    ((3, 16, 1), (2, 12, 2)),  # 24 per process in micro-batches <= 16
    ((4, 3, 1), (3, 2, 2)),  # 4 per process in micro-batches <= 3
])
def test_a_resize_mid_epoch_reads_every_sample_of_the_epoch_exactly_once(before, after):
    num_samples, seed, epoch = 1437, 11, 2
    (world_a, batch_a, accum_a), (world_b, batch_b, accum_b) = before, after
    global_batch = world_a * batch_a * accum_a
    assert world_b * batch_b * accum_b == global_batch
    assert fit_global_batch(global_batch, world_b, batch_a, accum_a) == (batch_b, accum_b)
    steps_per_epoch = epoch_samples(num_samples, global_batch) // global_batch
    for stop_step in (1, steps_per_epoch // 2, steps_per_epoch - 1):
        first = read_by_steps(seed, epoch, num_samples, world_a, batch_a, accum_a, 0, stop_step)
        rest = read_by_steps(seed, epoch, num_samples, world_b, batch_b, accum_b, stop_step * global_batch,
                             steps_per_epoch - stop_step)
        everything = first + rest
        assert len(everything) == len(set(everything)) == epoch_samples(num_samples, global_batch)
        assert set(everything) == set(epoch_permutation(seed, epoch, num_samples)[:len(everything)].tolist())


def test_an_unaligned_start_still_gives_every_rank_the_same_whole_batches():
    shards = [train_shard(0, 0, 100, rank, 3, 4, start_sample=7) for rank in range(3)]
    assert len({len(shard) for shard in shards}) == 1 and len(shards[0]) % 4 == 0
    read = np.concatenate(shards).tolist()
    assert len(set(read)) == len(read) and not set(read) & set(epoch_permutation(0, 0, 100)[:7].tolist())


def test_epoch_samples_depend_on_the_global_batch_only():
    for world_size, batch_size, accum in ((1, 48, 1), (2, 24, 1), (3, 16, 1), (1, 24, 2), (2, 8, 3)):
        steps = batches_per_rank(1437, world_size, batch_size, drop_last=True) // accum
        assert steps * 48 == epoch_samples(1437, 48) == 29 * 48


def test_bad_rank_or_start_sample_is_a_clear_error():
    with pytest.raises(ValueError, match="rank"):
        train_shard(0, 0, 10, 2, 2, 2)
    with pytest.raises(ValueError, match="start_sample"):
        train_shard(0, 0, 10, 0, 1, 2, start_sample=12)


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
