"""The numbers behind an interactive segmentation session: kept probabilities, new thresholds.

A viewer keeps the probabilities of every region its runs covered, so that a new threshold
re-derives the masks (and the boundaries of a network without a boundary head) without
running the network again. This module holds that arithmetic; the interface only keeps the
arrays and copies the results into its layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .postprocess import boundary_per_block, dequantize_probabilities, mask_from_probabilities
from .regions import Region, plane_region, visible_region, whole_region

__all__ = ["scope_region", "store_probabilities", "rethreshold_regions", "drop_contained"]


def scope_region(
    scope: str,
    shape: Sequence[int],
    point: Sequence[float] | None = None,
    corners: np.ndarray | None = None,
    downsample: Sequence[float] | None = None,
    min_size: int = 128,
) -> Region:
    """The region of an image a viewer's scope covers.

    Args:
        scope: ``"whole"``, ``"slice"`` (the plane through ``point``) or ``"visible"`` (the
            part of that plane inside ``corners``).
        shape: the image's non-channel shape.
        point: the viewer's position in the image's data coordinates (missing leading axes
            count as 0; extra leading axes are dropped).
        corners: the visible box, 2 x ndim data coordinates (of the level shown), or None.
        downsample: the shown level's downsampling factors, or None for full resolution.
        min_size: the smallest in-plane side of a visible region.
    """
    if scope == "whole":
        return whole_region(shape)
    n = len(shape)
    pos = np.asarray(point if point is not None else np.zeros(n), float)
    pos = pos[-n:] if len(pos) >= n else np.concatenate([np.zeros(n - len(pos)), pos])
    if scope == "slice":
        return plane_region(shape, pos)
    box = None if corners is None else np.asarray(corners, float)
    if box is not None and downsample is not None:
        box = box * np.asarray(downsample, float)
    if box is not None and box.shape[1] != n:
        box = None
    return visible_region(shape, pos, box, min_size=min_size)


def store_probabilities(target: np.ndarray, region: Region, probabilities: np.ndarray,
                        keys: Sequence[tuple]) -> list[Region]:
    """Write a run's probabilities into the kept ones, where the run finished.

    Args:
        target: K x (full output shape) float16, written in place.
        region: where the run's outputs go, in output coordinates.
        probabilities: K x region.shape, as the engine returned them (possibly quantized).
        keys: the finished parts of the region's arrays (see ``regions.finished_keys``).

    Returns:
        The output regions the written probabilities cover (the whole region when every key
        is a box, else one region per finished part).
    """
    probs = dequantize_probabilities(probabilities).astype(np.float16)
    for key in keys:
        target[(slice(None),) + region.offset(key)] = probs[(slice(None),) + tuple(key)]
    if all(isinstance(k, slice) for key in keys for k in key):
        return [region]
    covered = []
    for key in keys:
        full = region.offset(key)
        start = tuple(k.start if isinstance(k, slice) else k for k in full)
        stop = tuple(k.stop if isinstance(k, slice) else k + 1 for k in full)
        covered.append(Region(start, stop))
    return covered


def rethreshold_regions(
    probs: np.ndarray,
    regions: Sequence[Region],
    threshold: float,
    axes: str,
    derive_boundary: bool,
) -> list[tuple[tuple, np.ndarray, np.ndarray | None]]:
    """The masks (and boundaries) of kept one-class probabilities at a new threshold.

    Args:
        probs: 1 x (output shape) kept probabilities.
        regions: the regions they are valid in.
        threshold: the foreground threshold, in (0, 1).
        axes: the label outputs' axes (boundaries are derived per ``T``/``I`` block).
        derive_boundary: also derive each region's boundary from its new mask (for a
            network without a boundary head).

    Returns:
        ``[(index into the label outputs, mask, boundary or None)]``, one per region.
    """
    out = []
    for region in regions:
        block = probs[(slice(None),) + region.slices].astype(np.float32)
        mask = mask_from_probabilities(block, float(threshold))
        boundary = boundary_per_block(mask, axes) if derive_boundary else None
        out.append((region.slices, mask, boundary))
    return out


def drop_contained(regions: list[Region]) -> list[Region]:
    """The regions less those contained in a later one (a re-run of the same box)."""
    kept: list[Region] = []
    for i, r in enumerate(regions):
        inside = any(
            all(a2 <= a and b <= b2 for a, b, a2, b2 in zip(r.start, r.stop, o.start, o.stop))
            for o in regions[i + 1:])
        if not inside:
            kept.append(r)
    return kept
