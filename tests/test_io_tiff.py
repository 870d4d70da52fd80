"""TIFF and OME-TIFF: axes, pixel size from OME/ImageJ/resolution tags, round trips, bad files."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_medseg.errors import ImageReadError
from napari_medseg.io import ImageMeta, read_image, read_levels, write_image, write_labels
from napari_medseg.io import tiff as tiff_module


def _stack(shape=(3, 20, 30), dtype=np.uint16):
    return (np.arange(int(np.prod(shape))) % 251).reshape(shape).astype(dtype)


def test_ome_physical_size_and_position(tmp_path):
    path = tmp_path / "a.ome.tif"
    data = _stack()
    tifffile.imwrite(path, data, ome=True, metadata={
        "axes": "ZYX",
        "PhysicalSizeX": 0.65, "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": 0.6, "PhysicalSizeYUnit": "µm",
        "PhysicalSizeZ": 2.0, "PhysicalSizeZUnit": "µm",
        "Plane": {"PositionX": [5.0] * 3, "PositionXUnit": ["µm"] * 3,
                  "PositionY": [7.0] * 3, "PositionYUnit": ["µm"] * 3},
    })
    image, meta = read_image(path)
    assert np.array_equal(image, data)
    assert meta.axes == "ZYX"
    assert meta.spacing == (2.0, 0.6, 0.65)
    assert meta.units == ("micrometer",) * 3
    assert meta.origin == (0.0, 7.0, 5.0)
    assert meta.affine is None and meta.extra["format"] == "tiff"


def test_imagej_spacing_and_unit(tmp_path):
    path = tmp_path / "ij.tif"
    data = _stack(dtype=np.uint8)
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 0.004, 1 / 0.004),
                     metadata={"spacing": 0.05, "unit": "um", "axes": "ZYX"})
    _, meta = read_image(path)
    assert meta.axes == "ZYX"
    assert meta.spacing == pytest.approx((0.05, 0.004, 0.004))
    assert meta.units == ("micrometer",) * 3


def test_plain_tiff_with_centimetre_resolution(tmp_path):
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, _stack((20, 30), np.uint8), resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    _, meta = read_image(path)
    assert meta.axes == "YX" and meta.spacing == pytest.approx((0.5, 0.5))
    assert meta.units == ("micrometer", "micrometer")
    tifffile.imwrite(path, _stack((20, 30), np.uint8))  # no resolution: pixels
    _, meta = read_image(path)
    assert meta.spacing == (1.0, 1.0) and meta.units == (None, None)


def test_rgb_contiguous_and_planar(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    image, meta = read_image(tmp_path / "rgb.tif")
    assert meta.axes == "YXC" and meta.rgb and np.array_equal(image, rgb)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    image, meta = read_image(tmp_path / "planar.tif")
    assert meta.axes == "YXC" and meta.rgb and np.array_equal(image, rgb)


def test_channels_and_singleton_axes(tmp_path):
    data = _stack((1, 4, 2, 16, 16))  # T=1, Z=4, C=2
    tifffile.imwrite(tmp_path / "h.ome.tif", data, ome=True, metadata={"axes": "TZCYX"})
    image, meta = read_image(tmp_path / "h.ome.tif")
    assert meta.axes == "ZCYX" and meta.channel_axis == 1
    assert np.array_equal(image, data[0])


def test_five_d_is_refused_with_the_shape(tmp_path):
    path = tmp_path / "big.ome.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 2, 8, 8), np.uint8), ome=True, metadata={"axes": "TZCYX"})
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert "big.ome.tif" in message and "5-D" in message and "TZCYX" in message


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_truncated_file_is_reported(tmp_path, compression):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, _stack((3, 64, 64)), compression=compression)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.tif is truncated"):
        read_image(path)
    path.write_bytes(data[:100])
    with pytest.raises(ImageReadError, match=r"cut\.tif"):
        read_image(path)


def test_labels_round_trip_keeps_geometry_and_affine(tmp_path):
    affine = np.array([[-0.7, 0, 0, 20.0], [0, -0.7, 0, 30.0], [0, 0, 2.5, -100.0], [0, 0, 0, 1]])
    meta = ImageMeta(axes="ZYX", spacing=(2.5, 0.7, 0.7), origin=(-100.0, 30.0, 20.0),
                     units=("mm",) * 3, affine=affine, extra={"modality": "CT"})
    labels = np.zeros((4, 10, 12), np.uint16)
    labels[1:3, 2:5, 3:9] = 700
    path = write_labels(tmp_path / "mask.tif", labels, meta)
    back, back_meta = read_image(path)
    assert back.dtype == np.uint16 and np.array_equal(back, labels)
    assert back_meta.spacing == meta.spacing and back_meta.origin == meta.origin
    assert back_meta.units == meta.units and np.array_equal(back_meta.affine, affine)
    assert back_meta.extra["modality"] == "CT" and back_meta.extra["labels"] is True
    # and again: read -> write -> read is stable
    path2 = write_labels(tmp_path / "mask2.ome.tif", back, back_meta)
    again, again_meta = read_image(path2)
    assert np.array_equal(again, labels)
    assert again_meta.replace(source=None) == back_meta.replace(source=None)
    # other software sees the physical size through standard OME-XML
    with tifffile.TiffFile(path) as tif:
        assert 'PhysicalSizeZ="2.5"' in tif.ome_metadata and 'PhysicalSizeZUnit="mm"' in tif.ome_metadata


def test_image_round_trip_rgb_and_index_axis(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (12, 14, 3), dtype=np.uint8)
    path = write_image(tmp_path / "rgb.tif", rgb, ImageMeta(axes="YXC", rgb=True, spacing=(0.5, 0.5), units=("um", "um")))
    back, meta = read_image(path)
    assert meta.rgb and meta.axes == "YXC" and np.array_equal(back, rgb) and meta.spacing == (0.5, 0.5)
    patches = np.random.default_rng(2).random((3, 8, 8)).astype(np.float32)
    path = write_image(tmp_path / "p.tif", patches, ImageMeta(axes="IYX", spacing=(2.0, 2.0), units=("mm", "mm")))
    back, meta = read_image(path)
    assert meta.axes == "IYX" and np.array_equal(back, patches) and meta.spacing == (2.0, 2.0)


def test_pyramid_levels(tmp_path):
    path = tmp_path / "pyr.ome.tif"
    base = _stack((64, 64), np.uint8)
    with tifffile.TiffWriter(path) as tif:
        tif.write(base, subifds=1, metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        tif.write(base[::2, ::2], subfiletype=1)
    levels, metas = read_levels(path)
    assert [lv.shape for lv in levels] == [(64, 64), (32, 32)]
    assert metas[0].extra["n_levels"] == 2
    image, meta = read_image(path, level=1)
    assert image.shape == (32, 32) and meta.extra["level"] == 1
    with pytest.raises(ImageReadError, match="level 5 does not exist"):
        read_image(path, level=5)


def test_large_files_are_read_lazily(tmp_path, monkeypatch):
    path = tmp_path / "lazy.tif"
    data = _stack((4, 32, 32))
    write_image(path, data, ImageMeta(axes="ZYX", spacing=(2.0, 1.0, 1.0), units=("um",) * 3))
    monkeypatch.setattr(tiff_module, "LAZY_BYTES", 100)
    image, meta = read_image(path)
    assert type(image).__module__.startswith("dask")
    assert np.array_equal(np.asarray(image), data) and meta.spacing == (2.0, 1.0, 1.0)
