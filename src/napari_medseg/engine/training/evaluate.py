"""Evaluate weights on image/mask folders: Dice, IoU, HD95, boundary F1; F1@0.5 and AJI for instances.

``evaluate_iter`` predicts every image with the tiled engine (the checkpoint's normalisation),
compares with the reference mask, and returns per-image rows plus their means. Instance
metrics (F1 at IoU 0.5, AJI) are computed when the reference holds instance labels.
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
from .datasets import find_pairs, to_channels_first
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
    """

    name: str = ""
    scores: dict = field(default_factory=dict)
    index: int = 0
    total: int = 0


@dataclass(frozen=True)
class EvalResult:
    """Per-image scores and their means (NaN and inf are left out of a mean, and counted).

    Attributes:
        rows: one ImageScore per image.
        mean: metric -> mean over images.
        seconds: wall time.
    """

    rows: tuple[ImageScore, ...]
    mean: dict[str, float]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (inf -> None)."""

        def clean(v: float) -> float | None:
            return None if v is None or not math.isfinite(v) else round(float(v), 4)

        return {
            "mean": {k: clean(v) for k, v in self.mean.items()},
            "images": [{"name": r.name, **{k: clean(v) for k, v in r.scores.items()}}
                       for r in self.rows],
            "seconds": round(self.seconds, 2),
        }


def _reference(mask: np.ndarray, axes: str) -> np.ndarray:
    mask = np.asarray(mask)
    if "C" in axes:
        mask = np.take(mask, 0, axis=axes.index("C"))
    return mask


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

    Args:
        model: a loaded network (``resolve_weights``), carrying its checkpoint normalisation.
        images: image folder.
        masks: reference folder (same file names; binary, class or instance labels).
        config: inference settings (the default tiles at the network's preferred size).
        pattern: glob of the files to use.
        instances: score instances (F1@0.5, AJI) too; None decides per file (more than one
            label in the reference).
        cancel: checked between images.
    """
    from ...io import read_image
    from ..inference.pipeline import predict

    cancel = cancel or CancelToken()
    pairs = find_pairs(images, masks, pattern)
    config = config or PredictConfig()
    t0 = time.perf_counter()
    rows: list[ImageScore] = []
    yield StageEvent(f"Evaluating on {len(pairs)} images ...", stage="evaluating")
    for i, (img_path, mask_path) in enumerate(pairs):
        if cancel.cancelled:
            break
        image, meta = read_image(img_path)
        ref_raw, ref_meta = read_image(mask_path)
        ref = _reference(ref_raw, ref_meta.axes)
        is_instance = instances if instances is not None else int(ref.max()) > 1
        outputs = ("mask", "instances") if is_instance else ("mask",)
        arr, axes = np.asarray(image), meta.axes
        if model.spec.output_scale > 1:  # super-resolution networks: feed a x2-smaller image
            import torch
            import torch.nn.functional as F

            chw, caxes = to_channels_first(arr.astype(np.float32), axes)
            s = model.spec.output_scale
            small = F.interpolate(torch.from_numpy(chw)[None],
                                  size=(chw.shape[-2] // s, chw.shape[-1] // s), mode="area")
            arr, axes = small[0].numpy(), caxes
        result = predict(arr, model, config.replace(outputs=outputs, axes=axes))
        pred = np.asarray(result["mask"])
        h, w = min(pred.shape[-2], ref.shape[-2]), min(pred.shape[-1], ref.shape[-1])
        pred, ref_c = pred[..., :h, :w], ref[..., :h, :w]
        spacing = meta.spacing[-ref_c.ndim:] if meta.spacing else None
        scores = {
            "dice": dice(pred > 0, ref_c > 0),
            "iou": iou(pred > 0, ref_c > 0),
            "hd95": hd95(pred > 0, ref_c > 0, spacing),
            "boundary_f1": boundary_f1(pred > 0, ref_c > 0),
        }
        if is_instance:
            inst = np.asarray(result["instances"])[..., :h, :w]
            scores["f1_iou50"] = instance_f1(inst, ref_c, 0.5)
            scores["aji"] = aggregated_jaccard(inst, ref_c)
        row = ImageScore(f"{img_path.name}: Dice {scores['dice']:.3f}", name=img_path.name,
                         scores=scores, index=i + 1, total=len(pairs))
        rows.append(row)
        yield row
    keys = sorted({k for r in rows for k in r.scores})
    mean = {}
    for k in keys:
        vals = [r.scores[k] for r in rows if k in r.scores and math.isfinite(r.scores[k])]
        mean[k] = float(np.mean(vals)) if vals else float("nan")
        infinite = sum(1 for r in rows if k in r.scores and not math.isfinite(r.scores[k]))
        if infinite:
            mean[f"{k}_undefined"] = float(infinite)
    result = EvalResult(tuple(rows), mean, time.perf_counter() - t0)
    yield FinishedEvent(f"Mean Dice {mean.get('dice', float('nan')):.4f} over {len(rows)} images.",
                        result=result)
    return result


def evaluate(model, images, masks, config: PredictConfig | None = None, **kwargs) -> EvalResult:
    """Run :func:`evaluate_iter` to the end and return its result."""
    return drain(evaluate_iter(model, images, masks, config, **kwargs))


def format_table(result: EvalResult) -> str:
    """A plain-text table: one row per image and a mean row."""
    keys = [k for k in ("dice", "iou", "hd95", "boundary_f1", "f1_iou50", "aji")
            if k in result.mean]
    width = max([len(r.name) for r in result.rows] + [4])
    lines = [f"{'image':<{width}}  " + "  ".join(f"{k:>11}" for k in keys)]
    for r in result.rows:
        lines.append(f"{r.name:<{width}}  " + "  ".join(
            f"{r.scores.get(k, float('nan')):>11.4f}" for k in keys))
    lines.append(f"{'mean':<{width}}  " + "  ".join(f"{result.mean[k]:>11.4f}" for k in keys))
    return "\n".join(lines)
