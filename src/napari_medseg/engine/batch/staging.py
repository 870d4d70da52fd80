"""How a file task's outputs are written: held in memory, streamed into its own zarr store,
or staged in a temporary zarr store beside the output and converted at the end.

The plan decides before any pixel is predicted (:func:`choose_route`):

* ``store``: the task streams into the zarr store it names (``-o OUT.zarr``); finished
  slices are recorded there and a re-run resumes after them.
* ``staged``: every output is a format written band by band from a store (TIFF, zarr) and
  the image is a volume, or its outputs would take more than :data:`STREAM_ABOVE_BYTES` (or
  the memory budget): the prediction streams into a hidden store beside the first output
  (:func:`staging_path`, the same name on every run, so a killed run resumes), then each
  output is written from it band by band (:func:`staged_iter`) and the store is removed.
* ``memory``: small outputs, or formats that cannot be written in pieces (NIfTI, PNG); when
  those outputs exceed the memory budget (``PredictConfig.memory_fraction`` of the memory
  available) the task is refused with one sentence proposing zarr, before any work.

So peak memory does not grow with the image for TIFF and zarr outputs: one band of rows
while predicting, one band of tiles while converting.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ..inference.plan import format_bytes, memory_budget
from ..progress import CancelToken, ProgressEvent, StageEvent

__all__ = ["STREAM_ABOVE_BYTES", "STREAMABLE_SUFFIXES", "choose_route", "is_staging_store",
           "plan_config", "staging_path", "staged_iter"]

#: Outputs larger than this stream through a store even when they would fit the budget, so
#: peak memory stays flat in the image's size.
STREAM_ABOVE_BYTES = 64 * 2**20
#: Output formats written band by band from a store.
STREAMABLE_SUFFIXES = (".tif", ".tiff", ".zarr")
#: Name of a staging store: the partial prefix of batch tasks, then this.
_STAGE_MARK = "stage-"


def staging_path(task) -> Path:
    """The hidden store a task's outputs are staged in: beside its first output, named after
    it, the same on every run (a re-run finds and resumes it)."""
    from .task import PARTIAL_PREFIX

    first = Path(task.output_path)
    return first.with_name(f"{PARTIAL_PREFIX}{_STAGE_MARK}{first.name}.zarr")


def is_staging_store(path: str | Path | None) -> bool:
    """Whether ``path`` is a staging store (a temporary one, removed after conversion)."""
    from .task import PARTIAL_PREFIX

    return path is not None and Path(path).name.startswith(PARTIAL_PREFIX + _STAGE_MARK)


def _streamable(path: str) -> bool:
    return path.lower().endswith(STREAMABLE_SUFFIXES)


def plan_config(task):
    """The config a plan of ``task`` is made with: its outputs count as streamed when every
    one of them can be written from a store (so the plan does not warn about memory it will
    not use)."""
    if task.predict.store or not all(_streamable(p) for _, p in task.outputs):
        return task.predict
    return task.predict.replace(store=str(staging_path(task)))


def choose_route(task, model, image, meta) -> str:
    """``"store"``, ``"staged"`` or ``"memory"`` for ``task`` (see the module); reads no pixel.

    Raises:
        ConfigError: outputs in a format that cannot stream would exceed the memory budget.
    """
    if task.predict.store:
        return "store"
    from ..inference.planning import plan_prediction

    cfg = task.predict
    plan = plan_prediction(image, model, cfg, meta=meta, probe=False)
    budget = memory_budget(cfg.memory_fraction)
    limit = STREAM_ABOVE_BYTES if budget is None else min(STREAM_ABOVE_BYTES, budget)
    if all(_streamable(p) for _, p in task.outputs) and (
            plan.planes > 1 or plan.output_bytes > limit):
        return "staged"
    if budget is not None and plan.output_bytes > budget:
        kind = next(Path(p).name for _, p in task.outputs if not _streamable(p))
        raise ConfigError(
            f"The outputs of {task.name} would hold {format_bytes(plan.output_bytes)} in "
            f"memory, over the memory budget of {format_bytes(budget)}, and {kind} cannot be "
            "written slice by slice; write zarr instead (-o OUT.zarr or --format zarr), "
            "which streams and resumes.")
    return "memory"


def staged_iter(task, model, image, meta, cancel: CancelToken
                ) -> Generator[ProgressEvent, None, Any]:
    """Predict into the task's staging store, then write each output from it.

    A cancelled (or killed) run leaves the store: running the same task again resumes after
    its finished slices. After the conversion the store is removed and the result names the
    written files (``result.outputs``: output name -> path; ``result.store`` None).
    """
    from ..inference.pipeline import predict_iter
    from .task import remove_path, write_outputs

    store = staging_path(task)
    cfg = task.predict.replace(store=str(store), overwrite=True)
    result = yield from predict_iter(image, model, cfg, meta=meta, cancel=cancel)
    if result.cancelled:
        return result
    yield StageEvent(message=f"Writing the outputs from {store.name}.", stage="writing")
    written = write_outputs(task, result)
    remove_path(store)
    result.outputs = dict(written)
    result.store = None
    return result
