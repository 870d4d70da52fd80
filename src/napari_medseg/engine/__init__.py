"""The headless engine: tiling, inference, losses, training, fine-tuning, checkpoints, batch.

Nothing here imports napari or Qt. Submodules are imported explicitly by callers
(``from napari_medseg.engine.inference import predict``); this package imports nothing heavy.
"""

__all__: list[str] = []
