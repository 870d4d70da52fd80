"""The plan of a prediction without running it: :func:`plan_prediction`.

A plan reads no pixels: the normalization is not fitted, the outputs are sized without being
allocated (:class:`~.sinks.SizingSink`), and the one-batch probe runs on a batch of zeros of
the tiles' shape (the time and memory of a forward pass do not depend on the values). So a
plan of a huge lazy array (a zarr store of 10^10 pixels) comes back in seconds, and says so
when its outputs would not fit in the memory available.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from ...config import PredictConfig
from ..progress import CancelToken, drain
from .pipeline import _config, _Run
from .plan import TilePlan, memory_shortfall, unwritten_message
from .predictor import TileTooBig

__all__ = ["plan_prediction"]


def _zero_batch(run: _Run) -> np.ndarray:
    """A batch of zero tiles of the network's input shape (batch x C x tile)."""
    shape = (run.predictor.batch_size, int(run.spec.in_channels)) + tuple(run.grid.tile)
    return np.zeros(shape, np.float32)


def plan_prediction(
    image,
    model,
    config: PredictConfig | dict | None = None,
    *,
    meta: Any = None,
    probe: bool = True,
    **settings: Any,
) -> TilePlan:
    """The tile plan of a prediction without running it (for a widget to show first).

    No pixel of ``image`` is read. With ``probe`` one batch of tiles (zeros) is run twice
    (the first warms the kernels up) to measure the time per tile pass and the activation
    memory. Nothing is written (a store in the config is not opened; its outputs count as
    streamed, not held in memory). A plan whose in-memory outputs exceed the memory
    available now, or of a store array with no chunk written, carries a note saying so.
    """
    config = _config(config, settings)
    streamed = bool(config.store)
    run = _Run(image, model, config.replace(store=None), meta, CancelToken())
    try:
        drain(run.setup(plan_only=True))
        held = run.held_bytes(streamed)
        shortfall = memory_shortfall(held, config.memory_fraction)
        notes = tuple(m for m in (unwritten_message(image, meta), shortfall) if m)
        run.plan = run.plan.replace(output_bytes=held,
                                    notes=tuple(run.plan.notes) + notes)
        if not probe:
            return run.plan
        batch = _zero_batch(run)
        with contextlib.suppress(TileTooBig):
            run.predictor.forward(batch)
        run.predictor.probe(batch)
        drain(run.predictor_notices())  # into the plan's notes
        run.measured_plan()
        return run.plan
    finally:
        run.restore()
