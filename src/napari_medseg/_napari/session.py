"""The Segment widget's session: settings -> config, probability caches, timings, undo.

One :class:`SegmentSession` belongs to one dock widget. It holds no Qt or napari object and
does no numeric work of its own: it loads networks through the viewer's shared
:class:`~.viewer_state.ModelCache`, turns the widget's values (:class:`RunSettings`) into a
:class:`~napari_medseg.config.PredictConfig`, keeps the probabilities of every region a run
covered (so a new threshold re-derives the mask without running the network, see
:mod:`napari_medseg.engine.inference.editing`), remembers measured tile timings for the plan,
and keeps the undo stack of edits (what :mod:`.result_layers` overwrote). Methods that load
networks or touch big arrays are safe to call from a worker thread.

The weights choices live in :mod:`.weights_choices` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import PredictConfig
from ..engine.inference.editing import drop_contained, rethreshold_regions, store_probabilities
from ..engine.inference.regions import Region
from ..errors import ConfigError
from .viewer_state import ModelCache
from .weights_choices import (
    RANDOM_INIT,
    RANDOM_INIT_CLASSES,
    WeightsChoice,
    checkpoint_choice,
    list_weight_choices,
    user_checkpoint_dir,
)

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

#: Memory the undo stack may hold before the oldest edits are dropped.
UNDO_BUDGET_BYTES = 1 << 30
#: Largest label output whose prediction is remembered to tell the user's painting apart.
PREDICTED_BUDGET_BYTES = 512 << 20
#: Edits kept at most.
UNDO_DEPTH = 10


@dataclass(frozen=True)
class RunSettings:
    """The widget's values for one run (plain data; the widget fills it).

    Attributes:
        weights: the chosen weights.
        variant: the variant for untrained networks.
        device: ``cpu``, ``cuda:N`` or ``mps``.
        tile: tile side, or None for the weights' recorded tile (else the network's
            preferred tile).
        overlap: tile overlap fraction.
        blend: merge of overlapping tiles (``gaussian``, ``constant``, ``crop``).
        threshold: foreground threshold (one-class networks).
        tta: flip test-time augmentation.
        show_probabilities: add the probabilities as an Image layer.
        show_variance: add the TTA variance as an Image layer.
        axes: the image's axes (``YX``, ``ZYX``, ``YXC`` ...).
        super_resolved: a super-resolution network's outputs at its own scale (2x).
        diameter: the objects' diameter in pixels, or None to estimate it (weights that
            learnt objects).
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
    super_resolved: bool = False
    diameter: float | None = None

    def outputs(self) -> tuple[str, ...]:
        """The engine outputs this run asks for.

        Probabilities are always kept for a one-class network, so that the threshold can
        be changed afterwards without running it again; weights of the instance task also
        give their objects (``instances``).
        """
        out = ["mask", "boundary"]
        if self.weights.instances:  # weights that learnt objects give them on every run
            out.append("instances")
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
            "super_resolved": self.super_resolved, "diameter": self.diameter,
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
    #: mask pixels the user had painted over the network's last prediction, found by a run.
    painted: int = 0
    #: a run kept those pixels (else it replaced them).
    kept_painted: bool = False
    #: ``(image, output, key, what SegmentSession.predicted held there or None)`` per write.
    predicted_before: list[tuple[str, str, tuple, np.ndarray | None]] = field(
        default_factory=list)

    @property
    def nbytes(self) -> int:
        """Memory held by the snapshots."""
        total = sum(int(getattr(c, "nbytes", 0)) for c in self.changes)
        if self.cache_before is not None:
            total += sum(int(a.nbytes) for _, a in self.cache_before[1])
        if self.cache_replaced is not None:
            total += int(self.cache_replaced.probs.nbytes)
        total += sum(int(b.nbytes) for *_, b in self.predicted_before if b is not None)
        return total


class SegmentSession:
    """What one Segment widget remembers between runs.

    Args:
        max_models: networks kept loaded (least recently used dropped first).
    """

    def __init__(self, max_models: int = 2, models: ModelCache | None = None) -> None:
        #: the loaded networks (the viewer's shared cache, or a private one).
        self.models = models if models is not None else ModelCache(max_models)
        #: Held while a network runs or is probed (one user of a network at a time).
        self.model_lock = self.models.model_lock
        self.caches: dict[str, ProbabilityCache] = {}
        self.history: list[Edit] = []
        self.timings: dict[tuple, float] = {}
        #: image -> the output region of its last run (metrics are computed there).
        self.last_region: dict[str, Region] = {}
        #: image -> K of the network that last segmented it.
        self.num_classes: dict[str, int] = {}
        self.last_plan: Any = None
        #: (image, label output) -> what the network last wrote there, to tell the user's
        #: painting from the prediction (outputs over PREDICTED_BUDGET_BYTES are not kept).
        self.predicted: dict[tuple[str, str], np.ndarray] = {}

    # -- networks ---------------------------------------------------------------------
    def load_model(self, choice: WeightsChoice, variant: str, in_channels: int) -> Any:
        """The network of a weights choice (see :meth:`.viewer_state.ModelCache.load_model`)."""
        return self.models.load_model(choice, variant, in_channels)

    def cached_models(self) -> list[tuple]:
        """Keys of the loaded networks, least recently used first."""
        return self.models.cached_models()

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
        cache.covered = drop_contained(
            cache.covered + store_probabilities(cache.probs, region, probabilities, keys))

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
        return rethreshold_regions(cache.probs, cache.covered, threshold, cache.axes,
                                   derive_boundary=not cache.has_boundary_head)

    def remember_prediction(self, image: str, output: str, shape: tuple[int, ...], key: tuple,
                            values: np.ndarray, edit: Edit | None = None) -> None:
        """Record what a step wrote at ``key`` of a label output (of ``shape``); ``edit``
        keeps what was recorded there before, so that undoing the step restores it."""
        snap = self.predicted.get((image, output))
        before = None
        if snap is None or snap.shape != tuple(shape) or snap.dtype != values.dtype:
            if int(np.prod(shape)) * values.itemsize > PREDICTED_BUDGET_BYTES:
                self.predicted.pop((image, output), None)
                return
            snap = self.predicted[(image, output)] = np.zeros(shape, values.dtype)
        elif edit is not None:
            before = snap[key].copy()
        if edit is not None:
            edit.predicted_before.append((image, output, key, before))
        snap[key] = values

    def painted_pixels(self, image: str, output: str, data: Any, key: tuple) -> np.ndarray | None:
        """Where the layer data at ``key`` differ from what the network wrote there (the
        user's painting), or None when the prediction is not known."""
        snap = self.predicted.get((image, output))
        if snap is None or snap.shape != tuple(np.shape(data)):
            return None
        return np.asarray(data[key]) != snap[key]

    def forget(self, image: str) -> None:
        """Drop what is cached for an image (its layer was removed)."""
        for known in [k for k in self.predicted if k[0] == image]:
            del self.predicted[known]
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
        for image, output, key, before in reversed(edit.predicted_before):
            snap = self.predicted.get((image, output))
            if before is None:  # the step started the record
                self.predicted.pop((image, output), None)
            elif snap is not None:
                snap[key] = before
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

