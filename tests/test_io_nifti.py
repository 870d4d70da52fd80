"""NIfTI: ZYX display order, affine kept exactly through read -> write -> read, bad headers."""

from __future__ import annotations

import gzip
import struct

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.errors import ImageReadError
from napari_medseg.io import ImageMeta, read_image, write_image, write_labels

CT_SPACING = (2.5, 0.7, 0.7)  # as in conftest.py


def _oblique_affine() -> np.ndarray:
    theta = np.deg2rad(12.0)
    rot = np.array([[np.cos(theta), 0, np.sin(theta)], [0, 1, 0], [-np.sin(theta), 0, np.cos(theta)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.7, 0.7, 2.5])  # flipped x, oblique slices
    affine[:3, 3] = [90.5, -120.25, 33.0]
    return affine


def test_reads_zyx_with_spacing_from_the_affine(nifti_path, ct_volume):
    image, meta = read_image(nifti_path)
    assert meta.axes == "ZYX" and image.shape == ct_volume[0].shape
    assert np.array_equal(image, ct_volume[0]) and image.dtype == np.int16
    assert meta.spacing == CT_SPACING  # float32 header values shown as 0.7, not 0.699999988
    assert meta.origin == (5.0, -3.0, 2.0)
    assert meta.units == ("millimeter",) * 3
    # index [z, y, x] of our array is voxel (x, y, z) of the file
    raw = np.asanyarray(nib.load(str(nifti_path)).dataobj)
    assert image[3, 7, 11] == raw[11, 7, 3]


def test_oblique_affine_round_trips_exactly(tmp_path):
    data = np.random.default_rng(0).integers(-1000, 1000, (20, 16, 6)).astype(np.int16)  # x, y, z
    img = nib.Nifti1Image(data, _oblique_affine())
    img.header.set_qform(_oblique_affine(), code=1)
    img.header.set_sform(_oblique_affine(), code=4)
    nib.save(img, str(tmp_path / "obl.nii.gz"))
    file_affine = nib.load(str(tmp_path / "obl.nii.gz")).affine
    image, meta = read_image(tmp_path / "obl.nii.gz")
    assert np.array_equal(meta.affine, file_affine)
    assert meta.spacing == pytest.approx((2.5, 0.7, 0.7), abs=1e-6)
    assert meta.extra["sform_code"] == 4 and meta.extra["qform_code"] == 1
    labels = (image > 0).astype(np.uint8)
    out = write_labels(tmp_path / "mask.nii.gz", labels, meta)
    written = nib.load(str(out))
    assert np.array_equal(written.affine, file_affine)
    assert int(written.header["sform_code"]) == 4 and int(written.header["qform_code"]) == 1
    assert np.array_equal(np.asanyarray(written.dataobj), labels.transpose(2, 1, 0))
    back, back_meta = read_image(out)
    assert np.array_equal(back, labels) and np.array_equal(back_meta.affine, meta.affine)
    assert back_meta.extra["labels"] is True  # NIFTI_INTENT_LABEL
    # and the image itself
    out = write_image(tmp_path / "copy.nii", image, meta)
    again, again_meta = read_image(out)
    assert np.array_equal(again, image) and np.array_equal(again_meta.affine, meta.affine)


def test_scaling_and_four_d(tmp_path):
    raw = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2)
    img = nib.Nifti1Image(raw, np.diag([1.0, 1.0, 3.0, 1.0]))
    img.header.set_slope_inter(2.0, -10.0)
    nib.save(img, str(tmp_path / "scaled.nii"))
    image, meta = read_image(tmp_path / "scaled.nii")
    assert np.allclose(image, raw.transpose(2, 1, 0) * 2.0 - 10.0)
    assert meta.extra["scl_slope"] == 2.0 and meta.extra["scl_inter"] == -10.0
    series = np.zeros((5, 4, 3, 2), np.float32)  # x, y, z, t
    series[..., 1] = 1
    nib.save(nib.Nifti1Image(series, np.eye(4)), str(tmp_path / "t.nii.gz"))
    image, meta = read_image(tmp_path / "t.nii.gz")
    assert meta.axes == "TZYX" and image.shape == (2, 3, 4, 5) and image[1].min() == 1
    out = write_image(tmp_path / "t2.nii.gz", image, meta)
    assert nib.load(str(out)).shape == (5, 4, 3, 2)


def test_two_d_and_channel_images(tmp_path):
    meta = ImageMeta(axes="YX", spacing=(0.5, 0.25), origin=(1.0, 2.0), units=("mm", "mm"))
    image = np.arange(12, dtype=np.uint16).reshape(3, 4)
    back, back_meta = read_image(write_image(tmp_path / "two.nii.gz", image, meta))
    assert back_meta.axes == "YX" and np.array_equal(back, image)
    assert back_meta.spacing == (0.5, 0.25) and back_meta.origin == (1.0, 2.0)
    channels = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    back, back_meta = read_image(write_image(tmp_path / "c.nii.gz", channels, ImageMeta(axes="CZYX")))
    assert back_meta.axes == "CZYX" and np.array_equal(back, channels)


def _header_bytes(tmp_path) -> bytes:
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), np.diag([0.7, 0.7, 2.5, 1.0])), str(tmp_path / "ok.nii"))
    return (tmp_path / "ok.nii").read_bytes()


def test_broken_headers(tmp_path):
    good = _header_bytes(tmp_path)
    cases = {
        "negdim.nii": (42, struct.pack("<h", -5), "dimensions"),
        "dtype.nii": (70, struct.pack("<h", 9999), "broken NIfTI header"),
    }
    for name, (offset, patch, expected) in cases.items():
        broken = bytearray(good)
        broken[offset: offset + len(patch)] = patch
        (tmp_path / name).write_bytes(bytes(broken))
        with pytest.raises(ImageReadError, match=expected) as info:
            read_image(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)
    # zero voxel sizes and no sform/qform: nibabel would quietly use 1 mm; we refuse
    broken = bytearray(good)
    broken[76:108] = struct.pack("<8f", *([0.0] * 8))
    broken[252:256] = struct.pack("<hh", 0, 0)
    (tmp_path / "pixdim.nii").write_bytes(bytes(broken))
    with pytest.raises(ImageReadError, match=r"pixdim\.nii has a broken NIfTI header: its voxel sizes"):
        read_image(tmp_path / "pixdim.nii")


def test_truncated_files(tmp_path, nifti_path):
    good = _header_bytes(tmp_path)
    (tmp_path / "cut.nii").write_bytes(good[:400])
    with pytest.raises(ImageReadError, match=r"cut\.nii is truncated: its header describes"):
        read_image(tmp_path / "cut.nii")
    data = nifti_path.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.nii\.gz is truncated"):
        read_image(tmp_path / "cut.nii.gz")
    (tmp_path / "gz.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 30))
    with pytest.raises(ImageReadError, match=r"gz\.nii\.gz has a broken NIfTI header"):
        read_image(tmp_path / "gz.nii.gz")
