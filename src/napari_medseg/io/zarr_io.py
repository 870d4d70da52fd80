"""zarr and OME-Zarr (NGFF 0.4 and 0.5) through zarr-python, read lazily as dask arrays.

Reading understands NGFF ``multiscales`` (axes with units, per-level and global
``coordinateTransformations`` of type ``scale`` and ``translation``), ``image-label`` groups
and the ``labels`` group of an image. A plain zarr array or a group holding one array is
read too, with axes guessed from its shape.

Writing produces an OME-Zarr 0.4 group (zarr format 2): array ``"0"`` (and optional
nearest-neighbour pyramid levels ``"1"``, ``"2"`` ...), ``multiscales`` metadata, the
``image-label`` marker for label images, and the full :class:`ImageMeta` as JSON under the
``napari_medseg`` attribute so the affine and axis letters round-trip exactly. A path of the
form ``image.zarr/labels/<name>`` adds the label image to that image's ``labels`` group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageReadError, ImageWriteError
from .metadata import MAX_NDIM, SPATIAL_AXES, ImageMeta, normalize_unit
from .axes import guess_axes
from .messages import brief

__all__ = ["read_zarr", "read_zarr_levels", "write_zarr", "NGFF_VERSION"]

#: The NGFF version written.
NGFF_VERSION = "0.4"

_META_KEY = "napari_medseg"
_TYPE_OF = {"T": "time", "C": "channel", "Z": "space", "Y": "space", "X": "space"}


def _open(path: Path) -> Any:
    import zarr

    try:
        return zarr.open(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises many kinds
        raise ImageReadError(
            f"{path} cannot be opened as a zarr store ({brief(exc)})."
        ) from exc


def _chunks_written(arr: Any) -> bool | None:
    """Whether a local zarr array's folder holds any chunk (None: not a local folder).

    Looks at the folder's first entries only, so it stays cheap on a store of many chunks.
    """
    root = getattr(getattr(getattr(arr, "store_path", None), "store", None), "root", None)
    if root is None:
        return None
    try:
        with os.scandir(Path(root) / str(getattr(arr, "path", ""))) as entries:
            return any(e.name not in (".zarray", ".zattrs", "zarr.json") for e in entries)
    except OSError:
        return None


def _ngff(attrs: dict) -> dict:
    """The NGFF attributes (0.5 nests them under ``"ome"``)."""
    ome = attrs.get("ome")
    return ome if isinstance(ome, dict) else attrs


def _axis_letters(axes: list, path: Path) -> str:
    """NGFF axes (dicts or bare names) -> our letters.

    Spatial axes named z/y/x keep their names; other spatial axes take the unused letters
    so that the last ones become Y and X. Channel -> C, time -> T, anything else -> I.
    """
    names = [(a.get("name", "") if isinstance(a, dict) else str(a)).lower() for a in axes]
    types = [(a.get("type") if isinstance(a, dict) else None) for a in axes]
    spatial = [t == "space" or n in ("z", "y", "x") for n, t in zip(names, types)]
    unnamed = sum(1 for n, sp in zip(names, spatial) if sp and n not in ("z", "y", "x"))
    free = [letter for letter in "ZYX" if letter.lower() not in names]
    free = free[len(free) - unnamed:] if 0 < unnamed <= len(free) else free
    letters: list[str] = []
    for name, kind, sp in zip(names, types, spatial):
        if sp:
            letter = name.upper() if name in ("z", "y", "x") else (free.pop(0) if free else "?")
        elif kind == "channel" or name == "c":
            letter = "C"
        elif kind == "time" or name == "t":
            letter = "T"
        else:
            letter = "I"
        if letter == "?" or letter in letters:
            raise ImageReadError(
                f"{path} has NGFF axes {names} that napari-medseg cannot map to T/C/Z/Y/X."
            )
        letters.append(letter)
    return "".join(letters)


def _guess_axes(shape: tuple[int, ...]) -> str:
    """Axes of an array without metadata (:func:`.axes.guess_axes`); "" beyond 2-4 axes."""
    return guess_axes(shape) if 2 <= len(shape) <= 4 else ""


def _transform(transforms: list | None, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scale = np.ones(ndim)
    translation = np.zeros(ndim)
    for t in transforms or []:
        if not isinstance(t, dict):
            continue
        if t.get("type") == "scale" and t.get("scale") is not None:
            s = np.asarray(t["scale"], dtype=float)
            scale, translation = scale * s, translation * s
        elif t.get("type") == "translation" and t.get("translation") is not None:
            translation = translation + np.asarray(t["translation"], dtype=float)
    return scale, translation


def _too_many_dims(path: Path, axes: str, shape: tuple[int, ...]) -> ImageReadError:
    return ImageReadError(
        f"{path} holds a {len(axes)}-D image (axes {axes}, shape {shape}); napari-medseg "
        f"reads at most {MAX_NDIM}-D images such as CZYX or TZYX, so store one time point "
        "or channel per image."
    )


@dataclass
class _Store:
    """What a zarr path holds, before squeezing: one entry per level or per axis."""

    arrays: list[Any]  # zarr arrays, full resolution first
    letters: str  # our axis letter per array axis
    scales: list[np.ndarray]  # per level, per axis
    translations: list[np.ndarray]  # per level, per axis
    units: list[str | None]  # per axis
    attrs: dict  # the group's (or array's) attributes
    stored: dict  # our ImageMeta JSON, {} if absent


def _resolve(path: Path) -> _Store:
    """Find the image in a zarr path: an NGFF multiscale group, a group of one array, an array."""
    import zarr

    node = _open(path)
    attrs = dict(node.attrs.asdict()) if hasattr(node.attrs, "asdict") else dict(node.attrs)
    stored = attrs.get(_META_KEY) if isinstance(attrs.get(_META_KEY), dict) else {}
    if isinstance(node, zarr.Array):
        letters = stored.get("stored_axes") or stored.get("axes") or _guess_axes(node.shape)
        if len(letters) != node.ndim:
            if node.ndim > MAX_NDIM:
                raise _too_many_dims(path, "?" * node.ndim, tuple(node.shape))
            raise ImageReadError(
                f"{path} holds a {node.ndim}-D array; napari-medseg reads 2-D to 4-D images."
            )
        ndim = node.ndim
        return _Store([node], letters, [np.ones(ndim)], [np.zeros(ndim)], [None] * ndim, attrs, stored)
    ngff = _ngff(attrs)
    multiscales = ngff.get("multiscales")
    if not multiscales:
        arrays = sorted(node.array_keys())
        if len(arrays) != 1:
            listing = ", ".join(arrays) if arrays else "none"
            raise ImageReadError(
                f"{path} is a zarr group without OME-Zarr 'multiscales' metadata and holds "
                f"{len(arrays)} arrays ({listing}); open one array's folder instead."
            )
        return _resolve(path / arrays[0])
    ms = multiscales[0]
    datasets = ms.get("datasets") or []
    if not datasets:
        raise ImageReadError(f"{path} has OME-Zarr metadata that lists no datasets.")
    arrays = []
    for ds in datasets:
        try:
            arrays.append(node[ds["path"]])
        except Exception as exc:  # noqa: BLE001
            raise ImageReadError(
                f"{path} lists the pyramid level {ds.get('path')!r}, which is missing or unreadable."
            ) from exc
    ndim = arrays[0].ndim
    axes_md = ms.get("axes")
    letters = _axis_letters(axes_md, path) if axes_md else _guess_axes(arrays[0].shape)
    if len(letters) != ndim:
        raise ImageReadError(f"{path} has {len(letters)} axes in its metadata but a {ndim}-D array.")
    units = [
        normalize_unit(a.get("unit")) if isinstance(a, dict) else None
        for a in (axes_md or [{}] * ndim)
    ]
    g_scale, g_trans = _transform(ms.get("coordinateTransformations"), ndim)
    scales, translations = [], []
    for ds in datasets:
        s, t = _transform(ds.get("coordinateTransformations"), ndim)
        scales.append(s * g_scale)
        translations.append(t * g_scale + g_trans)
    return _Store(arrays, letters, scales, translations, units, attrs, stored)


def read_zarr_levels(path: str | os.PathLike) -> tuple[list[Any], list[ImageMeta]]:
    """All pyramid levels of a zarr / OME-Zarr image, lazily.

    Args:
        path: the ``.zarr`` folder (a group with NGFF metadata, or an array).

    Returns:
        ``(levels, metas)``: dask arrays from full to lowest resolution, all with axes
        ``metas[i].axes`` (size-1 axes other than Y/X dropped), and one :class:`ImageMeta`
        per level (spacing and origin of that level).

    Raises:
        ImageReadError: the store is not readable, has inconsistent metadata, or is more
            than 4-D.
    """
    import dask.array as da

    p = Path(path)
    found = _resolve(p)
    arrays, letters, stored = found.arrays, found.letters, found.stored
    scales, translations, units = found.scales, found.translations, found.units
    shape0 = tuple(arrays[0].shape)
    keep = [i for i, (a, n) in enumerate(zip(letters, shape0)) if n > 1 or a in "YX"]
    axes = "".join(letters[i] for i in keep)
    if len(axes) > MAX_NDIM:
        raise _too_many_dims(p, axes, tuple(shape0[i] for i in keep))
    spatial = [i for i in keep if letters[i] in SPATIAL_AXES]
    is_labels = "image-label" in _ngff(found.attrs)
    label_names = _label_names(p)
    levels: list[Any] = []
    metas: list[ImageMeta] = []
    stored_ok = bool(stored) and stored.get("axes") and len(stored["axes"]) == len(axes)
    for lvl, arr in enumerate(arrays):
        if arr.ndim != len(letters):
            raise ImageReadError(
                f"{p} is inconsistent: pyramid level {lvl} has {arr.ndim} axes, level 0 has {len(letters)}."
            )
        data = da.from_zarr(arr)
        data = data.reshape(tuple(arr.shape[i] for i in keep)) if len(keep) != arr.ndim else data
        lvl_axes = axes
        rgb = False
        if stored_ok and stored.get("stored_axes") == axes and stored["axes"] != axes:
            # restore our axis order (e.g. an RGB ``YXC`` image NGFF wants as ``CYX``)
            order = [axes.index(a) for a in stored["axes"]]
            data = data.transpose(order)
            lvl_axes = stored["axes"]
            rgb = bool(stored.get("rgb", False))
        spacing = tuple(float(scales[lvl][i]) for i in spatial)
        origin = tuple(float(translations[lvl][i]) for i in spatial)
        unit = tuple(units[i] for i in spatial)
        if any(s <= 0 for s in spacing):
            raise ImageReadError(f"{p} has a non-positive scale {spacing} at pyramid level {lvl}.")
        extra: dict[str, Any] = {}
        if stored_ok:
            extra.update(stored.get("extra") or {})
        extra.update({
            "format": "zarr",
            "level": lvl,
            "n_levels": len(arrays),
            "ngff_version": _ngff_version(found.attrs),
            "labels": is_labels,
        })
        written = _chunks_written(arr)
        if written is not None:
            extra["chunks_written"] = written
        if label_names:
            extra["label_names"] = label_names
        affine = stored.get("affine") if stored_ok and lvl == 0 else None
        meta = ImageMeta(
            axes=lvl_axes, spacing=_reorder(spacing, axes, lvl_axes),
            origin=_reorder(origin, axes, lvl_axes), units=_reorder(unit, axes, lvl_axes),
            affine=affine, source=str(p), rgb=rgb, extra=extra,
        )
        levels.append(data)
        metas.append(meta)
    return levels, metas


def _reorder(values: tuple, axes: str, new_axes: str) -> tuple:
    """Per-spatial-axis values from the spatial order of ``axes`` to that of ``new_axes``."""
    old = [a for a in axes if a in SPATIAL_AXES]
    lookup = dict(zip(old, values))
    return tuple(lookup[a] for a in new_axes if a in SPATIAL_AXES)


def _ngff_version(attrs: dict) -> str | None:
    ome = attrs.get("ome")
    if isinstance(ome, dict) and ome.get("version"):
        return str(ome["version"])
    ms = _ngff(attrs).get("multiscales") or [{}]
    version = ms[0].get("version") if isinstance(ms[0], dict) else None
    return str(version) if version else None


def _label_names(path: Path) -> list[str]:
    """Names listed in the ``labels`` group of an OME-Zarr image (empty if none)."""
    labels = path / "labels"
    if not labels.is_dir():
        return []
    try:
        import zarr

        group = zarr.open_group(str(labels), mode="r")
        names = _ngff(dict(group.attrs)).get("labels") or []
    except Exception:  # noqa: BLE001 - a broken labels group must not stop the image
        return []
    return [str(n) for n in names if (labels / str(n)).is_dir()]


def read_zarr(path: str | os.PathLike, level: int | None = None) -> tuple[Any, ImageMeta]:
    """One pyramid level of a zarr / OME-Zarr image as a dask array.

    Args:
        path: the ``.zarr`` folder.
        level: 0 = full resolution (the default); higher = coarser.

    Returns:
        ``(array, meta)`` with ``meta.extra["level"]`` and ``["n_levels"]``.
    """
    levels, metas = read_zarr_levels(path)
    lvl = 0 if level is None else int(level)
    if not 0 <= lvl < len(levels):
        raise ImageReadError(f"{path} has {len(levels)} pyramid level(s); level {level} does not exist.")
    return levels[lvl], metas[lvl]


def _ngff_axes(axes: str, units: dict[str, str | None]) -> list[dict[str, str]]:
    out = []
    for letter in axes:
        entry = {"name": "i" if letter == "I" else letter.lower()}
        if letter in _TYPE_OF:
            entry["type"] = _TYPE_OF[letter]
        if units.get(letter):
            entry["unit"] = units[letter]  # type: ignore[assignment]
        out.append(entry)
    return out


#: NGFF's axis order: time, then channel, then space.
_NGFF_ORDER = {"T": 0, "I": 1, "C": 2, "Z": 3, "Y": 4, "X": 5}


def _check_target(p: Path, n_levels: int) -> None:
    """Refuse a target that exists and is neither a zarr store nor an empty folder.

    Raises:
        ImageWriteError: the target is taken, or ``n_levels`` is below 1.
    """
    is_store = p.is_dir() and any((p / m).exists() for m in ("zarr.json", ".zgroup", ".zarray"))
    if p.exists() and not is_store and not (p.is_dir() and not any(p.iterdir())):
        raise ImageWriteError(
            f"Cannot write {p}: it exists and is not a zarr store, so it was left alone."
        )
    if n_levels < 1:
        raise ImageWriteError(f"Cannot write {p}: n_levels must be at least 1, got {n_levels}.")


def _in_ngff_order(p: Path, array: Any, meta: ImageMeta) -> tuple[Any, str]:
    """``(data, axes)``: the array (bool as uint8) transposed to NGFF's axis order.

    Raises:
        ImageWriteError: the array's dimensions do not match ``meta.axes``.
    """
    data = array
    if getattr(data, "dtype", None) == bool:
        data = data.astype(np.uint8)
    if data.ndim != meta.ndim:
        raise ImageWriteError(
            f"Cannot write {p}: the array is {data.ndim}-D but its axes are {meta.axes!r}."
        )
    ngff_axes = "".join(sorted(meta.axes, key=_NGFF_ORDER.__getitem__))
    if ngff_axes != meta.axes:
        data = data.transpose([meta.axes.index(a) for a in ngff_axes])
    return data, ngff_axes


def _write_level(group: Any, lvl: int, data: Any, axes: str, chunks: tuple[int, ...]) -> None:
    """Array ``str(lvl)``: every ``2**lvl``-th pixel of Y and X (nearest neighbour)."""
    factor = 2**lvl
    index = tuple(slice(None, None, factor) if a in "YX" else slice(None) for a in axes)
    level_data = data[index]
    lvl_chunks = tuple(min(c, n) for c, n in zip(chunks, level_data.shape))
    arr = group.create_array(
        str(lvl), shape=level_data.shape, dtype=level_data.dtype, chunks=lvl_chunks
    )
    if hasattr(level_data, "store") and hasattr(level_data, "dask"):
        # one dask chunk per zarr chunk: no two tasks ever write the same chunk
        level_data.rechunk(lvl_chunks).store(arr, lock=False)
    else:
        arr[...] = np.asarray(level_data)


def _level_transforms(meta: ImageMeta, axes: str, lvl: int) -> list[dict[str, Any]]:
    """The NGFF ``scale`` (and ``translation`` unless zero) of level ``lvl``."""
    factor = 2**lvl
    spacing = dict(zip(meta.spatial_axes, meta.spacing))
    origin = dict(zip(meta.spatial_axes, meta.origin))
    scale = [
        spacing.get(a, 1.0) * (factor if a in "YX" else 1) if a in SPATIAL_AXES else 1.0
        for a in axes
    ]
    translation = [origin.get(a, 0.0) if a in SPATIAL_AXES else 0.0 for a in axes]
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
    if any(translation):
        transforms.append({"type": "translation", "translation": translation})
    return transforms


def _group_attrs(
    p: Path, meta: ImageMeta, axes: str, name: str | None, n_levels: int, labels: bool
) -> dict[str, Any]:
    """The group's attributes: NGFF ``multiscales`` (and ``image-label``) plus our ImageMeta."""
    multiscale = {
        "version": NGFF_VERSION,
        "name": name or p.name.split(".")[0],
        "axes": _ngff_axes(axes, dict(zip(meta.spatial_axes, meta.units))),
        "datasets": [
            {"path": str(lvl), "coordinateTransformations": _level_transforms(meta, axes, lvl)}
            for lvl in range(n_levels)
        ],
        "type": "nearest" if n_levels > 1 else None,
    }
    multiscale = {k: v for k, v in multiscale.items() if v is not None}
    stored = meta.to_dict()
    stored.pop("source", None)
    stored["stored_axes"] = axes
    attrs: dict[str, Any] = {"multiscales": [multiscale], _META_KEY: stored}
    if labels:
        label_md: dict[str, Any] = {"version": NGFF_VERSION}
        if p.parent.name == "labels":
            label_md["source"] = {"image": "../../"}
        attrs["image-label"] = label_md
    return attrs


def write_zarr(
    path: str | os.PathLike,
    array: Any,
    meta: ImageMeta,
    *,
    labels: bool = False,
    name: str | None = None,
    n_levels: int = 1,
    chunks: tuple[int, ...] | None = None,
) -> Path:
    """Write an OME-Zarr 0.4 image or label image.

    Args:
        path: target ``.zarr`` folder (replaced if it is a zarr store already), or
            ``image.zarr/labels/<name>`` to add a label image to an existing OME-Zarr image.
        array: numpy or dask data with axes ``meta.axes``.
        meta: geometry to store.
        labels: mark the group as an NGFF ``image-label``.
        name: the multiscale's name (default: the folder name).
        n_levels: pyramid levels to write; each halves Y and X by taking every second pixel
            (nearest neighbour, so label values stay valid and voxel centres stay put).
        chunks: chunk shape of level 0 (default: whole YX planes up to 512 x 512).

    Returns:
        The path written.

    Raises:
        ImageWriteError: the target exists and is not a zarr store, or writing fails.
    """
    import zarr

    p = Path(path)
    _check_target(p, n_levels)
    data, ngff_axes = _in_ngff_order(p, array, meta)
    if chunks is None:
        chunks = tuple(min(n, 512) if a in "YX" else 1 for a, n in zip(ngff_axes, data.shape))
    try:
        _prepare_labels_parent(p)
        group = zarr.open_group(str(p), mode="w", zarr_format=2)
        for lvl in range(n_levels):
            _write_level(group, lvl, data, ngff_axes, chunks)
        group.attrs.update(_group_attrs(p, meta, ngff_axes, name, n_levels, labels))
        _register_label(p)
    except ImageWriteError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageWriteError(f"Cannot write {p}: {brief(exc)}.") from exc
    return p


def _prepare_labels_parent(path: Path) -> None:
    """Create ``image.zarr/labels`` as a zarr group when writing a label image into it."""
    import zarr

    parent = path.parent
    image_is_zarr = any((parent.parent / m).exists() for m in (".zattrs", ".zgroup", "zarr.json"))
    if parent.name != "labels" or not image_is_zarr:
        return
    if not any((parent / m).exists() for m in (".zgroup", "zarr.json")):
        zarr.open_group(str(parent), mode="a", zarr_format=2)


def _register_label(path: Path) -> None:
    """Add ``path.name`` to the ``labels`` list of ``image.zarr/labels`` if it is one."""
    import zarr

    parent = path.parent
    if parent.name != "labels" or not any((parent / m).exists() for m in (".zgroup", "zarr.json")):
        return
    group = zarr.open_group(str(parent), mode="a")
    names = list(_ngff(dict(group.attrs)).get("labels") or [])
    if path.name not in names:
        names.append(path.name)
        group.attrs.update({"labels": names})
