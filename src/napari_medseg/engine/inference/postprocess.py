"""From merged probabilities to the outputs users keep: masks, boundaries, instances, scores.

Per-pixel steps (:func:`mask_from_probabilities`, :func:`quantize_probabilities`,
:func:`boundary_from_probability`) run on each band of rows as the stitcher finishes it;
steps that need a whole plane or volume (:func:`derive_boundary`, :func:`instances`,
:func:`z_consistency`) run once it is written.

Probabilities have the class axis first: ``K x (spatial)``; with K == 1 it holds the
foreground probability of a sigmoid network.
"""

from __future__ import annotations

import numpy as np

from ..boundaries import boundary_from_labels, instances_from_mask
from ..metrics import dice
from .regions import stack_blocks

__all__ = [
    "mask_dtype",
    "mask_from_probabilities",
    "two_class",
    "quantize_probabilities",
    "dequantize_probabilities",
    "boundary_from_probability",
    "derive_boundary",
    "instances",
    "boundary_per_block",
    "instances_per_block",
    "foreground_of_classes",
    "seeded_instances_per_block",
    "count_per_block",
    "offset_labels",
    "z_consistency",
    "dice",
]


def mask_dtype(num_classes: int) -> np.dtype:
    """The label dtype for K classes (uint8 up to 255 classes, else uint16)."""
    return np.dtype(np.uint8 if num_classes <= 255 else np.uint16)


def mask_from_probabilities(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Class labels from probabilities.

    Args:
        probs: K x (spatial). K == 1: foreground probability (label 1 above ``threshold``);
            K > 1: class probabilities (label = argmax, 0 = background).
        threshold: foreground threshold for K == 1.
    """
    probs = np.asarray(probs)
    if probs.shape[0] == 1:
        return np.greater(probs[0], threshold).view(np.uint8)
    if probs.shape[0] == 2:  # argmax of two (ties to 0), without argmax's strided pass
        return np.greater(probs[1], probs[0]).view(np.uint8)
    return probs.argmax(axis=0).astype(mask_dtype(probs.shape[0]))


def foreground_of_classes(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The foreground (uint8 0/1) of class probabilities: ``1 - background > threshold``
    (the instance task's mask: interior and boundary together)."""
    return np.less(np.asarray(probs)[0], 1.0 - threshold).view(np.uint8)


def two_class(foreground: np.ndarray) -> np.ndarray:
    """The two class probabilities ``[1 - p, p]`` (2 x spatial, float32) from ``p``."""
    p = np.asarray(foreground, dtype=np.float32)
    out = np.empty((2,) + p.shape, np.float32)
    np.subtract(1.0, p, out=out[0])
    out[1] = p
    return out


def quantize_probabilities(probs: np.ndarray, dtype: str = "float16") -> np.ndarray:
    """Store probabilities compactly: ``float16``, or ``uint8`` scaled to 0..255 (rounded)."""
    probs = np.asarray(probs, dtype=np.float32)
    if dtype == "float16":
        return probs.astype(np.float16)
    if dtype == "uint8":
        return np.clip(np.rint(probs * 255.0), 0, 255).astype(np.uint8)
    raise ValueError(f"unknown probability dtype {dtype!r}")


def dequantize_probabilities(stored: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_probabilities` (float32; uint8 loses < 0.002)."""
    stored = np.asarray(stored)
    if stored.dtype == np.uint8:
        return stored.astype(np.float32) / 255.0
    return stored.astype(np.float32)


def boundary_from_probability(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """A binary boundary map (uint8, 1 = boundary) from a boundary head's probability."""
    return (np.asarray(prob) > threshold).astype(np.uint8)


def derive_boundary(labels: np.ndarray) -> np.ndarray:
    """A boundary map for a network without a boundary head, from its mask or instances.

    Each YX plane on its own (the networks see planes, and the slices of an anisotropic stack
    differ too much for a 3D outline: on the EM sample a 3D band covered 45 % of the voxels,
    the plane outlines 6.5 %). Uses
    :func:`~napari_medseg.engine.boundaries.boundary_from_labels` with ``mode="inner"``: each
    object's one-pixel outline (touching instances get a line between them; the image edge is
    not one).
    """
    labels = np.asarray(labels)
    if labels.ndim <= 2:
        return boundary_from_labels(labels, mode="inner")
    out = np.zeros(labels.shape, np.uint8)
    for index in np.ndindex(*labels.shape[:-2]):
        out[index] = boundary_from_labels(labels[index], mode="inner")
    return out


def instances(
    mask: np.ndarray, boundary: np.ndarray | None = None, min_size: int = 8
) -> np.ndarray:
    """Instance labels: watershed seeded by the mask minus the boundary.

    Args:
        mask: class labels or a binary mask (> 0 is foreground), YX or ZYX.
        boundary: boundary probability or binary map of the same shape (> 0.5 is boundary);
            None when the network has no boundary head (seeds are the connected components).
        min_size: smallest seed kept, in pixels.

    Returns:
        int32 labels, 0 = background.
    """
    return instances_from_mask(mask, boundary, min_size=min_size)


def boundary_per_block(labels, axes: str, out=None):
    """A boundary map (uint8, 1 = boundary) of a label image, one spatial block at a time.

    Each ``T``/``I`` index is its own block, and :func:`derive_boundary` outlines each plane
    of a block, so objects never touch across unrelated images.

    Args:
        labels: the label image (numpy or zarr), axes ``axes`` (no ``C``).
        axes: its axes, e.g. ``"YX"``, ``"ZYX"``, ``"IYX"``.
        out: where to write (same shape, uint8), or None for a new numpy array.

    Returns:
        ``out``.
    """
    if out is None:
        out = np.zeros(tuple(labels.shape), np.uint8)
    for key in stack_blocks(axes, tuple(labels.shape)):
        out[key] = derive_boundary(np.asarray(labels[key]))
    return out


def instances_per_block(mask, boundary, axes: str, min_size: int = 8, out=None):
    """Instance labels (int32) of a mask split by a boundary map, one spatial block at a time.

    Objects are numbered from 1 within each ``T``/``I`` block, the same in every path (the
    engine's outputs and the widget's tools alike).

    Args:
        mask: class labels (numpy or zarr), axes ``axes``.
        boundary: a boundary map of the same shape, or None (split by distance alone).
        axes: the label image's axes.
        min_size: objects smaller than this many pixels are dropped.
        out: where to write (same shape, int32), or None for a new numpy array.

    Returns:
        ``out``.
    """
    shape = tuple(mask.shape)
    if boundary is not None and tuple(boundary.shape) != shape:
        from ...errors import InputShapeError

        raise InputShapeError(
            f"The boundary has shape {tuple(boundary.shape)} but the mask has {shape}; "
            "derive the boundary from the mask first.")
    if out is None:
        out = np.zeros(shape, np.int32)
    for key in stack_blocks(axes, shape):
        bnd = None if boundary is None else np.asarray(boundary[key])
        out[key] = instances(np.asarray(mask[key]), bnd, min_size)
    return out


def seeded_instances_per_block(mask, interior, boundary, axes: str, task, min_size: int = 8,
                               out=None):
    """Objects of a boundary-aware prediction (int32), one spatial block at a time.

    :func:`~napari_medseg.engine.seg_task.seeded_watershed` of each ``T``/``I`` block (a
    ``Z`` stack is one block: objects are connected and numbered across its slices).

    Args:
        mask: the foreground (numpy or zarr), axes ``axes``.
        interior: interior probabilities of the same shape (stored as
            :func:`quantize_probabilities` writes them: uint8 or float).
        boundary: boundary probabilities of the same shape.
        axes: the label image's axes.
        task: the network's :class:`~napari_medseg.engine.seg_task.SegTask` (thresholds).
        min_size: objects smaller than this many pixels are dropped.
        out: where to write (same shape, int32), or None for a new numpy array.

    Returns:
        ``out``.
    """
    from ..seg_task import seeded_watershed

    shape = tuple(mask.shape)
    if out is None:
        out = np.zeros(shape, np.int32)
    for key in stack_blocks(axes, shape):
        out[key] = seeded_watershed(np.asarray(mask[key]),
                                    dequantize_probabilities(np.asarray(interior[key])),
                                    dequantize_probabilities(np.asarray(boundary[key])),
                                    task, min_size)
    return out


def offset_labels(labels: np.ndarray, offset: int) -> np.ndarray:
    """Object labels numbered from ``offset + 1`` (background stays 0): objects of one part
    of an image written beside those already numbered up to ``offset``."""
    labels = np.asarray(labels)
    return np.where(labels > 0, labels + int(offset), 0).astype(labels.dtype)


def count_per_block(labels, axes: str) -> int:
    """How many objects a label image holds, counted in each ``T``/``I`` block and summed.

    Objects are numbered per block, so the highest label is not the count of a stack.

    Args:
        labels: instance labels (numpy or zarr), axes ``axes``; 0 is background.
        axes: its axes.
    """
    total = 0
    for key in stack_blocks(axes, tuple(labels.shape)):
        values = np.unique(np.asarray(labels[key]))
        total += int(np.count_nonzero(values))
    return total


def z_consistency(mask, axis: int = 0) -> float | None:
    """How much consecutive slices of a slice-wise prediction agree.

    The mean Dice of the foreground of each slice with the next along ``axis`` (pairs where
    both are empty are skipped). 1.0 means every slice continues the last; sudden changes
    between slices lower it. Reads one slice at a time (works on zarr arrays).

    Args:
        mask: labels (> 0 foreground) with the slicing axis at ``axis``.
        axis: the axis the 2D network sliced along.

    Returns:
        The score in [0, 1], or None for fewer than two slices or an empty prediction.
    """
    n = mask.shape[axis]
    if n < 2:
        return None

    def take(i: int) -> np.ndarray:
        key = [slice(None)] * len(mask.shape)
        key[axis] = i
        return np.asarray(mask[tuple(key)]) > 0

    scores = []
    prev = take(0)
    for i in range(1, n):
        cur = take(i)
        if prev.any() or cur.any():
            scores.append(dice(prev, cur))
        prev = cur
    return float(np.mean(scores)) if scores else None
