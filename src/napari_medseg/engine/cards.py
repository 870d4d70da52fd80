"""Model cards: the YAML file that describes each shipped weight.

Cards live in the ``models/`` folders that :func:`napari_medseg.resources.model_card_dirs`
finds, one per shipped weight, with at least ``tag``, ``network``, ``variant``, ``dataset``
(the training data's folder name, e.g. ``dsb2018_nuclei``), ``weights`` (a file name in
``weights/``), ``sha256``, ``config``, ``normalization`` and ``metrics``; ``intended_for``
says what images the weights suit (:mod:`.matching`). The weights themselves are loaded by
:mod:`.checkpoints`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import resources
from ..errors import CheckpointError, MedsegError

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoints import CheckpointInfo

__all__ = ["CARD_FIELDS", "ModelCard", "list_model_cards", "list_shipped_weights",
           "default_weights"]

#: Fields every model card must have.
CARD_FIELDS = ("tag", "network", "variant", "dataset", "weights", "sha256", "config",
               "normalization", "metrics")


@dataclass(frozen=True)
class ModelCard:
    """A shipped weight's YAML model card.

    Attributes:
        tag: the name users pass to ``--weights``.
        network: registry name.
        variant: network variant.
        dataset: folder name of the training data (e.g. ``dsb2018_nuclei``).
        weights: weights file name (looked up in ``resources.weights_dirs()``).
        sha256: sha256 of the weights file.
        config: the network's config (full, or overrides of the variant).
        normalization: the normalization (dict), or None.
        metrics: validation metrics.
        in_channels: image channels (from the card or its config).
        num_classes: classes (from the card or its config).
        path: the card file.
        data: the whole card.
    """

    tag: str
    network: str
    variant: str
    dataset: str
    weights: str
    sha256: str
    config: dict
    normalization: dict | None
    metrics: dict
    in_channels: int
    num_classes: int
    path: Path
    data: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_file(cls, path: Path) -> ModelCard:
        """Parse a card.

        Raises:
            CheckpointError: not YAML, or a required field is missing.
        """
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise CheckpointError(
                f"The model card {path.name} is not readable YAML ({exc}).") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"The model card {path.name} is not a YAML mapping.")
        missing = [k for k in CARD_FIELDS if k not in data]
        if missing:
            raise CheckpointError(f"The model card {path.name} lacks the field {missing[0]!r}.")
        config = dict(data.get("config") or {})
        in_channels = int(data.get("in_channels", config.get("in_channels", 1)))
        num_classes = int(data.get("num_classes", config.get("num_classes", 2)))
        return cls(
            tag=str(data["tag"]), network=str(data["network"]), variant=str(data["variant"]),
            dataset=str(data["dataset"]), weights=str(data["weights"]),
            sha256=str(data["sha256"]), config=config,
            normalization=dict(data["normalization"]) if data.get("normalization") else None,
            metrics=dict(data.get("metrics") or {}), in_channels=in_channels,
            num_classes=num_classes, path=path, data=data,
        )

    @property
    def task(self) -> dict | None:
        """The card's ``task`` without its free-text ``description`` (None: the
        ``classes`` task; a card whose ``task`` is only a sentence predates tasks)."""
        from .seg_task import stored_task

        task = self.data.get("task")
        if not isinstance(task, dict):
            return None
        try:
            return stored_task(task)
        except MedsegError as exc:
            raise CheckpointError(f"The model card {self.path.name} has an invalid task: "
                                  f"{exc}") from None

    @property
    def pixel_size(self) -> dict | None:
        """The pixel size the weights were trained at (``intended_for.pixel_size``), or None.

        Raises:
            CheckpointError: it is not a positive length.
        """
        from .pixel_size import PixelSize

        facts = self.data.get("intended_for") or {}
        size = PixelSize.from_mapping(facts.get("pixel_size"), f"model card {self.path.name}")
        return size.to_dict() if size else None

    @property
    def tile(self) -> int | None:
        """The prediction tile the weights record (``tile``), or None.

        Raises:
            CheckpointError: it is not a whole number of at least 16 pixels.
        """
        from .checkpoints import tile_side

        value = self.data.get("tile")
        return None if value is None else tile_side(value, f"model card {self.path.name}")

    def weights_path(self) -> Path | None:
        """The weights file, searched in ``resources.weights_dirs()``; None if absent."""
        for folder in resources.weights_dirs():
            candidate = folder / self.weights
            if candidate.is_file():
                return candidate
        sibling = self.path.parent.parent / "weights" / self.weights
        return sibling if sibling.is_file() else None

    def info(self) -> CheckpointInfo:
        """The checkpoint description this card implies."""
        from .checkpoints import CheckpointInfo

        return CheckpointInfo(
            network=self.network, variant=self.variant, config=self.config,
            in_channels=self.in_channels, num_classes=self.num_classes,
            classes=tuple(self.data.get("classes") or ()), normalization=self.normalization,
            input_downsample=int(self.data.get("input_downsample") or 1),
            task=self.task, pixel_size=self.pixel_size, tile=self.tile,
            training_data={"dataset": self.dataset, **dict(self.data.get("training_data") or {})},
            settings=dict(self.data.get("settings") or {}), metrics=self.metrics,
            parent=self.data.get("parent"), weights=self.weights, sha256=self.sha256,
            tag=self.tag,
        )


def list_model_cards() -> list[ModelCard]:
    """Every valid model card, first folder first; a tag seen twice keeps the first.

    Malformed cards are skipped with a warning (one bad file must not hide the others).
    """
    cards: dict[str, ModelCard] = {}
    for folder in resources.model_card_dirs():
        for path in sorted(list(folder.glob("*.yaml")) + list(folder.glob("*.yml"))):
            try:
                card = ModelCard.from_file(path)
            except CheckpointError as exc:
                warnings.warn(str(exc), stacklevel=2)
                continue
            cards.setdefault(card.tag, card)
    return list(cards.values())


def list_shipped_weights() -> list[dict[str, Any]]:
    """The shipped weights (cards whose weights file is present), as JSON-friendly dicts.

    Each has ``tag``, ``network``, ``variant``, ``dataset``, ``in_channels``,
    ``num_classes``, ``weights`` (file name), ``path``, ``sha256``, ``metrics``,
    ``normalization``, ``input_downsample``, ``card`` and ``task`` (the instance task's
    settings, None for the classes task).
    """
    out = []
    for card in list_model_cards():
        path = card.weights_path()
        if path is None:
            continue
        out.append({
            "tag": card.tag, "network": card.network, "variant": card.variant,
            "dataset": card.dataset, "in_channels": card.in_channels,
            "num_classes": card.num_classes, "weights": card.weights, "path": str(path),
            "sha256": card.sha256, "metrics": card.metrics,
            "normalization": card.normalization,
            "input_downsample": card.info().input_downsample,
            "card": str(card.path), "task": card.task,
        })
    return out


def default_weights(dataset: str = "dsb2018_nuclei") -> str | None:
    """Tag of the shipped weights trained on ``dataset`` with the best validation Dice
    (None when none ships): what the demo and the benchmarks start from."""
    shipped = [w for w in list_shipped_weights() if w["dataset"] == dataset]
    if not shipped:
        return None
    return max(shipped, key=lambda w: (w.get("metrics") or {}).get("dice") or 0.0)["tag"]
