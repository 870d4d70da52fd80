"""NIfTI-1/2 (``.nii``, ``.nii.gz``) through nibabel.

nibabel's arrays are indexed ``(x, y, z[, t][, c])``; we return them reversed, as
``ZYX`` (``TZYX``, ``CZYX``), the order napari displays, and keep nibabel's affine as
``ImageMeta.affine`` (it maps ``(x, y, z)`` indices to RAS+ millimetres, so no change is
needed). Writing transposes back and stores that affine as both sform and qform with the
source's codes, so read -> write -> read gives the same array and the same affine. Label
images are marked with ``intent_code`` NIFTI_INTENT_LABEL, and read back as labels.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageReadError, ImageWriteError
from .metadata import MAX_NDIM, ImageMeta, affine_from_geometry, geometry_from_affine, normalize_unit

__all__ = ["read_nifti", "write_nifti"]

# NIfTI dims 0..4 are x, y, z, t, and the 5th is a vector/"component" axis -> C
_NIFTI_LETTERS = "XYZTC"
_XYZ_UNITS = {"mm": "millimeter", "micron": "micrometer", "meter": "meter"}
_INTENT_LABEL = 1002  # NIFTI_INTENT_LABEL: voxel values are label indices
_UNIT_CODES = {"millimeter": "mm", "micrometer": "micron", "meter": "meter"}


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, ImageMeta]:
    """Read a NIfTI image.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.

    Returns:
        ``(array, meta)``; the array is ``YX``, ``ZYX``, ``TZYX`` or ``CZYX`` (size-1
        axes after x, y dropped), with ``scl_slope``/``scl_inter`` applied. ``meta.affine`` is
        the file's voxel -> RAS+ affine (sform if set, else qform).

    Raises:
        ImageReadError: the header is broken, the data is truncated, or it is more than 4-D.
    """
    import nibabel as nib

    p = Path(path)
    try:
        img = nib.load(str(p))
        header = img.header
        shape = tuple(int(n) for n in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds for bad headers
        raise ImageReadError(
            f"{p} has a broken NIfTI header and cannot be read ({type(exc).__name__}: {exc})."
        ) from exc
    if not shape or any(n <= 0 for n in shape):
        raise ImageReadError(f"{p} has a broken NIfTI header: its dimensions are {shape}.")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ImageReadError(
            f"{p} has a broken NIfTI header: its voxel-to-world affine is singular or not "
            "finite (check pixdim and the qform/sform fields)."
        )
    try:
        data = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error) as exc:
        raise ImageReadError(f"{p} is truncated: the compressed data ends early ({exc}).") from exc
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(
            f"The voxel data of {p} cannot be read ({type(exc).__name__}: {exc}); the file is "
            "probably truncated."
        ) from exc
    letters = _NIFTI_LETTERS[: data.ndim]
    if data.ndim > len(_NIFTI_LETTERS):
        raise ImageReadError(f"{p} holds a {data.ndim}-D image; napari-medseg reads at most 4-D images.")
    keep = [i for i, n in enumerate(data.shape) if i < 2 or n > 1]
    if len(keep) != data.ndim:
        data = data.reshape(tuple(data.shape[i] for i in keep))
        letters = "".join(letters[i] for i in keep)
    if len(letters) > MAX_NDIM:
        raise ImageReadError(
            f"{p} holds a {len(letters)}-D image (shape {data.shape}); napari-medseg reads at "
            f"most {MAX_NDIM}-D images such as TZYX or CZYX, so split it first."
        )
    axes = letters[::-1]
    data = np.ascontiguousarray(data.transpose(tuple(range(data.ndim))[::-1]))
    spatial = "".join(a for a in axes if a in "ZYX")
    spacing, origin = geometry_from_affine(affine, spatial)
    spacing, origin = _tidy(spacing), _tidy(origin)
    space_unit, _ = header.get_xyzt_units()
    unit = _XYZ_UNITS.get(space_unit, "millimeter")  # "unknown": RAS+ is millimetres by convention
    extra: dict[str, Any] = {
        "format": "nifti",
        "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]),
        "xyz_units": space_unit,
        "nifti_dtype": str(header.get_data_dtype()),
    }
    if int(header["intent_code"]) == _INTENT_LABEL:
        extra["labels"] = True
    slope, inter = header.get_slope_inter()
    if slope is not None:
        extra["scl_slope"] = float(slope)
        extra["scl_inter"] = float(inter or 0.0)
    descrip = header["descrip"].tobytes().rstrip(b"\x00").decode("latin-1").strip()
    if descrip:
        extra["descrip"] = descrip
    meta = ImageMeta(
        axes=axes, spacing=spacing, origin=origin, units=(normalize_unit(unit),) * len(spatial),
        affine=affine, source=str(p), extra=extra,
    )
    return data, meta


def _tidy(values: tuple[float, ...]) -> tuple[float, ...]:
    """Shortest decimals of float32 header values: 0.699999988 -> 0.7 (the affine stays exact)."""
    return tuple(float(str(np.float32(v))) for v in values)


def _nifti_dtype(data: np.ndarray) -> np.ndarray:
    if data.dtype == bool:
        return data.astype(np.uint8)
    if data.dtype in (np.int64, np.uint64):
        hi, lo = (int(data.max()), int(data.min())) if data.size else (0, 0)
        for candidate in (np.uint8, np.uint16, np.int32, np.uint32):
            info = np.iinfo(candidate)
            if info.min <= lo and hi <= info.max:
                return data.astype(candidate)
    return data


def write_nifti(path: str | os.PathLike, array: Any, meta: ImageMeta) -> Path:
    """Write an array as NIfTI-1 with the metadata's affine.

    Args:
        path: target ``.nii`` or ``.nii.gz``.
        array: data with axes ``meta.axes`` (spatial axes plus optional ``T`` or ``C``).
        meta: geometry; ``meta.affine`` is used as is when present, else a diagonal
            affine is built from ``spacing`` and ``origin``.

    Returns:
        The path written.

    Raises:
        ImageWriteError: the axes cannot be stored in NIfTI or writing fails.
    """
    import nibabel as nib

    p = Path(path)
    data = _nifti_dtype(np.asarray(array))
    if data.ndim != meta.ndim:
        raise ImageWriteError(f"Cannot write {p}: the array is {data.ndim}-D but its axes are {meta.axes!r}.")
    if "I" in meta.axes or meta.rgb or ("T" in meta.axes and "C" in meta.axes):
        raise ImageWriteError(
            f"Cannot write {p}: NIfTI stores x, y, z plus one time or component axis, "
            f"not axes {meta.axes!r}."
        )
    # our axes -> nibabel order x, y, z, t, c (inserting size-1 axes where needed)
    nifti_order = [a for a in "XYZTC" if a in meta.axes]
    data = data.transpose([meta.axes.index(a) for a in nifti_order])
    if "C" in meta.axes or "T" in meta.axes:
        for i, letter in enumerate("XYZT"):
            if letter not in nifti_order and (letter != "T" or "C" in meta.axes):
                data = np.expand_dims(data, i)
                nifti_order.insert(i, letter)
    if meta.affine is not None:
        affine = np.array(meta.affine)
        code = 1
    else:
        affine = affine_from_geometry(meta.spacing, meta.origin, meta.spatial_axes)
        code = 2
    sform_code = int(meta.extra.get("sform_code") or 0) or int(meta.extra.get("qform_code") or 0) or code
    qform_code = int(meta.extra.get("qform_code") or 0) or sform_code
    try:
        img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
        img.header.set_sform(affine, code=sform_code)
        img.header.set_qform(affine, code=qform_code)
        unit = _UNIT_CODES.get(meta.unit or "millimeter", "unknown")
        img.header.set_xyzt_units(xyz=unit, t="sec")
        if meta.extra.get("labels"):
            img.header.set_intent(_INTENT_LABEL)
        p.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(p))
    except Exception as exc:  # noqa: BLE001
        raise ImageWriteError(f"Cannot write {p}: {type(exc).__name__}: {exc}.") from exc
    return p
