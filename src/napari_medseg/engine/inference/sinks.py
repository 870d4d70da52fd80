"""Where prediction outputs go: numpy arrays in memory, or a zarr store written as it goes.

A :class:`ZarrSink` receives each band of rows as the stitcher finishes it, so a volume larger
than memory is predicted with memory for one slice's band. After each finished slice it
records the slice in the store's attributes, and within a slice the rows written so far
(``rows``: slice -> rows, after each band); running the same prediction into the same store
again skips those slices and, in a slice left half done, those rows (resume). The attributes also hold a fingerprint of the run (image
shape and dtype, network and weights, settings that change the result): a store holding a
different run is never mixed with this one.

Store layout (zarr v3 group, readable by any zarr client)::

    OUT.zarr/
        mask            uint8/uint16, the image's axes without C (in-plane axes x scale)
        probabilities   float16 or uint8, K x (mask axes)
        boundary        uint8
        variance        float16
        instances       int32
        attrs["napari_medseg"] = {"format", "fingerprint", "finished": [...],
                                  "rows": {slice: rows}, "complete", ...}

Each array's attributes give its axes (``attrs["napari_medseg"]["axes"]``, e.g. ``"ZYX"``,
``"CZYX"``), and the group carries OME-Zarr 0.4 ``multiscales`` metadata naming ``mask`` as its
image, so ``napari_medseg.io.read_image("OUT.zarr")`` opens the mask with its geometry and
``read_image("OUT.zarr/probabilities")`` any other output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ImageWriteError

__all__ = ["STORE_FORMAT", "OutputSink", "MemorySink", "SizingSink", "ZarrSink"]

STORE_FORMAT = "napari-medseg-prediction"
_KEY = "napari_medseg"


class OutputSink:
    """Arrays by output name, plus the record of finished planes."""

    def __init__(self) -> None:
        self.arrays: dict[str, Any] = {}
        self.finished: set[int] = set()
        #: rows written so far of planes not finished (first spatial axis, output rows).
        self.rows: dict[int, int] = {}

    def create(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: Any,
        chunks: tuple[int, ...] | None = None,
        axes: str | None = None,
    ) -> Any:
        """The array ``name`` (created zero-filled, or reopened when resuming)."""
        raise NotImplementedError

    def mark_finished(self, plane: int) -> None:
        """Record that plane ``plane`` is written."""
        self.finished.add(int(plane))
        self.rows.pop(int(plane), None)

    def mark_rows(self, plane: int, rows: int) -> None:
        """Record that the first ``rows`` output rows of plane ``plane`` are written (only a
        store keeps it: the in-memory sinks have nothing to resume)."""

    def close(self, complete: bool, info: dict | None = None) -> None:
        """Record the end of the run (``complete`` False when cancelled)."""


class MemorySink(OutputSink):
    """Outputs as numpy arrays in memory."""

    def create(self, name, shape, dtype, chunks=None, axes=None):
        array = self.arrays.get(name)
        if array is None or array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
            array = np.zeros(shape, dtype)
            self.arrays[name] = array
        return array


class SizingSink(MemorySink):
    """Outputs of the right shape and type that hold no memory (read-only zero views): what
    a plan sizes the in-memory outputs with, without allocating them."""

    def create(self, name, shape, dtype, chunks=None, axes=None):
        array = np.broadcast_to(np.zeros((), dtype), tuple(shape))
        self.arrays[name] = array
        return array


class ZarrSink(OutputSink):
    """Outputs streamed into a zarr v3 group, resumable.

    Args:
        path: the store folder (``.zarr``); created when absent.
        fingerprint: identifies the run; a store with another fingerprint is not reused.
        resume: reuse the finished planes of a store with the same fingerprint (False starts
            that run over).
        overwrite: replace a store that holds another run (or anything else).

    Raises:
        ImageWriteError: the path holds something else and ``overwrite`` is False.
    """

    def __init__(
        self,
        path: str | Path,
        fingerprint: str,
        resume: bool = True,
        overwrite: bool = False,
    ) -> None:
        import zarr

        super().__init__()
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.resumed = False
        fresh = True
        if self.path.exists():
            attrs = _read_attrs(self.path)
            same_run = attrs is not None and attrs.get("fingerprint") == fingerprint
            if same_run:
                fresh = not resume  # the same run: resume it, or start it over
            elif not overwrite and (attrs is not None or not self.path.is_dir()
                                    or any(self.path.iterdir())):
                what = "another prediction run" if attrs is not None else "other data"
                raise ImageWriteError(
                    f"The store {self.path} holds {what}; choose another output path or "
                    "allow overwriting it."
                )
        if fresh:
            if self.path.is_dir():
                shutil.rmtree(self.path)
            elif self.path.exists():
                self.path.unlink()
            self.group = zarr.open_group(str(self.path), mode="w")
            self._attrs = {"format": STORE_FORMAT, "version": 1, "fingerprint": fingerprint,
                           "finished": [], "complete": False}
            self.group.attrs[_KEY] = self._attrs
        else:
            self.group = zarr.open_group(str(self.path), mode="a")
            self._attrs = dict(self.group.attrs[_KEY])
            self.finished = {int(i) for i in self._attrs.get("finished", [])}
            self.rows = {int(k): int(v) for k, v in (self._attrs.get("rows") or {}).items()
                         if int(k) not in self.finished}
            self.resumed = bool(self.finished or self.rows)

    def create(self, name, shape, dtype, chunks=None, axes=None):
        shape = tuple(int(s) for s in shape)
        if name in self.group:
            array = self.group[name]
            if tuple(array.shape) == shape and array.dtype == np.dtype(dtype):
                self.arrays[name] = array
                return array
        if chunks is None:
            chunks = tuple(min(s, 1024) for s in shape)
        array = self.group.create_array(
            name, shape=shape, dtype=np.dtype(dtype), chunks=tuple(chunks), fill_value=0,
            overwrite=True, attributes={_KEY: {"axes": axes}} if axes else None,
        )
        self.arrays[name] = array
        return array

    def describe_image(
        self,
        name: str,
        axes: str,
        spacing: tuple[float, ...] | None = None,
        units: tuple[str | None, ...] | None = None,
    ) -> None:
        """Name array ``name`` the group's image in OME-Zarr 0.4 ``multiscales`` metadata.

        Args:
            name: the array (``"mask"``).
            axes: its axes, letters from ``TICZYX``.
            spacing: physical size per axis (1 for non-spatial axes); None for pixels.
            units: unit per axis (None where unknown).
        """
        kinds = {"T": "time", "C": "channel", "I": None, "Z": "space", "Y": "space", "X": "space"}
        ngff_axes = []
        for i, a in enumerate(axes):
            entry: dict[str, Any] = {"name": a.lower()}
            if kinds[a]:
                entry["type"] = kinds[a]
            if units and units[i] and kinds[a] == "space":
                entry["unit"] = units[i]
            ngff_axes.append(entry)
        scale = [float(v) for v in (spacing or (1.0,) * len(axes))]
        self.group.attrs["multiscales"] = [{
            "version": "0.4", "name": name, "axes": ngff_axes,
            "datasets": [{"path": name, "coordinateTransformations": [
                {"type": "scale", "scale": scale}]}],
        }]

    def mark_finished(self, plane: int) -> None:
        super().mark_finished(plane)
        self._attrs["finished"] = sorted(self.finished)
        self._attrs["rows"] = {str(k): v for k, v in sorted(self.rows.items())}
        self.group.attrs[_KEY] = self._attrs

    def mark_rows(self, plane: int, rows: int) -> None:
        if int(rows) <= self.rows.get(int(plane), 0):
            return
        self.rows[int(plane)] = int(rows)
        self._attrs["rows"] = {str(k): v for k, v in sorted(self.rows.items())}
        self.group.attrs[_KEY] = self._attrs

    def close(self, complete: bool, info: dict | None = None) -> None:
        self._attrs["complete"] = bool(complete)
        if info:
            self._attrs["run"] = json.loads(json.dumps(info, default=str))
        self.group.attrs[_KEY] = self._attrs


def _read_attrs(path: Path) -> dict | None:
    """The napari-medseg attributes of a zarr group at ``path``, or None."""
    meta = path / "zarr.json"
    if not meta.is_file():
        return None
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    attrs = data.get("attributes", {}).get(_KEY)
    if isinstance(attrs, dict) and attrs.get("format") == STORE_FORMAT:
        return attrs
    return None
