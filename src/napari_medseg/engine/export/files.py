"""The files of an export: what it must not write over, and the checkpoint it attaches.

The output rules are the engine's (:mod:`napari_medseg.engine.batch.outputs`): a package is
never one of the files the weights are read from (a package given as ``--weights`` too), it
replaces an existing file only when asked, and its folder must take it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ...errors import ConfigError

__all__ = ["check_package_output", "checkpoint_files"]


def check_package_output(weights: str, output: Path, overwrite: bool) -> None:
    """Refuse a package path that is not a ``.zip``, is an input, or exists (without
    ``overwrite``).

    Raises:
        ConfigError: one sentence for what is wrong.
    """
    from ..batch.outputs import (check_new_paths, check_not_inputs, check_output_folder,
                                 weights_files)
    from ..packages import is_package

    if output.suffix.lower() != ".zip":
        raise ConfigError(f"A bioimage.io package is a .zip file; name the output "
                          f"{output.with_suffix('.zip').name!r} instead of {output.name!r}.")
    inputs = weights_files(weights)
    if is_package(weights):
        inputs.append(Path(weights))
    check_not_inputs([output], inputs)
    if not overwrite:
        check_new_paths([output])
    check_output_folder(output.parent)


def checkpoint_files(weights: str, info, folder: Path, name: str) -> tuple[Path, Path]:
    """Copy the checkpoint's safetensors and JSON description into ``folder`` (as
    ``<stem>.safetensors`` and ``<stem>.json``) and return both paths."""
    from ..batch.outputs import weights_files
    from ..packages import extract_checkpoint, is_package

    stem = name.replace("napari-medseg ", "").replace(" ", "_")
    target = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    if is_package(weights):
        source, _ = extract_checkpoint(weights, folder / "from_package")
    else:
        source = next((p for p in weights_files(weights) if p.suffix == ".safetensors"), None)
    if source is None:
        raise ConfigError(f"The weights file of {weights!r} was not found.")
    shutil.copyfile(source, target[0])
    description = {**info.to_dict(), "weights": target[0].name}
    target[1].write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return target
