"""Acquisition type of light-microscopy images from their pixels: synthetic images, samples."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.engine.acquisition import acquisition_type


def _nuclei(background: float, nuclei: float, dtype=np.uint8, shape=(64, 64)) -> np.ndarray:
    """A flat background with a few round nuclei (a tenth of the area)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, background, np.float64)
    for cy, cx in ((16, 16), (40, 20), (30, 48)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = nuclei
    return img.astype(dtype)


def test_grey_8bit_dark_and_light_backgrounds():
    assert acquisition_type(_nuclei(10, 200), "YX") == "fluorescence"
    assert acquisition_type(_nuclei(230, 60), "YX") == "bright-field"
    # The rule is the mean above 100 on the 8-bit range.
    assert acquisition_type(np.full((8, 8), 100, np.uint8), "YX") == "fluorescence"
    assert acquisition_type(np.full((8, 8), 101, np.uint8), "YX") == "bright-field"


def test_equal_rgb_channels_are_grey_and_differing_ones_are_he():
    grey = _nuclei(240, 80)
    rgb = np.stack([grey] * 3, axis=-1)
    assert acquisition_type(rgb, "YXC") == "bright-field"
    assert acquisition_type(np.moveaxis(rgb, -1, 0), "CYX") == "bright-field"
    stained = rgb.copy()
    stained[..., 1] = (stained[..., 1] * 0.7).astype(np.uint8)  # pink/purple, not grey
    assert acquisition_type(stained, "YXC") == "H&E"
    one_pixel = rgb.copy()
    one_pixel[3, 3, 2] += 1
    assert acquisition_type(one_pixel, "YXC") == "H&E"


def test_other_dtypes_compare_the_median_with_the_percentile_midpoint():
    # 16-bit fluorescence: dark background far below the bright nuclei.
    assert acquisition_type(_nuclei(300, 40000, np.uint16), "YX") == "fluorescence"
    # A float bright-field image on [0, 1]: light background, dark nuclei.
    assert acquisition_type(_nuclei(0.9, 0.2, np.float32), "YX") == "bright-field"
    # The same light image on a 12-bit scale (mean 8-bit rule would not apply).
    assert acquisition_type(_nuclei(3500, 900, np.uint16), "YX") == "bright-field"


def test_only_single_planes_with_one_or_three_channels_are_typed():
    plane = _nuclei(10, 200)
    assert acquisition_type(plane[None], "ZYX") == "fluorescence"  # one slice
    assert acquisition_type(np.stack([plane, plane]), "ZYX") is None  # a volume
    assert acquisition_type(np.stack([plane, plane]), "IYX") is None  # a stack
    assert acquisition_type(np.stack([plane] * 4, axis=-1), "YXC") is None  # RGBA
    assert acquisition_type(np.stack([plane] * 2), "CYX") is None
    assert acquisition_type(plane[None], "CYX") == "fluorescence"
    with pytest.raises(ValueError, match="do not fit"):
        acquisition_type(plane, "ZYX")


@pytest.mark.parametrize("sample, kind", [("nuclei", "fluorescence"), ("nuclei_he", "H&E"),
                                          ("em_stack", None), ("ct_patches", None)])
def test_shipped_samples(sample, kind):
    from napari_medseg.io.samples import load_sample

    image, meta, _labels = load_sample(sample)
    assert acquisition_type(np.asarray(image), meta.axes) == kind
