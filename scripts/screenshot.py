"""Screenshots of the Segment widget at work on the shipped samples.

Starts napari, opens the nuclei sample, docks the Segment widget (through the plugin's
manifest, as a user would), draws the tile plan, runs the network (shipped weights if any,
else an untrained network: its masks are meaningless, and part of the mask is painted from
the sample's labels as a stand-in for a user's corrections), derives the boundary and the instances from it, scores it against the sample's labels, then
segments the EM volume sample and a dermoscopy photograph with their own weights. Saves PNG
files in ``--out``.

Needs a display; a virtual one works::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot.py --out /tmp/shots
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["main"]


def _wait(app, widget, timeout: float = 600.0) -> None:
    """Process events until the widget's jobs are done."""
    t_end = time.perf_counter() + timeout
    time.sleep(0.05)
    while time.perf_counter() < t_end:
        app.processEvents()
        if not widget.busy and not widget.running and not widget._plan_timer.isActive() and (
                not widget._threshold_timer.isActive()):
            break
        time.sleep(0.01)
    for _ in range(20):  # let the canvas draw
        app.processEvents()
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> None:
    """Take the screenshots."""
    parser = argparse.ArgumentParser(description="Screenshots of the Segment widget.")
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--network", default=None,
                        help="network to use (default: the widget's, which prefers one "
                        "with installed trained weights)")
    parser.add_argument("--variant", default="lite", help="variant of an untrained network")
    parser.add_argument("--size", type=int, nargs=2, default=(1600, 1000))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True, title="napari-medseg")
    viewer.window._qt_window.resize(*args.size)
    app = QApplication.instance()
    viewer.open_sample("napari-medseg", "nuclei")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    _wait(app, widget)  # the networks are listed in a worker

    widget.image_combo.setCurrentText("nuclei")
    if args.network:
        widget.network_combo.setCurrentText(args.network)
    if widget.current_weights().untrained:
        widget.variant_combo.setCurrentText(args.variant)
    widget.device_combo.setCurrentIndex(max(0, widget.device_combo.findData("cpu")))
    widget.tile_spin.setValue(128)
    widget.probs_check.setChecked(True)
    _wait(app, widget)
    widget.measure_button.click()
    _wait(app, widget)
    widget.tiles_button.click()
    _wait(app, widget)
    viewer.screenshot(str(out / "1_plan_and_tiles.png"), canvas_only=False)
    widget.grab().save(str(out / "1_widget_plan.png"))

    widget.run()
    _wait(app, widget)
    reference = viewer.layers["nuclei mask"]  # the sample's labels (not an output)
    reference.visible = False
    for lay in viewer.layers:
        if lay.name == "nuclei tiles":
            lay.visible = False
    widget.reference_combo.setCurrentText("nuclei mask")
    _wait(app, widget)
    viewer.screenshot(str(out / "2_result_2d.png"), canvas_only=False)
    widget.grab().save(str(out / "2_widget_after_run.png"))

    # With an untrained network (which finds nothing) the left part of the mask is painted
    # from the sample's labels, a stand-in for a user's corrections. Then the boundary tools
    # and the metrics follow the (edited) mask.
    from napari_medseg._napari.result_layers import find_output

    mask = find_output(viewer, "nuclei", "mask")
    if widget.current_weights().untrained:
        mask.data[:, :170] = (np.asarray(reference.data)[:, :170] > 0).astype(mask.data.dtype)
        mask.refresh()
    widget.boundary_from_mask()
    _wait(app, widget)
    widget.instances_from_mask()
    _wait(app, widget)
    widget.update_metrics()
    for lay in viewer.layers:
        if lay.name == "nuclei probabilities":
            lay.visible = False
    _wait(app, widget)
    viewer.screenshot(str(out / "3_edited_boundary_instances.png"), canvas_only=False)
    widget.grab().save(str(out / "3_widget_metrics.png"))

    def run_sample(sample: str, tag: str, whole: bool = False) -> None:
        """Open ``sample`` alone, pick the network and shipped weights ``tag`` with the auto
        tile (as a user would), run it and score it against the sample's labels."""
        viewer.layers.clear()
        viewer.open_sample("napari-medseg", sample)
        app.processEvents()
        widget.tile_spin.setValue(0)  # auto: the weights' own tile
        widget.network_combo.setCurrentText(tag.split("_lite_")[0])
        _wait(app, widget)
        index = widget.weights_combo.findText(tag)
        if index >= 0:
            widget.weights_combo.setCurrentIndex(index)
        widget.image_combo.setCurrentText(sample)
        if whole:
            widget.scope_combo.setCurrentIndex(widget.scope_combo.findData("whole"))
        widget.reference_combo.setCurrentText(f"{sample} mask")
        _wait(app, widget)
        widget.run()
        _wait(app, widget)
        viewer.layers[f"{sample} probabilities"].visible = False
        _wait(app, widget)

    # The EM volume (its own units: nanometres) with the EM weights.
    run_sample("em_stack", "sa2net_lite_isbi2012", whole=True)
    viewer.dims.set_current_step(0, 2)
    _wait(app, widget)
    viewer.screenshot(str(out / "4_result_volume.png"), canvas_only=False)
    widget.grab().save(str(out / "4_widget_volume.png"))
    # A dermoscopy photograph with the PH2 lesion weights (they run at 1/3 resolution).
    run_sample("dermoscopy", "sa2net_lite_ph2")
    viewer.screenshot(str(out / "5_result_dermoscopy.png"), canvas_only=False)
    print("\n".join(str(p) for p in sorted(out.glob("*.png"))))
    from screenshot_journey import close_viewer

    close_viewer(viewer)


if __name__ == "__main__":
    main()
