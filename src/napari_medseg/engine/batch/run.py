"""Batch prediction over a folder: one label file per image, a manifest, resumable runs.

``run_folder_iter(in_dir, out_dir, config)`` is a generator of progress events (the same
types as :mod:`.progress`, plus :class:`FileEvent` per file) that *returns* a
:class:`BatchSummary`; its last event, a ``FinishedEvent``, carries the same summary.

What a run does, in order:

1. **Scan** ``in_dir`` (sub-folders too with ``recursive``) for names matching ``pattern``.
   Zarr stores and folders of DICOM files count as one image each. Hidden files, the output
   folder and our own temporary files are left out. A file whose kind napari-medseg does
   not read (a ``notes.txt``) is reported as ``ignored``; a file that claims to be an image
   but cannot be read (a truncated TIFF, text named ``.tif``) is a ``failed`` file, and the
   rest of the run goes on.
2. **Skip** what an earlier run finished: a file is skipped when ``run.json`` records it as
   finished with the same weights (sha256) and settings, the input is unchanged (size and
   modification time) and its output file exists. ``force`` predicts everything again.
3. **Predict** each remaining file and write ``<name>_<output><suffix>`` in the same
   relative place under ``out_dir``. The output is written under a temporary name
   (``.~partial-...``) and renamed once complete, so a file that looks finished is
   finished; a cancelled or failed file leaves nothing behind.
4. **Record**: ``run.json`` in ``out_dir`` (weights, settings, per-file status, timing and
   errors, counts, one entry per run in ``runs``) is rewritten atomically after every file.

Where the work runs:

* in this process, one file after the other (default; tile progress and cancel reach into
  each file);
* ``workers > 1``: that many threads of this process, each with its own copy of the model;
* ``dask_local = N``: a ``dask.distributed`` LocalCluster of N worker processes on the
  loopback interface (one thread each, no dashboard), closed at the end;
* ``scheduler = "tcp://HOST:PORT"``: an existing Dask cluster. Its workers need
  napari-medseg installed and must see ``in_dir``/``out_dir`` at the same paths (a shared
  file system) and the weights (a shipped tag, or a checkpoint path they can read).

Each worker (thread) loads the model once and keeps it for the following files (a cache
per thread, keyed by the weights' sha256). Files are submitted as tasks, results gathered as
they complete, and the manifest is only ever written here, by the driver. On a Dask cluster,
cancel drops the files not yet started; a file already running on a worker cannot be
interrupted, is recorded as cancelled and predicted again by the next run. Two runs must not
share an output folder at the same time (a run removes the temporary files it finds).

Each image's outputs are held in memory until written (one image at a time per worker).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import fnmatch
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..._version import __version__
from ...config import BATCH_FORMATS, BatchConfig, PredictConfig
from ...errors import CheckpointError, ConfigError, ImageReadError, MedsegError
from ...io.detect import SUFFIXES, dicom_files_in, is_dicom_file, is_supported, is_zarr_dir
from ...io.metadata import output_meta
from ..progress import (
    drain,
    CancelledEvent,
    CancelToken,
    FinishedEvent,
    NoticeEvent,
    ProgressEvent,
    StageEvent,
    TilesEvent,
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

#: The manifest's file name inside the output folder.
MANIFEST_NAME = "run.json"
#: The manifest's ``format`` value.
MANIFEST_FORMAT = "napari-medseg-batch-run"
MANIFEST_VERSION = 1
#: Temporary outputs start with this; they are never taken for finished files.
PARTIAL_PREFIX = ".~partial-"
#: Every status a file can have, in the manifest and in :class:`FileEvent`.
STATUSES = ("pending", "running", "done", "skipped", "failed", "ignored", "cancelled")
_FINISHED = ("done", "skipped")
#: PredictConfig fields that change how fast a file runs, not what it gives; a change in
#: them does not make an earlier run's outputs stale.
_EXECUTION_ONLY = ("device", "batch_size", "channels_last", "store", "resume", "overwrite",
                   "oom_fallback")
_POLL_S = 0.1


# --- events and results ---------------------------------------------------------------


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
        return {n: str(e.get("error")) for n, e in self.files.items() if e.get("status") == "failed"}

    def line(self) -> str:
        """One line for a person: counts and time."""
        parts = [f"{self.done} predicted", f"{self.skipped} skipped (finished earlier)",
                 f"{self.failed} failed"]
        if self.ignored:
            parts.append(f"{self.ignored} ignored (not images)")
        if self.was_cancelled:
            parts.append(f"{self.cancelled} not run (cancelled)")
        return f"{self.total} image(s): " + ", ".join(parts) + f" in {self.seconds:.1f} s."


# --- weights -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsSource:
    """Where a worker gets the model from; small and picklable.

    Attributes:
        source: a shipped weights tag or an absolute checkpoint path; None for random weights.
        sha256: the weights' sha256 (for random weights, of the seeded state dict); a worker
            that loads anything else fails instead of predicting with other weights.
        network: for random weights, the registry name.
        variant: for random weights, the variant.
        in_channels: for random weights.
        num_classes: for random weights.
        seed: for random weights, the torch seed (every worker builds the same network).
    """

    source: str | None
    sha256: str
    network: str | None = None
    variant: str | None = None
    in_channels: int = 1
    num_classes: int = 2
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``weights`` entry."""
        out: dict[str, Any] = {"source": self.source, "sha256": self.sha256,
                               "random": self.source is None}
        if self.source is None:
            out.update(network=self.network, variant=self.variant, in_channels=self.in_channels,
                       num_classes=self.num_classes, seed=self.seed)
        return out


def _state_sha256(model) -> str:
    """sha256 of a model's state dict (names and raw bytes, in name order)."""
    import torch

    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        t = value.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def _build_random(src: WeightsSource):
    import torch

    from ...models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(src.seed)
        model = create_model(str(src.network), str(src.variant), src.in_channels,
                             src.num_classes)
    model.eval()
    return model


def _load_model(src: WeightsSource):
    """Load (or, for random weights, build) the model and check its sha256."""
    if src.source is None:
        model = _build_random(src)
        sha = _state_sha256(model)
    else:
        from ..checkpoints import resolve_weights

        model, info = resolve_weights(src.source, device="cpu")
        sha = info.sha256 or ""
    if sha != src.sha256:
        raise CheckpointError(
            f"The weights this worker loaded ({src.source or src.network}) differ from the "
            "run's (sha256 mismatch); give the workers the same weights file.")
    return model


_LOCAL = threading.local()
_LOAD_LOCK = threading.Lock()


def _worker_model(src: WeightsSource) -> tuple[Any, bool]:
    """This thread's model for ``src``: loaded on first use, then kept.

    One model per thread: prediction switches the model's mode and device, so threads must
    not share one. Returns ``(model, loaded_now)``.
    """
    cached = getattr(_LOCAL, "model", None)
    if cached is not None and cached[0] == src:
        return cached[1], False
    _LOCAL.model = None  # drop the previous run's model before loading another
    with _LOAD_LOCK:  # one load at a time: loading is I/O and memory bound
        model = _load_model(src)
    _LOCAL.model = (src, model)
    return model, True


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}"


# --- scanning ------------------------------------------------------------------------------


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


def _strip_suffix(name: str) -> str:
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
            if is_zarr_dir(entry) or entry.name.lower().endswith(".zarr") or dicom_files_in(
                    entry, limit=1):
                if _matches(rel, entry.name, pattern):
                    found.append((rel, entry, None))
            elif recursive and not entry.is_symlink():  # no loops through links
                _scan(entry, root, pattern, recursive, exclude, found)
            continue
        if not _matches(rel, entry.name, pattern):
            continue
        if folder == root and (entry.suffix.lower() in (".dcm", ".dicom") or is_dicom_file(entry)):
            found.append((rel, entry, "a loose DICOM file; put each DICOM series in its own "
                                      "folder, which is read as one image"))
        elif not is_supported(entry):
            found.append((rel, entry, "not an image format napari-medseg reads"))
        else:
            found.append((rel, entry, None))


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
    suffix = BATCH_FORMATS[format]
    planned: dict[str, list[int]] = {}
    outs: list[str | None] = []
    for i, (rel, path, reason) in enumerate(found):
        if reason is not None:
            outs.append(None)
            continue
        parent = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
        out = f"{parent}{_strip_suffix(path.name)}_{output}{suffix}"
        outs.append(out)
        planned.setdefault(out.lower(), []).append(i)
    for clashing in planned.values():
        if len(clashing) > 1:
            for i in clashing:
                rel, path, _ = found[i]
                parent = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
                outs[i] = f"{parent}{path.name}_{output}{suffix}"
    return [ImageItem(rel, path, out, reason)
            for (rel, path, reason), out in zip(found, outs)]


# --- one file ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileTask:
    """Everything a worker needs to predict one file; small and picklable.

    Attributes:
        name: the input's relative name (for messages).
        input_path: absolute input path.
        output_path: absolute output path.
        format: ``tif``, ``zarr`` or ``nii``.
        output: the label output written (``mask``, ``instances``, ``boundary``).
        predict: the prediction settings (``outputs`` holds ``output``, no store).
        weights: where the model comes from.
    """

    name: str
    input_path: str
    output_path: str
    format: str
    output: str
    predict: PredictConfig
    weights: WeightsSource


_WRITE_FORMAT = {"tif": "tiff", "zarr": "zarr", "nii": "nifti"}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, MedsegError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "Out of memory while predicting this file; try a smaller tile or batch size."
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"Unexpected {type(exc).__name__}" + (f": {text}" if text else "") + "."


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _write_atomic(final: Path, labels, meta, fmt: str) -> None:
    """Write ``labels`` under a temporary name beside ``final``, then rename it."""
    from ...io import write_labels

    final.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = final.with_name(f"{PARTIAL_PREFIX}{token}-{final.name}")
    old = final.with_name(f"{PARTIAL_PREFIX}{token}-old-{final.name}")
    try:
        kwargs = {"name": _strip_suffix(final.name)} if fmt == "zarr" else {}
        write_labels(tmp, labels, meta, format=_WRITE_FORMAT[fmt], **kwargs)
        if final.is_dir() and not final.is_symlink():
            os.replace(final, old)  # a directory (zarr) cannot be replaced in one step
        os.replace(tmp, final)
    finally:
        _remove(tmp)
        _remove(old)


def _file_iter(task: FileTask, model, cancel: CancelToken) -> Generator[ProgressEvent, None, dict]:
    """Read, predict and write one file; yields the prediction's tile events.

    Returns the outcome (``status`` done, failed or cancelled, ``seconds``, ``error``,
    ``notices``, ``stats``); errors are caught and reported, never raised.
    """
    from ...io import read_image
    from ..inference.pipeline import predict_iter

    t0 = time.perf_counter()
    outcome: dict[str, Any] = {"name": task.name, "status": "failed", "error": None,
                               "notices": [], "stats": {}}
    try:
        image, meta = read_image(task.input_path)
        gen = predict_iter(image, model, task.predict, meta=meta, cancel=cancel)
        result = None
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                result = stop.value
                break
            if isinstance(event, (TilesEvent, NoticeEvent)):
                if isinstance(event, NoticeEvent):
                    event = NoticeEvent(message=f"{task.name}: {event.message}", level=event.level)
                yield event
        outcome["notices"] = list(result.notices)
        if result.cancelled:
            outcome["status"] = "cancelled"
        else:
            labels = np.asarray(result.outputs[task.output])
            in_axes = task.predict.axes or getattr(meta, "axes", None) or ""
            lmeta = output_meta(meta, in_axes, tuple(image.shape), result.axes[task.output],
                                tuple(labels.shape))
            _write_atomic(Path(task.output_path), labels, lmeta, task.format)
            outcome["status"] = "done"
            keep = ("device", "precision", "tile", "forward_passes", "z_consistency")
            outcome["stats"] = {k: result.stats[k] for k in keep if k in result.stats}
            outcome["stats"]["shape"] = list(image.shape)
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the run
        outcome["status"] = "failed"
        outcome["error"] = _describe(exc)
    outcome["seconds"] = round(time.perf_counter() - t0, 4)
    return outcome


def process_file(task: FileTask, cancel: CancelToken | None = None) -> dict:
    """Predict one file in a worker (a Dask task or a thread): never raises.

    The model comes from this thread's cache (loaded on the first file). Returns the
    outcome dict of one file, with ``worker`` (host:pid:thread) and ``loaded`` (True when
    this call loaded the model).
    """
    t0 = time.perf_counter()
    try:
        model, loaded = _worker_model(task.weights)
    except Exception as exc:  # noqa: BLE001
        return {"name": task.name, "status": "failed", "error": _describe(exc),
                "seconds": round(time.perf_counter() - t0, 4), "worker": _worker_id(),
                "loaded": False, "notices": [], "stats": {}}
    gen = _file_iter(task, model, cancel if cancel is not None else CancelToken())
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            outcome = stop.value
            break
    outcome["worker"] = _worker_id()
    outcome["loaded"] = loaded
    return outcome


# --- the manifest ---------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def settings_of(config: BatchConfig) -> dict[str, Any]:
    """The settings that decide what a run writes (``run.json``'s ``settings``).

    Everything of the prediction except how fast it runs (device, batch size ...), plus the
    output and its format.
    """
    pred = _predict_config(config).to_dict()
    for key in _EXECUTION_ONLY:
        pred.pop(key, None)
    return {"output": config.output, "format": config.format, "predict": pred}


def _settings_hash(settings: dict) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _predict_config(config: BatchConfig) -> PredictConfig:
    return config.predict.replace(outputs=(config.output,), store=None)


def _input_stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": int(st.st_size) if path.is_file() else -1, "mtime_ns": int(st.st_mtime_ns)}


class _Manifest:
    """``run.json``: read at the start, changed and rewritten atomically after every file."""

    def __init__(self, path: Path, notices: list[str]) -> None:
        self.path = path
        self.previous: dict[str, dict] = {}
        self.runs: list[dict] = []
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
                    raise ValueError
                self.previous = dict(data.get("files") or {})
                self.runs = list(data.get("runs") or [])
            except (ValueError, OSError):
                notices.append(f"The manifest {path} is not readable; starting a new one "
                               "(every file is predicted again).")
        self.data: dict[str, Any] = {}

    def write(self) -> None:
        tmp = self.path.with_name(f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:8]}-{self.path.name}")
        try:
            tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)
        finally:
            _remove(tmp)


# --- executors ------------------------------------------------------------------------------


def _run_serial(tasks: list[FileTask], model, cancel: CancelToken,
                record: Callable[[dict], FileEvent],
                running: Callable[[str], FileEvent]) -> Generator[ProgressEvent, None, None]:
    for task in tasks:
        if cancel.cancelled:
            return
        yield running(task.name)
        outcome = yield from _file_iter(task, model, cancel)
        outcome["worker"] = _worker_id()
        outcome["loaded"] = False
        yield record(outcome)


def _run_threads(tasks: list[FileTask], workers: int, cancel: CancelToken,
                 record: Callable[[dict], FileEvent],
                 running: Callable[[str], FileEvent]) -> Generator[ProgressEvent, None, None]:
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medseg-batch")
    stopped_early = True
    try:
        futures = {pool.submit(process_file, t, cancel): t for t in tasks}
        for task in tasks[:workers]:
            yield running(task.name)
        started = min(workers, len(tasks))
        pending = set(futures)
        while pending:
            if cancel.cancelled:
                for fut in pending:
                    fut.cancel()  # the running ones stop at their next batch of tiles
            done, pending = wait(pending, timeout=_POLL_S, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: futures[f].name):
                if fut.cancelled():
                    continue
                yield record(fut.result())
                if started < len(tasks) and not cancel.cancelled:
                    yield running(tasks[started].name)
                    started += 1
        stopped_early = False
    finally:
        if stopped_early:  # the caller dropped the run: stop the running files too
            cancel.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _dask_client(config: BatchConfig):
    """``(client, cluster, executor info)`` for the configured Dask scheduler."""
    try:
        import distributed
    except ImportError:
        raise ConfigError("Dask runs need the distributed package: pip install "
                          "'napari-medseg[cluster]'.") from None
    import logging

    if config.scheduler:
        try:
            client = distributed.Client(config.scheduler, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"Cannot reach the Dask scheduler at {config.scheduler} "
                              f"({exc}).") from None
        n = len(client.scheduler_info().get("workers", {}))
        return client, None, {"kind": "dask", "scheduler": config.scheduler, "workers": n}
    cluster = distributed.LocalCluster(
        n_workers=int(config.dask_local or 1), threads_per_worker=1, processes=True,
        host="127.0.0.1", dashboard_address=None, silence_logs=logging.ERROR)
    try:
        client = distributed.Client(cluster)
    except Exception:
        cluster.close()
        raise
    return client, cluster, {"kind": "dask-local", "workers": int(config.dask_local or 1),
                             "scheduler": cluster.scheduler_address}


def _run_dask(tasks: list[FileTask], client, cancel: CancelToken,
              record: Callable[[dict], FileEvent]) -> Generator[ProgressEvent, None, None]:
    import distributed

    run_id = uuid.uuid4().hex[:8]
    futures = {client.submit(process_file, t, key=f"medseg-batch-{run_id}-{i}", pure=False): t
               for i, t in enumerate(tasks)}
    ac = distributed.as_completed(list(futures))
    pending = set(futures)
    while pending:
        if cancel.cancelled:
            client.cancel(list(pending))
            return
        if not ac.has_ready():
            time.sleep(_POLL_S)
            continue
        for fut in ac.next_batch(block=False):
            pending.discard(fut)
            task = futures[fut]
            try:
                outcome = fut.result()
            except Exception as exc:  # noqa: BLE001 - a lost worker, a killed task
                outcome = {"name": task.name, "status": "failed", "error": _describe(exc),
                           "seconds": None, "worker": None, "loaded": False}
            yield record(outcome)


# --- the run ----------------------------------------------------------------------------------


def _config(config: BatchConfig | dict | None, settings: dict) -> BatchConfig:
    if config is None:
        config = BatchConfig()
    elif not isinstance(config, BatchConfig):
        config = BatchConfig.from_mapping(config)
    if settings:
        config = BatchConfig.from_mapping({**config.to_dict(), "predict": config.predict,
                                           **settings})
    return config


def _weights(config: BatchConfig) -> tuple[WeightsSource, Any, list[NoticeEvent]]:
    """Resolve the weights once in the driver: ``(source, model, notices)``."""
    notices: list[NoticeEvent] = []
    if config.weights:
        from ..checkpoints import checkpoint_paths, resolve_weights

        model, info = resolve_weights(config.weights, device="cpu")
        weights_path, json_path = checkpoint_paths(config.weights)
        is_path = weights_path.is_file() or json_path.is_file()
        source = str(Path(config.weights).expanduser().resolve()) if is_path else config.weights
        return WeightsSource(source=source, sha256=str(info.sha256 or "")), model, notices
    if not config.model:
        raise ConfigError("Give the weights (a shipped tag, see `napari-medseg models`, or a "
                          "checkpoint path), or a model name to test with random weights.")
    src = WeightsSource(source=None, sha256="", network=config.model, variant=config.variant,
                        in_channels=config.in_channels, num_classes=config.num_classes)
    model = _build_random(src)
    src = WeightsSource(**{**src.__dict__, "sha256": _state_sha256(model)})
    notices.append(NoticeEvent(
        message=f"No trained weights: {config.model}/{config.variant} has RANDOM weights, "
                "so its masks are meaningless; use this only to test a pipeline.",
        level="warning"))
    return src, model, notices


def _clean_partials(out_dir: Path) -> int:
    """Remove the temporary outputs an interrupted run left; returns how many.

    Zarr stores (finished outputs) are not walked into: their chunks are many.
    """
    n = 0
    for folder, dirs, names in os.walk(out_dir):
        for name in [d for d in dirs if d.startswith(PARTIAL_PREFIX)] + [
                f for f in names if f.startswith(PARTIAL_PREFIX)]:
            _remove(Path(folder) / name)
            n += 1
        dirs[:] = [d for d in dirs if not d.startswith(PARTIAL_PREFIX)
                   and not d.lower().endswith(".zarr")]
    return n


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
            unreachable scheduler.
        ImageReadError: the input folder does not exist.
        WeightsNotFoundError, CheckpointError: the weights cannot be loaded.
    """
    config = _config(config, settings)
    cancel = cancel if cancel is not None else CancelToken()
    t0 = time.perf_counter()
    started = _now()
    root = Path(in_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    if root == out:
        raise ConfigError("The output folder must differ from the input folder.")
    if not root.is_dir():
        raise ImageReadError(f"The input folder {root} does not exist or is not a folder.")
    pconfig = _predict_config(config)

    yield StageEvent(message=f"Looking for images in {root}.", stage="scanning")
    items = find_images(root, config.pattern, config.recursive, out, config.format,
                        config.output)
    images = [it for it in items if it.reason is None]
    src, model, weight_notices = _weights(config)
    for notice in weight_notices:
        yield notice
    out.mkdir(parents=True, exist_ok=True)
    _clean_partials(out)
    notes: list[str] = []
    manifest = _Manifest(out / MANIFEST_NAME, notes)
    for note in notes:
        yield NoticeEvent(message=note, level="warning")
    settings_d = settings_of(config)
    shash = _settings_hash(settings_d)

    files: dict[str, dict] = {}
    index = {it.name: i for i, it in enumerate(images)}
    todo: list[ImageItem] = []
    skipped = 0
    for it in items:
        if it.reason is not None:
            files[it.name] = {"status": "ignored", "error": it.reason, "output": None}
            continue
        stamp = _input_stamp(it.path)
        prev = manifest.previous.get(it.name) or {}
        finished_before = (
            not config.force and prev.get("status") in _FINISHED
            and prev.get("weights_sha256") == src.sha256 and prev.get("settings_hash") == shash
            and prev.get("output") == it.output and prev.get("input") == stamp
            and (out / str(it.output)).exists())
        if finished_before:
            files[it.name] = {**prev, "status": "skipped"}
            skipped += 1
        else:
            files[it.name] = {"status": "pending", "output": it.output, "input": stamp,
                              "seconds": None, "error": None}
            todo.append(it)

    executor: dict[str, Any] = {"kind": "local", "workers": 1}
    if config.scheduler or config.dask_local:
        executor = {"kind": "dask-local" if config.dask_local else "dask",
                    "workers": config.dask_local, "scheduler": config.scheduler}
        if config.workers > 1:
            yield NoticeEvent(message=f"workers={config.workers} is ignored on Dask: each "
                                      "worker thread of the cluster runs one file at a time.")
    elif config.workers > 1:
        executor = {"kind": "threads", "workers": config.workers}
    counts = {"done": 0, "failed": 0, "model_loads": 1 if executor["kind"] == "local" else 0}

    def summary_counts() -> dict[str, int]:
        status = [f["status"] for f in files.values()]
        return {"total": len(images), "done": counts["done"], "skipped": skipped,
                "failed": counts["failed"], "ignored": status.count("ignored"),
                "pending": status.count("pending") + status.count("running"),
                "cancelled": status.count("cancelled")}

    def save(state: str) -> None:
        manifest.data = {
            "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION,
            "plugin_version": __version__, "input_dir": str(root), "output_dir": str(out),
            "pattern": config.pattern, "recursive": config.recursive,
            "weights": src.to_dict(), "settings": settings_d, "settings_hash": shash,
            "config": config.to_dict(), "executor": executor, "state": state,
            "started": started, "updated": _now(),
            "seconds": round(time.perf_counter() - t0, 3),
            "skipped": skipped, "summary": summary_counts(),
            "model_loads": counts["model_loads"], "files": files,
            "runs": manifest.runs + [{
                "started": started, "state": state, "executor": executor,
                **summary_counts(), "seconds": round(time.perf_counter() - t0, 3)}],
        }
        manifest.write()

    def finished() -> int:
        return skipped + counts["done"] + counts["failed"]

    def event(name: str) -> FileEvent:
        entry = files[name]
        out_rel = entry.get("output")
        return FileEvent(
            message=f"{name}: {entry['status']}" + (f" ({entry['error']})" if entry.get(
                "error") else ""),
            name=name, status=entry["status"], index=index.get(name, -1), total=len(images),
            finished=finished(), seconds=entry.get("seconds"), error=entry.get("error"),
            input_path=str(root / name), output_path=str(out / out_rel) if out_rel else None)

    def running(name: str) -> FileEvent:
        if files[name]["status"] == "pending":  # never over a result already recorded
            files[name]["status"] = "running"
        return event(name)

    def record(outcome: dict) -> FileEvent:
        name = outcome["name"]
        entry = files[name]
        status = outcome.get("status", "failed")
        entry.update(status=status, seconds=outcome.get("seconds"), error=outcome.get("error"),
                     worker=outcome.get("worker"), finished=_now(),
                     notices=list(outcome.get("notices") or []),
                     stats=dict(outcome.get("stats") or {}))
        if status == "done":
            counts["done"] += 1
            entry.update(weights_sha256=src.sha256, settings_hash=shash)
        elif status == "failed":
            counts["failed"] += 1
        if outcome.get("loaded"):
            counts["model_loads"] += 1
        save("running")
        return event(name)

    for it in items:
        yield event(it.name)
    if skipped:
        yield NoticeEvent(message=f"Skipped {skipped} file(s) an earlier run finished with the "
                                  "same weights and settings.")
    ignored = sum(it.reason is not None for it in items)
    if not images:
        yield NoticeEvent(message=f"No images matching {config.pattern!r} in {root}.",
                          level="warning")
    save("running")

    tasks = [FileTask(name=it.name, input_path=str(it.path), output_path=str(out / str(it.output)),
                      format=config.format, output=config.output, predict=pconfig, weights=src)
             for it in todo]
    if tasks:
        yield StageEvent(message=f"Predicting {len(tasks)} image(s) "
                                 f"({executor['kind']}).", stage="predicting")
    client = cluster = None
    completed = False
    try:
        if not tasks:
            pass
        elif executor["kind"] in ("dask", "dask-local"):
            client, cluster, executor = _dask_client(config)
            yield from _run_dask(tasks, client, cancel, record)
        elif executor["kind"] == "threads":
            yield from _run_threads(tasks, config.workers, cancel, record, running)
        else:
            yield from _run_serial(tasks, model, cancel, record, running)
        completed = True
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close()
        was_cancelled = cancel.cancelled and any(
            f["status"] in ("pending", "running", "cancelled") for f in files.values())
        for entry in files.values():
            if entry["status"] in ("pending", "running"):
                entry["status"] = "cancelled" if cancel.cancelled else "pending"
        save("cancelled" if was_cancelled else "finished" if completed else "interrupted")

    summary = BatchSummary(
        input_dir=str(root), output_dir=str(out), manifest=str(manifest.path),
        total=len(images), done=counts["done"], skipped=skipped, failed=counts["failed"],
        ignored=ignored, cancelled=sum(f["status"] == "cancelled" for f in files.values()),
        was_cancelled=was_cancelled, seconds=round(time.perf_counter() - t0, 3),
        model_loads=counts["model_loads"], executor=executor, files=copy.deepcopy(files))
    if was_cancelled:
        for it in images:
            if files[it.name]["status"] == "cancelled":
                yield event(it.name)
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
