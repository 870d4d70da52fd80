"""A DICOM series (a folder of single-frame files, or one multi-frame file) through pydicom.

Slices are sorted by the projection of ``ImagePositionPatient`` on the slice normal
(``row cosines x column cosines`` of ``ImageOrientationPatient``), not by file name or
``InstanceNumber``. Spacing is ``PixelSpacing`` (row, column) plus the distance between
sorted slice positions. ``RescaleSlope``/``RescaleIntercept`` are applied per slice
(CT -> Hounsfield units). The affine maps ``(column, row, slice)`` indices to RAS+
millimetres (DICOM's LPS with x and y negated), the same convention as NIfTI.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageReadError
from .detect import dicom_files_in
from .metadata import ImageMeta, geometry_from_affine
from .messages import brief

__all__ = ["read_dicom", "list_series", "LPS_TO_RAS"]

#: Multiplying LPS coordinates by this gives RAS+ coordinates (and back).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_POSITION_TOL = 1e-3  # mm: slices closer than this along the normal are "the same place"


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _headers(files: list[Path]) -> list[tuple[Path, Any]]:
    """(file, dataset without pixels) for every file pydicom can parse as an image."""
    import pydicom

    out = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001 - non-DICOM or damaged files are skipped
            continue
        if "Rows" in ds and "Columns" in ds and "SeriesInstanceUID" in ds:
            out.append((f, ds))
    return out


def list_series(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The image series in a folder: SeriesInstanceUID -> description, modality and files.

    Args:
        folder: a folder of DICOM files (not searched recursively).
    """
    folder = Path(folder)
    series: dict[str, dict[str, Any]] = {}
    for f, ds in _headers(dicom_files_in(folder)):
        uid = str(ds.SeriesInstanceUID)
        entry = series.setdefault(uid, {
            "description": str(ds.get("SeriesDescription", "")),
            "modality": str(ds.get("Modality", "")),
            "series_number": ds.get("SeriesNumber"),
            "files": [],
        })
        entry["files"].append(f)
    return series


def _pick_series(path: Path, series: str | None) -> tuple[str, list[tuple[Path, Any]]]:
    folder = path if path.is_dir() else path.parent
    files = dicom_files_in(folder)
    if not files:
        raise ImageReadError(f"The folder {folder} holds no DICOM files.")
    headers = _headers(files)
    if not headers:
        raise ImageReadError(
            f"None of the {len(files)} DICOM files in {folder} could be read as an image "
            "(they may be damaged, or reports without pixel data)."
        )
    groups: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    for f, ds in headers:
        groups[str(ds.SeriesInstanceUID)].append((f, ds))
    if series is None and path.is_file():
        own = [str(ds.SeriesInstanceUID) for f, ds in headers if f == path]
        series = own[0] if own else None
    if series is None:
        if len(groups) > 1:
            listing = "; ".join(
                f"{uid} ({g[0][1].get('Modality', '?')} '{g[0][1].get('SeriesDescription', '')}', "
                f"{len(g)} files)"
                for uid, g in sorted(groups.items())
            )
            raise ImageReadError(
                f"The folder {folder} holds {len(groups)} DICOM series ({listing}); choose one "
                "with --series UID on the command line (series=UID in Python) or put each "
                "series in its own folder."
            )
        series = next(iter(groups))
    if series not in groups:
        raise ImageReadError(
            f"The folder {folder} holds no DICOM series {series}; it holds {', '.join(sorted(groups))}."
        )
    return series, groups[series]


def _pixels(path: Path) -> tuple[np.ndarray, Any]:
    """The decoded pixel array of one file and its full dataset."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), force=True)
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(f"The DICOM file {path} cannot be read ({brief(exc)}).") from exc
    try:
        return np.asarray(ds.pixel_array), ds
    except Exception as exc:  # noqa: BLE001 - missing decoders, truncated pixel data ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = (
            f" (transfer syntax {syntax}; a decoder such as pylibjpeg or gdcm may be needed)"
            if syntax else ""
        )
        raise ImageReadError(
            f"The pixel data of the DICOM file {path} cannot be decoded{hint} ({brief(exc)})."
        ) from exc


def _rescale(stack: list[np.ndarray], slopes: list[float], intercepts: list[float]) -> np.ndarray:
    """Apply per-slice slope/intercept; int16/int32 when the result stays integral."""
    raw = np.stack(stack)
    if all(s == 1.0 for s in slopes) and all(i == 0.0 for i in intercepts):
        return raw
    integral = all(float(s).is_integer() for s in slopes) and all(float(i).is_integer() for i in intercepts)
    if integral and np.issubdtype(raw.dtype, np.integer):
        out = raw.astype(np.int64)
        for k, (s, i) in enumerate(zip(slopes, intercepts)):
            out[k] = out[k] * int(s) + int(i)
        for dtype in (np.int16, np.int32):
            info = np.iinfo(dtype)
            if out.size == 0 or (out.min() >= info.min and out.max() <= info.max):
                return out.astype(dtype)
        return out
    out = raw.astype(np.float32)
    for k, (s, i) in enumerate(zip(slopes, intercepts)):
        out[k] = out[k] * np.float32(s) + np.float32(i)
    return out


def _thickness(ds: Any) -> float:
    """The slice step a header states: ``SpacingBetweenSlices``, else ``SliceThickness``, else 1."""
    return float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)


def _ras_affine(iop: np.ndarray, dr: float, dc: float, step: np.ndarray,
                origin: np.ndarray) -> np.ndarray:
    """The RAS+ affine of ``(column, row, slice)`` indices from the LPS slice geometry.

    Args:
        iop: ``ImageOrientationPatient``: row cosines, then column cosines.
        dr: row spacing (down a column), mm.
        dc: column spacing (along a row), mm.
        step: LPS vector from one slice to the next.
        origin: LPS position of the first voxel of the first slice.
    """
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * dc  # along a row: increasing column index
    lps[:3, 1] = iop[3:] * dr  # down a column: increasing row index
    lps[:3, 2] = step
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def _in_plane_spacing(ds: Any) -> tuple[float, float, str | None]:
    """``(row spacing, column spacing, unit)``: ``PixelSpacing``, else ``ImagerPixelSpacing``;
    1, 1 and no unit without either."""
    pixel_spacing = _floats(ds.get("PixelSpacing"), 2)
    if pixel_spacing is None or np.any(pixel_spacing <= 0):
        pixel_spacing = _floats(ds.get("ImagerPixelSpacing"), 2)
    if pixel_spacing is not None and np.all(pixel_spacing > 0):
        return float(pixel_spacing[0]), float(pixel_spacing[1]), "millimeter"
    return 1.0, 1.0, None


def _sort_slices(
    members: list[tuple[Path, Any]], where: str, dr: float, dc: float, extra: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray | None]:
    """The slice order along the normal and the RAS+ affine (None without positions).

    Without orientation and position on every slice, the slices are sorted by
    ``InstanceNumber``. Notes on the geometry go into ``extra``.

    Raises:
        ImageReadError: mixed orientations, or several slices at one position.
    """
    iops = [_floats(ds.get("ImageOrientationPatient"), 6) for _, ds in members]
    ipps = [_floats(ds.get("ImagePositionPatient"), 3) for _, ds in members]
    if not (all(v is not None for v in iops) and all(v is not None for v in ipps)):
        numbers = [int(ds.get("InstanceNumber") or 0) for _, ds in members]
        extra["geometry"] = "instance-number"  # no positions: sorted by InstanceNumber
        return np.argsort(numbers, kind="stable"), None
    iop = iops[0]
    if any(np.abs(v - iop).max() > 1e-4 for v in iops):
        raise ImageReadError(
            f"The slices of DICOM series {where} have different orientations; "
            "it is not one volume (a localizer series, perhaps)."
        )
    normal = np.cross(iop[:3], iop[3:])
    positions = np.array([float(np.dot(v, normal)) for v in ipps])
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    steps = np.diff(positions)
    if steps.size and steps.min() < _POSITION_TOL:
        k = int(np.argmin(steps))
        raise ImageReadError(
            f"The DICOM series {where} has several images at the same slice "
            f"position ({positions[k]:.3f} mm along the normal), e.g. several echoes, phases "
            "or acquisitions; split them into separate folders."
        )
    sorted_ipps = np.array([ipps[i] for i in order])
    if len(members) > 1:
        slice_step = (sorted_ipps[-1] - sorted_ipps[0]) / (len(members) - 1)
        dz = float(np.median(steps))
        irregular = bool(np.abs(steps - dz).max() > 0.01 * dz)
        extra["slice_spacing_irregular"] = irregular
        if irregular:
            extra["slice_positions"] = [float(v) for v in positions]
    else:
        slice_step = normal * _thickness(members[0][1])
    extra["image_orientation_patient"] = [float(v) for v in iop]
    return order, _ras_affine(iop, dr, dc, slice_step, sorted_ipps[0])


def _read_slices(
    members: list[tuple[Path, Any]], where: str
) -> tuple[np.ndarray, list[float], list[float]]:
    """The rescaled stack of the (sorted) slices and their slopes and intercepts.

    Raises:
        ImageReadError: undecodable pixels, or slices that decode to different shapes.
    """
    stack, slopes, intercepts = [], [], []
    for f, _ in members:
        pixels, ds = _pixels(f)
        stack.append(pixels)
        slopes.append(float(ds.get("RescaleSlope", 1.0) or 1.0))
        intercepts.append(float(ds.get("RescaleIntercept", 0.0) or 0.0))
    shapes = {s.shape for s in stack}
    if len(shapes) > 1:
        raise ImageReadError(
            f"The DICOM series {where} decodes to images of shapes {sorted(shapes)}."
        )
    return _rescale(stack, slopes, intercepts), slopes, intercepts


def read_dicom(path: str | os.PathLike, series: str | None = None) -> tuple[np.ndarray, ImageMeta]:
    """Read one DICOM series as a volume.

    Args:
        path: a folder holding the series' files, or one file of the series (its folder is
            read, keeping the files of that file's series).
        series: the ``SeriesInstanceUID`` to read when the folder holds several series.

    Returns:
        ``(array, meta)``: ``ZYX`` (``YX`` for a single slice; ``ZYXC`` for colour) after
        rescaling, with spacing in millimetres, the RAS+ affine, and the series facts in
        ``meta.extra`` (``series_uid``, ``modality``, ``rescale_slope``, ``rescale_intercept``,
        ``window_center``, ``window_width`` ...).

    Raises:
        ImageReadError: empty folder, several series and none chosen, slices of mixed size
            or orientation, repeated slice positions, or undecodable pixel data.
    """
    p = Path(path)
    uid, members = _pick_series(p, series)
    folder = p if p.is_dir() else p.parent
    where = f"{uid} in {folder}"
    first = members[0][1]
    if len(members) == 1 and int(first.get("NumberOfFrames", 1) or 1) > 1:
        return _read_multiframe(members[0][0], uid)
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in members}
    if len(sizes) > 1:
        raise ImageReadError(
            f"The DICOM series {where} mixes image sizes {sorted(sizes)}; it cannot "
            "be stacked into one volume."
        )
    dr, dc, units = _in_plane_spacing(first)
    extra: dict[str, Any] = {"format": "dicom", "series_uid": uid, "n_files": len(members)}
    order, affine = _sort_slices(members, where, dr, dc, extra)
    data, slopes, intercepts = _read_slices([members[i] for i in order], where)
    extra.update(_series_facts(first, slopes, intercepts))
    rgb = data.ndim == 4
    if len(members) == 1:
        data = data[0]
    axes = ("ZYX" if len(members) > 1 else "YX") + ("C" if rgb else "")
    spatial = axes.replace("C", "")
    if affine is not None:
        spacing, origin = geometry_from_affine(affine, spatial)
    else:
        spacing = (_thickness(first), dr, dc)[-len(spatial):]
        origin = (0.0,) * len(spatial)
    meta = ImageMeta(
        axes=axes, spacing=spacing, origin=origin, units=(units,) * len(spatial),
        affine=affine, source=str(folder), rgb=rgb, extra=extra,
    )
    return data, meta


def _series_facts(ds: Any, slopes: list[float], intercepts: list[float]) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "modality": str(ds.get("Modality", "")),
        "series_description": str(ds.get("SeriesDescription", "")),
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "photometric": str(ds.get("PhotometricInterpretation", "")),
        "rescale_slope": slopes[0],
        "rescale_intercept": intercepts[0],
        "rescale_varies": len(set(slopes)) > 1 or len(set(intercepts)) > 1,
    }
    for key, name in (("WindowCenter", "window_center"), ("WindowWidth", "window_width")):
        value = ds.get(key)
        if value is not None:
            try:
                many = hasattr(value, "__len__") and not isinstance(value, str)
                facts[name] = float(value[0] if many else value)
            except (TypeError, ValueError):
                pass
    return facts


def _read_multiframe(path: Path, uid: str) -> tuple[np.ndarray, ImageMeta]:
    """An enhanced (multi-frame) DICOM file: frames along the slice normal."""
    pixels, ds = _pixels(path)
    if pixels.ndim != 3:
        raise ImageReadError(
            f"The multi-frame DICOM file {path} is not a grey-level volume (shape {pixels.shape})."
        )
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    pixel_spacing = iop = None
    slopes = [float(ds.get("RescaleSlope", 1.0) or 1.0)] * pixels.shape[0]
    intercepts = [float(ds.get("RescaleIntercept", 0.0) or 0.0)] * pixels.shape[0]
    if shared:
        group = shared[0]
        if "PixelMeasuresSequence" in group:
            pixel_spacing = _floats(group.PixelMeasuresSequence[0].get("PixelSpacing"), 2)
        if "PlaneOrientationSequence" in group:
            iop = _floats(group.PlaneOrientationSequence[0].get("ImageOrientationPatient"), 6)
        if "PixelValueTransformationSequence" in group:
            pvt = group.PixelValueTransformationSequence[0]
            slopes = [float(pvt.get("RescaleSlope", 1.0))] * pixels.shape[0]
            intercepts = [float(pvt.get("RescaleIntercept", 0.0))] * pixels.shape[0]
    positions = None
    if per_frame and iop is not None:
        try:
            found = [_floats(f.PlanePositionSequence[0].ImagePositionPatient, 3) for f in per_frame]
        except (AttributeError, IndexError, TypeError, ValueError):
            found = []
        if found and all(v is not None for v in found):
            positions = np.array(found, dtype=np.float64)
    data = _rescale(list(pixels), slopes, intercepts)
    dr, dc = (float(pixel_spacing[0]), float(pixel_spacing[1])) if pixel_spacing is not None else (1.0, 1.0)
    extra: dict[str, Any] = {"format": "dicom", "series_uid": uid, "n_files": 1, "multiframe": True}
    extra.update(_series_facts(ds, slopes, intercepts))
    affine = None
    if positions is not None and len(positions) == data.shape[0]:
        normal = np.cross(iop[:3], iop[3:])
        order = np.argsort(positions @ normal, kind="stable")
        data, positions = data[order], positions[order]
        step = (positions[-1] - positions[0]) / max(len(positions) - 1, 1)
        if len(positions) == 1:
            step = normal * _thickness(ds)
        affine = _ras_affine(iop, dr, dc, step, positions[0])
        spacing, origin = geometry_from_affine(affine, "ZYX")
    else:
        spacing, origin = (_thickness(ds), dr, dc), (0.0, 0.0, 0.0)
        extra["geometry"] = "frame-order"
    unit = "millimeter" if pixel_spacing is not None else None
    meta = ImageMeta(
        axes="ZYX", spacing=spacing, origin=origin, units=(unit,) * 3, affine=affine,
        source=str(path), extra=extra,
    )
    return data, meta
