"""The Fine-tune dock widget: learn from the user's corrections without freezing the viewer.

A thin skin over :func:`napari_medseg.engine.training.workflow.finetune_corrections_iter`. The
widget gathers its values (image, corrected labels, optional corrected boundary, what the
labels are compared with, the starting weights, steps, learning rate, freeze encoder, replay)
into a :class:`~napari_medseg.config.FinetuneConfig` and a
:class:`~napari_medseg.engine.training.workflow.Corrections` of copies of the layer data, then
runs the workflow in a napari thread worker (:func:`finetune_job`): autosave of the labels
first, loading the starting weights, finding the corrected regions, replay of earlier
corrections, fine-tuning, and the lineage of the new checkpoint.

The starting weights may be the Segment widget's current choice, read from the viewer's
shared :mod:`.viewer_state` (the networks are loaded through its shared cache), one of the
user's checkpoints, or shipped weights. Loss and validation Dice are drawn live
(:mod:`.curve_plot`). Stop keeps the best weights so far. When the job ends with better
weights, the checkpoint becomes the active member of its model line and the Segment widget
is asked, through the viewer state, to use it and re-predict the current view. The checkpoint
list (:mod:`.lineage_panel`) shows the lineage; *Use* activates any entry, *Revert* goes back
to an entry's parent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from napari.viewer import Viewer
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QGroupBox,
    QLabel,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..config import FinetuneConfig
from ..engine.progress import CancelToken, FinishedEvent, NoticeEvent, StageEvent, TilesEvent
from ..engine.progress import ProgressEvent
from ..engine.training.finetune import DataEvent, FinetuneResult
from ..engine.training.loop import StepEvent, ValidationEvent
from ..engine.training.workflow import Corrections, finetune_corrections_iter
from ..errors import ConfigError, InputShapeError, MedsegError
from . import result_layers
from .curve_plot import CurvePlot
from .lineage_panel import LineagePanel
from .viewer_state import viewer_state
from .worker import JobOutcome, LongJob, guard_iter, show_notice, start_job
from .worker import LayerListMixin, error_html, form_layout, row_widget, scroll_root

__all__ = ["BaseChoice", "FinetuneWidget", "finetune_job", "COMPARE_MODEL", "COMPARE_NONE"]

#: "Compared with" entry: the starting weights predict the labelled planes.
COMPARE_MODEL = "prediction of the starting weights"
#: "Compared with" entry: every labelled plane counts whole.
COMPARE_NONE = "nothing (each labelled slice counts whole)"
_NONE = "(none)"
_SEGMENT = "weights chosen in the Segment widget"


@dataclass(frozen=True)
class BaseChoice:
    """One entry of the "Start from" picker.

    Attributes:
        kind: ``"segment"`` (the Segment widget's current weights), ``"checkpoint"`` (a path)
            or ``"card"`` (a shipped weights tag).
        label: what the picker shows.
        source: the path or tag (None for ``segment``).
    """

    kind: str
    label: str
    source: str | None = None


# --------------------------------------------------------------------------- the job


def finetune_job(
    load_model: Callable[[], Any],
    corrections: Corrections,
    config: FinetuneConfig,
    cancel: CancelToken,
    base_source: str | None = None,
) -> Generator[ProgressEvent, None, JobOutcome]:
    """Fine-tune on the corrections in a worker thread (never raises).

    Runs :func:`~napari_medseg.engine.training.workflow.finetune_corrections_iter` (autosave,
    load, corrections, replay, fine-tuning, lineage), passing its events on.

    Returns:
        An outcome whose value is the
        :class:`~napari_medseg.engine.training.finetune.FinetuneResult`.
    """
    return (yield from guard_iter(finetune_corrections_iter, load_model, corrections, config,
                                  base_source=base_source, cancel=cancel))


# --------------------------------------------------------------------------- the widget


class FinetuneWidget(LayerListMixin, QWidget):
    """Dock widget fine-tuning a network on the corrections of a Labels layer.

    Args:
        napari_viewer: the viewer it is docked in (injected by napari).
    """

    def __init__(self, napari_viewer: Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        #: what the viewer's dock widgets share (the Segment widget's weights, the networks).
        self.state = viewer_state(napari_viewer)
        #: the fine-tuning; its context is (image name, labels name).
        self._job = LongJob()
        self.last_outcome: JobOutcome | None = None
        self.last_error: str | None = None
        self.last_result: FinetuneResult | None = None
        self.events_seen = 0
        self._build()
        self._connect()
        self._refresh_layers()
        self.refresh_bases()
        self.refresh_checkpoints()
        self._update_enabled()
        self.state.weights_changed.connect(self._show_segment_weights)

    # ------------------------------------------------------------------ UI ----------
    def _build(self) -> None:
        root = scroll_root(self)
        root.setSpacing(6)
        defaults = FinetuneConfig()

        data_box = QGroupBox("Corrections")
        form = form_layout()
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The image the labels belong to.")
        form.addRow("Image", self.image_combo)
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip(
            "The Labels layer you corrected (e.g. '<image> mask' after segmenting). It is "
            "saved to your data folder before training starts.")
        form.addRow("Corrected labels", self.labels_combo)
        self.boundary_combo = QComboBox()
        self.boundary_combo.setToolTip(
            "A boundary layer you corrected (optional). Without one, instance labels give "
            "the boundary targets.")
        form.addRow("Corrected boundary", self.boundary_combo)
        self.compare_combo = QComboBox()
        self.compare_combo.setToolTip(
            "Only the regions where the labels differ from this count (plus a margin). The "
            "default predicts the labelled slices with the starting weights; or pick a layer "
            "holding the prediction you corrected; or train on every labelled slice whole.")
        form.addRow("Compared with", self.compare_combo)
        data_box.setLayout(form)
        root.addWidget(data_box)

        train_box = QGroupBox("Training")
        form = form_layout()
        self.base_combo = QComboBox()
        self.base_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.base_combo.setMinimumContentsLength(12)
        self.base_combo.setToolTip("The weights to fine-tune: the Segment widget's choice, "
                                   "one of your checkpoints, or shipped weights.")
        form.addRow("Start from", self.base_combo)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100000)
        self.steps_spin.setSingleStep(50)
        self.steps_spin.setValue(defaults.steps)
        self.steps_spin.setToolTip(
            f"Optimisation steps at most; the run also ends within {defaults.max_minutes:g} "
            "minutes, and early stopping may end it sooner (the best weights are kept).")
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 0.1)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(defaults.lr)
        self.lr_spin.setToolTip("Peak learning rate (AdamW, warm-up then cosine decay).")
        form.addRow("Steps", row_widget(self.steps_spin, QLabel("learning rate"), self.lr_spin))
        self.freeze_check = QCheckBox("freeze encoder")
        self.freeze_check.setChecked(defaults.freeze_encoder)
        self.freeze_check.setToolTip("Train only the decoder and heads (the default): a "
                                     "handful of corrections then adapts the model without "
                                     "unlearning what its encoder knows.")
        self.replay_check = QCheckBox("replay earlier corrections")
        self.replay_check.setChecked(True)
        self.replay_check.setToolTip(
            f"Mix the corrections of earlier rounds of this model into "
            f"{defaults.replay:.0%} of the batches, against forgetting.")
        form.addRow("Options", row_widget(self.freeze_check, self.replay_check))
        self.device_combo = QComboBox()
        self.device_combo.setToolTip("Where to train.")
        form.addRow("Device", self.device_combo)
        train_box.setLayout(form)
        root.addWidget(train_box)

        self.start_button = QPushButton("Start")
        self.start_button.setMinimumHeight(28)
        self.start_button.setToolTip("Fine-tune in the background (click again to stop: the "
                                     "best weights so far are kept).")
        root.addWidget(self.start_button)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        root.addWidget(self.status_label)
        self.plot = CurvePlot()
        root.addWidget(self.plot)

        self.lineage_panel = LineagePanel()
        self.checkpoint_list = self.lineage_panel.checkpoint_list
        self.use_button = self.lineage_panel.use_button
        self.revert_button = self.lineage_panel.revert_button
        root.addWidget(self.lineage_panel)
        root.addStretch(1)
        self._fill_devices()

    def _fill_devices(self) -> None:
        from ..engine.device import list_devices

        for dev in list_devices():
            text = "CPU" if dev["name"] == "cpu" else f"{dev['name']} {dev.get('description', '')}"
            self.device_combo.addItem(text.strip(), dev["name"])
        gpu = next((i for i in range(self.device_combo.count())
                    if self.device_combo.itemData(i) != "cpu"), 0)
        self.device_combo.setCurrentIndex(gpu)

    def _connect(self) -> None:
        self.start_button.clicked.connect(self._on_start_clicked)
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.lineage_panel.activated.connect(self._activate)
        self.lineage_panel.failed.connect(self._error)
        self.lineage_panel.exported.connect(self.status_label.setText)
        self.lineage_panel.selection_changed.connect(self._update_enabled)
        for emitter, callback in self._layer_hooks():
            emitter.connect(callback)

    # --------------------------------------------------------------- lists -----------
    @staticmethod
    def _fill(combo: QComboBox, items: list[str], keep: str, default: str | None) -> None:
        combo.blockSignals(True)
        combo.clear()
        combo.addItems(items)
        if keep in items:
            combo.setCurrentText(keep)
        elif default in items:
            combo.setCurrentText(default)
        combo.blockSignals(False)

    def _mask_name(self, image: str) -> str | None:
        """The Segment widget's mask layer of ``image`` (by its marker, else by name)."""
        if not image:
            return None
        layer = result_layers.find_output(self.viewer, image, "mask")
        return layer.name if layer is not None else result_layers.output_name(image, "mask")

    def _refresh_layers(self, *_: Any) -> None:
        images = [lay.name for lay in self.viewer.layers
                  if isinstance(lay, Image) and not result_layers.is_output(lay)]
        labels = [lay.name for lay in self.viewer.layers if isinstance(lay, Labels)]
        current = self.image_combo.currentText()
        self._fill(self.image_combo, images, current, images[-1] if images else None)
        mask_name = self._mask_name(self.image_combo.currentText())
        self._fill(self.labels_combo, labels, self.labels_combo.currentText(),
                   mask_name if mask_name in labels else (labels[-1] if labels else None))
        self._fill(self.boundary_combo, [_NONE] + labels, self.boundary_combo.currentText(),
                   _NONE)
        self._fill(self.compare_combo, [COMPARE_MODEL, COMPARE_NONE] + labels,
                   self.compare_combo.currentText(), COMPARE_MODEL)
        self._update_enabled()

    def _on_image_changed(self, *_: Any) -> None:
        mask_name = self._mask_name(self.image_combo.currentText())
        if mask_name and mask_name in self.viewer.layers:
            self.labels_combo.setCurrentText(mask_name)
        self._update_enabled()

    def refresh_bases(self) -> None:
        """Fill the "Start from" picker: Segment's weights, the active checkpoints, others."""
        import warnings

        from ..engine.checkpoints import list_shipped_weights
        from ..engine.training.lineage import active_source, list_lineage

        current = self.base_combo.currentData()
        self.base_combo.blockSignals(True)
        self.base_combo.clear()
        choices = [BaseChoice("segment", _SEGMENT)]
        entries = list_lineage()
        active = {active_source(e.root) for e in entries}
        for entry in reversed(entries):  # newest first
            star = "* " if entry.source in active else ""
            choices.append(BaseChoice("checkpoint", f"{star}{entry.describe()}", entry.source))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shipped = list_shipped_weights()
        for w in shipped:
            choices.append(BaseChoice("card", f"{w['tag']} (shipped)", w["tag"]))
        for choice in choices:
            self.base_combo.addItem(choice.label, choice)
        index = next((i for i, c in enumerate(choices) if current is not None
                      and (c.kind, c.source) == (current.kind, current.source)), 0)
        self.base_combo.setCurrentIndex(index)
        self.base_combo.blockSignals(False)
        self._show_segment_weights(self.state.weights, self.state.variant)

    def refresh_checkpoints(self) -> None:
        """Fill the checkpoint list from the user data folder (newest last)."""
        self.lineage_panel.refresh()

    def _update_enabled(self, *_: Any) -> None:
        running = self.running
        for w in (self.image_combo, self.labels_combo, self.boundary_combo,
                  self.compare_combo, self.base_combo, self.steps_spin, self.lr_spin,
                  self.freeze_check, self.replay_check, self.device_combo):
            w.setEnabled(not running)
        self.start_button.setText("Stop" if running else "Start")
        self.start_button.setEnabled(running or (
            bool(self.image_combo.currentText()) and bool(self.labels_combo.currentText())))
        self.lineage_panel.set_enabled(not running)

    # ----------------------------------------------------------- settings -------------
    def config(self) -> FinetuneConfig:
        """The widget's values as a :class:`~napari_medseg.config.FinetuneConfig`."""
        defaults = FinetuneConfig()
        return FinetuneConfig.from_mapping({
            "steps": self.steps_spin.value(), "lr": self.lr_spin.value(),
            "freeze_encoder": self.freeze_check.isChecked(),
            "replay": defaults.replay if self.replay_check.isChecked() else 0.0,
            "device": self.device_combo.currentData() or "cpu",
        })

    def _base_loader(self, image: Image) -> tuple[Callable[[], Any], str, str | None]:
        """A function loading the starting weights (run in the worker), their description
        and their source (path or tag; None for an untrained network)."""
        choice: BaseChoice | None = self.base_combo.currentData()
        if choice is None:
            raise ConfigError("Choose the weights to start from.")
        if choice.kind == "segment":
            state = viewer_state(self.viewer)
            load = state.loader(3 if getattr(image, "rgb", False) else 1)
            if load is not None:
                return load, state.weights.label, state.weights.source
            others = [self.base_combo.itemData(i) for i in range(1, self.base_combo.count())]
            if not others:
                raise ConfigError("Open the Segment widget and choose weights there, or "
                                  "pick the weights to start from here.")
            choice = others[0]  # the newest checkpoint of yours, else shipped weights
        from ..engine.checkpoints import resolve_weights

        return (lambda: resolve_weights(choice.source)[0]), choice.label, choice.source

    # ---------------------------------------------------------------- run ---------------
    @property
    def running(self) -> bool:
        """True while fine-tuning runs."""
        return self._job.running

    def _on_start_clicked(self) -> None:
        self._job.toggle(self.start, self.stop)

    def start(self) -> Any:
        """Start fine-tuning; returns the worker (None if refused, with a message)."""
        if self.running:
            return None
        try:
            image = self._layer(self.image_combo.currentText(), Image, "image")
            labels = self._layer(self.labels_combo.currentText(), Labels, "corrected labels")
            axes = result_layers.image_axes(image)
            expected = result_layers.image_shape(image)
            shape = tuple(np.shape(labels.data))
            if len(shape) != len(expected) or shape[:-2] != expected[:-2] or any(
                    s % e for s, e in zip(shape[-2:], expected[-2:])):
                raise InputShapeError(
                    f"The labels {labels.name!r} have shape {shape} but the image "
                    f"{image.name!r} has {expected}; pick labels drawn on that image.")
            boundary = None
            if self.boundary_combo.currentText() not in ("", _NONE):
                layer = self._layer(self.boundary_combo.currentText(), Labels, "boundary")
                boundary = np.array(layer.data, copy=True)
            compare = self.compare_combo.currentText()
            if compare == COMPARE_MODEL:
                prediction: Any = "model"
            elif compare == COMPARE_NONE:
                prediction = None
            else:
                layer = self._layer(compare, Labels, "prediction")
                if layer is labels:
                    raise ConfigError("The labels cannot be compared with themselves; pick the "
                                      "prediction you corrected (or another option).")
                prediction = np.array(layer.data, copy=True)
            config = self.config()
            load, base_label, base_source = self._base_loader(image)
        except MedsegError as exc:
            self._error(str(exc))
            return None
        try:
            from .layers import meta_from_layer

            label_meta = meta_from_layer(labels)
        except (ValueError, TypeError):
            label_meta = None
        image_meta = result_layers.pixel_meta(image)
        token = self._job.begin((image.name, labels.name))
        self.plot.clear(config.steps)
        self.last_result = None
        self.events_seen = 0
        self.status_label.setText(f"Starting from {base_label}…")
        corrections = Corrections(
            image=result_layers.image_array(image), axes=axes,
            labels=np.array(labels.data, copy=True), image_name=image.name,
            labels_name=labels.name, boundary=boundary, prediction=prediction,
            label_meta=label_meta, image_meta=image_meta)
        worker = start_job(finetune_job, load, corrections, config, token, base_source,
                           on_done=self._on_done, on_yield=self._on_event, cancel_token=token)
        self._job.worker = worker
        self._update_enabled()
        return worker

    def stop(self) -> None:
        """Stop after the current step; the best weights so far are kept and written."""
        if self._job.cancel():
            self.status_label.setText("Stopping after this step (the best weights so far are "
                                      "kept)…")

    def _layer(self, name: str, kind: type, what: str) -> Any:
        if not name or name not in self.viewer.layers:
            raise ConfigError(f"Choose the {what} layer.")
        layer = self.viewer.layers[name]
        if not isinstance(layer, kind):
            raise ConfigError(f"The layer {name!r} is not a {kind.__name__} layer.")
        return layer

    def _on_event(self, event: Any) -> None:
        self.events_seen += 1
        if isinstance(event, StepEvent):
            self.plot.add_loss(event.step, event.loss)
            self.status_label.setText(
                f"Step {event.step}/{event.steps}: loss {event.loss:.4f} "
                f"({event.elapsed_s:.0f} s)")
        elif isinstance(event, ValidationEvent):
            self.plot.add_dice(event.step, event.dice, best=event.improved or event.step == 0)
        elif isinstance(event, DataEvent):
            self.status_label.setText(event.message)
        elif isinstance(event, NoticeEvent):
            show_notice(event, self.status_label)
        elif isinstance(event, TilesEvent):
            self.status_label.setText(f"Finding your changes: {event.done}/{event.total} tile "
                                      "passes")
        elif isinstance(event, (StageEvent, FinishedEvent)):
            self.status_label.setText(event.message)

    def _on_done(self, outcome: JobOutcome) -> None:
        context = self._job.end()
        self.last_outcome = outcome
        try:
            if not outcome.ok:
                self._error(outcome.error or "Fine-tuning failed.")
                return
            result: FinetuneResult = outcome.value
            self.last_result = result
            self.refresh_checkpoints()
            self.refresh_bases()
            if math.isfinite(result.best_dice):
                dice = (f"validation Dice {result.baseline_dice:.3f} -> {result.best_dice:.3f}"
                        if result.improved else
                        f"no step beat the starting weights (Dice {result.baseline_dice:.3f})")
            else:
                dice = "no held-out region to validate on"
            how = {"cancelled": "Stopped", "early_stop": "Stopped early",
                   "time_limit": "Time limit reached"}.get(result.stopped, "Finished")
            message = f"{how} after {result.steps_done} steps: {dice}."
            if result.improved and result.checkpoint is not None:
                source = str(result.checkpoint.with_suffix(".json"))
                self._select_base(source)
                message += f" Saved {result.checkpoint.name}."
                if self._apply_to_segment(source, context[0] if context else None):
                    message += " The Segment widget re-predicts with it."
            else:
                message += " The starting weights stay in use."
            self.status_label.setText(message)
            show_info(message)
        finally:
            self._update_enabled()

    def _select_base(self, source: str) -> None:
        for i in range(self.base_combo.count()):
            choice = self.base_combo.itemData(i)
            if choice is not None and choice.source == source:
                self.base_combo.setCurrentIndex(i)
                return

    def _apply_to_segment(self, source: str, image_name: str | None) -> bool:
        """Have the Segment widget (opened if needed) use ``source`` and re-predict the
        current view; True when it started a run."""
        state = viewer_state(self.viewer)
        if not state.serving:
            window = getattr(self.viewer, "window", None)
            try:
                window.add_plugin_dock_widget("napari-medseg", "Segment")
            except Exception:  # noqa: BLE001 - no window, or the plugin is not registered
                return False
        return state.request_weights(source, image_name, scope="visible")

    def use_selected(self) -> bool:
        """Activate the selected checkpoint: Segment uses it, the next fine-tuning starts
        from it."""
        return self.lineage_panel.use_selected()

    def revert_selected(self) -> bool:
        """Go back to the selected checkpoint's parent (its checkpoint or shipped weights)."""
        return self.lineage_panel.revert_selected()

    def _activate(self, source: str, message: str) -> bool:
        self.refresh_checkpoints()
        self.refresh_bases()
        self._select_base(source)
        image = self.image_combo.currentText() or None
        applied = self._apply_to_segment(source, image)
        self.status_label.setText(message + (" The Segment widget re-predicts with it."
                                             if applied else ""))
        return True

    # ------------------------------------------------------------- messages -----------
    def _error(self, message: str) -> None:
        """One sentence as a napari error notification (and in the status line)."""
        self.last_error = message
        self.status_label.setText(error_html(message))
        show_error(message)

    def _show_segment_weights(self, weights: Any, variant: str) -> None:
        """Name the Segment widget's weights in the tooltip of the "Start from" entry."""
        text = ("The Segment widget is not open (the newest of your checkpoints is used)."
                if weights is None else f"Now: {weights.label}" + (
                    f" ({variant})" if weights.untrained else ""))
        self.base_combo.setItemData(0, text, Qt.ItemDataRole.ToolTipRole)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt override
        """Stop a running fine-tuning when the widget closes (the best weights are kept)."""
        self.stop()
        self.state.weights_changed.disconnect(self._show_segment_weights)
        super().closeEvent(event)
