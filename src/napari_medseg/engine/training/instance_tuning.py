"""Tune the instance task's thresholds on held-out images.

The network is run once per image for its three class probabilities. The foreground
threshold is chosen first, by the mean foreground Dice; then every seed threshold and
smallest seed of the grid only re-runs the watershed
(:func:`~napari_medseg.engine.seg_task.seeded_watershed`) and is scored by AP@0.5 against the
reference instances (mean over images); then, with the best seeds, the foreground probability
objects grow into (apart from the mask's threshold, which Dice decides) and last the smallest
fragment kept (a fraction of each image's median object) are chosen the same way. The best
setting is what the model card and the checkpoint store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ...config import PredictConfig
from ..metrics import match_instances
from ..seg_task import SegTask, seeded_watershed, task_of

__all__ = ["FOREGROUND_THRESHOLDS", "SEED_THRESHOLDS", "MIN_SEEDS", "OBJECT_THRESHOLDS",
           "FRAGMENT_FRACTIONS", "held_out_probabilities", "tune_watershed"]

FOREGROUND_THRESHOLDS = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)
SEED_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
MIN_SEEDS = (8, 16, 32, 64, 128)
OBJECT_THRESHOLDS = (None, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)
FRAGMENT_FRACTIONS = (0.0, 0.1, 0.15, 0.2, 0.3)


def held_out_probabilities(model, pairs: Iterable[tuple[Path, Path]],
                           config: PredictConfig | None = None
                           ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(probabilities 3 x H x W float32, reference instances)`` of each image/mask pair."""
    from ...io import read_image
    from ..inference.pipeline import predict

    config = (config or PredictConfig()).replace(outputs=("probabilities",))
    out = []
    for img_path, mask_path in pairs:
        image, meta = read_image(img_path)
        ref, _ = read_image(mask_path)
        result = predict(np.asarray(image), model, config.replace(axes=meta.axes))
        out.append((np.asarray(result["probabilities"], np.float32), np.asarray(ref)))
    return out


def _ap50(pred: np.ndarray, ref: np.ndarray) -> float:
    m = match_instances(pred, ref, 0.5)
    denom = m["tp"] + m["fp"] + m["fn"]
    return 1.0 if denom == 0 else m["tp"] / denom


def tune_watershed(
    model,
    held_out: Sequence[tuple[np.ndarray, np.ndarray]],
    seed_thresholds: Sequence[float] = SEED_THRESHOLDS,
    min_seeds: Sequence[int] = MIN_SEEDS,
    min_size: int = 8,
    foreground_thresholds: Sequence[float] = FOREGROUND_THRESHOLDS,
    fragment_fractions: Sequence[float] = FRAGMENT_FRACTIONS,
    object_thresholds: Sequence[float | None] = OBJECT_THRESHOLDS,
) -> tuple[SegTask, list[dict]]:
    """The foreground threshold with the best mean Dice, then the watershed setting with the
    best mean AP@0.5 on ``held_out``, then the object threshold and last the fragment
    fraction with the best AP@0.5 (the first tried wins a tie, so list None and 0 first to
    prefer the mask itself and keeping every object).

    Args:
        model: a network with the instance task (its other settings are kept).
        held_out: from :func:`held_out_probabilities`.
        seed_thresholds: interior probabilities tried as seed thresholds.
        min_seeds: smallest seeds tried, in pixels.
        min_size: smallest object kept (the prediction default).
        foreground_thresholds: foreground thresholds tried.
        fragment_fractions: ``min_object_fraction`` values tried with the best seeds.
        object_thresholds: ``object_threshold`` values tried with the best seeds (None: the
            mask).

    Returns:
        ``(task, table)``: the tuned task, and one row per setting (``seed_threshold``,
        ``min_seed``, ``object_threshold``, ``min_object_fraction``, ``ap_iou50``) in the
        order tried.
    """
    from ..metrics import dice

    fg_dice = {t: float(np.mean([dice(p[0] < 1.0 - t, ref > 0) for p, ref in held_out]))
               for t in foreground_thresholds}
    base = dataclasses.replace(task_of(model), foreground_threshold=max(fg_dice, key=fg_dice.get),
                               min_object_fraction=0.0, object_threshold=None)

    def ap(task: SegTask) -> float:
        scores = []
        for probs, ref in held_out:
            fg = probs[0] < 1.0 - task.foreground_threshold
            scores.append(_ap50(seeded_watershed(fg, probs[1], probs[2], task, min_size), ref))
        return round(float(np.mean(scores)), 4)

    def row(task: SegTask) -> dict:
        return {"seed_threshold": task.seed_threshold, "min_seed": task.min_seed,
                "object_threshold": task.object_threshold,
                "min_object_fraction": task.min_object_fraction, "ap_iou50": ap(task)}

    table: list[dict] = []

    def best_of(task: SegTask, variants: list[SegTask], *keys: str) -> SegTask:
        """``task`` with ``keys`` from the best-scoring variant (the first on a tie)."""
        rows = [row(v) for v in variants]
        table.extend(rows)
        if not rows:
            return task
        best = max(rows, key=lambda r: r["ap_iou50"])
        return dataclasses.replace(task, **{k: best[k] for k in keys})

    seeded = best_of(base, [dataclasses.replace(base, seed_threshold=float(t), min_seed=int(m))
                            for t in seed_thresholds for m in min_seeds],
                     "seed_threshold", "min_seed")
    grown = best_of(seeded, [dataclasses.replace(seeded, object_threshold=t)
                             for t in object_thresholds], "object_threshold")
    return best_of(grown, [dataclasses.replace(grown, min_object_fraction=float(f))
                           for f in fragment_fractions], "min_object_fraction"), table
