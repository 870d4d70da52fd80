"""Merging tile outputs: blending weights and a band-streaming stitcher.

* :func:`tile_weight` gives the blending weight of a tile: ``gaussian`` (sigma = 0.125 x the
  tile side, normalised to 1 at the centre and floored at 1e-3 like MONAI, so border pixels
  seen by one tile only still get a finite average), ``constant`` (plain average) or ``crop``
  (each pixel from the one tile whose centre region owns it: no averaging, for thin
  boundary maps).
* :class:`Stitcher` accumulates weighted tile outputs in a band one tile high that slides
  along the first spatial axis: rows that no later tile touches are normalised and handed to
  a callback at once, so memory is one band, not the whole output.

The tiles come from a :class:`~.tiling.TileGrid`; :func:`~.tiling.sliding_window_iter` is
the loop that feeds a stitcher.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .tiling import Tile, TileGrid

__all__ = ["BLEND_MODES", "EmitFn", "gaussian_weight_1d", "tile_weight", "Stitcher"]

BLEND_MODES = ("gaussian", "constant", "crop")


@lru_cache(maxsize=64)
def gaussian_weight_1d(length: int, sigma_scale: float = 0.125) -> np.ndarray:
    """A gaussian over ``length`` pixels centred on the tile, peak 1 (float64).

    Args:
        length: tile side in output pixels.
        sigma_scale: sigma as a fraction of ``length``.
    """
    centre = (length - 1) / 2.0
    sigma = max(sigma_scale * length, 1e-6)
    x = np.arange(length, dtype=np.float64) - centre
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w.setflags(write=False)
    return w


def _crop_weight_1d(grid: TileGrid, axis: int, index: int) -> np.ndarray:
    """1 where tile ``index`` owns the pixel along ``axis`` (output pixels), else 0.

    The owner of a pixel in an overlap is the tile whose centre is nearer: the overlap of
    tiles i-1 and i is split in the middle.
    """
    starts = grid.starts[axis]
    t = grid.tile[axis]
    s = grid.scale
    lo = 0 if index == 0 else (starts[index] + starts[index - 1] + t) * s // 2
    hi = grid.padded[axis] * s if index == len(starts) - 1 else (
        (starts[index + 1] + starts[index] + t) * s // 2)
    w = np.zeros(t * s, np.float64)
    w[max(0, lo - starts[index] * s): max(0, hi - starts[index] * s)] = 1.0
    return w


def tile_weight(
    grid: TileGrid,
    tile: Tile,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    min_weight: float = 1e-3,
    dtype: type | np.dtype = np.float32,
) -> np.ndarray:
    """The blending weight of one tile's output (shape ``grid.out_tile``).

    Args:
        grid: the tile grid.
        tile: the tile (``crop`` weights depend on its neighbours).
        mode: ``gaussian``, ``constant`` or ``crop``.
        sigma_scale: gaussian sigma as a fraction of the tile side.
        min_weight: floor of the gaussian weight (relative to its peak of 1).
        dtype: dtype of the result.
    """
    if mode == "constant":
        return np.ones(grid.out_tile, dtype)
    if mode == "gaussian":
        parts = [gaussian_weight_1d(n, float(sigma_scale)) for n in grid.out_tile]
        w = parts[0]
        for p in parts[1:]:
            w = np.multiply.outer(w, p)
        w = w / w.max()
        return np.maximum(w, min_weight).astype(dtype)
    if mode == "crop":
        parts = [_crop_weight_1d(grid, a, i) for a, i in enumerate(tile.index)]
        w = parts[0]
        for p in parts[1:]:
            w = np.multiply.outer(w, p)
        return w.astype(dtype)
    raise ValueError(f"unknown blend mode {mode!r}; choose one of {', '.join(BLEND_MODES)}")


#: ``emit(start, stop, values)``: output rows ``[start, stop)`` (first spatial axis, image
#: output coordinates) are final; ``values`` is C x rows x (other output axes), float32.
EmitFn = Callable[[int, int, np.ndarray], None]


class Stitcher:
    """Weighted average of tile outputs, streamed out band by band.

    Tiles must be added in the grid's raster order (first spatial axis outermost); when a
    tile of a new grid row arrives, the rows no later tile can touch are final: they are
    divided by their summed weights, cropped to the image and passed to ``emit``. The buffer
    holds one tile row (tile height x padded width x channels).

    Args:
        grid: the tile grid.
        channels: channels of each tile output.
        emit: receives the finished rows.
        blend: ``gaussian``, ``constant`` or ``crop``.
        sigma_scale: gaussian sigma as a fraction of the tile side.
        min_weight: floor of the gaussian weight.
        dtype: accumulator precision. float64 (the default) makes the stitch exact: a pixel
            seen identically by every tile comes back bit for bit after the cast to
            float32, whatever the overlap; float32 (what the inference engine uses) halves
            the band's memory and is 2-4x faster, within float32 rounding (~1e-7).
        resume_row: the first output row (image coordinates) to emit: the rows above it are
            already written (a resumed plane). The first tile added may then start past the
            top of the grid (the tile loop skips the tiles that end above this row); rows
            above it are never emitted, so the partial sums there do not matter.
    """

    def __init__(
        self,
        grid: TileGrid,
        channels: int,
        emit: EmitFn,
        blend: str = "gaussian",
        sigma_scale: float = 0.125,
        min_weight: float = 1e-3,
        dtype: type | np.dtype = np.float64,
        resume_row: int = 0,
    ) -> None:
        if blend not in BLEND_MODES:
            raise ValueError(f"unknown blend mode {blend!r}")
        self.grid = grid
        self.channels = int(channels)
        self.emit = emit
        self.blend = blend
        self.sigma_scale = sigma_scale
        self.min_weight = min_weight
        s = grid.scale
        band = (grid.out_tile[0],) + tuple(p * s for p in grid.padded[1:])
        self.dtype = np.dtype(dtype)
        self._acc = np.zeros((self.channels,) + band, self.dtype)
        self._wsum = np.zeros(band, self.dtype)
        self._scratch = np.empty((self.channels,) + grid.out_tile, self.dtype)
        self._origin = 0  # padded output row of the band's first row
        self._emitted = 0  # padded output rows already emitted
        self._weight_cache: dict[tuple[int, ...], np.ndarray] = {}
        self._done = False
        self.resume_row = int(resume_row)
        self._started = False

    @property
    def nbytes(self) -> int:
        """Bytes held by the band buffers."""
        return self._acc.nbytes + self._wsum.nbytes

    def _weight(self, tile: Tile) -> np.ndarray:
        key = tile.index if self.blend == "crop" else ()
        w = self._weight_cache.get(key)
        if w is None:
            w = tile_weight(self.grid, tile, self.blend, self.sigma_scale, self.min_weight,
                            dtype=self.dtype)
            self._weight_cache[key] = w
        return w

    def add(self, tile: Tile, values: np.ndarray) -> None:
        """Add one tile's output.

        Args:
            tile: the tile, from ``grid``.
            values: C x (tile output shape), e.g. C x sH x sW.
        """
        if self._done:
            raise RuntimeError("this stitcher has already finished")
        values = np.asarray(values)
        expected = (self.channels,) + self.grid.out_tile
        if values.shape != expected:
            raise ValueError(f"tile output has shape {values.shape}, expected {expected}")
        row = tile.start[0] * self.grid.scale
        if not self._started and self.resume_row and row > self._origin:
            self._origin = self._emitted = row  # a resumed plane starts at this tile row
        self._started = True
        if row < self._origin:
            raise RuntimeError("tiles must be added in raster order")
        if row > self._origin:
            self._advance(row)
        w = self._weight(tile)
        region = (slice(0, self.grid.out_tile[0]),) + tile.output_slices(self.grid.scale)[1:]
        # One buffer for the weighted values (cast to the accumulator's dtype on the way).
        np.multiply(values, w, out=self._scratch)
        self._acc[(slice(None),) + region] += self._scratch
        self._wsum[region] += w

    def _flush(self, rows: int) -> None:
        """Emit the first ``rows`` rows of the band (cropped to the image)."""
        if rows <= 0:
            return
        s = self.grid.scale
        lo_img = self.grid.pad_before[0] * s
        hi_img = lo_img + self.grid.shape[0] * s
        a = max(self._origin, lo_img + self.resume_row)
        b = min(self._origin + rows, hi_img)
        if b > a:
            crop = tuple(
                slice(pb * s, (pb + n) * s)
                for pb, n in zip(self.grid.pad_before[1:], self.grid.shape[1:])
            )
            band = slice(a - self._origin, b - self._origin)
            wsum = self._wsum[(band,) + crop]
            acc = self._acc[(slice(None), band) + crop]
            with np.errstate(invalid="ignore", divide="ignore"):
                values = (acc / wsum).astype(np.float32, copy=False)
            self.emit(a - lo_img, b - lo_img, values)
        self._emitted = self._origin + rows

    def _advance(self, new_origin: int) -> None:
        d = new_origin - self._origin
        height = self._wsum.shape[0]
        if d > height:
            raise RuntimeError("a tile row skipped part of the image")
        self._flush(d)
        if d < height:
            self._acc[:, : height - d] = self._acc[:, d:]
            self._wsum[: height - d] = self._wsum[d:]
        self._acc[:, height - d:] = 0.0
        self._wsum[height - d:] = 0.0
        self._origin = new_origin

    def finish(self) -> None:
        """Emit every remaining row; call once after the last tile."""
        if self._done:
            return
        self._flush(self._wsum.shape[0])
        self._done = True
