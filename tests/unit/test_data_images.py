"""Every kind of file the writer meets: converted to RGB uint8, or refused with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rkan_dist.data.images import UnreadableImage, load_rgb

pytestmark = pytest.mark.unit


def _rgb(tmp_path, name="a.jpg", size=(20, 30)):
    path = tmp_path / name
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, quality=95)
    return path


def test_rgb_jpeg_round_trips_as_uint8(tmp_path):
    array = load_rgb(_rgb(tmp_path))
    assert array.dtype == np.uint8 and array.shape == (20, 30, 3) and array.flags.c_contiguous


@pytest.mark.parametrize("mode, values, name", [
    ("L", np.full((5, 6), 77, np.uint8), "gray.png"),
    ("CMYK", np.zeros((5, 6, 4), np.uint8), "cmyk.jpg"),
    ("RGBA", np.dstack([np.full((5, 6, 3), 0, np.uint8), np.zeros((5, 6), np.uint8)]), "alpha.png"),
])
def test_convertible_modes_become_rgb(tmp_path, mode, values, name):
    Image.fromarray(values, mode=mode).save(tmp_path / name)
    array = load_rgb(tmp_path / name)
    assert array.shape == (5, 6, 3) and array.dtype == np.uint8
    if mode == "L":
        assert np.all(array == 77)
    if mode == "CMYK":  # no ink is white
        assert np.all(array == 255)
    if mode == "RGBA":  # fully transparent black pixels over white
        assert np.all(array == 255)


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((4, 4), 65535 // 2, np.uint16)).save(tmp_path / "g16.png")
    array = load_rgb(tmp_path / "g16.png")
    assert np.all(np.abs(array.astype(int) - 127) <= 1)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    assert np.all(load_rgb(tmp_path / "p.png") == 255)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"just some text\n", "not an image"),
    (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2, "not an image|corrupt"),
])
def test_unreadable_files_say_why(tmp_path, content, reason):
    (tmp_path / "bad.jpg").write_bytes(content)
    with pytest.raises(UnreadableImage, match=reason):
        load_rgb(tmp_path / "bad.jpg")


def test_truncated_jpeg_is_refused(tmp_path):
    data = _rgb(tmp_path, size=(64, 64)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImage, match="truncated"):
        load_rgb(tmp_path / "cut.jpg")
