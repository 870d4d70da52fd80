"""The format-independent entry points: ``read_image``, ``read_levels``, ``write_labels``,
``write_image``. They pick the format, call its module and turn any library failure into
one sentence (:class:`~napari_medseg.errors.ImageReadError` / ``ImageWriteError``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageReadError, ImageWriteError, MedsegError
from .axes import guess_axes
from .detect import FORMATS, WRITE_SUFFIXES, detect_format, format_from_name
from .metadata import ImageMeta
from .messages import brief

__all__ = ["read_image", "read_levels", "write_labels", "write_image"]

_WRITE_FORMATS = {"tiff", "zarr", "nifti", "raster"}
_FORMAT_ALIASES = {
    "tif": "tiff", "ome-tiff": "tiff", "ome.tif": "tiff", "tiff": "tiff",
    "zarr": "zarr", "ome-zarr": "zarr", "ome.zarr": "zarr",
    "nifti": "nifti", "nii": "nifti", "nii.gz": "nifti",
    "png": "raster", "raster": "raster",
}


def _read_one(fmt: str, path: Path, level: int | None, series: str | None) -> tuple[Any, ImageMeta]:
    if fmt != "dicom" and series is not None:
        raise ImageReadError(f"{path} is not DICOM, so series={series!r} does not apply.")
    if fmt in ("nifti", "dicom", "raster") and level not in (None, 0):
        raise ImageReadError(f"{path} has a single resolution level; level {level} does not exist.")
    if fmt == "tiff":
        from .tiff import read_tiff

        return read_tiff(path, level)
    if fmt == "zarr":
        from .zarr_io import read_zarr

        return read_zarr(path, level)
    if fmt == "nifti":
        from .nifti import read_nifti

        return read_nifti(path)
    if fmt == "dicom":
        from .dicom import read_dicom

        return read_dicom(path, series)
    from .raster import read_raster

    return read_raster(path)


def read_image(
    path: str | os.PathLike, level: int | None = None, *, series: str | None = None
) -> tuple[Any, ImageMeta]:
    """Read an image file, zarr store or DICOM folder with its geometry.

    Args:
        path: a TIFF/OME-TIFF, zarr/OME-Zarr, NIfTI, PNG/JPEG/BMP file, or a DICOM folder
            (or one file of a DICOM series).
        level: pyramid level for OME-Zarr and pyramidal OME-TIFF (0 = full resolution).
        series: the DICOM ``SeriesInstanceUID`` when a folder holds several series.

    Returns:
        ``(array, meta)``: a numpy array (a dask array for zarr and very large TIFFs) whose
        axes are ``meta.axes``.

    Raises:
        ImageReadError: the path is missing, damaged, mislabelled or more than 4-D.
        UnsupportedFormatError: the format is not one napari-medseg reads.
    """
    p = Path(path)
    fmt = detect_format(p)
    try:
        data, meta = _read_one(fmt, p, level, series)
    except MedsegError:
        raise
    except MemoryError as exc:
        raise ImageReadError(f"{p} is too large to load into memory.") from exc
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one sentence, no traceback
        raise ImageReadError(
            f"{p} could not be read as {FORMATS[fmt]} ({brief(exc)})."
        ) from exc
    if data.ndim != meta.ndim:
        raise ImageReadError(f"{p} decoded to shape {data.shape}, which does not fit axes {meta.axes!r}.")
    return data, meta


def read_levels(path: str | os.PathLike) -> tuple[list[Any], list[ImageMeta]]:
    """Every resolution level of an image, full resolution first.

    OME-Zarr and pyramidal OME-TIFF give several levels; other formats give one.

    Args:
        path: as for :func:`read_image`.

    Returns:
        ``(arrays, metas)``, one entry per level.
    """
    p = Path(path)
    fmt = detect_format(p)
    try:
        if fmt == "zarr":
            from .zarr_io import read_zarr_levels

            return read_zarr_levels(p)
        data, meta = _read_one(fmt, p, None, None)
        arrays, metas = [data], [meta]
        for lvl in range(1, int(meta.extra.get("n_levels", 1))):
            d, m = _read_one(fmt, p, lvl, None)
            arrays.append(d)
            metas.append(m)
        return arrays, metas
    except MedsegError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(
            f"{p} could not be read as {FORMATS[fmt]} ({brief(exc)})."
        ) from exc


def _target_format(path: Path, format: str | None) -> str:
    if format is not None:
        fmt = _FORMAT_ALIASES.get(format.lower())
        if fmt is None:
            raise ImageWriteError(
                f"Cannot write {path}: unknown format {format!r} (use tiff, zarr, nifti or png)."
            )
        return fmt
    fmt = format_from_name(path, write=True)
    if fmt is None and any(part.lower().endswith(".zarr") for part in path.parts[:-1]):
        fmt = "zarr"  # a node inside a zarr store, e.g. image.zarr/labels/nuclei
    if fmt is None:
        raise ImageWriteError(
            f"Cannot tell which format to write from the name {path.name}; end it with one of "
            f"{', '.join(WRITE_SUFFIXES)}."
        )
    return fmt


def _fit_meta(path: Path, data: Any, meta: ImageMeta | None, labels: bool) -> ImageMeta:
    if meta is None:
        if data.ndim not in (2, 3):
            raise ImageWriteError(
                f"Cannot write {path}: a {data.ndim}-D array needs an ImageMeta saying its axes."
            )
        axes = guess_axes(tuple(data.shape), rgb=False if labels else None)
        return ImageMeta(axes=axes, rgb=axes.endswith("C"))
    if labels and meta.ndim != data.ndim and "C" in meta.axes:
        meta = meta.without_channels()
    if meta.ndim != data.ndim:
        raise ImageWriteError(
            f"Cannot write {path}: the array is {data.ndim}-D (shape {tuple(data.shape)}) but its "
            f"metadata has axes {meta.axes!r}."
        )
    return meta


def _as_labels(path: Path, labels: Any) -> Any:
    dtype = np.dtype(labels.dtype)
    if dtype == bool:
        return labels.astype(np.uint8)
    if np.issubdtype(dtype, np.integer):
        return labels
    if np.issubdtype(dtype, np.floating):
        values = np.asarray(labels)
        whole = np.all(np.isfinite(values)) and np.all(values == np.round(values))
        if whole and (values.size == 0 or values.min() >= 0):
            hi = int(values.max()) if values.size else 0
            return values.astype(np.uint8 if hi <= 255 else np.uint16 if hi <= 65535 else np.uint32)
    raise ImageWriteError(
        f"Cannot write {path}: labels must be integers (or booleans), got {dtype} values."
    )


def _write(path: Path, data: Any, meta: ImageMeta, fmt: str, labels: bool, **kwargs: Any) -> Path:
    try:
        if fmt == "tiff":
            from .tiff import write_tiff

            return write_tiff(path, data, meta)
        if fmt == "zarr":
            from .zarr_io import write_zarr

            return write_zarr(path, data, meta, labels=labels, **kwargs)
        if fmt == "nifti":
            from .nifti import write_nifti

            return write_nifti(path, data, meta)
        from .raster import write_raster

        return write_raster(path, data, meta)
    except MedsegError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageWriteError(f"Cannot write {path}: {brief(exc)}.") from exc


def write_labels(
    path: str | os.PathLike,
    labels: Any,
    meta: ImageMeta | None = None,
    format: str | None = None,
    **kwargs: Any,
) -> Path:
    """Write a label image keeping the geometry of the image it belongs to.

    Args:
        path: target file: ``.tif``/``.ome.tif`` (OME-TIFF), ``.zarr`` (OME-Zarr label
            image; ``image.zarr/labels/<name>`` adds it to an image), ``.nii``/``.nii.gz``
            (keeps ``meta.affine``), or ``.png`` (2-D only).
        labels: integer or boolean array with the spatial axes of ``meta`` (``ZYX``, ``YX``;
            a ``C`` axis in ``meta`` is dropped to match).
        meta: the source image's metadata (spacing, origin, affine); None for pixel units.
        format: ``"tiff"``, ``"zarr"``, ``"nifti"`` or ``"png"``; by default from the suffix.
        **kwargs: for zarr: ``n_levels``, ``name``, ``chunks``.

    Returns:
        The path written.

    Raises:
        ImageWriteError: unknown format, labels that are not integers, axes that do not
            fit, or a failed write.
    """
    p = Path(path)
    fmt = _target_format(p, format)
    data = _as_labels(p, labels)
    meta = _fit_meta(p, data, meta, labels=True)
    meta = meta.replace(rgb=False, extra={**meta.extra, "labels": True})
    return _write(p, data, meta, fmt, labels=True, **kwargs)


def write_image(
    path: str | os.PathLike,
    image: Any,
    meta: ImageMeta | None = None,
    format: str | None = None,
    **kwargs: Any,
) -> Path:
    """Write an image (any numeric dtype) with its geometry.

    Args:
        path: target ``.tif``/``.ome.tif``, ``.zarr``, ``.nii``/``.nii.gz`` or ``.png``.
        image: array with axes ``meta.axes``.
        meta: its metadata; None assumes ``YX``/``ZYX`` in pixel units.
        format: as for :func:`write_labels`.
        **kwargs: for zarr: ``n_levels``, ``name``, ``chunks``.

    Returns:
        The path written.
    """
    p = Path(path)
    fmt = _target_format(p, format)
    if fmt not in _WRITE_FORMATS:  # pragma: no cover - guarded by the alias table
        raise ImageWriteError(f"Cannot write {p}: unsupported format {fmt}.")
    meta = _fit_meta(p, image, meta, labels=False)
    return _write(p, image, meta, fmt, labels=False, **kwargs)
