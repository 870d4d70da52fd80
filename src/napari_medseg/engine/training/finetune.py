"""Fine-tuning on a user's corrections: ``finetune_iter`` is a generator of progress events.

The loop users come for: segment, correct the labels, fine-tune, segment better. This module
turns corrections into training samples and runs the shared optimisation loop of
:mod:`.train` (:func:`~.train.optimise_iter`: the network's own loss, AdamW with warm-up and
cosine decay, augmentation, early stopping) on them:

1. **What changed.** :func:`changed_mask` compares the last prediction with the edited labels
   (foreground for one- and two-class networks, class indices otherwise; plus the boundary
   layer when one is given); :func:`find_regions` cuts the changes into boxes, one per
   connected change grown by ``margin`` pixels (boxes that touch are merged), per slice.
   Without a prediction every labelled slice counts as a whole.
2. **Samples.** :func:`samples_from_corrections` crops each box with ``context`` pixels of
   image around it, normalised as the network expects (the checkpoint's normalization, fitted
   on the whole image as inference does), with a ``valid`` map that is 1 on the box: the loss
   and the validation Dice count only those pixels, the context is seen but not scored.
3. **Split.** :func:`group_regions` puts regions whose crops overlap in-plane on slices at most
   ``slice_gap`` apart into one group; the held-out split is by group
   (:func:`~.datasets.split_samples`), so no area is ever on both sides.
4. **Replay.** Samples of earlier rounds of the same model line (:class:`ReplayStore`, npz
   files in the user data folder) are mixed into the batches (``config.replay`` of the
   patches) against forgetting.
5. **Training.** :class:`RegionSampler` draws patches centred on valid pixels; the validation
   Dice before training is the baseline; the best weights so far are kept in memory, so Stop
   (the :class:`~.progress.CancelToken`) and early stopping keep them. The result is written as
   a self-describing checkpoint with its lineage (parent sha256, data hash, settings,
   metrics), atomically (:mod:`.lineage`).

Axes: label images are ``YX`` or have leading slice axes (``ZYX``, ``TYX``, ``IYX``...); the
image has the same axes plus an optional ``C`` anywhere.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...config import FinetuneConfig, NormalizationConfig, PredictConfig
from ...errors import ConfigError, InputShapeError
from ..boundaries import boundary_from_labels
from .datasets import Sample, split_samples
from ..progress import CancelToken, FinishedEvent, NoticeEvent, ProgressEvent, StageEvent, drain

__all__ = [
    "CorrectionRegion",
    "RegionSample",
    "DataEvent",
    "FinetuneResult",
    "class_targets",
    "changed_mask",
    "find_regions",
    "group_regions",
    "samples_from_corrections",
    "prepare_corrections_iter",
    "samples_from_folders",
    "samples_hash",
    "RegionSampler",
    "ReplayStore",
    "finetune_iter",
    "finetune",
]

#: Axis letters of unrelated images: regions on different indices never share a group
#: because of their distance, only ``Z`` and ``T`` neighbours do.
_INDEPENDENT = "I"


# --------------------------------------------------------------------------- data types


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


@dataclass
class RegionSample(Sample):
    """A training sample cut around a correction (see :class:`~.datasets.Sample`).

    Attributes:
        valid: H x W float32, 1 where the loss and the validation Dice count (the corrected
            box), 0 on the context around it. None means every pixel counts.
        plane: the plane index of the crop.
        crop: ``(y0, x0, y1, x1)`` of the crop in the plane (target resolution).
    """

    valid: np.ndarray | None = None
    plane: tuple[int, ...] = ()
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass(frozen=True)
class DataEvent(ProgressEvent):
    """What fine-tuning will learn from (sent once, before the first step).

    Attributes:
        regions: corrected regions in total.
        groups: split groups they form.
        train: regions used for training.
        val: regions held out for validation (0: no validation Dice).
        replay: earlier samples mixed in.
        pixels: pixels that count in the loss (training regions).
    """

    regions: int = 0
    groups: int = 0
    train: int = 0
    val: int = 0
    replay: int = 0
    pixels: int = 0


@dataclass
class FinetuneResult:
    """What fine-tuning leaves behind.

    Attributes:
        model: the network with the best weights (eval mode; a copy, the input is untouched).
        checkpoint: the written ``.safetensors`` file, or None when no output was asked.
        info: its description (None without a checkpoint).
        baseline_dice: validation Dice of the starting weights (NaN without validation).
        best_dice: validation Dice of the kept weights (NaN without validation).
        best_step: the step they come from (0: the starting weights were not beaten).
        steps_done: optimisation steps run.
        stopped: ``"finished"``, ``"early_stop"``, ``"time_limit"`` or ``"cancelled"``.
        history: one row per step (``step``, ``loss``, ``lr``, ``wall_s``, ``val_dice``).
        n_train: training regions.
        n_val: validation regions.
        n_replay: replayed samples.
        data_hash: hash of the training data.
        seconds: wall time.
    """

    model: Any
    checkpoint: Path | None
    info: Any
    baseline_dice: float
    best_dice: float
    best_step: int
    steps_done: int
    stopped: str
    history: list[dict] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0
    n_replay: int = 0
    data_hash: str = ""
    seconds: float = 0.0

    @property
    def improved(self) -> bool:
        """True when fine-tuning beat the starting weights (on validation, if any)."""
        return self.best_step > 0


# --------------------------------------------------------------------------- targets / diff


def class_targets(
    labels: np.ndarray, num_classes: int, instances: bool | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Training targets from a label image: class indices and, for instances, a boundary.

    A one- or two-class network learns foreground (any label > 0); instance labels (more than
    one non-zero value, or ``instances=True``) also give the boundary between touching
    objects. A network with more classes takes the labels as class indices.

    Args:
        labels: integer label image (any axes).
        num_classes: K of the network.
        instances: force instance (True) or class (False) reading; None decides.

    Returns:
        ``(mask, boundary)``: int64 class indices, and uint8 boundary or None.

    Raises:
        InputShapeError: a label value has no class in the network.
    """
    labels = np.asarray(labels)
    if num_classes <= 2:
        is_instance = instances if instances is not None else int(labels.max(initial=0)) > 1
        boundary = boundary_from_labels(labels) if is_instance else None
        return (labels > 0).astype(np.int64), boundary
    top = int(labels.max(initial=0))
    if top >= num_classes:
        raise InputShapeError(
            f"The labels hold the value {top} but the network has only {num_classes} classes "
            f"(0..{num_classes - 1}); relabel them or fine-tune a network with more classes.")
    return labels.astype(np.int64), None


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


# --------------------------------------------------------------------------- samples


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
        config: margins, context, ``min_changed``, ``slice_gap`` and ``instances``.
        output_scale: the network's output side / input side.
        name: the image's name (sample names and groups start with it).

    Returns:
        The samples (empty when nothing changed).

    Raises:
        InputShapeError: shapes or axes that do not fit.
    """
    from ..layout import channel_conversion, convert_channels
    from ..inference.normalization import fit_normalization, sample_values

    config = config or FinetuneConfig()
    labels = np.asarray(corrected)
    shape = tuple(int(s) for s in image.shape)
    if axes is None:
        axes = ("ZYX" if labels.ndim == 3 else "YX") if len(shape) == labels.ndim else (
            "ZYXC" if labels.ndim == 3 else "YXC")
    axes, label_axes = _split_axes(axes, len(shape))
    lead = label_axes[:-2]
    spatial = tuple(s for a, s in zip(axes, shape) if a != "C")
    scale = int(output_scale)
    expected = spatial[:-2] + (spatial[-2] * scale, spatial[-1] * scale)
    if labels.shape != expected:
        raise InputShapeError(
            f"The labels have shape {labels.shape} but the image ({axes}, {shape}) needs "
            f"{expected}{' (the network upsamples x' + str(scale) + ')' if scale > 1 else ''}.")
    instances = config.instances
    if instances is None:  # decided once for the whole label image, applied per crop
        instances = num_classes <= 2 and int(labels.max(initial=0)) > 1
    bnd = None
    if boundary is not None:
        bnd = np.asarray(boundary)
        if bnd.shape != labels.shape:
            raise InputShapeError(
                f"The boundary layer has shape {bnd.shape} but the labels have {labels.shape}.")
    if prediction is not None:
        pred = np.asarray(prediction)
        changed = changed_mask(pred, labels, num_classes, predicted_boundary, boundary)
        regions = find_regions(changed, config.margin, config.min_changed)
    else:
        h, w = labels.shape[-2:]
        regions = [CorrectionRegion(tuple(int(p) for p in plane), (0, 0, h, w), int(h * w))
                   for plane in np.ndindex(*labels.shape[:-2]) if np.any(labels[plane])]
    if not regions:
        return []
    groups = group_regions(regions, labels.shape[-2:], config.context, config.slice_gap, lead)
    # Normalization fitted once on the whole image, after the channel conversion, as
    # inference does it.
    c_axis = axes.index("C") if "C" in axes else None
    have = shape[c_axis] if c_axis is not None else 1
    conversion = channel_conversion(have, in_channels)
    values = convert_channels(sample_values(image, c_axis), conversion)
    from ..inference.normalization import DEFAULT_NORMALIZATION

    stats = fit_normalization(values, normalization or DEFAULT_NORMALIZATION)
    samples: list[RegionSample] = []
    plane_shape = labels.shape[-2:]
    for region, group in zip(regions, groups):
        y0, x0, y1, x1 = region.grown(config.context, plane_shape)
        if scale > 1:  # crop on whole input pixels
            y0, x0 = y0 // scale * scale, x0 // scale * scale
            y1, x1 = -(-y1 // scale) * scale, -(-x1 // scale) * scale
        crop = _read_crop(image, axes, region.plane,
                          (y0 // scale, x0 // scale, y1 // scale, x1 // scale), lead)
        crop = stats.apply(convert_channels(crop, conversion), 0)
        if scale > 1:  # at the target resolution; the training batch average-pools it back
            crop = np.repeat(np.repeat(crop, scale, axis=1), scale, axis=2)
        key = region.plane + (slice(y0, y1), slice(x0, x1))
        # Targets per crop (2D boundaries: a 2D network never sees the neighbouring slices).
        mask, crop_boundary = class_targets(labels[key], num_classes, instances)
        if bnd is not None:
            crop_boundary = (bnd[key] > 0).astype(np.uint8)
        valid = np.zeros((y1 - y0, x1 - x0), np.float32)
        by0, bx0, by1, bx1 = region.box
        valid[by0 - y0: by1 - y0, bx0 - x0: bx1 - x0] = 1.0
        where = "".join(f"{a}{p}," for a, p in zip(lead, region.plane))
        samples.append(RegionSample(
            image=np.ascontiguousarray(crop, np.float32),
            mask=np.ascontiguousarray(mask),
            boundary=None if crop_boundary is None else np.ascontiguousarray(crop_boundary,
                                                                               np.uint8),
            name=f"{name}@{where}Y{by0}-{by1},X{bx0}-{bx1}",
            group=f"{name}#g{group}",
            valid=valid, plane=region.plane, crop=(y0, x0, y1, x1)))
    return samples


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
        boundary: a corrected boundary layer, or None.
        name: the image's name.
        cancel: checked between prediction batches.

    Returns:
        The samples (yielding the prediction's events meanwhile).
    """
    config = config or FinetuneConfig()
    spec = model.spec
    info = getattr(model, "checkpoint_info", None)
    norm = info.normalization_config() if info is not None else None
    predicted_boundary = None
    if isinstance(prediction, str):
        if prediction != "model":
            raise ConfigError(f"prediction must be 'model', an array or None, not {prediction!r}.")
        prediction, predicted_boundary = yield from _predict_labelled(
            image, corrected, model, config, axes, boundary is not None, cancel)
    samples = samples_from_corrections(
        image, corrected, num_classes=spec.num_classes, in_channels=spec.in_channels,
        axes=axes, prediction=prediction, boundary=boundary,
        predicted_boundary=predicted_boundary, normalization=norm, config=config,
        output_scale=spec.output_scale, name=name)
    return samples


def _predict_labelled(image, corrected, model, config, axes, want_boundary, cancel):
    """The model's prediction on the planes holding labels (zeros elsewhere)."""
    from ..inference.pipeline import predict_iter

    labels = np.asarray(corrected)
    shape = tuple(int(s) for s in image.shape)
    if axes is None:
        axes = ("ZYX" if labels.ndim == 3 else "YX") if len(shape) == labels.ndim else (
            "ZYXC" if labels.ndim == 3 else "YXC")
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
) -> tuple[list[RegionSample], str]:
    """Whole-image samples from image/mask folders (files matched by name), one group each.

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
        found = samples_from_corrections(
            image, mask, num_classes=num_classes, in_channels=in_channels, axes=axes,
            normalization=normalization, config=config, output_scale=output_scale, name=stem)
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


# --------------------------------------------------------------------------- sampling


class RegionSampler:
    """Patches centred on the pixels that count, with replay of earlier samples.

    A patch of a correction sample is centred on a random valid pixel (so the changed area is
    always in view) and its ``valid`` map is the sample's; a replayed sample is an earlier
    correction (same rule) or a whole image (centred on foreground half of the time). Crops
    smaller than the patch are padded (reflect for the image, 0 = not valid for the targets).
    Same contract as :class:`~.datasets.PatchSampler` (``draw(n)``), so
    :func:`~.train.make_batch` takes it.

    Args:
        samples: the training samples (:class:`RegionSample` or :class:`~.datasets.Sample`).
        patch: the patch side (target resolution).
        replay: earlier samples to mix in.
        replay_fraction: probability that a patch comes from ``replay`` (when it is not empty).
        seed: random seed.
    """

    def __init__(self, samples: Sequence[Sample], patch: int, replay: Sequence[Sample] = (),
                 replay_fraction: float = 0.0, seed: int = 0):
        if not samples:
            raise InputShapeError("There are no training samples.")
        self.patch = int(patch)
        self.rng = np.random.default_rng(seed)
        self.replay_fraction = float(replay_fraction) if replay else 0.0
        self.pools = [[self._prepare(s) for s in samples], [self._prepare(s) for s in replay]]
        self.any_boundary = any(p["boundary"] is not None for pool in self.pools for p in pool)

    def _prepare(self, s: Sample) -> dict[str, Any]:
        h, w = s.mask.shape
        valid = getattr(s, "valid", None)
        valid = np.ones((h, w), np.float32) if valid is None else valid.astype(np.float32)
        ph, pw = max(0, self.patch - h), max(0, self.patch - w)
        pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        image, mask, bnd = s.image, s.mask, s.boundary
        if ph or pw:
            mode = "reflect" if min(h, w) > 1 else "edge"
            image = np.pad(image, ((0, 0), *pads), mode=mode)
            mask = np.pad(mask, pads)
            valid = np.pad(valid, pads)
            bnd = None if bnd is None else np.pad(bnd, pads)
        scored = getattr(s, "valid", None) is not None
        centres = np.argwhere(valid > 0) if scored else np.argwhere((mask > 0) & (valid > 0))
        return {"image": image, "mask": mask, "boundary": bnd, "valid": valid,
                "centres": centres, "scored": scored}

    def draw(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """``n`` patches: images N x C x P x P, masks N x P x P, boundaries (or None), valid."""
        imgs, masks, bnds, valids = [], [], [], []
        p = self.patch
        for _ in range(n):
            use_replay = self.replay_fraction > 0 and self.rng.random() < self.replay_fraction
            pool = self.pools[1] if use_replay else self.pools[0]
            item = pool[int(self.rng.integers(len(pool)))]
            h, w = item["mask"].shape
            centres = item["centres"]
            if len(centres) and (item["scored"] or self.rng.random() < 0.5):
                cy, cx = centres[int(self.rng.integers(len(centres)))]
                jitter = self.rng.integers(-p // 4, p // 4 + 1, size=2)
                y0 = int(np.clip(cy + jitter[0] - p // 2, 0, h - p))
                x0 = int(np.clip(cx + jitter[1] - p // 2, 0, w - p))
            else:
                y0 = int(self.rng.integers(0, h - p + 1))
                x0 = int(self.rng.integers(0, w - p + 1))
            sl = (slice(y0, y0 + p), slice(x0, x0 + p))
            imgs.append(item["image"][(slice(None), *sl)])
            masks.append(item["mask"][sl])
            valids.append(item["valid"][sl])
            if self.any_boundary:
                bnd = item["boundary"]
                bnds.append(bnd[sl] if bnd is not None else boundary_from_labels(item["mask"][sl]))
        return (np.stack(imgs).astype(np.float32), np.stack(masks).astype(np.int64),
                np.stack(bnds).astype(np.uint8) if self.any_boundary else None,
                np.stack(valids).astype(np.float32))


# --------------------------------------------------------------------------- replay store


class ReplayStore:
    """Samples of earlier fine-tuning rounds, kept per model line for replay.

    Each sample is one ``.npz`` file (arrays only, loaded without pickles) under
    ``<folder>/<root[:16]>/``; the newest are replayed first.

    Args:
        folder: where to keep them; None uses ``<user data folder>/replay``.
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        if folder is None:
            from ...resources import user_data_dir

            folder = user_data_dir() / "replay"
        self.folder = Path(folder)

    def _line(self, root: str) -> Path:
        return self.folder / str(root)[:16]

    def add(self, samples: Iterable[Sample], root: str) -> int:
        """Keep ``samples`` for the model line ``root``; returns how many were new."""
        import os
        import tempfile

        line = self._line(root)
        line.mkdir(parents=True, exist_ok=True)
        added = 0
        for s in samples:
            digest = samples_hash([s])
            target = line / f"{digest}.npz"
            if target.exists():
                continue
            arrays = {"image": s.image, "mask": s.mask,
                      "name": np.array(s.name), "group": np.array(s.group)}
            if s.boundary is not None:
                arrays["boundary"] = s.boundary
            valid = getattr(s, "valid", None)
            if valid is not None:
                arrays["valid"] = valid
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".npz", dir=line)
            os.close(fd)
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, target)
            added += 1
        return added

    def load(self, root: str | None, in_channels: int, limit: int = 64,
             exclude: Iterable[str] = ()) -> list[RegionSample]:
        """Up to ``limit`` samples of the line ``root`` with ``in_channels`` channels, newest
        first, leaving out names in ``exclude`` (this round's own samples)."""
        if not root or limit <= 0:
            return []
        line = self._line(root)
        if not line.is_dir():
            return []
        skip = set(exclude)
        files = sorted(line.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        out: list[RegionSample] = []
        for path in files:
            if len(out) >= limit:
                break
            try:
                with np.load(path, allow_pickle=False) as data:
                    name = str(data["name"])
                    if name in skip or data["image"].shape[0] != in_channels:
                        continue
                    out.append(RegionSample(
                        image=data["image"].astype(np.float32), mask=data["mask"].astype(np.int64),
                        boundary=data["boundary"] if "boundary" in data else None,
                        name=name, group=f"replay:{data['group']}",
                        valid=data["valid"] if "valid" in data else None))
            except (OSError, ValueError, KeyError):
                continue  # a damaged file is skipped
        return out


# --------------------------------------------------------------------------- the loop


def _as_config(config: FinetuneConfig | Mapping[str, Any] | None) -> FinetuneConfig:
    if config is None:
        return FinetuneConfig()
    if isinstance(config, FinetuneConfig):
        return config
    return FinetuneConfig.from_mapping(dict(config))


def finetune_iter(
    model: Any,
    samples: Sequence[Sample],
    config: FinetuneConfig | Mapping[str, Any] | None = None,
    *,
    replay: Sequence[Sample] = (),
    cancel: CancelToken | None = None,
    output: str | Path | None = None,
    data: Mapping[str, Any] | None = None,
) -> Generator[ProgressEvent, None, FinetuneResult]:
    """Fine-tune a copy of ``model`` on ``samples``; yields events, returns a result.

    Args:
        model: a loaded network (``resolve_weights``/``create_model``); it is not modified.
        samples: training samples (:func:`samples_from_corrections`, or whole images); the
            held-out split is by their ``group``.
        config: the settings (a :class:`~napari_medseg.config.FinetuneConfig` or a mapping).
        replay: earlier samples mixed into the batches (``config.replay`` of the patches).
        cancel: checked before every step; a cancelled run keeps the best weights so far.
        output: where to write the checkpoint (atomically); None keeps it in memory only.
        data: more to record in the checkpoint's ``training_data`` (image names ...).

    Returns:
        A :class:`FinetuneResult` (also carried by the last event, a ``FinishedEvent``).

    Raises:
        InputShapeError: no samples, or samples that do not fit the network.
    """
    import torch

    from ..device import resolve_device
    from .lineage import lineage_root, save_checkpoint_atomic
    from ..precision import resolve_precision
    from .train import LoopState, ValidationEvent, optimise_iter, validate

    config = _as_config(config)
    cancel = cancel or CancelToken()
    t_start = time.perf_counter()
    samples = list(samples)
    if not samples:
        raise InputShapeError(
            "There is nothing to learn from: no corrected region was found. Edit the labels "
            "where the prediction was wrong (or compare with no prediction) and start again.")
    spec = model.spec
    for s in list(samples) + list(replay):
        if s.image.shape[0] != spec.in_channels:
            raise InputShapeError(
                f"The sample {s.name} has {s.image.shape[0]} channel(s); the network takes "
                f"{spec.in_channels}.")
    parent_info = getattr(model, "checkpoint_info", None)
    yield StageEvent("Preparing fine-tuning.", stage="loading")
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    train_s, val_s = split_samples(samples, config.val_fraction, config.seed)
    replay = list(replay)[: config.max_replay] if config.replay > 0 else []
    groups = len({s.group for s in samples})
    pixels = 0
    for s in train_s:
        valid = getattr(s, "valid", None)
        pixels += int(s.mask.size if valid is None else np.count_nonzero(valid))
    yield DataEvent(
        f"{len(samples)} region(s) in {groups} group(s): {len(train_s)} for training, "
        f"{len(val_s)} held out" + (f", {len(replay)} replayed" if replay else "") + ".",
        regions=len(samples), groups=groups, train=len(train_s), val=len(val_s),
        replay=len(replay), pixels=pixels)
    if not val_s:
        yield NoticeEvent(
            "All corrections form one group (they overlap), so none can be held out: there is "
            "no validation Dice, and the weights with the lowest recent loss are kept. Correct "
            "a second, separate area to get a validation.", level="warning")

    device = resolve_device(config.device)
    policy = resolve_precision(config.precision, device)
    work = copy.deepcopy(model)
    work.float()
    work.to(device)
    if device.type in ("cpu", "cuda"):
        work.to(memory_format=torch.channels_last)
    # A network at a coarser working resolution sees config.patch pixels of its own.
    side = config.patch * spec.input_downsample
    patch = spec.valid_size(max(1, side // spec.output_scale)) * spec.output_scale
    sampler = RegionSampler(train_s, patch, replay, config.replay, seed=config.seed)
    params = list(work.parameters())
    if config.freeze_encoder:
        frozen = {id(p) for p in work.encoder_parameters()}
        if not frozen:
            yield NoticeEvent(f"{spec.network} names no encoder; every layer is trained.",
                              level="warning")
        for p in params:
            p.requires_grad_(id(p) not in frozen)
    trainable = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)

    baseline = float("nan")
    if val_s:
        yield StageEvent("Scoring the starting weights on the held-out regions.",
                         stage="validating")
        baseline = validate(work, val_s, spec, str(device), policy.name)
        yield ValidationEvent(f"before fine-tuning: validation Dice {baseline:.4f}", step=0,
                              dice=baseline, best=baseline, improved=False)
    state = LoopState(step=0, best=baseline if val_s else -math.inf, best_step=0)
    best_state = {k: v.detach().clone() for k, v in work.state_dict().items()}

    def keep_best(step: int, score: float, wall: float) -> None:
        nonlocal best_state
        best_state = {k: v.detach().clone() for k, v in work.state_dict().items()}

    yield StageEvent(
        f"Fine-tuning {spec.network}/{spec.variant} on {device} ({policy.name}): "
        f"{config.steps} steps at most, {len(trainable)} of {len(params)} tensors trained.",
        stage="training")
    stopped, steps_done = yield from optimise_iter(
        work, sampler, val_s, config, optimizer, trainable, device=device, policy=policy,
        generator=generator, cancel=cancel, state=state, on_best=keep_best)
    for p in params:
        p.requires_grad_(True)
    work.load_state_dict(best_state)
    work.eval()
    best_dice = state.best if val_s else float("nan")
    train_hash = samples_hash(samples)
    seconds = time.perf_counter() - t_start

    checkpoint, info = None, parent_info
    if output is not None:
        from ..checkpoints import checkpoint_paths

        output = checkpoint_paths(output)[0]
        norm = parent_info.normalization_config() if parent_info is not None else None
        training_data = {
            "kind": "corrections", "data_hash": train_hash,
            "train_regions": sorted(s.name for s in train_s),
            "val_regions": sorted(s.name for s in val_s),
            "replayed": len(replay),
            "split": f"by region group (crops never overlap across the split), val_fraction "
                     f"{config.val_fraction}, seed {config.seed}",
        }
        if parent_info is not None and parent_info.training_data.get("dataset"):
            training_data["dataset"] = parent_info.training_data["dataset"]
        training_data.update(dict(data or {}))
        settings = dict(config.to_dict(), device=str(device), precision=policy.name,
                        steps_done=steps_done, stopped=stopped, wall_time_s=round(seconds, 1))
        metrics = {"val_dice": _round(best_dice), "val_dice_before": _round(baseline),
                   "best_step": state.best_step, "improved": state.best_step > 0,
                   "split": "held-out correction regions"}
        root = lineage_root(parent_info)
        info = save_checkpoint_atomic(
            work, output, normalization=norm,
            classes=parent_info.classes if parent_info is not None else (),
            training_data=training_data, settings=settings, metrics=metrics,
            parent=parent_info.sha256 if parent_info is not None else None,
            dtype=config.checkpoint_dtype,
            extra={"lineage_root": root} if root else None)
        checkpoint = output
    if info is not None:
        work.checkpoint_info = info
    result = FinetuneResult(
        model=work, checkpoint=checkpoint, info=info if checkpoint is not None else None,
        baseline_dice=baseline, best_dice=best_dice, best_step=state.best_step,
        steps_done=steps_done, stopped=stopped, history=state.history, n_train=len(train_s),
        n_val=len(val_s), n_replay=len(replay), data_hash=train_hash, seconds=seconds)
    if val_s:
        verdict = (f"validation Dice {baseline:.4f} -> {best_dice:.4f} (step {state.best_step})"
                   if result.improved else
                   f"no step beat the starting weights (validation Dice {baseline:.4f}); "
                   "they are kept")
    else:
        verdict = "no validation split"
    yield FinishedEvent(f"Fine-tuning {stopped} after {steps_done} steps: {verdict}.",
                        result=result)
    return result


def _round(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def finetune(model: Any, samples: Sequence[Sample], config: Any = None,
             **kwargs: Any) -> FinetuneResult:
    """Run :func:`finetune_iter` to the end and return its result."""
    return drain(finetune_iter(model, samples, config, **kwargs))
