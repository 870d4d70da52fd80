"""The Fine-tune dock widget: learn from the user's corrections without freezing the viewer.

A thin skin over :mod:`napari_medseg.engine.training.finetune`. The widget gathers its values (image,
corrected labels, optional corrected boundary, what the labels are compared with, the starting
weights, steps, learning rate, freeze encoder, replay) into a
:class:`~napari_medseg.config.FinetuneConfig` and copies of the layer data, then runs one job
in a napari thread worker (:func:`.worker.start_job`):

1. the corrected labels (and boundary) are autosaved to the user data folder
   (:func:`~napari_medseg.engine.training.lineage.autosave_labels`) before anything else, so a crash
   loses no annotation;
2. the starting weights are loaded (the Segment widget's current choice, one of the user's
   checkpoints, or shipped weights);
3. the corrected regions are found (:func:`~napari_medseg.engine.training.finetune.prepare_corrections_iter`:
   by default the starting weights predict the labelled planes and the differences count);
4. :func:`~napari_medseg.engine.training.finetune.finetune_iter` trains, with replay of earlier
   corrections of the same model line, and writes the checkpoint with its lineage into the
   user data folder.

Loss and validation Dice are drawn live in the dock (:class:`CurvePlot`, plain QPainter: the
viewer's environment has no plotting library). Stop keeps the best weights so far. When the
job ends with better weights, the checkpoint becomes the active member of its model line and
the Segment widget uses it and re-predicts the current view. The checkpoint list shows the
lineage; *Use* activates any entry, *Revert* goes back to an entry's parent.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QFont, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QGroupBox,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..config import FinetuneConfig
from ..engine.training.finetune import DataEvent, FinetuneResult
from ..engine.progress import CancelToken, FinishedEvent, NoticeEvent, StageEvent, TilesEvent
from ..engine.training.train import StepEvent, ValidationEvent
from ..errors import ConfigError, InputShapeError, MedsegError
from . import result_layers
from .worker import (
    JobOutcome,
    LayerListMixin,
    LongJob,
    error_html,
    form_layout,
    guard_iter,
    row_widget,
    show_notice,
    start_job,
)

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from ..engine.progress import ProgressEvent

__all__ = ["BaseChoice", "CurvePlot", "FinetuneWidget", "finetune_job", "COMPARE_MODEL",
           "COMPARE_NONE"]

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


# --------------------------------------------------------------------------- the plot


class CurvePlot(QWidget):
    """Training loss (left axis) and validation Dice (right axis, 0-1) against the step.

    Drawn with QPainter; adding a point only schedules a repaint, so thousands of steps cost
    the GUI thread nothing between paints.
    """

    LOSS = QColor(80, 170, 255)
    LOSS_RAW = QColor(80, 170, 255, 70)
    DICE = QColor(255, 176, 0)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(150)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.loss: list[tuple[int, float]] = []
        self.smooth: list[tuple[int, float]] = []
        self.dice: list[tuple[int, float]] = []
        self.total = 1
        self.best: tuple[int, float] | None = None

    def clear(self, total_steps: int) -> None:
        """Forget the curves; the x axis spans ``total_steps``."""
        self.loss, self.smooth, self.dice, self.best = [], [], [], None
        self.total = max(1, int(total_steps))
        self.update()

    def add_loss(self, step: int, loss: float) -> None:
        """One training step's loss (its running mean is drawn too)."""
        if not math.isfinite(loss):
            return
        self.loss.append((step, loss))
        prev = self.smooth[-1][1] if self.smooth else loss
        self.smooth.append((step, 0.9 * prev + 0.1 * loss if self.smooth else loss))
        self.update()

    def add_dice(self, step: int, dice: float, best: bool = False) -> None:
        """A validation Dice (``best`` marks the kept weights)."""
        if not math.isfinite(dice) or dice < 0:
            return
        self.dice.append((step, dice))
        if best or self.best is None:
            self.best = (step, dice)
        self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 - Qt override
        """Draw the axes, the loss (raw and smoothed) and the validation Dice."""
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        font = QFont(p.font())
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.85))
        p.setFont(font)
        w, h = self.width(), self.height()
        left, right, top, bottom = 40, 34, 8, 18
        area = QRectF(left, top, max(10, w - left - right), max(10, h - top - bottom))
        p.fillRect(self.rect(), QColor(30, 30, 34))
        p.setPen(QPen(QColor(110, 110, 120), 1))
        p.drawRect(area)
        text = QColor(200, 200, 200)
        p.setPen(text)
        p.drawText(QRectF(left, h - bottom + 2, area.width(), bottom - 2),
                   int(Qt.AlignmentFlag.AlignLeft), "0")
        p.drawText(QRectF(left, h - bottom + 2, area.width(), bottom - 2),
                   int(Qt.AlignmentFlag.AlignRight), f"{self.total} steps")
        if self.loss:
            values = [v for _, v in self.loss]
            lo, hi = min(values), max(values)
            if hi - lo < 1e-9:
                lo, hi = lo - 0.5, hi + 0.5
            p.setPen(self.LOSS)
            p.drawText(QRectF(0, top - 4, left - 4, 14), int(Qt.AlignmentFlag.AlignRight),
                       f"{hi:.3g}")
            p.drawText(QRectF(0, top + area.height() - 10, left - 4, 14),
                       int(Qt.AlignmentFlag.AlignRight), f"{lo:.3g}")

            def point(step: int, value: float) -> QPointF:
                x = area.left() + area.width() * step / self.total
                y = area.bottom() - area.height() * (value - lo) / (hi - lo)
                return QPointF(x, y)

            for series, color, width in ((self.loss, self.LOSS_RAW, 1.0),
                                         (self.smooth, self.LOSS, 1.6)):
                path = QPainterPath(point(*series[0]))
                for s, v in series[1:]:
                    path.lineTo(point(s, v))
                p.setPen(QPen(color, width))
                p.drawPath(path)
        p.setPen(self.DICE)
        p.drawText(QRectF(area.right() + 3, top - 4, right, 14), int(Qt.AlignmentFlag.AlignLeft),
                   "1")
        p.drawText(QRectF(area.right() + 3, top + area.height() - 10, right, 14),
                   int(Qt.AlignmentFlag.AlignLeft), "0")
        if self.dice:
            def dpoint(step: int, value: float) -> QPointF:
                x = area.left() + area.width() * step / self.total
                return QPointF(x, area.bottom() - area.height() * value)

            path = QPainterPath(dpoint(*self.dice[0]))
            for s, v in self.dice[1:]:
                path.lineTo(dpoint(s, v))
            p.setPen(QPen(self.DICE, 1.6))
            p.drawPath(path)
            p.setBrush(self.DICE)
            for s, v in self.dice:
                p.drawEllipse(dpoint(s, v), 2.5, 2.5)
            if self.best is not None:
                p.setBrush(Qt.BrushStyle.NoBrush)
                p.setPen(QPen(QColor(255, 255, 255), 1.2))
                p.drawEllipse(dpoint(*self.best), 5.0, 5.0)
        p.setPen(text)
        legend = "— loss   "
        p.setPen(self.LOSS)
        p.drawText(QRectF(area.left() + 6, area.top() + 2, 90, 14),
                   int(Qt.AlignmentFlag.AlignLeft), legend)
        p.setPen(self.DICE)
        p.drawText(QRectF(area.left() + 60, area.top() + 2, 160, 14),
                   int(Qt.AlignmentFlag.AlignLeft), "● validation Dice")
        p.end()


# --------------------------------------------------------------------------- the job


def finetune_job(
    load_model: Callable[[], Any],
    base_source: str | None,
    image: Any,
    axes: str,
    labels: np.ndarray,
    labels_name: str,
    boundary: np.ndarray | None,
    prediction: Any,
    image_name: str,
    config: FinetuneConfig,
    cancel: CancelToken,
    label_meta: Any = None,
) -> Generator[ProgressEvent, None, JobOutcome]:
    """Autosave, load, find the corrections, fine-tune and record the lineage (worker thread).

    Args:
        load_model: returns the starting network (called in the worker).
        base_source: its checkpoint path or tag (recorded for revert), or None.
        image: the image (numpy or dask), axes ``axes``.
        axes: the image's axes.
        labels: a copy of the corrected labels.
        labels_name: the labels layer's name (the autosave's file name).
        boundary: a copy of the corrected boundary layer, or None.
        prediction: ``"model"``, a copy of a prediction layer, or None (see
            :func:`~napari_medseg.engine.training.finetune.prepare_corrections_iter`).
        image_name: the image layer's name.
        config: the settings.
        cancel: Stop sets it; the best weights so far are kept.
        label_meta: the labels' geometry for the autosave, or None.

    Returns:
        An outcome whose value is the :class:`~napari_medseg.engine.training.finetune.FinetuneResult`.
    """
    from ..engine.training.finetune import ReplayStore, finetune_iter, prepare_corrections_iter
    from ..engine.training.lineage import autosave_labels, lineage_root, set_active, unique_checkpoint_path

    def work():
        yield StageEvent("Saving your labels before training.", stage="autosave")
        saved = autosave_labels(labels, labels_name, label_meta)
        if boundary is not None:
            autosave_labels(boundary, f"{labels_name} boundary", label_meta)
        yield NoticeEvent(f"Your labels were saved to {saved}.")
        yield StageEvent("Loading the starting weights.", stage="loading")
        model = load_model()
        samples = yield from prepare_corrections_iter(
            image, labels, model, config, axes=axes, prediction=prediction, boundary=boundary,
            name=image_name, cancel=cancel)
        if cancel.cancelled:
            raise MedsegError("Stopped before training started; nothing was changed.")
        info = getattr(model, "checkpoint_info", None)
        root = lineage_root(info)
        store = ReplayStore()
        replay = []
        if config.replay > 0 and root:
            replay = store.load(root, model.spec.in_channels, config.max_replay,
                                exclude=[s.name for s in samples])
        output = unique_checkpoint_path(f"{model.spec.network}-{image_name}")
        result = yield from finetune_iter(
            model, samples, config, replay=replay, cancel=cancel, output=output,
            data={"image": image_name, "labels": labels_name, "autosave": str(saved),
                  "parent_source": base_source})
        if root:
            store.add(samples, root)
        if result.improved and result.checkpoint is not None:
            new_root = lineage_root(result.info)
            set_active(new_root, str(result.checkpoint.with_suffix(".json")),
                       reason="fine-tuned")
        return result

    return (yield from guard_iter(work))


# --------------------------------------------------------------------------- the widget


def _load_segment(seg: Any, weights: Any, image: Image) -> tuple[Callable[[], Any], str,
                                                                 str | None]:
    """The Segment widget's current network as a loader (its session caches networks)."""
    in_channels = 3 if getattr(image, "rgb", False) else 1
    load = functools.partial(seg.session.load_model, weights, seg.variant_combo.currentText(),
                             in_channels)
    return load, weights.label, weights.source


class FinetuneWidget(LayerListMixin, QWidget):
    """Dock widget fine-tuning a network on the corrections of a Labels layer.

    Args:
        napari_viewer: the viewer it is docked in (injected by napari).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
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

    # ------------------------------------------------------------------ UI ----------
    def _build(self) -> None:
        root = QVBoxLayout(self)
        root.setContentsMargins(6, 6, 6, 6)
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
        self.steps_spin.setToolTip("Optimisation steps at most (early stopping may end "
                                   "sooner).")
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 0.1)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(defaults.lr)
        self.lr_spin.setToolTip("Peak learning rate (AdamW, warm-up then cosine decay).")
        form.addRow("Steps", row_widget(self.steps_spin, QLabel("learning rate"), self.lr_spin))
        self.freeze_check = QCheckBox("freeze encoder")
        self.freeze_check.setToolTip("Train only the decoder and heads: safer with few "
                                     "corrections.")
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

        ckpt_box = QGroupBox("Your checkpoints")
        lay = QVBoxLayout()
        lay.setContentsMargins(4, 4, 4, 4)
        self.checkpoint_list = QListWidget()
        self.checkpoint_list.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.checkpoint_list.setMaximumHeight(120)
        self.checkpoint_list.setToolTip("Fine-tuned checkpoints, newest last; * marks the "
                                        "active one of each model line.")
        lay.addWidget(self.checkpoint_list)
        self.use_button = QPushButton("Use")
        self.use_button.setToolTip("Segment with the selected checkpoint and make it the "
                                   "start of the next fine-tuning.")
        self.revert_button = QPushButton("Revert to parent")
        self.revert_button.setToolTip("Go back to the weights the selected checkpoint was "
                                      "fine-tuned from (nothing is deleted).")
        lay.addWidget(row_widget(self.use_button, self.revert_button))
        ckpt_box.setLayout(lay)
        root.addWidget(ckpt_box)
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
        self.use_button.clicked.connect(self.use_selected)
        self.revert_button.clicked.connect(self.revert_selected)
        self.checkpoint_list.currentRowChanged.connect(self._update_enabled)
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

    def refresh_checkpoints(self) -> None:
        """Fill the checkpoint list from the user data folder (newest last)."""
        from ..engine.training.lineage import active_source, ancestors, list_lineage

        self.checkpoint_list.clear()
        entries = list_lineage()
        self._entries = entries
        for entry in entries:
            active = active_source(entry.root) == entry.source
            item = QListWidgetItem(("* " if active else "  ") + entry.describe())
            chain = ancestors(entry, entries)
            names = [c.name if not isinstance(c, str) else c for c in chain]
            m = entry.info.metrics or {}
            tip = [f"{entry.name} ({entry.info.network}/{entry.info.variant})",
                   "fine-tuned from: " + (" <- ".join(names) if names else "random init"),
                   f"data {entry.info.training_data.get('data_hash', '?')}; "
                   f"{len(entry.info.training_data.get('train_regions', []))} training and "
                   f"{len(entry.info.training_data.get('val_regions', []))} held-out regions",
                   f"validation Dice {m.get('val_dice_before')} -> {m.get('val_dice')}"]
            item.setToolTip("\n".join(tip))
            item.setData(Qt.ItemDataRole.UserRole, entry.source)
            self.checkpoint_list.addItem(item)
        self._update_enabled()

    def _update_enabled(self, *_: Any) -> None:
        running = self.running
        for w in (self.image_combo, self.labels_combo, self.boundary_combo,
                  self.compare_combo, self.base_combo, self.steps_spin, self.lr_spin,
                  self.freeze_check, self.replay_check, self.device_combo):
            w.setEnabled(not running)
        self.start_button.setText("Stop" if running else "Start")
        self.start_button.setEnabled(running or (
            bool(self.image_combo.currentText()) and bool(self.labels_combo.currentText())))
        selected = self.checkpoint_list.currentRow() >= 0
        self.use_button.setEnabled(selected and not running)
        self.revert_button.setEnabled(selected and not running)

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

    def segment_widget(self) -> Any:
        """The Segment widget docked in the same viewer, or None."""
        from .segment_widget import SegmentWidget

        window = getattr(self.viewer, "window", None)
        docked = getattr(window, "dock_widgets", None) if window is not None else None
        if docked is None:
            return None
        for widget in list(docked.values()):
            if isinstance(widget, SegmentWidget):
                return widget
        return None

    def _base_loader(self, image: Image) -> tuple[Callable[[], Any], str, str | None]:
        """A function loading the starting weights (run in the worker), their description
        and their source (path or tag; None for an untrained network)."""
        choice: BaseChoice | None = self.base_combo.currentData()
        if choice is None:
            raise ConfigError("Choose the weights to start from.")
        if choice.kind == "segment":
            seg = self.segment_widget()
            weights = seg.current_weights() if seg is not None else None
            if weights is None:
                others = [self.base_combo.itemData(i) for i in range(1, self.base_combo.count())]
                if not others:
                    raise ConfigError("Open the Segment widget and choose weights there, or "
                                      "pick the weights to start from here.")
                choice = others[0]  # the newest checkpoint of yours, else shipped weights
            else:
                return _load_segment(seg, weights, image)
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
        token = self._job.begin((image.name, labels.name))
        self.plot.clear(config.steps)
        self.last_result = None
        self.events_seen = 0
        self.status_label.setText(f"Starting from {base_label}…")
        worker = start_job(
            finetune_job, load, base_source, result_layers.image_array(image), axes,
            np.array(labels.data, copy=True), labels.name, boundary, prediction, image.name,
            config, token, label_meta, on_done=self._on_done, on_yield=self._on_event,
            cancel_token=token)
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
        """Make the Segment widget use ``source`` and re-predict the current view."""
        seg = self.segment_widget()
        if seg is None:
            window = getattr(self.viewer, "window", None)
            try:
                _, seg = window.add_plugin_dock_widget("napari-medseg", "Segment")
            except Exception:  # noqa: BLE001 - no window, or the plugin is not registered
                return False
        use = getattr(seg, "use_weights", None)
        if use is None:
            return False
        return use(source, image_name=image_name, scope="visible") is not None

    # ---------------------------------------------------------- checkpoints ------------
    def _selected_entry(self) -> Any:
        row = self.checkpoint_list.currentRow()
        entries = getattr(self, "_entries", [])
        return entries[row] if 0 <= row < len(entries) else None

    def use_selected(self) -> bool:
        """Activate the selected checkpoint: Segment uses it, the next fine-tuning starts
        from it."""
        from ..engine.training.lineage import set_active

        entry = self._selected_entry()
        if entry is None:
            return False
        set_active(entry.root, entry.source, reason="used")
        return self._activate(entry.source, f"Using {entry.name}.")

    def revert_selected(self) -> bool:
        """Go back to the selected checkpoint's parent (its checkpoint or shipped weights)."""
        from ..engine.training.lineage import revert

        entry = self._selected_entry()
        if entry is None:
            return False
        try:
            source = revert(entry, self._entries)
        except MedsegError as exc:
            self._error(str(exc))
            return False
        return self._activate(source, f"Reverted to the parent of {entry.name}.")

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

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt override
        """Stop a running fine-tuning when the widget closes (the best weights are kept)."""
        self.stop()
        super().closeEvent(event)
