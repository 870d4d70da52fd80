"""The one place that turns ``ImageMeta`` into napari layer arguments, and layers back.

napari shows physical geometry through a layer's ``scale`` (voxel size per axis),
``translate`` (position of the first voxel), ``units`` and ``axis_labels``; ``rgb`` and
``channel_axis`` say how colour and channels are shown; ``multiscale`` marks pyramids. The
full :class:`~napari_medseg.io.ImageMeta` (affine, DICOM facts ...) rides along in
``layer.metadata["napari_medseg"]`` so writers can store the source geometry again.

Oblique or flipped NIfTI/DICOM affines are shown axis-aligned (scale = voxel size,
translate = world position of the first voxel); the affine itself is kept for writing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputShapeError
from ..io.axes import guess_axes
from ..io.metadata import SPATIAL_AXES, ImageMeta, normalize_unit

__all__ = [
    "META_KEY",
    "layer_name",
    "layer_kwargs",
    "layer_data",
    "meta_from_layer",
    "meta_from_attributes",
    "layer_traits",
]

#: Key of the ImageMeta in a layer's ``metadata`` dict.
META_KEY = "napari_medseg"


def layer_name(meta: ImageMeta, fallback: str = "image") -> str:
    """A layer name from the source path: ``ct.nii.gz`` -> ``ct``; the fallback otherwise."""
    if not meta.source:
        return fallback
    name = Path(meta.source.rstrip("/")).name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".nii.gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or fallback


def _units(axes: str, meta: ImageMeta) -> tuple[str, ...] | None:
    """napari units per axis ("pixel" off the spatial axes), or None if any unit is unknown."""
    if any(u is None for u in meta.units):
        return None
    spatial = iter(meta.units)
    return tuple(next(spatial) if a in SPATIAL_AXES else "pixel" for a in axes)  # type: ignore[misc]


def layer_kwargs(
    meta: ImageMeta,
    *,
    name: str | None = None,
    layer_type: str = "image",
    multiscale: bool = False,
    n_channels: int = 1,
) -> dict[str, Any]:
    """``add_image``/``add_labels`` keyword arguments for data described by ``meta``.

    Args:
        meta: the metadata of the array (level 0 for a pyramid).
        name: layer name (default: from the source file name).
        layer_type: ``"image"`` or ``"labels"``; labels get neither ``rgb`` nor
            ``channel_axis`` (a ``C`` axis in ``meta`` is dropped for them).
        multiscale: the data is a list of pyramid levels.
        n_channels: size of the ``C`` axis of a non-RGB image (napari splits it into one
            layer per channel; each gets its own name and metadata).

    Returns:
        A dict with ``name``, ``scale``, ``translate``, ``axis_labels``, ``metadata`` and,
        where they apply, ``units``, ``rgb``, ``channel_axis``, ``multiscale`` and
        ``contrast_limits`` (from a DICOM window).
    """
    if layer_type == "labels" and meta.channel_axis is not None:
        meta = meta.without_channels()  # a label image for a multi-channel image
    name = name or layer_name(meta)
    kwargs: dict[str, Any] = {"name": name}
    if multiscale:
        kwargs["multiscale"] = True
    axes = meta.axes
    split = layer_type == "image" and meta.channel_axis is not None and not meta.rgb
    if layer_type == "image" and meta.rgb:
        kwargs["rgb"] = True
        shown = axes[:-1]  # napari's scale excludes the colour axis
    elif split:
        kwargs["channel_axis"] = meta.channel_axis
        shown = axes.replace("C", "")
    else:
        shown = axes
    kwargs["scale"] = tuple(_per_axis(shown, meta.spacing, 1.0, meta))
    kwargs["translate"] = tuple(_per_axis(shown, meta.origin, 0.0, meta))
    kwargs["axis_labels"] = tuple(a.lower() for a in shown)
    units = _units(shown, meta)
    if units is not None:
        kwargs["units"] = units
    if split:
        kwargs["name"] = [f"{name} [{i}]" for i in range(n_channels)]
        channel_meta = meta.without_channels()
        kwargs["metadata"] = [{META_KEY: channel_meta, "channel": i} for i in range(n_channels)]
    else:
        kwargs["metadata"] = {META_KEY: meta}
    if layer_type == "image" and not meta.rgb:
        window = _dicom_window(meta)
        if window is not None:
            kwargs["contrast_limits"] = window
    return kwargs


def _per_axis(axes: str, values: Sequence[float], default: float, meta: ImageMeta) -> list[float]:
    lookup = dict(zip(meta.spatial_axes, values))
    return [float(lookup[a]) if a in lookup else default for a in axes]


def _dicom_window(meta: ImageMeta) -> tuple[float, float] | None:
    center, width = meta.extra.get("window_center"), meta.extra.get("window_width")
    if center is None or width is None or float(width) <= 0:
        return None
    return (float(center) - float(width) / 2, float(center) + float(width) / 2)


def layer_data(
    data: Any, meta: ImageMeta, layer_type: str = "image", name: str | None = None
) -> tuple[Any, dict[str, Any], str]:
    """A napari ``LayerData`` tuple ``(data, kwargs, layer_type)``.

    Args:
        data: an array with axes ``meta.axes``, or a list of pyramid levels (full
            resolution first).
        meta: metadata of the (level-0) array.
        layer_type: ``"image"`` or ``"labels"``.
        name: layer name (default from the source path).
    """
    multiscale = isinstance(data, (list, tuple)) and len(data) > 1
    if isinstance(data, (list, tuple)) and len(data) == 1:
        data = data[0]
    first = data[0] if multiscale else data
    split = layer_type == "image" and meta.channel_axis is not None and not meta.rgb
    n_channels = int(first.shape[meta.channel_axis]) if split else 1
    kwargs = layer_kwargs(
        meta, name=name, layer_type=layer_type, multiscale=multiscale, n_channels=n_channels
    )
    return data, kwargs, layer_type


def _units_from_layer(units: Any, axes: str) -> tuple[str | None, ...] | None:
    if units is None:
        return None
    names = [normalize_unit(str(u)) for u in units]
    if len(names) != len(axes):
        return None
    return tuple(n for n, a in zip(names, axes) if a in SPATIAL_AXES)


def meta_from_attributes(data: Any, attributes: Mapping[str, Any]) -> ImageMeta:
    """The ImageMeta of a layer, from its data and ``as_layer_data_tuple()`` attributes.

    The stored metadata is used when its axes fit the data; if the layer's ``scale`` or
    ``translate`` was changed in napari since, those win (and an affine that no longer
    agrees with them is dropped). Without stored metadata the axes are guessed (``YX``,
    ``ZYX``, ``TZYX``) and the geometry is the layer's scale and translate.

    Args:
        data: the layer data (a list of levels for a multiscale layer).
        attributes: the layer's attributes, as napari hands them to writers.
    """
    level0 = data[0] if isinstance(data, (list, tuple)) else data
    ndim = int(np.ndim(level0)) if not hasattr(level0, "ndim") else int(level0.ndim)
    stored = (attributes.get("metadata") or {}).get(META_KEY)
    if isinstance(stored, Mapping):
        try:
            stored = ImageMeta.from_dict(stored)
        except (TypeError, ValueError):
            stored = None
    rgb = bool(attributes.get("rgb", False))
    meta: ImageMeta | None = None
    if isinstance(stored, ImageMeta):
        if stored.ndim == ndim:
            meta = stored
        elif stored.without_channels().ndim == ndim:
            meta = stored.without_channels()
    if meta is None:
        try:
            meta = ImageMeta(axes=guess_axes(np.shape(level0), rgb=rgb), rgb=rgb)
        except InputShapeError:
            raise ValueError(f"cannot tell the axes of a {ndim}-D layer") from None
    shown = meta.axes[:-1] if meta.rgb else meta.axes
    scale = attributes.get("scale")
    translate = attributes.get("translate")
    spatial_idx = [i for i, a in enumerate(shown) if a in SPATIAL_AXES]
    changes: dict[str, Any] = {}
    if scale is not None and len(scale) == len(shown):
        layer_spacing = tuple(float(scale[i]) for i in spatial_idx)
        if not np.allclose(layer_spacing, meta.spacing, rtol=1e-6, atol=0):
            changes["spacing"] = layer_spacing
    if translate is not None and len(translate) == len(shown):
        layer_origin = tuple(float(translate[i]) for i in spatial_idx)
        if not np.allclose(layer_origin, meta.origin, rtol=1e-6, atol=1e-9):
            changes["origin"] = layer_origin
    if not isinstance(stored, ImageMeta):
        units = _units_from_layer(attributes.get("units"), shown)
        if units is not None:
            changes["units"] = units
    if changes:
        if meta.affine is not None:
            changes["affine"] = None
        meta = meta.replace(**changes)
    return meta


def meta_from_layer(layer: Any) -> ImageMeta:
    """The ImageMeta of a napari layer object (see :func:`meta_from_attributes`)."""
    data, attributes, _ = layer.as_layer_data_tuple()
    return meta_from_attributes(data, attributes)


def layer_traits(layer: Any) -> Any:
    """What an image layer's metadata says about its kind (``engine.matching.ImageTraits``),
    for choosing the weights that suit it; no pixel is read."""
    from ..engine.matching import ImageTraits, traits_from_meta

    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    try:
        meta = meta_from_layer(layer)
    except (ValueError, TypeError):
        return ImageTraits(channels=3 if getattr(layer, "rgb", False) else 1)
    return traits_from_meta(meta, getattr(data, "dtype", None))
