"""The Segment dock widget in a real napari viewer (pytest-qt, under Xvfb), tiny networks."""

from __future__ import annotations

import dataclasses
import re

import time

import numpy as np
import pytest
from conftest import STALL_MARGIN, stall_bar_ms

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_medseg.engine.boundaries import boundary_from_labels  # noqa: E402
from napari_medseg.engine.progress import PlaneEvent  # noqa: E402
from napari_medseg.engine.inference.regions import region_metrics  # noqa: E402

NETWORK = "unet_sharp"
TIMEOUT = 60_000  # ms; a 2-core machine shared with others


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Empty user and weights folders, so the weights list holds only what a test puts."""
    home = tmp_path / "home"
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(home))
    monkeypatch.setenv("NAPARI_MEDSEG_WEIGHTS", str(weights))
    return tmp_path


@pytest.fixture
def errors(monkeypatch):
    """The sentences the widget showed as error notifications."""
    from napari_medseg._napari import segment_widget

    shown: list[str] = []
    monkeypatch.setattr(segment_widget, "show_error", shown.append)
    return shown


def _widget(viewer, qtbot):
    from napari_medseg._napari.segment_widget import SegmentWidget

    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")  # the dock owns it
    # The networks and devices are listed by a worker: the viewer stays responsive.
    assert not widget.ready and not widget.run_button.isEnabled()
    qtbot.waitUntil(lambda: widget.ready, timeout=TIMEOUT)
    return widget


def _choose(widget, weights_label=None, variant="tiny", tile=64, network=NETWORK):
    from napari_medseg._napari.session import RANDOM_INIT

    widget.network_combo.setCurrentText(network)
    widget.weights_combo.setCurrentText(weights_label or RANDOM_INIT)
    if widget.variant_combo.isEnabled():
        widget.variant_combo.setCurrentText(variant)
    widget.device_combo.setCurrentIndex(widget.device_combo.findData("cpu"))
    widget.tile_spin.setValue(tile)


def _settle(qtbot, widget, timeout=TIMEOUT):
    """Wait until no job of the widget runs (runs, plans, thresholds, tools, metrics)."""
    qtbot.waitUntil(lambda: not widget.busy and not widget.running, timeout=timeout)


def _run(qtbot, widget, timeout=TIMEOUT):
    worker = widget.run()
    assert worker is not None, widget.last_error
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)
    _settle(qtbot, widget)
    assert widget.last_outcome is not None
    return widget.last_outcome


def test_widget_builds_and_shows_a_plan(make_napari_viewer, qtbot, env):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((70, 90), np.float32), name="cells")
    widget = _widget(viewer, qtbot)
    from napari_medseg._napari.session import RANDOM_INIT
    from napari_medseg.models import list_models

    assert widget.image_combo.currentText() == "cells"
    assert [widget.network_combo.itemText(i) for i in range(widget.network_combo.count())] \
        == list_models()
    labels = [widget.weights_combo.itemText(i) for i in range(widget.weights_combo.count())]
    assert labels[-1] == RANDOM_INIT
    # Installed trained weights are chosen first (their network too), else random init.
    from napari_medseg.engine.checkpoints import list_shipped_weights

    shipped = list_shipped_weights()
    choice = widget.current_weights()
    if shipped:
        assert not choice.untrained and choice.source in {w["tag"] for w in shipped}
        assert widget.untrained_label.isHidden() and not widget.variant_combo.isEnabled()
    else:
        assert choice.untrained
    _choose(widget)
    # Random init shows the loud warning and lets the variant be picked.
    assert widget.current_weights().untrained
    assert not widget.untrained_label.isHidden() and widget.variant_combo.isEnabled()
    assert widget.device_combo.findData("cpu") >= 0
    assert [widget.scope_combo.itemData(i) for i in range(3)] == ["slice", "visible", "whole"]
    qtbot.waitUntil(lambda: "tiles of" in widget.plan_label.text(), timeout=TIMEOUT)
    text = widget.plan_label.text()
    assert "Memory ~" in text and "48x48" in text  # 70 x 90 px: balanced tiles
    assert widget.overlap_spin.value() == 0.125  # the engine's default, not rounded
    # Measure time runs one batch and puts a time estimate in the plan.
    widget.measure_button.click()
    qtbot.waitUntil(lambda: "ms per tile pass" in widget.plan_label.text(), timeout=TIMEOUT)
    # Draw tiles: one rectangle per tile of the plan.
    widget.tiles_button.click()
    qtbot.waitUntil(lambda: "cells tiles" in viewer.layers, timeout=TIMEOUT)
    plan = widget.plan_panel.plan[0]
    assert len(viewer.layers["cells tiles"].data) == plan.tiles_per_plane
    _settle(qtbot, widget)


def test_run_2d_creates_layers_with_scale_then_threshold_and_undo(
        make_napari_viewer, qtbot, env):
    viewer = make_napari_viewer()
    image = np.random.default_rng(1).random((64, 80), np.float32)
    viewer.add_image(image, name="cells", scale=(0.5, 0.25), translate=(10.0, -4.0))
    widget = _widget(viewer, qtbot)
    _choose(widget)
    widget.probs_check.setChecked(True)
    outcome = _run(qtbot, widget)
    assert outcome.ok, outcome.error
    mask = viewer.layers["cells mask"]
    boundary = viewer.layers["cells boundary"]
    probs = viewer.layers["cells probabilities"]
    from napari.layers import Image, Labels

    assert isinstance(mask, Labels) and isinstance(boundary, Labels)
    assert isinstance(probs, Image)
    for layer in (mask, boundary, probs):
        assert layer.data.shape == (64, 80)
        np.testing.assert_allclose(layer.scale, (0.5, 0.25))
        np.testing.assert_allclose(layer.translate, (10.0, -4.0))
    p = np.asarray(probs.data)
    assert 0 < p.min() and p.max() < 1
    np.testing.assert_array_equal(mask.data, (p > 0.5).astype(np.uint8))
    np.testing.assert_array_equal(boundary.data, boundary_from_labels(mask.data))

    # A new threshold re-derives the mask from the cached probabilities (no new run).
    runs = widget.session.cached_models()
    before = mask.data.copy()
    threshold = float(np.quantile(p, 0.3))
    widget.threshold_slider.setValue(round(threshold, 2))
    qtbot.waitUntil(lambda: "threshold" in widget.status_label.text(), timeout=TIMEOUT)
    _settle(qtbot, widget)
    t = round(threshold, 2)
    cached = widget.session.cache_for("cells").probs[0].astype(np.float32)
    np.testing.assert_array_equal(mask.data, (cached > t).astype(np.uint8))
    assert not np.array_equal(mask.data, before)
    np.testing.assert_array_equal(boundary.data, boundary_from_labels(mask.data))
    assert widget.session.cached_models() == runs
    # Undo brings the previous mask back.
    widget.undo_button.click()
    np.testing.assert_array_equal(mask.data, before)
    # Undoing the run itself removes the layers it added (one per event-loop turn).
    widget.undo_button.click()
    for name in ("cells mask", "cells boundary", "cells probabilities"):
        assert name not in viewer.layers
    assert "cells" in viewer.layers


def test_run_3d_volume_then_slice_keeps_other_slices_and_undo_restores_edits(
        make_napari_viewer, qtbot, env):
    viewer = make_napari_viewer()
    vol = np.random.default_rng(2).random((3, 48, 64), np.float32)
    viewer.add_image(vol, name="stack", scale=(2.0, 0.5, 0.5))
    widget = _widget(viewer, qtbot)
    _choose(widget, tile=32)
    widget.probs_check.setChecked(True)
    assert widget.scope_combo.currentText() == "whole volume"
    outcome = _run(qtbot, widget)
    assert outcome.ok, outcome.error
    mask = viewer.layers["stack mask"]
    assert mask.data.shape == (3, 48, 64)
    np.testing.assert_allclose(mask.scale, (2.0, 0.5, 0.5))
    assert viewer.layers["stack probabilities"].data.shape == (3, 48, 64)
    assert (viewer.layers["stack probabilities"].data > 0).all()

    # The user paints on slice 1 and 2; a run on the current slice (1) overwrites only it.
    mask.data[1, :5, :5] = 7
    mask.data[2, :5, :5] = 7
    edited = mask.data.copy()
    viewer.dims.set_current_step(0, 1)
    widget.scope_combo.setCurrentIndex(widget.scope_combo.findData("slice"))
    assert widget.region(viewer.layers["stack"]).start == (1, 0, 0)
    outcome = _run(qtbot, widget)
    assert outcome.ok, outcome.error
    assert outcome.value.result["mask"].shape == (1, 48, 64)
    assert (mask.data[2, :5, :5] == 7).all()         # another slice: untouched
    assert not (mask.data[1, :5, :5] == 7).all()     # the run's slice: overwritten
    widget.undo()
    np.testing.assert_array_equal(mask.data, edited)  # the user's edit is back


def test_shipped_weights_segment_a_grey_image(make_napari_viewer, qtbot, env):
    """The shipped model card (when installed) loads, converts grey to RGB with a notice,
    and gives a mask of the image's shape; a several-class network has no threshold."""
    from napari_medseg.engine.checkpoints import list_shipped_weights
    from napari_medseg.io.samples import load_sample

    shipped = list_shipped_weights()
    if not shipped:
        pytest.skip("no trained weights are installed")
    card = shipped[0]
    image, _meta, labels = load_sample("nuclei")
    crop = np.asarray(image)[:96, :96]
    viewer = make_napari_viewer()
    viewer.add_image(crop, name="nuc")
    viewer.add_labels(np.asarray(labels)[:96, :96], name="truth")
    widget = _widget(viewer, qtbot)
    widget.network_combo.setCurrentText(card["network"])
    index = next(i for i in range(widget.weights_combo.count())
                 if widget.weights_combo.itemData(i).source == card["tag"])
    widget.weights_combo.setCurrentIndex(index)
    widget.device_combo.setCurrentIndex(widget.device_combo.findData("cpu"))
    widget.probs_check.setChecked(True)
    outcome = _run(qtbot, widget)
    assert outcome.ok, outcome.error
    result = outcome.value.result
    assert any("grey to RGB" in n for n in result.notices) == (card["in_channels"] == 3)
    from napari_medseg._napari.result_layers import find_output

    mask = find_output(viewer, "nuc", "mask")
    assert mask.data.shape == (96, 96)
    task = card.get("task") if isinstance(card.get("task"), dict) else None
    if task is None:
        # The foreground probability is one plain layer (no extra "class" axis in the viewer).
        probs = find_output(viewer, "nuc", "probabilities")
        assert probs.data.shape == (96, 96) and viewer.dims.ndim == 2
        assert ((probs.data > 0.5) == (mask.data > 0)).mean() > 0.999
    else:  # the instance task: interior and boundary layers; the mask is their sum's
        interior = find_output(viewer, "nuc", "probabilities[1]")
        boundary = find_output(viewer, "nuc", "probabilities[2]")
        assert interior.data.shape == boundary.data.shape == (96, 96)
        assert viewer.dims.ndim == 2
        foreground = interior.data + boundary.data > task["foreground_threshold"]
        assert (foreground == (mask.data > 0)).mean() > 0.99
        objects = find_output(viewer, "nuc", "instances")
        assert objects is not None and objects.data.max() > 3
    assert widget.threshold_slider.isEnabled() == (card["num_classes"] == 1)
    widget.reference_combo.setCurrentText("truth")
    _settle(qtbot, widget)
    dice = float(widget.metrics_table.item(0, 1).text())
    print(f"\nShipped {card['tag']} on a 96x96 crop of the nuclei sample: Dice {dice:.3f}")
    assert dice > 0.5  # trained weights find the nuclei


def test_rgb_image_with_an_upsampling_network(make_napari_viewer, qtbot, env):
    """SASR-Net works on the image's grid unless "super-resolved" is ticked: then it
    predicts at twice the resolution, layers get half the pixel size, and pixel centres
    shifted so that the outputs cover exactly the image."""
    viewer = make_napari_viewer()
    rgb = (np.random.default_rng(8).random((40, 48, 3)) * 255).astype(np.uint8)
    viewer.add_image(rgb, name="grid", rgb=True)
    widget = _widget(viewer, qtbot)
    _choose(widget, network="sasrnet", tile=64)
    outcome = _run(qtbot, widget)
    assert outcome.ok, outcome.error
    from napari_medseg._napari.result_layers import find_output

    assert find_output(viewer, "grid", "mask").data.shape == (40, 48)
    viewer.add_image(rgb, name="he", rgb=True, scale=(2.0, 2.0), translate=(5.0, 7.0))
    widget.image_combo.setCurrentText("he")
    _choose(widget, network="sasrnet", tile=32)
    widget.sr_check.setChecked(True)
    outcome = _run(qtbot, widget)
    assert outcome.ok, outcome.error

    mask = find_output(viewer, "he", "mask")
    assert mask.data.shape == (80, 96)
    np.testing.assert_allclose(mask.scale, (1.0, 1.0))
    np.testing.assert_allclose(mask.translate, (4.5, 6.5))
    assert outcome.value.spec.in_channels == 3  # an untrained network follows the image
    # The outputs cover the same world box as the image (pixel edges, not centres).
    img = viewer.layers["he"]

    def edges(layer):
        half = np.asarray(layer.scale) / 2
        return layer.extent.world + np.stack([-half, half])

    np.testing.assert_allclose(edges(mask), edges(img))


def test_visible_region_writes_only_the_visible_box(make_napari_viewer, qtbot, env):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(3).random((96, 96), np.float32), name="img")
    widget = _widget(viewer, qtbot)
    _choose(widget, tile=32)
    widget.probs_check.setChecked(True)
    widget.scope_combo.setCurrentIndex(widget.scope_combo.findData("visible"))
    layer = viewer.layers["img"]
    layer.corner_pixels = np.array([[40, 8], [79, 47]])  # what a zoomed canvas sets
    region = widget.region(layer)
    assert (region.start, region.stop) == ((40, 8), (80, 48))
    outcome = _run(qtbot, widget)
    assert outcome.ok, outcome.error
    probs = viewer.layers["img probabilities"].data
    inside = np.zeros(probs.shape, bool)
    inside[40:80, 8:48] = True
    assert (probs[inside] > 0).all() and (probs[~inside] == 0).all()


def test_cancel_stops_within_a_batch_and_keeps_finished_slices(
        make_napari_viewer, qtbot, env):
    viewer = make_napari_viewer()
    vol = np.random.default_rng(4).random((6, 64, 64), np.float32)
    viewer.add_image(vol, name="vol")
    widget = _widget(viewer, qtbot)
    _choose(widget, tile=32)
    widget.probs_check.setChecked(True)
    _settle(qtbot, widget)
    worker = widget.run()
    assert worker is not None
    seen: list[int] = []

    def on_event(event):
        if isinstance(event, PlaneEvent) and not seen:
            seen.append(event.plane)
            widget.run_button.click()  # the Run button is Cancel while running

    worker.yielded.connect(on_event)
    assert widget.run_button.text() == "Cancel"
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    result = widget.last_outcome.value.result
    assert result.cancelled
    done = set(result.planes_done)
    assert 1 <= len(done) < 6
    # One batch at most after the request: the engine stops before the next plane ends.
    assert len(done) <= 2
    probs = viewer.layers["vol probabilities"].data
    for z in range(6):
        assert ((probs[z] > 0).all() if z in done else (probs[z] == 0).all()), z
    assert widget.run_button.text() == "Run"
    _settle(qtbot, widget)


def test_event_loop_stays_responsive_during_a_volume_run(make_napari_viewer, qtbot, env):
    """Records the longest gap between 10 ms timer ticks while a volume is segmented."""
    from qtpy.QtCore import QTimer

    viewer = make_napari_viewer(show=True)
    vol = np.random.default_rng(5).random((8, 128, 128), np.float32)
    viewer.add_image(vol, name="vol")
    widget = _widget(viewer, qtbot)
    _choose(widget, tile=64)
    _settle(qtbot, widget)
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    done_at: list[float] = []
    on_done = widget._on_run_done

    def timed_done(*args):
        done_at.append(time.perf_counter())
        on_done(*args)
        done_at.append(time.perf_counter())

    widget._on_run_done = timed_done
    timer.start()
    qtbot.wait(100)
    t0 = time.perf_counter()
    outcome = _run(qtbot, widget)
    seconds = time.perf_counter() - t0
    qtbot.wait(100)
    timer.stop()
    assert outcome.ok, outcome.error
    ticks_a = np.asarray(ticks)
    gaps = np.diff(ticks_a) * 1000
    during = gaps[: int(np.searchsorted(ticks_a, done_at[0])) - 1]
    print(f"\nGUI stall while an 8x128x128 volume is segmented ({seconds:.1f} s, "
          f"{outcome.value.result.stats['forward_passes']} tile passes): longest gap "
          f"{during.max():.0f} ms (99th percentile {np.percentile(during, 99):.0f} ms, "
          f"median {np.median(during):.0f} ms, {len(during)} ticks); the run's end with the "
          f"first new output layer {1000 * (done_at[1] - done_at[0]):.0f} ms")
    assert len(during) > 10  # the event loop kept ticking while the worker ran
    bar = stall_bar_ms("gui_stall.json", "longest_gap_during_run_ms")
    assert during.max() <= bar, (
        f"the event loop stalled {during.max():.0f} ms while the network ran; the bar from "
        f"benchmarks/gui_stall.json (bench_gui_stall.py, x{STALL_MARGIN}) is {bar:.0f} ms")


def test_boundary_tools_and_metrics_table(make_napari_viewer, qtbot, env):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(6).random((64, 64), np.float32), name="img")
    ref = np.zeros((64, 64), np.int32)
    ref[5:25, 5:25] = 1
    ref[30:60, 30:50] = 2
    # The reference has the very name an output would get (as napari's samples do).
    truth = viewer.add_labels(ref.copy(), name="img mask")
    widget = _widget(viewer, qtbot)
    _choose(widget)
    assert _run(qtbot, widget).ok
    from napari_medseg._napari.result_layers import find_output

    mask = find_output(viewer, "img", "mask")
    assert mask is not truth and mask.name == "img mask [1]"
    np.testing.assert_array_equal(truth.data, ref)  # never written to
    # The user draws two touching squares; the boundary tool follows the edit.
    mask.data[...] = 0
    mask.data[10:30, 10:20] = 1
    mask.data[10:30, 20:30] = 1
    widget.boundary_from_mask()
    _settle(qtbot, widget)
    bnd = find_output(viewer, "img", "boundary")
    np.testing.assert_array_equal(bnd.data, boundary_from_labels(mask.data, mode="inner"))
    # Instances from mask + a boundary line between the squares: two objects.
    bnd.data[...] = 0
    bnd.data[10:30, 19:21] = 1
    widget.instances_from_mask()
    _settle(qtbot, widget)
    inst = viewer.layers["img instances"].data
    assert inst.max() == 2 and len(np.unique(inst[10:30, 10:18])) == 1
    assert inst[15, 12] != inst[15, 27]
    # Metrics against the reference (instances binarized for a one-class network).
    items = [widget.reference_combo.itemText(i) for i in range(widget.reference_combo.count())]
    assert "img mask" in items and "img mask [1]" not in items
    widget.reference_combo.setCurrentText("img mask")
    _settle(qtbot, widget)
    assert widget.metrics_table.rowCount() == 1
    want = region_metrics(mask.data, ref, "YX", 1, (1.0, 1.0))[1]
    assert widget.metrics_table.item(0, 1).text() == f"{want['dice']:.3f}"
    assert widget.metrics_table.item(0, 2).text() == f"{want['iou']:.3f}"
    assert widget.metrics_table.item(0, 3).text() == f"{want['hd95']:.2f}"
    # Undo the instances step removes the layer it created.
    widget.undo()
    assert "img instances" not in viewer.layers


def test_metrics_table_scores_objects_against_an_instance_reference(make_napari_viewer,
                                                                     qtbot, env):
    """A reference of instance labels adds the object row (F1, AP at IoU 0.5, DSB, AJI, Dice):
    from the mask's connected components first, then from the instances layer once there is
    one; the values are the engine's ``instance_scores`` of those layers."""
    from scipy import ndimage as ndi

    from napari_medseg._napari.result_layers import find_output
    from napari_medseg.engine.metrics import dice, instance_scores

    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(8).random((64, 64), np.float32), name="img")
    ref = np.zeros((64, 64), np.int32)
    ref[5:25, 5:25], ref[5:25, 25:45], ref[40:60, 10:30] = 1, 2, 3  # two touch, one alone
    viewer.add_labels(ref, name="truth")
    widget = _widget(viewer, qtbot)
    _choose(widget)
    assert _run(qtbot, widget).ok
    mask = find_output(viewer, "img", "mask")
    assert find_output(viewer, "img", "instances") is None
    mask.data[...] = 0
    mask.data[5:25, 5:45] = 1  # the two touching nuclei merged into one component
    mask.data[42:60, 12:30] = 1  # 324 of 400 px of the third: IoU 0.81
    panel = widget.metrics_panel
    widget.reference_combo.setCurrentText("truth")
    _settle(qtbot, widget)
    table = panel.objects_table
    want = instance_scores(ndi.label(mask.data)[0], ref)
    assert (want["tp"], want["fp"], want["fn"]) == (1, 1, 2)  # the merge matches neither
    assert not table.isHidden() and panel.last_object_source == "components"
    assert "connected components" in widget.metrics_caption.text()
    cells = [table.item(0, c).text() for c in range(table.columnCount())]
    assert cells == ["components", f"{dice(mask.data, ref):.3f}", f"{want['f1_iou50']:.3f}",
                     f"{want['ap_iou50']:.3f}", f"{want['dsb_score']:.3f}",
                     f"{want['aji']:.3f}"]
    assert cells[3] == "0.250" and cells[4] == "0.175"  # 1/(1+1+2), at 7 of 10 thresholds
    assert widget.metrics_table.item(0, 0).text() == "1"  # the class row stays
    # A boundary between the merged nuclei and the Instances tool: the instances layer is
    # scored now (both halves match).
    bnd = find_output(viewer, "img", "boundary")
    bnd.data[...] = 0
    bnd.data[5:25, 24:26] = 1
    widget.instances_from_mask()
    _settle(qtbot, widget)
    inst = find_output(viewer, "img", "instances").data
    widget.metrics_button.click()
    _settle(qtbot, widget)
    want = instance_scores(inst, ref)
    assert want["tp"] == 3 and panel.last_object_source == "instances"
    assert table.item(0, 0).text() == "instances"
    assert table.item(0, 2).text() == f"{want['f1_iou50']:.3f}"
    assert table.item(0, 3).text() == f"{want['ap_iou50']:.3f}"
    assert panel.last_object_scores["dsb_score"] == pytest.approx(want["dsb_score"])
    # A class reference (one label) shows no object row.
    viewer.add_labels((ref > 0).astype(np.int32), name="binary truth")
    widget.reference_combo.setCurrentText("binary truth")
    _settle(qtbot, widget)
    assert panel.last_object_scores is None and table.isHidden()
    assert not widget.metrics_table.isHidden()


def test_instances_tool_numbers_objects_per_frame_like_the_engine(make_napari_viewer, qtbot,
                                                                  env):
    """The Instances tool numbers the objects of each T block from 1 (two frames with two
    objects each give 1, 2 | 1, 2), exactly as the engine's instances output does."""
    from napari_medseg._napari.layers import layer_kwargs
    from napari_medseg._napari.result_layers import find_output
    from napari_medseg.engine.inference.postprocess import instances_per_block
    from napari_medseg.io.metadata import ImageMeta

    viewer = make_napari_viewer()
    meta = ImageMeta(axes="TYX", spacing=(1.0, 1.0), origin=(0.0, 0.0))
    viewer.add_image(np.random.default_rng(7).random((2, 48, 48), np.float32),
                     **layer_kwargs(meta, name="movie"))
    widget = _widget(viewer, qtbot)
    _choose(widget)
    assert _run(qtbot, widget).ok
    mask = find_output(viewer, "movie", "mask")
    boundary = find_output(viewer, "movie", "boundary")
    mask.data[...] = 0
    boundary.data[...] = 0
    for t in range(2):  # two separate squares in each frame
        mask.data[t, 4:16, 4:16] = 1
        mask.data[t, 28:44, 26:40] = 1
    widget.instances_from_mask()
    _settle(qtbot, widget)
    inst = np.asarray(viewer.layers["movie instances"].data)
    for t in range(2):
        assert sorted(np.unique(inst[t]).tolist()) == [0, 1, 2], t
        assert inst[t, 10, 10] != inst[t, 35, 32]
    want = instances_per_block(np.array(mask.data), np.array(boundary.data), "TYX", 8)
    np.testing.assert_array_equal(inst, want)
    # The count covers both frames (the highest label would say 2).
    qtbot.waitUntil(lambda: "instance(s) found" in widget.status_label.text(), timeout=10000)
    assert widget.status_label.text() == "4 instance(s) found."


def test_errors_are_one_sentence_notifications(make_napari_viewer, qtbot, env, errors):
    import torch

    from napari_medseg.engine.checkpoints import save_checkpoint
    from napari_medseg.models import create_model

    # A user checkpoint for 2-channel images, and a model card whose weights are missing.
    folder = env / "home" / "checkpoints"
    torch.manual_seed(0)
    save_checkpoint(create_model(NETWORK, "tiny", 2, 1), folder / "two_channels")
    cards = env / "models"
    cards.mkdir()
    (cards / "missing.yaml").write_text(
        f"tag: {NETWORK}-missing\nnetwork: {NETWORK}\nvariant: lite\ndataset: nowhere\n"
        "weights: missing.safetensors\nsha256: '0'\nconfig: {in_channels: 1, num_classes: 1}\n"
        "normalization: null\nmetrics: {}\n")
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(7).random((64, 64), np.float32), name="img")
    widget = _widget(viewer, qtbot)
    widget.network_combo.setCurrentText(NETWORK)
    labels = [widget.weights_combo.itemText(i) for i in range(widget.weights_combo.count())]
    mine = next(t for t in labels if t.startswith("two_channels"))
    missing = next(t for t in labels if "not installed" in t)

    _choose(widget, weights_label=mine)
    assert not widget.variant_combo.isEnabled()  # fixed by the checkpoint
    outcome = _run(qtbot, widget)
    assert not outcome.ok
    assert errors and errors[-1] == outcome.error
    assert "channel" in errors[-1] and "\n" not in errors[-1] and "Traceback" not in errors[-1]
    assert "img mask" not in viewer.layers
    assert widget.run_button.text() == "Run" and widget.run_button.isEnabled()

    _choose(widget, weights_label=missing)
    outcome = _run(qtbot, widget)
    assert not outcome.ok and "not installed" in errors[-1]
    assert "img mask" not in viewer.layers
    _settle(qtbot, widget)


# --- the pieces behind the widget (no viewer) -------------------------------------------


def test_cancel_paths_set_the_engine_token(qtbot):
    """napari's status-bar cancel (worker.quit) and activity-dock cancel both stop the
    engine through its token, so the run returns what it finished instead of aborting."""
    from napari_medseg._napari.worker import CancellableWorker, RunProgress
    from napari_medseg.engine.progress import CancelToken

    def gen():
        yield 1

    token = CancelToken()
    worker = CancellableWorker(gen)
    worker.cancel_token = token
    worker.quit()
    assert token.cancelled
    token = CancelToken()
    bar = RunProgress(total=4, cancel_callback=token.cancel)
    bar.set_done(2, 4)
    assert bar.n == 2
    bar.cancel()
    assert token.cancelled and bar.is_canceled
    bar.close()


def test_error_messages_are_one_sentence():
    from napari_medseg._napari.worker import error_message
    from napari_medseg.errors import InputShapeError

    assert error_message(InputShapeError("The image is wrong; fix it.")) == \
        "The image is wrong; fix it."
    oom = error_message(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nmore"))
    assert oom.startswith("Out of memory") and "\n" not in oom
    other = error_message(ValueError("bad value\n  File x.py, line 3"))
    assert other == "Unexpected ValueError: bad value."


def test_settings_become_the_engine_config():
    from napari_medseg._napari.session import RANDOM_INIT, RunSettings, WeightsChoice

    choice = WeightsChoice("random", RANDOM_INIT, NETWORK, "")
    s = RunSettings(choice, "tiny", "cpu", None, 0.5, "constant", 0.3, True, False, True,
                    "ZYX")
    cfg = s.config()
    assert cfg.tiling.tile is None and cfg.tiling.overlap == 0.5
    assert cfg.tiling.blend == "constant" and cfg.threshold == 0.3 and cfg.tta
    assert cfg.axes == "ZYX" and cfg.device == "cpu"
    # Probabilities are kept for a one-class network (the threshold re-derives masks).
    assert cfg.outputs == ("mask", "boundary", "probabilities", "variance")
    multi = WeightsChoice("checkpoint", "x", NETWORK, "lite", "/x.json", 1, 3)
    s3 = RunSettings(multi, "lite", "cpu", 128, 0.25, "gaussian", 0.5, False, False, False,
                     "YX")
    assert s3.config().outputs == ("mask", "boundary")
    assert s3.config().diameter is None  # auto: measured by a first pass
    assert dataclasses.replace(s3, diameter=32.0).config().diameter == 32.0
    from napari_medseg.errors import ConfigError

    with pytest.raises(ConfigError):
        RunSettings(choice, "tiny", "cpu", None, 1.5, "gaussian", 0.5, False, False, False,
                    "YX").config()


def test_session_cache_rethreshold_and_undo_of_the_cache():
    from napari_medseg._napari.session import Edit, SegmentSession
    from napari_medseg.engine.inference.regions import Region

    session = SegmentSession()
    probs = np.linspace(0, 1, 2 * 4 * 4, dtype=np.float32).reshape(1, 2, 4, 4)
    first = Edit("run")
    session.update_cache("im", (3, 4, 4), "ZYX", 1, False, Region((0, 0, 0), (2, 4, 4)),
                         probs, [(slice(None),) * 3], first)
    session.push(first)
    blocks = session.rethreshold("im", 0.5)
    assert len(blocks) == 1
    key, mask, boundary = blocks[0]
    assert key == (slice(0, 2), slice(0, 4), slice(0, 4))
    np.testing.assert_array_equal(mask, (probs[0].astype(np.float16) > 0.5))
    assert boundary is not None and boundary.shape == mask.shape
    # A cancelled run on slice 2 that finished nothing new leaves the covered list alone;
    # a finished slice-2 run adds its region, and undo takes it off again.
    second = Edit("run")
    session.update_cache("im", (3, 4, 4), "ZYX", 1, False, Region((2, 0, 0), (3, 4, 4)),
                         np.full((1, 1, 4, 4), 0.9, np.float32), [(slice(None),) * 3], second)
    session.push(second)
    assert len(session.cache_for("im").covered) == 2
    assert session.pop() is second
    cache = session.cache_for("im")
    assert len(cache.covered) == 1 and (cache.probs[0, 2] == 0).all()
    assert session.pop() is first and session.cache_for("im") is None
    from napari_medseg.errors import ConfigError

    with pytest.raises(ConfigError, match="first"):
        session.rethreshold("im", 0.5)


def test_weights_choices_list_cards_checkpoints_and_random(env):
    import torch

    from napari_medseg._napari.session import RANDOM_INIT, SegmentSession, list_weight_choices
    from napari_medseg.engine.checkpoints import save_checkpoint
    from napari_medseg.models import create_model

    torch.manual_seed(0)
    save_checkpoint(create_model(NETWORK, "tiny", 1, 1), env / "home" / "checkpoints" / "mine")
    from napari_medseg.engine.checkpoints import list_shipped_weights

    cards = sum(w["network"] == NETWORK for w in list_shipped_weights())
    choices = list_weight_choices(NETWORK)
    assert [c.kind for c in choices] == ["card"] * cards + ["checkpoint", "random"]
    choices = choices[cards:]
    assert choices[0].label.startswith("mine") and choices[-1].label == RANDOM_INIT
    assert list_weight_choices("banet")[-1].network == "banet"
    session = SegmentSession(max_models=1)
    a = session.load_model(choices[-1], "tiny", 1)
    assert session.load_model(choices[-1], "tiny", 1) is a  # cached
    b = session.load_model(choices[-1], "tiny", 1)
    # Random init is reproducible (fixed seed): two builds agree.
    fresh = SegmentSession().load_model(choices[-1], "tiny", 1)
    for (k, v), (_, w) in zip(a.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(v, w), k
    assert b is a
    session.load_model(choices[0], "tiny", 1)
    assert len(session.cached_models()) == 1  # least recently used dropped


def test_flip_tta_starts_as_the_chosen_weights_say(make_napari_viewer, qtbot, env):
    import torch

    from napari_medseg._napari.session import RANDOM_INIT
    from napari_medseg.engine.checkpoints import save_checkpoint
    from napari_medseg.engine.seg_task import SegTask, with_task
    from napari_medseg.models import create_model

    torch.manual_seed(0)
    classes = ("background", "interior", "boundary")
    for name, task in (("tuned_tta", SegTask("instances", tta=True)),
                       ("plain", SegTask("instances"))):
        save_checkpoint(with_task(create_model(NETWORK, "tiny", 1, 3), task),
                        env / "home" / "checkpoints" / name, classes=classes)
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="img")
    widget = _widget(viewer, qtbot)
    widget.network_combo.setCurrentText(NETWORK)

    def choose(prefix):
        index = next(i for i in range(widget.weights_combo.count())
                     if widget.weights_combo.itemText(i).startswith(prefix))
        widget.weights_combo.setCurrentIndex(index)
        return widget.tta_check.isChecked()

    assert choose("tuned_tta") and not choose("plain") and choose("tuned_tta")
    assert widget.settings(viewer.layers["img"]).config().tta is True
    widget.tta_check.setChecked(False)  # the user's word stands for these weights
    assert widget.settings(viewer.layers["img"]).config().tta is False
    assert not choose(RANDOM_INIT)


def _runs_in_a_fresh_process(code: str) -> None:
    """Run ``code`` in a new Python (imports and pint's registry start empty there)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_prewarm_imports_what_the_first_labels_layer_needs():
    """The pre-warm thread loads the lazily imported colour conversions napari's label
    colormap uses (otherwise the first Labels layer imports them on the GUI thread)."""
    code = ("import sys\n"
            "from napari_medseg._napari.result_layers import prewarm_layer_code\n"
            "assert 'skimage.color.colorconv' not in sys.modules\n"
            "prewarm_layer_code().join()\n"
            "missing = [m for m in ('skimage.color.colorconv', 'pandas', "
            "'napari._vispy.layers.labels') if m not in sys.modules]\n"
            "assert not missing, missing\n")
    _runs_in_a_fresh_process(code)


def test_the_unit_registry_is_built_before_the_prewarm_thread_starts():
    """pint builds its registry lazily and not thread-safely: the pre-warm thread's layer and
    the viewer's first image layer building it at once left one without the unit "pixel"
    (the journey test failed 2 runs in 3). It is built in the caller's thread first."""
    code = ("import pint\n"
            "from pint.registry import LazyRegistry\n"
            "from napari_medseg._napari.result_layers import prewarm_layer_code\n"
            "assert isinstance(pint.get_application_registry().get(), LazyRegistry)\n"
            "thread = prewarm_layer_code()\n"
            "registry = pint.get_application_registry().get()\n"
            "assert not isinstance(registry, LazyRegistry), 'built by the thread, racing'\n"
            "assert 'pixel' in registry._units\n"
            "thread.join()\n")
    _runs_in_a_fresh_process(code)


def test_viewer_state_shares_the_choice_the_cache_and_weights_requests():
    """The widgets of one viewer share one state: the Segment widget's choice (with a
    signal), one network cache, and a handler for "segment with these weights"."""
    from napari_medseg._napari.session import RANDOM_INIT, SegmentSession, list_weight_choices
    from napari_medseg._napari.viewer_state import viewer_state

    class _Viewer:  # any object a viewer state can be kept for
        pass

    viewer, other = _Viewer(), _Viewer()
    state = viewer_state(viewer)
    assert viewer_state(viewer) is state and viewer_state(other) is not state
    assert state.loader(1) is None and not state.request_weights("x")
    seen = []
    state.weights_changed.connect(lambda weights, variant: seen.append((weights, variant)))
    choice = next(c for c in list_weight_choices("unet_sharp") if c.label == RANDOM_INIT)
    state.choose(choice, "tiny")
    state.choose(choice, "tiny")  # no change, no signal
    assert seen == [(choice, "tiny")]
    session = SegmentSession(models=state.models)
    model = state.loader(1)()
    assert session.load_model(choice, "tiny", 1) is model  # one cache for both widgets
    requests = []
    state.serve_weights(lambda *args: requests.append(args) or True)
    assert state.serving and state.request_weights("a.json", "img", scope="slice")
    assert requests == [("a.json", "img", "slice")]
    state.serve_weights(None)
    assert not state.serving and not state.request_weights("a.json")


def test_a_segment_dock_closed_with_its_button_stops_serving(make_napari_viewer, qtbot, env):
    """napari's dock close button only takes the widget out of its dock: the widget then
    lets go of the shared state (no weights requests, no choice), and a bound handler is
    held weakly, so a widget that is gone cannot keep the viewer alive."""
    import gc

    from napari_medseg._napari.viewer_state import viewer_state

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="img")
    widget = _widget(viewer, qtbot)
    state = viewer_state(viewer)
    assert state.serving and state.weights is not None
    viewer.window.remove_dock_widget(widget)
    qtbot.wait(50)
    assert not state.serving and state.weights is None
    assert not state.request_weights("anything.json")

    class _Handler:
        def serve(self, *args):
            return True

    handler = _Handler()
    state.serve_weights(handler.serve)
    assert state.serving
    del handler
    gc.collect()
    assert not state.serving


def test_scope_region_from_the_viewer_position():
    """The widget's scope becomes a region through the engine: the whole image, the plane
    through the viewer's point (missing leading axes count as 0), or the visible box of a
    pyramid level scaled to full resolution."""
    from napari_medseg.engine.inference.editing import scope_region
    from napari_medseg.engine.inference.regions import plane_region, visible_region, whole_region

    shape = (4, 100, 120)
    assert scope_region("whole", shape) == whole_region(shape)
    assert scope_region("slice", shape, [1.0, 2.2, 50.0, 60.0]) == plane_region(
        shape, np.array([2.2, 50.0, 60.0]))
    assert scope_region("slice", shape, [50.0, 60.0]) == plane_region(
        shape, np.array([0.0, 50.0, 60.0]))
    corners = np.array([[2, 10, 10], [2, 30, 40]], float)
    got = scope_region("visible", shape, [2.0, 20.0, 25.0], corners, downsample=(1, 2, 2),
                       min_size=16)
    want = visible_region(shape, np.array([2.0, 20.0, 25.0]), corners * [1, 2, 2],
                          min_size=16)
    assert got == want and got.stop[1] == 61  # corners scaled to full resolution
    assert scope_region("visible", shape, [2.0, 20.0, 25.0], np.zeros((2, 2)),
                        min_size=16) == visible_region(shape, np.array([2.0, 20.0, 25.0]),
                                                       None, min_size=16)


def test_a_ct_opened_at_07_mm_is_segmented_at_the_weights_2_mm(make_napari_viewer, qtbot, env,
                                                                 tmp_path):
    """A NIfTI CT at 0.7 mm opened in napari: the Segment widget resamples each slice to the
    CT weights' 2 mm (as ``predict`` does) and says so; the mask is on the image's grid."""
    from scipy import ndimage

    from napari_medseg._napari.result_layers import find_output
    from napari_medseg.engine.checkpoints import list_shipped_weights
    from napari_medseg.io.api import write_image
    from napari_medseg.io.metadata import ImageMeta
    from napari_medseg.io.samples import load_sample

    if "sa2net_lite_msd" not in {w["tag"] for w in list_shipped_weights()}:
        pytest.skip("the CT weights are not installed")
    image, _meta, labels = load_sample("ct_patches")  # 2 mm, HU
    big = int(np.argmax([np.count_nonzero(m) for m in labels]))
    picked = [big, (big + 1) % len(labels)]
    side = int(round(48 * 2.0 / 0.7))
    fine = np.stack([ndimage.zoom(np.asarray(image[i], np.float32), side / 48, order=1,
                                  mode="nearest") for i in picked])
    truth = np.stack([ndimage.zoom(np.asarray(labels[i]), side / 48, order=0) for i in picked])
    write_image(tmp_path / "ct.nii.gz", fine,
                ImageMeta("ZYX", spacing=(2.0, 0.7, 0.7), units=("millimeter",) * 3))
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(tmp_path / "ct.nii.gz"), plugin="napari-medseg")
    widget = _widget(viewer, qtbot)
    widget.network_combo.setCurrentText("sa2net")
    index = next(i for i in range(widget.weights_combo.count())
                 if widget.weights_combo.itemData(i).source == "sa2net_lite_msd")
    widget.weights_combo.setCurrentIndex(index)
    widget.device_combo.setCurrentIndex(widget.device_combo.findData("cpu"))
    widget.scope_combo.setCurrentIndex(widget.scope_combo.findData("whole"))
    outcome = _run(qtbot, widget)
    assert outcome.ok, outcome.error
    notices = outcome.value.result.notices
    assert any("from 0.7 x 0.7 mm pixels to the weights' 2 mm" in n for n in notices), notices
    mask = np.asarray(find_output(viewer, layer.name, "mask").data)
    assert mask.shape == fine.shape
    dice = region_metrics(mask, truth, "ZYX", 2)[1]["dice"]
    assert dice > 0.6, dice  # (0.34 on the 24 patches when the slices are not resampled)


def test_nuclei_at_twice_the_size_are_measured_or_take_the_diameter_given(make_napari_viewer,
                                                                          qtbot, env):
    """The Diameter option: auto measures the nuclei of an image at twice the magnification
    and shrinks it (as ``predict`` does); a diameter typed in is used as given."""
    from skimage.transform import rescale

    from napari_medseg._napari.result_layers import find_output
    from napari_medseg.engine.checkpoints import list_shipped_weights
    from napari_medseg.io.samples import load_sample

    if "sa2net_lite_dsb2018" not in {w["tag"] for w in list_shipped_weights()}:
        pytest.skip("the nuclei weights are not installed")
    image, _meta, _labels = load_sample("nuclei")
    big = rescale(np.asarray(image, np.float32), 2, order=1, preserve_range=True)
    viewer = make_napari_viewer()
    viewer.add_image(big.astype(np.uint8), name="big")
    widget = _widget(viewer, qtbot)
    widget.network_combo.setCurrentText("sa2net")
    index = next(i for i in range(widget.weights_combo.count())
                 if widget.weights_combo.itemData(i).source == "sa2net_lite_dsb2018")
    widget.weights_combo.setCurrentIndex(index)
    widget.device_combo.setCurrentIndex(widget.device_combo.findData("cpu"))
    assert widget.diameter_spin.isEnabled() and widget.diameter_spin.text() == "auto"
    outcome = _run(qtbot, widget)
    assert outcome.ok, outcome.error
    notices = outcome.value.result.notices
    (notice,) = [n for n in notices if "first pass" in n]
    zoom = float(re.search(r"resampled by ([0-9.]+)", notice).group(1))
    assert 0.4 < zoom < 0.8, notice
    assert find_output(viewer, "big", "instances").data.shape == big.shape
    widget.diameter_spin.setValue(30.0)
    outcome = _run(qtbot, widget)
    assert outcome.ok, outcome.error
    assert any("30 px across (as given)" in n for n in outcome.value.result.notices)
