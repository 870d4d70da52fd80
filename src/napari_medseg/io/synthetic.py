"""Synthetic images with known geometry, for tests, demos and screenshots.

``ct_phantom`` draws a small body-like volume (an ellipsoid "body" with a sphere "lesion")
in Hounsfield units; ``write_dicom_series`` stores a volume as a minimal but valid CT
series (one file per slice, written in shuffled order so readers must sort by position);
``write_nifti_volume`` stores it as NIfTI. The spheres stay spheres in physical space, so a
viewer that ignores the spacing shows them squashed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .metadata import ImageMeta

__all__ = ["ct_phantom", "write_dicom_series", "write_nifti_volume"]


def ct_phantom(
    shape: Sequence[int] = (24, 64, 64),
    spacing: Sequence[float] = (2.5, 0.7, 0.7),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume and its lesion mask.

    Args:
        shape: ``(Z, Y, X)`` voxels.
        spacing: ``(dz, dy, dx)`` in millimetres.
        seed: noise seed.

    Returns:
        ``(volume, mask)``: ``ZYX`` int16 Hounsfield units (air -1000, body 40, lesion 200,
        with noise) and ``ZYX`` uint8 (1 = the spherical lesion).
    """
    z, y, x = (np.arange(n) for n in shape)
    dz, dy, dx = spacing
    cz, cy, cx = ((n - 1) / 2 for n in shape)
    zz = ((z - cz) * dz)[:, None, None]
    yy = ((y - cy) * dy)[None, :, None]
    xx = ((x - cx) * dx)[None, None, :]
    extent = [n * s / 2 for n, s in zip(shape, spacing)]
    body = (zz / (0.9 * extent[0])) ** 2 + (yy / (0.7 * extent[1])) ** 2 + (xx / (0.85 * extent[2])) ** 2 <= 1
    radius = 0.25 * min(extent)
    lesion = (zz**2 + yy**2 + (xx - 0.3 * extent[2]) ** 2) <= radius**2
    rng = np.random.default_rng(seed)
    volume = np.full(tuple(shape), -1000.0)
    volume[body] = 40.0
    volume[lesion & body] = 200.0
    volume += rng.normal(0, 10, size=volume.shape)
    return volume.round().astype(np.int16), (lesion & body).astype(np.uint8)


def write_nifti_volume(
    path: str | os.PathLike,
    volume: np.ndarray,
    spacing: Sequence[float] = (2.5, 0.7, 0.7),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
) -> Path:
    """Write a ``ZYX`` volume as NIfTI with a diagonal affine (spacing in mm, RAS+).

    Args:
        path: ``.nii`` or ``.nii.gz`` target.
        volume: ``ZYX`` array.
        spacing: ``(dz, dy, dx)`` in millimetres.
        origin: ``(z, y, x)`` world position of the first voxel in millimetres.
    """
    from .nifti import write_nifti

    meta = ImageMeta(axes="ZYX", spacing=tuple(spacing), origin=tuple(origin), units=("mm",) * 3)
    return write_nifti(path, volume, meta.replace(affine=meta.world_affine()))


def write_dicom_series(
    folder: str | os.PathLike,
    volume: np.ndarray,
    spacing: Sequence[float] = (2.5, 0.7, 0.7),
    origin: Sequence[float] = (-20.0, -30.0, 100.0),
    *,
    series_uid: str | None = None,
    description: str = "synthetic CT",
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    seed: int = 0,
) -> list[Path]:
    """Write a ``ZYX`` volume as a CT DICOM series, one file per slice.

    Stored values are ``(volume - intercept) / slope`` as uint16 (or int16 when negative);
    a reader applying ``RescaleSlope``/``RescaleIntercept`` gets ``volume`` back. Files are
    named in a shuffled order and ``InstanceNumber`` runs backwards, so only sorting by
    ``ImagePositionPatient`` gives the right order.

    Args:
        folder: target folder (created).
        volume: ``ZYX`` array of the values a reader should return (e.g. HU).
        spacing: ``(slice distance, row spacing, column spacing)`` in millimetres.
        origin: LPS position ``(x, y, z)`` of the first voxel of slice 0, in millimetres.
        series_uid: the SeriesInstanceUID (a new one by default).
        description: SeriesDescription.
        rescale_intercept: RescaleIntercept written to every slice.
        rescale_slope: RescaleSlope written to every slice.
        orientation: ImageOrientationPatient (row then column direction cosines).
        seed: seed of the file-name shuffle.

    Returns:
        The files written, in slice order.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    frame_uid = generate_uid()
    stored = np.round((np.asarray(volume, dtype=np.float64) - rescale_intercept) / rescale_slope)
    signed = bool(stored.min() < 0)
    stored = stored.astype(np.int16 if signed else np.uint16)
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    dz, dy, dx = (float(s) for s in spacing)
    names = np.random.default_rng(seed).permutation(len(stored))
    written: list[Path] = []
    for k, plane in enumerate(stored):
        position = np.asarray(origin, dtype=np.float64) + k * dz * normal
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{names[k]:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = "Synthetic^Phantom"
        ds.PatientID = "SYNTH0001"
        ds.Modality = "CT"
        ds.SeriesDescription = description
        ds.SeriesNumber = 1
        ds.InstanceNumber = len(stored) - k
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = int(plane.shape[0]), int(plane.shape[1])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleIntercept = rescale_intercept
        ds.RescaleSlope = rescale_slope
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = np.ascontiguousarray(plane).tobytes()
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
        written.append(path)
    return written
