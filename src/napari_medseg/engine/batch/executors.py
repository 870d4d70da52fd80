"""Where a batch run's files are predicted: in this process, on threads, or on Dask.

* :func:`run_serial`: one file after the other in this process with the driver's model (tile
  progress and cancel reach into each file);
* :func:`run_threads`: ``workers`` threads of this process, each with its own copy of the
  model (:func:`~.task.process_file`);
* :func:`run_dask` on the client of :func:`dask_client`: a ``dask.distributed`` LocalCluster
  of N worker processes on the loopback interface (one thread each, no dashboard, closed at
  the end), or an existing cluster at ``tcp://HOST:PORT``. Its workers need napari-medseg
  installed, must see the folders at the same paths and can read the weights. Cancel drops
  the files not yet started; a file already running on a worker cannot be interrupted.

Each runner yields the events of ``running(name)`` (a file starts) and ``record(outcome)``
(a file ended) as they happen; the driver keeps the manifest.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from typing import Any

from ...config import BatchConfig
from ...errors import ConfigError
from ..progress import CancelToken, NoticeEvent, ProgressEvent
from .task import FileTask, describe_error, file_iter, process_file

__all__ = ["executor_of", "run_serial", "run_threads", "dask_client", "run_dask"]

_POLL_S = 0.1

#: A file ended: its outcome -> the event saying so (the driver records it).
Record = Callable[[dict], ProgressEvent]
#: A file started: its name -> the event saying so.
Running = Callable[[str], ProgressEvent]


def executor_of(config: BatchConfig) -> tuple[dict[str, Any], list[NoticeEvent]]:
    """Where ``config`` runs (``kind``: local, threads, dask-local, dask) and notices about it."""
    if config.scheduler or config.dask_local:
        executor = {"kind": "dask-local" if config.dask_local else "dask",
                    "workers": config.dask_local, "scheduler": config.scheduler}
        notices = []
        if config.workers > 1:
            notices.append(NoticeEvent(
                message=f"workers={config.workers} is ignored on Dask: each worker thread of "
                        "the cluster runs one file at a time."))
        return executor, notices
    if config.workers > 1:
        return {"kind": "threads", "workers": config.workers}, []
    return {"kind": "local", "workers": 1}, []


def run_serial(tasks: list[FileTask], model, cancel: CancelToken, record: Record,
               running: Running) -> Generator[ProgressEvent, None, None]:
    """Predict ``tasks`` one after the other with ``model``, in this thread."""
    for task in tasks:
        if cancel.cancelled:
            return
        yield running(task.name)
        outcome = yield from file_iter(task, model, cancel)
        yield record(outcome)


def run_threads(tasks: list[FileTask], workers: int, cancel: CancelToken, record: Record,
                running: Running) -> Generator[ProgressEvent, None, None]:
    """Predict ``tasks`` on ``workers`` threads, one model per thread."""
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


def _connect(config: BatchConfig):
    """``(client, cluster or None, executor info)`` for the configured Dask scheduler."""
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


@contextlib.contextmanager
def dask_client(config: BatchConfig) -> Iterator[tuple[Any, dict[str, Any]]]:
    """``(client, executor info)`` of the configured Dask cluster, closed on leaving.

    Raises:
        ConfigError: ``distributed`` is not installed, or the scheduler cannot be reached.
    """
    client, cluster, info = _connect(config)
    try:
        yield client, info
    finally:
        with contextlib.suppress(Exception):
            client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close()


def run_dask(tasks: list[FileTask], client, cancel: CancelToken,
             record: Record) -> Generator[ProgressEvent, None, None]:
    """Submit ``tasks`` to ``client`` and record each as it completes."""
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
                outcome = {"name": task.name, "status": "failed", "error": describe_error(exc),
                           "seconds": None, "worker": None, "loaded": False}
            yield record(outcome)
