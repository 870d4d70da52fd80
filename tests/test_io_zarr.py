"""zarr and OME-Zarr: lazy reading, NGFF transforms, pyramids, labels groups, round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from napari_medseg.errors import ImageReadError, ImageWriteError
from napari_medseg.io import ImageMeta, read_image, read_levels, write_image, write_labels


def _ngff_group(path, data, axes, transforms, global_transforms=None, zarr_format=2, version="0.4"):
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    datasets = []
    for i, (level, tr) in enumerate(zip(data, transforms)):
        arr = group.create_array(str(i), shape=level.shape, dtype=level.dtype, chunks=level.shape)
        arr[...] = level
        datasets.append({"path": str(i), "coordinateTransformations": tr})
    ms = {"version": version, "axes": axes, "datasets": datasets}
    if global_transforms:
        ms["coordinateTransformations"] = global_transforms
    if zarr_format == 3:
        group.attrs.update({"ome": {"version": version, "multiscales": [ms]}})
    else:
        group.attrs.update({"multiscales": [ms]})
    return group


AXES_5D = [
    {"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
    {"name": "z", "type": "space", "unit": "micrometer"},
    {"name": "y", "type": "space", "unit": "micrometer"},
    {"name": "x", "type": "space", "unit": "micrometer"},
]


def test_ngff_04_pyramid_with_transforms_is_lazy(tmp_path):
    base = np.random.default_rng(0).integers(0, 1000, (1, 1, 4, 32, 32)).astype(np.uint16)
    levels = [base, base[..., ::2, ::2]]
    transforms = [
        [{"type": "scale", "scale": [1, 1, 2.0, 0.5, 0.5]}, {"type": "translation", "translation": [0, 0, 10.0, 1.0, 2.0]}],
        [{"type": "scale", "scale": [1, 1, 2.0, 1.0, 1.0]}, {"type": "translation", "translation": [0, 0, 10.0, 1.25, 2.25]}],
    ]
    path = tmp_path / "img.ome.zarr"
    _ngff_group(path, levels, AXES_5D, transforms, global_transforms=[{"type": "scale", "scale": [1, 1, 1, 2, 2]}])
    image, meta = read_image(path)
    assert type(image).__module__.startswith("dask")
    assert meta.axes == "ZYX" and image.shape == (4, 32, 32)
    assert np.array_equal(np.asarray(image), base[0, 0])
    # dataset scale times the global scale; translation scaled too
    assert meta.spacing == (2.0, 1.0, 1.0) and meta.origin == (10.0, 2.0, 4.0)
    assert meta.units == ("micrometer",) * 3
    assert meta.extra["n_levels"] == 2 and meta.extra["ngff_version"] == "0.4"
    arrays, metas = read_levels(path)
    assert [a.shape for a in arrays] == [(4, 32, 32), (4, 16, 16)]
    assert metas[1].spacing == (2.0, 2.0, 2.0) and metas[1].origin == (10.0, 2.5, 4.5)
    low, low_meta = read_image(path, level=1)
    assert low.shape == (4, 16, 16) and low_meta.extra["level"] == 1
    with pytest.raises(ImageReadError, match="level 3 does not exist"):
        read_image(path, level=3)


def test_ngff_05_zarr_v3(tmp_path):
    data = np.arange(2 * 16 * 16, dtype=np.float32).reshape(2, 16, 16)
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "nanometer"},
            {"name": "x", "type": "space", "unit": "nanometer"}]
    path = tmp_path / "v3.zarr"
    _ngff_group(path, [data], axes, [[{"type": "scale", "scale": [1, 4.0, 4.0]}]], zarr_format=3, version="0.5")
    image, meta = read_image(path)
    assert meta.axes == "CYX" and meta.channel_axis == 0 and meta.spacing == (4.0, 4.0)
    assert meta.units == ("nanometer", "nanometer") and meta.extra["ngff_version"] == "0.5"
    assert np.array_equal(np.asarray(image), data)


def test_labels_round_trip_with_pyramid(tmp_path):
    meta = ImageMeta(axes="ZYX", spacing=(2.5, 0.7, 0.7), origin=(5.0, -3.0, 2.0), units=("mm",) * 3,
                     affine=np.diag([-0.7, -0.7, 2.5, 1.0]))
    labels = np.zeros((3, 20, 24), np.uint32)
    labels[:, 4:12, 6:20] = 70000
    path = write_labels(tmp_path / "mask.zarr", labels, meta, n_levels=2)
    back, back_meta = read_image(path)
    assert np.array_equal(np.asarray(back), labels) and back.dtype == np.uint32
    assert back_meta.spacing == meta.spacing and back_meta.origin == meta.origin
    assert back_meta.units == meta.units and np.array_equal(back_meta.affine, meta.affine)
    assert back_meta.extra["labels"] is True
    attrs = json.loads((path / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [2.5, 1.4, 1.4]
    assert "image-label" in attrs
    arrays, metas = read_levels(path)
    assert np.array_equal(np.asarray(arrays[1]), labels[:, ::2, ::2])
    assert metas[1].spacing == (2.5, 1.4, 1.4) and metas[1].origin == meta.origin


def test_rgb_image_round_trip_restores_axis_order(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    path = write_image(tmp_path / "rgb.zarr", rgb, ImageMeta(axes="YXC", rgb=True))
    attrs = json.loads((path / ".zattrs").read_text())
    assert [a["name"] for a in attrs["multiscales"][0]["axes"]] == ["c", "y", "x"]  # NGFF order
    back, meta = read_image(path)
    assert meta.axes == "YXC" and meta.rgb and np.array_equal(np.asarray(back), rgb)


def test_dask_input_is_written_chunkwise(tmp_path):
    import dask.array as da

    data = da.from_array(np.arange(4 * 30 * 30, dtype=np.int16).reshape(4, 30, 30), chunks=(1, 15, 15))
    path = write_image(tmp_path / "d.zarr", data, ImageMeta(axes="ZYX"))
    back, _ = read_image(path)
    assert np.array_equal(np.asarray(back), np.asarray(data))


def test_label_image_inside_an_image_group(tmp_path):
    image = np.zeros((16, 16), np.uint8)
    meta = ImageMeta(axes="YX", spacing=(0.5, 0.5), units=("um", "um"))
    img_path = write_image(tmp_path / "cells.zarr", image, meta)
    write_labels(img_path / "labels" / "nuclei", np.ones((16, 16), np.uint8), meta)
    write_labels(img_path / "labels" / "cells", np.ones((16, 16), np.uint8), meta)
    _, img_meta = read_image(img_path)
    assert img_meta.extra["label_names"] == ["nuclei", "cells"]
    labels_attrs = json.loads((img_path / "labels" / "nuclei" / ".zattrs").read_text())
    assert labels_attrs["image-label"]["source"] == {"image": "../../"}


def test_plain_array_and_groups_without_metadata(tmp_path):
    arr = zarr.create_array(str(tmp_path / "plain.zarr"), shape=(3, 8, 8), dtype="uint8", chunks=(1, 8, 8))
    arr[...] = 7
    image, meta = read_image(tmp_path / "plain.zarr")
    assert meta.axes == "ZYX" and int(np.asarray(image).sum()) == 7 * 3 * 64
    group = zarr.open_group(str(tmp_path / "two.zarr"), mode="w")
    group.create_array("a", shape=(4, 4), dtype="uint8")
    group.create_array("b", shape=(4, 4), dtype="uint8")
    with pytest.raises(ImageReadError, match=r"two\.zarr .* 2 arrays \(a, b\)"):
        read_image(tmp_path / "two.zarr")


def test_bad_stores(tmp_path):
    (tmp_path / "fake.zarr").mkdir()
    (tmp_path / "fake.zarr" / "data.bin").write_bytes(b"1234")
    with pytest.raises(ImageReadError, match=r"fake\.zarr has no zarr metadata"):
        read_image(tmp_path / "fake.zarr")
    arr = zarr.create_array(str(tmp_path / "five.zarr"), shape=(2, 2, 2, 4, 4), dtype="uint8")
    with pytest.raises(ImageReadError, match="5-D"):
        read_image(tmp_path / "five.zarr")
    del arr
    path = tmp_path / "five_ngff.zarr"
    _ngff_group(path, [np.zeros((2, 2, 2, 4, 4), np.uint8)], AXES_5D, [[{"type": "scale", "scale": [1] * 5}]])
    with pytest.raises(ImageReadError, match=r"5-D image \(axes TCZYX"):
        read_image(path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(ImageWriteError, match="not a zarr store"):
        write_labels(tmp_path / "notes", np.zeros((4, 4), np.uint8), format="zarr")
