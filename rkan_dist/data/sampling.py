"""Pure functions that decide what a rank reads and how it is augmented, given (seed, epoch).

Both loaders (FFCV and ImageFolder) use these, so they agree on sample order, shards and crop
boxes, and an interrupted epoch can be resumed exactly: everything a batch contains is a function
of (seed, epoch, rank, world_size, samples already read) and of the sample ids in it - never of how many
batches were drawn before, nor of a random generator's state.

- `epoch_permutation(seed, epoch, n)`: the epoch's global order (numpy's PCG64 seeded by
  (seed, epoch)).
- `train_shard(...)`: this rank's part of it, strided like torch's DistributedSampler
  (perm[rank::world]); with drop_last the tail that does not divide evenly is dropped, otherwise
  the permutation is padded by wrapping around so every rank has the same number of batches.
  Because of the stride, the micro-batches of all ranks together read the permutation front to
  back: after k micro-batches of b images on W ranks exactly perm[:k * b * W] has been read,
  whatever b and W are. The position in an epoch is therefore a number of samples, and a run
  resumed with another world size or batch split (rkan_dist.resume) continues at the same
  sample: every sample of the interrupted epoch is read exactly once across the resize.
- `val_shard(...)`: rank r gets samples r, r+world, ... - every sample exactly once, no padding.
- `train_augmentation` (from `sample_key`, `random_crop_box`, `flip_coin`): the crop box and
  flip of a sample, from counter-based random numbers (splitmix64) keyed by (seed, epoch, sample id). They are numba-jitted so the FFCV decoder calls them inside its
  parallel loop, and plain Python callers (the folder loader) get the very same boxes.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_TWO_POW_MINUS_53 = 1.0 / 9007199254740992.0


def epoch_permutation(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The global sample order of one epoch (int64), identical on every rank."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch]).permutation(num_samples).astype(np.int64)


def samples_per_rank(num_samples: int, world_size: int, drop_last: bool) -> int:
    return num_samples // world_size if drop_last else math.ceil(num_samples / world_size)


def batches_per_rank(num_samples: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    per_rank = samples_per_rank(num_samples, world_size, drop_last)
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def train_batches_per_rank(num_samples: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """batches_per_rank for a train loader, which needs at least one batch per rank."""
    steps = batches_per_rank(num_samples, world_size, batch_size, drop_last)
    if steps == 0:
        raise ValueError(f"data.train_path has {num_samples} samples: fewer than one batch of "
                         f"{batch_size} per rank for {world_size} rank(s); lower data.batch_size")
    return steps


def train_shard(seed: int, epoch: int, num_samples: int, rank: int, world_size: int,
                batch_size: int, drop_last: bool = True, start_sample: int = 0) -> np.ndarray:
    """Sample ids this rank reads in `epoch` once `start_sample` samples of it (all ranks together)
    have been read, to the epoch's end.

    Rank r reads perm[start_sample + r :: world_size] up to the end of the epoch's whole
    micro-batches, so with start_sample = k * batch_size * world_size the result is the suffix
    of the uninterrupted shard from its batch k on, and a start reached with another world size
    continues the same global order (see the module docstring). A start that is not a multiple
    of batch_size * world_size (left by a run with another split) loses less than one
    micro-batch of all ranks at the epoch's end, so that every rank has the same whole batches.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    steps = batches_per_rank(num_samples, world_size, batch_size, drop_last)
    per_rank = samples_per_rank(num_samples, world_size, drop_last)
    end = min(steps * batch_size, per_rank) * world_size  # the samples an epoch of whole batches reads
    if not 0 <= start_sample <= end:
        raise ValueError(f"start_sample must be in [0, {end}] (samples per epoch), got {start_sample}")
    order = epoch_permutation(seed, epoch, num_samples)
    if end > num_samples:  # pad by wrapping around, as DistributedSampler does
        order = np.resize(order, end)
    unit = batch_size * world_size if drop_last else world_size
    stop = start_sample + (end - start_sample) // unit * unit
    return order[start_sample + rank:stop:world_size]


def epoch_samples(num_samples: int, global_batch: int) -> int:
    """Samples one epoch trains on: its whole optimizer steps of `global_batch` images.

    Equal to what the loaders' whole micro-batches give after grad_accum cuts the last window
    (floor(floor(floor(N / W) / b) / a) = floor(N / (W * b * a))), so it depends on the global
    batch only, not on how it is split over processes and micro-batches.
    """
    return num_samples // global_batch * global_batch


def val_shard(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Every sample exactly once over all ranks (ranks differ by at most one sample)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return np.arange(rank, num_samples, world_size, dtype=np.int64)


@njit(cache=True)
def _mix(value):
    value = (value ^ (value >> np.uint64(30))) * _MIX_1
    value = (value ^ (value >> np.uint64(27))) * _MIX_2
    return value ^ (value >> np.uint64(31))


@njit(cache=True)
def sample_key(seed, epoch, sample_id):
    """A 64-bit key for one sample in one epoch; different seeds/epochs give unrelated keys."""
    key = _mix(np.uint64(seed) + _GOLDEN)
    key = _mix(key ^ (np.uint64(epoch) * _GOLDEN + np.uint64(1)))
    return _mix(key ^ (np.uint64(sample_id) + _GOLDEN * np.uint64(2)))


@njit(cache=True)
def uniform(key, counter):
    """The counter-th uniform float in [0, 1) of the stream named by key."""
    bits = _mix(key + _GOLDEN * np.uint64(counter + 1))
    return float(bits >> np.uint64(11)) * _TWO_POW_MINUS_53


@njit(cache=True)
def random_crop_box(height, width, scale_min, scale_max, log_ratio_min, log_ratio_max, key):
    """(top, left, crop_height, crop_width) of a random-resized crop (the Inception recipe):
    up to 10 tries of an area fraction in [scale_min, scale_max] and a log-uniform aspect ratio;
    if none fits, the largest centred crop with the ratio clamped to the allowed range."""
    area = float(height) * float(width)
    for attempt in range(10):
        target_area = area * (scale_min + (scale_max - scale_min) * uniform(key, 4 * attempt))
        aspect = math.exp(log_ratio_min + (log_ratio_max - log_ratio_min) * uniform(key, 4 * attempt + 1))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(uniform(key, 4 * attempt + 2) * (height - crop_h + 1))
            left = int(uniform(key, 4 * attempt + 3) * (width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = float(width) / float(height)
    ratio_min = math.exp(log_ratio_min)
    ratio_max = math.exp(log_ratio_max)
    if in_ratio < ratio_min:
        crop_w = width
        crop_h = int(round(crop_w / ratio_min))
    elif in_ratio > ratio_max:
        crop_h = height
        crop_w = int(round(crop_h * ratio_max))
    else:
        crop_w = width
        crop_h = height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


@njit(cache=True)
def flip_coin(key):
    """True for half of the (seed, epoch, sample) keys: the horizontal-flip decision."""
    return uniform(key, 1000) < 0.5


@njit(cache=True)
def train_augmentation(seed, epoch, sample_id, height, width, scale_min, scale_max, log_ratio_min, log_ratio_max,
                       allow_flip):
    """(top, left, crop_height, crop_width, flip) of one sample in one epoch: what both loaders do."""
    key = sample_key(seed, epoch, sample_id)
    top, left, crop_h, crop_w = random_crop_box(height, width, scale_min, scale_max, log_ratio_min, log_ratio_max, key)
    return top, left, crop_h, crop_w, allow_flip and flip_coin(key)


def center_crop_box(height: int, width: int, crop_ratio: float) -> tuple[int, int, int, int]:
    """(top, left, side, side) of the centred square whose side is crop_ratio * the short side
    (FFCV's CenterCropRGBImageDecoder; then resized to the val resolution)."""
    side = max(1, int(crop_ratio * min(height, width)))
    return (height - side) // 2, (width - side) // 2, side, side
