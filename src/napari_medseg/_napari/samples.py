"""The napari sample-data contributions: each opens a shipped image and its label image.

The files live in ``napari_medseg/_samples`` (see ATTRIBUTION.md there) and are read
through :mod:`napari_medseg.io`, so their layers get the same scale and units as any file.
"""

from __future__ import annotations

from typing import Any

from ..io.samples import load_sample
from .layers import layer_data

__all__ = ["nuclei", "nuclei_he", "em_stack", "dermoscopy", "ct_patches", "sample_layers"]


def sample_layers(name: str) -> list[tuple[Any, dict[str, Any], str]]:
    """The image layer and the Labels layer of one shipped sample.

    The labels open as ``"<sample> annotation"``, hidden: they are the reference a result is
    scored against (the Segment widget picks them), not a result, and never hide the image
    or a prediction (``"<sample> mask"`` is the name of the prediction).

    Args:
        name: a key of :data:`napari_medseg.io.samples.SAMPLES`.
    """
    image, meta, labels = load_sample(name)
    data, kwargs, kind = layer_data(labels, meta.without_channels(), "labels",
                                    name=f"{name} annotation")
    kwargs.update(visible=False, opacity=0.6)
    return [layer_data(image, meta, "image", name=name), (data, kwargs, kind)]


def nuclei() -> list[tuple[Any, dict[str, Any], str]]:
    """DSB2018 fluorescence nuclei, 256 x 256, with instance labels."""
    return sample_layers("nuclei")


def nuclei_he() -> list[tuple[Any, dict[str, Any], str]]:
    """DSB2018 H&E-like tissue, 256 x 320 RGB, with instance labels."""
    return sample_layers("nuclei_he")


def em_stack() -> list[tuple[Any, dict[str, Any], str]]:
    """ISBI 2012 ssTEM crop, 5 x 256 x 256 at 4 x 4 x 50 nm, with its membrane mask."""
    return sample_layers("em_stack")


def dermoscopy() -> list[tuple[Any, dict[str, Any], str]]:
    """PH2 melanoma at half resolution (RGB), with its lesion mask."""
    return sample_layers("dermoscopy")


def ct_patches() -> list[tuple[Any, dict[str, Any], str]]:
    """Six 48 x 48 MSD lung CT patches (2 mm pixels), with tumour masks."""
    return sample_layers("ct_patches")

