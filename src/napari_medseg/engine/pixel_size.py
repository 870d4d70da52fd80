"""The pixel size weights were trained at, and the zoom that brings an image to it.

A model card (and the checkpoint description it implies) may declare the in-plane pixel
size its weights saw in training, ``{"value": 2.0, "unit": "millimeter"}``. When an image's
metadata gives its own pixel size in a physical unit, the engine resamples each plane to the
weights' pixel size before the network and brings the outputs back to the image's grid
(:class:`~napari_medseg.models.working_resolution.Resampled`), as nnU-Net does with its
target spacing. :func:`plane_zoom` is the one rule for that factor: image pixel size over
the weights' pixel size per in-plane axis, None when either is unknown or when every axis is
within :data:`TOLERANCE` of 1 (resampling then would only blur).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError

__all__ = ["TO_NM", "TOLERANCE", "PixelSize", "plane_zoom", "zoom_words", "with_pixel_size",
           "pixel_size_of", "resample_to_weights", "resampled", "image_zoom", "meta_zoom"]

#: Unit (NGFF name) -> nanometres.
TO_NM = {"angstrom": 0.1, "nanometer": 1.0, "micrometer": 1e3, "millimeter": 1e6,
         "centimeter": 1e7, "meter": 1e9}
#: Relative difference of pixel sizes below which an image is used as it is.
TOLERANCE = 0.1
_SHORT = {"angstrom": "A", "nanometer": "nm", "micrometer": "um", "millimeter": "mm",
          "centimeter": "cm", "meter": "m"}


@dataclass(frozen=True)
class PixelSize:
    """An in-plane pixel size: ``value`` in ``unit`` (an NGFF unit name)."""

    value: float
    unit: str

    @classmethod
    def from_mapping(cls, data: Any, source: str = "model card") -> PixelSize | None:
        """``{"value": v, "unit": u}`` as a PixelSize; None for None, an empty mapping or no
        value (a card may give only the unit family of its images).

        Raises:
            CheckpointError: the value is not positive or the unit is not a length.
        """
        if not data or (isinstance(data, dict) and data.get("value") is None):
            return None
        try:
            value, unit = float(data["value"]), str(data["unit"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"The {source}'s pixel_size must be a mapping with a value "
                                  f"and a unit, not {data!r}.") from None
        if not (value > 0 and math.isfinite(value)) or unit not in TO_NM:
            raise CheckpointError(f"The {source}'s pixel_size ({value:g} {unit}) needs a "
                                  f"positive value and one of the units {sorted(TO_NM)}.")
        return cls(value, unit)

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit}

    @property
    def nm(self) -> float:
        return self.value * TO_NM[self.unit]

    def __str__(self) -> str:
        return f"{self.value:g} {_SHORT[self.unit]}"


def plane_zoom(spacing: Sequence[float], units: Sequence[str | None],
               weights: PixelSize | None) -> tuple[float, ...] | None:
    """Zoom per in-plane axis that takes the image's pixels to the weights' (image pixel
    size / weights' pixel size: below 1 the network sees a smaller image).

    Args:
        spacing: the image's pixel size along each in-plane axis.
        units: their units (NGFF names; None where unknown).
        weights: the weights' pixel size, or None.

    Returns:
        One factor per axis, or None when the weights or the image give no physical pixel
        size, or when all factors are within :data:`TOLERANCE` of 1.
    """
    if weights is None or not spacing or len(units) != len(spacing):
        return None
    if any(u not in TO_NM for u in units) or any(not (s > 0) for s in spacing):
        return None
    zoom = tuple(float(s) * TO_NM[u] / weights.nm for s, u in zip(spacing, units))
    if all(abs(z - 1.0) <= TOLERANCE for z in zoom):
        return None
    return zoom


def zoom_words(spacing: Sequence[float], units: Sequence[str | None], weights: PixelSize,
               zoom: Sequence[float], then: str = "the outputs are on the image's grid") -> str:
    """One sentence for the plan and the notices: what is resampled, and by how much."""
    image = " x ".join(f"{s:g}" for s in spacing) + f" {_SHORT.get(units[-1], units[-1])}"
    factors = " x ".join(f"{z:.3g}" for z in zoom)
    return (f"Resampling each plane from {image} pixels to the weights' {weights} (zoom "
            f"{factors}); {then}.")


def with_pixel_size(model, size: PixelSize | dict | None):
    """Attach the weights' pixel size to ``model``'s spec (and a wrapped network's), where
    saving and prediction read it; returns ``model``."""
    if isinstance(size, dict):
        size = PixelSize.from_mapping(size)
    inner = getattr(model, "net", None)
    for module in (model, inner):
        if module is not None and hasattr(module, "spec"):
            extra = {k: v for k, v in module.spec.extra.items() if k != "pixel_size"}
            if size is not None:
                extra["pixel_size"] = size.to_dict()
            module.spec = dataclasses.replace(module.spec, extra=extra)
    return model


def pixel_size_of(model_or_spec) -> PixelSize | None:
    """The pixel size attached to a network (its spec's ``extra["pixel_size"]``), or None."""
    spec = getattr(model_or_spec, "spec", model_or_spec)
    return PixelSize.from_mapping((getattr(spec, "extra", None) or {}).get("pixel_size"))


def resample_to_weights(model, meta, axes: str, planes: Sequence[str]):
    """``model`` wrapped to see each plane at its weights' pixel size, when they declare one
    and ``meta`` (an :class:`~napari_medseg.io.ImageMeta` of ``axes``) gives another.

    Args:
        model: a loaded network (its spec may carry ``pixel_size``).
        meta: the image's metadata, or None.
        axes: the axes the run reads the image with.
        planes: the plane axes of each pass (one; three for orthogonal consensus).

    Returns:
        ``(model, zooms, message)``: a :class:`~napari_medseg.models.working_resolution.
        Resampled` network, the zoom of each pass and the sentence that says so; or
        ``(model, None, None)`` when nothing is resampled.
    """
    from ..io.metadata import ImageMeta

    weights = pixel_size_of(model)
    if (weights is None or not isinstance(meta, ImageMeta) or model.spec.spatial_dims != 2
            or meta.axes.replace("C", "") != axes.replace("C", "")):
        return model, None, None
    def along(plane: str) -> tuple[list[float], list[str | None]]:
        return _plane_geometry(meta, plane) or ([], [])

    zooms = [plane_zoom(*along(plane), weights) for plane in planes]
    if all(z is None for z in zooms):
        return model, None, None
    zooms = [z or (1.0,) * len(plane) for z, plane in zip(zooms, planes)]
    wrapped = resampled(model, zooms[0], tile_zoom=max(max(z) for z in zooms))
    return wrapped, zooms, zoom_words(*along(planes[0]), weights, zooms[0])


def resampled(model, zoom: Sequence[float], tile_zoom: float | None = None):
    """``model`` wrapped in :class:`~napari_medseg.models.working_resolution.Resampled` by
    ``zoom``, keeping its checkpoint description."""
    from ..models.working_resolution import Resampled

    wrapped = Resampled(model, tuple(zoom), tile_zoom=tile_zoom)
    wrapped.checkpoint_info = getattr(model, "checkpoint_info", None)
    return wrapped


def image_zoom(model, meta) -> tuple[tuple[float, float], str] | None:
    """The zoom of an image's Y and X axes to ``model``'s pixel size and the sentence that
    says so (:func:`meta_zoom`), for a 2D network on the input grid; None when nothing is
    resampled. Fine-tuning uses it to train on corrections at the pixel size the weights see
    at prediction."""
    if model.spec.spatial_dims != 2 or model.spec.output_scale != 1:
        return None
    return meta_zoom(meta, pixel_size_of(model))


def meta_zoom(meta, weights: PixelSize | None) -> tuple[tuple[float, float], str] | None:
    """``(zoom, sentence)`` taking the Y and X pixels of an image with ``meta`` (an
    :class:`~napari_medseg.io.ImageMeta`, or None) to ``weights``; None when either gives no
    physical pixel size or they agree."""
    geometry = None if weights is None or meta is None else _plane_geometry(meta, "YX")
    if geometry is None:
        return None
    spacing, units = geometry
    zoom = plane_zoom(spacing, units, weights)
    if zoom is None:
        return None
    return (zoom[0], zoom[1]), zoom_words(spacing, units, weights, zoom,
                                          "the corrections train at the weights' pixel size")


def _plane_geometry(meta, plane: str) -> tuple[list[float], list[str | None]] | None:
    """(pixel sizes, units) of ``meta`` along the axes of ``plane`` (e.g. ``"YX"``), or None
    when the metadata lack one of them (the one place the spatial order is read)."""
    spatial = [a for a in meta.axes if a in "ZYX"]
    if any(a not in spatial for a in plane) or len(meta.spacing) != len(spatial) or (
            len(meta.units) != len(spatial)):
        return None
    idx = [spatial.index(a) for a in plane]
    return [meta.spacing[j] for j in idx], [meta.units[j] for j in idx]
