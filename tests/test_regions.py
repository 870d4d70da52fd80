"""Regions of an image: scope boxes, output geometry, finished planes, per-region metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_medseg.engine import metrics
from napari_medseg.engine.inference.regions import (
    Region,
    finished_keys,
    output_geometry,
    plane_region,
    region_metrics,
    stack_blocks,
    visible_region,
    whole_region,
)
from napari_medseg.errors import InputShapeError


def test_region_basics_and_offset():
    r = Region((2, 10, 20), (3, 50, 60))
    assert r.shape == (1, 40, 40) and r.size == 1600
    assert r.slices == (slice(2, 3), slice(10, 50), slice(20, 60))
    assert r.key(1) == r.slices + (slice(None),)
    assert r.offset((0, slice(None), slice(5, 10))) == (2, slice(10, 50), slice(25, 30))
    assert r.describe("ZYX") == "Z 2, Y 10-49, X 20-59"
    assert whole_region((4, 5)).covers((4, 5)) and not r.covers((4, 64, 64))
    with pytest.raises(ValueError):
        Region((0, 5), (1, 5))


def test_output_region_scales_only_the_plane():
    r = Region((1, 3, 4), (2, 10, 12))
    assert r.output(2) == Region((1, 6, 8), (2, 20, 24))
    assert r.output(1) is r


def test_plane_region_fixes_the_other_axes_clipped():
    assert plane_region((5, 64, 80), (2.4, 10.0, 3.0)) == Region((2, 0, 0), (3, 64, 80))
    assert plane_region((5, 64, 80), (9.0, 0, 0)).start[0] == 4  # clipped to the last slice
    assert plane_region((3, 5, 64, 80), (1, -2, 0, 0)) == Region((1, 0, 0, 0), (2, 1, 64, 80))
    assert plane_region((64, 80), (5.0, 5.0)) == whole_region((64, 80))


def test_visible_region_clips_and_grows_to_the_network_minimum():
    shape = (5, 100, 200)
    corners = np.array([[0, 10.2, 20.0], [0, 59.7, 119.0]])
    r = visible_region(shape, (3, 0, 0), corners)
    assert r == Region((3, 10, 20), (4, 60, 120))
    # A deep zoom on 4 x 4 pixels is grown to 32 pixels, centred and inside the image.
    small = visible_region(shape, (0, 0, 0), np.array([[0, 0, 190], [0, 3, 193]]), min_size=32)
    assert small.shape[1:] == (32, 32)
    assert small.start[1] == 0 and small.stop[2] <= 200
    # Corners beyond the image are clipped.
    wide = visible_region(shape, (0, 0, 0), np.array([[0, -50, -50], [0, 500, 500]]))
    assert wide == Region((0, 0, 0), (1, 100, 200))


def test_visible_region_without_a_drawn_canvas_is_the_plane():
    shape = (5, 100, 200)
    assert visible_region(shape, (1, 0, 0), np.zeros((2, 3))) == plane_region(shape, (1, 0, 0))
    assert visible_region(shape, (1, 0, 0), None) == plane_region(shape, (1, 0, 0))


def test_output_geometry_puts_upsampled_pixel_centres_inside_their_input_pixel():
    scale, translate = (50.0, 4.0, 2.0), (0.0, 10.0, -3.0)
    s2, t2 = output_geometry(scale, translate, 2)
    assert s2 == (50.0, 2.0, 1.0)
    # Output pixels 0 and 1 straddle input pixel 0's centre by a quarter pixel each.
    for axis in (1, 2):
        c0 = t2[axis] + 0 * s2[axis]
        c1 = t2[axis] + 1 * s2[axis]
        assert (c0 + c1) / 2 == pytest.approx(translate[axis])
        assert c1 - c0 == pytest.approx(scale[axis] / 2)
    assert output_geometry(scale, translate, 1) == (scale, translate)


def test_finished_keys_of_a_cancelled_volume_run():
    keys = finished_keys("ZYX", (4, 8, 8), "Z", [0, 2])
    assert keys == [(0, slice(None), slice(None)), (2, slice(None), slice(None))]
    assert finished_keys("ZYX", (4, 8, 8), "Z", range(4)) == [(slice(None),) * 3]
    assert finished_keys("YX", (8, 8), "", []) == [(slice(None),) * 2]
    # Two stacked axes: plane 3 of a 2 x 2 T x Z stack is T 1, Z 1.
    assert finished_keys("TZYX", (2, 2, 8, 8), "TZ", [3]) == [(1, 1, slice(None), slice(None))]


def test_stack_blocks():
    assert stack_blocks("ZYX", (3, 4, 4)) == [(slice(None),) * 3]
    blocks = stack_blocks("IYX", (2, 4, 4))
    assert blocks == [(0, slice(None), slice(None)), (1, slice(None), slice(None))]
    with pytest.raises(ValueError):
        stack_blocks("YX", (3, 4, 4))


def test_region_metrics_binarizes_an_instance_reference():
    pred = np.zeros((1, 20, 20), np.uint8)
    pred[0, 2:8, 2:8] = 1
    pred[0, 10:16, 10:16] = 1
    ref = np.zeros((1, 20, 20), np.int32)
    ref[0, 2:8, 2:8] = 5
    ref[0, 10:16, 10:18] = 9
    out = region_metrics(pred, ref, "ZYX", num_classes=1, spacing=(3.0, 0.5, 0.5))
    assert list(out) == [1]
    want = metrics.per_class_metrics(pred[0], (ref[0] > 0).astype(np.uint8), [1], (0.5, 0.5))[1]
    for name in ("dice", "iou", "hd95", "boundary_f1"):
        assert out[1][name] == pytest.approx(want[name])
    assert out[1]["hd95"] <= 2 * 0.5 + 1e-9  # in physical units (0.5 per pixel)


def test_region_metrics_per_class_and_per_block():
    pred = np.zeros((2, 10, 10), np.uint8)
    ref = np.zeros((2, 10, 10), np.uint8)
    pred[0, :5] = 1
    ref[0, :5] = 1          # block 0, class 1: perfect
    pred[1, :, :5] = 2
    ref[1, :, :4] = 2       # block 1, class 2: partial
    out = region_metrics(pred, ref, "IYX", num_classes=3)
    assert set(out) == {1, 2}
    d2 = metrics.dice(pred[1] == 2, ref[1] == 2)
    # Class 2 is absent from block 0 on both sides (Dice 1 there): the mean of 1 and d2.
    assert out[2]["dice"] == pytest.approx((1.0 + d2) / 2)
    assert out[1]["dice"] == pytest.approx(1.0)
    # A class present on one side only keeps an infinite HD95.
    pred[1, 0, 9] = 1
    assert math.isinf(region_metrics(pred, ref, "IYX", num_classes=3)[1]["hd95"])


def test_region_metrics_shape_mismatch_is_one_sentence():
    with pytest.raises(InputShapeError, match="same grid"):
        region_metrics(np.zeros((4, 4)), np.zeros((4, 5)), "YX", 2)
