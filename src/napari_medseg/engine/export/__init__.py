"""Export of a checkpoint to formats other tools run: bioimage.io model packages
(:mod:`.bioimageio`) over the ONNX / TorchScript graphs of :mod:`.graphs`.

Nothing is imported here: ``bioimageio.spec`` is an optional extra, loaded by the exporter.
"""

__all__: list[str] = []
