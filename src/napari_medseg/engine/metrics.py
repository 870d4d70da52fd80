"""Segmentation metrics on numpy label images: Dice, IoU, HD95, boundary F1; F1, AP, DSB score, AJI.

All functions take integer arrays of the same shape (YX or ZYX); ``spacing`` gives the physical
size of a pixel per axis for distances (HD95). Empty-versus-empty counts as a perfect match
(Dice 1, IoU 1, HD95 0, boundary F1 1); empty-versus-non-empty gives Dice 0 and HD95 ``inf``.

HD95 follows MONAI (``compute_hausdorff_distance(percentile=95)``), medpy (``hd95``) and the
segmentation challenges: the 95th percentile of each *directed* surface distance (prediction to
reference, reference to prediction), then the larger of the two. A surface pixel is a
foreground pixel with a background neighbour (the face neighbours, 4 in 2D and 6 in 3D; the
image border counts as background), and distances are Euclidean between pixel centres,
scaled by ``spacing`` per axis. ``tests/test_metrics_reference.py`` checks every metric here
against MONAI (or a brute-force implementation of its definition) on the shipped sample masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "dice",
    "iou",
    "hd95",
    "boundary_f1",
    "per_class_metrics",
    "match_instances",
    "instance_f1",
    "aggregated_jaccard",
    "instance_scores",
    "DSB_THRESHOLDS",
]


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two binary masks (anything > 0 is foreground)."""
    p, r = np.asarray(pred) > 0, np.asarray(ref) > 0
    denom = p.sum() + r.sum()
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(p, r).sum() / denom)


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Intersection over union of two binary masks."""
    p, r = np.asarray(pred) > 0, np.asarray(ref) > 0
    union = np.logical_or(p, r).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(p, r).sum() / union)


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    eroded = ndi.binary_erosion(mask, border_value=0)
    return mask & ~eroded


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    from scipy import ndimage as ndi

    sa, sb = _surface(a), _surface(b)
    dist_to_b = ndi.distance_transform_edt(~sb, sampling=spacing)
    return dist_to_b[sa]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Robust Hausdorff distance: the larger of the two directed 95th-percentile surface distances.

    Args:
        pred: predicted mask (anything > 0 is foreground).
        ref: reference mask, same shape.
        spacing: physical size of a pixel per axis (default 1 per axis, i.e. pixels).

    Returns:
        The distance in the units of ``spacing``: 0.0 when both masks are empty, ``inf`` when
        exactly one is.
    """
    p, r = np.asarray(pred) > 0, np.asarray(ref) > 0
    if not p.any() and not r.any():
        return 0.0
    if not p.any() or not r.any():
        return float("inf")
    spacing = tuple(spacing) if spacing is not None else (1.0,) * p.ndim
    return float(max(np.percentile(_surface_distances(p, r, spacing), 95),
                     np.percentile(_surface_distances(r, p, spacing), 95)))


def boundary_f1(pred: np.ndarray, ref: np.ndarray, tolerance: float = 2.0) -> float:
    """F1 of contour pixels matched within ``tolerance`` pixels (boundary F-score)."""
    from scipy import ndimage as ndi

    p, r = np.asarray(pred) > 0, np.asarray(ref) > 0
    sp, sr = _surface(p), _surface(r)
    if not sp.any() and not sr.any():
        return 1.0
    if not sp.any() or not sr.any():
        return 0.0
    precision = float((ndi.distance_transform_edt(~sr)[sp] <= tolerance).mean())
    recall = float((ndi.distance_transform_edt(~sp)[sr] <= tolerance).mean())
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def per_class_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    classes: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
) -> dict[int, dict[str, float]]:
    """Dice, IoU, HD95 and boundary F1 per foreground class of two class-label images.

    Args:
        pred: class labels (0 = background).
        ref: reference class labels, same shape.
        classes: the classes to score; default every non-zero class in either image.
        spacing: physical pixel size per axis, for HD95.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    if classes is None:
        classes = sorted(set(np.unique(pred).tolist()) | set(np.unique(ref).tolist()) - {0})
    out: dict[int, dict[str, float]] = {}
    for c in classes:
        p, r = pred == c, ref == c
        out[int(c)] = {
            "dice": dice(p, r),
            "iou": iou(p, r),
            "hd95": hd95(p, r, spacing),
            "boundary_f1": boundary_f1(p, r),
        }
    return out


def _overlaps(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, ...]:
    """Overlap of every reference (rows) and predicted (columns) instance, background left out.

    Returns:
        ``(ious, inter, union, ref_areas, pred_areas)``.
    """
    pred, ref = np.asarray(pred).ravel(), np.asarray(ref).ravel()
    p_ids, p_inv = np.unique(pred, return_inverse=True)
    r_ids, r_inv = np.unique(ref, return_inverse=True)
    inter = np.zeros((len(r_ids), len(p_ids)), np.int64)
    np.add.at(inter, (r_inv, p_inv), 1)
    r_area, p_area = inter.sum(1), inter.sum(0)
    union = r_area[:, None] + p_area[None, :] - inter
    keep_r, keep_p = r_ids != 0, p_ids != 0
    inter = inter[keep_r][:, keep_p]
    union = union[keep_r][:, keep_p]
    with np.errstate(divide="ignore", invalid="ignore"):
        ious = np.where(union > 0, inter / union, 0.0)
    return ious, inter, union, r_area[keep_r], p_area[keep_p]


#: The IoU thresholds of the DSB 2018 score: 0.5, 0.55, ..., 0.95.
DSB_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def _match_counts(ious: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` of a reference x prediction IoU matrix, matched one-to-one at IoU > t.

    With ``threshold >= 0.5`` a match is unique (two objects cannot both overlap one by more
    than half of their union), so counting the reference objects with a match is optimal;
    below 0.5 the pairs come from a maximum-IoU assignment.
    """
    n_ref, n_pred = ious.shape
    if n_ref == 0 or n_pred == 0:
        return 0, n_pred, n_ref
    if threshold >= 0.5:
        tp = int((ious > threshold).any(axis=1).sum())
    else:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(-ious)
        tp = int((ious[rows, cols] > threshold).sum())
    return tp, n_pred - tp, n_ref - tp


def _aji(overlaps: tuple[np.ndarray, ...]) -> float:
    """Aggregated Jaccard Index from :func:`_overlaps` (see :func:`aggregated_jaccard`)."""
    ious, inter, union, ref_area, pred_area = overlaps
    n_ref, n_pred = ious.shape
    if n_ref == 0:
        return 1.0 if n_pred == 0 else 0.0
    if n_pred == 0:
        return 0.0  # nothing intersects: the union is the reference objects alone
    best = ious.argmax(axis=1)
    paired = inter[np.arange(n_ref), best] > 0
    rows, cols = np.flatnonzero(paired), best[paired]
    total_inter = inter[rows, cols].sum()
    total_union = union[rows, cols].sum() + ref_area[~paired].sum()
    total_union += pred_area[np.setdiff1d(np.arange(n_pred), cols)].sum()
    return float(total_inter / total_union) if total_union else 0.0


def match_instances(pred: np.ndarray, ref: np.ndarray, threshold: float = 0.5) -> dict[str, int]:
    """True/false positives and negatives of instances matched one-to-one at IoU > threshold.

    With ``threshold >= 0.5`` a match is unique, so greedy matching is optimal.
    """
    tp, fp, fn = _match_counts(_overlaps(pred, ref)[0], threshold)
    return {"tp": tp, "fp": fp, "fn": fn}


def instance_f1(pred: np.ndarray, ref: np.ndarray, threshold: float = 0.5) -> float:
    """F1 of instances matched at IoU > ``threshold`` (1.0 when both are empty)."""
    tp, fp, fn = _match_counts(_overlaps(pred, ref)[0], threshold)
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom


def aggregated_jaccard(pred: np.ndarray, ref: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017) of two instance label images.

    Each reference object is paired with the prediction of highest IoU with it (the lowest
    label on a tie); the pair adds its intersection to the numerator and its union to the
    denominator. A reference object that no prediction overlaps adds its own area to the
    denominator (as in HoVer-Net's ``get_fast_aji``; it is not paired with an arbitrary
    prediction), and so does every prediction paired with no reference object. 1.0 when both
    images are empty.
    """
    return _aji(_overlaps(pred, ref))


def instance_scores(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Every object-level score of two instance label images, from one overlap matrix.

    A predicted object matches a reference object when their IoU is above the threshold
    (one-to-one). At IoU 0.5: ``tp``, ``fp``, ``fn``; ``f1_iou50`` = 2TP / (2TP + FP + FN);
    ``ap_iou50`` = TP / (TP + FP + FN). ``dsb_score`` is that AP averaged over the IoU
    thresholds :data:`DSB_THRESHOLDS` (0.5, 0.55, ..., 0.95; the Data Science Bowl 2018
    score of one image). ``aji`` is :func:`aggregated_jaccard`. When both images are empty
    every score is 1.0 (and the counts 0).

    Args:
        pred: predicted instance labels (0 = background), YX or ZYX.
        ref: reference instance labels, same shape.

    Returns:
        ``{"tp", "fp", "fn", "f1_iou50", "ap_iou50", "dsb_score", "aji"}``.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    overlaps = _overlaps(pred, ref)
    ious = overlaps[0]

    def ap(tp: int, fp: int, fn: int) -> float:
        return 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn)

    tp, fp, fn = _match_counts(ious, 0.5)
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "f1_iou50": 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn),
        "ap_iou50": ap(tp, fp, fn),
        "dsb_score": float(np.mean([ap(*_match_counts(ious, t)) for t in DSB_THRESHOLDS])),
        "aji": _aji(overlaps),
    }
