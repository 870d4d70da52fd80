"""The Segment widget's "Model" box: image, network, variant, weights and device pickers.

:class:`WeightsPanel` lists the networks once the catalogue arrives, offers the weights of the
chosen network (shipped cards, the user's checkpoints, random init), keeps the variant in step
with trained weights, selects weights by their source (a checkpoint path or a card's tag) and
publishes the choice to the viewer's shared :class:`~.viewer_state.ViewerState`.

When an image is chosen, :meth:`WeightsPanel.propose` selects the shipped weights whose model
card matches it best (``engine.matching``) and says why in one line, until the user picks a
network or weights themselves: from then on their choice is kept (the line then names better
matching weights, if any).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import QComboBox, QFileDialog, QGroupBox, QLabel, QToolButton, QWidget

from ..errors import MedsegError
from .viewer_state import ViewerState
from .weights_choices import WeightsChoice, checkpoint_choice, list_weight_choices
from .worker import form_layout, row_widget

__all__ = ["DeviceCombo", "WeightsPanel", "UNTRAINED_TEXT"]

#: The warning shown while an untrained network is chosen.
UNTRAINED_TEXT = (
    "⚠ Untrained network: random weights give meaningless masks. Use it to try the "
    "pipeline, or fine-tune it first.")


class DeviceCombo(QComboBox):
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
            text = _device_text(dev)
            self.addItem(text, dev["name"])
            self.setItemData(self.count() - 1, text, Qt.ItemDataRole.ToolTipRole)
        names = [d["name"] for d in devices]
        if current in names:
            self.setCurrentIndex(names.index(current))
        else:  # a GPU first, if there is one
            gpu = next((i for i, n in enumerate(names) if n != "cpu"), 0)
            self.setCurrentIndex(gpu)
        self.blockSignals(False)

    def showPopup(self) -> None:  # noqa: N802 - Qt override
        """Re-read the devices (their free memory) before the list opens."""
        self.refresh()
        super().showPopup()


def _device_text(dev: dict) -> str:
    name = dev["name"]
    if name == "cpu":
        return f"CPU ({dev.get('threads', '?')} threads)"
    if "free_memory_mb" in dev:
        return (f"{name}  {dev['description']}  {dev['free_memory_mb'] / 1024:.1f} of "
                f"{dev['total_memory_mb'] / 1024:.1f} GiB free")
    return f"{name}  {dev.get('description', '')}".strip()


class WeightsPanel(QGroupBox):
    """The "Model" box of the Segment widget.

    Args:
        state: the viewer's shared state; the chosen weights and variant are published there.

    Signals:
        changed: the weights or variant changed (the plan is then out of date).
        failed: a sentence for the user (an unreadable checkpoint, unknown weights).
    """

    changed = Signal()
    failed = Signal(str)

    def __init__(self, state: ViewerState, parent: QWidget | None = None) -> None:
        super().__init__("Model", parent)
        self.state = state
        self.catalog: dict[str, list[str]] = {}
        form = form_layout()
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The image layer to segment.")
        form.addRow("Image", self.image_combo)
        self.network_combo = QComboBox()
        self.network_combo.setToolTip("The network architecture (each has a model card).")
        self.network_combo.setMinimumContentsLength(10)
        self.network_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.variant_combo = QComboBox()
        self.variant_combo.setToolTip(
            "Size of the network: tiny (tests), lite (CPU-friendly), paper (published). "
            "Fixed by trained weights.")
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
        self.browse_button.setToolTip(
            "Add a checkpoint file (.safetensors or .json) or a package napari-medseg "
            "exported (.zip).")
        form.addRow("Weights", row_widget(self.weights_combo, self.browse_button))
        self.match_label = QLabel("")
        self.match_label.setWordWrap(True)
        self.match_label.setToolTip("Why these weights: the model card's intended images "
                                    "against the image's metadata.")
        form.addRow(self.match_label)
        #: the user picked the network or weights themselves (then no proposal replaces them).
        self.explicit = False
        #: the last proposal made (``engine.matching.Match``), or None.
        self.proposal: Any = None
        #: the installed model cards proposals choose from (read with the catalogue).
        self.cards: list[Any] = []
        self.untrained_label = QLabel(UNTRAINED_TEXT)
        self.untrained_label.setWordWrap(True)
        self.untrained_label.setStyleSheet(
            "color: #ffb000; font-weight: bold; border: 1px solid #ffb000; padding: 3px;")
        form.addRow(self.untrained_label)
        self.device_combo = DeviceCombo()
        self.device_combo.setToolTip("Where the network runs; GPUs show their free memory.")
        form.addRow("Device", self.device_combo)
        self.setLayout(form)
        self.network_combo.currentIndexChanged.connect(self.on_network_changed)
        self.weights_combo.currentIndexChanged.connect(self._on_weights_changed)
        self.variant_combo.currentIndexChanged.connect(self._on_variant_changed)
        self.browse_button.clicked.connect(self._browse_checkpoint)
        self.network_combo.activated.connect(self.keep_user_choice)
        self.weights_combo.activated.connect(self.keep_user_choice)

    # -- lists -------------------------------------------------------------------------
    def set_catalog(self, networks: dict[str, list[str]], devices: list[dict]) -> None:
        """Show the registered networks (starting on one with trained weights installed)
        and the devices."""
        from ..engine.matching import installed_cards

        self.catalog = networks
        self.cards = installed_cards()  # read once: proposals rank them on every image
        self.device_combo.refresh(devices)
        self.network_combo.blockSignals(True)
        self.network_combo.clear()
        self.network_combo.addItems(list(networks))
        trained = next((n for n in networks if any(
            c.installed and not c.untrained for c in list_weight_choices(n))), None)
        if trained is not None:
            self.network_combo.setCurrentText(trained)
        self.network_combo.blockSignals(False)
        self.on_network_changed()

    def on_network_changed(self, *_: Any) -> None:
        """List the chosen network's variants and weights."""
        network = self.network_combo.currentText()
        if not network or not self.catalog:
            return
        self.variant_combo.blockSignals(True)
        current = self.variant_combo.currentText()
        self.variant_combo.clear()
        variants = list(self.catalog.get(network, ()))
        self.variant_combo.addItems(variants)
        self.variant_combo.setCurrentText(current if current in variants else (
            "lite" if "lite" in variants else variants[0]))
        self.variant_combo.blockSignals(False)
        self.fill_weights(list_weight_choices(network))

    def fill_weights(self, choices: list[WeightsChoice], select: int | None = None) -> None:
        """Offer ``choices``; select ``select`` (default: installed trained weights first,
        else random init)."""
        self.weights_combo.blockSignals(True)
        self.weights_combo.clear()
        for choice in choices:
            self.weights_combo.addItem(choice.label, choice)
            self.weights_combo.setItemData(self.weights_combo.count() - 1,
                                           choice.detail or choice.label,
                                           Qt.ItemDataRole.ToolTipRole)
        if select is None:
            select = next((i for i, c in enumerate(choices) if c.installed and not c.untrained),
                          len(choices) - 1)
        self.weights_combo.setCurrentIndex(select)
        self.weights_combo.blockSignals(False)
        self._on_weights_changed()

    def current_weights(self) -> WeightsChoice | None:
        """The chosen weights."""
        return self.weights_combo.currentData()

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
        self._publish()

    def _on_variant_changed(self, *_: Any) -> None:
        self._publish()

    def _publish(self) -> None:
        self.state.choose(self.current_weights(), self.variant_combo.currentText())
        self.changed.emit()

    # -- matching the image ------------------------------------------------------------
    def keep_user_choice(self, *_: Any) -> None:
        """The user picked the weights (from the lists, or through a request such as the
        Fine-tune widget's or the demo's ``--weights``): keep them from now on and say so
        (no proposal's reason stays shown for weights it did not propose)."""
        self.explicit = True
        choice = self.current_weights()
        if choice is not None:
            self._show_match(f"Your choice ({choice.label}) is kept for every image.",
                             warn=False)

    def propose(self, traits: Any) -> Any:
        """Select the shipped weights that best match an image (``ImageTraits``), unless the
        user chose; show why in one line. Returns the proposal (None without cards)."""
        from ..engine.matching import best_weights

        if not self.catalog:
            return None
        match = self.proposal = best_weights(traits, self.cards)
        if match is None:
            self.match_label.setText("")
            return None
        current = self.current_weights()
        if self.explicit:
            if current is None:
                self._show_match("", warn=False)
            elif current.source != match.tag and not match.guess:
                self._show_match(f"Your choice ({current.label}) is kept; {match.tag} matches "
                                 "this image better.", warn=True)
            else:
                self._show_match(f"Your choice ({current.label}) is kept for every image.",
                                 warn=False)
            return match
        if current is None or current.source != match.tag:
            self.select_source(match.tag)
        self._show_match(match.reason, warn=match.guess)
        return match

    def _show_match(self, text: str, warn: bool) -> None:
        self.match_label.setStyleSheet("color: #ffb000;" if warn else "")
        self.match_label.setText(("⚠ " if warn and text else "") + text)

    # -- checkpoints -------------------------------------------------------------------
    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Add a checkpoint", "",
            "napari-medseg checkpoints and packages (*.safetensors *.json *.zip)")
        if path:
            self.add_checkpoint(path)

    def add_checkpoint(self, path: str) -> bool:
        """Add a checkpoint file to the weights list and select it (its network too); a
        checkpoint added is the user's choice from then on."""
        self.explicit = True
        try:
            choice = checkpoint_choice(path)
        except MedsegError as exc:
            self.failed.emit(str(exc))
            return False
        self.network_combo.setCurrentText(choice.network)
        choices = list_weight_choices(choice.network)
        choices.insert(len(choices) - 1, choice)
        self.fill_weights(choices, select=len(choices) - 2)
        return True

    def select_source(self, source: str) -> bool:
        """Select the weights of ``source`` (a checkpoint path or a model card's tag) and
        their network; a checkpoint not listed yet is added. False (with a message) when
        there are no such weights."""
        from ..engine.checkpoints import checkpoint_paths, list_model_cards
        from ..engine.packages import is_package

        weights_file, description = checkpoint_paths(source)
        if weights_file.is_file() or description.is_file() or is_package(source):
            try:
                network = checkpoint_choice(source).network
            except MedsegError as exc:
                self.failed.emit(str(exc))
                return False
            self.network_combo.setCurrentText(network)
            self.on_network_changed()  # the list again: the checkpoint may be new
            index = self._index_of({str(description), str(weights_file), str(Path(source))})
            if index is None:
                return self.add_checkpoint(source)
        else:
            card = next((c for c in list_model_cards() if c.tag == source), None)
            if card is None:
                self.failed.emit(f"Unknown weights {source!r}.")
                return False
            self.network_combo.setCurrentText(card.network)
            index = self._index_of({source})
            if index is None:
                self.failed.emit(f"The weights {source!r} are not in the list.")
                return False
        self.weights_combo.setCurrentIndex(index)
        return True

    def _index_of(self, sources: set[str]) -> int | None:
        return next((i for i in range(self.weights_combo.count())
                     if getattr(self.weights_combo.itemData(i), "source", None) in sources),
                    None)
