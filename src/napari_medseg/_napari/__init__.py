"""napari glue: reader, writers, sample data, layer conversion and widgets.

The only package allowed to import napari, qtpy, magicgui or superqt. Its modules are
loaded by npe2 from the manifest (``napari_medseg/napari.yaml``); nothing is imported here,
so ``import napari_medseg._napari.reader`` stays as cheap as the reader hook must be.
"""

from __future__ import annotations

__all__: list[str] = []
