"""The Batch widget: builds, runs a tiny folder in a thread worker, fills the table, cancels,
and a click on a row opens the image and its result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_medseg.engine.batch.run import MANIFEST_NAME, PARTIAL_PREFIX
from napari_medseg.engine.checkpoints import save_checkpoint
from napari_medseg.io import ImageMeta, write_image

TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny two-class msa2net checkpoint."""
    from napari_medseg.models import create_model

    torch.manual_seed(0)
    model = create_model("msa2net", "tiny", 1, 2)
    folder = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(model, folder / "tiny", dtype="float32")
    return folder / "tiny.safetensors"


def _image(shape, seed) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


@pytest.fixture
def folder(tmp_path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    write_image(src / "a.tif", _image((64, 64), 1),
                ImageMeta(axes="YX", spacing=(0.5, 0.25), units=("micrometer", "micrometer")))
    write_image(src / "b.png", _image((64, 64), 2))
    (src / "fake.tif").write_text("not an image\n")
    (src / "notes.txt").write_text("hello\n")
    return src


@pytest.fixture
def widget(make_napari_viewer, qtbot):
    from napari_medseg._napari.batch_widget import BatchWidget

    viewer = make_napari_viewer()
    w = BatchWidget(viewer)
    qtbot.addWidget(w)
    yield w
    if w.running:  # never leave a thread behind
        w.cancel()
        qtbot.waitUntil(lambda: not w.running, timeout=TIMEOUT_MS)


def _fill(w, folder: Path, out: Path, checkpoint: Path) -> None:
    from napari_medseg._napari.batch_widget import CHECKPOINT_FILE

    w.input_dir.value = folder
    w.output_dir.value = out
    w.weights.value = CHECKPOINT_FILE
    w.checkpoint.value = checkpoint
    w.device.value = "cpu"


def _table(w) -> dict[str, tuple[str, str]]:
    rows = {}
    for r in range(w.table.rowCount()):
        rows[w.table.item(r, 0).text()] = (w.table.item(r, 1).text(), w.table.item(r, 2).text())
    return rows


def test_widget_builds_and_says_what_is_missing(widget, tmp_path, checkpoint):
    from napari_medseg._napari.batch_widget import CHECKPOINT_FILE, COLUMNS
    from napari_medseg.errors import ConfigError

    assert widget.input_dir.mode.value == "d" and widget.output_dir.mode.value == "d"
    assert CHECKPOINT_FILE in widget.weights.choices
    assert "cpu" in widget.device.choices and "auto" in widget.device.choices
    assert widget.table.columnCount() == len(COLUMNS)
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    with pytest.raises(ConfigError, match="input folder"):
        widget.config()
    widget.input_dir.value = tmp_path
    widget.output_dir.value = tmp_path / "out"
    widget.weights.value = CHECKPOINT_FILE
    with pytest.raises(ConfigError, match="checkpoint file"):
        widget.config()
    assert widget.run() is None and "checkpoint file" in widget.status.value  # no traceback
    widget.checkpoint.value = checkpoint
    widget.pattern.value = "*.tif"
    widget.format.value = "nii"
    in_dir, out_dir, config = widget.config()
    assert (config.weights, config.pattern, config.format) == (str(checkpoint), "*.tif", "nii")


def test_widget_runs_a_folder_and_a_row_click_opens_image_and_result(widget, folder, tmp_path,
                                                                    checkpoint, qtbot):
    from napari.layers import Image, Labels
    from qtpy.QtCore import Qt

    out = tmp_path / "out"
    _fill(widget, folder, out, checkpoint)
    seen = []
    worker = widget.run()
    assert worker is not None and widget.running and widget.cancel_button.enabled
    worker.yielded.connect(lambda e: seen.append((getattr(e, "name", None),
                                                  widget.table.rowCount())))
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)

    summary = widget.summary
    assert summary is not None and (summary.done, summary.failed, summary.ignored) == (2, 1, 1)
    rows = _table(widget)
    assert {n: s for n, (s, _) in rows.items()} == {
        "a.tif": "done", "b.png": "done", "fake.tif": "failed", "notes.txt": "not an image"}
    assert rows["a.tif"][1].endswith(" s") and rows["notes.txt"][1] == ""
    assert widget.table.item(widget._rows["fake.tif"], 1).toolTip()  # why it failed
    assert any(count > 0 for _, count in seen)  # the table filled while the run went on
    assert widget.progress.value == widget.progress.max == 3
    assert json.loads((out / MANIFEST_NAME).read_text())["summary"]["done"] == 2
    assert widget.run_button.enabled and not widget.cancel_button.enabled

    # A click on a row opens the image and its result, with the file's geometry.
    table = widget.table
    rect = table.visualItemRect(table.item(widget._rows["a.tif"], 0))
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    layers = {layer.name: layer for layer in widget.viewer.layers}
    assert isinstance(layers.get("a"), Image) and isinstance(layers.get("a_mask"), Labels)
    np.testing.assert_allclose(layers["a_mask"].scale, (0.5, 0.25))
    assert layers["a_mask"].data.shape == (64, 64)
    # A second click does not open the same files twice.
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert len(widget.viewer.layers) == 2
    # The failed file cannot be opened: a message, no layer, no exception.
    assert widget.open_row(widget._rows["fake.tif"]) == []
    assert "not a TIFF" in widget.status.value
    assert widget.open_row(widget._rows["notes.txt"]) == []
    assert len(widget.viewer.layers) == 2

    # A second run skips what the first finished.
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert widget.summary.skipped == 2
    assert _table(widget)["a.tif"][0] == "done earlier"


def test_widget_cancel_stops_and_leaves_nothing_half_written(widget, tmp_path, checkpoint,
                                                             qtbot):
    from napari_medseg.engine.batch.run import FileEvent

    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):  # several batches of 256 x 256 tiles each
        write_image(src / f"big{i}.tif", _image((640, 640), i))
    out = tmp_path / "out"
    _fill(widget, src, out, checkpoint)
    worker = widget.run()

    def cancel_when_running(event):
        if isinstance(event, FileEvent) and event.status == "running":
            widget.cancel()

    worker.yielded.connect(cancel_when_running)
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    summary = widget.summary
    assert summary.was_cancelled and summary.done == 0
    assert set(s for s, _ in _table(widget).values()) == {"cancelled"}
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME]
    assert not any(p.name.startswith(PARTIAL_PREFIX) for p in out.rglob("*"))
    assert json.loads((out / MANIFEST_NAME).read_text())["state"] == "cancelled"


def test_manifest_contributes_the_batch_widget():
    from importlib import import_module

    from npe2 import PluginManifest

    import napari_medseg
    from napari_medseg._napari.batch_widget import BatchWidget

    manifest = PluginManifest.from_file(Path(napari_medseg.__file__).parent / "napari.yaml")
    widgets = {w.command: w.display_name for w in manifest.contributions.widgets}
    assert widgets.get("napari-medseg.batch_widget") == "Batch"
    command = next(c for c in manifest.contributions.commands
                   if c.id == "napari-medseg.batch_widget")
    module, name = command.python_name.split(":")
    assert getattr(import_module(module), name) is BatchWidget


def test_widget_starts_on_the_segment_widgets_weights_until_the_user_picks(widget, checkpoint):
    """The weights chosen in the Segment widget (published in the viewer's shared state),
    a checkpoint file too, are the Batch widget's until the user picks weights there."""
    from napari_medseg._napari.batch_widget import CHECKPOINT_FILE
    from napari_medseg._napari.viewer_state import viewer_state
    from napari_medseg._napari.weights_choices import checkpoint_choice

    state = viewer_state(widget.viewer)
    state.choose(checkpoint_choice(checkpoint), "tiny")  # fine-tuned weights, not listed
    assert widget.weights.value == CHECKPOINT_FILE
    assert Path(widget.checkpoint.value) == checkpoint
    widget.weights.native.activated.emit(0)  # the user picks in the Batch widget
    chosen = widget.weights.value
    state.choose(None, "")
    state.choose(checkpoint_choice(checkpoint), "lite")
    assert widget.weights.value == chosen
