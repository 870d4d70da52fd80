"""DICOM series: sorting by position, 0.7 x 0.7 x 2.5 mm spacing, rescale, affine, bad folders."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from napari_medseg.errors import ImageReadError
from napari_medseg.io import read_image, write_labels
from napari_medseg.io.dicom import LPS_TO_RAS, list_series
from napari_medseg.io.synthetic import write_dicom_series

CT_SPACING = (2.5, 0.7, 0.7)  # as in conftest.py


def test_series_is_sorted_rescaled_and_spaced(dicom_dir, ct_volume):
    volume = ct_volume[0]
    image, meta = read_image(dicom_dir)
    assert meta.axes == "ZYX" and image.shape == volume.shape
    assert image.dtype == np.int16  # integral slope/intercept keep integers
    assert np.array_equal(image, volume)  # files are shuffled and InstanceNumber reversed
    assert meta.spacing == pytest.approx(CT_SPACING)
    assert meta.units == ("millimeter",) * 3
    assert meta.extra["rescale_intercept"] == -1024.0 and meta.extra["rescale_slope"] == 1.0
    assert meta.extra["modality"] == "CT" and meta.extra["slice_spacing_irregular"] is False
    assert meta.extra["window_center"] == 40.0
    # the affine maps (column, row, slice) to RAS = LPS with x, y negated
    first = min(
        (pydicom.dcmread(str(f), stop_before_pixels=True) for f in dicom_dir.iterdir()),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    lps = LPS_TO_RAS @ meta.affine @ np.array([0, 0, 0, 1.0])
    assert np.allclose(lps[:3], [float(v) for v in first.ImagePositionPatient])
    voxel = np.array([3, 5, 2, 1.0])  # column 3, row 5, slice 2
    expected = np.array([float(v) for v in first.ImagePositionPatient]) + [3 * 0.7, 5 * 0.7, 2 * 2.5]
    assert np.allclose((LPS_TO_RAS @ meta.affine @ voxel)[:3], expected)


def test_one_file_opens_its_whole_series(dicom_dir, ct_volume):
    one = sorted(dicom_dir.iterdir())[0]
    image, meta = read_image(one)
    assert image.shape == ct_volume[0].shape and meta.extra["n_files"] == ct_volume[0].shape[0]


def test_float_rescale_and_sagittal_orientation(tmp_path):
    volume = np.random.default_rng(1).normal(0, 100, (5, 12, 10)).round(1)
    write_dicom_series(tmp_path / "sag", volume, (1.5, 0.5, 0.8), rescale_slope=0.1,
                       rescale_intercept=-50.0, orientation=(0, 1, 0, 0, 0, -1))
    image, meta = read_image(tmp_path / "sag")
    assert image.dtype == np.float32 and np.allclose(image, volume, atol=0.051)
    assert meta.spacing == pytest.approx((1.5, 0.5, 0.8))
    normal = np.cross([0, 1, 0], [0, 0, -1])
    slice_direction = (LPS_TO_RAS @ meta.affine)[:3, 2]
    assert np.allclose(slice_direction, normal * 1.5)


def test_two_series_need_a_choice(tmp_path, ct_volume):
    folder = tmp_path / "mixed"
    write_dicom_series(folder, ct_volume[0][:3], CT_SPACING, series_uid="1.2.826.0.1.1")
    write_dicom_series(folder / "b", ct_volume[0][:4], CT_SPACING, series_uid="1.2.826.0.1.2", description="second")
    for f in (folder / "b").iterdir():
        shutil.move(str(f), folder / f"B_{f.name}")
    (folder / "b").rmdir()
    with pytest.raises(ImageReadError) as info:
        read_image(folder)
    message = str(info.value)
    assert "2 DICOM series" in message and "1.2.826.0.1.1" in message and "1.2.826.0.1.2" in message
    assert "series=" in message and str(folder) in message
    image, meta = read_image(folder, series="1.2.826.0.1.2")
    assert image.shape[0] == 4 and meta.extra["series_uid"] == "1.2.826.0.1.2"
    assert set(list_series(folder)) == {"1.2.826.0.1.1", "1.2.826.0.1.2"}
    with pytest.raises(ImageReadError, match="holds no DICOM series 9.9"):
        read_image(folder, series="9.9")


def test_repeated_positions_and_damaged_files(tmp_path, ct_volume):
    folder = tmp_path / "echoes"
    write_dicom_series(folder, ct_volume[0][:3], CT_SPACING, series_uid="1.2.3", seed=0)
    write_dicom_series(tmp_path / "other", ct_volume[0][:3], CT_SPACING, series_uid="1.2.3", seed=0)
    for f in (tmp_path / "other").iterdir():
        shutil.copy(f, folder / f"echo2_{f.name}")
    with pytest.raises(ImageReadError, match="several images at the same slice position"):
        read_image(folder)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x01" * 20)
    with pytest.raises(ImageReadError, match="could be read as an image"):
        read_image(broken)


def test_truncated_pixel_data(tmp_path, ct_volume):
    files = write_dicom_series(tmp_path / "cut", ct_volume[0][:2], CT_SPACING)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) - 500])
    with pytest.raises(ImageReadError, match="pixel data of the DICOM file .* cannot be decoded"):
        read_image(tmp_path / "cut")


def test_labels_from_dicom_to_nifti_keep_the_geometry(tmp_path, dicom_dir, ct_volume):
    image, meta = read_image(dicom_dir)
    out = write_labels(tmp_path / "lesion.nii.gz", ct_volume[1], meta)
    written = nib.load(str(out))
    assert np.allclose(written.affine, meta.affine, atol=1e-4)  # NIfTI stores float32
    back, back_meta = read_image(out)
    assert np.array_equal(back, ct_volume[1])
    assert back_meta.spacing == pytest.approx(CT_SPACING) and back_meta.origin == pytest.approx(meta.origin)
