"""Screenshots of the Segment widget at work on the shipped samples.

Starts napari, opens the nuclei sample, docks the Segment widget (through the plugin's
manifest, as a user would), draws the tile plan, runs the network (shipped weights if any,
else an untrained network: its masks are meaningless, the screenshots show the interface),
changes the threshold, splits instances, scores against the sample's labels, then segments
the EM volume sample. Saves PNG files in ``--out``.

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
    parser.add_argument("--network", default="unet_sharp")
    parser.add_argument("--variant", default="lite", help="variant of an untrained network")
    parser.add_argument("--size", type=int, nargs=2, default=(1600, 1000))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True, title="napari-medseg")
    viewer.window._qt_window.resize(*args.size)
    app = QApplication.instance()
    viewer.open_sample("napari-medseg", "nuclei")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    app.processEvents()

    widget.image_combo.setCurrentText("nuclei")
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
    tiles = [lay for lay in viewer.layers if lay.name == "nuclei tiles"]
    for lay in tiles:
        lay.visible = False
    widget.reference_combo.setCurrentText("nuclei mask")
    _wait(app, widget)
    viewer.screenshot(str(out / "2_result_2d.png"), canvas_only=False)
    widget.grab().save(str(out / "2_widget_after_run.png"))

    widget.threshold_slider.setValue(0.45)
    _wait(app, widget)
    widget.instances_from_mask()
    _wait(app, widget)
    viewer.screenshot(str(out / "3_threshold_and_instances.png"), canvas_only=False)

    viewer.open_sample("napari-medseg", "em_stack")
    app.processEvents()
    for lay in list(viewer.layers):
        lay.visible = lay.name.startswith("em_stack")
    widget.image_combo.setCurrentText("em_stack")
    widget.scope_combo.setCurrentIndex(widget.scope_combo.findData("whole"))
    widget.reference_combo.setCurrentText("em_stack mask")
    _wait(app, widget)
    widget.run()
    _wait(app, widget)
    viewer.dims.set_current_step(0, 2)
    _wait(app, widget)
    viewer.screenshot(str(out / "4_result_volume.png"), canvas_only=False)
    widget.grab().save(str(out / "4_widget_volume.png"))
    print("\n".join(str(p) for p in sorted(out.glob("*.png"))))
    viewer.close()


if __name__ == "__main__":
    main()
