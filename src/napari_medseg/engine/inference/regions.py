"""Sub-regions of an image: what a run covers, where its outputs go, how they are scored.

A widget (or a script) segments a *region* of an image rather than always the whole of it:
the plane on screen, the part of that plane visible on the canvas, or everything. This module
holds the small pure functions behind that, so that the interfaces only gather viewer state
and call them:

* :class:`Region`: a box over an image's non-channel axes (the axes a napari layer shows).
  :func:`whole_region`, :func:`plane_region` and :func:`visible_region` build one from a
  shape, the current position and the visible corners.
* :meth:`Region.output` maps the box onto the outputs of a network whose output is
  ``factor`` times larger in-plane (SASR-Net); :func:`output_geometry` gives the matching
  physical scale and translate of those outputs.
* :func:`finished_keys` tells which parts of a cancelled run's outputs are complete.
* :func:`stack_blocks` splits a label image into its independent spatial blocks (one per
  ``T``/``I`` index), the unit boundary and instance post-processing works on.
* :func:`region_metrics` scores a prediction against a reference label image per class
  (Dice, IoU, HD95, boundary F1), binarizing an instance reference for a binary network.

Axes: a *region* covers an image's non-channel axes in order (``"ZYX"``, ``"IYX"``,
``"TZYX"`` ...); the last two are the in-plane axes Y and X.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np

from ...errors import InputShapeError
from ...io.metadata import upsampled_geometry
from .. import metrics

__all__ = [
    "Region",
    "whole_region",
    "plane_region",
    "visible_region",
    "output_geometry",
    "finished_keys",
    "stack_blocks",
    "region_metrics",
]

#: Axis letters whose indices are unrelated images (never a spatial neighbourhood).
STACK_LETTERS = "TI"


@dataclass(frozen=True)
class Region:
    """A box over an image's non-channel axes.

    Attributes:
        start: first index per axis.
        stop: one past the last index per axis.
    """

    start: tuple[int, ...]
    stop: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.start) != len(self.stop):
            raise ValueError(f"start {self.start} and stop {self.stop} differ in length")
        if any(b <= a for a, b in zip(self.start, self.stop)):
            raise ValueError(f"empty region {self.start} -> {self.stop}")

    @property
    def ndim(self) -> int:
        """Number of axes."""
        return len(self.start)

    @property
    def shape(self) -> tuple[int, ...]:
        """Size per axis."""
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def size(self) -> int:
        """Number of pixels."""
        return math.prod(self.shape)

    @property
    def slices(self) -> tuple[slice, ...]:
        """The box as slices, one per axis."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def key(self, extra_axes: int = 0) -> tuple[slice, ...]:
        """Index of the box into an array with ``extra_axes`` more axes at the end (RGB)."""
        return self.slices + (slice(None),) * extra_axes

    def output(self, factor: int = 1, plane_ndim: int = 2) -> Region:
        """The box on outputs ``factor`` times larger along the last ``plane_ndim`` axes."""
        if factor == 1:
            return self
        n = self.ndim - plane_ndim
        start = self.start[:n] + tuple(s * factor for s in self.start[n:])
        stop = self.stop[:n] + tuple(s * factor for s in self.stop[n:])
        return Region(start, stop)

    def offset(self, key: Sequence) -> tuple:
        """Shift an index into this region's arrays (ints and slices) to the full image."""
        out = []
        for k, a, b in zip(key, self.start, self.stop):
            if isinstance(k, slice):
                lo = a + (k.start or 0)
                hi = b if k.stop is None else a + k.stop
                out.append(slice(lo, hi))
            else:
                out.append(a + int(k))
        return tuple(out)

    def covers(self, shape: Sequence[int]) -> bool:
        """True when the box is the whole of an array of ``shape``."""
        return self.start == (0,) * len(shape) and self.stop == tuple(int(s) for s in shape)

    def describe(self, axes: str | None = None) -> str:
        """``"Z 3, Y 0-255, X 0-255"`` (1-based nowhere: indices as numpy shows them)."""
        axes = axes or "".join(chr(ord("a") + i) for i in range(self.ndim))
        parts = []
        for letter, a, b in zip(axes, self.start, self.stop):
            parts.append(f"{letter} {a}" if b - a == 1 else f"{letter} {a}-{b - 1}")
        return ", ".join(parts)


def whole_region(shape: Sequence[int]) -> Region:
    """The box covering an array of ``shape``."""
    return Region((0,) * len(shape), tuple(int(s) for s in shape))


def _clip_index(value: float, size: int) -> int:
    return int(min(max(int(round(float(value))), 0), size - 1))


def plane_region(shape: Sequence[int], point: Sequence[float], plane_ndim: int = 2) -> Region:
    """The in-plane box shown at ``point``: every other axis fixed to its current index.

    Args:
        shape: the image's non-channel shape.
        point: the current position in data coordinates, one value per axis (the in-plane
            values are ignored); rounded and clipped to the image.
        plane_ndim: how many trailing axes form the plane.
    """
    shape = tuple(int(s) for s in shape)
    if len(point) < len(shape) - plane_ndim:
        raise ValueError(f"point {tuple(point)} does not fit shape {shape}")
    point = tuple(point)[-len(shape):] if len(point) >= len(shape) else (
        (0.0,) * (len(shape) - len(point)) + tuple(point))
    n = len(shape) - plane_ndim
    start = tuple(_clip_index(p, s) for p, s in zip(point[:n], shape[:n])) + (0,) * plane_ndim
    stop = tuple(a + 1 for a in start[:n]) + shape[n:]
    return Region(start, stop)


def visible_region(
    shape: Sequence[int],
    point: Sequence[float],
    corners: np.ndarray | Sequence[Sequence[float]] | None,
    min_size: int = 1,
    plane_ndim: int = 2,
) -> Region:
    """The part of the current plane inside the visible corners of the canvas.

    Args:
        shape: the image's non-channel shape.
        point: the current position in data coordinates (see :func:`plane_region`).
        corners: 2 x ndim array, the first and last visible pixel per axis in data
            coordinates (napari's ``layer.corner_pixels``; only the last ``plane_ndim``
            columns are used). None, or a degenerate box (a canvas never drawn), gives the
            whole plane.
        min_size: the box is grown (centred, within the image) to at least this side, so
            that a deep zoom still gives the network enough context.
        plane_ndim: how many trailing axes form the plane.
    """
    plane = plane_region(shape, point, plane_ndim)
    if corners is None:
        return plane
    corners = np.asarray(corners, dtype=float)
    if corners.shape[0] != 2 or corners.shape[1] < plane_ndim:
        raise ValueError(f"corners must be 2 x ndim, not {corners.shape}")
    lo_c, hi_c = corners[0, -plane_ndim:], corners[1, -plane_ndim:]
    if not np.all(np.isfinite(corners[:, -plane_ndim:])) or (
            np.all(lo_c == 0) and np.all(hi_c == 0)):
        return plane
    sizes = plane.shape[-plane_ndim:]
    start, stop = [], []
    for lo, hi, n in zip(lo_c, hi_c, sizes):
        a = int(min(max(math.floor(min(lo, hi)), 0), n - 1))
        b = int(min(max(math.floor(max(lo, hi)) + 1, a + 1), n))
        want = min(int(min_size), n)
        if b - a < want:
            grow = want - (b - a)
            a = max(0, a - grow // 2)
            b = min(n, a + want)
            a = b - want
        start.append(a)
        stop.append(b)
    n_fixed = len(shape) - plane_ndim
    return Region(plane.start[:n_fixed] + tuple(start), plane.stop[:n_fixed] + tuple(stop))


def output_geometry(
    scale: Sequence[float],
    translate: Sequence[float],
    factor: int = 1,
    plane_ndim: int = 2,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Scale and translate of outputs ``factor`` times finer than the image in-plane.

    napari places pixel ``i`` of a layer at ``translate + i * scale`` (its centre). An output
    pixel ``j`` of a network that upsamples by ``factor`` covers ``1 / factor`` of an input
    pixel, so its centre lies at input position ``(j + 0.5) / factor - 0.5``.

    Args:
        scale: the image layer's scale, one value per non-channel axis.
        translate: the image layer's translate, same length.
        factor: output side / input side.
        plane_ndim: how many trailing axes are upsampled.

    Returns:
        ``(scale, translate)`` of the output layers.
    """
    n = len(scale) - plane_ndim
    return upsampled_geometry(scale, translate, (1,) * n + (factor,) * plane_ndim)


def finished_keys(
    out_axes: str,
    shape: Sequence[int],
    stack_axes: str,
    planes_done: Sequence[int],
) -> list[tuple]:
    """Indices of the complete parts of a run's outputs.

    A run iterates over the planes of its ``stack_axes`` in row-major order; a cancelled
    run finished the planes in ``planes_done``. A run over a single plane keeps the rows
    it merged, so its whole output is returned.

    Args:
        out_axes: the outputs' axes (the image's without ``C``), e.g. ``"ZYX"``.
        shape: the outputs' shape.
        stack_axes: the axes iterated over (``"Z"``, ``"TZ"``, ``""``), from the tile plan.
        planes_done: indices of the finished planes.

    Returns:
        One index per finished plane (a single full index when all or none are stacked).
    """
    full = (slice(None),) * len(shape)
    stack = [a for a in out_axes if a in stack_axes]
    if not stack:
        return [full]
    stack_shape = tuple(int(shape[out_axes.index(a)]) for a in stack)
    n = math.prod(stack_shape)
    done = sorted({int(p) for p in planes_done if 0 <= int(p) < n})
    if len(done) == n:
        return [full]
    keys = []
    for p in done:
        idx = np.unravel_index(p, stack_shape)
        keys.append(tuple(int(idx[stack.index(a)]) if a in stack else slice(None)
                          for a in out_axes))
    return keys


def stack_blocks(axes: str, shape: Sequence[int]) -> list[tuple]:
    """Indices of each independent spatial block of a label image (one per ``T``/``I``).

    Args:
        axes: the label image's axes (no ``C``), e.g. ``"ZYX"``, ``"IYX"``, ``"TZYX"``.
        shape: its shape.
    """
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes!r} do not fit shape {tuple(shape)}")
    stacked = [i for i, a in enumerate(axes) if a in STACK_LETTERS]
    if not stacked:
        return [(slice(None),) * len(shape)]
    keys = []
    for idx in product(*(range(int(shape[i])) for i in stacked)):
        key: list = [slice(None)] * len(shape)
        for i, v in zip(stacked, idx):
            key[i] = v
        keys.append(tuple(key))
    return keys


def region_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    axes: str,
    num_classes: int,
    spacing: Sequence[float] | None = None,
) -> dict[int, dict[str, float]]:
    """Dice, IoU, HD95 and boundary F1 per class of a prediction against a reference.

    A binary network (``num_classes`` 1 or 2) is scored on foreground (class 1) against the
    reference's foreground, so an instance reference (one label per object) works. For more
    classes each class ``1..K-1`` is scored. Axes of length 1 are dropped (a single slice is
    scored in 2D); ``T``/``I`` blocks are scored separately and averaged (HD95 stays ``inf``
    when any block has a class on one side only).

    Args:
        prediction: class labels, axes ``axes``.
        reference: reference labels, same shape.
        axes: the axes of both (no ``C``).
        num_classes: the network's K.
        spacing: physical pixel size per axis (for HD95); ``T``/``I`` entries are ignored.

    Returns:
        class -> ``{"dice", "iou", "hd95", "boundary_f1"}``.

    Raises:
        InputShapeError: the two shapes differ.
    """
    pred = np.asarray(prediction)
    ref = np.asarray(reference)
    if pred.shape != ref.shape:
        raise InputShapeError(
            f"The reference has shape {ref.shape} but the prediction has {pred.shape}; pick a "
            "reference layer on the same grid.")
    if len(axes) != pred.ndim:
        raise ValueError(f"axes {axes!r} do not fit shape {pred.shape}")
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * pred.ndim
    if num_classes <= 2:
        pred = (pred > 0).astype(np.uint8)
        ref = (ref > 0).astype(np.uint8)
        classes = [1]
    else:
        classes = list(range(1, int(num_classes)))
    # Drop singleton axes while at least two remain (a slice of a volume is scored in 2D).
    keep = [i for i, n in enumerate(pred.shape) if n > 1]
    while len(keep) < min(2, pred.ndim):
        keep = sorted(set(keep) | {max(set(range(pred.ndim)) - set(keep))})
    squeeze = tuple(i for i in range(pred.ndim) if i not in keep)
    if squeeze:
        pred, ref = pred.squeeze(squeeze), ref.squeeze(squeeze)
        axes = "".join(a for i, a in enumerate(axes) if i in keep)
        spacing = tuple(s for i, s in enumerate(spacing) if i in keep)
    spatial = [i for i, a in enumerate(axes) if a not in STACK_LETTERS]
    spatial_spacing = tuple(spacing[i] for i in spatial)
    scores: dict[int, dict[str, list[float]]] = {}
    for key in stack_blocks(axes, pred.shape):
        block = metrics.per_class_metrics(pred[key], ref[key], classes, spatial_spacing)
        for c, values in block.items():
            for name, v in values.items():
                scores.setdefault(c, {}).setdefault(name, []).append(float(v))
    return {c: {name: float(np.mean(v)) for name, v in values.items()}
            for c, values in scores.items()}
