"""The Batch widget: segment every image of a folder without blocking napari.

A thin skin over :func:`napari_medseg.engine.batch.run.run_folder_iter`: the form (input and
output folders, file pattern, weights, device, output format) becomes a
:class:`~napari_medseg.config.BatchConfig`; the engine's generator runs in a napari thread
worker (:func:`.worker.start_job`), and each :class:`~napari_medseg.engine.batch.run.FileEvent`
it yields fills one row of the progress table (file, status, time) as it arrives. Cancel
sets the engine's token: the file being predicted stops after its current batch of tiles and
nothing half-written is left. A click on a row opens that image and, once it is finished,
its result (a Labels layer) in the viewer, with the geometry of the files.

Everything numeric happens in the engine; this module only turns values into a config and
events into table rows.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
)
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from ..config import BATCH_FORMATS, BatchConfig
from ..engine.progress import CancelToken, NoticeEvent, ProgressEvent, TilesEvent
from ..errors import ConfigError, MedsegError
from .viewer_state import viewer_state
from .worker import (
    JobOutcome,
    LongJob,
    error_message,
    guard_iter,
    guard_llvm_clash,
    scroll_root,
    show_notice,
    start_job,
)

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["CHECKPOINT_FILE", "COLUMNS", "BatchWidget", "batch_job", "weight_choices"]

#: The weights picker's entry that means "the checkpoint file chosen below".
CHECKPOINT_FILE = "checkpoint file (below)"
#: Columns of the progress table.
COLUMNS = ("file", "status", "time")
#: Rows the progress table shows without scrolling.
MIN_TABLE_ROWS = 5
_STATUS_TEXT = {
    "pending": "waiting", "running": "running", "done": "done", "skipped": "done earlier",
    "failed": "failed", "ignored": "not an image", "cancelled": "cancelled",
}


def weight_choices() -> list[tuple[str, str]]:
    """``(label, tag or path)`` of the installed shipped weights and the user's checkpoints,
    for every network, then the entry for a checkpoint file chosen by hand."""
    from ..models import list_models
    from .session import list_weight_choices

    found: list[tuple[str, str]] = []
    for network in list_models():
        try:
            choices = list_weight_choices(network)
        except Exception:  # noqa: BLE001 - a broken card must not hide the widget
            continue
        for choice in choices:
            if choice.kind != "random" and choice.installed and choice.source:
                found.append((f"{network}: {choice.label}", str(choice.source)))
    found.append((CHECKPOINT_FILE, CHECKPOINT_FILE))
    return found


def _device_choices() -> list[tuple[str, str]]:
    from ..engine.device import list_devices

    out = [("auto (GPU if there is one)", "auto")]
    for dev in list_devices():
        name = dev["name"]
        if name == "cpu":
            out.append((f"CPU ({dev.get('threads', '?')} threads)", "cpu"))
        elif "free_memory_mb" in dev:
            out.append((f"{name} {dev['description']} ({dev['free_memory_mb'] / 1024:.1f} GiB "
                        "free)", name))
        else:
            out.append((f"{name} {dev.get('description', '')}".strip(), name))
    return out


def batch_job(in_dir: str, out_dir: str, config: BatchConfig,
              cancel: CancelToken) -> Generator[ProgressEvent, None, JobOutcome]:
    """Run the batch in a worker thread; errors come back as one sentence, never raised.

    Yields the engine's events; returns a :class:`~.worker.JobOutcome` whose value is the
    :class:`~napari_medseg.engine.batch.run.BatchSummary`.
    """
    from ..engine.batch.run import run_folder_iter

    return (yield from guard_iter(run_folder_iter, in_dir, out_dir, config, cancel=cancel))


def _chosen(path: Any) -> str | None:
    text = str(path or "").strip()
    return None if text in ("", ".") else text


class BatchWidget(QWidget):
    """Dock widget: predict a folder of images, watch the table fill, open any row.

    Attributes:
        viewer: the napari viewer rows open into.
        summary: the last run's :class:`~napari_medseg.engine.batch.run.BatchSummary`.
        table: the progress table (one row per file).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        guard_llvm_clash()  # before the engine imports torch (see the function)
        self.viewer = napari_viewer
        #: the viewer's shared state: the Segment widget's weights are the default here.
        self.state = viewer_state(napari_viewer)
        #: the user chose weights in this widget (the Segment widget's no longer apply).
        self.weights_explicit = False
        self.summary: Any = None
        self._job = LongJob()
        self._rows: dict[str, int] = {}
        self._files: dict[str, tuple[str, str | None, str]] = {}
        self._opened: dict[str, list[Any]] = {}
        self._current: str | None = None
        self._build()

    # -- building ---------------------------------------------------------------------------
    def _build(self) -> None:
        self.input_dir = FileEdit(mode="d", label="Input folder")
        self.output_dir = FileEdit(mode="d", label="Output folder")
        self.pattern = LineEdit(value="*", label="File pattern",
                                tooltip="Glob the file names must match, e.g. *.tif")
        self.recursive = CheckBox(value=False, text="include sub-folders")
        self.weights = ComboBox(label="Weights", choices=weight_choices(),
                                tooltip="Shipped weights, your checkpoints, or a file below")
        self.checkpoint = FileEdit(mode="r", label="Checkpoint",
                                   filter="*.safetensors *.json *.zip")
        self.device = ComboBox(label="Device", choices=_device_choices())
        self.format = ComboBox(label="Save as", choices=list(BATCH_FORMATS), value="tif",
                               tooltip="tif: OME-TIFF, zarr: OME-Zarr, nii: NIfTI (.nii.gz)")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="Files")
        self.status = Label(value="Choose the folders and the weights, then Run.")
        form = Container(widgets=[self.input_dir, self.output_dir, self.pattern, self.recursive,
                                  self.weights, self.checkpoint, self.device, self.format])
        buttons = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal",
                            labels=False)
        bar = Container(widgets=[self.progress])

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels([c.capitalize() for c in COLUMNS])
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for col in range(1, len(COLUMNS)):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        self.table.setToolTip("Click a row to open the image and its result.")

        rows = self.table.verticalHeader().defaultSectionSize()
        self.table.setMinimumHeight(self.table.horizontalHeader().sizeHint().height()
                                    + MIN_TABLE_ROWS * rows + 2 * self.table.frameWidth())

        layout = scroll_root(self, margins=4)
        for part in (form, buttons, bar):
            layout.addWidget(part.native)
        layout.addWidget(self.table, stretch=1)
        layout.addWidget(self.status.native)

        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.weights.changed.connect(self._on_weights_changed)
        self.weights.native.activated.connect(self._on_user_weights)
        self.table.cellClicked.connect(lambda row, _col: self.open_row(row))
        self._on_weights_changed()
        self.state.weights_changed.connect(self.follow_segment)
        self.follow_segment(self.state.weights, self.state.variant)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt override
        """Stop following the Segment widget's weights when the widget closes."""
        self.state.weights_changed.disconnect(self.follow_segment)
        super().closeEvent(event)

    def _on_user_weights(self, *_: Any) -> None:
        """The user picked weights here: the Segment widget's choice no longer moves them."""
        self.weights_explicit = True

    def follow_segment(self, weights: Any, _variant: str = "") -> None:
        """Start on the weights in use in the Segment widget (a fine-tuned checkpoint too),
        until the user picks weights here."""
        source = getattr(weights, "source", None)
        if self.weights_explicit or not source:
            return
        if source not in self.weights.choices:  # a checkpoint made since the list was filled
            self.weights.choices = weight_choices()
        values = list(self.weights.choices)
        if source in values:
            self.weights.value = source
        elif Path(source).is_file():
            self.weights.value = CHECKPOINT_FILE
            self.checkpoint.value = source

    def _on_weights_changed(self, *_: Any) -> None:
        self.checkpoint.enabled = self.weights.value == CHECKPOINT_FILE

    # -- values -> config --------------------------------------------------------------------
    def config(self) -> tuple[str, str, BatchConfig]:
        """``(input folder, output folder, BatchConfig)`` from the form.

        Raises:
            ConfigError: a folder or the checkpoint is not chosen, or a value is invalid.
        """
        in_dir, out_dir = _chosen(self.input_dir.value), _chosen(self.output_dir.value)
        if in_dir is None:
            raise ConfigError("Choose the input folder (the images to segment).")
        if out_dir is None:
            raise ConfigError("Choose the output folder (where the results and run.json go).")
        weights = self.weights.value
        if weights == CHECKPOINT_FILE:
            weights = _chosen(self.checkpoint.value)
            if weights is None or not Path(weights).is_file():
                raise ConfigError("Choose a checkpoint file (.safetensors) or shipped weights.")
        config = BatchConfig.from_mapping({
            "weights": weights, "pattern": self.pattern.value.strip() or "*",
            "recursive": self.recursive.value, "format": self.format.value,
            "device": self.device.value,
        })
        return in_dir, out_dir, config

    # -- running -----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True while a batch runs."""
        return self._job.running

    def run(self, *_: Any) -> Any:
        """Start the batch in a thread worker; returns the worker (None if not started)."""
        if self.running:
            return None
        try:
            in_dir, out_dir, config = self.config()
        except MedsegError as exc:
            self._error(str(exc))
            return None
        self.table.setRowCount(0)
        self._rows.clear()
        self._files.clear()
        self.summary = None
        self.progress.max, self.progress.value = 1, 0
        token = self._job.begin()
        self._set_running(True)
        self.status.value = "Looking for images..."
        self._job.worker = start_job(batch_job, in_dir, out_dir, config, token,
                                     on_done=self._on_done, on_yield=self._on_event,
                                     cancel_token=token)
        return self._job.worker

    def cancel(self, *_: Any) -> None:
        """Stop after the current batch of tiles; finished files are kept and recorded."""
        if self.running and self._job.cancel():
            self.status.value = "Cancelling after the current batch of tiles..."

    def _set_running(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running

    def _on_event(self, event: ProgressEvent) -> None:
        from ..engine.batch.run import FileEvent

        if isinstance(event, FileEvent):
            self._show_file(event)
            self.progress.max = max(1, event.total)
            self.progress.value = min(event.finished, self.progress.max)
            if event.status == "running":
                self._current = event.name
                self.status.value = f"{event.name}: predicting..."
        elif isinstance(event, TilesEvent) and event.total and self._current:
            self.status.value = f"{self._current}: tiles {event.done} of {event.total}"
        elif isinstance(event, NoticeEvent):
            show_notice(event)

    def _show_file(self, event: Any) -> None:
        row = self._rows.get(event.name)
        if row is None:
            row = self.table.rowCount()
            self.table.insertRow(row)
            self._rows[event.name] = row
            item = QTableWidgetItem(event.name)
            item.setToolTip(event.input_path)
            self.table.setItem(row, 0, item)
        self._files[event.name] = (event.input_path, event.output_path, event.status)
        status = QTableWidgetItem(_STATUS_TEXT.get(event.status, event.status))
        if event.error:
            status.setToolTip(event.error)
        self.table.setItem(row, 1, status)
        seconds = "" if event.seconds is None else f"{event.seconds:.1f} s"
        item = QTableWidgetItem(seconds)
        item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
        self.table.setItem(row, 2, item)

    def _on_done(self, outcome: JobOutcome) -> None:
        self._job.end()
        self._set_running(False)
        if not outcome.ok:
            self._error(outcome.error or "The batch run failed.")
            return
        self.summary = outcome.value
        self.status.value = self.summary.line()
        if self.summary.failed:
            show_warning(f"{self.summary.failed} file(s) failed; hover over their status to "
                         f"see why. Details in {self.summary.manifest}.")

    def _error(self, message: str) -> None:
        self.status.value = message
        show_error(message)

    # -- opening rows ------------------------------------------------------------------------
    def row_name(self, row: int) -> str | None:
        """The file name shown in ``row``."""
        item = self.table.item(row, 0)
        return None if item is None else item.text()

    def open_row(self, row: int) -> list[Any]:
        """Open the row's image and, if finished, its result; returns the layers.

        A file opened before whose layers are still in the viewer is not read twice.
        Unreadable files give a notification, never an exception.
        """
        from .reader import read_layers

        name = self.row_name(row)
        if name is None or name not in self._files:
            return []
        in_path, out_path, status = self._files[name]
        if status == "ignored":
            show_info(f"{name} is not an image napari-medseg reads.")
            return []
        paths = [in_path]
        if status in ("done", "skipped") and out_path and Path(out_path).exists():
            paths.append(out_path)
        layers: list[Any] = []
        for path in paths:
            known = [lay for lay in self._opened.get(path, []) if lay in self.viewer.layers]
            if known:
                layers.extend(known)
                continue
            try:
                layer_data = read_layers(path)
            except Exception as exc:  # noqa: BLE001 - a notification, not a traceback
                self._error(error_message(exc))
                continue
            added_here: list[Any] = []
            for data, kwargs, layer_type in layer_data:
                added = getattr(self.viewer, f"add_{layer_type}")(data, **kwargs)
                added_here.extend(added if isinstance(added, list) else [added])
            self._opened[path] = added_here
            layers.extend(added_here)
        if layers:
            self.viewer.layers.selection.active = layers[-1]
        return layers
