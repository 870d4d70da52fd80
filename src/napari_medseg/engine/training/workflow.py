"""Fine-tuning a model line on new samples: replay, train, remember, activate.

TEMPORARY minimal version written on the batch/CLI branch so the ``finetune`` command can
run against the agreed API; the training wing's own module replaces it at merge.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ...config import FinetuneConfig
from ..progress import CancelToken, ProgressEvent
from .datasets import Sample
from .finetune import FinetuneResult, ReplayStore, finetune_iter
from .lineage import lineage_root, set_active

__all__ = ["finetune_samples_iter"]


def finetune_samples_iter(
    model: Any,
    samples: Sequence[Sample],
    config: FinetuneConfig | Mapping[str, Any] | None,
    *,
    output: str | Path | None = None,
    data: Mapping[str, Any] | None = None,
    base_source: str | None = None,
    cancel: CancelToken | None = None,
    replay_store: ReplayStore | None = None,
) -> Generator[ProgressEvent, None, FinetuneResult]:
    """Fine-tune ``model`` on ``samples`` within its model line; yields events, returns a result.

    Replays samples from the line's store when ``config.replay > 0``, runs
    :func:`~.finetune.finetune_iter`, adds the new samples to the store, and makes the new
    checkpoint the line's active member when it beat the starting weights.

    Args:
        model: the starting network (its ``checkpoint_info`` names the model line).
        samples: the new training samples.
        config: the settings (a :class:`~napari_medseg.config.FinetuneConfig` or a mapping).
        output: where to write the checkpoint; None keeps it in memory only.
        data: more to record in the checkpoint's ``training_data``.
        base_source: what the starting weights were loaded from (recorded as
            ``parent_source``).
        cancel: stops after the current step, keeping the best weights so far.
        replay_store: the store of earlier samples; None uses the user's.

    Returns:
        The :class:`~.finetune.FinetuneResult`.
    """
    if not isinstance(config, FinetuneConfig):
        config = FinetuneConfig.from_mapping(dict(config or {}))
    root = lineage_root(getattr(model, "checkpoint_info", None))
    store = replay_store if replay_store is not None else ReplayStore()
    replay = []
    if config.replay > 0 and root:
        replay = store.load(root, model.spec.in_channels, config.max_replay,
                            exclude=[s.name for s in samples])
    data = dict(data or {})
    if base_source is not None:
        data["parent_source"] = base_source
    result = yield from finetune_iter(model, samples, config, replay=replay, cancel=cancel,
                                      output=output, data=data)
    if root:
        store.add(samples, root)
    if result.improved and result.checkpoint is not None:
        set_active(lineage_root(result.info), str(result.checkpoint.with_suffix(".json")),
                   reason="fine-tuned")
    return result
