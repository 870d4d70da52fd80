"""The napari reader contribution: TIFF/OME-TIFF, zarr/OME-Zarr, NIfTI, DICOM folders, PNG/JPEG.

``get_reader`` is called by napari for every path a user opens, so it is cheap (file name,
at most a few bytes; it imports neither torch nor any imaging library), never raises, and
returns None for paths it does not handle.

Error policy (checked against napari 0.9.2): when the returned reader function fails, it
raises the project's :class:`~napari_medseg.errors.ImageReadError`, one sentence naming the
file and the problem. What a person then sees:

* File > Open or drag and drop: napari wraps the error in its ``ReaderPluginError`` and opens
  its reader dialog, whose text ends with ``ImageReadError: <our sentence>``, offering the
  other readers (napari's builtins claim every extension, so there always is one); no
  traceback is shown;
* ``viewer.open(path, plugin="napari-medseg")`` in a script raises our ImageReadError as is.

Returning an empty list instead would make napari say only "returned no data", and catching
the error to show a notification ourselves would hide it from scripts, so raising is the better
of napari's options. ``scripts/screenshot_readers.py`` saves a picture of that dialog.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..io.detect import is_supported

__all__ = ["get_reader", "read_layers"]

PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]
LayerData = tuple[Any, dict[str, Any], str]


def get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData]] | None:
    """napari's ``get_reader`` hook: :func:`read_layers` if we read ``path``, else None.

    Args:
        path: one path, or a list of paths (each must be readable by us).
    """
    try:
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        if not paths or not all(is_supported(p) for p in paths):
            return None
    except Exception:  # noqa: BLE001 - the hook must never raise
        return None
    return read_layers


def _read_path(path: str | os.PathLike) -> list[LayerData]:
    from ..io import read_levels
    from ..io.detect import detect_format
    from .layers import layer_data

    p = Path(path)
    fmt = detect_format(p)
    if fmt in ("zarr", "tiff"):
        levels, metas = read_levels(p)
    else:
        from ..io import read_image

        data, meta = read_image(p)
        levels, metas = [data], [meta]
    meta = metas[0]
    layer_type = "labels" if meta.extra.get("labels") and "C" not in meta.axes else "image"
    out = [layer_data(levels, meta, layer_type=layer_type)]
    for name in meta.extra.get("label_names", []) or []:
        label_levels, label_metas = read_levels(p / "labels" / name)
        out.append(layer_data(label_levels, label_metas[0], layer_type="labels", name=name))
    return out


def read_layers(path: PathOrPaths) -> list[LayerData]:
    """Read one or more paths into napari ``LayerData`` tuples.

    OME-Zarr pyramids become multiscale layers, RGB images rgb layers, non-RGB channels
    one layer each; files written as label images (OME-Zarr ``image-label``, our TIFF and
    NIfTI label writers) open as Labels layers. Layers get ``scale``, ``translate`` and
    ``units`` from the file's geometry.

    Raises:
        MedsegError: an ImageReadError with one sentence naming the file and the problem.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        layers.extend(_read_path(p))
    return layers
