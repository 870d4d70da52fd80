"""A batch run's manifest ``run.json``: settings, per-file status, and what counts as finished.

The manifest in the output folder records the weights (sha256), the settings that decide what
a run writes (hashed), each input's size and modification time, and each file's status. A
later run skips a file when all of these match and its output exists. The manifest is only
written by the driver, atomically (a temporary file renamed over it), after every file, and
merged with what is on disk: the entries of files this run does not touch and the other
runs' entries are kept. Temporary files an interrupted run left behind are removed when the
next run starts (one run per folder at a time: :mod:`.lock`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from ...config import BatchConfig, PredictConfig
from ...config.inference import drop_unset_switches
from .task import PARTIAL_PREFIX, remove_path

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "Manifest",
    "settings_of",
    "settings_hash",
    "run_predict_config",
    "input_stamp",
    "clean_partials",
    "utc_now",
]

#: The manifest's file name inside the output folder.
MANIFEST_NAME = "run.json"
#: The manifest's ``format`` value.
MANIFEST_FORMAT = "napari-medseg-batch-run"
MANIFEST_VERSION = 1
_FINISHED = ("done", "skipped")
#: PredictConfig fields that change how fast a file runs, not what it gives; a change in
#: them does not make an earlier run's outputs stale.
_EXECUTION_ONLY = ("device", "batch_size", "channels_last", "store", "resume", "overwrite",
                   "oom_fallback")


def utc_now() -> str:
    """The time now, UTC, ISO 8601 to the second (the manifest's timestamps)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_predict_config(config: BatchConfig) -> PredictConfig:
    """The prediction settings of every file: only the run's label output, no store."""
    return config.predict.replace(outputs=(config.output,), store=None)


def settings_of(config: BatchConfig) -> dict[str, Any]:
    """The settings that decide what a run writes (``run.json``'s ``settings``).

    Everything of the prediction except how fast it runs (device, batch size ...), plus the
    output and its format.
    """
    pred = run_predict_config(config).to_dict()
    for key in _EXECUTION_ONLY:
        pred.pop(key, None)
    drop_unset_switches(pred)  # stores and runs of earlier versions stay resumable
    return {"output": config.output, "format": config.format, "predict": pred}


def settings_hash(settings: dict) -> str:
    """A short hash of :func:`settings_of` (what a finished file is compared by)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def input_stamp(path: Path) -> dict[str, int]:
    """An input's size (-1 for a folder) and modification time: a change means predict again."""
    st = path.stat()
    return {"size": int(st.st_size) if path.is_file() else -1, "mtime_ns": int(st.st_mtime_ns)}


def clean_partials(out_dir: Path) -> int:
    """Remove the temporary outputs an interrupted run left; returns how many.

    Zarr stores (finished outputs) are not walked into: their chunks are many. A file's
    staging store (:mod:`.staging`) is kept: running the file again resumes it.
    """
    from .staging import is_staging_store

    n = 0
    for folder, dirs, names in os.walk(out_dir):
        for name in [d for d in dirs if d.startswith(PARTIAL_PREFIX)] + [
                f for f in names if f.startswith(PARTIAL_PREFIX)]:
            if is_staging_store(name):  # the staged outputs of a file: its re-run resumes
                continue
            remove_path(Path(folder) / name)
            n += 1
        dirs[:] = [d for d in dirs if not d.startswith(PARTIAL_PREFIX)
                   and not d.lower().endswith(".zarr")]
    return n


class Manifest:
    """``run.json``: read at the start, changed and rewritten atomically after every file.

    Args:
        path: the manifest file.

    Attributes:
        path: the manifest file.
        previous: the earlier run's files (name -> entry); empty for a new folder.
        runs: the earlier runs' entries.
        notices: sentences for the user (an unreadable manifest).
        data: what :meth:`write` writes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.previous: dict[str, dict] = {}
        self.runs: list[dict] = []
        self.notices: list[str] = []
        self.data: dict[str, Any] = {}
        if path.is_file():
            data = self._load()
            if data is None:
                self.notices.append(f"The manifest {path} is not readable; starting a new one "
                                    "(every file is predicted again).")
            else:
                self.previous = dict(data.get("files") or {})
                self.runs = list(data.get("runs") or [])

    def _load(self) -> dict | None:
        """The manifest on disk; None when it is absent or not a readable manifest."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            return None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            return None
        return data

    def merged(self) -> dict[str, Any]:
        """:attr:`data` merged with what the manifest held when it was read: the files and
        runs it does not hold are kept (this run's entries win; runs are told apart by
        ``run_id``). The output folder's run lock makes this run the only writer, so the file
        is read once, not again before every write."""
        data = dict(self.data)
        files = {k: v for k, v in self.previous.items() if isinstance(v, dict)}
        files.update(data.get("files") or {})
        data["files"] = files
        runs = list(data.get("runs") or [])
        if runs:
            mine = runs[-1].get("run_id")
            data["runs"] = [r for r in self.runs
                            if not isinstance(r, dict) or r.get("run_id") != mine] + [runs[-1]]
        return data

    def finished_before(self, name: str, output: str | None, stamp: dict, weights_sha256: str,
                        settings_hash: str) -> dict | None:
        """The earlier entry of ``name`` when it finished with the same weights, settings,
        output and unchanged input, and its output still exists; else None."""
        prev = self.previous.get(name) or {}
        same = (prev.get("status") in _FINISHED and prev.get("weights_sha256") == weights_sha256
                and prev.get("settings_hash") == settings_hash
                and prev.get("output") == output and prev.get("input") == stamp)
        return prev if same and (self.path.parent / str(output)).exists() else None

    def write(self) -> None:
        """Write :attr:`data`, merged with the manifest as read (:meth:`merged`), under a
        temporary name, then rename it over the manifest."""
        tmp = self.path.with_name(f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:8]}-{self.path.name}")
        try:
            tmp.write_text(json.dumps(self.merged(), indent=2, default=str) + "\n",
                           encoding="utf-8")
            os.replace(tmp, self.path)
        finally:
            remove_path(tmp)
