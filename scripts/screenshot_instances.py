"""Screenshots of the Segment widget's objects on the nuclei samples, defaults untouched.

Opens napari at 1600 x 1000, docks the Segment widget, and for each nuclei sample opens it,
presses Run without changing anything (the proposed weights learnt the instance task, so the
run writes ``<image> instances`` beside the mask and the boundary), then shows the image with
the instances and the boundary only and zooms on the part of the image where the most
annotated nuclei touch. Saves ``instances_<sample>.png`` (whole image) and
``instances_<sample>_zoom.png`` to ``--out`` and prints what it saw (JSON): objects found
against the annotation's, the widget's object scores, the boundary layer's share of pixels.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_instances.py --out /tmp/shots
"""

from __future__ import annotations

import json

import numpy as np

from screenshot_journey import _frame, _wait, close_viewer, out_folder, run_sample, segment_viewer

__all__ = ["main", "touching_window"]

SAMPLES = ("nuclei", "nuclei_he")


def touching_window(labels: np.ndarray, side: int = 96) -> tuple[int, int]:
    """The top-left corner of the ``side`` x ``side`` window holding the most pixels where
    two annotated nuclei touch (4-neighbours with different non-zero labels)."""
    from scipy import ndimage as ndi

    lab = np.asarray(labels)
    touch = np.zeros(lab.shape, np.float32)
    for axis in (0, 1):
        a, b = lab, np.roll(lab, -1, axis=axis)
        hit = (a > 0) & (b > 0) & (a != b)
        touch += hit
    score = ndi.uniform_filter(touch, size=side, mode="constant")
    y, x = np.unravel_index(int(score.argmax()), score.shape)
    h, w = lab.shape
    return (int(np.clip(y - side // 2, 0, max(0, h - side))),
            int(np.clip(x - side // 2, 0, max(0, w - side))))


def main(argv: list[str] | None = None) -> None:
    """Take the screenshots and print the report."""
    out = out_folder(argv, __doc__.splitlines()[0])
    viewer, app, segment, idle = segment_viewer()
    report = []
    for sample in SAMPLES:
        run_sample(viewer, app, segment, idle, sample)
        names = {"image": sample, "instances": f"{sample} instances",
                 "boundary": f"{sample} boundary", "mask": f"{sample} mask"}
        for layer in viewer.layers:
            layer.visible = layer.name in (names["image"], names["instances"], names["boundary"])
        _frame(viewer, viewer.layers[sample])
        _wait(app, idle)
        viewer.screenshot(str(out / f"instances_{sample}.png"), canvas_only=False)
        reference = np.asarray(viewer.layers[f"{sample} annotation"].data)
        y, x = touching_window(reference)
        viewer.camera.center = (y + 48, x + 48)
        viewer.camera.zoom = 0.9 * min(viewer.window._qt_viewer.canvas.size) / 96
        _wait(app, idle)
        viewer.screenshot(str(out / f"instances_{sample}_zoom.png"), canvas_only=False)
        objects = np.asarray(viewer.layers[names["instances"]].data)
        boundary = np.asarray(viewer.layers[names["boundary"]].data)
        report.append({
            "sample": sample, "weights": segment.current_weights().source,
            "objects": int(len(np.unique(objects)) - 1),
            "annotated_nuclei": int(len(np.unique(reference)) - 1),
            "object_scores": getattr(segment.metrics_panel, "last_object_scores", None),
            "boundary_fraction": round(float((boundary > 0).mean()), 4),
            "zoom_window": [y, x, 96], "status": segment.status_label.text(),
        })
    print(json.dumps(report, indent=1, default=str))
    close_viewer(viewer)


if __name__ == "__main__":
    main()
