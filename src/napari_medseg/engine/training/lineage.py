"""The user's fine-tuned checkpoints: an atomic store with lineage, revert, and label autosaves.

Everything lives in the per-user data folder (:func:`napari_medseg.resources.user_data_dir`)::

    checkpoints/<name>.safetensors + <name>.json   self-describing checkpoints (engine.checkpoints)
    lineage.json                                   the active checkpoint of each model line
    autosave/<layer>.tif (+ <layer>.prev.tif)      label images saved before fine-tuning

A *model line* is everything fine-tuned, directly or not, from one starting model, its *root*
(the sha256 of the shipped or trained weights it began with; recorded in each checkpoint's
``extra["lineage_root"]``). Each checkpoint's ``parent`` is the sha256 of the weights it was
fine-tuned from, so :func:`list_lineage` rebuilds the tree from the files alone; the registry
file only remembers which member of a line is *active* (used for segmenting and as the start
of the next fine-tuning). Reverting makes an earlier member (or the root) active again; nothing
is ever deleted.

Writes are atomic: a checkpoint is written into a temporary folder beside its target and moved
into place, weights first and its JSON description last (a checkpoint exists once its JSON
does); the registry and autosaves are written to a temporary file and renamed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ... import resources
from ...errors import CheckpointError, ImageWriteError
from ..checkpoints import CheckpointInfo, checkpoint_paths, read_checkpoint_info, save_checkpoint

__all__ = [
    "CHECKPOINTS_FOLDER",
    "REGISTRY_FILE",
    "AUTOSAVE_FOLDER",
    "LineageEntry",
    "checkpoints_dir",
    "autosave_dir",
    "safe_name",
    "unique_checkpoint_path",
    "save_checkpoint_atomic",
    "lineage_root",
    "list_lineage",
    "find_entry",
    "ancestors",
    "describe_source",
    "active_source",
    "set_active",
    "revert",
    "autosave_labels",
]

#: Sub-folder of the user data folder holding fine-tuned checkpoints.
CHECKPOINTS_FOLDER = "checkpoints"
#: File (in the user data folder) remembering the active checkpoint of each model line.
REGISTRY_FILE = "lineage.json"
#: Sub-folder of the user data folder holding label autosaves.
AUTOSAVE_FOLDER = "autosave"


def _home(home: str | Path | None) -> Path:
    return Path(home) if home is not None else resources.user_data_dir()


def checkpoints_dir(home: str | Path | None = None) -> Path:
    """The folder of the user's checkpoints (created on demand).

    Args:
        home: the user data folder; None uses :func:`~napari_medseg.resources.user_data_dir`.
    """
    folder = _home(home) / CHECKPOINTS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def autosave_dir(home: str | Path | None = None) -> Path:
    """The folder of label autosaves (created on demand)."""
    folder = _home(home) / AUTOSAVE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def safe_name(name: str, default: str = "labels") -> str:
    """A file-name-safe version of a layer or model name (``"cells mask"`` -> ``"cells_mask"``)."""
    text = re.sub(r"[^\w.-]+", "_", str(name)).strip("._")
    return text[:80] or default


def unique_checkpoint_path(stem: str, home: str | Path | None = None) -> Path:
    """A new ``.safetensors`` path in the checkpoints folder: ``<stem>-<UTC time>[-n]``."""
    folder = checkpoints_dir(home)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = f"{safe_name(stem, 'finetuned')}-{stamp}"
    candidate = folder / f"{base}.safetensors"
    n = 1
    while candidate.exists() or candidate.with_suffix(".json").exists():
        n += 1
        candidate = folder / f"{base}-{n}.safetensors"
    return candidate


def save_checkpoint_atomic(model: Any, path: str | Path, **kwargs: Any) -> CheckpointInfo:
    """:func:`~napari_medseg.engine.checkpoints.save_checkpoint`, but atomically.

    Both files are written in a temporary folder beside ``path`` and renamed into place, the
    weights first and the JSON description last, so a crash leaves either the old checkpoint,
    or a new weights file that still describes itself (its header), never a half-written file.

    Args:
        model: a registered network.
        path: the checkpoint (stem, ``.safetensors`` or ``.json``).
        **kwargs: as :func:`~napari_medseg.engine.checkpoints.save_checkpoint`.

    Returns:
        The written description.
    """
    weights, description = checkpoint_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=weights.parent))
    try:
        info = save_checkpoint(model, tmp / weights.name, **kwargs)
        os.replace(tmp / weights.name, weights)
        os.replace(tmp / description.name, description)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def lineage_root(info: CheckpointInfo | None) -> str | None:
    """The root of a checkpoint's model line: recorded by fine-tuning, else its own sha256."""
    if info is None:
        return None
    root = (info.extra or {}).get("lineage_root")
    return str(root) if root else info.sha256


@dataclass(frozen=True)
class LineageEntry:
    """One of the user's checkpoints.

    Attributes:
        name: its stem relative to the checkpoints folder (``"cells-20261123-091500"``).
        path: its JSON description.
        info: the description.
    """

    name: str
    path: Path
    info: CheckpointInfo

    @property
    def sha256(self) -> str | None:
        """sha256 of its weights."""
        return self.info.sha256

    @property
    def parent(self) -> str | None:
        """sha256 of the weights it was fine-tuned from."""
        return self.info.parent

    @property
    def root(self) -> str | None:
        """The root of its model line."""
        return lineage_root(self.info)

    @property
    def source(self) -> str:
        """What ``resolve_weights`` takes to load it (its path)."""
        return str(self.path)

    def describe(self) -> str:
        """One line: name, validation Dice before -> after, steps, time."""
        m = self.info.metrics or {}
        parts = [self.name]
        before, after = m.get("val_dice_before"), m.get("val_dice")
        if isinstance(after, (int, float)):
            text = f"Dice {after:.3f}"
            if isinstance(before, (int, float)):
                text = f"Dice {before:.3f} -> {after:.3f}"
            parts.append(text)
        steps = (self.info.settings or {}).get("steps_done")
        if steps is not None:
            parts.append(f"{steps} steps")
        if self.info.created:
            parts.append(self.info.created.replace("T", " ")[:16])
        return ", ".join(parts)


def list_lineage(home: str | Path | None = None) -> list[LineageEntry]:
    """The user's checkpoints, oldest first; unreadable files are skipped.

    Args:
        home: the user data folder; None uses the default.
    """
    folder = checkpoints_dir(home)
    entries = []
    for path in sorted(folder.rglob("*.json")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue  # a write in progress
        try:
            info = read_checkpoint_info(path)
        except Exception:  # noqa: BLE001 - one bad file must not hide the others
            continue
        name = path.relative_to(folder).with_suffix("").as_posix()
        entries.append(LineageEntry(name, path, info))
    entries.sort(key=lambda e: (e.info.created or "", e.name))
    return entries


def find_entry(entries: list[LineageEntry], key: str | Path | None) -> LineageEntry | None:
    """The entry whose name, path (either file) or sha256 is ``key``."""
    if key is None:
        return None
    text = str(key)
    for entry in entries:
        if text in (entry.name, entry.sha256, str(entry.path)):
            return entry
        weights, description = checkpoint_paths(text)
        if description == entry.path or weights == checkpoint_paths(entry.path)[0]:
            return entry
    return None


def ancestors(entry: LineageEntry, entries: list[LineageEntry]) -> list[LineageEntry | str]:
    """The chain from ``entry``'s parent back to the root, nearest first.

    Members that are user checkpoints are :class:`LineageEntry`; the first parent that is not
    (shipped weights, a checkpoint elsewhere) ends the chain as :func:`describe_source` text.
    """
    by_sha = {e.sha256: e for e in entries if e.sha256}
    chain: list[LineageEntry | str] = []
    seen = {entry.sha256}
    parent = entry.parent
    while parent:
        if parent in seen:
            break  # a cycle can only come from hand-edited files
        seen.add(parent)
        member = by_sha.get(parent)
        if member is None:
            chain.append(describe_source(parent))
            break
        chain.append(member)
        parent = member.parent
    return chain


def describe_source(sha256: str | None) -> str:
    """A readable name for weights known by their sha256: a model card's tag, or the hash."""
    if not sha256:
        return "random init"
    import warnings

    from ..checkpoints import list_model_cards

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for card in list_model_cards():
            if card.sha256 == sha256:
                return card.tag
    return f"weights {sha256[:12]}"


def _registry_path(home: str | Path | None) -> Path:
    return _home(home) / REGISTRY_FILE


def _read_registry(home: str | Path | None) -> dict[str, Any]:
    path = _registry_path(home)
    if not path.is_file():
        return {"active": {}, "events": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"active": {}, "events": []}
    if not isinstance(data, dict):
        return {"active": {}, "events": []}
    data.setdefault("active", {})
    data.setdefault("events", [])
    return data


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def active_source(root: str | None, home: str | Path | None = None) -> str | None:
    """The active member of the model line ``root`` (a checkpoint path or a weights tag).

    None when nothing was recorded, or when the recorded checkpoint no longer exists.
    """
    if not root:
        return None
    source = _read_registry(home)["active"].get(root)
    if source is None:
        return None
    weights, description = checkpoint_paths(source)
    if ("/" in source or os.sep in source) and not (weights.is_file() or description.is_file()):
        return None
    return source


def set_active(root: str, source: str, home: str | Path | None = None,
               reason: str = "activated") -> None:
    """Record ``source`` (a checkpoint path or a weights tag) as the active member of ``root``.

    Args:
        root: the model line (see :func:`lineage_root`).
        source: what ``resolve_weights`` takes.
        home: the user data folder; None uses the default.
        reason: a word for the registry's event log (``"fine-tuned"``, ``"reverted"``...).
    """
    if not root:
        raise CheckpointError("A model line needs a root (the sha256 of its first weights).")
    data = _read_registry(home)
    data["active"][root] = str(source)
    data["events"].append({
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "root": root, "source": str(source), "reason": reason,
    })
    data["events"] = data["events"][-200:]
    _write_json_atomic(_registry_path(home), data)


def revert(entry: LineageEntry, entries: list[LineageEntry] | None = None,
           home: str | Path | None = None, root_source: str | None = None) -> str:
    """Make ``entry``'s parent the active member of its line; returns the parent's source.

    The parent is a user checkpoint (its path), or the line's root: found by its sha256
    among the model cards (its tag), else by the ``parent_source`` fine-tuning recorded in
    ``training_data`` (when that file still exists), else ``root_source`` must name it.

    Raises:
        CheckpointError: ``entry`` has no parent, or the parent cannot be found.
    """
    entries = list_lineage(home) if entries is None else entries
    if not entry.parent:
        raise CheckpointError(f"{entry.name} has no parent checkpoint to go back to.")
    chain = ancestors(entry, entries)
    parent = chain[0] if chain else None
    if isinstance(parent, LineageEntry):
        source = parent.source
    else:
        tag = describe_source(entry.parent)
        recorded = (entry.info.training_data or {}).get("parent_source")
        if not tag.startswith("weights ") and tag != "random init":
            source = tag
        elif recorded and _is_checkpoint_with_sha(recorded, entry.parent):
            source = str(recorded)
        elif root_source is not None:
            source = root_source
        else:
            raise CheckpointError(
                f"The parent of {entry.name} ({entry.parent[:12]}) is neither one of your "
                "checkpoints nor shipped weights; load it by its path instead.")
    set_active(entry.root or entry.parent, source, home, reason="reverted")
    return source


def _is_checkpoint_with_sha(source: str, sha256: str) -> bool:
    """True when ``source`` is a checkpoint on disk whose weights have ``sha256``."""
    try:
        return read_checkpoint_info(source).sha256 == sha256
    except Exception:  # noqa: BLE001 - missing or unreadable: not usable
        return False


def autosave_labels(labels: Any, name: str, meta: Any = None,
                    home: str | Path | None = None) -> Path:
    """Save a label image to ``autosave/<name>.tif`` atomically, keeping the previous one.

    The earlier autosave of the same name becomes ``<name>.prev.tif``, so two versions of a
    layer are always on disk.

    Args:
        labels: integer array (YX, ZYX ...; numpy, dask or zarr).
        name: the layer name (made file-name safe).
        meta: the image's :class:`~napari_medseg.io.ImageMeta` (spacing kept), or None.
        home: the user data folder; None uses the default.

    Returns:
        The written file.

    Raises:
        ImageWriteError: the labels could not be written.
    """
    from ...io import write_labels

    folder = autosave_dir(home)
    stem = safe_name(name)
    target = folder / f"{stem}.tif"
    data = np.asarray(labels)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tif", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_labels(tmp, data, meta)
        if target.exists():
            os.replace(target, folder / f"{stem}.prev.tif")
        os.replace(tmp, target)
    except ImageWriteError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ImageWriteError(f"The labels could not be saved to {target} ({exc}).") from None
    return target
