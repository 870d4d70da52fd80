"""The Segment widget's "Boundary tools" and "Metrics" boxes, with the jobs behind them.

:class:`ToolsPanel` derives the boundary layer from the (edited) mask and splits the mask into
instances (:func:`~napari_medseg.engine.inference.postprocess.boundary_per_block` and
:func:`~napari_medseg.engine.inference.postprocess.instances_per_block`, per ``T``/``I``
block, in workers; undoable). :class:`MetricsPanel` scores the mask against a reference
layer (:func:`~napari_medseg.engine.training.evaluate.reference_scores`, in a worker) and shows
the per-class table, plus the object scores (F1 and AP at IoU 0.5, DSB score, AJI) when the
reference holds instance labels. Both work for a *host*: the Segment widget, through its
public methods (``current_image``, ``start_worker``, ``report_error``, ``refresh_enabled``)
and attributes (``viewer``, ``session``, ``status_label``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from napari.layers import Image, Labels

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QGroupBox,
    QHeaderView,
    QLabel,
    QPushButton,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..engine.inference.regions import Region, whole_region
from . import result_layers
from .worker import JobOutcome, guarded, row_widget

__all__ = ["ToolsPanel", "MetricsPanel", "NO_REFERENCE", "label_output"]

#: The reference picker's "no reference" entry.
NO_REFERENCE = "(none)"
_UNITS = {"pixel": "px", "micrometer": "µm", "millimeter": "mm", "nanometer": "nm"}


_NO_MASK = "Segment the image first; the boundary tools work on its mask layer."
#: The object row of the metrics box: header -> key of the engine's object scores.
_OBJECT_COLUMNS = (("objects", ""), ("Dice", "dice"), ("F1@0.5", "f1_iou50"),
                   ("AP@0.5", "ap_iou50"), ("DSB", "dsb_score"), ("AJI", "aji"))
#: The caption's words for where the scored objects came from.
_SOURCE_WORDS = {"instances": "Objects: the instances layer against the reference's labels.",
                 "components": "Objects: the connected components of the mask (no instances "
                               "layer) against the reference's labels."}


def label_output(viewer: Any, image: Image | None, output: str) -> Labels | None:
    """The Labels layer holding ``output`` (``mask``, ``boundary`` ...) of ``image``."""
    if image is None:
        return None
    layer = result_layers.find_output(viewer, image.name, output)
    return layer if isinstance(layer, Labels) else None


class ToolsPanel(QGroupBox):
    """The "Boundary tools" box of ``host`` (the Segment widget)."""

    def __init__(self, host: Any, parent: QWidget | None = None) -> None:
        super().__init__("Boundary tools", parent)
        self.host = host
        lay = QVBoxLayout()
        lay.setContentsMargins(4, 4, 4, 4)
        self.boundary_button = QPushButton("Boundary from mask")
        self.boundary_button.setToolTip("Re-derive the boundary layer from the (edited) mask.")
        self.instances_button = QPushButton("Instances (watershed)")
        self.instances_button.setToolTip("Split the mask into objects along the boundary layer "
                                         "(watershed), into an instances layer.")
        lay.addWidget(row_widget(self.boundary_button, self.instances_button))
        self.setLayout(lay)
        self.boundary_button.clicked.connect(self.boundary_from_mask)
        self.instances_button.clicked.connect(self.instances_from_mask)

    def boundary_from_mask(self) -> Any:
        """Derive the boundary layer from the mask layer (in a worker; undoable)."""
        from ..engine.inference.postprocess import boundary_per_block

        found = self._mask("Deriving the boundary from the mask…")
        if found is None:
            return None
        image, mask, axes = found
        return self.host.start_worker(
            guarded, boundary_per_block, np.array(mask.data), axes,
            on_done=functools.partial(self._on_done, image.name, "boundary",
                                      "boundary from mask"))

    def instances_from_mask(self) -> Any:
        """Split the mask into instances along the boundary layer (watershed; undoable)."""
        from ..engine.inference.postprocess import instances_per_block

        found = self._mask("Splitting the mask into instances…")
        if found is None:
            return None
        image, mask, axes = found
        boundary = label_output(self.host.viewer, image, "boundary")
        return self.host.start_worker(
            guarded, instances_per_block, np.array(mask.data),
            None if boundary is None else np.array(boundary.data), axes, 8,
            on_done=functools.partial(self._on_done, image.name, "instances", "instances"))

    def _count_instances(self, instances: Any, axes: str) -> None:
        """Show how many objects the instances hold (counted in a worker, per T/I block)."""
        from ..engine.inference.postprocess import count_per_block

        def shown(outcome: JobOutcome) -> None:
            if outcome.ok:
                self.host.status_label.setText(f"{outcome.value} instance(s) found.")

        self.host.start_worker(guarded, count_per_block, instances, axes, on_done=shown)

    def _mask(self, status: str) -> tuple[Image, Labels, str] | None:
        """The host's image, its mask layer and the mask's axes (``status`` then shows), or
        None with an error when there is no mask yet."""
        host = self.host
        image = host.current_image()
        mask = label_output(host.viewer, image, "mask")
        if mask is None:
            host.report_error(_NO_MASK)
            return None
        host.status_label.setText(status)
        return image, mask, result_layers.image_axes(image).replace("C", "")

    def _on_done(self, image_name: str, output: str, label: str, outcome: JobOutcome) -> None:
        host = self.host
        if not outcome.ok:
            host.report_error(outcome.error or f"{label} failed.")
            return
        if image_name not in host.viewer.layers:
            return
        result_layers.apply_array(host.viewer, host.viewer.layers[image_name], output,
                                  outcome.value, host.session, label)
        if output == "instances":
            self._count_instances(outcome.value, result_layers.image_axes(
                host.viewer.layers[image_name]).replace("C", ""))
        else:
            host.status_label.setText("Boundary re-derived from the mask.")
        host.refresh_enabled()


class MetricsPanel(QGroupBox):
    """The "Metrics" box of ``host``: a reference Labels layer and the scores against it.

    Attributes:
        last_scores: the scores last shown (class -> metric -> value), or None.
        last_object_scores: the object scores last shown (``dice``, ``f1_iou50``,
            ``ap_iou50``, ``dsb_score``, ``aji``, ``tp``, ``fp``, ``fn``), or None when the
            reference held no instances.
        last_object_source: where those objects came from: ``"instances"`` (the image's
            instances layer) or ``"components"`` (connected components of the mask).
    """

    def __init__(self, host: Any, parent: QWidget | None = None) -> None:
        super().__init__("Metrics", parent)
        self.host = host
        self.last_scores: dict[int, dict[str, float]] | None = None
        self.last_object_scores: dict[str, float] | None = None
        self.last_object_source = ""
        self._generation = 0
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
        self.metrics_table = table = QTableWidget(0, 5)
        table.setHorizontalHeaderLabels(["class", "Dice", "IoU", "HD95", "BF1"])
        table.verticalHeader().setVisible(False)
        table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        header = table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(3, QHeaderView.ResizeMode.ResizeToContents)
        table.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        table.setVisible(False)
        lay.addWidget(table)
        self.objects_table = objects = QTableWidget(0, len(_OBJECT_COLUMNS))
        objects.setHorizontalHeaderLabels([title for title, _key in _OBJECT_COLUMNS])
        objects.setToolTip("The reference holds instance labels: objects match at IoU > 0.5 "
                           "(F1, AP = TP/(TP+FP+FN)); DSB = AP averaged over IoU 0.5 ... "
                           "0.95; AJI; Dice of the foreground.")
        objects.verticalHeader().setVisible(False)
        objects.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        objects.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        objects.setVisible(False)
        lay.addWidget(objects)
        self.metrics_caption = QLabel("")
        self.metrics_caption.setWordWrap(True)
        lay.addWidget(self.metrics_caption)
        self.setLayout(lay)
        self.reference_combo.currentIndexChanged.connect(self.refresh_scores)
        self.reference_combo.activated.connect(self._on_user_pick)
        self.metrics_button.clicked.connect(self.refresh_scores)
        #: the reference proposed for the current image, and whether the user picked one.
        self._preferred: str | None = None
        self._picked = False

    def _on_user_pick(self, *_: Any) -> None:
        self._picked = True

    def refresh_scores(self, *_: Any) -> Any:
        """Score the host's mask against the chosen reference layer (in a worker).

        Returns:
            The worker, or None when there is nothing to score (a message says why).
        """
        from ..engine.training.evaluate import reference_scores

        self._generation += 1
        host = self.host
        image = host.current_image()
        if self.reference is None or image is None:
            self.show_message("")
            return None
        mask = label_output(host.viewer, image, "mask")
        if mask is None:
            self.show_message("Segment the image to compare it with the reference.")
            return None
        ref = host.viewer.layers[self.reference]
        if tuple(np.shape(ref.data)) != tuple(np.shape(mask.data)):
            self.show_message(
                f"The reference {ref.name!r} ({tuple(np.shape(ref.data))}) is not on the "
                f"mask's grid {tuple(np.shape(mask.data))}; no scores.")
            return None
        axes = result_layers.image_axes(image).replace("C", "")
        region = host.session.last_region.get(image.name, whole_region(np.shape(mask.data)))
        key = region.slices
        unit = str(tuple(mask.units)[-1]) if getattr(mask, "units", None) else "pixel"
        # Objects (for an instance reference): the instances layer, else the mask's components.
        inst = label_output(host.viewer, image, "instances")
        if inst is not None and tuple(np.shape(inst.data)) != tuple(np.shape(mask.data)):
            inst = None
        self.metrics_caption.setText("Computing…")
        return host.start_worker(
            guarded, reference_scores, np.array(mask.data[key]), np.asarray(ref.data[key]),
            axes, host.session.num_classes.get(image.name, 1),
            tuple(float(s) for s in mask.scale), None if inst is None else np.array(
                inst.data[key]),
            on_done=functools.partial(self._on_done, self._generation, region, axes, unit,
                                      "components" if inst is None else "instances"))

    def _on_done(self, generation: int, region: Region, axes: str, unit: str, source: str,
                 outcome: JobOutcome) -> None:
        if generation != self._generation:
            return
        if not outcome.ok:
            self.show_message(outcome.error or "")
            return
        self.last_scores = outcome.value["classes"]
        self.last_object_scores = objects = outcome.value["objects"]
        self.last_object_source = source if objects is not None else ""
        caption = f"Over {region.describe(axes)} of the mask."
        if objects is not None:
            caption += " " + _SOURCE_WORDS[source]
        self.show_scores(self.last_scores, unit, caption)
        self.show_objects(objects, source)

    @property
    def reference(self) -> str | None:
        """The chosen reference layer's name, or None."""
        name = self.reference_combo.currentText()
        return None if name in ("", NO_REFERENCE) else name

    def set_references(self, names: list[str], prefer: str | None = None) -> None:
        """Offer ``names``, keeping the chosen one when it is still there.

        With ``prefer`` (another image was chosen) the choice starts again: ``prefer`` (the
        image's annotation, say) whenever it is there and the user has not picked a
        reference for this image, else none.
        """
        if prefer is not None:
            self._preferred, self._picked = prefer, False
        ref = self.reference_combo.currentText() if prefer is None else prefer
        if ref not in names and not self._picked and self._preferred in names:
            ref = self._preferred
        self.reference_combo.blockSignals(True)
        self.reference_combo.clear()
        self.reference_combo.addItems([NO_REFERENCE] + names)
        self.reference_combo.setCurrentText(ref if ref in names else NO_REFERENCE)
        self.reference_combo.blockSignals(False)

    def show_message(self, text: str) -> None:
        """Hide the tables and show ``text`` instead."""
        self.metrics_table.setVisible(False)
        self.objects_table.setVisible(False)
        self.metrics_caption.setText(text)

    def show_objects(self, scores: dict[str, float] | None, source: str) -> None:
        """Fill the object row (``source``: instances or components), or hide it (None)."""
        table = self.objects_table
        if scores is None:
            table.setVisible(False)
            return
        table.setRowCount(1)
        cells = [source] + [f"{scores[key]:.3f}" for _title, key in _OBJECT_COLUMNS[1:]]
        for col, text in enumerate(cells):
            item = QTableWidgetItem(text)
            item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
            table.setItem(0, col, item)
        _fit_height(table)
        table.setVisible(True)

    def show_scores(self, scores: dict[int, dict[str, Any]], unit: str, caption: str) -> None:
        """Fill the table: one row per class (Dice, IoU, HD95 in ``unit``, boundary F1)."""
        table = self.metrics_table
        table.setRowCount(len(scores))
        unit = _UNITS.get(unit, unit)
        table.setHorizontalHeaderLabels(["class", "Dice", "IoU", f"HD95 ({unit})", "BF1"])
        for row, (cls, values) in enumerate(sorted(scores.items())):
            hd = values["hd95"]
            cells = [str(cls), f"{values['dice']:.3f}", f"{values['iou']:.3f}",
                     "∞" if math.isinf(hd) else f"{hd:.2f}", f"{values['boundary_f1']:.3f}"]
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                table.setItem(row, col, item)
        _fit_height(table)
        table.setVisible(True)
        self.metrics_caption.setText(caption)


def _fit_height(table: QTableWidget) -> None:
    """As tall as its header and first rows (up to 6; more scroll)."""
    rows = sum(table.rowHeight(r) for r in range(min(table.rowCount(), 6)))
    table.setFixedHeight(table.horizontalHeader().height() + rows + 2 * table.frameWidth())
