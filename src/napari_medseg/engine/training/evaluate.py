"""Evaluate weights on image/mask folders: Dice, IoU, HD95, boundary F1; F1@0.5 and AJI for instances.

``evaluate_iter`` predicts every image with the tiled engine (the checkpoint's normalisation),
compares with the reference mask, and returns per-image rows plus their means. Instance
metrics (F1 at IoU 0.5, AJI) are computed when the reference holds instance labels.

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
from ..metrics import aggregated_jaccard, boundary_f1, dice, hd95, instance_f1, iou
from ..progress import CancelToken, FinishedEvent, ProgressEvent, StageEvent, drain

__all__ = ["ImageScore", "EvalResult", "evaluate_iter", "evaluate", "format_table"]


@dataclass(frozen=True)
class ImageScore(ProgressEvent):
    """The scores of one image (also sent as a progress event).

    Attributes:
        name: the image file's name.
        scores: metric name -> value.
        index: 1-based position in the run.
        total: images in the run.
        error: why the image could not be scored (empty when it was; then ``scores`` is empty).
    """

    name: str = ""
    scores: dict = field(default_factory=dict)
    index: int = 0
    total: int = 0
    error: str = ""


@dataclass(frozen=True)
class EvalResult:
    """Per-image scores and their means (NaN and inf are left out of a mean, and counted).

    Attributes:
        rows: one ImageScore per image, scored or failed (``error`` set).
        mean: metric -> mean over the scored images.
        seconds: wall time.
    """

    rows: tuple[ImageScore, ...]
    mean: dict[str, float]
    seconds: float

    @property
    def failed(self) -> int:
        """How many images could not be scored."""
        return sum(1 for r in self.rows if r.error)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (inf -> None); a failed image has ``error`` instead of scores."""

        def clean(v: float) -> float | None:
            return None if v is None or not math.isfinite(v) else round(float(v), 4)

        return {
            "mean": {k: clean(v) for k, v in self.mean.items()},
            "images": [{"name": r.name, **({"error": r.error} if r.error else {}),
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
                instances: bool | None) -> dict[str, float]:
    """Predict one image and score it against its mask.

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
    if is_instance:
        inst = np.asarray(result["instances"])
        scores["f1_iou50"] = instance_f1(inst, ref, 0.5)
        scores["aji"] = aggregated_jaccard(inst, ref)
    return scores


def _means(rows: list[ImageScore]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r.scores})
    mean = {}
    for k in keys:
        vals = [r.scores[k] for r in rows if k in r.scores and math.isfinite(r.scores[k])]
        mean[k] = float(np.mean(vals)) if vals else float("nan")
        infinite = sum(1 for r in rows if k in r.scores and not math.isfinite(r.scores[k]))
        if infinite:
            mean[f"{k}_undefined"] = float(infinite)
    return mean


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
        instances: score instances (F1@0.5, AJI) too; None decides per file (more than one
            label in the reference).
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
        if not error:
            try:
                scores = _score_pair(model, img_path, mask_path, config, instances)
            except (MedsegError, MemoryError) as exc:
                error = str(exc) or "Out of memory; try a smaller tile."
        message = (f"{img_path.name}: not scored: {error}" if error
                   else f"{img_path.name}: Dice {scores['dice']:.3f}")
        row = ImageScore(message, name=img_path.name, scores=scores, index=i + 1, total=total,
                         error=error)
        rows.append(row)
        yield row
    mean = _means([r for r in rows if not r.error])
    result = EvalResult(tuple(rows), mean, time.perf_counter() - t0)
    failed = f"; {result.failed} could not be scored" if result.failed else ""
    yield FinishedEvent(f"Mean Dice {mean.get('dice', float('nan')):.4f} over "
                        f"{len(rows) - result.failed} images{failed}.", result=result)
    return result


def evaluate(model, images, masks, config: PredictConfig | None = None, **kwargs) -> EvalResult:
    """Run :func:`evaluate_iter` to the end and return its result."""
    return drain(evaluate_iter(model, images, masks, config, **kwargs))


def format_table(result: EvalResult) -> str:
    """A plain-text table: one row per image (``not scored: why`` for a failed one), a mean row."""
    keys = [k for k in ("dice", "iou", "hd95", "boundary_f1", "f1_iou50", "aji")
            if k in result.mean]
    width = max([len(r.name) for r in result.rows] + [4])
    lines = [f"{'image':<{width}}  " + "  ".join(f"{k:>11}" for k in keys)]
    for r in result.rows:
        lines.append(f"{r.name:<{width}}  " + (f"not scored: {r.error}" if r.error else "  ".join(
            f"{r.scores.get(k, float('nan')):>11.4f}" for k in keys)))
    scored = len(result.rows) - result.failed
    lines.append(f"{'mean':<{width}}  " + "  ".join(f"{result.mean[k]:>11.4f}" for k in keys)
                 + f"  ({scored} scored, {result.failed} not)" * bool(result.failed))
    return "\n".join(lines)
