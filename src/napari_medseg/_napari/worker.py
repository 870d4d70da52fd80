"""Thread-worker glue: engine jobs in napari thread workers, cancellable progress, messages.

Also what the dock widgets (Segment, Fine-tune, Batch) share around their jobs: the one long
job a widget runs at a time (:class:`LongJob`), notices and error lines shown to the user
(:func:`show_notice`, :func:`error_html`), following the viewer's layer list
(:class:`LayerListMixin`) and the small layout helpers of their forms (:func:`form_layout`,
:func:`row_widget`).

Every job the Segment widget starts (a prediction, a plan, a re-threshold, metrics, boundary
tools) runs in a napari ``thread_worker`` through :func:`start_job`; the numeric ones are
engine functions called through :func:`guarded`. Jobs never raise into
Qt: each returns a :class:`JobOutcome` carrying either its value or one sentence for the
user (:func:`error_message`), so the widget shows a notification instead of napari's
"error in thread" traceback dialog.

A prediction is a generator worker (:class:`CancellableWorker`) whose ``quit()`` -- called by
napari's status-bar task cancel or when the viewer closes -- sets the engine's
:class:`~napari_medseg.engine.progress.CancelToken` instead of aborting the generator, so the
engine stops after the current batch and *returns* what it finished. :class:`RunProgress` is
napari's cancellable progress bar (activity dock), wired to the same token.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from napari.qt.threading import FunctionWorker, GeneratorWorker, create_worker
from napari.utils.notifications import show_info, show_warning
from napari.utils.progress import cancelable_progress
from qtpy.QtCore import QSize, Qt, QTimer
from qtpy.QtWidgets import (
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from ..engine.progress import CancelToken, NoticeEvent, ProgressEvent, StageEvent
from ..errors import MedsegError

__all__ = [
    "guard_llvm_clash",
    "JobOutcome",
    "RunResult",
    "error_message",
    "CancellableWorker",
    "RunProgress",
    "start_job",
    "guard_iter",
    "LongJob",
    "LayerListMixin",
    "show_notice",
    "error_html",
    "form_layout",
    "row_widget",
    "scroll_root",
    "catalog_job",
    "run_job",
    "plan_job",
    "guarded",
]


def guard_llvm_clash() -> bool:
    """Keep Triton from loading into a process whose OpenGL driver already loaded LLVM.

    Mesa's software renderer (llvmpipe, used under Xvfb, in VMs and on machines without a
    GPU driver) maps its own libLLVM when napari creates its canvas. Triton's extension,
    which CUDA builds of torch import through ``torch._dynamo`` (timm -> torchvision), bundles
    another LLVM, and loading it afterwards crashes the process (a segmentation fault in
    LLVM's static initialisers). The plugin never compiles with Triton, so when libLLVM is
    already mapped and Triton is not yet loaded, Triton is marked unavailable
    (``sys.modules["triton"] = None``: torch then reports it missing).

    Returns:
        True when Triton was blocked.
    """
    if "triton" in sys.modules or not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            mapped = fh.read()
    except OSError:
        return False
    if "libLLVM" not in mapped:
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True


@dataclass(frozen=True)
class JobOutcome:
    """What a job returned: a value, or a sentence saying why it failed.

    Attributes:
        value: the job's result (None on error).
        error: one sentence for a notification, or None.
        exception: the exception behind ``error`` (for logs and tests).
        seconds: wall time of the job.
    """

    value: Any = None
    error: str | None = None
    exception: BaseException | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the job succeeded."""
        return self.error is None


@dataclass(frozen=True)
class RunResult:
    """The value of a prediction job.

    Attributes:
        result: the engine's ``PredictionResult``.
        spec: the network's ``ModelSpec``.
    """

    result: Any
    spec: Any


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text


def error_message(exc: BaseException) -> str:
    """One sentence a person can act on, for any exception a job met.

    Project errors carry their own sentence; out-of-memory errors get advice; anything else
    is named in one line (never a traceback).
    """
    if isinstance(exc, MedsegError) and str(exc).strip():
        text = str(exc).strip()
    elif _is_out_of_memory(exc):
        text = ("Out of memory: choose a smaller tile, turn TTA off, segment the current slice "
                "or pick the CPU.")
    else:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        text = f"Unexpected {type(exc).__name__}" + (f": {detail}" if detail else "") + "."
    text = text.splitlines()[0]
    return text if len(text) <= 300 else text[:297] + "..."


class CancellableWorker(GeneratorWorker):
    """A generator worker whose ``quit()`` cancels the engine's token (keeps the result).

    Attributes:
        cancel_token: the token the running engine generator checks between batches.
    """

    cancel_token: CancelToken | None = None

    def quit(self) -> None:  # noqa: D102 - documented on the class
        if self.cancel_token is not None:
            self.cancel_token.cancel()
        else:
            super().quit()


class RunProgress(cancelable_progress):
    """napari's cancellable progress bar whose Cancel button cancels at once.

    (``cancelable_progress`` calls its callback only when it wraps an iterable; here the bar
    is driven by the engine's events.)
    """

    def cancel(self) -> None:  # noqa: D102
        super().cancel()
        if self.cancel_callback is not None:
            self.cancel_callback()

    def set_done(self, done: int, total: int) -> None:
        """Show ``done`` of ``total`` steps."""
        if total and total != self.total:
            self.total = total
        step = int(done) - int(self.n)
        if step:
            self.update(step)


def start_job(
    func: Callable[..., Any],
    *args: Any,
    on_done: Callable[[JobOutcome], None],
    on_yield: Callable[[Any], None] | None = None,
    on_finished: Callable[[], None] | None = None,
    cancel_token: CancelToken | None = None,
    **kwargs: Any,
) -> FunctionWorker | GeneratorWorker:
    """Run a job in a napari thread worker.

    Args:
        func: a function or generator function returning a :class:`JobOutcome`.
        *args: its arguments.
        on_done: called (main thread) with the outcome.
        on_yield: called (main thread) with each yielded event (generator jobs).
        on_finished: called (main thread) when the worker has finished, after ``on_done``
            (connected before the thread starts, so it cannot be missed).
        cancel_token: the token ``worker.quit()`` sets (generator jobs).
        **kwargs: its keyword arguments.

    Returns:
        The started worker.
    """
    is_gen = inspect.isgeneratorfunction(func)
    worker = create_worker(func, *args, _start_thread=False, _ignore_errors=True,
                           _worker_class=CancellableWorker if is_gen else FunctionWorker,
                           **kwargs)
    if is_gen:
        worker.cancel_token = cancel_token
        if on_yield is not None:
            worker.yielded.connect(on_yield)
    worker.returned.connect(on_done)
    if on_finished is not None:
        worker.finished.connect(on_finished)
    worker.start()
    return worker


def _failed(exc: BaseException, t0: float) -> JobOutcome:
    return JobOutcome(error=error_message(exc), exception=exc, seconds=time.perf_counter() - t0)


def guarded(func: Callable[..., Any], *args: Any, **kwargs: Any) -> JobOutcome:
    """Call ``func``; its value or the error it raised comes back as a :class:`JobOutcome`
    (never raised). Jobs that are plain engine calls run as ``start_job(guarded, func, ...)``.
    """
    t0 = time.perf_counter()
    try:
        value = func(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - turned into a sentence for the user
        return _failed(exc, t0)
    return JobOutcome(value=value, seconds=time.perf_counter() - t0)


def guard_iter(func: Callable[..., Generator[Any, None, Any]], *args: Any,
               **kwargs: Any) -> Generator[Any, None, JobOutcome]:
    """Run a generator function, passing on what it yields; its return value or the error
    it raised comes back as a :class:`JobOutcome` (never raised).

    A job that is a generator function delegates to it: ``return (yield from guard_iter(...))``.
    """
    t0 = time.perf_counter()
    try:
        value = yield from func(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - turned into a sentence for the user
        return _failed(exc, t0)
    return JobOutcome(value=value, seconds=time.perf_counter() - t0)


# --- what the dock widgets share (main thread) ------------------------------------------


class LongJob:
    """The one cancellable long job of a dock widget (a prediction, a fine-tuning, a batch).

    Attributes:
        worker: its thread worker while it runs, else None.
        token: the cancel token it checks, else None.
        context: what the widget needs when it ends (set by :meth:`begin`).
    """

    def __init__(self) -> None:
        self.worker: Any = None
        self.token: CancelToken | None = None
        self.context: Any = None

    @property
    def running(self) -> bool:
        """True while the job runs."""
        return self.worker is not None

    def begin(self, context: Any = None) -> CancelToken:
        """A fresh cancel token for the job about to start (its worker is set after)."""
        self.token = CancelToken()
        self.context = context
        return self.token

    def toggle(self, start: Callable[[], Any], stop: Callable[[], Any]) -> None:
        """The Run/Stop button: ``stop()`` while the job runs, else ``start()``."""
        if self.running:
            stop()
        else:
            start()

    def cancel(self) -> bool:
        """Cancel the job (it stops after its current step); False when there is none."""
        if self.token is None:
            return False
        self.token.cancel()
        return True

    def end(self) -> Any:
        """Forget the finished job's worker, token and context; returns the context."""
        context = self.context
        self.worker = self.token = self.context = None
        return context


class LayerListMixin:
    """Keeps a dock widget's layer pickers in step with the viewer's layer list.

    The widget provides ``viewer`` and ``_refresh_layers``; it connects the pairs of
    :meth:`_layer_hooks` (and may disconnect them when it closes).
    """

    viewer: Any
    _refresh_layers: Callable[..., None]

    def _layer_hooks(self) -> list[tuple[Any, Callable[..., Any]]]:
        """``(event emitter, callback)`` pairs that follow the layer list and names."""
        layers = self.viewer.layers.events
        pairs = [(layers.inserted, self._on_layer_inserted),
                 (layers.removed, self._on_layer_removed),
                 (layers.moved, self._refresh_layers)]
        pairs += [(layer.events.name, self._refresh_layers) for layer in self.viewer.layers]
        return pairs

    def _on_layer_inserted(self, event: Any) -> None:
        event.value.events.name.connect(self._refresh_layers)
        self._refresh_layers()

    def _on_layer_removed(self, event: Any) -> None:
        self._refresh_layers()


#: The engine notices already shown as notifications in this session.
_NOTICES_SHOWN: set[str] = set()


def show_notice(event: NoticeEvent, label: QLabel | None = None) -> None:
    """Show an engine notice in ``label`` (if given) and, the first time in this session
    that it says this, as a napari notification (a notice on every run is noise)."""
    if label is not None:
        label.setText(event.message)
    if event.message in _NOTICES_SHOWN:
        return
    _NOTICES_SHOWN.add(event.message)
    (show_warning if event.level == "warning" else show_info)(event.message)


def error_html(message: Any) -> str:
    """An error line for a status label (red)."""
    return f"<span style='color:#ff6060'>{message}</span>"


def form_layout() -> QFormLayout:
    """The compact form layout of the docks' group boxes."""
    form = QFormLayout()
    form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    form.setLabelAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
    form.setContentsMargins(4, 4, 4, 4)
    form.setVerticalSpacing(4)
    return form


def row_widget(*widgets: QWidget, stretch: int | None = None) -> QWidget:
    """``widgets`` side by side in one widget (then a stretch of ``stretch``, if given)."""
    box = QWidget()
    lay = QHBoxLayout(box)
    lay.setContentsMargins(0, 0, 0, 0)
    lay.setSpacing(4)
    for w in widgets:
        lay.addWidget(w)
    if stretch is not None:
        lay.addStretch(stretch)
    return box


# --- jobs (run in worker threads) -------------------------------------------------------


def _prewarm_layer_imports() -> None:
    """Import, off the GUI thread, what napari imports lazily when it builds a layer.

    napari imports pandas the first time a layer's features table is built (about 0.7 s on
    a 2-core CPU); done here, the GUI thread does not pay for it when the results arrive.
    """
    import importlib

    for name in ("pandas",):
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except ImportError:  # pragma: no cover - napari itself needs it
                pass


def catalog_job() -> JobOutcome:
    """The registered networks with their variants, and the devices (imports torch).

    Returns:
        An outcome whose value is ``({network: [variants]}, list_devices())``.
    """

    def work():
        from ..engine.device import list_devices
        from ..models import list_models, list_variants

        return {name: list_variants(name) for name in list_models()}, list_devices()

    return guarded(work)


def run_job(session: Any, choice: Any, variant: str, in_channels: int, image: Any,
            config: Any, cancel: CancelToken, meta: Any = None
            ) -> Generator[ProgressEvent, None, JobOutcome]:
    """Load the network and predict ``image``, yielding the engine's events.

    Args:
        session: the widget's :class:`~.session.SegmentSession`.
        choice: the :class:`~.session.WeightsChoice`.
        variant: the variant of an untrained network.
        in_channels: the image's channels (for an untrained network).
        image: the region of the image to predict (numpy, dask or zarr).
        config: the :class:`~napari_medseg.config.PredictConfig`.
        cancel: the token the engine checks between batches.
        meta: the layer's axes and pixel size (``result_layers.pixel_meta``), or None: a
            pixel size other than the weights' resamples each plane to theirs.
    """
    from ..engine.inference.pipeline import predict_iter

    def work():
        yield StageEvent(message="Loading the network.", stage="loading")
        _prewarm_layer_imports()
        model = session.load_model(choice, variant, in_channels)
        with session.model_lock:
            result = yield from predict_iter(image, model, config, meta=meta, cancel=cancel)
        return RunResult(result, model.spec)

    return (yield from guard_iter(work))


def plan_job(session: Any, choice: Any, variant: str, in_channels: int, image: Any,
             config: Any, probe: bool = False, meta: Any = None) -> JobOutcome:
    """The tile plan of a run (``probe`` runs one batch to measure time and memory).

    Returns:
        An outcome whose value is ``(plan, spec)``.
    """

    def work():
        from ..engine.inference.planning import plan_prediction

        model = session.load_model(choice, variant, in_channels)
        with session.model_lock:
            plan = plan_prediction(image, model, config, meta=meta, probe=probe)
        return plan, model.spec

    return guarded(work)


#: The height a dock's scroll area asks for at most (docks stacked share a column).
DOCK_HINT_HEIGHT = 320


class _DockScroll(QScrollArea):
    """A vertical scroll area as wide as its body: only the height scrolls."""

    def _with_bar(self, size: QSize) -> QSize:
        bar = self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()
        return QSize(size.width() + bar, size.height())

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt override
        body = self.widget()
        if body is None:
            return super().sizeHint()
        size = self._with_bar(body.sizeHint())
        # docks stacked in one column share its height about evenly, not by body length
        return QSize(size.width(), min(size.height(), DOCK_HINT_HEIGHT))

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt override
        body = self.widget()
        if body is None:
            return super().minimumSizeHint()
        return QSize(self._with_bar(body.minimumSizeHint()).width(), self.minimumHeight())

    def showEvent(self, event: Any) -> None:  # noqa: N802 - Qt override
        super().showEvent(event)
        if not getattr(self, "_shared", False):  # once: later, heights are the user's
            self._shared = True
            QTimer.singleShot(0, self.share_column)

    def share_column(self) -> None:
        """Give the plugin's docks stacked in one column equal heights (Qt gives a new
        dock what it asks and squeezes the others to their minimum)."""
        from qtpy.QtWidgets import QDockWidget, QMainWindow

        dock = self.parentWidget()
        while dock is not None and not isinstance(dock, QDockWidget):
            dock = dock.parentWidget()
        main = dock.parentWidget() if dock is not None else None
        if not isinstance(main, QMainWindow) or dock.isFloating():
            return
        area = main.dockWidgetArea(dock)
        docks = [d for d in main.findChildren(QDockWidget)
                 if d.isVisible() and not d.isFloating() and main.dockWidgetArea(d) == area
                 and d.findChild(_DockScroll) is not None]
        if len(docks) > 1:
            height = sum(d.height() for d in docks) // len(docks)
            main.resizeDocks(docks, [height] * len(docks), Qt.Orientation.Vertical)


def scroll_root(widget: QWidget, margins: int = 6) -> QVBoxLayout:
    """Give a dock widget a scrolling body and return the body's layout.

    Docked together the three widgets are taller than a 1000-pixel screen; in a scroll area
    each can be made as short as its dock allows, the rest scrolls, and the window keeps
    its size. The width stays the body's (nothing is cut off at the side).
    """
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    area = _DockScroll()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setMinimumHeight(120)
    body = QWidget()
    area.setWidget(body)
    outer.addWidget(area)
    root = QVBoxLayout(body)
    root.setContentsMargins(margins, margins, margins, margins)
    widget.scroll_area = area
    return root
