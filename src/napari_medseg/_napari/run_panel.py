"""The Segment widget's "Run" box: what to segment, and how; a new threshold re-derives masks.

:class:`RunPanel` holds the run settings (scope, tile, overlap, blending, TTA, the extra
outputs to show, the threshold), which the Segment widget reads. Moving the threshold
re-derives the masks of its *host* (the Segment widget) from the kept probabilities
(``SegmentSession.rethreshold``, in a worker, debounced; no new run), through the host's
public methods (``current_image``, ``start_worker``, ``report_error``, ``refresh_enabled``,
``update_metrics``) and attributes (``viewer``, ``session``, ``status_label``, ``running``).
"""

from __future__ import annotations

import functools
from typing import Any

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QGroupBox,
    QLabel,
    QSpinBox,
    QWidget,
)
from superqt import QLabeledDoubleSlider

from ..config import BLEND_MODES, TilingConfig
from . import result_layers
from .worker import JobOutcome, form_layout, guarded, row_widget

__all__ = ["SCOPES", "RunPanel"]

#: Scope key -> label in the picker.
SCOPES = {
    "slice": "current slice",
    "visible": "visible region",
    "whole": "whole image",
}


class RunPanel(QGroupBox):
    """The "Run" box of ``host``: scope, tiling, options, outputs to show and the threshold.

    Attributes:
        threshold_timer: debounces the threshold slider.
    """

    def __init__(self, host: Any, parent: QWidget | None = None) -> None:
        super().__init__("Run", parent)
        self.host = host
        self._threshold_busy = False
        self._threshold_pending = False
        form = form_layout()
        self.scope_combo = QComboBox()
        for key, text in SCOPES.items():
            self.scope_combo.addItem(text, key)
        self.scope_combo.setCurrentIndex(2)
        self.scope_combo.setToolTip(
            "What to segment: the slice on screen, the part of it visible on the canvas, "
            "or everything. Results of several runs accumulate in the same layers.")
        form.addRow("Scope", self.scope_combo)
        self._add_tiling(form)
        self.tta_check = QCheckBox("flip TTA")
        self.tta_check.setToolTip("Average over flipped copies: 4x the time in 2D; gives the "
                                  "TTA variance (where to correct first). Starts on for "
                                  "weights whose thresholds were tuned with it (`napari-medseg "
                                  "models` lists them).")
        self.probs_check = QCheckBox("probabilities")
        self.probs_check.setToolTip("Add the probabilities as an Image layer.")
        self.variance_check = QCheckBox("TTA variance")
        self.variance_check.setToolTip("Add the disagreement of the TTA passes (needs TTA).")
        self.sr_check = QCheckBox("super-resolved")
        self.sr_check.setToolTip(
            "Super-resolution networks (SASR-Net): the outputs at twice the image's size "
            "instead of on the image's grid.")
        form.addRow("Options", row_widget(self.tta_check, self.sr_check, stretch=1))
        self.diameter_spin = QDoubleSpinBox()
        self.diameter_spin.setRange(0.0, 1000.0)
        self.diameter_spin.setDecimals(1)
        self.diameter_spin.setSingleStep(1.0)
        self.diameter_spin.setSpecialValueText("auto")
        self.diameter_spin.setSuffix(" px")
        self.diameter_spin.setToolTip(
            "Typical object diameter in the image, for weights that learnt objects: the "
            "image is resampled so they reach the network at the size it learnt. auto "
            "measures them with a first pass on the image's centre.")
        form.addRow("Diameter", self.diameter_spin)
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
        self.setLayout(form)
        self.threshold_timer = QTimer(self)
        self.threshold_timer.setSingleShot(True)
        self.threshold_timer.setInterval(150)
        self.threshold_timer.timeout.connect(self.apply_threshold)
        self.threshold_slider.valueChanged.connect(self._on_threshold_changed)

    def _add_tiling(self, form) -> None:
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(0, 4096)
        self.tile_spin.setSingleStep(32)
        self.tile_spin.setSpecialValueText("auto")
        self.tile_spin.setSuffix(" px")
        self.tile_spin.setToolTip("Tile side; auto uses the tile the weights' card records, "
                                  "else the network's preferred tile. Rounded to what the "
                                  "network accepts, clamped to the image.")
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

    def set_whole_label(self, volume: bool) -> None:
        """Name the whole-image scope after the image (``whole volume`` for 3D and more)."""
        self.scope_combo.setItemText(2, "whole volume" if volume else "whole image")

    def _on_threshold_changed(self, *_: Any) -> None:
        image = self.host.current_image()
        if image is not None and self.host.session.cache_for(image.name) is not None:
            self.threshold_timer.start()

    def apply_threshold(self) -> None:
        """Re-derive the host image's masks at the slider's threshold (in a worker)."""
        host = self.host
        image = host.current_image()
        if image is None or host.session.cache_for(image.name) is None or host.running:
            return
        if self._threshold_busy:
            self._threshold_pending = True
            return
        self._threshold_busy = True
        threshold = round(float(self.threshold_slider.value()), 4)
        host.start_worker(guarded, host.session.rethreshold, image.name, threshold,
                          on_done=functools.partial(self._on_threshold_done, image.name,
                                                    threshold))

    def _on_threshold_done(self, image_name: str, threshold: float,
                           outcome: JobOutcome) -> None:
        host = self.host
        self._threshold_busy = False
        if not outcome.ok:
            host.report_error(outcome.error or "The threshold could not be applied.")
        elif image_name in host.viewer.layers:
            result_layers.apply_masks(host.viewer, host.viewer.layers[image_name],
                                      outcome.value, host.session, f"threshold {threshold:.2f}")
            host.status_label.setText(f"Mask re-derived at threshold {threshold:.2f}.")
            host.update_metrics()  # shows nothing without a reference
        host.refresh_enabled()
        if self._threshold_pending:
            self._threshold_pending = False
            self.apply_threshold()
