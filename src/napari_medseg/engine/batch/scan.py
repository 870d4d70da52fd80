"""Finding the images of a batch run: what a folder holds, and where each result goes.

Zarr stores and folders of DICOM files count as one image each. Hidden files and the output
folder are left out. A file whose kind napari-medseg does not read (a ``notes.txt``) or a
loose DICOM file at the top is listed with the reason it is ignored; a file that claims to be
an image is listed to be tried (a truncated TIFF fails later, on its own).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

from ...config import BATCH_FORMATS
from ...errors import ImageReadError
from ...io.detect import SUFFIXES, dicom_files_in, is_dicom_file, is_supported, is_zarr_dir

__all__ = ["ImageItem", "find_images", "image_stem"]


@dataclass(frozen=True)
class ImageItem:
    """One entry the scan found.

    Attributes:
        name: path relative to the input folder, with ``/`` separators.
        path: absolute path (a file, a zarr store or a DICOM folder).
        output: output path relative to the output folder (None when ignored).
        reason: why it is ignored (None for an image to predict).
    """

    name: str
    path: Path
    output: str | None
    reason: str | None = None


def image_stem(name: str) -> str:
    """``name`` without its image suffix (``a.ome.tif`` -> ``a``); unchanged without one."""
    lower = name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _matches(rel: str, name: str, pattern: str) -> bool:
    pat = pattern.lower()
    return fnmatch.fnmatchcase(name.lower(), pat) or fnmatch.fnmatchcase(rel.lower(), pat)


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    return path == folder or folder in path.parents


def _is_one_image_folder(entry: Path) -> bool:
    return is_zarr_dir(entry) or entry.name.lower().endswith(".zarr") or bool(
        dicom_files_in(entry, limit=1))


def _file_reason(entry: Path, top: bool) -> str | None:
    """Why the file ``entry`` is ignored, or None when it is an image to try."""
    if top and (entry.suffix.lower() in (".dcm", ".dicom") or is_dicom_file(entry)):
        return ("a loose DICOM file; put each DICOM series in its own folder, which is read "
                "as one image")
    if not is_supported(entry):
        return "not an image format napari-medseg reads"
    return None


def _scan(folder: Path, root: Path, pattern: str, recursive: bool, exclude: Path | None,
          found: list[tuple[str, Path, str | None]]) -> None:
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise ImageReadError(f"The folder {folder} cannot be listed ({exc.strerror}).") from None
    for entry in entries:
        if entry.name.startswith(".") or _inside(entry, exclude):
            continue
        rel = entry.relative_to(root).as_posix()
        if entry.is_dir():
            if _is_one_image_folder(entry):
                if _matches(rel, entry.name, pattern):
                    found.append((rel, entry, None))
            elif recursive and not entry.is_symlink():  # no loops through links
                _scan(entry, root, pattern, recursive, exclude, found)
        elif _matches(rel, entry.name, pattern):
            found.append((rel, entry, _file_reason(entry, folder == root)))


def _output_names(found: list[tuple[str, Path, str | None]], suffix: str,
                  output: str) -> list[str | None]:
    """``<stem>_<output><suffix>`` beside each image's relative place; the full name when
    two images would share a stem (``a.tif`` and ``a.png``)."""
    def named(rel: str, name: str) -> str:
        parent = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
        return f"{parent}{name}_{output}{suffix}"

    outs: list[str | None] = []
    planned: dict[str, list[int]] = {}
    for i, (rel, path, reason) in enumerate(found):
        out = None if reason is not None else named(rel, image_stem(path.name))
        outs.append(out)
        if out is not None:
            planned.setdefault(out.lower(), []).append(i)
    for clashing in planned.values():
        if len(clashing) > 1:
            for i in clashing:
                outs[i] = named(found[i][0], found[i][1].name)
    return outs


def find_images(
    in_dir: str | os.PathLike,
    pattern: str = "*",
    recursive: bool = False,
    out_dir: str | os.PathLike | None = None,
    format: str = "tif",
    output: str = "mask",
) -> list[ImageItem]:
    """The images a batch run over ``in_dir`` would predict, and the files it would ignore.

    Args:
        in_dir: the input folder.
        pattern: glob matched (case-insensitively) against each name or relative path.
        recursive: look in sub-folders too (zarr stores and DICOM folders are one image).
        out_dir: the output folder; it is left out when it lies inside ``in_dir``.
        format: output format, a key of :data:`~napari_medseg.config.BATCH_FORMATS`.
        output: the output name used in the file names (``mask``...).

    Returns:
        The items sorted by name; ``output`` is where each image's result goes (relative to
        the output folder): ``<stem>_<output><suffix>``, or ``<name>_<output><suffix>`` when
        two inputs share a stem (``a.tif`` and ``a.png``).

    Raises:
        ImageReadError: ``in_dir`` is not a folder or cannot be listed.
    """
    root = Path(in_dir).expanduser().resolve()
    if not root.is_dir():
        raise ImageReadError(f"The input folder {root} does not exist or is not a folder.")
    exclude = Path(out_dir).expanduser().resolve() if out_dir is not None else None
    found: list[tuple[str, Path, str | None]] = []
    _scan(root, root, pattern, recursive, exclude, found)
    outs = _output_names(found, BATCH_FORMATS[format], output)
    return [ImageItem(rel, path, out, reason)
            for (rel, path, reason), out in zip(found, outs)]
