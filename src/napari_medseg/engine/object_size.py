"""How large an image's objects are, and the zoom that brings them to the size the weights learnt.

Instance weights record the median diameter of the objects they were trained on
(``SegTask.object_diameter``, in pixels: the diameter of the disc with an object's area;
:func:`median_diameter`). A user's nuclei may be twice that (a higher magnification, tissue
sections) or half. A network whose receptive field, seeds and thresholds learnt 20-pixel
nuclei cuts larger ones into pieces and merges smaller ones, so, as Cellpose does with its
``diameter``, each plane is resampled by ``zoom = trained / measured``: the objects reach the
network at the size it learnt and every output comes back on the image's grid (the
:class:`~napari_medseg.models.working_resolution.Resampled` network that pixel-size
resampling also uses).

This module holds the rules (how a diameter is measured, when and how far an image is
resampled); prediction applies them (:mod:`napari_medseg.engine.inference.object_size`), and
training records the diameter and can bring images to it
(:mod:`napari_medseg.engine.training.datasets`).

The measured diameter is the user's (``PredictConfig.diameter``) or estimated
(:func:`~napari_medseg.engine.inference.object_size.estimate_diameter`): the network runs
once at the image's own pixels on the central crop (at most :data:`CROP` pixels a side) of
the middle plane, its objects are found with fixed watershed settings
(:data:`ESTIMATE_TASK`), and their median diameter is taken. Where that calls for resampling,
the network sees the crop a second time, resampled by the zoom the first pass gave, and the
median of the objects it finds then (measured on the crop's own grid) is the estimate: nuclei
far from the learnt size are cut into pieces or merged at the image's own pixels, which biases
the first pass toward the learnt size, and the second sees them nearer it (as Cellpose refines
its size model's estimate with a segmentation). Fewer than :data:`MIN_OBJECTS` objects give no
estimate (a second pass that finds too few keeps the first pass's). A zoom within
:data:`TOLERANCE` of 1 resamples nothing; zooms are clipped to :data:`ZOOM_RANGE`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

__all__ = ["CROP", "ESTIMATE_TASK", "MIN_OBJECTS", "TOLERANCE", "ZOOM_RANGE",
           "equivalent_diameters", "median_diameter", "diameter_zoom"]

#: The largest side of the crop the diameter is estimated on.
CROP = 512
#: Fewer objects than this in the crop give no estimate.
MIN_OBJECTS = 3
#: A zoom within this factor of 1 (either way) resamples nothing.
TOLERANCE = 1.15
#: The smallest and largest zoom applied.
ZOOM_RANGE = (0.25, 4.0)
#: The watershed settings of the first pass (not the task's tuned ones, which are tuned on
#: results of this estimate).
ESTIMATE_TASK = {"seed_threshold": 0.5, "min_seed": 32, "foreground_threshold": 0.5,
                 "min_object_fraction": 0.0, "object_threshold": None}


def equivalent_diameters(labels: np.ndarray) -> np.ndarray:
    """The diameter (pixels) of the disc with each object's area; one value per label > 0."""
    areas = np.bincount(np.asarray(labels).ravel().astype(np.int64))[1:]
    areas = areas[areas > 0]
    return 2.0 * np.sqrt(areas / math.pi)


def median_diameter(label_images: Iterable[np.ndarray]) -> float | None:
    """The median diameter over every object of ``label_images`` (instance labels), pooled;
    None when they hold no object."""
    values = [equivalent_diameters(labels) for labels in label_images]
    values = np.concatenate(values) if values else np.zeros(0)
    return round(float(np.median(values)), 2) if values.size else None


def diameter_zoom(trained: float, measured: float) -> float | None:
    """The zoom taking objects of ``measured`` pixels to ``trained`` (clipped to
    :data:`ZOOM_RANGE`); None when it is within :data:`TOLERANCE` of 1."""
    zoom = float(trained) / float(measured)
    if 1.0 / TOLERANCE <= zoom <= TOLERANCE:
        return None
    return float(min(max(zoom, ZOOM_RANGE[0]), ZOOM_RANGE[1]))
