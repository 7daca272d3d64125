"""The embedded default dataset: scikit-learn's 1,797 handwritten digits as a small ImageFolder.

`load_digits()` ships inside scikit-learn (no download). Each 8x8 image (values 0-16) is scaled
to 0-255, upscaled with bicubic interpolation to `image_size` px, made RGB, and saved as a JPEG
(quality 95) under <cache>/digits-<size>px/{train,val}/<digit>/<index>.jpg. The split is
stratified 80/20 with a fixed random_state, so every machine builds the same files. The trees are
then written to train.beton / val.beton (raw pixels: at 32 px JPEG would only add loss).

Several processes may call `ensure_digits` at once (one per rank, or several nodes sharing a
cache folder): everything is built in a private temporary folder and moved into place with one
rename; whoever loses the race deletes its copy and uses the winner's (they are identical).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rkan_dist.data.write import write_beton

DIGIT_CLASSES = [str(digit) for digit in range(10)]
SPLIT_SEED = 0
VAL_FRACTION = 0.2


@dataclass(frozen=True)
class DigitsPaths:
    train_beton: Path
    val_beton: Path
    train_dir: Path
    val_dir: Path
    classes: list[str]


def digits_root(cache_dir: str | os.PathLike, image_size: int = 32) -> Path:
    return Path(cache_dir).expanduser() / f"digits-{image_size}px"


def _paths(root: Path) -> DigitsPaths:
    return DigitsPaths(train_beton=root / "train.beton", val_beton=root / "val.beton", train_dir=root / "train",
                       val_dir=root / "val", classes=list(DIGIT_CLASSES))


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, val images, val labels); images are 8x8 uint8 in 0-255."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    train_images, val_images, train_labels, val_labels = train_test_split(
        images, digits.target, test_size=VAL_FRACTION, stratify=digits.target, random_state=SPLIT_SEED)
    return train_images, train_labels, val_images, val_labels


def _save_tree(folder: Path, images: np.ndarray, labels: np.ndarray, image_size: int) -> None:
    from PIL import Image

    for name in DIGIT_CLASSES:
        (folder / name).mkdir(parents=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        big = Image.fromarray(image, mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC)
        big.convert("RGB").save(folder / str(label) / f"{index:04d}.jpg", quality=95)


def ensure_digits(cache_dir: str | os.PathLike, image_size: int = 32) -> DigitsPaths:
    """Build the digits trees and .beton files under cache_dir unless they are already there."""
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    root = digits_root(cache_dir, image_size)
    paths = _paths(root)
    if paths.train_beton.is_file() and paths.val_beton.is_file():
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        train_images, train_labels, val_images, val_labels = digits_split()
        for split, images, labels in (("train", train_images, train_labels), ("val", val_images, val_labels)):
            _save_tree(staging / split, images, labels, image_size)
            write_beton(staging / split, staging / f"{split}.beton", max_side=image_size, mode="raw",
                        workers=1, progress=False)
        try:
            os.rename(staging, root)  # atomic; fails if another process got there first
        except OSError:
            if not (paths.train_beton.is_file() and paths.val_beton.is_file()):
                raise RuntimeError(f"{root} exists but lacks train.beton/val.beton (an interrupted build by an "
                                   f"older version?); delete that folder and run again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths
