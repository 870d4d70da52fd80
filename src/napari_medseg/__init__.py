"""napari-medseg: deep-learning segmentation of microscopy and radiology images in napari.

Importing this package is cheap: it loads neither torch nor napari. The public API is
reached lazily (PEP 562), so ``napari_medseg.create_model`` imports the model registry
only when it is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

__all__ = [
    "__version__",
    "MedsegError",
    "create_model",
    "list_models",
    "read_image",
    "write_labels",
]

_LAZY = {
    "MedsegError": "napari_medseg.errors",
    "create_model": "napari_medseg.models",
    "list_models": "napari_medseg.models",
    "read_image": "napari_medseg.io",
    "write_labels": "napari_medseg.io",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_medseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
