"""Corrections as training samples: the crops that teach what the user changed.

:func:`samples_from_corrections` crops each changed region (:mod:`.changes`) with ``context``
pixels of image around it, normalised as the network expects (the checkpoint's normalization,
fitted on the whole image as inference does), with a ``valid`` map that is 1 on the region: the
loss and the validation Dice count only those pixels, the context is seen but not scored.
:func:`prepare_corrections_iter` first predicts the comparison with the starting weights;
:func:`samples_from_folders` makes whole-image samples of image/mask folders.

Axes: label images are ``YX`` or have leading slice axes (``ZYX``, ``TYX``, ``IYX``...); the
image has the same axes plus an optional ``C`` anywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...config import FinetuneConfig, NormalizationConfig, PredictConfig
from ...errors import ConfigError, InputShapeError
from ...io.axes import guess_axes
from ..inference.object_size import corrections_zoom
from ..pixel_size import image_zoom, meta_zoom, resampled
from ..progress import CancelToken, NoticeEvent, ProgressEvent, StageEvent
from ..seg_task import SegTask, task_of
from .changes import CorrectionRegion, changed_mask, class_targets, find_regions, group_regions
from .datasets import Sample

__all__ = [
    "RegionSample",
    "samples_from_corrections",
    "prepare_corrections_iter",
    "samples_from_folders",
    "samples_hash",
]


@dataclass
class RegionSample(Sample):
    """A training sample cut around a correction (see :class:`~.datasets.Sample`).

    Attributes:
        valid: H x W float32, 1 where the loss and the validation Dice count (the corrected
            box), 0 on the context around it. None means every pixel counts.
        plane: the plane index of the crop.
        crop: ``(y0, x0, y1, x1)`` of the crop in the labels' pixels (before any
            resampling to the weights' pixel size).
    """

    valid: np.ndarray | None = None
    plane: tuple[int, ...] = ()
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)




def _split_axes(axes: str, ndim: int) -> tuple[str, str]:
    """(image axes, label axes) validated: the labels' are the image's without ``C``."""
    axes = axes.upper()
    if len(axes) != ndim or len(set(axes)) != len(axes) or set(axes) - set("TICZYX") or not (
            axes.replace("C", "").endswith("YX")):
        raise InputShapeError(
            f"The axes {axes!r} do not fit an image with {ndim} dimensions ending in Y and X "
            "(e.g. 'YX', 'YXC', 'ZYX').")
    return axes, axes.replace("C", "")


def _read_crop(image: Any, axes: str, plane: tuple[int, ...], box: tuple[int, int, int, int],
               lead: str) -> np.ndarray:
    """``C x h x w`` float32 of one plane's box (C = 1 without a channel axis)."""
    y0, x0, y1, x1 = box
    index: list[Any] = []
    where = dict(zip(lead, plane))
    for letter in axes:
        if letter == "C":
            index.append(slice(None))
        elif letter == "Y":
            index.append(slice(y0, y1))
        elif letter == "X":
            index.append(slice(x0, x1))
        else:
            index.append(int(where[letter]))
    block = np.asarray(image[tuple(index)], dtype=np.float32)
    if "C" not in axes:
        return block[None]
    kept = [a for a in axes if a in "CYX"]
    return np.moveaxis(block, kept.index("C"), 0)


def _checked_axes(image: Any, labels: np.ndarray, axes: str | None,
                  scale: int) -> tuple[str, str]:
    """(image axes, leading plane axes), checked against the labels' shape."""
    shape = tuple(int(s) for s in image.shape)
    if axes is None:
        axes = guess_axes(shape, rgb=len(shape) != labels.ndim)
    axes, label_axes = _split_axes(axes, len(shape))
    spatial = tuple(s for a, s in zip(axes, shape) if a != "C")
    expected = spatial[:-2] + (spatial[-2] * scale, spatial[-1] * scale)
    if labels.shape != expected:
        raise InputShapeError(
            f"The labels have shape {labels.shape} but the image ({axes}, {shape}) needs "
            f"{expected}{' (the network upsamples x' + str(scale) + ')' if scale > 1 else ''}.")
    return axes, label_axes[:-2]


def _corrected_regions(labels: np.ndarray, num_classes: int, config: FinetuneConfig,
                       prediction: Any, boundary: Any, predicted_boundary: Any,
                       task: SegTask) -> list[CorrectionRegion]:
    """The changed regions (with a prediction), or every labelled plane whole (without)."""
    if prediction is not None:
        changed = changed_mask(np.asarray(prediction), labels,
                               2 if task.instances else num_classes, predicted_boundary,
                               boundary)
        return find_regions(changed, config.margin, config.min_changed)
    h, w = labels.shape[-2:]
    return [CorrectionRegion(tuple(int(p) for p in plane), (0, 0, h, w), int(h * w))
            for plane in np.ndindex(*labels.shape[:-2]) if np.any(labels[plane])]


def _image_normalizer(image: Any, axes: str, in_channels: int,
                      normalization: NormalizationConfig | None) -> Callable[[np.ndarray],
                                                                            np.ndarray]:
    """Channel conversion and normalization of a ``C x h x w`` crop, fitted once on the whole
    image after the channel conversion, as inference does it."""
    from ..inference.normalization import DEFAULT_NORMALIZATION, fit_normalization, sample_values
    from ..layout import channel_conversion, convert_channels

    c_axis = axes.index("C") if "C" in axes else None
    have = int(image.shape[c_axis]) if c_axis is not None else 1
    conversion = channel_conversion(have, in_channels)
    values = convert_channels(sample_values(image, c_axis), conversion)
    stats = fit_normalization(values, normalization or DEFAULT_NORMALIZATION)
    return lambda crop: stats.apply(convert_channels(crop, conversion), 0)


@dataclass(frozen=True)
class _Cropper:
    """Cuts one region's sample: image crop, targets and ``valid`` map (see
    :func:`samples_from_corrections` for the arguments' meaning)."""

    image: Any
    axes: str
    lead: str
    labels: np.ndarray
    boundary: np.ndarray | None
    num_classes: int
    task: SegTask
    scale: int
    context: int
    prepare: Callable[[np.ndarray], np.ndarray]
    name: str
    zoom: tuple[float, float] | None = None

    def sample(self, region: CorrectionRegion, group: int) -> RegionSample:
        """The sample of ``region``, in split group ``group``."""
        scale = self.scale
        # the context is the network's own pixels: more of the image's when it shrinks
        context = self.context if self.zoom is None else round(self.context / min(self.zoom))
        y0, x0, y1, x1 = region.grown(context, self.labels.shape[-2:])
        if scale > 1:  # crop on whole input pixels
            y0, x0 = y0 // scale * scale, x0 // scale * scale
            y1, x1 = -(-y1 // scale) * scale, -(-x1 // scale) * scale
        crop = _read_crop(self.image, self.axes, region.plane,
                          (y0 // scale, x0 // scale, y1 // scale, x1 // scale), self.lead)
        crop = self.prepare(crop)
        if scale > 1:  # at the target resolution; the training batch average-pools it back
            crop = np.repeat(np.repeat(crop, scale, axis=1), scale, axis=2)
        key = region.plane + (slice(y0, y1), slice(x0, x1))
        labels = self.labels[key]
        boundary = None if self.boundary is None else self.boundary[key]
        valid = np.zeros((y1 - y0, x1 - x0), np.float32)
        by0, bx0, by1, bx1 = region.box
        valid[by0 - y0: by1 - y0, bx0 - x0: bx1 - x0] = 1.0
        if self.zoom is not None:  # the labels first: boundary bands in the weights' pixels
            crop, labels, boundary, valid = _at_weights_pixels(
                self.zoom, crop, labels, boundary, valid)
        # Targets per crop (2D boundaries: a 2D network never sees the neighbouring slices).
        mask, crop_boundary = class_targets(labels, self.num_classes, self.task, boundary)
        where = "".join(f"{a}{p}," for a, p in zip(self.lead, region.plane))
        return RegionSample(
            image=np.ascontiguousarray(crop, np.float32),
            mask=np.ascontiguousarray(mask),
            boundary=None if crop_boundary is None else np.ascontiguousarray(crop_boundary,
                                                                               np.uint8),
            name=f"{self.name}@{where}Y{by0}-{by1},X{bx0}-{bx1}",
            group=f"{self.name}#g{group}",
            valid=valid, plane=region.plane, crop=(y0, x0, y1, x1))


def _at_weights_pixels(zoom: tuple[float, float], image: np.ndarray, labels: np.ndarray,
                       boundary: np.ndarray | None, valid: np.ndarray) -> tuple[Any, ...]:
    """A crop (``C x h x w``) and its maps (``h x w``: labels, boundary, ``valid``) resampled
    by ``zoom``: the image as the network sees it at prediction
    (:func:`~napari_medseg.models.working_resolution.resize_image`), the labels and
    ``valid`` by nearest neighbour, the boundary so that a line one pixel wide stays
    unbroken when it shrinks (a pixel is boundary where any of the area it covers is)."""
    import torch
    import torch.nn.functional as F

    from ...models.working_resolution import resize_image

    h, w = image.shape[-2:]
    size = (max(1, round(h * zoom[0])), max(1, round(w * zoom[1])))
    out = resize_image(torch.from_numpy(np.ascontiguousarray(image))[None], size)[0].numpy()

    def nearest(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        t = torch.from_numpy(np.ascontiguousarray(a, np.float64))[None, None]  # exact labels
        return F.interpolate(t, size=size, mode="nearest-exact")[0, 0].numpy().astype(a.dtype)

    if boundary is not None and (size[0] < h or size[1] < w):
        t = torch.from_numpy(np.ascontiguousarray(boundary > 0, np.float32))[None, None]
        line = (F.adaptive_max_pool2d(t, size)[0, 0].numpy() > 0).astype(boundary.dtype)
    else:
        line = nearest(boundary)
    return out, nearest(labels), line, nearest(valid)


def samples_from_corrections(
    image: Any,
    corrected: Any,
    *,
    num_classes: int,
    in_channels: int,
    axes: str | None = None,
    prediction: Any = None,
    boundary: Any = None,
    predicted_boundary: Any = None,
    normalization: NormalizationConfig | None = None,
    config: FinetuneConfig | None = None,
    output_scale: int = 1,
    name: str = "image",
    task: SegTask | None = None,
    zoom: tuple[float, float] | None = None,
) -> list[RegionSample]:
    """Training samples from an image and its corrected labels.

    With a ``prediction`` only the regions that differ from it are used (see
    :func:`find_regions`); without one every plane holding any label is one region, all of
    it valid. Each sample is the region's box plus ``config.context`` pixels of image, its
    ``valid`` map 1 on the box; ``group`` says which split group it belongs to.

    Args:
        image: the image (numpy, dask or zarr), axes ``axes``.
        corrected: the corrected labels: the image's axes without ``C``; for a network with
            ``output_scale`` s > 1, ``s`` times larger in Y and X.
        num_classes: K of the network.
        in_channels: channels the network takes (grey <-> RGB converted as for inference).
        axes: the image's axes; None guesses ``YX``/``ZYX`` from the labels and ``YXC`` for
            a trailing axis of 3 or 4.
        prediction: the last prediction (the labels' shape), or None.
        boundary: a corrected boundary layer (the labels' shape), or None: instance labels
            then give the boundary targets.
        predicted_boundary: the boundary the prediction came with (compared with
            ``boundary``), or None.
        normalization: the network's normalization (None: percentile 1-99.8).
        config: margins, context, ``min_changed`` and ``slice_gap``.
        output_scale: the network's output side / input side.
        name: the image's name (sample names and groups start with it).
        task: the network's task (how the labels are read: objects for ``instances``,
            class indices for ``classes``, the default).
        zoom: (zy, zx) taking the image's pixels to the weights' pixel size
            (:func:`~napari_medseg.engine.pixel_size.image_zoom`): each sample is resampled
            by it after cropping, so training sees what prediction feeds the network; None
            keeps the image's pixels.

    Returns:
        The samples (empty when nothing changed).

    Raises:
        InputShapeError: shapes or axes that do not fit.
    """
    config = config or FinetuneConfig()
    labels = np.asarray(corrected)
    scale = int(output_scale)
    zoom = None if config.native_pixels else zoom
    axes, lead = _checked_axes(image, labels, axes, scale)
    task = task or SegTask()
    bnd = None
    if boundary is not None:
        bnd = np.asarray(boundary)
        if bnd.shape != labels.shape:
            raise InputShapeError(
                f"The boundary layer has shape {bnd.shape} but the labels have {labels.shape}.")
    regions = _corrected_regions(labels, num_classes, config, prediction, boundary,
                                 predicted_boundary, task)
    if not regions:
        return []
    groups = group_regions(regions, labels.shape[-2:], config.context, config.slice_gap, lead)
    cropper = _Cropper(image, axes, lead, labels, bnd, num_classes, task, scale,
                       config.context, _image_normalizer(image, axes, in_channels, normalization),
                       name, zoom if scale == 1 else None)
    return [cropper.sample(region, group) for region, group in zip(regions, groups)]


def prepare_corrections_iter(
    image: Any,
    corrected: Any,
    model: Any,
    config: FinetuneConfig | None = None,
    *,
    axes: str | None = None,
    prediction: Any = "model",
    boundary: Any = None,
    name: str = "image",
    cancel: CancelToken | None = None,
    meta: Any = None,
) -> Generator[ProgressEvent, None, list[RegionSample]]:
    """Samples from corrections, predicting the comparison with ``model`` when asked.

    Args:
        image: the image, axes ``axes``.
        corrected: the corrected labels.
        model: the network to fine-tune (its spec and normalization are used).
        config: the fine-tuning settings.
        axes: the image's axes (None: guessed).
        prediction: ``"model"`` predicts with ``model`` (a 2D image whole; of a volume, the
            slices that hold labels: a slice the user emptied completely is not seen, pass
            the prediction itself for that) and uses the differences; an array is used as
            the prediction; None uses every labelled plane whole.
        boundary: a corrected boundary layer, or None (for a network of the instance task,
            its predicted boundary then stands in for it).
        name: the image's name.
        cancel: checked between prediction batches.
        meta: the image's :class:`~napari_medseg.io.ImageMeta`, or None: when it gives a
            pixel size other than the one the weights declare, the comparison is predicted as
            ``predict`` would (each plane resampled) and the samples are resampled to the
            weights' pixel size.

    Returns:
        The samples (yielding the prediction's events meanwhile).
    """
    config = config or FinetuneConfig()
    spec = model.spec
    info = getattr(model, "checkpoint_info", None)
    norm = info.normalization_config() if info is not None else None
    task = task_of(model)
    zoom, words = _prediction_zoom(model, image, corrected, axes, meta, config)
    if words:
        yield NoticeEvent(words)
    predicted_boundary = None
    if isinstance(prediction, str):
        if prediction != "model":
            raise ConfigError(f"prediction must be 'model', an array or None, not {prediction!r}.")
        prediction, predicted_boundary = yield from _predict_labelled(
            image, corrected, model if zoom is None else resampled(model, zoom), config, axes,
            boundary is not None or task.instances, cancel)
        if boundary is None and task.instances:
            # Corrections of the mask alone: the network's own lines between touching objects
            # stay boundary (a foreground mask cannot say where one nucleus ends).
            boundary = predicted_boundary
    samples = samples_from_corrections(
        image, corrected, num_classes=spec.num_classes, in_channels=spec.in_channels,
        axes=axes, prediction=prediction, boundary=boundary,
        predicted_boundary=predicted_boundary, normalization=norm, config=config,
        output_scale=spec.output_scale, name=name, task=task, zoom=zoom)
    return samples


def _prediction_zoom(model, image: Any, corrected: Any, axes: str | None, meta: Any,
                     config: FinetuneConfig) -> tuple[Any, str | None]:
    """``(zoom, sentence)`` of the resampling ``predict`` would apply to this image: to the
    weights' pixel size (:func:`~napari_medseg.engine.pixel_size.image_zoom`), else to the
    object size they learnt (:func:`~napari_medseg.engine.inference.object_size.
    corrections_zoom`); ``(None, None)`` for none, or with ``native_pixels``."""
    if config.native_pixels:
        return None, None
    found = image_zoom(model, meta)
    if found is None and int(model.spec.output_scale) == 1:
        image_axes, _ = _checked_axes(image, np.asarray(corrected), axes, 1)
        found = corrections_zoom(model, image, image_axes, config.device)
    return found or (None, None)


def _predict_labelled(image, corrected, model, config, axes, want_boundary, cancel):
    """The model's prediction on the planes holding labels (zeros elsewhere)."""
    from ..inference.pipeline import predict_iter

    labels = np.asarray(corrected)
    shape = tuple(int(s) for s in image.shape)
    axes = axes or guess_axes(shape, rgb=len(shape) != labels.ndim)
    axes, label_axes = _split_axes(axes, len(shape))
    outputs = ("mask", "boundary") if want_boundary else ("mask",)
    pred = np.zeros(labels.shape, np.int64)
    pbnd = np.zeros(labels.shape, np.uint8) if want_boundary else None
    cfg = PredictConfig.from_mapping({"device": config.device, "precision": config.precision,
                                      "outputs": ",".join(outputs)})
    if not label_axes[:-2]:
        cfg = cfg.replace(axes=axes)
        yield StageEvent("Predicting with the starting weights to find your changes.",
                         stage="predicting")
        result = yield from predict_iter(image, model, cfg, cancel=cancel)
        pred[...] = np.asarray(result["mask"])
        if pbnd is not None:
            pbnd[...] = np.asarray(result["boundary"])
        return pred, pbnd
    lead = label_axes[:-2]
    planes = [p for p in np.ndindex(*labels.shape[:-2]) if np.any(labels[p])]
    yield StageEvent(f"Predicting {len(planes)} labelled slice(s) with the starting weights "
                     "to find your changes.", stage="predicting")
    plane_axes = "".join(a for a in axes if a not in lead)
    for plane in planes:
        if cancel is not None and cancel.cancelled:
            break
        where = dict(zip(lead, plane))
        index = tuple(int(where[a]) if a in where else slice(None) for a in axes)
        block = np.asarray(image[index])
        result = yield from predict_iter(block, model, cfg.replace(axes=plane_axes),
                                         cancel=cancel)
        pred[plane] = np.asarray(result["mask"])
        if pbnd is not None:
            pbnd[plane] = np.asarray(result["boundary"])
    return pred, pbnd


def samples_from_folders(
    images: str | Path,
    masks: str | Path,
    *,
    num_classes: int,
    in_channels: int,
    normalization: NormalizationConfig | None = None,
    config: FinetuneConfig | None = None,
    output_scale: int = 1,
    pattern: str = "*",
    task: SegTask | None = None,
    pixel_size: Any = None,
    notes: list[str] | None = None,
    model: Any = None,
) -> tuple[list[RegionSample], str]:
    """Whole-image samples from image/mask folders (files matched by name), one group each.

    ``task`` is the network's (how the masks are read: :func:`samples_from_corrections`).
    ``pixel_size`` is the weights' (a :class:`~napari_medseg.engine.pixel_size.PixelSize`,
    or None): a file whose metadata give another is resampled to it
    (:func:`~napari_medseg.engine.pixel_size.meta_zoom`), and ``notes`` (when given) gets
    the sentence that says so. ``model`` is the starting network: when its weights record an
    object size and no pixel size resamples a file, the file is resampled as ``predict``
    would resample it (:func:`~napari_medseg.engine.inference.object_size.corrections_zoom`).

    Returns:
        ``(samples, data hash)``; the hash covers the files' names and bytes.
    """
    from ...io import read_image
    from .datasets import _stem, data_hash, find_pairs

    pairs = find_pairs(images, masks, pattern)
    samples: list[RegionSample] = []
    for img_path, mask_path in pairs:
        image, meta = read_image(img_path)
        mask, mmeta = read_image(mask_path)
        mask = np.asarray(mask)
        if "C" in mmeta.axes and mask.ndim > 2:
            mask = np.take(mask, 0, axis=mmeta.axes.index("C"))
        axes = meta.axes
        stem = _stem(img_path)
        zoom = None
        if output_scale == 1 and not (config and config.native_pixels):
            zoom = meta_zoom(meta, pixel_size)
            if zoom is None and model is not None:
                zoom = corrections_zoom(model, np.asarray(image), axes,
                                        config.device if config else "auto")
        found = samples_from_corrections(
            image, mask, num_classes=num_classes, in_channels=in_channels, axes=axes,
            normalization=normalization, config=config, output_scale=output_scale, name=stem,
            task=task, zoom=zoom and zoom[0])
        if zoom and notes is not None:
            notes.append(zoom[1])
        for s in found:  # whole images: every labelled plane of a file is one group
            s.group = stem
        samples.extend(found)
    return samples, data_hash(pairs)


def samples_hash(samples: Iterable[Sample]) -> str:
    """A short sha256 over samples' images, targets and valid maps (checkpoint lineage)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.name.encode())
        for arr in (s.image, s.mask, s.boundary, getattr(s, "valid", None)):
            if arr is not None:
                h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]
