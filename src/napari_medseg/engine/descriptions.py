"""The checkpoint description is verified like the weights: its hash, and the header copy.

A checkpoint's JSON description decides what the weights compute (the network rebuilt, the
intensity normalization, the working resolution), so an edited description is as wrong as
replaced weights. :func:`description_sha256` hashes the canonical JSON of a description,
every field except those filled in after saving or at loading (:data:`UNHASHED`); the saver
records it in the description (``description_sha256``) and in the safetensors header
metadata (:data:`HEADER_HASH_KEY`). :func:`check_description` refuses a description whose
content no longer matches its recorded hash, whose hash differs from the header's, or whose
output-changing fields (:data:`OUTPUT_FIELDS`) differ from the copy embedded in the weights
header. The header is part of the weights file, so the sha256 of the weights covers it:
checkpoints written before the hash existed and the shipped model cards are checked against
that copy too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import NormalizationConfig
from ..errors import CheckpointError, ConfigError

__all__ = [
    "HEADER_KEY",
    "HEADER_HASH_KEY",
    "UNHASHED",
    "OUTPUT_FIELDS",
    "sha256_file",
    "description_sha256",
    "read_header",
    "check_description",
]

#: safetensors metadata key holding the JSON description.
HEADER_KEY = "napari_medseg"
#: safetensors metadata key holding the description's hash.
HEADER_HASH_KEY = "napari_medseg_description_sha256"
#: Fields left out of the hash: set after saving (``sha256``), at loading (``weights`` follows
#: a renamed file, ``tag`` names the model card) or the hash itself.
UNHASHED = ("sha256", "weights", "tag", "description_sha256")
#: Fields that change what the network computes; they must equal the header's copy.
OUTPUT_FIELDS = ("network", "variant", "in_channels", "num_classes", "config",
                 "normalization", "input_downsample", "task", "pixel_size", "tile")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def description_sha256(description: dict) -> str:
    """Hex sha256 of a description's canonical JSON (sorted keys, :data:`UNHASHED` left out).

    Args:
        description: the JSON form of a checkpoint description
            (:meth:`~napari_medseg.engine.checkpoints.CheckpointInfo.to_dict`).
    """
    kept = {k: v for k, v in description.items() if k not in UNHASHED}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_header(weights_path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a weights file (no tensor is read).

    Raises:
        CheckpointError: the file is not safetensors.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # safetensors raises its own error types
        raise CheckpointError(f"The file {weights_path} is not a safetensors file.") from None


def _normalization(value: dict | None) -> dict | None:
    """A normalization in full (defaults filled in), so equal settings compare equal."""
    try:
        return NormalizationConfig.from_mapping(value).to_dict() if value else None
    except ConfigError:
        return value


def _task(value: dict | None) -> dict | None:
    """A task in its stored form (None and the ``classes`` task compare equal)."""
    from .seg_task import stored_task

    try:
        return stored_task(value)
    except ConfigError:
        return value


def _differing_field(described: dict, header: dict, partial_config: bool) -> str | None:
    for key in OUTPUT_FIELDS:
        mine, theirs = described.get(key), header.get(key)
        if key == "config" and partial_config:
            mine = mine or {}
            theirs = {k: v for k, v in (theirs or {}).items() if k in mine}
        if key == "normalization":
            mine, theirs = _normalization(mine), _normalization(theirs)
        if key == "task":
            mine, theirs = _task(mine), _task(theirs)
        if mine != theirs:
            return key
    return None


def check_description(described: dict, header: dict, header_meta: dict[str, str],
                      source: str, *, card: bool = False) -> None:
    """Refuse a description that was changed after its checkpoint was saved.

    Args:
        described: the description used for loading (JSON form, parsed and re-serialised).
        header: the description embedded in the weights header (same form), or empty.
        header_meta: the weights header metadata (:func:`read_header`).
        source: how the one sentence names the checkpoint (``"checkpoint net"``).
        card: the description comes from a model card: it records no hash, and its config
            may hold only some keys (overrides of the variant); only those are compared.

    Raises:
        CheckpointError: the recorded hash does not match the description, the description's
            hash differs from the header's, or an output-changing field differs from the
            header's copy.
    """
    recorded = described.get("description_sha256")
    in_header = header_meta.get(HEADER_HASH_KEY)
    changed = recorded is not None and recorded != description_sha256(described)
    changed = changed or (not card and in_header is not None and recorded != in_header)
    key = _differing_field(described, header, card) if header else None
    if changed or key is not None:
        what = f" (its {key!r} differs from the copy in the weights file)" if key else ""
        raise CheckpointError(
            f"The description of {source} was changed after it was saved{what}; restore the "
            "original .json (or delete it: the weights file describes itself) or save the "
            "checkpoint again."
        )
