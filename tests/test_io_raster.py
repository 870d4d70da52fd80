"""PNG/JPEG/BMP: grey, RGB(A), 16-bit, palette; PNG label round trip; damaged files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from napari_medseg.errors import ImageReadError, ImageWriteError
from napari_medseg.io import read_image, write_labels


def test_modes(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (12, 16), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    image, meta = read_image(tmp_path / "g.png")
    assert meta.axes == "YX" and not meta.rgb and np.array_equal(image, grey)
    assert meta.spacing == (1.0, 1.0) and meta.units == (None, None)
    rgba = rng.integers(0, 255, (12, 16, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "c.png")
    image, meta = read_image(tmp_path / "c.png")
    assert meta.axes == "YXC" and meta.rgb and np.array_equal(image, rgba)
    deep = rng.integers(0, 60000, (8, 9), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    image, _ = read_image(tmp_path / "d.png")
    assert image.dtype == np.uint16 and np.array_equal(image, deep)
    palette = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "p.png")
    image, meta = read_image(tmp_path / "p.png")
    assert np.array_equal(image, [[0, 1], [2, 1]]) and meta.extra["palette_indices"]
    Image.fromarray(rgba[..., :3]).save(tmp_path / "j.jpg", quality=95)
    image, meta = read_image(tmp_path / "j.jpg")
    assert meta.rgb and image.shape == (12, 16, 3)
    Image.fromarray(rgba[..., :3]).save(tmp_path / "b.bmp")
    image, _ = read_image(tmp_path / "b.bmp")
    assert np.array_equal(image, rgba[..., :3])


def test_truncated_png(tmp_path):
    noise = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.png is truncated or damaged"):
        read_image(tmp_path / "cut.png")


def test_png_labels_round_trip_and_limits(tmp_path):
    labels = np.zeros((10, 10), np.int32)
    labels[2:5, 2:5] = 300
    out = write_labels(tmp_path / "mask.png", labels)
    back, meta = read_image(out)
    assert back.dtype == np.uint16 and np.array_equal(back, labels) and meta.axes == "YX"
    with pytest.raises(ImageWriteError, match="beyond PNG's 16-bit range"):
        write_labels(tmp_path / "big.png", np.full((4, 4), 70000, np.int32))
    with pytest.raises(ImageWriteError, match="PNG holds one 2-D image"):
        write_labels(tmp_path / "vol.png", np.zeros((2, 4, 4), np.uint8))
