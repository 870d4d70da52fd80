"""Batch wing: scan a folder, run the per-file task on threads or a Dask cluster, keep a manifest.

May use :mod:`napari_medseg.engine.inference`; the inference wing never imports this one.
Callers import the submodule they need.
"""

__all__: list[str] = []
