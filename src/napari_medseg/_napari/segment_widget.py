"""The Segment dock widget: pick a network, run it on a layer, edit masks and boundary maps.

A thin skin over the engine. The widget gathers its values into a
:class:`~.session.RunSettings` (which builds the engine's ``PredictConfig``), computes the
region to segment from the viewer (current slice, visible region or whole image, see
:mod:`napari_medseg.engine.inference.regions`), and runs the engine's ``predict_iter`` generator in a
napari thread worker (:mod:`.worker`) with napari's cancellable progress bar. The results
become layers in :mod:`.result_layers`; the session keeps probabilities (so the threshold
re-derives masks without running the network), measured timings (for the plan) and the
undo stack (a user's edits are copied before anything overwrites them).

Everything slow -- loading a network, the tile plan, predictions, re-thresholding, boundary
tools, metrics -- runs off the GUI thread; the GUI thread only copies finished arrays into
layers.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGroupBox,
    QHeaderView,
    QLabel,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)
from superqt import QLabeledDoubleSlider

from ..config import BLEND_MODES, TilingConfig
from ..engine.inference.plan import format_seconds
from ..engine.progress import NoticeEvent, PlaneEvent, PlanEvent, StageEvent, TilesEvent
from ..engine.inference.regions import Region, plane_region, visible_region, whole_region
from ..errors import ConfigError, MedsegError
from . import result_layers
from .session import (
    RunSettings,
    SegmentSession,
    WeightsChoice,
    checkpoint_choice,
    list_weight_choices,
)
from .worker import (
    JobOutcome,
    LayerListMixin,
    LongJob,
    RunProgress,
    boundary_job,
    catalog_job,
    error_html,
    form_layout,
    guard_llvm_clash,
    instances_job,
    metrics_job,
    plan_job,
    row_widget,
    run_job,
    show_notice,
    start_job,
    threshold_job,
)

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["SegmentWidget", "SCOPES"]

#: Scope key -> label in the picker.
SCOPES = {
    "slice": "current slice",
    "visible": "visible region",
    "whole": "whole image",
}
_UNTRAINED_TEXT = (
    "⚠ Untrained network: random weights give meaningless masks. Use it to try the "
    "pipeline, or fine-tune it first.")
_NONE = "(none)"


class _DeviceCombo(QComboBox):
    """Devices with their free memory, refreshed each time the list opens."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ready = False

    def refresh(self, devices: list[dict] | None = None) -> None:
        """Show ``devices`` (from ``engine.device.list_devices``), or re-read them.

        Re-reading needs torch; before the first list arrives (read in a worker when the
        widget opens) nothing is re-read.
        """
        if devices is None:
            if not self.ready:
                return
            from ..engine.device import list_devices

            devices = list_devices()
        self.ready = True
        current = self.currentData()
        self.blockSignals(True)
        self.clear()
        for dev in devices:
            name = dev["name"]
            if name == "cpu":
                text = f"CPU ({dev.get('threads', '?')} threads)"
            elif "free_memory_mb" in dev:
                text = (f"{name}  {dev['description']}  "
                        f"{dev['free_memory_mb'] / 1024:.1f} of "
                        f"{dev['total_memory_mb'] / 1024:.1f} GiB free")
            else:
                text = f"{name}  {dev.get('description', '')}".strip()
            self.addItem(text, name)
            self.setItemData(self.count() - 1, text, Qt.ItemDataRole.ToolTipRole)
        names = [d["name"] for d in devices]
        if current in names:
            self.setCurrentIndex(names.index(current))
        else:  # a GPU first, if there is one
            gpu = next((i for i, n in enumerate(names) if n != "cpu"), 0)
            self.setCurrentIndex(gpu)
        self.blockSignals(False)

    def showPopup(self) -> None:  # noqa: N802 - Qt override
        self.refresh()
        super().showPopup()


class SegmentWidget(LayerListMixin, QWidget):
    """Dock widget running a segmentation network on an image layer.

    Args:
        napari_viewer: the viewer it is docked in (injected by napari).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        guard_llvm_clash()  # before the networks import torch._dynamo (see the function)
        self.viewer = napari_viewer
        self.session = SegmentSession()
        self._workers: set[Any] = set()
        #: the prediction; its context is (image name, settings, region).
        self._job = LongJob()
        self._catalog: dict[str, list[str]] = {}
        self._ready = False
        self._warned_untrained: set[tuple[str, str]] = set()
        self.last_metrics: dict[int, dict[str, float]] | None = None
        self._progress: RunProgress | None = None
        self._plan_generation = 0
        self._plan: tuple[Any, Region, str] | None = None
        self._draw_after_plan = False
        self._threshold_busy = False
        self._threshold_pending = False
        self._metrics_generation = 0
        self.last_outcome: JobOutcome | None = None
        #: (layer steps, layers added so far, run context, outcome) while a finished run's
        #: new output layers are added one per event-loop turn.
        self._staging: tuple | None = None
        result_layers.prewarm_layer_code()
        self.last_error: str | None = None
        self._build()
        self._plan_timer = QTimer(self)
        self._plan_timer.setSingleShot(True)
        self._plan_timer.setInterval(300)
        self._plan_timer.timeout.connect(self._update_plan)
        self._threshold_timer = QTimer(self)
        self._threshold_timer.setSingleShot(True)
        self._threshold_timer.setInterval(150)
        self._threshold_timer.timeout.connect(self._apply_threshold)
        self._connect()
        self._refresh_layers()
        self.plan_label.setText("Loading the networks…")
        # Importing the networks (torch, timm) takes seconds: done in a worker, so that
        # opening the widget does not freeze the viewer.
        self._start(catalog_job, on_done=self._on_catalog)

    def _on_catalog(self, outcome: JobOutcome) -> None:
        if not outcome.ok:
            self.plan_label.setText(error_html(outcome.error))
            self._error(outcome.error or "The networks could not be loaded.")
            return
        networks, devices = outcome.value
        self._catalog = networks
        self.device_combo.refresh(devices)
        self.network_combo.blockSignals(True)
        self.network_combo.clear()
        self.network_combo.addItems(list(networks))
        # Start on a network with trained weights installed, if there is one.
        trained = next((n for n in networks if any(
            c.installed and not c.untrained for c in list_weight_choices(n))), None)
        if trained is not None:
            self.network_combo.setCurrentText(trained)
        self.network_combo.blockSignals(False)
        self._ready = True
        self._on_network_changed()
        self._update_enabled()
        self._schedule_plan()

    @property
    def ready(self) -> bool:
        """True once the networks and devices are listed."""
        return self._ready

    # ------------------------------------------------------------------ UI ----------
    def _build(self) -> None:
        root = QVBoxLayout(self)
        root.setContentsMargins(6, 6, 6, 6)
        root.setSpacing(6)

        # Model
        model_box = QGroupBox("Model")
        form = form_layout()
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The image layer to segment.")
        form.addRow("Image", self.image_combo)
        self.network_combo = QComboBox()
        self.network_combo.setToolTip("The network architecture (each has a model card).")
        self.variant_combo = QComboBox()
        self.variant_combo.setToolTip(
            "Size of the network: tiny (tests), lite (CPU-friendly), paper (published). "
            "Fixed by trained weights.")
        self.network_combo.setMinimumContentsLength(10)
        self.network_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        network_row = row_widget(self.network_combo, QLabel("variant"), self.variant_combo)
        network_row.layout().setStretch(0, 3)
        network_row.layout().setStretch(2, 2)
        form.addRow("Network", network_row)
        self.weights_combo = QComboBox()
        self.weights_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.weights_combo.setMinimumContentsLength(12)
        self.weights_combo.setToolTip("Shipped weights (model cards), your fine-tuned "
                                      "checkpoints, or an untrained network.")
        self.browse_button = QToolButton()
        self.browse_button.setText("…")
        self.browse_button.setToolTip("Add a checkpoint file (.safetensors or .json).")
        form.addRow("Weights", row_widget(self.weights_combo, self.browse_button))
        self.untrained_label = QLabel(_UNTRAINED_TEXT)
        self.untrained_label.setWordWrap(True)
        self.untrained_label.setStyleSheet(
            "color: #ffb000; font-weight: bold; border: 1px solid #ffb000; padding: 3px;")
        form.addRow(self.untrained_label)
        self.device_combo = _DeviceCombo()
        self.device_combo.setToolTip("Where the network runs; GPUs show their free memory.")
        form.addRow("Device", self.device_combo)
        model_box.setLayout(form)
        root.addWidget(model_box)

        # Run settings
        run_box = QGroupBox("Run")
        form = form_layout()
        self.scope_combo = QComboBox()
        for key, text in SCOPES.items():
            self.scope_combo.addItem(text, key)
        self.scope_combo.setCurrentIndex(2)
        self.scope_combo.setToolTip(
            "What to segment: the slice on screen, the part of it visible on the canvas, "
            "or everything. Results of several runs accumulate in the same layers.")
        form.addRow("Scope", self.scope_combo)
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(0, 4096)
        self.tile_spin.setSingleStep(32)
        self.tile_spin.setSpecialValueText("auto")
        self.tile_spin.setSuffix(" px")
        self.tile_spin.setToolTip("Tile side; auto uses the network's preferred tile. Rounded "
                                  "to what the network accepts, clamped to the image.")
        self.overlap_spin = QDoubleSpinBox()
        self.overlap_spin.setRange(0.0, 0.9)
        self.overlap_spin.setSingleStep(0.05)
        self.overlap_spin.setDecimals(3)
        self.overlap_spin.setValue(TilingConfig.overlap)
        self.overlap_spin.setToolTip("Fraction of a tile shared with its neighbour.")
        form.addRow("Tile", row_widget(self.tile_spin, QLabel("overlap"), self.overlap_spin))
        self.blend_combo = QComboBox()
        self.blend_combo.addItems(list(BLEND_MODES))
        self.blend_combo.setToolTip("How overlapping tiles are merged: gaussian taper, plain "
                                    "average, or each pixel from the tile that centres it.")
        form.addRow("Blending", self.blend_combo)
        self.tta_check = QCheckBox("flip TTA")
        self.tta_check.setToolTip("Average over flipped copies: 4x the time in 2D; gives the "
                                  "TTA variance (where to correct first).")
        self.probs_check = QCheckBox("probabilities")
        self.probs_check.setToolTip("Add the probabilities as an Image layer.")
        self.variance_check = QCheckBox("TTA variance")
        self.variance_check.setToolTip("Add the disagreement of the TTA passes (needs TTA).")
        form.addRow("Options", row_widget(self.tta_check, stretch=1))
        form.addRow("Show", row_widget(self.probs_check, self.variance_check, stretch=1))
        self.threshold_slider = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setRange(0.01, 0.99)
        self.threshold_slider.setSingleStep(0.01)
        self.threshold_slider.setDecimals(2)
        self.threshold_slider.setValue(0.5)
        self.threshold_slider.setToolTip(
            "Foreground threshold of a one-class network. Changing it re-derives the mask "
            "from the kept probabilities (no new run).")
        form.addRow("Threshold", self.threshold_slider)
        run_box.setLayout(form)
        root.addWidget(run_box)

        # Plan
        plan_box = QGroupBox("Tile plan")
        lay = QVBoxLayout()
        lay.setContentsMargins(4, 4, 4, 4)
        self.plan_label = QLabel("…")
        self.plan_label.setWordWrap(True)
        self.plan_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.plan_label.setSizePolicy(QSizePolicy.Policy.Preferred,
                                      QSizePolicy.Policy.Minimum)
        lay.addWidget(self.plan_label)
        self.measure_button = QPushButton("Measure time")
        self.measure_button.setToolTip("Run one batch to measure the time per tile and the "
                                       "memory (the estimate then shows the run's time).")
        self.tiles_button = QPushButton("Draw tiles")
        self.tiles_button.setToolTip("Show the tiles as rectangles in a Shapes layer.")
        lay.addWidget(row_widget(self.measure_button, self.tiles_button))
        plan_box.setLayout(lay)
        root.addWidget(plan_box)

        # Run / undo
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip("Segment the scope with the chosen network (click again "
                                   "to cancel: what is finished is kept).")
        self.run_button.setMinimumHeight(28)
        self.undo_button = QPushButton("Undo last")
        self.undo_button.setToolTip("Restore the layers as they were before the last run, "
                                    "threshold change or boundary tool (your edits too).")
        root.addWidget(row_widget(self.run_button, self.undo_button))
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        root.addWidget(self.status_label)

        # Boundary tools
        tools_box = QGroupBox("Boundary tools")
        lay = QVBoxLayout()
        lay.setContentsMargins(4, 4, 4, 4)
        self.boundary_button = QPushButton("Boundary from mask")
        self.boundary_button.setToolTip("Re-derive the boundary layer from the (edited) mask.")
        self.instances_button = QPushButton("Instances (watershed)")
        self.instances_button.setToolTip("Split the mask into objects along the boundary layer "
                                         "(watershed), into an instances layer.")
        lay.addWidget(row_widget(self.boundary_button, self.instances_button))
        tools_box.setLayout(lay)
        root.addWidget(tools_box)

        # Metrics
        metrics_box = QGroupBox("Metrics")
        lay = QVBoxLayout()
        lay.setContentsMargins(4, 4, 4, 4)
        self.reference_combo = QComboBox()
        self.reference_combo.setToolTip("A reference Labels layer on the same grid as the "
                                        "mask; the scores update after each change.")
        self.metrics_button = QPushButton("Update")
        self.reference_combo.setSizePolicy(QSizePolicy.Policy.Expanding,
                                           QSizePolicy.Policy.Fixed)
        row = row_widget(QLabel("Reference"), self.reference_combo, self.metrics_button)
        row.layout().setStretch(1, 1)
        lay.addWidget(row)
        self.metrics_table = QTableWidget(0, 5)
        self.metrics_table.setHorizontalHeaderLabels(["class", "Dice", "IoU", "HD95", "BF1"])
        self.metrics_table.verticalHeader().setVisible(False)
        self.metrics_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        header = self.metrics_table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(3, QHeaderView.ResizeMode.ResizeToContents)
        self.metrics_table.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.metrics_table.setVisible(False)
        lay.addWidget(self.metrics_table)
        self.metrics_caption = QLabel("")
        self.metrics_caption.setWordWrap(True)
        lay.addWidget(self.metrics_caption)
        metrics_box.setLayout(lay)
        root.addWidget(metrics_box)
        root.addStretch(1)

    def _connect(self) -> None:
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.network_combo.currentIndexChanged.connect(self._on_network_changed)
        self.weights_combo.currentIndexChanged.connect(self._on_weights_changed)
        self.browse_button.clicked.connect(self._browse_checkpoint)
        for signal in (self.variant_combo.currentIndexChanged,
                       self.device_combo.currentIndexChanged,
                       self.scope_combo.currentIndexChanged,
                       self.tile_spin.valueChanged, self.overlap_spin.valueChanged,
                       self.blend_combo.currentIndexChanged, self.tta_check.toggled):
            signal.connect(self._schedule_plan)
        self.tta_check.toggled.connect(self._update_enabled)
        self.threshold_slider.valueChanged.connect(self._on_threshold_changed)
        self.measure_button.clicked.connect(lambda: self._update_plan(probe=True))
        self.tiles_button.clicked.connect(self._draw_tiles)
        self.run_button.clicked.connect(self._on_run_clicked)
        self.undo_button.clicked.connect(self.undo)
        self.boundary_button.clicked.connect(self.boundary_from_mask)
        self.instances_button.clicked.connect(self.instances_from_mask)
        self.reference_combo.currentIndexChanged.connect(self.update_metrics)
        self.metrics_button.clicked.connect(self.update_metrics)
        for emitter, callback in self._viewer_hooks():
            emitter.connect(callback)

    def _viewer_hooks(self) -> list[tuple[Any, Any]]:
        """The viewer's events the widget follows: its layer list, the slice, the camera."""
        return self._layer_hooks() + [
            (self.viewer.dims.events.current_step, self._on_view_changed),
            (self.viewer.camera.events.zoom, self._on_view_changed),
            (self.viewer.camera.events.center, self._on_view_changed)]

    # --------------------------------------------------------------- lists -----------
    def _on_layer_removed(self, event: Any) -> None:
        layer = event.value
        if isinstance(layer, Image) and layer.name not in [
                lay.name for lay in self.viewer.layers]:
            self.session.forget(layer.name)
        self._refresh_layers()

    def _refresh_layers(self, *_: Any) -> None:
        images = [lay.name for lay in self.viewer.layers
                  if isinstance(lay, Image) and not result_layers.is_output(lay)]
        current = self.image_combo.currentText()
        if current not in images:
            active = self.viewer.layers.selection.active
            current = active.name if isinstance(active, Image) and active.name in images else (
                images[-1] if images else "")
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(images)
        if current:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)
        image = self.image_combo.currentText()
        labels = [lay.name for lay in self.viewer.layers
                  if isinstance(lay, Labels) and not result_layers.is_output(lay, image)]
        ref = self.reference_combo.currentText()
        self.reference_combo.blockSignals(True)
        self.reference_combo.clear()
        self.reference_combo.addItems([_NONE] + labels)
        self.reference_combo.setCurrentText(ref if ref in labels else _NONE)
        self.reference_combo.blockSignals(False)
        self._update_scope_label()
        self._update_enabled()
        if self._plan is not None and self._plan[2] != image:
            self._schedule_plan()

    def _on_image_changed(self, *_: Any) -> None:
        self._refresh_layers()
        self._schedule_plan()
        if self.reference_combo.currentText() != _NONE:
            self.update_metrics()

    def _on_network_changed(self, *_: Any) -> None:
        network = self.network_combo.currentText()
        if not network or not self._ready:
            return
        self.variant_combo.blockSignals(True)
        current = self.variant_combo.currentText()
        self.variant_combo.clear()
        variants = list(self._catalog.get(network, ()))
        self.variant_combo.addItems(variants)
        self.variant_combo.setCurrentText(current if current in variants else (
            "lite" if "lite" in variants else variants[0]))
        self.variant_combo.blockSignals(False)
        self._fill_weights(list_weight_choices(network))

    def _fill_weights(self, choices: list[WeightsChoice], select: int | None = None) -> None:
        self.weights_combo.blockSignals(True)
        self.weights_combo.clear()
        for choice in choices:
            self.weights_combo.addItem(choice.label, choice)
            self.weights_combo.setItemData(self.weights_combo.count() - 1,
                                           choice.detail or choice.label,
                                           Qt.ItemDataRole.ToolTipRole)
        if select is None:  # installed trained weights first, else random init
            select = next((i for i, c in enumerate(choices) if c.installed and not c.untrained),
                          len(choices) - 1)
        self.weights_combo.setCurrentIndex(select)
        self.weights_combo.blockSignals(False)
        self._on_weights_changed()

    def _on_weights_changed(self, *_: Any) -> None:
        choice = self.current_weights()
        if choice is None:
            return
        self.untrained_label.setVisible(choice.untrained)
        self.variant_combo.setEnabled(choice.untrained)
        if not choice.untrained:
            self.variant_combo.blockSignals(True)
            self.variant_combo.setCurrentText(choice.variant)
            self.variant_combo.blockSignals(False)
        self.weights_combo.setToolTip(choice.detail or choice.label)
        self._update_enabled()
        self._schedule_plan()

    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Add a checkpoint", "", "napari-medseg checkpoints (*.safetensors *.json)")
        if path:
            self.add_checkpoint(path)

    def add_checkpoint(self, path: str) -> None:
        """Add a checkpoint file to the weights list and select it (its network too)."""
        try:
            choice = checkpoint_choice(path)
        except MedsegError as exc:
            self._error(str(exc))
            return
        self.network_combo.setCurrentText(choice.network)
        choices = list_weight_choices(choice.network)
        choices.insert(len(choices) - 1, choice)
        self._fill_weights(choices, select=len(choices) - 2)

    def _update_scope_label(self) -> None:
        image = self.current_image()
        whole = "whole image"
        if image is not None and len(result_layers.image_shape(image)) > 2:
            whole = "whole volume"
        self.scope_combo.setItemText(2, whole)

    def _update_enabled(self, *_: Any) -> None:
        running = self.running
        has_image = self.current_image() is not None and self._ready
        for w in (self.image_combo, self.network_combo, self.weights_combo,
                  self.browse_button, self.device_combo, self.scope_combo, self.tile_spin,
                  self.overlap_spin, self.blend_combo, self.tta_check, self.measure_button,
                  self.tiles_button, self.boundary_button, self.instances_button,
                  self.probs_check):
            w.setEnabled(not running)
        choice = self.current_weights()
        self.variant_combo.setEnabled(not running and choice is not None and choice.untrained)
        self.variance_check.setEnabled(not running and self.tta_check.isChecked())
        self.run_button.setText("Cancel" if running else "Run")
        self.run_button.setEnabled(running or has_image)
        self.undo_button.setEnabled(not running and self.session.can_undo)
        single = choice is None or choice.num_classes == 1
        self.threshold_slider.setEnabled(single)

    # ----------------------------------------------------------- settings -------------
    def current_image(self) -> Image | None:
        """The chosen image layer, or None."""
        name = self.image_combo.currentText()
        if name and name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if isinstance(layer, Image):
                return layer
        return None

    def current_weights(self) -> WeightsChoice | None:
        """The chosen weights."""
        return self.weights_combo.currentData()

    def settings(self, image: Image) -> RunSettings:
        """The widget's values for ``image``.

        Raises:
            ConfigError: no weights chosen.
            InputShapeError: the image's axes cannot be told.
        """
        choice = self.current_weights()
        if choice is None:
            raise ConfigError("Choose a network and weights first.")
        return RunSettings(
            weights=choice, variant=self.variant_combo.currentText(),
            device=self.device_combo.currentData() or "cpu",
            tile=self.tile_spin.value() or None, overlap=self.overlap_spin.value(),
            blend=self.blend_combo.currentText(),
            threshold=round(float(self.threshold_slider.value()), 4),
            tta=self.tta_check.isChecked(), show_probabilities=self.probs_check.isChecked(),
            show_variance=self.variance_check.isChecked() and self.tta_check.isChecked(),
            axes=result_layers.image_axes(image))

    def region(self, image: Image) -> Region:
        """The part of ``image`` the scope covers (its non-channel axes)."""
        shape = result_layers.image_shape(image)
        scope = self.scope_combo.currentData()
        if scope == "whole":
            return whole_region(shape)
        point = np.asarray(image.world_to_data(self.viewer.dims.point), float)
        point = point[-len(shape):] if len(point) >= len(shape) else np.concatenate(
            [np.zeros(len(shape) - len(point)), point])
        if scope == "slice":
            return plane_region(shape, point)
        corners = np.asarray(image.corner_pixels, float)
        level = getattr(image, "data_level", 0)
        if getattr(image, "multiscale", False) and level:
            corners = corners * np.asarray(image.downsample_factors[level])
        if corners.shape[1] != len(shape):
            corners = None
        return visible_region(shape, point, corners, min_size=self.tile_spin.value() or 128)

    @staticmethod
    def _in_channels(image: Image) -> int:
        return 3 if getattr(image, "rgb", False) else 1

    def _crop(self, image: Image, region: Region) -> Any:
        extra = 1 if getattr(image, "rgb", False) else 0
        return result_layers.image_array(image)[region.key(extra)]

    def _start(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Start a job in a thread worker and keep it referenced until it finishes."""
        token = object()
        self._workers.add(token)
        return start_job(func, *args, on_finished=functools.partial(
            self._workers.discard, token), **kwargs)

    @property
    def busy(self) -> bool:
        """True while any job of this widget (run, plan, threshold, tools, metrics) runs."""
        return bool(self._workers)

    # ---------------------------------------------------------------- plan -------------
    def _schedule_plan(self, *_: Any) -> None:
        if not self.running and self._ready:
            self._plan_timer.start()

    def _on_view_changed(self, *_: Any) -> None:
        """The slice or the camera moved: the region of a slice/visible scope follows.

        A region of the same shape keeps its plan (only its position is shown again);
        another shape gets a new plan (debounced).
        """
        if self.scope_combo.currentData() == "whole" or self.running or not self._ready:
            return
        image = self.current_image()
        if image is None:
            return
        try:
            region = self.region(image)
        except MedsegError:
            return
        if self._plan is not None and self._plan[2] == image.name and (
                self._plan[1].shape == region.shape) and not self._plan_timer.isActive():
            self._plan = (self._plan[0], region, image.name)
            self._show_plan(self._plan[0], region)
        else:
            self._schedule_plan()

    def _update_plan(self, probe: bool = False) -> None:
        image = self.current_image()
        if image is None:
            self.plan_label.setText("Open or choose an image layer.")
            return
        if self._job.running:
            return
        try:
            settings = self.settings(image)
            config = settings.config()
            region = self.region(image)
        except MedsegError as exc:
            self.plan_label.setText(error_html(exc))
            return
        self._plan_generation += 1
        generation = self._plan_generation
        self.plan_label.setText("Measuring one batch…" if probe else "Computing the plan…")
        self._start(plan_job, self.session, settings.weights, settings.variant,
                    self._in_channels(image), self._crop(image, region), config, probe,
                    on_done=functools.partial(self._on_plan_done, generation, settings,
                                              region, image.name))

    def _on_plan_done(self, generation: int, settings: RunSettings, region: Region,
                      image_name: str, outcome: JobOutcome) -> None:
        if generation != self._plan_generation:
            return
        if not outcome.ok:
            self.plan_label.setText(error_html(outcome.error))
            self._draw_after_plan = False
            return
        plan, _spec = outcome.value
        self.session.remember_timing(settings.weights, settings.variant, plan)
        plan = self.session.with_known_timing(settings.weights, settings.variant, plan)
        self._plan = (plan, region, image_name)
        self.session.last_plan = plan
        self._show_plan(plan, region)
        if self._draw_after_plan:
            self._draw_after_plan = False
            self._draw_tiles()

    def _show_plan(self, plan: Any, region: Region) -> None:
        image = self.current_image()
        axes = result_layers.image_axes(image).replace("C", "") if image is not None else None
        text = plan.describe()
        if plan.seconds is None:
            text += "\nTime: press Measure time (runs one batch)."
        where = region.describe(axes)
        self.plan_label.setText(f"{where}\n{text}")

    def _draw_tiles(self) -> None:
        image = self.current_image()
        if image is None:
            return
        if self._plan is None or self._plan[2] != image.name or self._plan_timer.isActive():
            self._draw_after_plan = True
            self._update_plan()
            return
        plan, region, _ = self._plan
        result_layers.draw_tiles(self.viewer, image, plan, region)
        self.viewer.layers.selection.active = image

    # ------------------------------------------------------------------ run -------------
    @property
    def running(self) -> bool:
        """True while a prediction runs (or its output layers are being added)."""
        return self._job.running or self._staging is not None

    def _on_run_clicked(self) -> None:
        self._job.toggle(self.run, self.cancel)

    def run(self) -> Any:
        """Segment the scope of the chosen image; returns the worker (None if refused)."""
        if self.running:
            return None
        image = self.current_image()
        if image is None:
            self._error("Choose an image layer to segment.")
            return None
        try:
            settings = self.settings(image)
            config = settings.config()
            region = self.region(image)
        except MedsegError as exc:
            self._error(str(exc))
            return None
        self._plan_timer.stop()
        self._plan_generation += 1  # a plan in flight is stale now
        context = (image.name, settings, region)
        token = self._job.begin(context)
        self._progress = RunProgress(total=0, desc=f"Segmenting {image.name}",
                                     cancel_callback=token.cancel)
        untrained = (settings.weights.network, settings.variant)
        if settings.weights.untrained and untrained not in self._warned_untrained:
            self._warned_untrained.add(untrained)  # the widget's own warning stays shown
            show_warning(f"Segmenting {image.name!r} with an untrained "
                         f"{settings.weights.network} ({settings.variant}): the masks are "
                         "meaningless until it is trained.")
        self.status_label.setText(f"Segmenting {region.describe(settings.axes.replace('C', ''))}…")
        worker = self._start(run_job, self.session, settings.weights, settings.variant,
                           self._in_channels(image), self._crop(image, region), config, token,
                           on_done=functools.partial(self._on_run_done, context),
                           on_yield=self._on_run_event, cancel_token=token)
        self._job.worker = worker
        self._update_enabled()
        return worker

    def cancel(self) -> None:
        """Stop the running prediction after its current batch (what is finished is kept)."""
        if self._job.cancel():
            self.status_label.setText("Cancelling after the current batch…")

    def _on_run_event(self, event: Any) -> None:
        if isinstance(event, TilesEvent):
            if self._progress is not None:
                self._progress.set_done(event.done, event.total)
            eta = f", ~{format_seconds(event.eta_s)} left" if event.eta_s is not None else ""
            where = f"slice {event.plane + 1}/{event.planes}: " if event.planes > 1 else ""
            self.status_label.setText(f"{where}{event.done}/{event.total} tile passes{eta}")
        elif isinstance(event, PlanEvent) and event.plan is not None:
            if self._job.context is not None:
                self._show_plan(event.plan, self._job.context[2])
        elif isinstance(event, NoticeEvent):
            show_notice(event, self.status_label)
        elif isinstance(event, StageEvent):
            self.status_label.setText(event.message)
        elif isinstance(event, PlaneEvent) and event.planes > 1 and self._progress is not None:
            self._progress.set_description(
                f"Segmenting: slice {event.plane + 1} of {event.planes} done")

    def _on_run_done(self, context: tuple, outcome: JobOutcome) -> None:
        image_name, settings, region = context
        self._job.end()
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if outcome.ok and image_name in self.viewer.layers:
            # New output layers are added one per event-loop turn: napari takes a few
            # hundred milliseconds to add each, and all at once would freeze the viewer
            # for their sum.
            steps = result_layers.create_missing_outputs(
                self.viewer, self.viewer.layers[image_name], outcome.value.result,
                settings.show_probabilities, settings.show_variance)
            self._staging = (steps, [], context, outcome)
            self._stage_next_output()
        else:
            self._finish_run(context, outcome, [])

    def _stage_next_output(self) -> None:
        """Add the next missing output layer, or write the result when none is left."""
        steps, created, context, outcome = self._staging
        try:
            if context[0] in self.viewer.layers:
                created.append(next(steps))
                QTimer.singleShot(0, self._stage_next_output)
                return
        except StopIteration:
            pass
        except Exception as exc:  # noqa: BLE001 - reported as a failed run
            outcome = JobOutcome(error=f"Could not add the output layers: {exc}",
                                 exception=exc, seconds=outcome.seconds)
        self._staging = None
        self._finish_run(context, outcome, created)

    def _finish_run(self, context: tuple, outcome: JobOutcome, created: list) -> None:
        image_name, settings, region = context
        self.last_outcome = outcome
        written = False
        try:
            if not outcome.ok:
                self._error(outcome.error or "The run failed.")
                return
            result, spec = outcome.value.result, outcome.value.spec
            if result.plan is not None:
                self.session.remember_timing(settings.weights, settings.variant, result.plan)
            if image_name not in self.viewer.layers:
                self._error(f"The image {image_name!r} was removed during the run; nothing "
                            "was written.")
                return
            image = self.viewer.layers[image_name]
            from ..models.spec import HEAD_BOUNDARY

            edit = result_layers.apply_run(
                self.viewer, image, result, region, self.session,
                settings.show_probabilities, settings.show_variance,
                has_boundary_head=HEAD_BOUNDARY in spec.heads, created=created)
            written = bool(edit.changes)
            if not edit.changes:
                message = "Cancelled before any slice finished; nothing was written."
                show_warning(message)
                self.status_label.setText(message)
                return
            self.session.num_classes[image_name] = int(spec.num_classes)
            seconds = result.stats.get("seconds", outcome.seconds)
            if result.cancelled:
                total = result.plan.planes if result.plan is not None else "?"
                message = (f"Cancelled: {len(result.planes_done)} of {total} slice(s) "
                           "finished are kept.")
                show_warning(message)
                self.status_label.setText(message)
            else:
                self.status_label.setText(
                    f"Done in {format_seconds(seconds)} on {result.stats.get('device', '?')} "
                    f"({result.stats.get('precision', '?')}, "
                    f"{result.stats.get('forward_passes', '?')} tile passes).")
            self.threshold_slider.setEnabled(int(spec.num_classes) == 1)
            if int(spec.num_classes) == 1 and abs(
                    float(self.threshold_slider.value()) - settings.threshold) > 1e-6:
                self._threshold_timer.start()  # the slider moved during the run
            mask = result_layers.find_output(self.viewer, image_name, "mask")
            if mask is not None:
                self.viewer.layers.selection.active = mask
            if self.reference_combo.currentText() != _NONE:
                self.update_metrics()
        finally:
            if not written:  # layers made for a result that was not written go again
                for layer in created:
                    if layer in self.viewer.layers:
                        self.viewer.layers.remove(layer)
            self._update_enabled()
            if self._plan is not None:
                self._show_plan(self._plan[0], self._plan[1])

    # ------------------------------------------------------------ threshold -------------
    def _on_threshold_changed(self, *_: Any) -> None:
        image = self.current_image()
        if image is not None and self.session.cache_for(image.name) is not None:
            self._threshold_timer.start()

    def _apply_threshold(self) -> None:
        image = self.current_image()
        if image is None or self.session.cache_for(image.name) is None or self.running:
            return
        if self._threshold_busy:
            self._threshold_pending = True
            return
        self._threshold_busy = True
        threshold = round(float(self.threshold_slider.value()), 4)
        self._start(threshold_job, self.session, image.name, threshold,
                    on_done=functools.partial(self._on_threshold_done, image.name, threshold))

    def _on_threshold_done(self, image_name: str, threshold: float,
                           outcome: JobOutcome) -> None:
        self._threshold_busy = False
        if not outcome.ok:
            self._error(outcome.error or "The threshold could not be applied.")
        elif image_name in self.viewer.layers:
            result_layers.apply_masks(self.viewer, self.viewer.layers[image_name],
                                      outcome.value, self.session, f"threshold {threshold:.2f}")
            self.status_label.setText(f"Mask re-derived at threshold {threshold:.2f}.")
            if self.reference_combo.currentText() != _NONE:
                self.update_metrics()
        self._update_enabled()
        if self._threshold_pending:
            self._threshold_pending = False
            self._apply_threshold()

    # --------------------------------------------------------------- undo --------------
    def undo(self) -> None:
        """Undo the last run, threshold change or boundary tool (edits come back too)."""
        edit = self.session.pop()
        if edit is None:
            return
        names = result_layers.undo(self.viewer, edit)
        self.status_label.setText(f"Undid {edit.label}" + (
            f" ({', '.join(names)})." if names else "."))
        self._update_enabled()

    # ----------------------------------------------------------- boundary tools --------
    def _label_layer(self, image: Image, output: str) -> Labels | None:
        layer = result_layers.find_output(self.viewer, image.name, output)
        return layer if isinstance(layer, Labels) else None

    def boundary_from_mask(self) -> Any:
        """Derive the boundary layer from the mask layer (in a worker; undoable)."""
        image = self.current_image()
        mask = self._label_layer(image, "mask") if image is not None else None
        if mask is None:
            self._error("Segment the image first; the boundary tools work on its mask layer.")
            return None
        axes = result_layers.image_axes(image).replace("C", "")
        self.status_label.setText("Deriving the boundary from the mask…")
        return self._start(boundary_job, np.array(mask.data), axes,
                         on_done=functools.partial(self._on_tool_done, image.name, "boundary",
                                                   "boundary from mask"))

    def instances_from_mask(self) -> Any:
        """Split the mask into instances along the boundary layer (watershed; undoable)."""
        image = self.current_image()
        mask = self._label_layer(image, "mask") if image is not None else None
        if mask is None:
            self._error("Segment the image first; the boundary tools work on its mask layer.")
            return None
        boundary = self._label_layer(image, "boundary")
        axes = result_layers.image_axes(image).replace("C", "")
        self.status_label.setText("Splitting the mask into instances…")
        return self._start(instances_job, np.array(mask.data),
                         None if boundary is None else np.array(boundary.data), axes,
                         on_done=functools.partial(self._on_tool_done, image.name,
                                                   "instances", "instances"))

    def _on_tool_done(self, image_name: str, output: str, label: str,
                      outcome: JobOutcome) -> None:
        if not outcome.ok:
            self._error(outcome.error or f"{label} failed.")
            return
        if image_name not in self.viewer.layers:
            return
        result_layers.apply_array(self.viewer, self.viewer.layers[image_name], output,
                                  outcome.value, self.session, label)
        if output == "instances":
            count = int(outcome.value.max())
            self.status_label.setText(f"{count} instance(s) found.")
        else:
            self.status_label.setText("Boundary re-derived from the mask.")
        self._update_enabled()

    # -------------------------------------------------------------- metrics -----------
    def update_metrics(self, *_: Any) -> Any:
        """Score the mask against the chosen reference layer (in a worker)."""
        self._metrics_generation += 1
        ref_name = self.reference_combo.currentText()
        image = self.current_image()
        if ref_name == _NONE or not ref_name or image is None:
            self.metrics_table.setVisible(False)
            self.metrics_caption.setText("")
            return None
        mask = self._label_layer(image, "mask")
        if mask is None:
            self.metrics_caption.setText("Segment the image to compare it with the reference.")
            self.metrics_table.setVisible(False)
            return None
        ref = self.viewer.layers[ref_name]
        axes = result_layers.image_axes(image).replace("C", "")
        region = self.session.last_region.get(image.name, whole_region(np.shape(mask.data)))
        if tuple(np.shape(ref.data)) != tuple(np.shape(mask.data)):
            self.metrics_table.setVisible(False)
            message = (f"The reference {ref_name!r} has shape {tuple(np.shape(ref.data))} but "
                       f"the mask has {tuple(np.shape(mask.data))}; pick a reference on the "
                       "same grid.")
            self.metrics_caption.setText(message)
            self._error(message)
            return None
        num_classes = self.session.num_classes.get(image.name, 1)
        key = region.slices
        unit = str(tuple(mask.units)[-1]) if getattr(mask, "units", None) else "pixel"
        self.metrics_caption.setText("Computing…")
        generation = self._metrics_generation
        return self._start(metrics_job, np.array(mask.data[key]), np.asarray(ref.data[key]),
                         axes, num_classes, tuple(float(s) for s in mask.scale),
                         on_done=functools.partial(self._on_metrics_done, generation, region,
                                                   axes, unit))

    def _on_metrics_done(self, generation: int, region: Region, axes: str, unit: str,
                         outcome: JobOutcome) -> None:
        if generation != self._metrics_generation:
            return
        if not outcome.ok:
            self.metrics_caption.setText(outcome.error or "")
            self.metrics_table.setVisible(False)
            return
        scores: dict[int, dict[str, float]] = outcome.value
        self.last_metrics = scores
        table = self.metrics_table
        table.setRowCount(len(scores))
        unit = {"pixel": "px", "micrometer": "µm", "millimeter": "mm",
                "nanometer": "nm"}.get(unit, unit)
        table.setHorizontalHeaderLabels(["class", "Dice", "IoU", f"HD95 ({unit})", "BF1"])
        for row, (cls, values) in enumerate(sorted(scores.items())):
            hd = values["hd95"]
            cells = [str(cls), f"{values['dice']:.3f}", f"{values['iou']:.3f}",
                     "∞" if math.isinf(hd) else f"{hd:.2f}", f"{values['boundary_f1']:.3f}"]
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                table.setItem(row, col, item)
        rows = sum(table.rowHeight(r) for r in range(min(table.rowCount(), 6)))
        table.setFixedHeight(table.horizontalHeader().height() + rows + 2 * table.frameWidth())
        table.setVisible(True)
        self.metrics_caption.setText(f"Over {region.describe(axes)} of the mask.")

    # ------------------------------------------------- fine-tuning hook (issue 8) ------
    def use_weights(self, source: str, image_name: str | None = None,
                    scope: str | None = "visible") -> Any:
        """Select weights and segment again (the Fine-tune widget calls this when it ends).

        Args:
            source: a checkpoint path (``.json``/``.safetensors``) or a model card's tag.
            image_name: the image layer to segment; None keeps the current one.
            scope: ``"slice"``, ``"visible"`` or ``"whole"`` for this run only; None uses
                the widget's scope.

        Returns:
            The run's worker, or None when no run started (a run is going on, or an error
            was shown).
        """
        from pathlib import Path

        from ..engine.checkpoints import checkpoint_paths, list_model_cards

        if not self.ready:  # the network list is still loading: try again shortly
            QTimer.singleShot(200, functools.partial(self.use_weights, source, image_name,
                                                     scope))
            return None
        text = str(source)
        weights_file, description = checkpoint_paths(text)
        if weights_file.is_file() or description.is_file():
            from .session import checkpoint_choice

            try:
                network = checkpoint_choice(text).network
            except MedsegError as exc:
                self._error(str(exc))
                return None
            self.network_combo.setCurrentText(network)
            self._on_network_changed()  # the list again: the checkpoint may be new
            wanted = {str(description), str(weights_file), str(Path(text))}
            index = next((i for i in range(self.weights_combo.count())
                          if getattr(self.weights_combo.itemData(i), "source", None) in wanted),
                         None)
            if index is None:
                self.add_checkpoint(text)
            else:
                self.weights_combo.setCurrentIndex(index)
        else:
            card = next((c for c in list_model_cards() if c.tag == text), None)
            if card is None:
                self._error(f"Unknown weights {text!r}.")
                return None
            self.network_combo.setCurrentText(card.network)
            index = next((i for i in range(self.weights_combo.count())
                          if getattr(self.weights_combo.itemData(i), "source", None) == text),
                         None)
            if index is None:
                self._error(f"The weights {text!r} are not in the list.")
                return None
            self.weights_combo.setCurrentIndex(index)
        if image_name and image_name in [self.image_combo.itemText(i)
                                         for i in range(self.image_combo.count())]:
            self.image_combo.setCurrentText(image_name)
        if self.running:
            self.status_label.setText("New weights selected; run again when this run ends.")
            return None
        previous = self.scope_combo.currentIndex()
        wanted_scope = self.scope_combo.findData(scope) if scope else -1
        if wanted_scope >= 0:
            self.scope_combo.blockSignals(True)
            self.scope_combo.setCurrentIndex(wanted_scope)
        try:
            return self.run()
        finally:
            if wanted_scope >= 0:
                self.scope_combo.setCurrentIndex(previous)
                self.scope_combo.blockSignals(False)

    # ------------------------------------------------------------- messages -----------
    def _error(self, message: str) -> None:
        """Show one sentence as a napari error notification (and in the status line)."""
        self.last_error = message
        self.status_label.setText(error_html(message))
        show_error(message)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt override
        """Cancel a running prediction and let go of the viewer when the widget closes."""
        self.cancel()
        self._disconnect()
        super().closeEvent(event)

    def _disconnect(self) -> None:
        for emitter, callback in self._viewer_hooks():
            emitter.disconnect(callback)

