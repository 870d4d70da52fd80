"""Prediction at the object size the weights learnt: the first-pass estimate of an image's
object diameter and the resampled network (the rules: :mod:`napari_medseg.engine.object_size`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..object_size import CROP, ESTIMATE_TASK, MIN_OBJECTS, diameter_zoom, median_diameter

__all__ = ["estimate_diameter", "resample_to_diameter", "corrections_zoom"]


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


def estimate_diameter(model, image: np.ndarray, axes: str, plane_axes: str, config,
                      trained: float | None = None
                      ) -> tuple[float | None, int, int, tuple[int, int]]:
    """The median object diameter the network finds in the central crop of the middle plane.

    Two passes: the network first sees the crop at the image's own pixels; when the objects it
    finds call for resampling, it sees the crop again resampled so those objects reach the
    size it learnt, and the objects of that pass give the estimate (see
    :mod:`napari_medseg.engine.object_size`).

    Args:
        model: an instance-task network.
        image: the whole image (any array the run reads), axes ``axes``.
        axes: its axes.
        plane_axes: the axes of the planes the network sees (e.g. ``"YX"``).
        config: the run's :class:`~napari_medseg.config.PredictConfig` (device, precision).
        trained: the diameter the weights learnt (the zoom of the second pass); None: one
            pass only.

    Returns:
        ``(diameter or None, objects it is the median of, passes, crop shape)``.
    """
    crop, crop_axes = _central_plane(image, axes, plane_axes)
    # the plane is what the network sees: its two axes read as Y and X
    crop_axes = crop_axes.replace(plane_axes[0], "y").replace(plane_axes[1], "x").upper()
    shape = (int(crop.shape[crop_axes.index("Y")]), int(crop.shape[crop_axes.index("X")]))
    first, n = _measure(model, crop, crop_axes, config)
    zoom = diameter_zoom(trained, first) if first is not None and trained else None
    if zoom is None:
        return first, n, 1, shape
    second, n2 = _measure(model, crop, crop_axes, config, zoom)
    return (second, n2, 2, shape) if second is not None else (first, n, 1, shape)


def _measure(model, crop: np.ndarray, crop_axes: str, config, zoom: float | None = None
             ) -> tuple[float | None, int]:
    """``(median diameter or None, objects found)`` of one pass over ``crop`` (resampled by
    ``zoom`` for the network, the objects measured on the crop's own grid)."""
    from ..pixel_size import resampled
    from ..seg_task import seeded_watershed, task_of
    from .pipeline import predict

    settings = config.replace(outputs=("probabilities",), native_pixels=True, tta=False,
                              store=None, axes=crop_axes, volume_mode="slices", diameter=None,
                              probabilities_dtype="float16")
    net = model if zoom is None else resampled(model, (zoom, zoom))
    probs = np.asarray(predict(crop, net, settings)["probabilities"], np.float32)
    # fixed thresholds, so that tuning the task's own does not move the estimate; the
    # smallest seed is the network's (objects are measured on the crop's grid)
    task = dataclasses.replace(task_of(model), **ESTIMATE_TASK)
    if zoom is not None:
        task = dataclasses.replace(task, min_seed=max(1, round(task.min_seed / zoom ** 2)))
    labels = seeded_watershed(probs[0] < 1.0 - task.foreground_threshold, probs[1], probs[2],
                              task)
    n = int(labels.max())
    return (median_diameter([labels]) if n >= MIN_OBJECTS else None), n


def resample_to_diameter(model, image: np.ndarray, axes: str, plane_axes: str, config,
                         trained: float, read_pixels: bool = True):
    """``model`` wrapped to see objects at the ``trained`` diameter (see the module).

    Returns:
        ``(model, zoom, message)``: the :class:`Resampled` network, its zoom and the sentence
        that says so; or ``(model, None, message or None)`` when nothing is resampled.
    """
    from ..pixel_size import resampled

    measured, how = config.diameter, "as given"
    if measured is None:
        if not read_pixels:
            return model, None, None
        measured, n, passes, shape = estimate_diameter(model, image, axes, plane_axes, config,
                                                       trained)
        if measured is None:
            return model, None, (
                f"Object size not estimated: a first pass found {n} object(s) in the central "
                f"{shape[0]} x {shape[1]} pixels; running at the image's own pixels (give "
                "the diameter to resample).")
        how = (f"median of {n} objects found in the central {shape[0]} x {shape[1]} pixels by "
               + ("a second pass at the size a first pass gave" if passes == 2
                  else "a first pass"))
    zoom = diameter_zoom(trained, measured)
    if zoom is None:
        return model, None, None
    wrapped = resampled(model, (zoom, zoom))
    return wrapped, zoom, (
        f"Objects measure about {measured:.3g} px across ({how}); the weights learnt "
        f"{trained:.3g} px, so each plane is resampled by {zoom:.3g} and the outputs brought "
        "back to the image's grid.")


def corrections_zoom(model, image: np.ndarray, axes: str, device: str = "auto"
                     ) -> tuple[tuple[float, float], str] | None:
    """``((zoom, zoom), sentence)`` resampling an image's corrections as prediction resamples
    the image (the same first-pass estimate), so fine-tuning teaches the network objects at
    the size it sees them; None when the weights record no object size or nothing is
    resampled."""
    from ...config import PredictConfig
    from ..seg_task import task_of

    trained = task_of(model).object_diameter
    if not trained or model.spec.spatial_dims != 2 or model.spec.output_scale != 1:
        return None
    config = PredictConfig(device=device, axes=axes)
    _, zoom, message = resample_to_diameter(model, image, axes, "YX", config, trained)
    if zoom is None:
        return None
    return (zoom, zoom), message.replace(
        "and the outputs brought back to the image's grid", "and the corrections with it")
