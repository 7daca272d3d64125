"""Read any image file the writer meets into an RGB uint8 array, or say exactly why not.

FFCV's writer only accepts HxWx3 uint8 arrays, and an exception inside its worker processes can
hang the parent, so every file is opened, fully decoded and normalised here first. What can be
converted is converted (grayscale, palette, CMYK, 16-bit, alpha); what cannot raises
`UnreadableImage` with a reason that ends up in the writer's skipped-files report.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# Alpha is composited onto white: what a viewer shows for a transparent PNG and what the
# ImageNet-style pipelines (PIL .convert after compositing) produce.
ALPHA_BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class UnreadableImage(Exception):
    """The file cannot become an RGB image; str(err) is the reason for the report."""


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """The image at `path` as a C-contiguous HxWx3 uint8 array."""
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise UnreadableImage(f"cannot read file: {err.strerror or err}") from None
    if size == 0:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF/ICC warnings are noise here; errors still raise
            with Image.open(path) as image:
                image.load()  # decode everything now: a truncated file fails here, not later
                array = to_rgb_array(image)
    except UnidentifiedImageError:
        raise UnreadableImage("not an image (format not recognised)") from None
    except Image.DecompressionBombError as err:
        raise UnreadableImage(f"too many pixels (decompression-bomb guard): {err}") from None
    except UnreadableImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as err:
        raise UnreadableImage(f"truncated or corrupt image data: {err}") from None
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise UnreadableImage(f"image has no pixels ({array.shape[1]}x{array.shape[0]})")
    return array


def to_rgb_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit grayscale: PIL's convert("RGB") would clip everything above 255 to white.
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            raise UnreadableImage("float image without a single finite pixel")
        scale = 255.0 if finite.max() <= 1.0 else 1.0
        gray = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    has_alpha = mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        image = Image.alpha_composite(background, rgba)
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise UnreadableImage(f"could not convert mode {mode!r} to RGB (got shape {array.shape})")
    return np.ascontiguousarray(array)
