"""The Fine-tune widget's "Your checkpoints" box: the fine-tuned checkpoints and their lineage.

:class:`LineagePanel` lists the user's checkpoints (newest last; ``*`` marks the active member
of each model line; the tooltip gives the chain of parents, the data and the validation
Dice). *Use* activates the selected entry; *Revert to parent* goes back to the weights it was
fine-tuned from (nothing is deleted). Either emits :attr:`LineagePanel.activated` with the
weights to use now. *Export* writes the selected checkpoint as a bioimage.io model package
(:mod:`napari_medseg.engine.export.bioimageio`, in a thread worker) and emits
:attr:`LineagePanel.exported` with a sentence saying where.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QGroupBox,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..errors import MedsegError
from .worker import guarded, row_widget, start_job

__all__ = ["LineagePanel"]


def _tooltip(entry: Any, entries: list[Any]) -> str:
    from ..engine.training.lineage import ancestors

    names = [c.name if not isinstance(c, str) else c for c in ancestors(entry, entries)]
    m = entry.info.metrics or {}
    data = entry.info.training_data
    return "\n".join([
        f"{entry.name} ({entry.info.network}/{entry.info.variant})",
        "fine-tuned from: " + (" <- ".join(names) if names else "random init"),
        f"data {data.get('data_hash', '?')}; {len(data.get('train_regions', []))} training "
        f"and {len(data.get('val_regions', []))} held-out regions",
        f"validation Dice {m.get('val_dice_before')} -> {m.get('val_dice')}"])


class LineagePanel(QGroupBox):
    """The "Your checkpoints" box.

    Signals:
        activated: ``(source, message)``: these weights are the ones to use now.
        failed: a sentence for the user.
        selection_changed: the selected row changed.
        exported: a sentence naming the package an export wrote.
    """

    activated = Signal(str, str)
    failed = Signal(str)
    exported = Signal(str)
    selection_changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Your checkpoints", parent)
        self.entries: list[Any] = []
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
        self.export_button = QPushButton("Export")
        self.export_button.setToolTip(
            "Write the selected checkpoint as a bioimage.io model package (.zip) that other "
            "tools, and napari-medseg's --weights, open.")
        self.export_worker: Any = None
        lay.addWidget(row_widget(self.use_button, self.revert_button, self.export_button))
        self.setLayout(lay)
        self.export_button.clicked.connect(lambda: self.export_selected())
        self.use_button.clicked.connect(self.use_selected)
        self.revert_button.clicked.connect(self.revert_selected)
        self.checkpoint_list.currentRowChanged.connect(self.selection_changed)

    def refresh(self) -> None:
        """Fill the list from the user data folder (newest last)."""
        from ..engine.training.lineage import active_source, list_lineage

        self.checkpoint_list.clear()
        self.entries = list_lineage()
        for entry in self.entries:
            active = active_source(entry.root) == entry.source
            item = QListWidgetItem(("* " if active else "  ") + entry.describe())
            item.setToolTip(_tooltip(entry, self.entries))
            item.setData(Qt.ItemDataRole.UserRole, entry.source)
            self.checkpoint_list.addItem(item)
        self.selection_changed.emit()

    def set_enabled(self, enabled: bool) -> None:
        """Enable Use and Revert when ``enabled`` and an entry is selected."""
        selected = self.checkpoint_list.currentRow() >= 0
        self.use_button.setEnabled(selected and enabled)
        self.revert_button.setEnabled(selected and enabled)
        self.export_button.setEnabled(selected and self.export_worker is None)

    def selected_entry(self) -> Any:
        """The selected lineage entry, or None."""
        row = self.checkpoint_list.currentRow()
        return self.entries[row] if 0 <= row < len(self.entries) else None

    def use_selected(self) -> bool:
        """Activate the selected checkpoint: Segment uses it, the next fine-tuning starts
        from it."""
        from ..engine.training.lineage import set_active

        entry = self.selected_entry()
        if entry is None:
            return False
        set_active(entry.root, entry.source, reason="used")
        self.activated.emit(entry.source, f"Using {entry.name}.")
        return True

    def revert_selected(self) -> bool:
        """Go back to the selected checkpoint's parent (its checkpoint or shipped weights)."""
        from ..engine.training.lineage import revert

        entry = self.selected_entry()
        if entry is None:
            return False
        try:
            source = revert(entry, self.entries)
        except MedsegError as exc:
            self.failed.emit(str(exc))
            return False
        self.activated.emit(source, f"Reverted to the parent of {entry.name}.")
        return True

    def export_selected(self, path: str | None = None) -> Any:
        """Export the selected checkpoint to ``path`` (asked for when None) in a worker;
        returns the worker, or None when nothing was started."""
        from ..engine.export.bioimageio import export_bioimageio

        entry = self.selected_entry()
        if entry is None or self.export_worker is not None:
            return None
        if path is None:
            # The dialog asks before replacing an existing file; the package is never one
            # of the checkpoint's own files (the engine refuses that).
            path, _ = QFileDialog.getSaveFileName(
                self, "Export as a bioimage.io package", f"{entry.name.replace('/', '_')}.zip",
                "bioimage.io model packages (*.zip)")
            if not path:
                return None
        self.export_button.setEnabled(False)
        self.export_worker = start_job(guarded, export_bioimageio, entry.source, path,
                                       overwrite=True, on_done=self._export_done)
        return self.export_worker

    def _export_done(self, outcome: Any) -> None:
        self.export_worker = None
        self.export_button.setEnabled(self.checkpoint_list.currentRow() >= 0)
        if outcome.ok:
            self.exported.emit(f"Exported {outcome.value.path} (bioimage.io package, test "
                               f"tensors from the {outcome.value.sample} sample).")
        else:
            self.failed.emit(outcome.error)
