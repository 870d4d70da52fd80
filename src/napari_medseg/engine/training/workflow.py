"""Fine-tuning on a user's corrections, end to end, as one progress generator.

The steps the Fine-tune widget (or any other front end) runs in a worker thread: the
corrected labels are autosaved first (so a crash loses no annotation), the starting network
is loaded, the corrected regions are found, earlier corrections of the same model line are
replayed, the network is fine-tuned and written with its lineage, and a checkpoint that beat
its start becomes the active member of its model line.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...config import FinetuneConfig
from ...errors import MedsegError
from ..progress import CancelToken, NoticeEvent, ProgressEvent, StageEvent
from .finetune import FinetuneResult, ReplayStore, finetune_iter, prepare_corrections_iter
from .lineage import autosave_labels, lineage_root, set_active, unique_checkpoint_path

__all__ = ["Corrections", "finetune_corrections_iter"]


@dataclass(frozen=True)
class Corrections:
    """What a user corrected, as copies of the layer data.

    Attributes:
        image: the image (numpy or dask), axes ``axes``.
        axes: the image's axes.
        labels: the corrected labels.
        image_name: the image's name (recorded in the checkpoint's training data).
        labels_name: the labels' name (the autosave's file name).
        boundary: a corrected boundary map, or None.
        prediction: ``"model"``, a prediction the labels were corrected from, or None (see
            :func:`~napari_medseg.engine.training.finetune.prepare_corrections_iter`).
        label_meta: the labels' geometry for the autosave, or None.
    """

    image: Any
    axes: str
    labels: np.ndarray
    image_name: str
    labels_name: str
    boundary: np.ndarray | None = None
    prediction: Any = None
    label_meta: Any = None


def finetune_corrections_iter(
    load_model: Callable[[], Any],
    corrections: Corrections,
    config: FinetuneConfig,
    *,
    base_source: str | None = None,
    cancel: CancelToken | None = None,
    replay_store: ReplayStore | None = None,
    output: str | Path | None = None,
) -> Generator[ProgressEvent, None, FinetuneResult]:
    """Autosave, load, find the corrections, replay, fine-tune and record the lineage.

    Args:
        load_model: returns the starting network (called after the autosave).
        corrections: the user's corrections.
        config: the fine-tuning settings.
        base_source: the starting weights' checkpoint path or tag (recorded for revert).
        cancel: stops after the current step; the best weights so far are kept.
        replay_store: where earlier corrections are kept (default: the user data folder).
        output: the checkpoint path (default: a new one in the user data folder).

    Yields:
        The progress events of each step.

    Returns:
        The fine-tuning result.

    Raises:
        MedsegError: stopped before training started (nothing was changed).
    """
    cancel = cancel if cancel is not None else CancelToken()
    c = corrections
    yield StageEvent("Saving your labels before training.", stage="autosave")
    saved = autosave_labels(c.labels, c.labels_name, c.label_meta)
    if c.boundary is not None:
        autosave_labels(c.boundary, f"{c.labels_name} boundary", c.label_meta)
    yield NoticeEvent(f"Your labels were saved to {saved}.")
    yield StageEvent("Loading the starting weights.", stage="loading")
    model = load_model()
    samples = yield from prepare_corrections_iter(
        c.image, c.labels, model, config, axes=c.axes, prediction=c.prediction,
        boundary=c.boundary, name=c.image_name, cancel=cancel)
    if cancel.cancelled:
        raise MedsegError("Stopped before training started; nothing was changed.")
    root = lineage_root(getattr(model, "checkpoint_info", None))
    store = replay_store if replay_store is not None else ReplayStore()
    replay = []
    if config.replay > 0 and root:
        replay = store.load(root, model.spec.in_channels, config.max_replay,
                            exclude=[s.name for s in samples])
    if output is None:
        output = unique_checkpoint_path(f"{model.spec.network}-{c.image_name}")
    result = yield from finetune_iter(
        model, samples, config, replay=replay, cancel=cancel, output=output,
        data={"image": c.image_name, "labels": c.labels_name, "autosave": str(saved),
              "parent_source": base_source})
    if root:
        store.add(samples, root)
    if result.improved and result.checkpoint is not None:
        set_active(lineage_root(result.info), str(result.checkpoint.with_suffix(".json")),
                   reason="fine-tuned")
    return result
