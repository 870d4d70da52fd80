"""The demo window: the sample, the demo's results as editable layers, the Segment widget docked.

``napari-medseg demo`` segments the bundled nuclei sample headlessly, writes the outputs, and,
when a display exists, starts this module in a new process (so the CLI never imports napari)::

    python -m napari_medseg._napari.demo IMAGE [LABELS ...] [--weights TAG]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["open_demo", "main"]


def open_demo(image: str | Path, labels: Sequence[str | Path] = (), weights: str | None = None):
    """A viewer showing ``image`` (through the plugin's reader) and ``labels`` on top of it.

    Args:
        image: the image file.
        labels: label files written by the demo (mask, boundary, instances).
        weights: the weights tag to preselect in the Segment widget.

    Returns:
        the ``napari.Viewer``.
    """
    import napari
    import numpy as np

    from ..engine.batch.scan import image_stem
    from ..io import read_image
    from .layers import layer_kwargs
    from .result_layers import output_name, style_labels

    viewer = napari.Viewer(title="napari-medseg demo")
    array, meta = read_image(image)
    kwargs = layer_kwargs(meta)
    image_layer = viewer.add_image(array, **kwargs)
    for path in labels:
        data, _ = read_image(path)
        output = image_stem(Path(path).name).rsplit("_", 1)[-1]
        output = output if output in ("mask", "boundary", "instances") else "mask"
        layer = viewer.add_labels(np.asarray(data), name=output_name(image_layer.name, output),
                                  scale=image_layer.scale[-2:],
                                  translate=image_layer.translate[-2:],
                                  visible=output != "instances")
        style_labels(layer, output)
    _widget, segment = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    if weights:
        segment.select_weights(weights)
    return viewer


def main(argv: Sequence[str] | None = None) -> int:
    """Open the demo window and run napari's event loop."""
    parser = argparse.ArgumentParser(prog="python -m napari_medseg._napari.demo")
    parser.add_argument("image")
    parser.add_argument("labels", nargs="*")
    parser.add_argument("--weights")
    args = parser.parse_args(argv)
    import napari

    open_demo(args.image, args.labels, args.weights)
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
