"""One file of a batch run: read it, predict it, write its outputs atomically.

The same step serves every executor of :mod:`.run` and the ``napari-medseg predict`` command:
:func:`predict_file_iter` predicts an image already read and writes the task's outputs, each
under a temporary name (:data:`PARTIAL_PREFIX`) renamed once complete, so a file that looks
finished is finished; :func:`file_iter` adds the reading and turns every error into the
file's outcome; :func:`process_file` runs it in a worker (a thread or a Dask task) with the
worker's own copy of the model, loaded once from a :class:`WeightsSource` and kept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...config import BatchConfig, PredictConfig
from ...errors import CheckpointError, ConfigError, ImageWriteError, MedsegError
from ...models.registry import state_sha256
from ..progress import (
    CancelToken,
    FinishedEvent,
    NoticeEvent,
    ProgressEvent,
    TilesEvent,
    drain,
)
from .scan import image_stem

__all__ = [
    "PARTIAL_PREFIX",
    "WeightsSource",
    "FileTask",
    "resolve_run_weights",
    "describe_error",
    "remove_path",
    "write_atomic",
    "written_paths",
    "write_outputs",
    "predict_file_iter",
    "file_iter",
    "process_file",
]

#: Temporary outputs start with this; they are never taken for finished files.
PARTIAL_PREFIX = ".~partial-"
#: Outputs written as label images; the others (probabilities, variance) as images.
_LABEL_OUTPUTS = ("mask", "boundary", "instances")
#: The prediction statistics a file's outcome keeps.
_KEPT_STATS = ("device", "precision", "tile", "forward_passes", "z_consistency")


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


def _build_random(src: WeightsSource):
    from ...models import create_model
    from ...models.working_resolution import on_input_grid

    model = on_input_grid(create_model(str(src.network), str(src.variant), src.in_channels,
                                       src.num_classes, seed=src.seed))
    model.eval()
    return model


def resolve_run_weights(config: BatchConfig) -> tuple[WeightsSource, Any, list[NoticeEvent]]:
    """Resolve a run's weights once, in the driver: ``(source, model, notices)``.

    Raises:
        ConfigError: neither weights nor a model name.
        WeightsNotFoundError, CheckpointError: the weights cannot be loaded.
    """
    if config.weights:
        from ..checkpoints import checkpoint_paths, resolve_weights
        from ..packages import is_package

        model, info = resolve_weights(config.weights, device="cpu")
        weights_path, json_path = checkpoint_paths(config.weights)
        is_path = weights_path.is_file() or json_path.is_file() or is_package(config.weights)
        source = str(Path(config.weights).expanduser().resolve()) if is_path else config.weights
        return WeightsSource(source=source, sha256=str(info.sha256 or "")), model, []
    if not config.model:
        raise ConfigError("Give the weights (a shipped tag, see `napari-medseg models`, or a "
                          "checkpoint path), or a model name to test with random weights.")
    src = WeightsSource(source=None, sha256="", network=config.model, variant=config.variant,
                        in_channels=config.in_channels, num_classes=config.num_classes)
    model = _build_random(src)
    src = WeightsSource(**{**src.__dict__, "sha256": state_sha256(model)})
    notice = NoticeEvent(
        message=f"No trained weights: {config.model}/{config.variant} has RANDOM weights, "
                "so its masks are meaningless; use this only to test a pipeline.",
        level="warning")
    return src, model, [notice]


def _load_model(src: WeightsSource):
    """Load (or, for random weights, build) the model and check its sha256."""
    if src.source is None:
        model = _build_random(src)
        sha = state_sha256(model)
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


# --- one file ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileTask:
    """Everything a worker needs to predict one file; small and picklable.

    Attributes:
        name: the input's name (for messages; relative to the input folder in a batch run).
        input_path: absolute input path.
        outputs: ``(output name, absolute path)`` of each output written; each path's suffix
            chooses its format (``.tif``, ``.nii.gz``, ``.zarr`` ...).
        predict: the prediction settings (``outputs`` holds the names above; with a
            ``store``, the outputs stream into it and nothing else is written).
        weights: where a worker gets the model (None when the caller passes the model).
    """

    name: str
    input_path: str
    outputs: tuple[tuple[str, str], ...]
    predict: PredictConfig
    weights: WeightsSource | None = None

    @property
    def output_path(self) -> str:
        """The first output's path (a batch run writes one)."""
        return self.outputs[0][1]


def describe_error(exc: BaseException) -> str:
    """One sentence for a failed file: the project's message, or what went wrong."""
    if isinstance(exc, MedsegError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "Out of memory while predicting this file; try a smaller tile or batch size."
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"Unexpected {type(exc).__name__}" + (f": {text}" if text else "") + "."


def remove_path(path: Path) -> None:
    """Remove a file or a folder (a zarr store); nothing when it is not there."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def write_atomic(final: Path, data: Any, meta: Any, labels: bool = True) -> Path:
    """Write ``data`` under a temporary name beside ``final``, then rename it into place.

    Args:
        final: the output path; its suffix chooses the format.
        data: the array.
        meta: its :class:`~napari_medseg.io.ImageMeta`.
        labels: write a label image (else an image).

    Returns:
        ``final``.

    Raises:
        ImageWriteError: the folder cannot be written or filled up (nothing is left behind).
    """
    from ...io import write_image, write_labels

    token = uuid.uuid4().hex[:8]
    tmp = final.with_name(f"{PARTIAL_PREFIX}{token}-{final.name}")
    old = final.with_name(f"{PARTIAL_PREFIX}{token}-old-{final.name}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"name": image_stem(final.name)} if final.name.lower().endswith(".zarr") else {}
        (write_labels if labels else write_image)(tmp, data, meta, **kwargs)
        if final.is_dir() and not final.is_symlink():
            os.replace(final, old)  # a directory (zarr) cannot be replaced in one step
        os.replace(tmp, final)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile
        if old.exists() and not final.exists():
            with contextlib.suppress(OSError):
                os.replace(old, final)  # the earlier output stays
        raise ImageWriteError(f"Could not write {final} ({exc.strerror or exc}); check the "
                              "output folder's free space and permissions.") from exc
    finally:
        remove_path(tmp)
        remove_path(old)
    return final


def _targets(task: FileTask, result) -> list[tuple[str, Path]]:
    """``(output name, path)`` of each output of ``result`` the task writes, in its order."""
    paths = dict(task.outputs)
    return [(name, Path(paths[name])) for name in result.outputs if name in paths]


def written_paths(task: FileTask, result) -> list[Path]:
    """Where ``result``'s outputs are: the store it streamed into, or each output's path."""
    from .staging import is_staging_store

    if result.store and not is_staging_store(result.store):
        return [Path(result.store)]
    return [path for _, path in _targets(task, result)]


def _lazy(array: Any) -> Any:
    """A numpy array as it is; a store's array as a dask array (written band by band)."""
    if isinstance(array, np.ndarray) or not hasattr(array, "chunks"):
        return np.asarray(array)
    if hasattr(array, "dask"):
        return array
    import dask.array as da

    return da.from_zarr(array)


def write_outputs(task: FileTask, result) -> list[tuple[str, Path]]:
    """Write each output of ``result`` on the label outputs' geometry (``result.meta``).

    Outputs held in a store (a staging store's arrays) are written band by band, never
    loaded whole. Returns ``(output name, path)`` of each file written.
    """
    from ...io import ImageMeta

    targets = _targets(task, result)
    for name, path in targets:
        data = _lazy(result.outputs[name])
        if name in _LABEL_OUTPUTS:
            write_atomic(path, data, result.meta, labels=True)
            continue
        if data.dtype == np.float16:
            data = data.astype(np.float32)  # neither OME-TIFF nor NIfTI holds half floats
        axes = result.axes[name]
        meta = ImageMeta(axes=axes) if result.meta is None else result.meta.replace(axes=axes)
        write_atomic(path, data, meta, labels=False)
    return targets


def predict_file_iter(task: FileTask, model, image, meta,
                      cancel: CancelToken) -> Generator[ProgressEvent, None, Any]:
    """Predict an image already read and, unless cancelled, write the task's outputs.

    The plan chooses how (:func:`.staging.choose_route`): into the task's zarr store, staged
    in a temporary store and converted (TIFF of volumes and of large images), or in memory
    and written at the end. Yields every event of the prediction (its ``FinishedEvent``
    carries the result before the outputs are written); returns the ``PredictionResult``.
    Errors are raised.
    """
    from ..inference.pipeline import predict_iter
    from .staging import choose_route, staged_iter

    route = choose_route(task, model, image, meta)
    if route == "staged":
        return (yield from staged_iter(task, model, image, meta, cancel))
    result = yield from predict_iter(image, model, task.predict, meta=meta, cancel=cancel)
    if not result.cancelled and route == "memory":
        write_outputs(task, result)
    return result


def file_iter(task: FileTask, model, cancel: CancelToken) -> Generator[ProgressEvent, None, dict]:
    """Read, predict and write one file; yields its tile events and its notices (named).

    Returns the outcome (``status`` done, failed or cancelled, ``seconds``, ``error``,
    ``notices``, ``stats``, ``worker``, ``loaded`` False); errors are caught and reported,
    never raised.
    """
    from ...io import read_image

    t0 = time.perf_counter()
    outcome: dict[str, Any] = {"name": task.name, "status": "failed", "error": None,
                               "notices": [], "stats": {}}
    try:
        image, meta = read_image(task.input_path)
        result = None
        for event in predict_file_iter(task, model, image, meta, cancel):
            if isinstance(event, FinishedEvent):
                result = event.result
            elif isinstance(event, NoticeEvent):
                yield NoticeEvent(message=f"{task.name}: {event.message}", level=event.level)
            elif isinstance(event, TilesEvent):
                yield event
        outcome["notices"] = list(result.notices)
        outcome["status"] = "cancelled" if result.cancelled else "done"
        if not result.cancelled:
            outcome["stats"] = {k: result.stats[k] for k in _KEPT_STATS if k in result.stats}
            outcome["stats"]["shape"] = list(image.shape)
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the run
        outcome["status"] = "failed"
        outcome["error"] = describe_error(exc)
    outcome.update(seconds=round(time.perf_counter() - t0, 4), worker=_worker_id(),
                   loaded=False)
    return outcome


def process_file(task: FileTask, cancel: CancelToken | None = None) -> dict:
    """Predict one file in a worker (a Dask task or a thread): never raises.

    The model comes from this thread's cache (loaded on the first file). Returns the
    outcome dict of one file, with ``worker`` (host:pid:thread) and ``loaded`` (True when
    this call loaded the model).
    """
    t0 = time.perf_counter()
    try:
        if task.weights is None:
            raise ConfigError(f"The task for {task.name} says nowhere to load the model from.")
        model, loaded = _worker_model(task.weights)
    except Exception as exc:  # noqa: BLE001
        return {"name": task.name, "status": "failed", "error": describe_error(exc),
                "seconds": round(time.perf_counter() - t0, 4), "worker": _worker_id(),
                "loaded": False, "notices": [], "stats": {}}
    outcome = drain(file_iter(task, model, cancel if cancel is not None else CancelToken()))
    outcome["loaded"] = loaded
    return outcome
