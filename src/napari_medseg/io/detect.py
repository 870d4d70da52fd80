"""Which format a path holds: by its name first, checked against its first bytes.

Only the standard library is used here, so the napari reader hook can call it for every
file a user opens without loading any imaging library.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ImageReadError, UnsupportedFormatError

__all__ = [
    "FORMATS",
    "SUFFIXES",
    "WRITE_SUFFIXES",
    "supported_suffixes",
    "is_supported",
    "format_from_name",
    "detect_format",
    "sniff_file",
    "is_zarr_dir",
    "is_dicom_file",
    "dicom_files_in",
]

#: Format name -> human-readable name used in messages.
FORMATS = {
    "tiff": "TIFF",
    "zarr": "zarr",
    "nifti": "NIfTI",
    "dicom": "DICOM",
    "raster": "PNG/JPEG/BMP",
}

#: Suffix (lower case, longest first where it matters) -> format name, for reading.
SUFFIXES: dict[str, str] = {
    ".ome.tiff": "tiff",
    ".ome.tif": "tiff",
    ".tiff": "tiff",
    ".tif": "tiff",
    ".ome.zarr": "zarr",
    ".zarr": "zarr",
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".png": "raster",
    ".jpg": "raster",
    ".jpeg": "raster",
    ".bmp": "raster",
}

#: Suffix -> format name, for writing: the read suffixes but DICOM's and the lossy or
#: legacy raster ones (JPEG, BMP).
WRITE_SUFFIXES: dict[str, str] = {
    suffix: fmt for suffix, fmt in SUFFIXES.items()
    if fmt != "dicom" and suffix not in (".jpg", ".jpeg", ".bmp")
}

_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")
_MAX_DICOM_PROBE = 64


def supported_suffixes(write: bool = False) -> tuple[str, ...]:
    """The file-name endings napari-medseg reads (or writes with ``write=True``).

    DICOM series are also read from folders and from files without a suffix.
    """
    return tuple(WRITE_SUFFIXES if write else SUFFIXES)


def format_from_name(path: str | os.PathLike, write: bool = False) -> str | None:
    """The format a path's name implies (``"tiff"``, ``"nifti"`` ...), or None."""
    name = Path(path).name.lower().rstrip("/")
    table = WRITE_SUFFIXES if write else SUFFIXES
    for suffix, fmt in table.items():
        if name.endswith(suffix):
            return fmt
    return None


def is_zarr_dir(path: Path) -> bool:
    """True when ``path`` is a folder holding zarr (v2 or v3) metadata."""
    return path.is_dir() and any((path / m).is_file() for m in _ZARR_MARKERS)


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` starts with the DICOM preamble and ``DICM`` magic."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dicom_files_in(folder: Path, limit: int | None = None) -> list[Path]:
    """DICOM files directly inside ``folder`` (by magic, or by a ``.dcm`` suffix), sorted.

    Args:
        folder: the folder to list (not recursive; ``DICOMDIR`` index files are skipped).
        limit: stop after this many files and look at no more than the first 64 entries
            (a cheap "is there any" probe).
    """
    found: list[Path] = []
    try:
        entries = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError:
        return found
    if limit is not None:
        entries = entries[:_MAX_DICOM_PROBE]
    for entry in entries:
        if entry.name.startswith(".") or entry.name.upper() == "DICOMDIR":
            continue
        if entry.suffix.lower() in (".dcm", ".dicom") or is_dicom_file(entry):
            found.append(entry)
            if limit is not None and len(found) >= limit:
                break
    return found


def sniff_file(path: Path) -> str | None:
    """The format a file's first bytes show, or None if they match no known format.

    Returns one of ``"tiff"``, ``"nifti"``, ``"gzip"``, ``"dicom"``, ``"png"``, ``"jpeg"``,
    ``"bmp"``, ``"zip"``, ``"hdf5"``, ``"text"`` or None.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(352)
    except OSError:
        return None
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:2] == b"BM":
        return "bmp"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        return "hdf5"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00", b"n+2\x00"):
        return "nifti"
    if len(head) >= 4 and head[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c"):
        return "nifti"  # sizeof_hdr == 348, either byte order
    if len(head) >= 8 and head[4:8] == b"n+2\x00":
        return "nifti"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head[:64]):
        return "text"
    return None


_SNIFF_NAMES = {
    "tiff": ("a TIFF image", ".tif"),
    "png": ("a PNG image", ".png"),
    "jpeg": ("a JPEG image", ".jpg"),
    "bmp": ("a BMP image", ".bmp"),
    "gzip": ("gzip-compressed data", ".gz"),
    "zip": ("a zip archive", ".zip"),
    "hdf5": ("an HDF5 file", ".h5"),
    "dicom": ("a DICOM file", ".dcm"),
    "nifti": ("a NIfTI image", ".nii"),
    "text": ("text", ".txt"),
}

# which sniffed kinds are acceptable for a format chosen by name
_ACCEPTS = {
    "tiff": {"tiff"},
    "nifti": {"nifti", "gzip"},
    "dicom": {"dicom", None},  # DICOM without preamble is read with force=True
    "raster": {"png", "jpeg", "bmp"},
}


def detect_format(path: str | os.PathLike) -> str:
    """The format of a file or folder, checked against its content.

    Args:
        path: a file, a zarr folder or a folder holding one DICOM series.

    Returns:
        ``"tiff"``, ``"zarr"``, ``"nifti"``, ``"dicom"`` or ``"raster"``.

    Raises:
        ImageReadError: the path does not exist, is empty, or its content does not match
            its extension.
        UnsupportedFormatError: the path is of a kind napari-medseg does not read.
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p} does not exist.")
    by_name = format_from_name(p)
    if p.is_dir():
        if is_zarr_dir(p):
            return "zarr"
        if by_name == "zarr":
            raise ImageReadError(
                f"{p} has no zarr metadata (zarr.json, .zgroup or .zarray); "
                "it is not a zarr store."
            )
        if dicom_files_in(p, limit=1):
            return "dicom"
        try:
            empty = not any(p.iterdir())
        except OSError as exc:
            raise ImageReadError(f"The folder {p} cannot be listed: {exc.strerror}.") from exc
        if empty:
            raise ImageReadError(f"The folder {p} is empty; expected DICOM files or a zarr store.")
        raise UnsupportedFormatError(
            f"The folder {p} holds no DICOM files and no zarr metadata, so napari-medseg "
            "cannot read it; open a single image file instead."
        )
    if p.stat().st_size == 0:
        raise ImageReadError(f"{p} is empty (0 bytes).")
    sniffed = sniff_file(p)
    if by_name is None:
        if sniffed == "dicom":
            return "dicom"
        kinds = ", ".join(sorted(set(SUFFIXES)))
        raise UnsupportedFormatError(
            f"{p.name} is not a format napari-medseg reads (it reads {kinds}, "
            "DICOM folders and zarr stores)."
        )
    if sniffed not in _ACCEPTS.get(by_name, {sniffed}):
        what, suffix = _SNIFF_NAMES.get(sniffed or "", ("an unknown kind of data", ""))
        hint = f"; rename it to {suffix} if that is what it is" if suffix and sniffed != "text" else ""
        raise ImageReadError(
            f"{p} is not a {FORMATS[by_name]} file as its extension says: "
            f"its content is {what}{hint}."
        )
    return by_name


def is_supported(path: str | os.PathLike) -> bool:
    """True when napari-medseg would try to read ``path`` (cheap: name and a few bytes).

    Never raises. Folders count when they are zarr stores or hold DICOM files; files
    without a known suffix count when they start with the DICOM magic.
    """
    try:
        p = Path(path)
        if p.is_dir():
            return is_zarr_dir(p) or format_from_name(p) == "zarr" or bool(
                dicom_files_in(p, limit=1)
            )
        if format_from_name(p) is not None:
            return True
        return p.is_file() and is_dicom_file(p)
    except (OSError, ValueError, TypeError):
        return False
