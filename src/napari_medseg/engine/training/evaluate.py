"""Evaluate weights on image/mask folders: Dice, IoU, HD95, boundary F1; object scores too.

``evaluate_iter`` predicts every image with the tiled engine (the checkpoint's normalisation),
compares with the reference mask, and returns per-image rows plus their means. Object scores
(:func:`~napari_medseg.engine.metrics.instance_scores`: F1 and AP at IoU 0.5, the DSB 2018
score, AJI) are computed when the reference holds instance labels; the object counts of each
image (``tp``, ``fp``, ``fn`` at IoU 0.5) stay in its row and are summed into
:attr:`EvalResult.totals`, never averaged. An image whose reference holds instance labels
(nuclei) also gets its acquisition type
(:func:`~napari_medseg.engine.acquisition.acquisition_type`: fluorescence, bright-field, H&E,
or None for anything but a 2D plane of 1 or 3 channels), and :attr:`EvalResult.by_type` holds
the means per type.

:func:`reference_scores` scores a mask layer against a reference layer in the viewer (the
Segment widget's metrics table): per class, and per object (the same object scores, per
``T``/``I`` block) when the reference holds instance labels.

A file that cannot be scored does not stop the run: an image without a mask (or with two), an
unreadable file, a mask whose size differs from its image's (never cropped to fit), or an
image the engine refuses (NaN pixels, wrong channels) becomes a row with an ``error`` and no
scores; the means are over the scored rows, and :attr:`EvalResult.failed` counts the rest.
A super-resolution network is fed the image shrunk by its scale, so an image (and its mask)
whose side is not a multiple of the scale is scored on the part that is (the last rows or
columns are left out); nothing else is ever trimmed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...config import PredictConfig
from ...errors import ImageReadError, InputShapeError, MedsegError
from .datasets import match_pairs, to_channels_first
from ..acquisition import acquisition_type
from ..metrics import boundary_f1, dice, hd95, instance_scores, iou
from ..progress import CancelToken, FinishedEvent, ProgressEvent, StageEvent, drain

__all__ = ["ImageScore", "EvalResult", "COUNT_KEYS", "evaluate_iter", "evaluate", "format_table",
           "is_instance_reference", "reference_instance_scores", "reference_scores"]

#: Per-image object counts (at IoU 0.5): summed into totals, never averaged.
COUNT_KEYS = ("tp", "fp", "fn")
#: The metrics of the table, in order (those a run has).
_TABLE_KEYS = ("dice", "iou", "hd95", "boundary_f1", "f1_iou50", "ap_iou50", "dsb_score", "aji")


@dataclass(frozen=True)
class ImageScore(ProgressEvent):
    """The scores of one image (also sent as a progress event).

    Attributes:
        name: the image file's name.
        scores: metric name -> value.
        index: 1-based position in the run.
        total: images in the run.
        error: why the image could not be scored (empty when it was; then ``scores`` is empty).
        acquisition: the image's acquisition type (fluorescence, bright-field, H&E), or None.
    """

    name: str = ""
    scores: dict = field(default_factory=dict)
    index: int = 0
    total: int = 0
    error: str = ""
    acquisition: str | None = None


@dataclass(frozen=True)
class EvalResult:
    """Per-image scores and their means (NaN and inf are left out of a mean, and counted).

    Attributes:
        rows: one ImageScore per image, scored or failed (``error`` set).
        mean: metric -> mean over the scored images (object counts left out).
        seconds: wall time.
        by_type: acquisition type -> metric -> mean over the scored images of that type, plus
            ``n_images``; images without a type are in no entry.
        totals: ``tp``, ``fp``, ``fn`` at IoU 0.5 summed over the images scored for
            instances (empty when none was).
    """

    rows: tuple[ImageScore, ...]
    mean: dict[str, float]
    seconds: float
    by_type: dict[str, dict[str, float]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        """How many images could not be scored."""
        return sum(1 for r in self.rows if r.error)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (inf -> None); a failed image has ``error`` instead of scores."""

        def clean(v: float) -> float | int | None:
            if isinstance(v, int):
                return v  # counts
            return None if v is None or not math.isfinite(v) else round(float(v), 4)

        return {
            "mean": {k: clean(v) for k, v in self.mean.items()},
            "by_type": {t: {k: clean(v) for k, v in m.items()} for t, m in self.by_type.items()},
            "totals": dict(self.totals),
            "images": [{"name": r.name, **({"error": r.error} if r.error else {}),
                        "acquisition": r.acquisition,
                        **{k: clean(v) for k, v in r.scores.items()}} for r in self.rows],
            "scored": len(self.rows) - self.failed,
            "failed": self.failed,
            "seconds": round(self.seconds, 2),
        }


def _reference(mask: np.ndarray, axes: str) -> np.ndarray:
    mask = np.asarray(mask)
    if "C" in axes:
        mask = np.take(mask, 0, axis=axes.index("C"))
    return mask


def _spatial_shape(image: np.ndarray, axes: str) -> tuple[int, ...]:
    return tuple(n for n, a in zip(np.shape(image), axes) if a != "C")


def _score_pair(model, img_path: Path, mask_path: Path, config: PredictConfig,
                instances: bool | None) -> tuple[dict[str, float], str | None]:
    """Predict one image and score it against its mask.

    Returns:
        The scores, and the image's acquisition type when its reference holds objects
        (fluorescence, bright-field or H&E nuclei), else None (a dermoscopy photograph is
        no H&E section).

    Raises:
        InputShapeError: the mask's size is not the image's.
        MedsegError: the image or mask cannot be read, or the engine refuses the image.
    """
    from ...io import read_image
    from ..inference.pipeline import predict

    image, meta = read_image(img_path)
    ref_raw, ref_meta = read_image(mask_path)
    ref = _reference(ref_raw, ref_meta.axes)
    while ref.ndim > len(_spatial_shape(image, meta.axes)) and ref.shape[0] == 1:
        ref = ref[0]  # a 2D mask saved as a 1 x H x W stack
    if _spatial_shape(image, meta.axes) != ref.shape:
        raise InputShapeError(
            f"Mask {mask_path.name} is {'x'.join(map(str, ref.shape))} but its image is "
            f"{'x'.join(map(str, _spatial_shape(image, meta.axes)))}; give it the image's size.")
    is_instance = instances if instances is not None else int(ref.max()) > 1
    outputs = ("mask", "instances") if is_instance else ("mask",)
    arr, axes = np.asarray(image), meta.axes
    s = model.spec.output_scale
    if s > 1:  # super-resolution networks: feed an image s-times smaller
        import torch
        import torch.nn.functional as F

        chw, axes = to_channels_first(arr.astype(np.float32), axes)
        h, w = chw.shape[-2] // s, chw.shape[-1] // s
        arr = F.interpolate(torch.from_numpy(chw)[None], size=(h, w), mode="area")[0].numpy()
        ref = ref[..., : h * s, : w * s]  # the rows/columns the shrunk image cannot hold
    result = predict(arr, model, config.replace(outputs=outputs, axes=axes))
    pred = np.asarray(result["mask"])
    if pred.shape != ref.shape:
        raise InputShapeError(f"The prediction of {img_path.name} is {pred.shape}, not its "
                              f"mask's {ref.shape}; check the image's axes.")
    spacing = meta.spacing[-ref.ndim:] if meta.spacing else None
    scores = {
        "dice": dice(pred > 0, ref > 0),
        "iou": iou(pred > 0, ref > 0),
        "hd95": hd95(pred > 0, ref > 0, spacing),
        "boundary_f1": boundary_f1(pred > 0, ref > 0),
    }
    if not is_instance:  # the acquisition types are those of nuclei images (microscopy)
        return scores, None
    scores.update(instance_scores(np.asarray(result["instances"]), ref))
    return scores, acquisition_type(image, meta.axes)


def _means(rows: list[ImageScore]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r.scores} - set(COUNT_KEYS))
    mean = {}
    for k in keys:
        vals = [r.scores[k] for r in rows if k in r.scores and math.isfinite(r.scores[k])]
        mean[k] = float(np.mean(vals)) if vals else float("nan")
        infinite = sum(1 for r in rows if k in r.scores and not math.isfinite(r.scores[k]))
        if infinite:
            mean[f"{k}_undefined"] = float(infinite)
    return mean


def _by_type(rows: list[ImageScore]) -> dict[str, dict[str, float]]:
    """Acquisition type -> the means of its rows, with ``n_images``."""
    out = {}
    for kind in sorted({r.acquisition for r in rows if r.acquisition}):
        chosen = [r for r in rows if r.acquisition == kind]
        out[kind] = {**_means(chosen), "n_images": len(chosen)}
    return out


def _totals(rows: list[ImageScore]) -> dict[str, int]:
    """``tp``, ``fp``, ``fn`` summed over the rows that have them."""
    counted = [r for r in rows if all(k in r.scores for k in COUNT_KEYS)]
    return {k: int(sum(r.scores[k] for r in counted)) for k in COUNT_KEYS} if counted else {}


def evaluate_iter(
    model,
    images: str | Path,
    masks: str | Path,
    config: PredictConfig | None = None,
    *,
    pattern: str = "*",
    instances: bool | None = None,
    cancel: CancelToken | None = None,
) -> Generator[ProgressEvent, None, EvalResult]:
    """Score ``model`` on every image/mask pair of two folders.

    Every image of ``images`` gets a row: its scores, or the one-sentence reason it could not
    be scored (no mask, an unreadable file, a mask of another size, an image the engine
    refuses); one failed image never stops the others.

    Args:
        model: a loaded network (``resolve_weights``), carrying its checkpoint normalisation.
        images: image folder.
        masks: reference folder (same file names; binary, class or instance labels).
        config: inference settings (the default tiles at the network's preferred size).
        pattern: glob of the files to use.
        instances: score instances (F1 and AP at IoU 0.5, DSB score, AJI) too; None decides
            per file (more than one label in the reference).
        cancel: checked between images.

    Raises:
        ImageReadError: a folder is missing, or no image has a mask.
    """
    cancel = cancel or CancelToken()
    pairs, unpaired = match_pairs(images, masks, pattern)
    if not pairs:  # nothing to score: the run cannot start (exit 2 in the CLI)
        several = [u.reason for u in unpaired if u.masks]
        raise ImageReadError(several[0] if several else
                             f"No image in {images} has a mask of the same name in {masks}.")
    jobs = sorted([(p, m, "") for p, m in pairs] + [(u.image, None, u.reason) for u in unpaired])
    config = config or PredictConfig()
    t0 = time.perf_counter()
    rows: list[ImageScore] = []
    total = len(jobs)
    without = f" ({total - len(pairs)} without a usable mask)" if total > len(pairs) else ""
    yield StageEvent(f"Evaluating {total} images{without} ...", stage="evaluating")
    for i, (img_path, mask_path, error) in enumerate(jobs):
        if cancel.cancelled:
            break
        scores: dict[str, float] = {}
        kind = None
        if not error:
            try:
                scores, kind = _score_pair(model, img_path, mask_path, config, instances)
            except (MedsegError, MemoryError) as exc:
                error = str(exc) or "Out of memory; try a smaller tile."
        message = (f"{img_path.name}: not scored: {error}" if error
                   else f"{img_path.name}: Dice {scores['dice']:.3f}")
        row = ImageScore(message, name=img_path.name, scores=scores, index=i + 1, total=total,
                         error=error, acquisition=kind)
        rows.append(row)
        yield row
    scored = [r for r in rows if not r.error]
    result = EvalResult(tuple(rows), _means(scored), time.perf_counter() - t0,
                        by_type=_by_type(scored), totals=_totals(scored))
    mean = result.mean
    failed = f"; {result.failed} could not be scored" if result.failed else ""
    yield FinishedEvent(f"Mean Dice {mean.get('dice', float('nan')):.4f} over "
                        f"{len(rows) - result.failed} images{failed}.", result=result)
    return result


def evaluate(model, images, masks, config: PredictConfig | None = None, **kwargs) -> EvalResult:
    """Run :func:`evaluate_iter` to the end and return its result."""
    return drain(evaluate_iter(model, images, masks, config, **kwargs))


def format_table(result: EvalResult) -> str:
    """A plain-text table: one row per image (``not scored: why`` for a failed one), a mean row,
    then the object counts (when instances were scored) and one mean row per acquisition type."""
    keys = [k for k in _TABLE_KEYS if k in result.mean]
    width = max([len(r.name) for r in result.rows] + [len(f"  {t} (n={m['n_images']})")
                                                       for t, m in result.by_type.items()] + [4])

    def cells(values: dict) -> str:
        return "  ".join(f"{values.get(k, float('nan')):>11.4f}" for k in keys)

    lines = [f"{'image':<{width}}  " + "  ".join(f"{k:>11}" for k in keys)]
    for r in result.rows:
        lines.append(f"{r.name:<{width}}  " + (f"not scored: {r.error}" if r.error
                                               else cells(r.scores)))
    scored = len(result.rows) - result.failed
    lines.append(f"{'mean':<{width}}  " + cells(result.mean)
                 + f"  ({scored} scored, {result.failed} not)" * bool(result.failed))
    if result.totals:
        t = result.totals
        lines.append(f"objects at IoU 0.5: {t['tp']} matched, {t['fp']} false positive, "
                     f"{t['fn']} missed")
    if result.by_type:
        lines.append("by acquisition type (means):")
        for kind, values in result.by_type.items():
            label = f"  {kind} (n={values['n_images']})"
            lines.append(f"{label:<{width}}  " + cells(values))
    return "\n".join(lines)


def is_instance_reference(reference: np.ndarray, num_classes: int) -> bool:
    """Whether a reference label image holds instances for a network of ``num_classes``.

    True when it has more than one distinct non-zero label and more of them than the
    network's foreground classes (``num_classes - 1``, at least 1): the labels then number
    objects, not classes.
    """
    labels = np.unique(np.asarray(reference))
    n = int(np.count_nonzero(labels))
    return n > 1 and n > max(1, int(num_classes) - 1)


def reference_instance_scores(prediction: np.ndarray, reference: np.ndarray, axes: str, *,
                              components: bool) -> dict[str, float]:
    """Object scores of a prediction against an instance reference, per ``T``/``I`` block.

    Each block is scored with :func:`~napari_medseg.engine.metrics.instance_scores` and with
    the foreground Dice; the scores are averaged over the blocks and the counts summed.

    Args:
        prediction: instance labels, or (``components=True``) a mask whose connected
            components (face neighbours, per block) are the objects; axes ``axes``.
        reference: reference instance labels, same shape.
        axes: the axes of both (no ``C``), e.g. ``"YX"``, ``"ZYX"``, ``"TYX"``.
        components: number the prediction's objects as its connected components first.

    Returns:
        ``dice`` (foreground), ``f1_iou50``, ``ap_iou50``, ``dsb_score``, ``aji``, ``tp``,
        ``fp``, ``fn``.

    Raises:
        InputShapeError: the two shapes differ.
    """
    from scipy import ndimage as ndi

    from ..inference.regions import stack_blocks

    pred, ref = np.asarray(prediction), np.asarray(reference)
    if pred.shape != ref.shape:
        raise InputShapeError(
            f"The reference has shape {ref.shape} but the prediction has {pred.shape}; pick a "
            "reference layer on the same grid.")
    blocks = []
    for key in stack_blocks(axes, pred.shape):
        p, r = pred[key], ref[key]
        if components:
            p = ndi.label(p > 0)[0]
        blocks.append({"dice": dice(p > 0, r > 0), **instance_scores(p, r)})
    return {k: (int(sum(b[k] for b in blocks)) if k in COUNT_KEYS
                else float(np.mean([b[k] for b in blocks]))) for k in blocks[0]}


def reference_scores(
    mask: np.ndarray,
    reference: np.ndarray,
    axes: str,
    num_classes: int,
    spacing: tuple[float, ...] | None = None,
    instances: np.ndarray | None = None,
) -> dict[str, Any]:
    """The scores of a mask against a reference label image (the Segment widget's table).

    Args:
        mask: class labels, axes ``axes`` (no ``C``).
        reference: reference labels (classes or instances), same shape.
        axes: the axes of both.
        num_classes: the network's K.
        spacing: physical pixel size per axis (for HD95).
        instances: the instance labels of the prediction (same shape), or None to count the
            connected components of the mask as its objects.

    Returns:
        ``{"classes": class -> metrics}`` (:func:`~napari_medseg.engine.inference.regions.
        region_metrics`) and ``"objects"``: :func:`reference_instance_scores` when
        :func:`is_instance_reference` says the reference holds instances, else None.

    Raises:
        InputShapeError: the shapes differ.
    """
    from ..inference.regions import region_metrics

    classes = region_metrics(mask, reference, axes, num_classes, spacing)
    objects = None
    if is_instance_reference(reference, num_classes):
        if instances is None:
            objects = reference_instance_scores(mask, reference, axes, components=True)
        else:
            objects = reference_instance_scores(instances, reference, axes, components=False)
    return {"classes": classes, "objects": objects}
