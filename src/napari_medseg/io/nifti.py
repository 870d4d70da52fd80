"""NIfTI-1/2 (``.nii``, ``.nii.gz``) through nibabel.

nibabel's arrays are indexed ``(x, y, z[, t][, c])``; we return them reversed, as
``ZYX`` (``TZYX``, ``CZYX``), the order napari displays, and keep nibabel's affine as
``ImageMeta.affine`` (it maps ``(x, y, z)`` indices to RAS+ millimetres, so no change is
needed). Writing transposes back and stores that affine as both sform and qform with the
source's codes, so read -> write -> read gives the same array and the same affine. Label
images are marked with ``intent_code`` NIFTI_INTENT_LABEL, and read back as labels.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageReadError, ImageWriteError
from .metadata import MAX_NDIM, ImageMeta, affine_from_geometry, geometry_from_affine, normalize_unit
from .messages import brief

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
        with _quiet(nib):  # nibabel logs the header fixes it makes; we report problems ourselves
            img = nib.load(str(p))
            header = img.header
            shape = tuple(int(n) for n in img.shape)
            affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds for bad headers
        if p.name.lower().endswith(".gz") and _gzip_truncated(p):
            raise ImageReadError(f"{p} is truncated: its gzip stream ends early.") from exc
        raise ImageReadError(
            f"{p} has a broken NIfTI header and cannot be read ({brief(exc)})."
        ) from exc
    if not shape or any(n <= 0 for n in shape):
        raise ImageReadError(f"{p} has a broken NIfTI header: its dimensions are {shape}.")
    _check_raw_header(p, nib)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ImageReadError(
            f"{p} has a broken NIfTI header: its voxel-to-world affine is singular or not "
            "finite (check pixdim and the qform/sform fields)."
        )
    if not p.name.lower().endswith(".gz"):
        offset = int(getattr(img.dataobj, "offset", header["vox_offset"]))
        needed = offset + int(np.prod(shape)) * header.get_data_dtype().itemsize
        size = p.stat().st_size
        if size < needed:
            raise ImageReadError(
                f"{p} is truncated: its header describes {needed} bytes but the file holds {size}."
            )
    try:
        data = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error) as exc:
        raise ImageReadError(f"{p} is truncated: the compressed data ends early ({brief(exc)}).") from exc
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(
            f"The voxel data of {p} cannot be read ({brief(exc)}); the file is "
            "probably truncated or damaged."
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
    # nibabel moves scl_slope/scl_inter from the header to the array proxy on load
    slope = float(getattr(img.dataobj, "slope", 1.0))
    inter = float(getattr(img.dataobj, "inter", 0.0))
    if slope != 1.0 or inter != 0.0:
        extra["scl_slope"], extra["scl_inter"] = slope, inter
    descrip = header["descrip"].tobytes().rstrip(b"\x00").decode("latin-1").strip()
    if descrip:
        extra["descrip"] = descrip
    meta = ImageMeta(
        axes=axes, spacing=spacing, origin=origin, units=(normalize_unit(unit),) * len(spatial),
        affine=affine, source=str(p), extra=extra,
    )
    return data, meta


@contextlib.contextmanager
def _quiet(nib: Any) -> Iterator[None]:
    """Silence nibabel's global logger for the duration of a load."""
    logger = nib.imageglobals.logger
    disabled = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = disabled


def _gzip_truncated(path: Path) -> bool:
    """True when a gzip file's stream ends before its end marker (a cut-off download)."""
    import gzip

    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass
    except (EOFError, zlib.error, OSError):
        return True
    return False


def _check_raw_header(path: Path, nib: Any) -> None:
    """Refuse what nibabel silently repairs: voxel sizes <= 0 when no sform gives the geometry."""
    opener = nib.openers.ImageOpener(str(path))
    with opener as fh:
        raw = nib.Nifti1Header.from_fileobj(fh, check=False) if _is_nifti1(fh) else None
    if raw is None or int(raw["sform_code"]) > 0:
        return
    ndim = int(raw["dim"][0])
    pixdim = [float(v) for v in raw["pixdim"][1 : 1 + min(ndim, 3)]]
    if any(not np.isfinite(v) or v <= 0 for v in pixdim):
        raise ImageReadError(
            f"{path} has a broken NIfTI header: its voxel sizes (pixdim) are {pixdim}, and "
            "without an sform there is no other geometry to use."
        )


def _is_nifti1(fh: Any) -> bool:
    head = fh.read(348)
    fh.seek(0)
    return len(head) == 348 and head[344:347] in (b"n+1", b"ni1")


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
        raise ImageWriteError(f"Cannot write {p}: {brief(exc)}.") from exc
    return p
