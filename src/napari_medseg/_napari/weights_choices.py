"""The weights a picker offers: shipped model cards, the user's checkpoints, random init.

Plain data and file listings (no Qt): :class:`WeightsChoice` is one entry of a weights
picker, :func:`list_weight_choices` lists them for a network and :func:`checkpoint_choice`
makes one for a checkpoint file the user browsed to.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "RANDOM_INIT",
    "RANDOM_INIT_CLASSES",
    "WeightsChoice",
    "user_checkpoint_dir",
    "list_weight_choices",
    "checkpoint_choice",
]

#: Label of the untrained choice in the weights picker.
RANDOM_INIT = "random init (untrained)"
#: Classes of an untrained network: one sigmoid foreground logit (the threshold applies).
RANDOM_INIT_CLASSES = 1


@dataclass(frozen=True)
class WeightsChoice:
    """One entry of the weights picker.

    Attributes:
        kind: ``"card"`` (shipped model card), ``"checkpoint"`` (a user's checkpoint) or
            ``"random"`` (untrained).
        label: what the picker shows.
        network: registry name.
        variant: network variant (for ``random`` the picker's variant is used instead).
        source: the card's tag or the checkpoint's path; None for ``random``.
        in_channels: image channels the weights take (None: follow the image).
        num_classes: K of the weights.
        installed: False for a card whose weights file is missing.
        detail: a line for the tooltip (dataset, metrics, parent).
        instances: the weights learnt the instance task (a run also gives separate objects).
        tta: the weights' thresholds were tuned on flip-averaged probabilities (the run's
            flip TTA starts on for them).
    """

    kind: str
    label: str
    network: str
    variant: str
    source: str | None = None
    in_channels: int | None = None
    num_classes: int = RANDOM_INIT_CLASSES
    installed: bool = True
    detail: str = ""
    instances: bool = False
    tta: bool = False

    @property
    def untrained(self) -> bool:
        """True for the random-init choice."""
        return self.kind == "random"


def user_checkpoint_dir() -> Path:
    """The folder holding the user's (fine-tuned) checkpoints."""
    from ..resources import user_data_dir

    return user_data_dir() / "checkpoints"


def _task_flags(task: dict | None) -> tuple[bool, bool]:
    """``(instances, tta)`` of a stored task."""
    from ..engine.seg_task import SegTask

    parsed = SegTask.from_dict(task)
    return parsed.instances, parsed.tta


def _metric_text(metrics: dict) -> str:
    parts = [f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)]
    return ", ".join(parts[:3])


def list_weight_choices(network: str) -> list[WeightsChoice]:
    """The weights a picker offers for ``network``: shipped cards, user checkpoints, random.

    Cards whose weights file is missing are listed as not installed; unreadable checkpoint
    descriptions are skipped (one bad file must not hide the others).
    """
    from ..engine.checkpoints import list_model_cards, read_checkpoint_info

    choices: list[WeightsChoice] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cards = list_model_cards()
    for card in cards:
        if card.network != network:
            continue
        installed = card.weights_path() is not None
        label = card.tag
        if not installed:
            label += " - not installed"
        detail = f"Shipped {card.network} ({card.variant}) weights trained on {card.dataset}"
        if card.metrics:
            detail += f"; {_metric_text(card.metrics)}"
        choices.append(WeightsChoice("card", label, card.network, card.variant, card.tag,
                                     card.in_channels, card.num_classes, installed, detail,
                                     *_task_flags(card.task)))
    folder = user_checkpoint_dir()
    if folder.is_dir():
        for path in sorted(folder.rglob("*.json")):
            try:
                info = read_checkpoint_info(path)
            except Exception:  # noqa: BLE001 - a broken file is skipped, not fatal
                continue
            if info.network != network:
                continue
            name = path.relative_to(folder).with_suffix("").as_posix()
            detail = f"Your checkpoint {path}"
            if info.parent:
                detail += f"; fine-tuned from {info.parent[:12]}"
            if info.metrics:
                detail += f"; {_metric_text(info.metrics)}"
            choices.append(WeightsChoice(
                "checkpoint", f"{name} ({info.variant}, yours)", info.network, info.variant,
                str(path), info.in_channels, info.num_classes, True, detail,
                *_task_flags(info.task)))
    choices.append(WeightsChoice("random", RANDOM_INIT, network, "", None, None,
                                 RANDOM_INIT_CLASSES, True,
                                 "Random weights: the masks are meaningless; for trying the "
                                 "pipeline or as a starting point for training."))
    return choices


def checkpoint_choice(path: str | Path) -> WeightsChoice:
    """A picker entry for a checkpoint file the user browsed to.

    Raises:
        WeightsNotFoundError, CheckpointError: the file is not a napari-medseg checkpoint.
    """
    from ..engine.checkpoints import read_checkpoint_info

    info = read_checkpoint_info(path)
    name = Path(path).with_suffix("").name
    return WeightsChoice("checkpoint", f"{name} ({info.variant}, file)", info.network,
                         info.variant, str(path), info.in_channels, info.num_classes, True,
                         f"Checkpoint {path}", *_task_flags(info.task))
