"""Where results may be written, checked before anything runs: the one rule set of
``napari-medseg predict``, of batch runs (CLI and widget) and of the checkpoints that
``napari-medseg train`` and ``finetune`` write.

* An output is never an input: not the same file (resolved, hard and symbolic links
  followed), not inside an input folder (a zarr store, a DICOM series), not a folder holding
  an input.
* Two outputs of one run never share a path.
* An existing output is replaced only when the caller says so (``--overwrite``; a batch run
  replaces what its own manifest recorded, nothing else).
* The output folder is a folder (or can be made one), can be written, and has room for about
  the estimated output size.

Each refusal is one :class:`~napari_medseg.errors.ConfigError` sentence.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ...errors import ConfigError
from ...io.detect import dicom_files_in, is_zarr_dir
from ..inference.plan import format_bytes
from .manifest import MANIFEST_NAME

__all__ = [
    "input_bytes",
    "check_not_inputs",
    "check_new_paths",
    "check_output_folder",
    "check_task_outputs",
    "check_batch_outputs",
    "weights_files",
    "check_checkpoint_output",
]


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path))).resolve()


def input_bytes(path: str | os.PathLike) -> int:
    """The size of an input on disk: a file's, or the files' of a folder (zarr, DICOM)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                total += (Path(folder) / name).stat().st_size
            except OSError:
                pass
    return total


def _key(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of an existing path (what hard and symbolic links share)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_not_inputs(outputs: Iterable[str | os.PathLike],
                     inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output that is an input, lies inside an input folder, or holds an input.

    Also refuses two outputs on one path. Linear in the number of paths (a batch may have
    thousands).

    Raises:
        ConfigError: one sentence naming the output and the input.
    """
    inputs = [Path(p) for p in inputs]
    by_path = {_resolved(p): p for p in inputs}
    by_key = {k: p for p in inputs if (k := _key(p)) is not None}
    folders = {r: p for r, p in by_path.items() if p.is_dir()}
    holders = {parent: p for r, p in by_path.items() for parent in r.parents}
    seen: set[Path] = set()
    for out in map(Path, outputs):
        resolved = _resolved(out)
        if resolved in seen:
            raise ConfigError(f"Two outputs of this run would both be written to {out}; "
                              "give the inputs distinct names or predict them separately.")
        seen.add(resolved)
        key = _key(out)
        inp = by_path.get(resolved) or (by_key.get(key) if key is not None else None)
        if inp is not None:
            raise ConfigError(f"The output {out} is the input {inp}, which writing would "
                              "destroy; choose another output folder or name.")
        inp = next((folders[p] for p in resolved.parents if p in folders), None)
        if inp is not None:
            raise ConfigError(f"The output {out} lies inside the input {inp}; choose an "
                              "output folder outside it.")
        if out.is_dir():
            inp = holders.get(resolved)
            if inp is not None:
                raise ConfigError(f"The output {out} is a folder holding the input {inp}; "
                                  "choose another output name.")
            if not is_zarr_dir(out):  # only a zarr output is a folder: this is someone's
                raise ConfigError(f"The output {out} is an existing folder, not an image "
                                  "file; choose another output name.")


def check_new_paths(paths: Iterable[str | os.PathLike], flag: str = "--overwrite") -> None:
    """Refuse to replace any of ``paths`` that already exists.

    Raises:
        ConfigError: names the first existing path and ``flag`` (what allows replacing it).
    """
    existing = [Path(p) for p in paths if os.path.lexists(p)]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ConfigError(f"The output {existing[0]}{more} already exists; pass {flag} to "
                          "replace it, or choose another output name.")


def check_output_folder(folder: str | os.PathLike, need_bytes: int = 0) -> None:
    """Refuse an output folder that is a file, cannot be written, or lacks room.

    The folder need not exist yet: then its nearest existing parent is checked (it is where
    the folder will be made). ``need_bytes`` is the estimated size of what will be written.

    Raises:
        ConfigError: one sentence for what is wrong.
    """
    folder = Path(os.path.abspath(os.path.expanduser(folder)))
    base = folder
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"The output folder {folder} cannot be made: {base} is a file; "
                          "choose another output folder.")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"The output folder {base} is not writable; choose another one or "
                          "change its permissions.")
    try:
        free = shutil.disk_usage(base).free
    except OSError:
        return  # no figure to compare with: the write will tell
    if need_bytes > free:
        raise ConfigError(f"The output folder {base} has {format_bytes(free)} free but the "
                          f"outputs need about {format_bytes(need_bytes)}; free some space or "
                          "choose another folder.")


def check_task_outputs(tasks: Iterable, overwrite: bool = False) -> None:
    """Check the outputs of per-file tasks (:class:`~.task.FileTask`) before any runs.

    Outputs must not be inputs (see :func:`check_not_inputs`); existing outputs are refused
    without ``overwrite`` (a task streaming into a zarr store leaves that to the store, which
    resumes its own run; so does a task whose staging store is there: an earlier run of it
    stopped while writing its outputs); each output folder must have room for about the
    input's size per output (the outputs' real size is known only once an image is read).

    Raises:
        ConfigError: one sentence for the first problem found.
    """
    from .staging import staging_path

    tasks = list(tasks)
    outputs, new, need = [], [], {}
    for task in tasks:
        store = task.predict.store
        paths = [Path(store)] if store else [Path(p) for _, p in task.outputs]
        outputs += paths
        if not store and not staging_path(task).is_dir():
            new += paths
        folder = paths[0].parent
        need[folder] = need.get(folder, 0) + input_bytes(task.input_path) * len(paths)
    check_not_inputs(outputs, [t.input_path for t in tasks])
    if not overwrite:
        check_new_paths(new)
    for folder, n in need.items():
        check_output_folder(folder, n)


def check_batch_outputs(out: str | os.PathLike, items: Iterable, todo: Iterable,
                        recorded: Iterable[str | None]) -> None:
    """Check a batch run's outputs before any file runs.

    Args:
        out: the output folder.
        items: every image the scan found (:class:`~.scan.ImageItem`).
        todo: the images this run predicts.
        recorded: the output names (relative to ``out``) the folder's manifest holds; an
            existing output it does not name is not the run's own and is never replaced.

    Raises:
        ConfigError: the output folder is an image, an output is an input, an existing
            file would be replaced, or the folder cannot take the outputs.
    """
    out = Path(out)
    if out.is_dir() and (is_zarr_dir(out) or dicom_files_in(out, limit=1)):
        raise ConfigError(f"The output folder {out} is an image (a zarr store or a DICOM "
                          "series); choose another output folder.")
    todo, known = list(todo), {r for r in recorded if r}
    paths = [out / str(it.output) for it in todo]
    check_not_inputs(paths, [it.path for it in items if it.reason is None])
    foreign = [p for it, p in zip(todo, paths) if it.output not in known and os.path.lexists(p)]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise ConfigError(f"The output folder already holds {foreign[0]}{more}, which no "
                          f"earlier run recorded in {out / MANIFEST_NAME}; move it away or "
                          "choose another output folder.")
    check_output_folder(out, sum(input_bytes(it.path) for it in todo))


def weights_files(tag_or_path: str | os.PathLike) -> list[Path]:
    """The files that loading ``tag_or_path`` reads, in the order of
    :func:`~napari_medseg.engine.checkpoints.resolve_weights`: a checkpoint's weights and
    description, else a model card's installed weights and their sidecar (existing ones)."""
    from ..checkpoints import checkpoint_paths, list_model_cards

    pair = checkpoint_paths(str(tag_or_path))
    if not any(p.is_file() for p in pair):
        card = next((c for c in list_model_cards() if c.tag == str(tag_or_path)), None)
        path = card.weights_path() if card is not None else None
        pair = () if path is None else (path, path.with_suffix(".json"))
    return [p for p in pair if p.is_file()]


def check_checkpoint_output(output: str | os.PathLike, base: str | os.PathLike | None,
                            overwrite: bool) -> None:
    """Check a checkpoint about to be written before anything is loaded or trained.

    It is never the checkpoint it starts from (either file of it, a tag's installed weights
    included), replaces an existing checkpoint only with ``overwrite``, and its folder can
    take it.

    Raises:
        ConfigError: one sentence for what is wrong.
    """
    from ..checkpoints import checkpoint_paths

    outputs = checkpoint_paths(output)
    if base:
        check_not_inputs(outputs, weights_files(base))
    if not overwrite:
        check_new_paths(outputs)
    check_output_folder(outputs[0].parent)
