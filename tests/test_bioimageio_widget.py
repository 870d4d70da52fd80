"""bioimage.io packages in the widgets (pytest-qt, under Xvfb): the Fine-tune widget's Export
button writes the selected checkpoint as a package, and the Segment widget segments with that
package exactly as with the checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
pytest.importorskip("bioimageio.spec")
pytest.importorskip("onnx")

from napari_medseg.engine.checkpoints import read_checkpoint_info, save_checkpoint  # noqa: E402

TIMEOUT = 180_000  # ms; a 2-core machine shared with others


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Private user and weights folders holding one fine-tuned tiny checkpoint."""
    import torch

    from napari_medseg.models import create_model

    home = tmp_path / "home"
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(home))
    (tmp_path / "weights").mkdir()
    monkeypatch.setenv("NAPARI_MEDSEG_WEIGHTS", str(tmp_path / "weights"))
    torch.manual_seed(0)
    model = create_model("unet_sharp", "tiny", 1, 2)
    save_checkpoint(model, home / "checkpoints" / "cells", dtype="float32", parent="ab" * 32,
                    training_data={"data_hash": "feedfacefeedface"})
    return tmp_path


def test_export_button_writes_a_package_of_the_selected_checkpoint(make_napari_viewer, qtbot,
                                                                   env, monkeypatch):
    from qtpy.QtWidgets import QFileDialog

    from napari_medseg._napari.finetune_widget import FinetuneWidget

    viewer = make_napari_viewer()
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune")
    panel = widget.lineage_panel
    panel.refresh()
    assert panel.checkpoint_list.count() == 1
    panel.checkpoint_list.setCurrentRow(0)
    assert panel.export_button.isEnabled()
    target = env / "shared" / "cells.zip"
    target.parent.mkdir()
    monkeypatch.setattr(QFileDialog, "getSaveFileName",
                        staticmethod(lambda *a, **k: (str(target), "")))
    panel.export_button.click()
    assert panel.export_worker is not None and not panel.export_button.isEnabled()
    qtbot.waitUntil(lambda: panel.export_worker is None, timeout=TIMEOUT)
    assert widget.status_label.text().startswith(f"Exported {target}"), \
        widget.status_label.text()
    assert target.is_file()
    info = read_checkpoint_info(target)
    assert info.parent == "ab" * 32 and info.training_data["data_hash"] == "feedfacefeedface"
    # A path that is no package is refused with a sentence (nothing is written).
    messages: list[str] = []
    panel.failed.connect(messages.append)
    panel.export_selected(str(panel.selected_entry().path))
    qtbot.waitUntil(lambda: panel.export_worker is None, timeout=TIMEOUT)
    assert messages and ".zip" in messages[0]


def test_segment_widget_runs_a_package_like_its_checkpoint(make_napari_viewer, qtbot, env):
    from napari_medseg._napari.result_layers import find_output
    from napari_medseg._napari.segment_widget import SegmentWidget
    from napari_medseg.engine.export.bioimageio import export_bioimageio
    from napari_medseg.io.samples import load_sample

    checkpoint = env / "home" / "checkpoints" / "cells.json"
    package = export_bioimageio(str(checkpoint), env / "cells.zip").path
    image = np.asarray(load_sample("nuclei")[0])[:96, :96]
    viewer = make_napari_viewer()
    viewer.add_image(image, name="nuc")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    qtbot.waitUntil(lambda: widget.ready, timeout=TIMEOUT)
    widget.device_combo.setCurrentIndex(widget.device_combo.findData("cpu"))
    masks = []
    for source in (package, checkpoint):
        widget.add_checkpoint(str(source))
        assert widget.current_weights().source == str(source)
        widget.tile_spin.setValue(64)
        assert widget.run() is not None, widget.last_error
        qtbot.waitUntil(lambda: not widget.running and not widget.busy, timeout=TIMEOUT)
        assert widget.last_outcome.ok, widget.last_outcome.error
        masks.append(np.array(find_output(viewer, "nuc", "mask").data))
    assert masks[0].shape == (96, 96)
    np.testing.assert_array_equal(masks[0], masks[1])
