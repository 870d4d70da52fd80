"""Reading a bioimage.io model package that napari-medseg exported.

Such a package (:mod:`napari_medseg.engine.export.bioimageio`) carries the checkpoint it came
from as two attachments, its safetensors weights and JSON description, named in the package
description's ``config.napari_medseg.checkpoint``. Loading reads the description with a safe
YAML parser, extracts only those two files (after checking them against the sha256 the
package lists), and loads them as any checkpoint: safetensors only, the description verified,
no pickle and no code of the package run. Other packages (ONNX or TorchScript only) are
refused in one sentence. Needs no bioimage.io library.
"""

from __future__ import annotations

import hashlib
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

__all__ = ["PACKAGE_SUFFIX", "is_package", "read_package_section", "extract_checkpoint",
           "read_package_info", "load_package"]

#: A bioimage.io package is a zip file.
PACKAGE_SUFFIX = ".zip"
_DESCRIPTION_NAMES = ("rdf.yaml", "bioimageio.yaml")
_MAX_ATTACHMENT = 4 << 30  # bytes; a checkpoint is far smaller


def is_package(path: Any) -> bool:
    """True for an existing ``.zip`` file (the form a package takes)."""
    p = Path(str(path)).expanduser()
    return p.suffix.lower() == PACKAGE_SUFFIX and p.is_file()


def _not_ours(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"The file {path.name} is not a napari-medseg model package "
                           f"({why}); export one with `napari-medseg export`.")


def _description(archive: zipfile.ZipFile, path: Path) -> dict:
    import yaml

    names = [n for n in archive.namelist()
             if n in _DESCRIPTION_NAMES or n.endswith(".bioimageio.yaml")]
    if not names:
        raise _not_ours(path, "it holds no bioimage.io description")
    try:
        data = yaml.safe_load(archive.read(names[0]).decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        raise _not_ours(path, "its description is not readable YAML") from None
    if not isinstance(data, dict):
        raise _not_ours(path, "its description is not a mapping")
    return data


def read_package_section(path: str | Path) -> dict:
    """The package's ``config.napari_medseg`` plus ``attachments``: file name -> sha256.

    Raises:
        CheckpointError: not a zip, not a package, or not one napari-medseg wrote.
    """
    path = Path(path).expanduser()
    try:
        with zipfile.ZipFile(path) as archive:
            data = _description(archive, path)
    except zipfile.BadZipFile:
        raise _not_ours(path, "it is not a readable zip file") from None
    section = (data.get("config") or {}).get("napari_medseg")
    checkpoint = section.get("checkpoint") if isinstance(section, dict) else None
    if not isinstance(checkpoint, dict) or not checkpoint.get("weights"):
        raise _not_ours(path, "its description has no napari_medseg checkpoint")
    listed = {}
    for item in data.get("attachments") or []:
        if isinstance(item, dict) and item.get("source"):
            listed[str(item["source"])] = item.get("sha256")
    return {**section, "attachments": listed}


def _member(name: Any, path: Path) -> str:
    name = str(name or "")
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise _not_ours(path, f"its checkpoint file name {name!r} is not a plain file name")
    return name


def extract_checkpoint(path: str | Path, folder: str | Path) -> tuple[Path, Path]:
    """Extract the package's checkpoint (weights and description) into ``folder``.

    Returns:
        ``(weights, description)`` paths.

    Raises:
        CheckpointError: not a napari-medseg package, a file missing, or a file that does not
            match the sha256 the package lists.
    """
    path = Path(path).expanduser()
    section = read_package_section(path)
    checkpoint = section["checkpoint"]
    names = (_member(checkpoint.get("weights"), path),
             _member(checkpoint.get("description"), path))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with zipfile.ZipFile(path) as archive:
        for name in names:
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise _not_ours(path, f"the attachment {name} is missing") from None
            if info.file_size > _MAX_ATTACHMENT:
                raise CheckpointError(f"The attachment {name} of {path.name} is too large "
                                      "for a checkpoint.")
            content = archive.read(info)
            listed = section["attachments"].get(name)
            if not listed:
                raise _not_ours(path, f"the attachment {name} has no sha256 listed")
            if hashlib.sha256(content).hexdigest() != str(listed):
                raise CheckpointError(f"The attachment {name} of {path.name} does not match "
                                      "its listed sha256; the package is corrupt.")
            target = folder / name
            target.write_bytes(content)
            out.append(target)
    _check_weights_named(out[1], out[0].name, path)
    return out[0], out[1]


def _check_weights_named(description: Path, weights_name: str, path: Path) -> None:
    """The description must name the extracted weights file: loading follows that name, so
    another one (an absolute path, ``../x``) would load a file the package's hashes never
    covered."""
    import json

    try:
        named = json.loads(description.read_text(encoding="utf-8")).get("weights")
    except (ValueError, AttributeError):
        raise _not_ours(path, "its checkpoint description is not a JSON object") from None
    if named != weights_name:
        raise _not_ours(path, f"its description names the weights {named!r}, not the "
                              f"attached {weights_name!r}")


def read_package_info(path: str | Path):
    """The checkpoint description a package carries (without loading its weights)."""
    from .checkpoints import read_checkpoint_info

    with tempfile.TemporaryDirectory(prefix="medseg-package-") as tmp:
        _, description = extract_checkpoint(path, tmp)
        return read_checkpoint_info(description)


def load_package(path: str | Path, device: Any = "cpu", verify: bool = True):
    """Load the checkpoint a package carries: ``(model, info)`` as
    :func:`~napari_medseg.engine.checkpoints.load_checkpoint`."""
    from .checkpoints import load_checkpoint

    with tempfile.TemporaryDirectory(prefix="medseg-package-") as tmp:
        _, description = extract_checkpoint(path, tmp)
        return load_checkpoint(description, device=device, verify=verify)
