"""Object-level scores (F1, AP, DSB score, AJI at IoU matches) on hand-counted label images."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.engine.metrics import (
    DSB_THRESHOLDS,
    aggregated_jaccard,
    instance_f1,
    instance_scores,
    match_instances,
)


def _blank(shape=(20, 30)):
    return np.zeros(shape, np.int32)


def _check(scores, tp, fp, fn, f1, ap, dsb, aji):
    assert (scores["tp"], scores["fp"], scores["fn"]) == (tp, fp, fn)
    assert scores["f1_iou50"] == pytest.approx(f1)
    assert scores["ap_iou50"] == pytest.approx(ap)
    assert scores["dsb_score"] == pytest.approx(dsb)
    assert scores["aji"] == pytest.approx(aji)


def test_thresholds_are_the_dsb_ones():
    assert DSB_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_perfect_match_with_other_label_numbers():
    ref, pred = _blank(), _blank()
    ref[2:8, 2:8], ref[10:18, 12:25] = 1, 2
    pred[2:8, 2:8], pred[10:18, 12:25] = 9, 4
    _check(instance_scores(pred, ref), 2, 0, 0, 1.0, 1.0, 1.0, 1.0)


def test_merge_of_two_nuclei_into_one_prediction():
    # Reference: 120 px and 80 px side by side; one prediction (200 px) covers both.
    ref, pred = _blank(), _blank()
    ref[0:10, 0:12], ref[0:10, 12:20] = 1, 2
    pred[0:10, 0:20] = 1
    # IoU with the larger one 120/200 = 0.6 > 0.5: one match, one missed; at 0.5 and 0.55
    # AP = 1/(1+0+1), above that 0/(0+1+2); AJI = (120+80)/(200+200).
    _check(instance_scores(pred, ref), 1, 0, 1, 2 / 3, 1 / 2, (0.5 + 0.5) / 10, 0.5)
    # Two nuclei of 100 px each: IoU exactly 0.5 is no match (IoU must be above 0.5).
    ref[...] = 0
    ref[0:10, 0:10], ref[0:10, 10:20] = 1, 2
    _check(instance_scores(pred, ref), 0, 1, 2, 0.0, 0.0, 0.0, 0.5)


def test_split_of_one_nucleus_into_two_halves():
    ref, pred = _blank(), _blank()
    ref[0:10, 0:20] = 1
    pred[0:10, 0:12], pred[0:10, 12:20] = 1, 2
    # 120/200 = 0.6 matches, the other half is a false positive; AJI 120 / (200 + 80).
    _check(instance_scores(pred, ref), 1, 1, 0, 2 / 3, 1 / 2, 0.1, 120 / 280)


def test_missed_object():
    ref, pred = _blank(), _blank()
    ref[0:10, 0:10], ref[10:20, 15:25] = 1, 2
    pred[0:10, 0:10] = 1
    # The found one is perfect, so every threshold gives AP 1/2.
    _check(instance_scores(pred, ref), 1, 0, 1, 2 / 3, 1 / 2, 1 / 2, 100 / 200)


def test_spurious_object():
    ref, pred = _blank(), _blank()
    ref[0:10, 0:10] = 1
    pred[0:10, 0:10], pred[12:17, 20:25] = 1, 2
    _check(instance_scores(pred, ref), 1, 1, 0, 2 / 3, 1 / 2, 1 / 2, 100 / 125)


def test_empty_images():
    empty = _blank()
    _check(instance_scores(empty, empty), 0, 0, 0, 1.0, 1.0, 1.0, 1.0)
    one = _blank()
    one[3:9, 3:9] = 5
    _check(instance_scores(empty, one), 0, 0, 1, 0.0, 0.0, 0.0, 0.0)
    _check(instance_scores(one, empty), 0, 1, 0, 0.0, 0.0, 0.0, 0.0)


def test_dsb_score_counts_the_thresholds_below_the_iou():
    ref, pred = _blank(), _blank()
    ref[0:10, 0:10] = 1
    pred[0:8, 0:9] = 1  # 72 px inside 100: IoU 0.72, a match at 0.5 ... 0.70 (5 of 10)
    _check(instance_scores(pred, ref), 1, 0, 0, 1.0, 1.0, 0.5, 0.72)
    # A second object at IoU 0.92: both match up to 0.70, only it at 0.75 ... 0.90 (AP 1/3
    # there: 1 TP, 1 FP, 1 FN), neither at 0.95.
    ref[10:20, 10:20] = 2
    pred[10:20, 10:19], pred[10:12, 19] = 2, 2  # 92 px inside 100
    scores = instance_scores(pred, ref)
    assert scores["dsb_score"] == pytest.approx((5 * 1 + 4 * (1 / 3) + 1 * 0) / 10)
    assert scores["ap_iou50"] == 1.0


def test_volumes_and_an_iou_equal_to_a_threshold():
    ref, pred = np.zeros((6, 12, 12), np.int32), np.zeros((6, 12, 12), np.int32)
    ref[0:4, 0:10, 0:10] = 1  # 400 voxels
    pred[0:3, 0:10, 0:10] = 3  # 300 of them: IoU 0.75, not above the 0.75 threshold
    ref[5, 0:2, 0:2] = 2  # missed
    scores = instance_scores(pred, ref)
    _check(scores, 1, 0, 1, 2 / 3, 1 / 2, 5 * (1 / 2) / 10, 300 / (400 + 4))


def test_the_single_scores_agree_with_instance_scores():
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 6, (4, 40, 40)).repeat(5, axis=1).repeat(5, axis=2)[:, :40, :40]
    pred = np.roll(ref, 2, axis=2)
    pred[pred == 3] = 0
    scores = instance_scores(pred, ref)
    m = match_instances(pred, ref)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (m["tp"], m["fp"], m["fn"])
    assert scores["tp"] > 0 and scores["fp"] + scores["fn"] > 0
    assert scores["f1_iou50"] == pytest.approx(instance_f1(pred, ref))
    assert scores["aji"] == pytest.approx(aggregated_jaccard(pred, ref))
    assert 0.0 < scores["dsb_score"] <= scores["ap_iou50"] < 1.0


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="differ in shape"):
        instance_scores(_blank((4, 4)), _blank((4, 5)))


def test_instance_reference_rule_of_the_metrics_table():
    from napari_medseg.engine.training.evaluate import is_instance_reference

    ref = _blank()
    ref[0:5, 0:5], ref[10:15, 0:5] = 1, 2
    assert is_instance_reference(ref, num_classes=1)  # a one-class network, two labels
    assert is_instance_reference(ref, num_classes=2)
    assert not is_instance_reference(ref, num_classes=3)  # classes 1 and 2 of a 3-class net
    assert not is_instance_reference(ref > 0, num_classes=1)  # one label is a mask
    ref[18:20, 20:25] = 3
    assert is_instance_reference(ref, num_classes=3)


def test_reference_scores_per_frame_and_from_connected_components():
    from napari_medseg.engine.training.evaluate import reference_scores

    ref = np.zeros((2, 20, 30), np.int32)
    ref[:, 0:10, 0:10], ref[:, 0:10, 10:20] = 1, 2  # the same two nuclei in both frames
    mask = np.zeros_like(ref)
    mask[0, 0:10, 0:20] = 1  # frame 0: merged (IoU 0.5 each: no match)
    mask[1, 0:10, 0:9], mask[1, 0:10, 11:20] = 1, 1  # frame 1: two components, IoU 0.9
    out = reference_scores(mask, ref, "TYX", 2)
    assert set(out["classes"]) == {1}  # the per-class table is still there
    objects = out["objects"]
    frame0 = instance_scores(mask[0], ref[0])
    frame1 = instance_scores(_components(mask[1]), ref[1])
    assert (objects["tp"], objects["fp"], objects["fn"]) == (0 + 2, 1 + 0, 2 + 0)
    assert objects["ap_iou50"] == pytest.approx((frame0["ap_iou50"] + frame1["ap_iou50"]) / 2)
    assert objects["ap_iou50"] == pytest.approx(0.5)
    assert objects["dsb_score"] == pytest.approx((0 + 0.8) / 2)  # frame 1: 8 of 10 thresholds
    # The instances layer, when given, is scored as it is (frame 1 labelled as one object).
    inst = (mask > 0).astype(np.int32)
    objects = reference_scores(mask, ref, "TYX", 2, instances=inst)["objects"]
    assert (objects["tp"], objects["fp"], objects["fn"]) == (0, 2, 4)
    # A class reference gets no object scores.
    assert reference_scores(mask, (ref > 0).astype(np.int32), "TYX", 2)["objects"] is None


def _components(mask):
    from scipy import ndimage as ndi

    return ndi.label(mask)[0]
