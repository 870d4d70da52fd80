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

The measured diameter is the user's (``PredictConfig.diameter``) or estimated
(:func:`estimate_diameter`): the network runs once at the image's own pixels on the central
crop (at most :data:`CROP` pixels a side) of the middle plane, its objects are found with
fixed watershed settings (:data:`ESTIMATE_TASK`), and their median diameter is taken. Fewer than :data:`MIN_OBJECTS` objects give no estimate. A zoom
within :data:`TOLERANCE` of 1 resamples nothing; zooms are clipped to :data:`ZOOM_RANGE`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = ["CROP", "MIN_OBJECTS", "TOLERANCE", "ZOOM_RANGE", "equivalent_diameters",
           "median_diameter", "diameter_zoom", "estimate_diameter", "resample_to_diameter",
           "training_diameter", "corrections_zoom"]

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
ESTIMATE_TASK = {"seed_threshold": 0.5, "min_seed": 32, "foreground_threshold": 0.5}


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


def _central_plane(image: np.ndarray, axes: str, plane_axes: str) -> tuple[np.ndarray, str]:
    """The middle plane along every axis but ``plane_axes`` and C, cropped to its central
    :data:`CROP` x :data:`CROP` pixels; with its axes."""
    index, kept = [], ""
    for ax, size in zip(axes, image.shape):
        if ax in plane_axes:
            start = max(0, (int(size) - CROP) // 2)
            index.append(slice(start, start + CROP))
            kept += ax
        elif ax == "C":
            index.append(slice(None))
            kept += ax
        else:
            index.append(int(size) // 2)
    return np.asarray(image[tuple(index)]), kept


def estimate_diameter(model, image: np.ndarray, axes: str, plane_axes: str, config
                      ) -> tuple[float | None, int, tuple[int, int]]:
    """The median object diameter the network finds in the central crop of the middle plane.

    Args:
        model: an instance-task network.
        image: the whole image (any array the run reads), axes ``axes``.
        axes: its axes.
        plane_axes: the axes of the planes the network sees (e.g. ``"YX"``).
        config: the run's :class:`~napari_medseg.config.PredictConfig` (device, precision).

    Returns:
        ``(diameter or None, objects found, crop shape)``.
    """
    from .inference.pipeline import predict
    from .seg_task import seeded_watershed, task_of

    crop, crop_axes = _central_plane(image, axes, plane_axes)
    # the plane is what the network sees: its two axes read as Y and X
    crop_axes = crop_axes.replace(plane_axes[0], "y").replace(plane_axes[1], "x").upper()
    first = config.replace(outputs=("probabilities",), native_pixels=True, tta=False,
                           store=None, axes=crop_axes, volume_mode="slices", diameter=None,
                           probabilities_dtype="float16")
    probs = np.asarray(predict(crop, model, first)["probabilities"], np.float32)
    # fixed thresholds, so that tuning the task's own does not move the estimate
    task = dataclasses.replace(task_of(model), **ESTIMATE_TASK)
    labels = seeded_watershed(probs[0] < 1.0 - task.foreground_threshold, probs[1], probs[2],
                              task)
    n = int(labels.max())
    shape = (int(crop.shape[crop_axes.index("Y")]), int(crop.shape[crop_axes.index("X")]))
    if n < MIN_OBJECTS:
        return None, n, shape
    return median_diameter([labels]), n, shape


def resample_to_diameter(model, image: np.ndarray, axes: str, plane_axes: str, config,
                         trained: float, read_pixels: bool = True):
    """``model`` wrapped to see objects at the ``trained`` diameter (see the module).

    Returns:
        ``(model, zoom, message)``: the :class:`Resampled` network, its zoom and the sentence
        that says so; or ``(model, None, message or None)`` when nothing is resampled.
    """
    from .pixel_size import resampled

    measured, how = config.diameter, "as given"
    if measured is None:
        if not read_pixels:
            return model, None, None
        measured, n, shape = estimate_diameter(model, image, axes, plane_axes, config)
        if measured is None:
            return model, None, (
                f"Object size not estimated: a first pass found {n} object(s) in the central "
                f"{shape[0]} x {shape[1]} pixels; running at the image's own pixels (give "
                "the diameter to resample).")
        how = (f"median of {n} objects a first pass found in the central {shape[0]} x "
               f"{shape[1]} pixels")
    zoom = diameter_zoom(trained, measured)
    if zoom is None:
        return model, None, None
    wrapped = resampled(model, (zoom, zoom))
    return wrapped, zoom, (
        f"Objects measure about {measured:.3g} px across ({how}); the weights learnt "
        f"{trained:.3g} px, so each plane is resampled by {zoom:.3g} and the outputs brought "
        "back to the image's grid.")


def training_diameter(pairs, stems: Iterable[str]) -> float | None:
    """The median object diameter of the masks of ``pairs`` (``(image, mask)`` paths) whose
    image's file stem is in ``stems``; each 2D plane of a stack is measured on its own."""
    from ..io import read_image
    from .training.datasets import _stem

    wanted = set(stems)

    def planes():
        for image_path, mask_path in pairs:
            if _stem(Path(image_path)) not in wanted:
                continue
            labels, _ = read_image(mask_path)
            labels = np.asarray(labels)
            yield from labels.reshape((-1, *labels.shape[-2:]))

    return median_diameter(planes())


def corrections_zoom(model, image: np.ndarray, axes: str, device: str = "auto"
                     ) -> tuple[tuple[float, float], str] | None:
    """``((zoom, zoom), sentence)`` resampling an image's corrections as prediction resamples
    the image (the same first-pass estimate), so fine-tuning teaches the network objects at
    the size it sees them; None when the weights record no object size or nothing is
    resampled."""
    from ..config import PredictConfig
    from .seg_task import task_of

    trained = task_of(model).object_diameter
    if not trained or model.spec.spatial_dims != 2 or model.spec.output_scale != 1:
        return None
    config = PredictConfig(device=device, axes=axes)
    _, zoom, message = resample_to_diameter(model, image, axes, "YX", config, trained)
    if zoom is None:
        return None
    return (zoom, zoom), message.replace(
        "and the outputs brought back to the image's grid", "and the corrections with it")
