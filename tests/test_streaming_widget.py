"""Issue #23 in napari: a dask (or zarr, or multiscale) image is segmented into a zarr store
and its mask is a zarr-backed Labels layer that appears before the run ends."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_medseg.engine.progress import PlaneEvent  # noqa: E402
from test_segment_widget import TIMEOUT, _choose, _settle, _widget, env  # noqa: E402,F401


@pytest.mark.gui
def test_a_dask_volume_is_segmented_into_a_zarr_backed_labels_layer(make_napari_viewer, qtbot,
                                                                    env):  # noqa: F811
    import dask.array as da
    import zarr

    viewer = make_napari_viewer()
    vol = da.from_array(np.random.default_rng(2).random((4, 48, 64), np.float32),
                        chunks=(1, 48, 64))
    viewer.add_image(vol, name="big", scale=(2.0, 0.5, 0.5))
    widget = _widget(viewer, qtbot)
    _choose(widget, tile=32)
    assert widget.scope_combo.currentText() == "whole volume"
    seen = []  # (slice finished, the layer exists and reads the store) during the run
    original = widget._on_run_event

    def spy(event):
        original(event)
        if isinstance(event, PlaneEvent):
            layer = viewer.layers["big mask (zarr)"] if "big mask (zarr)" in viewer.layers \
                else None
            seen.append(layer is not None and isinstance(layer.data, zarr.Array))

    widget._on_run_event = spy
    worker = widget.run()
    assert worker is not None, widget.last_error
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    _settle(qtbot, widget)
    outcome = widget.last_outcome
    assert outcome.ok, outcome.error
    assert seen == [True] * 4  # the layer was there, on the store, while slices finished
    layer = viewer.layers["big mask (zarr)"]
    np.testing.assert_allclose(layer.scale, (2.0, 0.5, 0.5))
    store = outcome.value.result.store
    assert store is not None and str(env / "home") in store
    on_disk = zarr.open_group(store, mode="r")
    assert on_disk.attrs["napari_medseg"]["complete"] is True
    np.testing.assert_array_equal(np.asarray(layer.data[...]), on_disk["mask"][...])
    assert "big mask" not in viewer.layers  # nothing held in memory
    from napari_medseg._napari.result_layers import find_output

    # the in-memory tools (boundary, instances, metrics) never take the store for "mask"
    assert find_output(viewer, "big", "mask") is None
    assert "streamed into" in widget.status_label.text()

    from napari_medseg._napari.lazy_outputs import is_lazy

    assert is_lazy(viewer.layers["big"])
    viewer.add_image(np.zeros((8, 8), np.float32), name="small")
    assert not is_lazy(viewer.layers["small"])
