"""Batch wing: scan a folder, run the per-file task on threads or a Dask cluster, keep a manifest.

May use :mod:`napari_medseg.engine.inference`; the inference wing never imports this one.
``run_folder_iter`` is the generator the Batch widget and ``napari-medseg batch`` run;
``run_folder`` drains it. Importing this package imports numpy but not torch.
"""

from .run import BatchSummary, FileEvent, find_images, run_folder, run_folder_iter

__all__ = ["BatchSummary", "FileEvent", "find_images", "run_folder", "run_folder_iter"]
