"""Batch prediction over a folder: one label file per image, a manifest, resumable runs.

``run_folder_iter(in_dir, out_dir, config)`` is a generator of progress events (the same
types as :mod:`..progress`, plus :class:`FileEvent` per file) that *returns* a
:class:`BatchSummary`; its last event, a ``FinishedEvent``, carries the same summary.

What a run does, in order:

1. **Scan** ``in_dir`` (:func:`~.scan.find_images`; sub-folders too with ``recursive``) for
   names matching ``pattern``. A file whose kind napari-medseg does not read is reported as
   ``ignored``; a file that claims to be an image but cannot be read is a ``failed`` file,
   and the rest of the run goes on.
2. **Skip** what an earlier run finished (:class:`~.manifest.Manifest`): same weights
   (sha256) and settings, the input unchanged (size and modification time) and its output
   there. ``force`` predicts everything again.
3. **Predict** each remaining file (:mod:`.task`) and write ``<name>_<output><suffix>`` in the
   same relative place under ``out_dir``, under a temporary name renamed once complete; a
   cancelled or failed file leaves nothing behind. The files run in this process, on threads
   or on a Dask cluster (:mod:`.executors`).
4. **Record**: ``run.json`` in ``out_dir`` (weights, settings, per-file status, timing and
   errors, counts, one entry per run in ``runs``) is rewritten atomically after every file,
   by the driver only, and merged with what it held when the run started (entries of
   other files are kept).
   One run per output folder at a time: a second run is refused while the first holds the
   folder's lock (:mod:`.lock`); a lock a killed run left is taken over.

Each image's outputs are held in memory until written (one image at a time per worker).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..._version import __version__
from ...config import BatchConfig
from ...errors import ConfigError, ImageReadError
from ..progress import (
    CancelledEvent,
    CancelToken,
    FinishedEvent,
    NoticeEvent,
    ProgressEvent,
    StageEvent,
    drain,
)
from . import executors
from .lock import RunLock
from .manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    Manifest,
    clean_partials,
    input_stamp,
    run_predict_config,
    settings_hash,
    settings_of,
    utc_now,
)
from .outputs import check_batch_outputs, check_not_inputs, check_output_folder
from .scan import ImageItem, find_images
from .task import (
    PARTIAL_PREFIX,
    FileTask,
    WeightsSource,
    process_file,
    resolve_run_weights,
)

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_FORMAT",
    "PARTIAL_PREFIX",
    "STATUSES",
    "FileEvent",
    "BatchSummary",
    "WeightsSource",
    "FileTask",
    "ImageItem",
    "find_images",
    "settings_of",
    "process_file",
    "run_folder_iter",
    "run_folder",
]

#: Every status a file can have, in the manifest and in :class:`FileEvent`.
STATUSES = ("pending", "running", "done", "skipped", "failed", "ignored", "cancelled")


@dataclass(frozen=True)
class FileEvent(ProgressEvent):
    """The status of one file changed.

    Attributes:
        name: the file's path relative to the input folder (``"sub/a.tif"``).
        status: one of :data:`STATUSES`.
        index: the file's position in the run (0-based, sorted by name; -1 for an ignored
            file).
        total: number of images in the run (ignored files not counted).
        finished: images finished so far (done, skipped or failed).
        seconds: time the file took (read, predict, write), when finished.
        error: one sentence saying why it failed or was ignored.
        input_path: the input's absolute path.
        output_path: the output's absolute path (written only when ``status`` is ``done``
            or ``skipped``).
    """

    name: str = ""
    status: str = "pending"
    index: int = 0
    total: int = 0
    finished: int = 0
    seconds: float | None = None
    error: str | None = None
    input_path: str = ""
    output_path: str | None = None


@dataclass(frozen=True)
class BatchSummary:
    """What a batch run did.

    Attributes:
        input_dir: the folder read.
        output_dir: the folder written.
        manifest: path of ``run.json``.
        total: images found (ignored files not counted).
        done: images predicted in this run.
        skipped: images an earlier run had finished.
        failed: images that could not be read, predicted or written.
        ignored: files that are not images napari-medseg reads.
        cancelled: images left unfinished because the run was cancelled.
        was_cancelled: True when the run was cancelled.
        seconds: wall time of the run.
        model_loads: how many times a worker loaded the model.
        executor: where it ran (``kind``: ``local``, ``threads``, ``dask-local``, ``dask``).
        files: name -> manifest entry (status, output, seconds, error, worker ...).
    """

    input_dir: str
    output_dir: str
    manifest: str
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    ignored: int = 0
    cancelled: int = 0
    was_cancelled: bool = False
    seconds: float = 0.0
    model_loads: int = 0
    executor: dict = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no file failed and the run was not cancelled."""
        return self.failed == 0 and not self.was_cancelled

    @property
    def failures(self) -> dict[str, str]:
        """Failed file name -> error sentence."""
        return {n: str(e.get("error")) for n, e in self.files.items()
                if e.get("status") == "failed"}

    def line(self) -> str:
        """One line for a person: counts and time."""
        parts = [f"{self.done} predicted", f"{self.skipped} skipped (finished earlier)",
                 f"{self.failed} failed"]
        if self.ignored:
            parts.append(f"{self.ignored} ignored (not images)")
        if self.was_cancelled:
            parts.append(f"{self.cancelled} not run (cancelled)")
        return f"{self.total} image(s): " + ", ".join(parts) + f" in {self.seconds:.1f} s."


class _Ledger:
    """One run's state: every file's manifest entry, the counts, and the manifest writes.

    Args:
        root: the input folder.
        out: the output folder.
        config: the run's settings.
        weights: the run's weights.
        manifest: the output folder's manifest (read).
        items: what the scan found.
        t0: ``time.perf_counter()`` when the run started.
        started: the start time for the manifest.
    """

    def __init__(self, root: Path, out: Path, config: BatchConfig, weights: WeightsSource,
                 manifest: Manifest, items: list[ImageItem], t0: float, started: str) -> None:
        self.root, self.out, self.config, self.weights = root, out, config, weights
        self.manifest = manifest
        self.t0, self.started = t0, started
        self.run_id = uuid.uuid4().hex[:12]
        self.settings = settings_of(config)
        self.settings_hash = settings_hash(self.settings)
        self.images = [it for it in items if it.reason is None]
        self.index = {it.name: i for i, it in enumerate(self.images)}
        self.files: dict[str, dict] = {}
        self.executor, self.notices = executors.executor_of(config)
        self.counts = {"done": 0, "failed": 0, "skipped": 0,
                       "model_loads": 1 if self.executor["kind"] == "local" else 0}
        self.todo = [it for it in items if self._plan(it)]

    def _plan(self, it: ImageItem) -> bool:
        """Enter ``it`` as ignored, skipped (finished earlier) or pending; True to predict."""
        if it.reason is not None:
            self.files[it.name] = {"status": "ignored", "error": it.reason, "output": None}
            return False
        stamp = input_stamp(it.path)
        prev = None if self.config.force else self.manifest.finished_before(
            it.name, it.output, stamp, self.weights.sha256, self.settings_hash)
        if prev is not None:
            self.files[it.name] = {**prev, "status": "skipped"}
            self.counts["skipped"] += 1
            return False
        self.files[it.name] = {"status": "pending", "output": it.output, "input": stamp,
                               "seconds": None, "error": None}
        return True

    def _seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 3)

    def summary_counts(self) -> dict[str, int]:
        """The manifest's ``summary``: images per status."""
        status = [f["status"] for f in self.files.values()]
        return {"total": len(self.images), "done": self.counts["done"],
                "skipped": self.counts["skipped"], "failed": self.counts["failed"],
                "ignored": status.count("ignored"),
                "pending": status.count("pending") + status.count("running"),
                "cancelled": status.count("cancelled")}

    def save(self, state: str) -> None:
        """Rewrite the manifest with the run in ``state`` (running, finished ...)."""
        config, counts = self.config, self.summary_counts()
        self.manifest.data = {
            "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION,
            "plugin_version": __version__, "input_dir": str(self.root),
            "output_dir": str(self.out), "pattern": config.pattern,
            "recursive": config.recursive, "weights": self.weights.to_dict(),
            "settings": self.settings, "settings_hash": self.settings_hash,
            "config": config.to_dict(), "executor": self.executor, "state": state,
            "started": self.started, "updated": utc_now(), "seconds": self._seconds(),
            "skipped": self.counts["skipped"], "summary": counts,
            "model_loads": self.counts["model_loads"], "files": self.files,
            "runs": self.manifest.runs + [{"run_id": self.run_id, "started": self.started,
                                           "state": state, "executor": self.executor,
                                           **counts, "seconds": self._seconds()}],
        }
        self.manifest.write()

    def event(self, name: str) -> FileEvent:
        """The event of ``name``'s current entry."""
        entry = self.files[name]
        out_rel = entry.get("output")
        error = entry.get("error")
        return FileEvent(
            message=f"{name}: {entry['status']}" + (f" ({error})" if error else ""),
            name=name, status=entry["status"], index=self.index.get(name, -1),
            total=len(self.images),
            finished=self.counts["skipped"] + self.counts["done"] + self.counts["failed"],
            seconds=entry.get("seconds"), error=error, input_path=str(self.root / name),
            output_path=str(self.out / out_rel) if out_rel else None)

    def running(self, name: str) -> FileEvent:
        """``name`` started (a result already recorded is kept)."""
        if self.files[name]["status"] == "pending":
            self.files[name]["status"] = "running"
        return self.event(name)

    def record(self, outcome: dict) -> FileEvent:
        """A file ended with ``outcome`` (of :func:`~.task.file_iter`): enter it and save."""
        name = outcome["name"]
        entry = self.files[name]
        status = outcome.get("status", "failed")
        entry.update(status=status, seconds=outcome.get("seconds"), error=outcome.get("error"),
                     worker=outcome.get("worker"), finished=utc_now(),
                     notices=list(outcome.get("notices") or []),
                     stats=dict(outcome.get("stats") or {}))
        if status == "done":
            self.counts["done"] += 1
            entry.update(weights_sha256=self.weights.sha256, settings_hash=self.settings_hash)
        elif status == "failed":
            self.counts["failed"] += 1
        if outcome.get("loaded"):
            self.counts["model_loads"] += 1
        self.save("running")
        return self.event(name)

    def close(self, cancelled: bool, completed: bool) -> bool:
        """End the run: files not finished become cancelled (or stay pending after an
        error); saves the final state. Returns True when the run counts as cancelled."""
        was_cancelled = cancelled and any(
            f["status"] in ("pending", "running", "cancelled") for f in self.files.values())
        for entry in self.files.values():
            if entry["status"] in ("pending", "running"):
                entry["status"] = "cancelled" if cancelled else "pending"
        self.save("cancelled" if was_cancelled else "finished" if completed else "interrupted")
        return was_cancelled

    def summary(self, was_cancelled: bool) -> BatchSummary:
        """The run's :class:`BatchSummary`."""
        counts = self.summary_counts()
        return BatchSummary(
            input_dir=str(self.root), output_dir=str(self.out),
            manifest=str(self.manifest.path), total=len(self.images), done=counts["done"],
            skipped=counts["skipped"], failed=counts["failed"], ignored=counts["ignored"],
            cancelled=counts["cancelled"], was_cancelled=was_cancelled,
            seconds=self._seconds(), model_loads=self.counts["model_loads"],
            executor=self.executor, files=copy.deepcopy(self.files))


def _config(config: BatchConfig | dict | None, settings: dict) -> BatchConfig:
    if config is None:
        config = BatchConfig()
    elif not isinstance(config, BatchConfig):
        config = BatchConfig.from_mapping(config)
    if settings:
        config = BatchConfig.from_mapping({**config.to_dict(), "predict": config.predict,
                                           **settings})
    return config


def _folders(in_dir: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    root = Path(in_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    if root == out:
        raise ConfigError("The output folder must differ from the input folder.")
    if not root.is_dir():
        raise ImageReadError(f"The input folder {root} does not exist or is not a folder.")
    return root, out


def _open_iter(
    root: Path, out: Path, config: BatchConfig, items: list[ImageItem], t0: float, started: str,
    lock: RunLock,
) -> Generator[ProgressEvent, None, tuple[_Ledger, Any]]:
    """Load the weights, take the output folder's ``lock``, read the manifest and enter every
    file; returns the ledger and the driver's model."""
    from ..inference.pipeline import with_weights_defaults

    weights, model, notices = resolve_run_weights(config)
    # what the weights decide (flip TTA) is recorded as decided, so the manifest says what
    # every file got and a run with other settings is not taken for this one
    config = dataclasses.replace(config, predict=with_weights_defaults(config.predict, model))
    yield from notices
    # Before anything is made: a file or an unwritable folder, or a folder inside an input
    # (a zarr store, a DICOM series), which the manifest, an output, would be written into.
    check_output_folder(out)
    check_not_inputs([out / MANIFEST_NAME], [it.path for it in items if it.reason is None])
    out.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    for note in lock.notices:
        yield NoticeEvent(message=note, level="warning")
    clean_partials(out)
    manifest = Manifest(out / MANIFEST_NAME)
    for note in manifest.notices:
        yield NoticeEvent(message=note, level="warning")
    ledger = _Ledger(root, out, config, weights, manifest, items, t0, started)
    check_batch_outputs(out, items, ledger.todo,
                        [f.get("output") for f in manifest.previous.values()])
    yield from ledger.notices
    for it in items:
        yield ledger.event(it.name)
    if ledger.counts["skipped"]:
        yield NoticeEvent(message=f"Skipped {ledger.counts['skipped']} file(s) an earlier run "
                                  "finished with the same weights and settings.")
    if not ledger.images:
        yield NoticeEvent(message=f"No images matching {config.pattern!r} in {root}.",
                          level="warning")
    ledger.save("running")
    return ledger, model


def _execute_iter(
    ledger: _Ledger, model: Any, cancel: CancelToken
) -> Generator[ProgressEvent, None, bool]:
    """Predict the ledger's files on its executor; returns True when the run was cancelled."""
    config = ledger.config
    pconfig = run_predict_config(config)
    tasks = [FileTask(name=it.name, input_path=str(it.path),
                      outputs=((config.output, str(ledger.out / str(it.output))),),
                      predict=pconfig, weights=ledger.weights) for it in ledger.todo]
    kind = ledger.executor["kind"]
    if tasks:
        yield StageEvent(message=f"Predicting {len(tasks)} image(s) ({kind}).",
                         stage="predicting")
    completed = False
    try:
        if not tasks:
            pass
        elif kind in ("dask", "dask-local"):
            with executors.dask_client(config) as (client, info):
                ledger.executor = info
                yield from executors.run_dask(tasks, client, cancel, ledger.record)
        elif kind == "threads":
            yield from executors.run_threads(tasks, config.workers, cancel, ledger.record,
                                             ledger.running)
        else:
            yield from executors.run_serial(tasks, model, cancel, ledger.record, ledger.running)
        completed = True
    finally:
        was_cancelled = ledger.close(cancel.cancelled, completed)
    return was_cancelled


def run_folder_iter(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: BatchConfig | dict | None = None,
    *,
    cancel: CancelToken | None = None,
    **settings: Any,
) -> Generator[ProgressEvent, None, BatchSummary]:
    """Predict every image in ``in_dir`` into ``out_dir``, yielding progress events.

    Args:
        in_dir: the input folder.
        out_dir: the output folder (created; ``run.json`` is kept there). It must differ
            from ``in_dir``.
        config: a :class:`~napari_medseg.config.BatchConfig` or a mapping (batch fields and
            flat prediction settings).
        cancel: checked between files, and between batches of tiles inside a file (local
            runs); a cancelled run records what it finished and writes nothing half-done.
        **settings: overrides of ``config`` fields (``format="zarr"``, ``device="cpu"``...).

    Yields:
        ``StageEvent`` (scanning, predicting), ``NoticeEvent`` (random weights, skipped
        files, notices of each file's prediction), :class:`FileEvent` (each file: pending,
        skipped or ignored after the scan, then running and done/failed/cancelled),
        ``TilesEvent`` (local runs: tiles of the current file), ``CancelledEvent``, and last
        a ``FinishedEvent`` carrying the :class:`BatchSummary`.

    Returns:
        The :class:`BatchSummary` (its ``failed`` count is what a caller's exit status
        follows).

    Raises:
        ConfigError: invalid settings, no weights, the same input and output folder, an
            unreachable scheduler, another run writing into ``out_dir``.
        ImageReadError: the input folder does not exist.
        WeightsNotFoundError, CheckpointError: the weights cannot be loaded.
    """
    config = _config(config, settings)
    cancel = cancel if cancel is not None else CancelToken()
    t0, started = time.perf_counter(), utc_now()
    root, out = _folders(in_dir, out_dir)
    yield StageEvent(message=f"Looking for images in {root}.", stage="scanning")
    items = find_images(root, config.pattern, config.recursive, out, config.format,
                        config.output)
    lock = RunLock(out)
    try:
        ledger, model = yield from _open_iter(root, out, config, items, t0, started, lock)
        was_cancelled = yield from _execute_iter(ledger, model, cancel)
    finally:
        lock.release()
    summary = ledger.summary(was_cancelled)
    if was_cancelled:
        for it in ledger.images:
            if ledger.files[it.name]["status"] == "cancelled":
                yield ledger.event(it.name)
        yield CancelledEvent(message=f"Batch run cancelled; {summary.line()}")
    yield FinishedEvent(message=summary.line(), result=summary)
    return summary


def run_folder(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: BatchConfig | dict | None = None,
    *,
    cancel: CancelToken | None = None,
    **settings: Any,
) -> BatchSummary:
    """Run :func:`run_folder_iter` to the end and return its summary (same arguments)."""
    return drain(run_folder_iter(in_dir, out_dir, config, cancel=cancel, **settings))
