"""Typed progress events of long operations, and the token that cancels them.

Long operations are generators (``predict_iter``, ``finetune_iter``, ...): they yield these
events, check a :class:`CancelToken` between units of work, and *return* their result, so a
caller writes either::

    result = yield from predict_iter(image, model, config)   # inside another generator

or drains it and takes the result from the last event, a :class:`FinishedEvent`::

    for event in predict_iter(image, model, config):
        if isinstance(event, TilesEvent):
            bar.update(...)
    result = event.result

The napari widgets run the same generators in a ``thread_worker`` (the return value arrives as
the worker's ``returned`` signal); the CLI prints the events with a progress bar. Events are
plain frozen dataclasses: safe to pass between threads, never holding a GUI object.
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import CancelledError

T = TypeVar("T")

__all__ = [
    "CancelToken",
    "ProgressEvent",
    "StageEvent",
    "NoticeEvent",
    "PlanEvent",
    "TilesEvent",
    "PlaneEvent",
    "CancelledEvent",
    "FinishedEvent",
    "drain",
]


class CancelToken:
    """A thread-safe flag a GUI or signal handler sets and a long operation checks.

    The operation checks it between units of work (batches of tiles), stops there, and keeps
    what it finished.
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the operation to stop at its next check."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        """Raise :class:`~napari_medseg.errors.CancelledError` if cancelled."""
        if self._event.is_set():
            raise CancelledError("The operation was cancelled.")


@dataclass(frozen=True)
class ProgressEvent:
    """Base of every event; ``message`` is a line a person can read."""

    message: str = ""


@dataclass(frozen=True)
class StageEvent(ProgressEvent):
    """A new stage begins (``"normalizing"``, ``"predicting"``, ``"instances"``...).

    Attributes:
        stage: short machine-readable name of the stage.
    """

    stage: str = ""


@dataclass(frozen=True)
class NoticeEvent(ProgressEvent):
    """Something the user must see: a fallback, a conversion, a guess, a cost.

    Attributes:
        level: ``"info"`` or ``"warning"``.
    """

    level: str = "info"


@dataclass(frozen=True)
class PlanEvent(ProgressEvent):
    """The tile plan; sent before the first batch, and again once the probe timed a batch.

    Attributes:
        plan: a :class:`napari_medseg.engine.inference.plan.TilePlan`.
        probed: True when ``plan`` carries the measured time and memory of one batch.
    """

    plan: Any = None
    probed: bool = False


@dataclass(frozen=True)
class TilesEvent(ProgressEvent):
    """A batch of tiles finished.

    Attributes:
        done: forward passes done so far in this run (tiles x TTA flips).
        total: forward passes of the whole run.
        plane: index of the slice being predicted (0 for a 2D image).
        planes: number of slices.
        elapsed_s: seconds since the run started.
        eta_s: estimated seconds left, or None before the first batch.
    """

    done: int = 0
    total: int = 0
    plane: int = 0
    planes: int = 1
    elapsed_s: float = 0.0
    eta_s: float | None = None


@dataclass(frozen=True)
class PlaneEvent(ProgressEvent):
    """A slice (or the whole 2D image) is finished and written.

    Attributes:
        plane: its index.
        planes: number of slices.
        skipped: True when it was already finished in a resumed store.
    """

    plane: int = 0
    planes: int = 1
    skipped: bool = False


@dataclass(frozen=True)
class CancelledEvent(ProgressEvent):
    """The run stopped on request; the result keeps what was finished.

    Attributes:
        planes_done: slices finished before the stop.
    """

    planes_done: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class FinishedEvent(ProgressEvent):
    """The last event of a run; carries the value the generator returns.

    Attributes:
        result: the operation's result (``PredictionResult`` for prediction).
    """

    result: Any = None


def drain(gen: Generator[Any, Any, T]) -> T:
    """Run a progress generator to its end, ignoring the events, and return its result.

    Every long engine operation is a generator (``predict_iter``, ``train_iter``,
    ``finetune_iter``, ``run_folder_iter`` ...); its plain counterpart is ``drain`` of it.
    """
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
