"""The Segment widget's session: weights choices, model cache, settings -> config, caches, undo.

One :class:`SegmentSession` belongs to one dock widget (no global state). It holds no Qt or
napari object and does no numeric work of its own: it loads networks (cached), turns the
widget's values (:class:`RunSettings`) into a :class:`~napari_medseg.config.PredictConfig`,
keeps the probabilities of every region a run covered (so a new threshold re-derives the mask
without running the network), remembers measured tile timings for the plan, and keeps the
undo stack of edits (what :mod:`.result_layers` overwrote). Methods that load networks or
touch big arrays are safe to call from a worker thread.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import PredictConfig
from ..engine.inference import postprocess
from ..engine.inference.regions import Region
from ..errors import ConfigError, WeightsNotFoundError

__all__ = [
    "RANDOM_INIT",
    "RANDOM_INIT_CLASSES",
    "WeightsChoice",
    "RunSettings",
    "ProbabilityCache",
    "Edit",
    "SegmentSession",
    "user_checkpoint_dir",
    "list_weight_choices",
    "checkpoint_choice",
]

#: Label of the untrained choice in the weights picker.
RANDOM_INIT = "random init (untrained)"
#: Classes of an untrained network: one sigmoid foreground logit (the threshold applies).
RANDOM_INIT_CLASSES = 1
#: Memory the undo stack may hold before the oldest edits are dropped.
UNDO_BUDGET_BYTES = 1 << 30
#: Edits kept at most.
UNDO_DEPTH = 10


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

    @property
    def untrained(self) -> bool:
        """True for the random-init choice."""
        return self.kind == "random"


def user_checkpoint_dir() -> Path:
    """The folder holding the user's (fine-tuned) checkpoints."""
    from ..resources import user_data_dir

    return user_data_dir() / "checkpoints"


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
                                     card.in_channels, card.num_classes, installed, detail))
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
                str(path), info.in_channels, info.num_classes, True, detail))
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
                         f"Checkpoint {path}")


@dataclass(frozen=True)
class RunSettings:
    """The widget's values for one run (plain data; the widget fills it).

    Attributes:
        weights: the chosen weights.
        variant: the variant for untrained networks.
        device: ``cpu``, ``cuda:N`` or ``mps``.
        tile: tile side, or None for the network's preferred tile.
        overlap: tile overlap fraction.
        blend: merge of overlapping tiles (``gaussian``, ``constant``, ``crop``).
        threshold: foreground threshold (one-class networks).
        tta: flip test-time augmentation.
        show_probabilities: add the probabilities as an Image layer.
        show_variance: add the TTA variance as an Image layer.
        axes: the image's axes (``YX``, ``ZYX``, ``YXC`` ...).
    """

    weights: WeightsChoice
    variant: str
    device: str
    tile: int | None
    overlap: float
    blend: str
    threshold: float
    tta: bool
    show_probabilities: bool
    show_variance: bool
    axes: str

    def outputs(self) -> tuple[str, ...]:
        """The engine outputs this run asks for.

        Probabilities are always kept for a one-class network, so that the threshold can
        be changed afterwards without running it again.
        """
        out = ["mask", "boundary"]
        if self.show_probabilities or self.weights.num_classes == 1:
            out.append("probabilities")
        if self.tta and self.show_variance:
            out.append("variance")
        return tuple(out)

    def config(self) -> PredictConfig:
        """The engine config (through ``from_mapping``, like the CLI and TOML files).

        Raises:
            ConfigError: a value is out of range.
        """
        return PredictConfig.from_mapping({
            "tile": self.tile, "overlap": self.overlap, "blend": self.blend,
            "threshold": self.threshold, "tta": self.tta, "device": self.device,
            "axes": self.axes, "outputs": ",".join(self.outputs()),
        })


@dataclass
class ProbabilityCache:
    """The probabilities of every region runs covered on one image.

    Attributes:
        probs: K x (output shape) float16; zero where nothing ran.
        covered: output regions the probabilities are valid in, oldest first.
        num_classes: K.
        has_boundary_head: the network predicts its own boundary (the threshold then does
            not change the boundary layer).
        axes: axes of the label outputs (the image's without ``C``).
    """

    probs: np.ndarray
    covered: list[Region]
    num_classes: int
    has_boundary_head: bool
    axes: str

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of the label outputs."""
        return tuple(self.probs.shape[1:])


@dataclass
class Edit:
    """One undoable step: the layer changes it made and the cache state before it.

    Attributes:
        label: what the step was (``"run"``, ``"threshold 0.40"`` ...).
        changes: the layer changes (:class:`~.result_layers.LayerChange`), in order.
        image: the image the cache belongs to.
        cache_before: ``(covered regions, [(region, probabilities before)])`` or None.
        cache_created: the step started a new cache for ``image``.
        cache_replaced: the cache that new one replaced (None if there was none).
    """

    label: str
    changes: list[Any] = field(default_factory=list)
    image: str | None = None
    cache_before: tuple[list[Region], list[tuple[Region, np.ndarray]]] | None = None
    cache_created: bool = False
    cache_replaced: ProbabilityCache | None = None

    @property
    def nbytes(self) -> int:
        """Memory held by the snapshots."""
        total = sum(int(getattr(c, "nbytes", 0)) for c in self.changes)
        if self.cache_before is not None:
            total += sum(int(a.nbytes) for _, a in self.cache_before[1])
        if self.cache_replaced is not None:
            total += int(self.cache_replaced.probs.nbytes)
        return total


class SegmentSession:
    """What one Segment widget remembers between runs.

    Args:
        max_models: networks kept loaded (least recently used dropped first).
    """

    def __init__(self, max_models: int = 2) -> None:
        self.max_models = int(max_models)
        self._models: OrderedDict[tuple, Any] = OrderedDict()
        self._load_lock = threading.Lock()
        #: Held while a network runs or is probed (one user of a network at a time).
        self.model_lock = threading.RLock()
        self.caches: dict[str, ProbabilityCache] = {}
        self.history: list[Edit] = []
        self.timings: dict[tuple, float] = {}
        #: image -> the output region of its last run (metrics are computed there).
        self.last_region: dict[str, Region] = {}
        #: image -> K of the network that last segmented it.
        self.num_classes: dict[str, int] = {}
        self.last_plan: Any = None

    # -- networks ---------------------------------------------------------------------
    @staticmethod
    def model_key(choice: WeightsChoice, variant: str, in_channels: int) -> tuple:
        """Cache key of the network a choice loads."""
        if choice.untrained:
            return ("random", choice.network, variant, int(in_channels), RANDOM_INIT_CLASSES)
        return (choice.kind, choice.source)

    def load_model(self, choice: WeightsChoice, variant: str, in_channels: int) -> Any:
        """The network of a weights choice (loaded once, then cached).

        Untrained networks take ``in_channels`` (the image's: 1 or 3) and one sigmoid class;
        they are built from a fixed seed so that repeated runs agree.

        Raises:
            WeightsNotFoundError: a card's weights file is not installed.
            CheckpointError: the weights are corrupt or do not fit the network.
            ModelNotFoundError: an unknown network or variant.
        """
        key = self.model_key(choice, variant, in_channels)
        with self._load_lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
                return model
        model = self._build(choice, variant, in_channels)
        with self._load_lock:
            self._models[key] = model
            self._models.move_to_end(key)
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        return model

    @staticmethod
    def _build(choice: WeightsChoice, variant: str, in_channels: int) -> Any:
        if choice.untrained:
            import torch

            from ..models import create_model

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return create_model(choice.network, variant, int(in_channels),
                                    RANDOM_INIT_CLASSES)
        if choice.kind == "card" and not choice.installed:
            raise WeightsNotFoundError(
                f"The weights of {choice.source!r} are not installed; choose other weights "
                "or random init.")
        from ..engine.checkpoints import load_checkpoint, resolve_weights

        if choice.kind == "checkpoint":
            model, _ = load_checkpoint(str(choice.source))
        else:
            model, _ = resolve_weights(str(choice.source))
        return model

    def cached_models(self) -> list[tuple]:
        """Keys of the loaded networks, least recently used first."""
        return list(self._models)

    # -- timings for the plan -----------------------------------------------------------
    @staticmethod
    def timing_key(choice: WeightsChoice, variant: str, plan: Any) -> tuple:
        """Key of a measured time per tile pass."""
        return (choice.kind, choice.source, choice.network, variant, plan.device,
                plan.precision, tuple(plan.grid.tile), plan.batch_size)

    def remember_timing(self, choice: WeightsChoice, variant: str, plan: Any) -> None:
        """Keep the measured seconds per tile pass of a probed plan."""
        if plan is not None and plan.probed and plan.seconds_per_pass:
            self.timings[self.timing_key(choice, variant, plan)] = float(plan.seconds_per_pass)

    def with_known_timing(self, choice: WeightsChoice, variant: str, plan: Any) -> Any:
        """The plan with a time estimate from an earlier measurement, when one fits."""
        if plan is None or plan.seconds_per_pass is not None:
            return plan
        seconds = self.timings.get(self.timing_key(choice, variant, plan))
        return plan if seconds is None else plan.replace(seconds_per_pass=seconds)

    # -- probabilities cache -------------------------------------------------------------
    def cache_for(self, image: str) -> ProbabilityCache | None:
        """The probability cache of an image, if a run filled one."""
        return self.caches.get(image)

    def update_cache(
        self,
        image: str,
        out_shape: Sequence[int],
        axes: str,
        num_classes: int,
        has_boundary_head: bool,
        region: Region,
        probabilities: np.ndarray,
        keys: Sequence[tuple],
        edit: Edit,
    ) -> None:
        """Store a run's probabilities at ``region`` (output coordinates) of an image.

        Args:
            image: the image layer's name.
            out_shape: the full label-output shape.
            axes: the label outputs' axes.
            num_classes: K.
            has_boundary_head: the network predicts its own boundary.
            region: where the run's outputs go, in output coordinates.
            probabilities: K x region.shape, as the engine returned them.
            keys: the finished parts of the region's arrays (see ``finished_keys``).
            edit: the undo step; the cache's previous state is recorded in it.
        """
        cache = self.caches.get(image)
        out_shape = tuple(int(s) for s in out_shape)
        edit.image = image
        if cache is None or cache.out_shape != out_shape or cache.num_classes != num_classes:
            edit.cache_created = True
            edit.cache_replaced = cache
            cache = ProbabilityCache(
                np.zeros((int(num_classes),) + out_shape, np.float16), [], int(num_classes),
                bool(has_boundary_head), axes)
            self.caches[image] = cache
        else:
            edit.cache_before = (list(cache.covered), [
                (region, cache.probs[(slice(None),) + region.slices].copy())])
        cache.has_boundary_head = bool(has_boundary_head)
        probs = postprocess.dequantize_probabilities(probabilities).astype(np.float16)
        for key in keys:
            target = (slice(None),) + region.offset(key)
            cache.probs[target] = probs[(slice(None),) + tuple(key)]
        if all(isinstance(k, slice) for key in keys for k in key):
            cache.covered.append(region)
        else:
            for key in keys:
                full = region.offset(key)
                start = tuple(k.start if isinstance(k, slice) else k for k in full)
                stop = tuple(k.stop if isinstance(k, slice) else k + 1 for k in full)
                cache.covered.append(Region(start, stop))
        cache.covered = _dedupe(cache.covered)

    def rethreshold(self, image: str, threshold: float) -> list[tuple[tuple, np.ndarray,
                                                                      np.ndarray | None]]:
        """Masks (and derived boundaries) of every covered region at a new threshold.

        Returns:
            ``[(index into the label outputs, mask, boundary or None)]``; the boundary is
            re-derived from the new mask for networks without a boundary head.

        Raises:
            ConfigError: nothing to re-threshold, a multi-class network, or a threshold
                outside (0, 1).
        """
        if not 0.0 < float(threshold) < 1.0:
            raise ConfigError(f"The threshold must be between 0 and 1, not {threshold}.")
        cache = self.caches.get(image)
        if cache is None or not cache.covered:
            raise ConfigError(f"Segment {image!r} first; the threshold applies to its "
                              "probabilities.")
        if cache.num_classes != 1:
            raise ConfigError("This network has several classes; its mask is the most "
                              "probable class, so there is no threshold to change.")
        out = []
        for region in cache.covered:
            probs = cache.probs[(slice(None),) + region.slices].astype(np.float32)
            mask = postprocess.mask_from_probabilities(probs, float(threshold))
            boundary = None
            if not cache.has_boundary_head:
                boundary = postprocess.boundary_per_block(mask, cache.axes)
            out.append((region.slices, mask, boundary))
        return out

    def forget(self, image: str) -> None:
        """Drop what is cached for an image (its layer was removed)."""
        self.caches.pop(image, None)
        self.last_region.pop(image, None)
        self.num_classes.pop(image, None)

    # -- undo -------------------------------------------------------------------------
    def push(self, edit: Edit) -> None:
        """Record an undoable step (oldest steps dropped beyond the depth or memory budget)."""
        if not edit.changes and edit.cache_before is None and not edit.cache_created:
            return
        self.history.append(edit)
        while len(self.history) > UNDO_DEPTH or (
                len(self.history) > 1 and sum(e.nbytes for e in self.history)
                > UNDO_BUDGET_BYTES):
            self.history.pop(0)

    @property
    def can_undo(self) -> bool:
        """True when there is a step to undo."""
        return bool(self.history)

    def pop(self) -> Edit | None:
        """Take the last step off the stack and restore the cache as it was before it.

        The caller restores the layers from ``edit.changes``.
        """
        if not self.history:
            return None
        edit = self.history.pop()
        if edit.image is not None:
            if edit.cache_created:
                if edit.cache_replaced is None:
                    self.caches.pop(edit.image, None)
                else:
                    self.caches[edit.image] = edit.cache_replaced
            elif edit.cache_before is not None and edit.image in self.caches:
                cache = self.caches[edit.image]
                covered, blocks = edit.cache_before
                for region, values in blocks:
                    cache.probs[(slice(None),) + region.slices] = values
                cache.covered = list(covered)
        return edit


def _dedupe(regions: list[Region]) -> list[Region]:
    """Drop regions contained in a later one (a re-run of the same box)."""
    kept: list[Region] = []
    for i, r in enumerate(regions):
        inside = any(
            all(a2 <= a and b <= b2 for a, b, a2, b2 in zip(r.start, r.stop, o.start, o.stop))
            for o in regions[i + 1:])
        if not inside:
            kept.append(r)
    return kept
