"""The headless engine: a small shared base and three wings.

The base (modules directly in this package) holds what every wing needs: progress events and
the cancel token (:mod:`.progress`), device and precision policy (:mod:`.device`,
:mod:`.precision`), self-describing checkpoints (:mod:`.checkpoints`, whose descriptions are
verified by :mod:`.descriptions`), metrics
(:mod:`.metrics`), the acquisition type of a microscopy image (:mod:`.acquisition`), label
boundaries (:mod:`.boundaries`) and the axis / channel layout rule
(:mod:`.layout`).

The wings:

* :mod:`.inference`: tile grid and plan, tile predictor, output writer, normalisation,
  post-processing and ``predict_iter``.
* :mod:`.training`: datasets, augmentation, losses, training, corrections -> samples, replay,
  fine-tuning, lineage and evaluation.
* :mod:`.batch`: scanning a folder, the per-file task, executors (threads, Dask), the
  manifest and the folder run.

``training`` and ``batch`` may use ``inference``; ``inference`` uses neither, and the base
uses no wing (import-linter contracts in ``pyproject.toml``). Nothing here imports napari or
Qt, and this package imports nothing heavy: callers import the submodule they need
(``from napari_medseg.engine.inference import predict``).
"""

__all__: list[str] = []
