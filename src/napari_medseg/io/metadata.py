"""``ImageMeta``: the geometry and provenance that travel with every array ``io`` returns.

Conventions (the same for every format):

* ``axes`` names the array's axes, slowest first, with letters from ``"TICZYX"``:
  ``Z``, ``Y``, ``X`` are spatial; ``C`` is channels (colour samples included), ``T`` time and
  ``I`` an index over unrelated images (a stack of patches). At most four axes.
* ``spacing``, ``origin`` and ``units`` have one entry per *spatial* axis, in the order the
  spatial axes appear in ``axes`` (e.g. ``(dz, dy, dx)`` for ``"ZYX"``). ``origin`` is the
  physical position of the centre of the first voxel.
* ``affine`` (NIfTI and DICOM only) is the 4 x 4 matrix mapping voxel coordinates
  ``(x, y, z, 1)`` = the array's ``(X, Y, Z)`` indices (the reverse of ``"ZYX"``) to
  RAS+ world millimetres: the NIfTI convention. DICOM's LPS positions are converted to it.
  It keeps orientation, flips and obliquity that ``spacing``/``origin`` cannot express.

The dataclass is frozen; derive changed copies with :meth:`ImageMeta.replace`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "AXIS_LETTERS",
    "SPATIAL_AXES",
    "MAX_NDIM",
    "ImageMeta",
    "normalize_unit",
    "affine_from_geometry",
    "geometry_from_affine",
    "upsampled_geometry",
    "output_meta",
]

#: Letters allowed in ``ImageMeta.axes``.
AXIS_LETTERS = "TICZYX"
#: The spatial axis letters.
SPATIAL_AXES = "ZYX"
#: The largest number of axes an image may have.
MAX_NDIM = 4

# Spellings met in OME-XML, ImageJ, NIfTI and NGFF files -> NGFF/UDUNITS names (pint names too).
_UNIT_ALIASES = {
    "m": "meter",
    "meter": "meter",
    "metre": "meter",
    "cm": "centimeter",
    "centimeter": "centimeter",
    "mm": "millimeter",
    "millimeter": "millimeter",
    "millimetre": "millimeter",
    "um": "micrometer",
    "µm": "micrometer",
    "μm": "micrometer",
    "micron": "micrometer",
    "microns": "micrometer",
    "micrometer": "micrometer",
    "micrometre": "micrometer",
    "\\u00b5m": "micrometer",
    "nm": "nanometer",
    "nanometer": "nanometer",
    "nanometre": "nanometer",
    "pm": "picometer",
    "picometer": "picometer",
    "a": "angstrom",
    "å": "angstrom",
    "angstrom": "angstrom",
    "in": "inch",
    "inch": "inch",
    "s": "second",
    "sec": "second",
    "second": "second",
    "ms": "millisecond",
    "millisecond": "millisecond",
}


def normalize_unit(unit: str | None) -> str | None:
    """The NGFF name (``"micrometer"``, ``"millimeter"`` ...) of a unit spelling, or None.

    ``"pixel"``, empty strings and unknown spellings give None (no physical unit).
    """
    if unit is None:
        return None
    key = str(unit).strip().lower()
    return _UNIT_ALIASES.get(key)


@dataclass(frozen=True, eq=False)
class ImageMeta:
    """Geometry and provenance of an image array.

    Attributes:
        axes: one letter per array axis from ``"TICZYX"``, e.g. ``"YX"``, ``"YXC"``, ``"ZYX"``,
            ``"CZYX"``.
        spacing: physical size of a voxel along each spatial axis (spatial-axis order).
        origin: physical position of the first voxel's centre along each spatial axis.
        units: unit of each spatial axis (``"millimeter"``, ``"micrometer"`` ...), None where
            unknown (then ``spacing`` is in pixels).
        affine: 4 x 4 voxel ``(x, y, z)`` -> RAS+ millimetre matrix for NIfTI and DICOM
            sources, None otherwise (see the module docstring).
        source: the file or folder the array was read from, if any.
        channel_axis: index of the ``C`` axis in ``axes``, or None (derived from ``axes``;
            a value passed in is ignored).
        rgb: True when the last axis holds 3 (RGB) or 4 (RGBA) colour samples to display as
            colour.
        extra: format-specific facts: DICOM rescale slope/intercept and series UID, NIfTI
            header codes, the zarr pyramid level and level count, ...
    """

    axes: str
    spacing: tuple[float, ...] = ()
    origin: tuple[float, ...] = ()
    units: tuple[str | None, ...] = ()
    affine: np.ndarray | None = None
    source: str | None = None
    channel_axis: int | None = None
    rgb: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        axes = str(self.axes).upper()
        if not axes or any(a not in AXIS_LETTERS for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"axes {self.axes!r} must be distinct letters from {AXIS_LETTERS!r}")
        if len(axes) > MAX_NDIM:
            raise ValueError(f"axes {axes!r} have more than {MAX_NDIM} dimensions")
        object.__setattr__(self, "axes", axes)
        n = sum(a in SPATIAL_AXES for a in axes)
        spacing = tuple(float(s) for s in self.spacing) if self.spacing else (1.0,) * n
        origin = tuple(float(o) for o in self.origin) if self.origin else (0.0,) * n
        units = tuple(normalize_unit(u) for u in self.units) if self.units else (None,) * n
        for name, value in (("spacing", spacing), ("origin", origin), ("units", units)):
            if len(value) != n:
                raise ValueError(f"{name} {value} needs one entry per spatial axis of {axes!r}")
        if any(not math.isfinite(s) or s <= 0 for s in spacing):
            raise ValueError(f"spacing {spacing} must be positive and finite")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "units", units)
        if self.affine is not None:
            affine = np.array(self.affine, dtype=np.float64)
            if affine.shape != (4, 4):
                raise ValueError(f"affine must be 4 x 4, got shape {affine.shape}")
            affine.setflags(write=False)
            object.__setattr__(self, "affine", affine)
        channel_axis = axes.find("C")
        object.__setattr__(self, "channel_axis", None if channel_axis < 0 else channel_axis)
        if self.rgb and not axes.endswith("C"):
            raise ValueError(f"rgb images need the colour axis last, got axes {axes!r}")
        object.__setattr__(self, "extra", dict(self.extra))

    # -- equality ----------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageMeta):
            return NotImplemented
        if (self.affine is None) != (other.affine is None):
            return False
        if self.affine is not None and not np.array_equal(self.affine, other.affine):
            return False
        return all(
            getattr(self, f.name) == getattr(other, f.name)
            for f in dataclasses.fields(self)
            if f.name != "affine"
        )

    __hash__ = None  # type: ignore[assignment]

    # -- derived -----------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        """Number of array axes."""
        return len(self.axes)

    @property
    def spatial_axes(self) -> str:
        """The spatial letters of ``axes`` in array order, e.g. ``"ZYX"`` or ``"YX"``."""
        return "".join(a for a in self.axes if a in SPATIAL_AXES)

    @property
    def spatial_dims(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return len(self.spatial_axes)

    @property
    def unit(self) -> str | None:
        """The common unit of the spatial axes, or None if unknown or mixed."""
        units = set(self.units)
        return units.pop() if len(units) == 1 else None

    def axis_spacing(self) -> tuple[float, ...]:
        """Spacing per array axis: the spatial spacing, 1.0 for ``T``/``I``/``C`` axes."""
        it = iter(self.spacing)
        return tuple(next(it) if a in SPATIAL_AXES else 1.0 for a in self.axes)

    def axis_origin(self) -> tuple[float, ...]:
        """Origin per array axis: the spatial origin, 0.0 for ``T``/``I``/``C`` axes."""
        it = iter(self.origin)
        return tuple(next(it) if a in SPATIAL_AXES else 0.0 for a in self.axes)

    def replace(self, **changes: Any) -> ImageMeta:
        """A copy with some fields changed (``dataclasses.replace``; ``channel_axis`` follows ``axes``)."""
        return dataclasses.replace(self, **changes)

    def without_channels(self) -> ImageMeta:
        """The same geometry without the ``C`` axis: the metadata of a label image for it."""
        if "C" not in self.axes:
            return self.replace(rgb=False)
        return self.replace(axes=self.axes.replace("C", ""), rgb=False)

    def check_shape(self, shape: Sequence[int]) -> None:
        """Raise ValueError when ``shape`` does not have one entry per axis."""
        if len(shape) != self.ndim:
            raise ValueError(f"shape {tuple(shape)} does not fit axes {self.axes!r}")

    def world_affine(self) -> np.ndarray:
        """The voxel ``(x, y, z)`` -> world matrix: ``affine`` or one built from spacing/origin."""
        if self.affine is not None:
            return np.array(self.affine)
        return affine_from_geometry(self.spacing, self.origin, self.spatial_axes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (the affine as nested lists); ``from_dict`` inverts it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["spacing"] = list(self.spacing)
        out["origin"] = list(self.origin)
        out["units"] = list(self.units)
        out["affine"] = None if self.affine is None else self.affine.tolist()
        out["extra"] = {k: v for k, v in self.extra.items() if _jsonable(v)}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageMeta:
        """Build from the output of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("spacing", "origin", "units"):
            if key in kwargs and kwargs[key] is not None:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


def _jsonable(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return False


def affine_from_geometry(
    spacing: Sequence[float], origin: Sequence[float], spatial_axes: str
) -> np.ndarray:
    """A diagonal voxel ``(x, y, z)`` -> world affine from spacing and origin.

    Args:
        spacing: per spatial axis, in the order of ``spatial_axes`` (e.g. ZYX).
        origin: per spatial axis, same order.
        spatial_axes: ``"ZYX"`` or ``"YX"`` (a 2-D image gets z spacing 1, origin 0).

    Returns:
        4 x 4 float64 matrix.
    """
    lookup_s = dict(zip(spatial_axes, spacing))
    lookup_o = dict(zip(spatial_axes, origin))
    affine = np.eye(4)
    for i, letter in enumerate("XYZ"):
        affine[i, i] = lookup_s.get(letter, 1.0)
        affine[i, 3] = lookup_o.get(letter, 0.0)
    return affine


def geometry_from_affine(
    affine: np.ndarray, spatial_axes: str = "ZYX"
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Spacing (column norms) and origin (translation) of a voxel -> world affine.

    Args:
        affine: 4 x 4 voxel ``(x, y, z)`` -> world matrix.
        spatial_axes: the order to return them in, ``"ZYX"`` or ``"YX"``.

    Returns:
        ``(spacing, origin)``, each one entry per letter of ``spatial_axes``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    norms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    norms = np.where(norms > 0, norms, 1.0)
    index = {"X": 0, "Y": 1, "Z": 2}
    spacing = tuple(float(norms[index[a]]) for a in spatial_axes)
    origin = tuple(float(affine[index[a], 3]) for a in spatial_axes)
    return spacing, origin


def upsampled_geometry(
    spacing: Sequence[float], origin: Sequence[float], factors: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Spacing and origin of a grid ``factors`` times finer than the given one, per axis.

    The one rule for a super-resolved output's geometry: an output pixel covers ``1 / f`` of
    an input pixel, so the spacing is divided by ``f`` and the first pixel's centre moves by
    ``(0.5 / f - 0.5)`` input pixels (a quarter pixel back for ``f = 2``). A factor of 1
    leaves the axis unchanged.

    Args:
        spacing: per axis (physical units, or napari's layer scale).
        origin: per axis, the first pixel's centre (or napari's layer translate).
        factors: output side / input side, per axis.

    Returns:
        ``(spacing, origin)`` of the finer grid.
    """
    new_spacing = tuple(float(s) / f for s, f in zip(spacing, factors))
    new_origin = tuple(float(o) + (0.5 / f - 0.5) * float(s)
                       for o, s, f in zip(origin, spacing, factors))
    return new_spacing, new_origin


def _on_axes(meta: ImageMeta | None, axes: str) -> ImageMeta:
    """``meta``'s geometry (channels dropped) re-expressed for the spatial axes of ``axes``."""
    base = meta.without_channels() if meta is not None else None
    if base is not None and base.axes == axes:
        return base
    lookup = {}
    if meta is not None:
        lookup = {a: (s, o, u) for a, s, o, u in zip(meta.spatial_axes, meta.spacing,
                                                    meta.origin, meta.units)}
    spacing, origin, units = [], [], []
    for a in axes:
        if a in SPATIAL_AXES:
            s, o, u = lookup.get(a, (1.0, 0.0, None))
            spacing.append(s)
            origin.append(o)
            units.append(u)
    uniform = len(set(units)) <= 1
    return ImageMeta(axes=axes, spacing=tuple(spacing), origin=tuple(origin),
                     units=tuple(units) if uniform else (),
                     source=getattr(meta, "source", None),
                     extra=dict(getattr(meta, "extra", {}) or {}))


def output_meta(
    meta: ImageMeta | None,
    in_axes: str,
    in_shape: Sequence[int],
    out_axes: str,
    out_shape: Sequence[int],
) -> ImageMeta:
    """The metadata of an output: the input image's geometry on the output's grid.

    Channels are dropped; a spatial axis that is longer in the output than in the input (a
    super-resolving network) gets :func:`upsampled_geometry`, and a NIfTI/DICOM affine the
    same change. Computed once per prediction and carried on its result, which the batch
    task and the CLI write; napari layers and zarr stores scale their own transforms with the
    same rule (:func:`upsampled_geometry`).

    Args:
        meta: the reader's metadata of the input, or None (unit spacing, zero origin).
        in_axes: the input array's axes (e.g. ``"CYX"``).
        in_shape: the input array's shape.
        out_axes: the output's axes (e.g. ``"YX"``).
        out_shape: the output's shape.

    Returns:
        The output's metadata.
    """
    base = _on_axes(meta, out_axes)
    factors = {}
    for a in base.spatial_axes:
        if a in in_axes and a in out_axes:
            n_in, n_out = in_shape[in_axes.index(a)], out_shape[out_axes.index(a)]
            if n_in and n_out != n_in:
                factors[a] = n_out / n_in
    if not factors:
        return base
    spacing, origin = upsampled_geometry(
        base.spacing, base.origin, [factors.get(a, 1.0) for a in base.spatial_axes])
    changes: dict[str, Any] = {"spacing": spacing, "origin": origin}
    if base.affine is not None:
        m = np.eye(4)
        for col, a in enumerate("XYZ"):
            f = factors.get(a, 1.0)
            m[col, col] = 1.0 / f
            m[col, 3] = 0.5 / f - 0.5
        changes["affine"] = np.asarray(base.affine) @ m
    return base.replace(**changes)
