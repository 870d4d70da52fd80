"""The napari writer contributions: a Labels layer to OME-TIFF, OME-Zarr or NIfTI.

Each writer turns the layer back into an :class:`~napari_medseg.io.ImageMeta` (stored with
the layer by our reader or widgets, else rebuilt from the layer's scale and translate) and
calls :func:`napari_medseg.io.write_labels`. A Labels layer that napari made itself (e.g.
"new labels layer") carries no metadata: then the writer looks in the current viewer for
an image layer read by napari-medseg with the same grid (shape, scale and translate) and
uses its geometry, so a NIfTI mask gets the CT's affine back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..io import ImageMeta, write_image, write_labels
from .layers import META_KEY, meta_from_attributes

__all__ = [
    "write_labels_tiff",
    "write_labels_zarr",
    "write_labels_nifti",
    "write_image_nifti",
    "write_image_zarr",
]


def _shown_shape(layer: Any) -> tuple[int, ...]:
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    shape = tuple(int(n) for n in data.shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def _viewer_source_meta(shape: tuple[int, ...], attributes: Mapping[str, Any]) -> ImageMeta | None:
    """The metadata of the one image layer in the current viewer on the same grid, if any."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # noqa: BLE001 - no viewer (scripts, tests): nothing to find
        return None
    if viewer is None:
        return None
    scale = attributes.get("scale")
    scale = np.ones(len(shape)) if scale is None else np.asarray(scale)
    translate = attributes.get("translate")
    translate = np.zeros(len(shape)) if translate is None else np.asarray(translate)
    found: list[ImageMeta] = []
    for layer in viewer.layers:
        meta = getattr(layer, "metadata", {}).get(META_KEY)
        if not isinstance(meta, ImageMeta):
            continue
        meta = meta.without_channels()
        if _shown_shape(layer) != shape or meta.ndim != len(shape):
            continue
        if len(layer.scale) != len(shape) or not np.allclose(layer.scale, scale):
            continue
        if not np.allclose(layer.translate, translate):
            continue
        if not any(meta == other for other in found):
            found.append(meta)
    return found[0] if len(found) == 1 else None


def _labels_meta(data: Any, attributes: Mapping[str, Any]) -> tuple[Any, ImageMeta]:
    level0 = data[0] if isinstance(data, (list, tuple)) else data
    attrs = dict(attributes)
    stored = (attrs.get("metadata") or {}).get(META_KEY)
    if not isinstance(stored, (ImageMeta, Mapping)):
        source = _viewer_source_meta(tuple(int(n) for n in level0.shape), attrs)
        if source is not None:
            attrs["metadata"] = {**(attrs.get("metadata") or {}), META_KEY: source}
    return np.asarray(level0), meta_from_attributes(level0, attrs)


def _write_labels(path: str, data: Any, attributes: dict, fmt: str) -> list[str]:
    array, meta = _labels_meta(data, attributes)
    name = attributes.get("name")
    kwargs = {"name": str(name)} if fmt == "zarr" and name else {}
    return [str(write_labels(path, array, meta, format=fmt, **kwargs))]


def write_labels_tiff(path: str, data: Any, attributes: dict) -> list[str]:
    """Write a Labels layer as OME-TIFF with its spacing (napari single-layer writer)."""
    return _write_labels(path, data, attributes, "tiff")


def write_labels_zarr(path: str, data: Any, attributes: dict) -> list[str]:
    """Write a Labels layer as an OME-Zarr label image (``image.zarr/labels/<name>`` adds it
    to that image)."""
    return _write_labels(path, data, attributes, "zarr")


def write_labels_nifti(path: str, data: Any, attributes: dict) -> list[str]:
    """Write a Labels layer as NIfTI with the source image's affine."""
    return _write_labels(path, data, attributes, "nifti")


def _write_image(path: str, data: Any, attributes: dict, fmt: str) -> list[str]:
    level0 = data[0] if isinstance(data, (list, tuple)) else data
    meta = meta_from_attributes(level0, attributes)
    return [str(write_image(path, level0, meta, format=fmt))]


def write_image_nifti(path: str, data: Any, attributes: dict) -> list[str]:
    """Write an Image layer as NIfTI, keeping the affine it was read with."""
    return _write_image(path, data, attributes, "nifti")


def write_image_zarr(path: str, data: Any, attributes: dict) -> list[str]:
    """Write an Image layer as OME-Zarr (lazily, chunk by chunk, for dask data)."""
    return _write_image(path, data, attributes, "zarr")
