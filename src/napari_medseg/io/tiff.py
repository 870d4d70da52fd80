"""TIFF and OME-TIFF through tifffile.

Reading takes the axes from tifffile's series, the pixel size from OME-XML
(``PhysicalSize*``), else from ImageJ metadata (``spacing``, ``unit`` and the resolution
tags), else from resolution tags in centimetres. The origin comes from the first OME
``Plane``'s ``Position*``. Writing always produces OME-TIFF (zlib-compressed) with the same
facts, plus the full :class:`ImageMeta` as JSON in the OME ``Image/Description`` so an
affine and the axis letters round-trip exactly.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageReadError, ImageWriteError
from .metadata import MAX_NDIM, SPATIAL_AXES, ImageMeta, normalize_unit
from .messages import brief

__all__ = ["read_tiff", "write_tiff", "LAZY_BYTES", "STREAM_TILE"]

#: Series larger than this many bytes are returned as lazy dask arrays.
LAZY_BYTES = 2**30
#: A lazy array (zarr, dask) is written in tiles of this side, read one band of tile rows
#: at a time, so writing holds one band, never the image.
STREAM_TILE = 512
#: Files above this size are written as BigTIFF (classic TIFF offsets stop at 4 GiB).
BIGTIFF_BYTES = 2**32 - 2**25

_META_KEY = "napari_medseg"
_UNKNOWN_TO = ("Z", "T", "I")


def _map_axes(axes: str, shape: tuple[int, ...], path: Path) -> tuple[str, list[int], list[int]]:
    """tifffile axes -> our letters; returns (axes, squeeze dims, order for moveaxis)."""
    keep = [i for i, (a, n) in enumerate(zip(axes, shape)) if n > 1 or a in "YX"]
    squeeze = [i for i in range(len(axes)) if i not in keep]
    letters = [axes[i] for i in keep]
    mapped: list[str] = []
    for letter in letters:
        if letter == "S":
            letter = "C"
        if letter not in "TCZYX":
            letter = next((u for u in _UNKNOWN_TO if u not in letters and u not in mapped), "?")
        if letter in mapped or letter == "?":
            raise ImageReadError(
                f"{path} has axes {axes!r} (shape {shape}) that napari-medseg cannot map "
                "to T/C/Z/Y/X; save it with at most one channel axis and one stack axis."
            )
        mapped.append(letter)
    shape_kept = tuple(shape[i] for i in keep)
    if len(mapped) > MAX_NDIM:
        raise ImageReadError(
            f"{path} holds a {len(mapped)}-D image (axes {''.join(mapped)}, shape {shape_kept}); "
            f"napari-medseg reads at most {MAX_NDIM}-D images such as CZYX or TZYX, so save "
            "one time point or channel per file."
        )
    return "".join(mapped), squeeze, keep


def _ome_geometry(xml: str) -> dict[str, Any]:
    """PhysicalSize/Position per axis and the Description of the first OME Image."""
    out: dict[str, Any] = {"size": {}, "size_unit": {}, "position": {}, "position_unit": {}}
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return out
    image = next((el for el in root.iter() if el.tag.endswith("}Image") or el.tag == "Image"), None)
    if image is None:
        return out
    for el in image:
        if el.tag.endswith("Description") and el.text:
            out["description"] = el.text
    pixels = next((el for el in image if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return out
    for ax in "XYZ":
        if pixels.get(f"PhysicalSize{ax}") is not None:
            out["size"][ax] = float(pixels.get(f"PhysicalSize{ax}"))
            out["size_unit"][ax] = pixels.get(f"PhysicalSize{ax}Unit", "µm")
    plane = next((el for el in pixels if el.tag.endswith("Plane")), None)
    if plane is not None:
        for ax in "XYZ":
            if plane.get(f"Position{ax}") is not None:
                out["position"][ax] = float(plane.get(f"Position{ax}"))
                out["position_unit"][ax] = plane.get(f"Position{ax}Unit", "µm")
    return out


def _resolution_spacing(page: Any) -> dict[str, float]:
    """Pixel size along X and Y from the X/YResolution tags (pixels per unit); {} if unset."""
    try:
        xres, yres = page.get_resolution()
    except Exception:  # noqa: BLE001 - missing or malformed tags mean "unknown"
        return {}
    if not xres or not yres:
        return {}
    return {"X": 1.0 / float(xres), "Y": 1.0 / float(yres)}


def _geometry(tif: Any, series: Any, axes: str) -> tuple[tuple, tuple, tuple, dict]:
    """(spacing, origin, units, description-json) for the spatial axes of ``axes``."""
    spatial = [a for a in axes if a in SPATIAL_AXES]
    size: dict[str, float] = {}
    unit: dict[str, str | None] = {}
    origin: dict[str, float] = {}
    stored: dict = {}
    page = series.pages[0] if series.pages else tif.pages[0]
    if tif.is_ome and tif.ome_metadata:
        ome = _ome_geometry(tif.ome_metadata)
        size.update(ome["size"])
        unit.update({k: normalize_unit(v) for k, v in ome["size_unit"].items()})
        for ax, pos in ome["position"].items():
            pos_unit = normalize_unit(ome["position_unit"].get(ax))
            if pos_unit == unit.get(ax) or ax not in unit:
                origin[ax] = pos
        try:
            parsed = json.loads(ome.get("description") or "null")
            if isinstance(parsed, dict) and isinstance(parsed.get(_META_KEY), dict):
                stored = parsed[_META_KEY]
        except ValueError:
            stored = {}
    elif tif.is_imagej and tif.imagej_metadata:
        ij = tif.imagej_metadata
        res = _resolution_spacing(page)
        ij_unit = normalize_unit(ij.get("unit"))
        size.update(res)
        if ij.get("spacing"):
            size["Z"] = float(ij["spacing"])
        if ij_unit is not None:
            unit.update({ax: ij_unit for ax in size})
    else:
        res_unit = getattr(page, "resolutionunit", None)
        if int(res_unit or 1) == 3:  # centimetre
            res = _resolution_spacing(page)
            size.update({k: v * 1e4 for k, v in res.items()})
            unit.update({k: "micrometer" for k in res})
    spacing = tuple(size.get(a, 1.0) if size.get(a, 0) > 0 else 1.0 for a in spatial)
    units = tuple(unit.get(a) if a in size else None for a in spatial)
    orig = tuple(origin.get(a, 0.0) for a in spatial)
    return spacing, orig, units, stored


def _check_complete(path: Path, series: Any) -> None:
    """Raise ImageReadError when the image data runs past the end of the file."""
    file_size = os.path.getsize(path)
    end = 0
    for page in series.pages:
        if page is None:
            continue
        offsets = getattr(page, "dataoffsets", ()) or ()
        counts = getattr(page, "databytecounts", ()) or ()
        for offset, count in zip(offsets, counts):
            end = max(end, int(offset) + int(count))
    if end > file_size:
        raise ImageReadError(
            f"{path} is truncated: it holds {file_size} bytes but its image data runs to byte "
            f"{end}; copy or export the file again."
        )


def _stored_or(stored: dict, key: str, current: tuple) -> tuple:
    """The per-axis value kept in our JSON when it has the right length, else ``current``."""
    value = stored.get(key)
    return tuple(value) if isinstance(value, list) and len(value) == len(current) else current


def read_tiff(path: str | os.PathLike, level: int | None = None) -> tuple[Any, ImageMeta]:
    """Read the first series of a TIFF or OME-TIFF file.

    Args:
        path: the ``.tif``/``.tiff``/``.ome.tif`` file.
        level: pyramid level of a pyramidal OME-TIFF (0 = full resolution; None = 0).

    Returns:
        ``(array, meta)``; the array is numpy, or a dask array for series over
        :data:`LAZY_BYTES`. Axes follow ``meta.axes`` (size-1 axes other than Y/X are
        dropped; RGB samples become a last ``C`` axis with ``meta.rgb``).

    Raises:
        ImageReadError: the file is truncated, corrupt, has no image, or is more than 4-D.
    """
    import tifffile

    p = Path(path)
    try:
        tif = tifffile.TiffFile(p)
    except Exception as exc:  # noqa: BLE001 - tifffile raises many kinds
        raise ImageReadError(
            f"{p} is not a readable TIFF file ({brief(exc)}); "
            "it may be truncated or damaged."
        ) from exc
    with tif:
        if not tif.series:
            raise ImageReadError(f"{p} holds no image.")
        series = tif.series[0]
        n_levels = len(series.levels)
        lvl = 0 if level is None else int(level)
        if not 0 <= lvl < n_levels:
            raise ImageReadError(f"{p} has {n_levels} pyramid level(s); level {level} does not exist.")
        _check_complete(p, series)
        chosen = series.levels[lvl]
        axes, squeeze, keep = _map_axes(chosen.axes, tuple(chosen.shape), p)
        photometric = getattr(series.pages[0], "photometric", None) if series.pages else None
        is_rgb_photometric = int(photometric) == 2 if photometric is not None else False
        try:
            if chosen.nbytes > LAZY_BYTES:
                import dask.array as da
                import zarr

                # a store of its own: it keeps the file open after ``tif`` is closed
                store = tifffile.imread(p, aszarr=True, series=0, level=lvl)
                data: Any = da.from_zarr(zarr.open(store, mode="r"))
            else:
                data = chosen.asarray()
        except Exception as exc:  # noqa: BLE001
            raise ImageReadError(
                f"The image data of {p} cannot be decoded ({brief(exc)}); "
                "the file is probably damaged."
            ) from exc
        spacing, origin, units, stored = _geometry(tif, series, axes)
    if squeeze:
        data = data.reshape(tuple(data.shape[i] for i in keep))
    rgb = False
    if "C" in axes and is_rgb_photometric and data.shape[axes.index("C")] in (3, 4):
        c = axes.index("C")
        if c != len(axes) - 1:
            data = np.moveaxis(data, c, -1)
            axes = axes.replace("C", "") + "C"
        rgb = True
    affine = None
    extra: dict[str, Any] = {"format": "tiff", "level": lvl, "n_levels": n_levels}
    if stored and tuple(stored.get("shape", ())) == tuple(data.shape):
        stored_axes = str(stored.get("axes", axes))
        if len(stored_axes) == len(axes) and [a in SPATIAL_AXES for a in stored_axes] == [
            a in SPATIAL_AXES for a in axes
        ]:
            axes = stored_axes
            rgb = bool(stored.get("rgb", rgb))
        affine = stored.get("affine")
        spacing = _stored_or(stored, "spacing", spacing)
        origin = _stored_or(stored, "origin", origin)
        units = _stored_or(stored, "units", units)
        extra.update(stored.get("extra") or {})
        extra.update({"format": "tiff", "level": lvl, "n_levels": n_levels})
    meta = ImageMeta(
        axes=axes, spacing=spacing, origin=origin, units=units, affine=affine,
        source=str(p), rgb=rgb, extra=extra,
    )
    return data, meta


def write_tiff(path: str | os.PathLike, array: Any, meta: ImageMeta) -> Path:
    """Write an array as a zlib-compressed OME-TIFF with its geometry.

    A numpy array is written in one go; a lazy one (zarr, dask) is streamed: tiles of
    :data:`STREAM_TILE` read one band of rows at a time, so a volume or a plane larger than
    memory is written with memory for one band. Files over 4 GiB are BigTIFF.

    Args:
        path: target file (``.tif``, ``.tiff``, ``.ome.tif``).
        array: data with axes ``meta.axes``.
        meta: geometry to store (spacing, origin, units; the rest as JSON).

    Returns:
        The path written.

    Raises:
        ImageWriteError: the array does not fit the metadata or cannot be written.
    """
    import tifffile

    p = Path(path)
    lazy = not isinstance(array, np.ndarray) and hasattr(array, "shape") and hasattr(
        array, "dtype") and getattr(array, "ndim", 0) >= 2
    data = array if lazy else np.asarray(array)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if data.ndim != meta.ndim:
        raise ImageWriteError(f"Cannot write {p}: the array is {data.ndim}-D but its axes are {meta.axes!r}.")
    tiff_axes = meta.axes.replace("I", "T" if "T" not in meta.axes else "Q")
    photometric = "minisblack"
    if meta.rgb and data.shape[-1] in (3, 4) and data.dtype == np.uint8:
        tiff_axes = tiff_axes[:-1] + "S"
        photometric = "rgb"
    md: dict[str, Any] = {"axes": tiff_axes}
    for ax, s, u in zip(meta.spatial_axes, meta.spacing, meta.units):
        if u is not None:  # OME's default unit is the micrometre: write no size if unknown
            md[f"PhysicalSize{ax}"] = float(s)
            md[f"PhysicalSize{ax}Unit"] = _OME_UNITS.get(u, u)
    if any(o != 0 for o in meta.origin) and all(u is not None for u in meta.units):
        n_planes = int(np.prod([n for a, n in zip(tiff_axes, data.shape) if a not in "YXS"] or [1]))
        plane: dict[str, list] = {}
        for ax, o, u in zip(meta.spatial_axes, meta.origin, meta.units):
            if ax == "Z":
                continue  # Z positions differ per plane; the JSON below keeps the origin
            plane[f"Position{ax}"] = [float(o)] * n_planes
            plane[f"Position{ax}Unit"] = [_OME_UNITS.get(u, u)] * n_planes
        md["Plane"] = plane
    stored = meta.to_dict()
    stored["shape"] = list(data.shape)
    stored.pop("source", None)
    md["Description"] = json.dumps({_META_KEY: stored})
    kwargs: dict[str, Any] = {}
    xy = dict(zip(meta.spatial_axes, meta.spacing))
    if meta.units and all(meta.units[meta.spatial_axes.index(a)] == "micrometer" for a in "YX"):
        kwargs["resolution"] = (1e4 / xy["X"], 1e4 / xy["Y"])
        kwargs["resolutionunit"] = "CENTIMETER"
    nbytes = int(np.prod(data.shape, dtype=np.int64)) * np.dtype(data.dtype).itemsize
    kwargs["bigtiff"] = nbytes > BIGTIFF_BYTES
    if lazy and photometric != "rgb":
        kwargs.update(shape=tuple(data.shape), dtype=np.dtype(data.dtype),
                      tile=(STREAM_TILE, STREAM_TILE))
        data = _tiles(data, STREAM_TILE)
    elif lazy:
        data = np.asarray(data)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(
            p, data, ome=True, photometric=photometric, metadata=md, compression="zlib", **kwargs
        )
    except Exception as exc:  # noqa: BLE001
        raise ImageWriteError(f"Cannot write {p}: {brief(exc)}.") from exc
    return p


def _tiles(data: Any, tile: int):
    """The tiles of every YX plane of a lazy array in TIFF order (planes in C order, then
    tile rows, then tile columns); reads one band of ``tile`` rows of a plane at a time."""
    lead = tuple(int(n) for n in data.shape[:-2])
    height, width = (int(n) for n in data.shape[-2:])
    for index in np.ndindex(*lead) if lead else [()]:
        for y in range(0, height, tile):
            band = np.asarray(data[index + (slice(y, y + tile), slice(None))])
            for x in range(0, width, tile):
                yield np.ascontiguousarray(band[:, x:x + tile])


# NGFF unit names -> OME-XML UnitsLength symbols
_OME_UNITS = {
    "meter": "m",
    "centimeter": "cm",
    "millimeter": "mm",
    "micrometer": "µm",
    "nanometer": "nm",
    "picometer": "pm",
    "angstrom": "Å",
    "inch": "in",
}
