"""Format detection, bad input across formats, the write_labels contract and the samples."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_medseg.errors import ImageReadError, ImageWriteError, MedsegError, UnsupportedFormatError
from napari_medseg.io import (
    ImageMeta,
    detect_format,
    is_supported,
    read_image,
    supported_suffixes,
    write_labels,
)
from napari_medseg.io.samples import list_samples, load_sample, sample_path


def _png(path, shape=(8, 8)):
    from PIL import Image

    Image.fromarray(np.zeros(shape, np.uint8)).save(path, format="PNG")
    return path


def test_suffixes_and_is_supported(tmp_path, dicom_dir):
    assert {".tif", ".ome.tif", ".zarr", ".nii", ".nii.gz", ".png", ".jpg", ".dcm"} <= set(supported_suffixes())
    assert {".tif", ".zarr", ".nii.gz", ".png"} <= set(supported_suffixes(write=True))
    assert is_supported("x.nii.gz") and is_supported("X.OME.TIF") and is_supported("a/b.zarr")
    assert not is_supported(tmp_path / "notes.txt")
    assert is_supported(dicom_dir)
    assert not is_supported(tmp_path / "does-not-exist-folder")
    (tmp_path / "plain").mkdir()
    assert not is_supported(tmp_path / "plain")
    # a DICOM file without suffix is recognised by its magic
    no_suffix = tmp_path / "IM0001"
    no_suffix.write_bytes(next(dicom_dir.iterdir()).read_bytes())
    assert is_supported(no_suffix) and detect_format(no_suffix) == "dicom"


def test_missing_path_names_it(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist") as info:
        read_image(tmp_path / "nope.tif")
    assert "nope.tif" in str(info.value)


def test_unknown_extension_is_unsupported(tmp_path):
    path = tmp_path / "scan.czi"
    path.write_bytes(b"\x00" * 400)
    with pytest.raises(UnsupportedFormatError, match=r"scan\.czi is not a format"):
        read_image(path)


def test_wrong_extension_says_what_the_file_really_is(tmp_path):
    path = _png(tmp_path / "cells.tif")
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert "cells.tif" in message and "not a TIFF file" in message and "PNG" in message
    assert "rename it to .png" in message
    text = tmp_path / "volume.nii"
    text.write_text("this is not an image at all, just some words " * 20)
    with pytest.raises(ImageReadError, match=r"volume\.nii is not a NIfTI file .* text"):
        read_image(text)


def test_empty_file_and_empty_folder(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.png is empty \(0 bytes\)"):
        read_image(empty)
    folder = tmp_path / "series"
    folder.mkdir()
    with pytest.raises(ImageReadError, match="is empty"):
        read_image(folder)
    (folder / "readme.txt").write_text("hello")
    with pytest.raises(UnsupportedFormatError, match="holds no DICOM files"):
        read_image(folder)


def test_errors_are_single_sentences(tmp_path):
    path = _png(tmp_path / "x.nii.gz")
    with pytest.raises(MedsegError) as info:
        read_image(path)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".")


def test_write_labels_checks_its_input(tmp_path):
    with pytest.raises(ImageWriteError, match="Cannot tell which format"):
        write_labels(tmp_path / "mask.xyz", np.zeros((4, 4), np.uint8))
    with pytest.raises(ImageWriteError, match="labels must be integers"):
        write_labels(tmp_path / "mask.tif", np.full((4, 4), 0.5))
    with pytest.raises(ImageWriteError, match="3-D .* axes 'YX'"):
        write_labels(tmp_path / "mask.tif", np.zeros((2, 4, 4), np.uint8), ImageMeta(axes="YX"))
    with pytest.raises(ImageWriteError, match="unknown format"):
        write_labels(tmp_path / "mask.tif", np.zeros((4, 4), np.uint8), format="jpeg2000")


def test_write_labels_fits_a_channel_image_and_converts_types(tmp_path):
    meta = ImageMeta(axes="CZYX", spacing=(3.0, 0.5, 0.5), units=("um",) * 3)
    labels = np.zeros((2, 6, 6), bool)
    labels[1, 2:4, 2:4] = True
    path = write_labels(tmp_path / "mask.tif", labels, meta)
    back, back_meta = read_image(path)
    assert back.dtype == np.uint8 and np.array_equal(back, labels)
    assert back_meta.axes == "ZYX" and back_meta.spacing == (3.0, 0.5, 0.5)
    assert back_meta.extra["labels"] is True
    floats = np.array([[0.0, 1.0], [2.0, 300.0]])
    path = write_labels(tmp_path / "float.tif", floats)
    back, _ = read_image(path)
    assert back.dtype == np.uint16 and np.array_equal(back, floats)


def test_level_and_series_are_checked(nifti_path):
    with pytest.raises(ImageReadError, match="level 2 does not exist"):
        read_image(nifti_path, level=2)
    with pytest.raises(ImageReadError, match="not DICOM"):
        read_image(nifti_path, series="1.2.3")


def test_samples_are_shipped_and_readable():
    assert set(list_samples()) == {"nuclei", "nuclei_he", "em_stack", "dermoscopy", "ct_patches"}
    total = sum(p.stat().st_size for p in sample_path("nuclei").parent.iterdir())
    assert total < 2 * 2**20
    assert (sample_path("nuclei").parent / "ATTRIBUTION.md").is_file()
    image, meta, labels = load_sample("nuclei")
    assert image.shape == (256, 256) and image.dtype == np.uint8 and meta.axes == "YX"
    assert labels.shape == image.shape and labels.max() > 10
    image, meta, labels = load_sample("em_stack")
    assert image.shape == (5, 256, 256)
    assert meta.spacing == (50.0, 4.0, 4.0) and meta.units == ("nanometer",) * 3
    image, meta, labels = load_sample("dermoscopy")
    assert meta.rgb and image.shape[-1] == 3 and labels.shape == image.shape[:2]
    image, meta, labels = load_sample("ct_patches")
    assert meta.axes == "IYX" and meta.spacing == (2.0, 2.0) and image.shape[1:] == (48, 48)
    assert set(np.unique(labels)) == {0, 1}
    with pytest.raises(ImageReadError, match="no sample called"):
        sample_path("brain")
    # the sample files are plain OME-TIFF that tifffile reads without us
    assert tifffile.imread(sample_path("nuclei")).shape == (256, 256)
