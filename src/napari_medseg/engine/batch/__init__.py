"""Batch wing: scan a folder, run the per-file task on threads or a Dask cluster, keep a manifest.

:mod:`.scan` finds the images, :mod:`.task` reads, predicts and writes one file (also for
``napari-medseg predict``), :mod:`.executors` runs the tasks in this process, on threads or
on Dask, :mod:`.manifest` keeps ``run.json``, and :mod:`.run` drives a run over a folder.

May use :mod:`napari_medseg.engine.inference`; the inference wing never imports this one.
Callers import the submodule they need.
"""

__all__: list[str] = []
