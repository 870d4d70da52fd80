"""The one fine-tune workflow of the engine, used by the Fine-tune widget and the CLI alike.

:func:`finetune_corrections_iter` is what a user's corrections on one image go through:

1. the corrected labels (and boundary) are autosaved to the user data folder
   (:func:`~.lineage.autosave_labels`) before anything else, so a crash loses no annotation;
2. the starting weights are loaded (``load_model``, called here: in the caller's worker);
3. the corrected regions are found (:func:`~.corrections.prepare_corrections_iter`);
4. :func:`finetune_samples_iter` trains on them.

:func:`finetune_samples_iter` is the part shared with fine-tuning on ready samples (image/mask
folders): earlier samples of the model line are replayed (:class:`~.replay.ReplayStore`),
:func:`~.finetune.finetune_iter` trains, the new samples are kept for later replay, and a
checkpoint that beat its starting weights becomes the active member of its model line
(:func:`~.lineage.set_active`).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...config import FinetuneConfig
from ...errors import MedsegError
from ..progress import CancelToken, NoticeEvent, ProgressEvent, StageEvent
from .corrections import prepare_corrections_iter
from .datasets import Sample
from .finetune import FinetuneResult, finetune_iter
from .lineage import autosave_labels, lineage_root, set_active, unique_checkpoint_path
from .replay import ReplayStore

__all__ = ["Corrections", "finetune_corrections_iter", "finetune_samples_iter"]


@dataclass(frozen=True)
class Corrections:
    """What a user corrected on one image; copies of the data, never live layers.

    Attributes:
        image: the image (numpy or dask), axes ``axes``.
        axes: the image's axes (``"YX"``, ``"ZYX"``, ``"YXC"``...).
        labels: the corrected labels (the image's axes without ``C``).
        image_name: the image's name (sample names, the checkpoint's file name).
        labels_name: the labels' name (the autosave's file name).
        boundary: a corrected boundary layer (the labels' shape), or None.
        prediction: what the labels are compared with: ``"model"`` (the starting weights
            predict it), a prediction array, or None (every labelled plane counts whole); see
            :func:`~.corrections.prepare_corrections_iter`.
        label_meta: the labels' geometry for the autosave (an ``ImageMeta``), or None.
        image_meta: the image's geometry (an ``ImageMeta``), or None: a pixel size other
            than the weights' resamples the corrections to theirs.
    """

    image: Any
    axes: str
    labels: np.ndarray
    image_name: str
    labels_name: str
    boundary: np.ndarray | None = None
    prediction: Any = None
    label_meta: Any = None
    image_meta: Any = None


def _autosave_iter(corrections: Corrections) -> Generator[ProgressEvent, None, Path]:
    """Autosave the labels (and boundary); says where; returns the labels' file."""
    yield StageEvent("Saving your labels before training.", stage="autosave")
    saved = autosave_labels(corrections.labels, corrections.labels_name, corrections.label_meta)
    if corrections.boundary is not None:
        autosave_labels(corrections.boundary, f"{corrections.labels_name} boundary",
                        corrections.label_meta)
    yield NoticeEvent(f"Your labels were saved to {saved}.")
    return saved


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
    """Autosave, load, find the corrections and fine-tune on them; yields events.

    Args:
        load_model: returns the starting network (called after the autosave, so a failure to
            load loses no annotation).
        corrections: the image and its corrected labels.
        config: the settings.
        base_source: the starting weights' checkpoint path or tag (recorded for revert), or
            None.
        cancel: Stop sets it: before training nothing changes, during training the best
            weights so far are kept.
        replay_store: where earlier samples are kept; None uses the user data folder's.
        output: the checkpoint to write; None makes a new one in the user's checkpoints
            folder (:func:`~.lineage.unique_checkpoint_path` of ``<network>-<image name>``).

    Returns:
        The :class:`~.finetune.FinetuneResult`.

    Raises:
        MedsegError: stopped before training started.
        InputShapeError: no corrected region, or data that does not fit the network.
    """
    cancel = cancel or CancelToken()
    saved = yield from _autosave_iter(corrections)
    yield StageEvent("Loading the starting weights.", stage="loading")
    model = load_model()
    samples = yield from prepare_corrections_iter(
        corrections.image, corrections.labels, model, config, axes=corrections.axes,
        prediction=corrections.prediction, boundary=corrections.boundary,
        name=corrections.image_name, cancel=cancel, meta=corrections.image_meta)
    if cancel.cancelled:
        raise MedsegError("Stopped before training started; nothing was changed.")
    if output is None:
        output = unique_checkpoint_path(f"{model.spec.network}-{corrections.image_name}")
    data = {"image": corrections.image_name, "labels": corrections.labels_name,
            "autosave": str(saved), "parent_source": base_source}
    return (yield from finetune_samples_iter(
        model, samples, config, output=output, data=data, base_source=base_source,
        cancel=cancel, replay_store=replay_store))


def finetune_samples_iter(
    model: Any,
    samples: Sequence[Sample],
    config: FinetuneConfig,
    *,
    output: str | Path | None = None,
    data: Mapping[str, Any] | None = None,
    base_source: str | None = None,
    cancel: CancelToken | None = None,
    replay_store: ReplayStore | None = None,
) -> Generator[ProgressEvent, None, FinetuneResult]:
    """Fine-tune ``model`` on ``samples`` with replay, and record the result in its lineage.

    With ``config.replay`` > 0, earlier samples of the model's line (its lineage root) are
    mixed in, leaving out the names of ``samples``. After training, ``samples`` are kept for
    later replay, and a written checkpoint that beat its starting weights becomes the active
    member of its line. A model without a lineage (no checkpoint) neither replays nor keeps.

    Args:
        model: the starting network (not modified).
        samples: the training samples.
        config: the settings.
        output: the checkpoint to write, or None to keep the result in memory only (as
            :func:`~.finetune.finetune_iter`; nothing becomes active then).
        data: more to record in the checkpoint's ``training_data``.
        base_source: the starting weights' path or tag, recorded as ``parent_source``.
        cancel: checked before every step; a cancelled run keeps the best weights so far.
        replay_store: where earlier samples are kept; None uses the user data folder's.

    Returns:
        The :class:`~.finetune.FinetuneResult`.
    """
    samples = list(samples)
    root = lineage_root(getattr(model, "checkpoint_info", None))
    store = replay_store if replay_store is not None else ReplayStore()
    replay = []
    if config.replay > 0 and root:
        replay = store.load(root, model.spec.in_channels, config.max_replay,
                            exclude=[s.name for s in samples])
    if replay:
        yield NoticeEvent(f"Mixing in {len(replay)} sample(s) kept from earlier fine-tuning "
                          f"of these weights ({config.replay:.0%} of each batch), so the "
                          "network does not forget them.")
    if base_source is not None:
        data = {**dict(data or {}), "parent_source": base_source}
    result = yield from finetune_iter(model, samples, config, replay=replay, cancel=cancel,
                                      output=output, data=data)
    if root:
        store.add(samples, root)
    if result.improved and result.checkpoint is not None:
        set_active(lineage_root(result.info), str(result.checkpoint.with_suffix(".json")),
                   reason="fine-tuned")
    return result
