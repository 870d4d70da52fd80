"""What the user changed: the diff of prediction and corrected labels, its regions, their groups.

1. :func:`changed_mask` compares the last prediction with the edited labels (foreground for
   one- and two-class networks, class indices otherwise; plus the boundary layer when one is
   given).
2. :func:`find_regions` cuts the changes into boxes (:class:`CorrectionRegion`), one per
   connected change grown by ``margin`` pixels (boxes that touch are merged), per slice.
3. :func:`group_regions` puts regions whose crops overlap in-plane on slices at most
   ``slice_gap`` apart into one split group; the held-out split is by group
   (:func:`~.datasets.split_samples`), so no area is ever on both sides.

:func:`class_targets` turns a label image into training targets (class indices, boundary).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...errors import InputShapeError
from ..seg_task import SegTask, training_targets

__all__ = ["CorrectionRegion", "class_targets", "changed_mask", "find_regions", "group_regions"]

#: Axis letters of unrelated images: regions on different indices never share a group
#: because of their distance, only ``Z`` and ``T`` neighbours do.
_INDEPENDENT = "I"





@dataclass(frozen=True)
class CorrectionRegion:
    """A box the user changed, on one plane.

    Attributes:
        plane: index of the plane along the leading label axes (``()`` for a YX image).
        box: ``(y0, x0, y1, x1)``: the changed pixels grown by the margin, clipped.
        changed: number of changed pixels inside.
    """

    plane: tuple[int, ...]
    box: tuple[int, int, int, int]
    changed: int = 0

    def grown(self, pixels: int, shape: Sequence[int]) -> tuple[int, int, int, int]:
        """The box grown by ``pixels`` on each side, clipped to a plane of ``shape`` (YX)."""
        y0, x0, y1, x1 = self.box
        return (max(0, y0 - pixels), max(0, x0 - pixels), min(int(shape[0]), y1 + pixels),
                min(int(shape[1]), x1 + pixels))


def class_targets(
    labels: np.ndarray, num_classes: int, task: SegTask | None = None,
    boundary: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Training targets from a corrected label image: see
    :func:`~napari_medseg.engine.seg_task.training_targets` (the one rule)."""
    return training_targets(labels, num_classes, task, boundary)


def changed_mask(
    prediction: np.ndarray,
    corrected: np.ndarray,
    num_classes: int,
    predicted_boundary: np.ndarray | None = None,
    corrected_boundary: np.ndarray | None = None,
) -> np.ndarray:
    """Where the corrected labels differ from the prediction (bool, the labels' shape).

    One- and two-class networks compare foreground (so renumbered instances are no change);
    more classes compare class indices. Boundary layers, when both are given, add their
    differences (a split of two touching objects shows there).
    """
    prediction, corrected = np.asarray(prediction), np.asarray(corrected)
    if prediction.shape != corrected.shape:
        raise InputShapeError(
            f"The prediction has shape {prediction.shape} but the corrected labels have "
            f"{corrected.shape}; compare layers on the same grid.")
    if num_classes <= 2:
        changed = (prediction > 0) != (corrected > 0)
    else:
        changed = prediction.astype(np.int64) != corrected.astype(np.int64)
    if predicted_boundary is not None and corrected_boundary is not None:
        pb, cb = np.asarray(predicted_boundary), np.asarray(corrected_boundary)
        if pb.shape == changed.shape and cb.shape == changed.shape:
            changed |= (pb > 0) != (cb > 0)
    return changed


def _merge_boxes(boxes: list[list[int]]) -> list[list[int]]:
    """Merge overlapping or touching (y0, x0, y1, x1, count) boxes until none overlap."""
    merged = True
    while merged:
        merged = False
        out: list[list[int]] = []
        for box in boxes:
            for other in out:
                if box[0] <= other[2] and other[0] <= box[2] and box[1] <= other[3] and (
                        other[1] <= box[3]):
                    other[0], other[1] = min(other[0], box[0]), min(other[1], box[1])
                    other[2], other[3] = max(other[2], box[2]), max(other[3], box[3])
                    other[4] += box[4]
                    merged = True
                    break
            else:
                out.append(list(box))
        boxes = out
    return boxes


def find_regions(changed: np.ndarray, margin: int = 16, min_changed: int = 4) -> list[
        CorrectionRegion]:
    """Boxes around the changed pixels, per plane.

    Each 8-connected change of at least ``min_changed`` pixels gives its bounding box grown by
    ``margin`` on every side (clipped to the plane); boxes that then overlap or touch are
    merged, so one stroke across two objects is one region.

    Args:
        changed: bool, ``YX`` or with leading plane axes.
        margin: pixels added around each change.
        min_changed: smaller changes are ignored (stray clicks, antialiasing).

    Returns:
        The regions, plane by plane, top-left first.
    """
    from scipy import ndimage as ndi

    changed = np.asarray(changed, bool)
    if changed.ndim < 2:
        raise InputShapeError("Corrections need label images with Y and X axes.")
    h, w = changed.shape[-2:]
    regions: list[CorrectionRegion] = []
    structure = np.ones((3, 3), bool)
    for plane in np.ndindex(*changed.shape[:-2]):
        layer = changed[plane]
        if not layer.any():
            continue
        labelled, n = ndi.label(layer, structure=structure)
        sizes = np.bincount(labelled.ravel(), minlength=n + 1)
        boxes = []
        for i, sl in enumerate(ndi.find_objects(labelled), start=1):
            if sl is None or sizes[i] < max(1, min_changed):
                continue
            boxes.append([max(0, sl[0].start - margin), max(0, sl[1].start - margin),
                          min(h, sl[0].stop + margin), min(w, sl[1].stop + margin),
                          int(sizes[i])])
        for y0, x0, y1, x1, count in sorted(_merge_boxes(boxes)):
            regions.append(CorrectionRegion(tuple(int(p) for p in plane),
                                            (int(y0), int(x0), int(y1), int(x1)), int(count)))
    return regions


def group_regions(
    regions: Sequence[CorrectionRegion],
    plane_shape: Sequence[int],
    context: int = 32,
    slice_gap: int = 1,
    lead_axes: str = "",
) -> list[int]:
    """Split groups: regions whose crops overlap in-plane on nearby slices share a group.

    Two regions are linked when their boxes grown by ``context`` (the crops the network sees)
    overlap in Y and X, and their plane indices differ by at most ``slice_gap`` along ``Z``
    and ``T`` axes and not at all along ``I`` (independent images). Groups are the connected
    sets of links, so a held-out group never shares pixels with a training crop.

    Args:
        regions: the regions.
        plane_shape: the plane's (Y, X) size.
        context: the crops' context in pixels.
        slice_gap: largest plane distance that links.
        lead_axes: the letters of the leading plane axes (``"Z"``, ``"TZ"``, ``"I"``...).

    Returns:
        A group number per region (0, 1, ... in order of first appearance).
    """
    n = len(regions)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if not regions:
        return []
    crops = [r.grown(context, plane_shape) for r in regions]
    depth = len(regions[0].plane)
    letters = lead_axes if len(lead_axes) == depth else "Z" * depth
    for i in range(n):
        for j in range(i + 1, n):
            a, b = crops[i], crops[j]
            if not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]):
                continue
            near = all(
                (pa == pb) if letter in _INDEPENDENT else abs(pa - pb) <= slice_gap
                for letter, pa, pb in zip(letters, regions[i].plane, regions[j].plane))
            if near:
                parent[find(i)] = find(j)
    numbers: dict[int, int] = {}
    return [numbers.setdefault(find(i), len(numbers)) for i in range(n)]
