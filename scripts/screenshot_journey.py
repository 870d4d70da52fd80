"""Screenshots of a new user's first minutes: each sample segmented with the defaults.

Opens napari at 1600 x 1000, docks the Segment widget once, then for each shipped sample:
opens it (hiding the previous sample's layers, as a user would), presses Run without
touching anything else and saves the window. Last, docks the Fine-tune and Batch widgets
beside it and saves the window again (the three docks must fit). PNG files go to ``--out``.

Needs a display; a virtual one works::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_journey.py --out /tmp/shots
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

__all__ = ["main", "close_viewer"]

SAMPLES = ("nuclei", "nuclei_he", "em_stack", "dermoscopy", "ct_patches")


def _wait(app, until, timeout: float = 600.0) -> None:
    t_end = time.perf_counter() + timeout
    while time.perf_counter() < t_end and not until():
        app.processEvents()
        time.sleep(0.01)
    for _ in range(30):  # let the canvas draw
        app.processEvents()
        time.sleep(0.01)


def _frame(viewer, layer) -> None:
    """Centre the camera on one layer and zoom to fit it (napari's reset view frames every
    layer, the hidden samples of other sizes too)."""
    extent = layer.extent.world[:, -2:]
    size = extent[1] - extent[0]
    height, width = viewer.window._qt_viewer.canvas.size
    viewer.camera.center = tuple((extent[0] + extent[1]) / 2)
    viewer.camera.zoom = 0.95 * min(height / size[0], width / size[1])


def out_folder(argv: list[str] | None, description: str) -> Path:
    """The ``--out`` folder of a screenshot script, made."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    out = Path(parser.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def close_viewer(viewer) -> None:
    """Close napari and wait for the widgets' last jobs (closing starts some): a script has no
    ``napari.run()`` to wait for them on quit, and exiting under one aborts the process."""
    from napari._qt.qthreading import wait_for_workers_to_quit

    viewer.close()
    wait_for_workers_to_quit()


def segment_viewer():
    """napari at 1600 x 1000 with the Segment widget docked and ready.

    Returns:
        ``(viewer, app, segment, idle)``; ``idle()`` is True when the widget does nothing.
    """
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True, title="napari-medseg")
    viewer.window._qt_window.resize(1600, 1000)
    app = QApplication.instance()
    _dock, segment = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    _wait(app, lambda: segment.ready)

    def idle() -> bool:
        return not segment.busy and not segment.running and not segment._plan_timer.isActive()

    return viewer, app, segment, idle


def run_sample(viewer, app, segment, idle, sample: str) -> None:
    """Hide every layer, open ``sample``, press Run with the defaults and wait for it."""
    for layer in viewer.layers:
        layer.visible = False
    viewer.open_sample("napari-medseg", sample)
    _wait(app, idle)
    segment.run_button.click()
    _wait(app, lambda: idle() and segment.last_metrics is not None)


def main(argv: list[str] | None = None) -> None:
    """Take the screenshots; print what each run chose and scored (JSON)."""
    out = out_folder(argv, __doc__.splitlines()[0])
    viewer, app, segment, idle = segment_viewer()
    window = viewer.window._qt_window
    report = []
    for sample in SAMPLES:
        run_sample(viewer, app, segment, idle, sample)
        _frame(viewer, viewer.layers[sample])
        _wait(app, idle)
        viewer.screenshot(str(out / f"journey_{sample}.png"), canvas_only=False)
        scores = segment.last_metrics or {}
        report.append({"sample": sample, "weights": segment.current_weights().source,
                       "why": segment.weights_panel.match_label.text(),
                       "status": segment.status_label.text(),
                       "dice": round(scores.get(1, {}).get("dice", float("nan")), 4),
                       "layers": [layer.name for layer in viewer.layers]})
    for name in ("Fine-tune", "Batch"):
        viewer.window.add_plugin_dock_widget("napari-medseg", name)
    _wait(app, idle)
    viewer.screenshot(str(out / "journey_three_docks.png"), canvas_only=False)
    report.append({"window": [window.width(), window.height()]})
    print(json.dumps(report, indent=1))
    close_viewer(viewer)


if __name__ == "__main__":
    main()
