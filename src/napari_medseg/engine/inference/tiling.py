"""Tile grids, tile reading and the tile loop; knows nothing about torch modules.

The pieces, used by :mod:`napari_medseg.engine.inference.pipeline` and proven exact with analytic
predictors in ``tests/test_tiling.py``:

* :class:`TileGrid` cuts a spatial shape (YX or ZYX, any size, also smaller than one tile)
  into tiles whose sides fit the network (multiples of its divisor, at least its minimum
  size). Tiles are spread evenly (the nnU-Net way) so every overlap is at least the one asked
  for. An image smaller than a tile is padded (reflect by default); the padding is cropped
  away again when stitching.
* :func:`read_tile` reads one tile from any array-like (numpy, zarr, dask) with the padding
  applied on the fly, so a large input is never loaded whole.
* :func:`sliding_window_iter` is the tile loop: it reads batches of tiles, runs a predictor
  and merges the outputs with band-streaming :class:`~.stitching.Stitcher` s (blending
  weights in :mod:`.stitching`). The inference engine runs it for every plane;
  :func:`sliding_window` runs it to the end for a numpy predictor, so the tests with
  analytic predictors prove the very loop the engine runs.

Outputs may be larger than inputs: with ``scale = s`` a tile of side T gives an output of side
``s * T`` (SASR-Net's super-resolved mask), placed at ``s`` times the tile's position.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .stitching import Stitcher

__all__ = [
    "fit_tile",
    "tile_starts",
    "balance_tile",
    "Tile",
    "TileGrid",
    "read_tile",
    "PredictorOutput",
    "sliding_window_iter",
    "sliding_window",
]

def fit_tile(size: int, requested: int, divisor: int = 1, min_size: int = 1) -> int:
    """The tile side used along one axis.

    The requested side is rounded down to a multiple of ``divisor`` (at least ``min_size``);
    a tile larger than the image shrinks to the smallest valid side that covers the image.

    Args:
        size: image side along the axis.
        requested: tile side asked for.
        divisor: the network's divisibility constraint.
        min_size: the network's smallest accepted side.
    """
    divisor = max(1, int(divisor))
    min_size = -(-max(1, int(min_size)) // divisor) * divisor
    tile = max(min_size, (int(requested) // divisor) * divisor)
    covering = max(min_size, -(-int(size) // divisor) * divisor)
    return min(tile, covering)


def tile_starts(size: int, tile: int, overlap: float) -> tuple[int, ...]:
    """Start positions of tiles of side ``tile`` covering ``[0, size)``, spread evenly.

    The number of tiles is the smallest that keeps every step at most ``tile * (1 - overlap)``
    (so the overlap is at least the one asked for); the steps are then made as equal as
    integers allow. ``size`` must be at least ``tile``.
    """
    if size < tile:
        raise ValueError(f"size {size} is smaller than the tile {tile}; pad first")
    if size == tile:
        return (0,)
    target = max(1, int(math.floor(tile * (1.0 - overlap))))
    n = -(-(size - tile) // target) + 1
    step = (size - tile) / (n - 1)
    return tuple(int(round(i * step)) for i in range(n))


def balance_tile(size: int, tile: int, overlap: float, divisor: int = 1,
                 min_size: int = 1) -> int:
    """The smallest valid tile side that covers ``size`` with as many tiles as ``tile`` needs.

    ``tile_starts(size, tile, overlap)`` decides how many tiles an axis needs; when the image
    is not a whole number of steps long, those tiles overlap more than asked and part of
    every tile is computed twice. This shrinks the side (keeping it a multiple of
    ``divisor`` and at least ``min_size``) while the same number of tiles still covers the
    axis with at least ``overlap`` of the new side shared. Never larger than ``tile``.
    """
    if size <= tile:
        return tile
    n = len(tile_starts(size, tile, overlap))
    divisor = max(1, int(divisor))
    floor = -(-max(1, int(min_size)) // divisor) * divisor
    best = tile
    candidate = tile - divisor
    while candidate >= floor and len(tile_starts(size, candidate, overlap)) <= n:
        best = candidate
        candidate -= divisor
    return best


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileGrid`.

    Attributes:
        index: position in the grid, one integer per spatial axis.
        start: first pixel in padded input coordinates, per spatial axis.
        size: tile side per spatial axis (input pixels).
    """

    index: tuple[int, ...]
    start: tuple[int, ...]
    size: tuple[int, ...]

    def input_slices(self) -> tuple[slice, ...]:
        """Slices of the tile in padded input coordinates."""
        return tuple(slice(s, s + t) for s, t in zip(self.start, self.size))

    def output_slices(self, scale: int = 1) -> tuple[slice, ...]:
        """Slices of the tile's output in padded output coordinates."""
        return tuple(slice(s * scale, (s + t) * scale) for s, t in zip(self.start, self.size))


@dataclass(frozen=True)
class TileGrid:
    """Tiles covering a spatial shape, in raster order (first axis outermost).

    Attributes:
        shape: spatial shape of the image (YX or ZYX), unpadded.
        tile: tile side per axis (each a valid network input side).
        padded: the shape after padding (``max(shape, tile)`` per axis).
        pad_before: padding added before the image along each axis (the rest goes after).
        starts: tile start positions per axis, in padded coordinates.
        scale: output side / input side of the predictor.
    """

    shape: tuple[int, ...]
    tile: tuple[int, ...]
    padded: tuple[int, ...]
    pad_before: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]
    scale: int = 1

    @classmethod
    def build(
        cls,
        shape: Sequence[int],
        tile: int | Sequence[int],
        overlap: float = 0.25,
        divisor: int = 1,
        min_size: int = 1,
        scale: int = 1,
        balance: bool = False,
    ) -> TileGrid:
        """A grid for ``shape`` with tiles fitted to the image and the network.

        Args:
            shape: spatial shape (YX or ZYX); every side at least 1.
            tile: requested tile side (one for every axis, or one per axis).
            overlap: fraction of a tile shared with its neighbour, in [0, 1).
            divisor: every tile side is a multiple of this.
            min_size: smallest tile side the predictor accepts.
            scale: output side / input side of the predictor.
            balance: shrink each tile side to the smallest that covers the axis with the
                same number of tiles (:func:`balance_tile`): fewer pixels computed twice.
        """
        shape = tuple(int(s) for s in shape)
        if any(s < 1 for s in shape):
            raise ValueError(f"every spatial side must be at least 1, got {shape}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        tiles = (tile,) * len(shape) if isinstance(tile, (int, np.integer)) else tuple(tile)
        if len(tiles) == 1 and len(shape) > 1:
            tiles = tiles * len(shape)
        if len(tiles) != len(shape):
            raise ValueError(f"tile {tile} does not match the {len(shape)} spatial axes")
        fitted = tuple(fit_tile(s, t, divisor, min_size) for s, t in zip(shape, tiles))
        if balance:
            fitted = tuple(balance_tile(s, t, overlap, divisor, min_size)
                           for s, t in zip(shape, fitted))
        padded = tuple(max(s, t) for s, t in zip(shape, fitted))
        pad_before = tuple((p - s) // 2 for s, p in zip(shape, padded))
        starts = tuple(tile_starts(p, t, overlap) for p, t in zip(padded, fitted))
        return cls(shape, fitted, padded, pad_before, starts, int(scale))

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.shape)

    @property
    def counts(self) -> tuple[int, ...]:
        """Tiles along each axis."""
        return tuple(len(s) for s in self.starts)

    def __len__(self) -> int:
        return math.prod(self.counts)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Spatial shape of the stitched output (``scale`` x the image)."""
        return tuple(s * self.scale for s in self.shape)

    @property
    def out_tile(self) -> tuple[int, ...]:
        """Spatial shape of one tile's output."""
        return tuple(t * self.scale for t in self.tile)

    @property
    def computed_pixels(self) -> int:
        """Input pixels the predictor sees in total (tiles x tile size)."""
        return len(self) * math.prod(self.tile)

    def __iter__(self) -> Iterator[Tile]:
        for index in itertools.product(*(range(n) for n in self.counts)):
            start = tuple(self.starts[a][i] for a, i in enumerate(index))
            yield Tile(index, start, self.tile)

    def boxes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Each tile as ``(start, stop)`` in image coordinates, clipped to the image.

        For drawing the plan on a canvas.
        """
        out = []
        for tile in self:
            lo = tuple(max(0, s - p) for s, p in zip(tile.start, self.pad_before))
            hi = tuple(
                min(n, s + t - p)
                for s, t, p, n in zip(tile.start, tile.size, self.pad_before, self.shape)
            )
            out.append((lo, hi))
        return out


def _source_index(
    start: int, stop: int, pad_before: int, size: int, mode: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Source indices of padded positions ``[start, stop)`` and a mask of real pixels.

    The mask is None when every position is inside the image (or padding repeats pixels).
    """
    idx = np.arange(start, stop) - pad_before
    inside = (idx >= 0) & (idx < size)
    if inside.all():
        return idx, None
    if mode == "reflect" and size > 1:
        period = 2 * (size - 1)
        idx = np.abs(idx) % period
        idx = np.where(idx >= size, period - idx, idx)
        return idx, None
    if mode in ("reflect", "edge"):
        return np.clip(idx, 0, size - 1), None
    if mode == "constant":
        return np.clip(idx, 0, size - 1), inside
    raise ValueError(f"unknown padding mode {mode!r}")


def read_tile(
    source, grid: TileGrid, tile: Tile, padding: str = "reflect", lead: int = 1
) -> np.ndarray:
    """Read one tile (with padding applied on the fly) from an array-like.

    Args:
        source: array-like (numpy, zarr, dask) of shape ``lead axes + grid.shape``, e.g.
            C x H x W. Only the needed region is read.
        grid: the grid the tile belongs to.
        tile: the tile.
        padding: ``reflect``, ``edge`` or ``constant`` (zeros).
        lead: number of leading non-spatial axes of ``source``.

    Returns:
        numpy array ``lead axes + tile.size``.
    """
    indices = []
    masks = []
    region = []
    for a, (s, t) in enumerate(zip(tile.start, tile.size)):
        idx, mask = _source_index(s, s + t, grid.pad_before[a], grid.shape[a], padding)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        region.append(slice(lo, hi))
        indices.append(idx - lo)
        masks.append(mask)
    block = np.asarray(source[(slice(None),) * lead + tuple(region)])
    for a, (idx, n) in enumerate(zip(indices, (r.stop - r.start for r in region))):
        if len(idx) != n or np.any(idx != np.arange(n)):
            block = np.take(block, idx, axis=lead + a)
    for a, mask in enumerate(masks):
        if mask is not None:
            shape = [1] * block.ndim
            shape[lead + a] = len(mask)
            block = block * mask.reshape(shape).astype(block.dtype)
    return block


#: A predictor's outputs for a batch: one array (N x C x out tile), or a tuple of them (or
#: None for an output it did not compute), each stitched by its own :class:`Stitcher`.
PredictorOutput = np.ndarray | tuple[np.ndarray | None, ...]


def sliding_window_iter(
    source,
    grid: TileGrid,
    predictor: Callable[[np.ndarray], PredictorOutput],
    stitchers: Sequence[Stitcher | None] | Callable[[tuple], Sequence[Stitcher | None]],
    *,
    batch_size: int | Callable[[], int] = 4,
    padding: str = "reflect",
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
    cancelled: Callable[[], bool] | None = None,
    resume_row: int = 0,
) -> Generator[int, None, bool]:
    """The tile loop: read batches of tiles, predict them, stitch the outputs band by band.

    Tiles are read in the grid's raster order (only their pixels, padded on the fly), stacked
    into batches, passed to ``predictor``, and each output goes to its stitcher, which hands
    the rows no later tile touches to its ``emit`` callback at once. The stitchers are
    finished after the last batch.

    Args:
        source: array-like C x (grid shape), read tile by tile.
        grid: the tile grid of ``source``.
        predictor: maps a batch N x C x (tile) to the outputs N x C' x (scale * tile): one
            array, or a tuple of arrays (None for one it skipped).
        stitchers: one stitcher (or None: not stitched) per predictor output, or a callable
            that opens them from the first batch's outputs (a tuple).
        batch_size: tiles per predictor call; a callable is asked before every batch (a
            predictor may shrink its batch on out-of-memory).
        padding: how the parts of a tile outside the image are filled.
        prepare: applied to each tile (C x tile) after reading it (normalization, checks).
        cancelled: asked after every batch; when true the loop stops unfinished.
        resume_row: output rows above this one (image coordinates, first spatial axis) are
            already written: the tiles that end above it are skipped (the stitchers must be
            made with the same ``resume_row``).

    Yields:
        The number of tiles of each batch done.

    Returns:
        True when every tile was stitched and the stitchers finished, False when cancelled.
    """
    size = batch_size if callable(batch_size) else (lambda: int(batch_size))
    tiles = list(grid)
    if resume_row:
        s = grid.scale
        top = (grid.pad_before[0] * s) + int(resume_row)
        tiles = [t for t in tiles if (t.start[0] + t.size[0]) * s > top]
    opened = None if callable(stitchers) else list(stitchers)
    i = 0
    while i < len(tiles):
        chunk = tiles[i: i + size()]
        if prepare is None:
            batch = np.stack([read_tile(source, grid, t, padding) for t in chunk])
        else:
            batch = np.stack([prepare(read_tile(source, grid, t, padding)) for t in chunk])
        outputs = predictor(batch)
        if not isinstance(outputs, tuple):
            outputs = (np.asarray(outputs),)
        if opened is None:
            opened = list(stitchers(outputs))
        for stitcher, values in zip(opened, outputs):
            if stitcher is not None and values is not None:
                for tile, v in zip(chunk, values):
                    stitcher.add(tile, v)
        i += len(chunk)
        yield len(chunk)
        if cancelled is not None and cancelled() and i < len(tiles):
            return False
    for stitcher in opened or ():
        if stitcher is not None:
            stitcher.finish()
    return True


def sliding_window(
    image: np.ndarray,
    predictor: Callable[[np.ndarray], np.ndarray],
    tile: int | Sequence[int],
    *,
    overlap: float = 0.25,
    blend: str = "gaussian",
    divisor: int = 1,
    min_size: int = 1,
    scale: int = 1,
    batch_size: int = 4,
    padding: str = "reflect",
    sigma_scale: float = 0.125,
    min_weight: float = 1e-3,
    balance: bool = False,
    dtype: type | np.dtype = np.float64,
) -> np.ndarray:
    """Run a numpy predictor over tiles of ``image`` and stitch its outputs.

    The same loop as the inference engine's (:func:`sliding_window_iter`), run to the end
    with one stitcher (its first output) writing into an array.

    Args:
        image: C x H x W or C x D x H x W (any array-like; read tile by tile).
        predictor: maps a batch N x C x (tile) to N x C' x (scale * tile) (or a tuple whose
            first array is that).
        tile: requested tile side(s); fitted to the image, ``divisor`` and ``min_size``.
        overlap: fraction of a tile shared with its neighbour.
        blend: ``gaussian``, ``constant`` or ``crop``.
        divisor: tile sides are multiples of this.
        min_size: smallest tile side.
        scale: output side / input side of the predictor.
        batch_size: tiles per predictor call.
        padding: how images smaller than a tile are padded.
        sigma_scale: gaussian sigma as a fraction of the tile side.
        min_weight: floor of the gaussian weight.
        balance: shrink the tiles to cover each axis with the same number of tiles.
        dtype: the stitcher's accumulators (float64 exact; float32 as the engine).

    Returns:
        float32 array C' x (scale * spatial shape).
    """
    grid = TileGrid.build(image.shape[1:], tile, overlap, divisor, min_size, scale,
                          balance=balance)
    out: list[np.ndarray] = []

    def emit(a: int, b: int, values: np.ndarray) -> None:
        out[0][:, a:b] = values

    def open_stitcher(outputs: tuple) -> list[Stitcher]:
        channels = outputs[0].shape[1]
        out.append(np.zeros((channels,) + grid.out_shape, np.float32))
        return [Stitcher(grid, channels, emit, blend, sigma_scale, min_weight, dtype)]

    for _ in sliding_window_iter(image, grid, predictor, open_stitcher, batch_size=batch_size,
                                 padding=padding):
        pass
    return out[0]
