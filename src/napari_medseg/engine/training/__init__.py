"""Training wing: datasets, augmentation, losses, training, fine-tuning, lineage, evaluation.

May use :mod:`napari_medseg.engine.inference` (validation runs the tiled engine); the
inference wing never imports this one. Callers import the submodule they need.
"""

__all__: list[str] = []
