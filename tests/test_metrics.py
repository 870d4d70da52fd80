"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_medseg.engine import metrics


def _square(shape, r0, r1, c0, c1, value=1):
    a = np.zeros(shape, np.int32)
    a[r0:r1, c0:c1] = value
    return a


def test_dice_and_iou_of_overlapping_squares():
    a = _square((10, 10), 0, 4, 0, 4)  # 16 px
    b = _square((10, 10), 2, 6, 0, 4)  # 16 px, overlap 8
    assert metrics.dice(a, b) == pytest.approx(2 * 8 / 32)
    assert metrics.iou(a, b) == pytest.approx(8 / 24)


def test_empty_conventions():
    z = np.zeros((5, 5), int)
    assert metrics.dice(z, z) == 1.0 and metrics.hd95(z, z) == 0.0
    assert metrics.dice(z, _square((5, 5), 0, 2, 0, 2)) == 0.0
    assert math.isinf(metrics.hd95(z, _square((5, 5), 0, 2, 0, 2)))


def test_hd95_of_shifted_square_uses_spacing():
    a = _square((40, 40), 10, 20, 10, 20)
    b = _square((40, 40), 13, 23, 10, 20)  # shifted 3 rows
    assert metrics.hd95(a, b) == pytest.approx(3.0)
    assert metrics.hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(6.0)


def test_boundary_f1_tolerance():
    a = _square((40, 40), 10, 20, 10, 20)
    b = _square((40, 40), 13, 23, 10, 20)
    assert metrics.boundary_f1(a, a) == 1.0
    assert metrics.boundary_f1(a, b, tolerance=3) == 1.0
    assert metrics.boundary_f1(a, b, tolerance=1) < 1.0


def test_per_class_metrics_two_classes():
    ref = _square((10, 10), 0, 5, 0, 10, 1) + _square((10, 10), 5, 10, 0, 10, 2)
    pred = ref.copy()
    pred[0, :] = 2
    out = metrics.per_class_metrics(pred, ref)
    assert set(out) == {1, 2}
    assert out[1]["dice"] == pytest.approx(2 * 40 / 90)
    assert out[2]["iou"] == pytest.approx(50 / 60)


def test_instance_f1_and_aji():
    ref = np.zeros((20, 20), np.int32)
    ref[0:5, 0:5] = 1
    ref[10:15, 10:15] = 2
    pred = np.zeros_like(ref)
    pred[0:5, 0:5] = 7          # perfect match of 1
    pred[10:15, 10:12] = 3      # IoU 0.4 with 2: not a match at 0.5
    pred[18:20, 18:20] = 4      # false positive
    m = metrics.match_instances(pred, ref, 0.5)
    assert m == {"tp": 1, "fp": 2, "fn": 1}
    assert metrics.instance_f1(pred, ref) == pytest.approx(2 / (2 + 3))
    # AJI: inter 25 + 10; union 25 + 25; plus the unused prediction 4 (4 px)
    assert metrics.aggregated_jaccard(pred, ref) == pytest.approx(35 / 54)
    assert metrics.aggregated_jaccard(ref, ref) == 1.0
