"""How long napari's event loop stalls while the Segment widget segments a volume.

A 10 ms QTimer records each tick on the GUI thread while the widget runs the engine in its
thread worker; the longest gap between ticks is the longest time the viewer could not
respond (goal: under 100 ms). The largest gaps are listed with the widget events that
happened just before them, to show what caused them. Prints one JSON object.

Run it under a display (a virtual one is fine)::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_gui_stall.py \
        --shape 16 256 256 --network unet_sharp --variant lite

``--save benchmarks/gui_stall.json`` records the report as the bar the GUI tests check their
own stall against (``tests/test_segment_widget.py``, with a margin for a loaded machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

__all__ = ["main", "measure"]


def measure(shape: tuple[int, ...], network: str, variant: str, tile: int,
            tta: bool = False, show: bool = True, rerun: bool = True) -> dict:
    """Segment a random volume of ``shape`` in a napari viewer and time the GUI stalls.

    Returns:
        A JSON-friendly dict: run seconds, tile passes, tick statistics (ms), the five
        largest gaps with the preceding widget event, the longest GUI-thread call of each
        widget handler, and (``rerun``) the time a second run takes to write its results
        into the existing layers.
    """
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_medseg._napari.segment_widget import SegmentWidget
    from napari_medseg._napari.session import RANDOM_INIT

    viewer = napari.Viewer(show=show)
    vol = np.random.default_rng(0).random(shape, np.float32)
    viewer.add_image(vol, name="volume")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    app = QApplication.instance()
    while not widget.ready:  # the networks are listed in a worker
        app.processEvents()
        time.sleep(0.01)
    widget.network_combo.setCurrentText(network)
    widget.weights_combo.setCurrentText(RANDOM_INIT)
    widget.variant_combo.setCurrentText(variant)
    widget.device_combo.setCurrentIndex(widget.device_combo.findData("cpu"))
    widget.tile_spin.setValue(tile)
    widget.tta_check.setChecked(tta)

    def settle(timeout: float = 600.0) -> None:
        t_end = time.perf_counter() + timeout
        while (widget.busy or widget.running) and time.perf_counter() < t_end:
            app.processEvents()
            time.sleep(0.005)

    # Let the plan job (network load) finish first: the run then measures the run alone.
    t_end = time.perf_counter() + 1.0
    while time.perf_counter() < t_end:
        app.processEvents()
        time.sleep(0.01)
    settle()
    ticks: list[float] = []
    events: list[tuple[float, str]] = []
    handlers: dict[str, float] = {}

    starts: dict[str, float] = {}

    def timed(name, func):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            starts.setdefault(name, t)
            try:
                return func(*args, **kwargs)
            finally:
                ms = (time.perf_counter() - t) * 1000.0
                handlers[name] = max(handlers.get(name, 0.0), ms)
        return wrapper

    # The GUI-thread work of the widget, timed (the longest call of each).
    widget._on_run_event = timed("on_event", widget._on_run_event)
    widget._on_run_done = timed("on_done (layers written)", widget._on_run_done)
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    # Baseline: the same ticks on an idle viewer (what the machine's load alone costs).
    t_end = time.perf_counter() + 2.0
    while time.perf_counter() < t_end:
        app.processEvents()
        time.sleep(0.001)
    idle = np.diff(np.asarray(ticks)) * 1000.0
    ticks.clear()
    t0 = time.perf_counter()
    worker = timed("run() (start)", widget.run)()
    worker.yielded.connect(lambda ev: events.append((time.perf_counter(),
                                                     type(ev).__name__)))
    worker.returned.connect(lambda _: events.append((time.perf_counter(), "returned")))
    while widget.running:
        app.processEvents()
        time.sleep(0.001)
    t_run = time.perf_counter() - t0
    # A few more ticks after the layers were written (their first draw counts too).
    t_end = time.perf_counter() + 0.5
    while time.perf_counter() < t_end:
        app.processEvents()
        time.sleep(0.001)
    timer.stop()
    outcome = widget.last_outcome
    # A second run into the layers the first one created (the usual case); the timer is
    # stopped, only the writing of its results is timed.
    rerun_done_ms = None
    if rerun and outcome is not None and outcome.ok:
        first = dict(handlers)
        handlers.clear()
        widget.run()
        while widget.running:
            app.processEvents()
            time.sleep(0.005)
        rerun_done_ms = handlers.get("on_done (layers written)")
        handlers.clear()
        handlers.update(first)
    ticks_a = np.asarray(ticks)
    gaps = np.diff(ticks_a) * 1000.0
    # Gaps that ended before the results were written: the stall while segmenting.
    t_done = starts.get("on_done (layers written)", float("inf"))
    n_during = int(np.searchsorted(ticks_a, t_done)) - 1
    order = np.argsort(gaps)[::-1][:5]
    largest = []
    for i in order:
        start = ticks_a[i]
        before = [name for t, name in events if t <= ticks_a[i + 1]]
        largest.append({"ms": round(float(gaps[i]), 1),
                        "at_s": round(float(start - t0), 3),
                        "after_event": before[-1] if before else "start"})
    result = outcome.value.result if outcome is not None and outcome.ok else None
    report = {
        "benchmark": "gui_stall",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "shape": list(shape), "network": network, "variant": variant, "tile": tile,
        "tta": tta, "ok": bool(outcome is not None and outcome.ok),
        "error": None if outcome is None else outcome.error,
        "run_s": round(t_run, 3),
        "tile_passes": None if result is None else result.stats.get("forward_passes"),
        "ticks": int(len(ticks_a)),
        "idle_longest_gap_ms": round(float(idle.max()), 1) if len(idle) else None,
        "idle_median_gap_ms": round(float(np.median(idle)), 1) if len(idle) else None,
        "longest_gap_during_run_ms": round(float(gaps[:n_during].max()), 1)
        if n_during > 0 else None,
        "longest_gap_ms": round(float(gaps.max()), 1) if len(gaps) else None,
        "p99_gap_ms": round(float(np.percentile(gaps, 99)), 1) if len(gaps) else None,
        "median_gap_ms": round(float(np.median(gaps)), 1) if len(gaps) else None,
        "largest_gaps": largest,
        "gui_thread_ms": {k: round(v, 1) for k, v in handlers.items()},
        "rerun_write_results_ms": None if rerun_done_ms is None else round(rerun_done_ms, 1),
    }
    viewer.close()
    return report


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: print the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[8, 128, 128])
    parser.add_argument("--network", default="unet_sharp")
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--hidden", action="store_true", help="do not show the window")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--save", default=None,
                        help="also write the report to this JSON file (the GUI tests read "
                             "their stall bar from benchmarks/gui_stall.json)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    text = json.dumps(measure(tuple(args.shape), args.network, args.variant, args.tile,
                              args.tta, show=not args.hidden), indent=2)
    print(text)
    if args.save:
        with open(args.save, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
