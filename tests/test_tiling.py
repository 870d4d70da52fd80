"""Tiling is exact: analytic predictors stitch back bit for bit, for every shape and blend."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.engine.inference.stitching import Stitcher, gaussian_weight_1d, tile_weight
from napari_medseg.engine.inference.tiling import (
    TileGrid,
    balance_tile,
    fit_tile,
    read_tile,
    sliding_window,
    sliding_window_iter,
    tile_starts,
)

OVERLAPS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9]
BLENDS = ["gaussian", "constant", "crop"]
SHAPES_2D = [(37, 53), (5, 7), (64, 64), (100, 31), (1, 1), (16, 200)]
SHAPES_3D = [(9, 20, 33), (3, 5, 7)]


def identity(batch):
    return batch


def plus_one(batch):
    return batch + 1


def zoom2(batch):
    out = batch
    for axis in range(2, batch.ndim):
        out = out.repeat(2, axis=axis)
    return out


PREDICTORS = {"identity": (identity, 1), "plus_one": (plus_one, 1), "zoom2": (zoom2, 2)}


def _image(shape, channels=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(channels,) + shape).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES_2D)
@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("predictor", sorted(PREDICTORS))
def test_2d_stitch_is_exact(shape, overlap, blend, predictor):
    fn, scale = PREDICTORS[predictor]
    image = _image(shape)
    out = sliding_window(image, fn, 16, overlap=overlap, blend=blend, divisor=8, min_size=8,
                         scale=scale, batch_size=3)
    expected = fn(image[None])[0]
    assert out.shape == expected.shape
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("shape", SHAPES_2D + [(512, 520), (203, 97)])
@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize("predictor", sorted(PREDICTORS))
def test_balanced_tiles_stitch_exactly_and_compute_fewer_pixels(shape, overlap, predictor):
    fn, scale = PREDICTORS[predictor]
    image = _image(shape)
    out = sliding_window(image, fn, 32, overlap=overlap, divisor=8, min_size=8, scale=scale,
                         batch_size=3, balance=True)
    assert np.array_equal(out, fn(image[None])[0])
    plain = TileGrid.build(shape, 32, overlap, 8, 8, scale)
    balanced = TileGrid.build(shape, 32, overlap, 8, 8, scale, balance=True)
    assert balanced.counts == plain.counts
    assert balanced.computed_pixels <= plain.computed_pixels
    assert all(b <= p for b, p in zip(balanced.tile, plain.tile))


@pytest.mark.parametrize("size,tile,overlap,expected", [
    (512, 256, 0.125, 192), (512, 256, 0.25, 208), (2048, 256, 0.125, 256),
    (200, 256, 0.125, 256), (256, 256, 0.125, 256), (257, 256, 0.0, 136),
])
def test_balance_tile_is_the_smallest_side_with_the_same_count(size, tile, overlap, expected):
    side = balance_tile(size, tile, overlap, divisor=8, min_size=8)
    assert side == expected
    if size > tile:
        n = len(tile_starts(size, tile, overlap))
        starts = tile_starts(size, side, overlap)
        assert len(starts) == n
        assert max(np.diff(starts)) <= int(side * (1 - overlap))  # overlap still >= asked
        assert len(tile_starts(size, side - 8, overlap)) > n  # one step smaller needs more


@pytest.mark.parametrize("shape", SHAPES_3D)
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("predictor", sorted(PREDICTORS))
def test_3d_stitch_is_exact(shape, overlap, blend, predictor):
    fn, scale = PREDICTORS[predictor]
    image = _image(shape, channels=1)
    out = sliding_window(image, fn, (8, 8, 16), overlap=overlap, blend=blend, divisor=4,
                         min_size=4, scale=scale, batch_size=2)
    assert np.array_equal(out, fn(image[None])[0])


@pytest.mark.parametrize("padding", ["reflect", "edge", "constant"])
def test_images_smaller_than_a_tile_are_padded_and_cropped(padding):
    image = _image((5, 9))
    out = sliding_window(image, plus_one, 64, divisor=16, min_size=32, padding=padding)
    assert np.array_equal(out, image + 1)
    grid = TileGrid.build((5, 9), 64, 0.25, divisor=16, min_size=32)
    assert grid.tile == (32, 32) and len(grid) == 1 and grid.padded == (32, 32)


def test_tile_larger_than_the_image_is_clamped_to_the_image():
    grid = TileGrid.build((300, 200), 512, 0.25, divisor=16, min_size=16)
    assert grid.tile == (304, 208)  # the smallest valid sides covering the image
    assert len(grid) == 1


@pytest.mark.parametrize("size,tile,divisor,min_size,expected", [
    (1000, 256, 16, 16, 256), (1000, 250, 16, 16, 240), (100, 256, 16, 16, 112),
    (5, 256, 16, 64, 64), (64, 64, 32, 64, 64), (1000, 8, 16, 32, 32),
])
def test_fit_tile(size, tile, divisor, min_size, expected):
    assert fit_tile(size, tile, divisor, min_size) == expected


@pytest.mark.parametrize("size,tile", [(16, 16), (17, 16), (100, 16), (257, 64), (1000, 256)])
@pytest.mark.parametrize("overlap", OVERLAPS)
def test_tile_starts_cover_evenly_with_at_least_the_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] == size - tile
    steps = np.diff(starts)
    assert np.all(steps >= 1) or len(starts) == 1
    if len(steps):
        assert steps.max() <= max(1, int(tile * (1 - overlap)))  # overlap >= the one asked
        assert steps.max() - steps.min() <= 1  # evenly spread
    covered = np.zeros(size, int)
    for s in starts:
        covered[s: s + tile] += 1
    assert covered.min() >= 1


def test_gaussian_weights_peak_one_floored_and_symmetric():
    grid = TileGrid.build((64, 64), 32, 0.5)
    w = tile_weight(grid, next(iter(grid)), "gaussian", 0.125, 1e-3)
    assert w.shape == (32, 32) and w.dtype == np.float32
    assert w.min() == pytest.approx(1e-3)  # MONAI's floor: border pixels keep a weight
    assert w.max() == pytest.approx(1.0)
    assert np.allclose(w, w[::-1, :]) and np.allclose(w, w[:, ::-1]) and np.allclose(w, w.T)
    g = gaussian_weight_1d(32, 0.125)
    sigma = 0.125 * 32
    assert g[0] == pytest.approx(np.exp(-0.5 * (15.5 / sigma) ** 2))


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("scale", [1, 2])
def test_crop_weights_partition_the_image(overlap, scale):
    grid = TileGrid.build((70, 45), 16, overlap, scale=scale)
    total = np.zeros(tuple(p * scale for p in grid.padded))
    for tile in grid:
        total[tile.output_slices(scale)] += tile_weight(grid, tile, "crop")
    assert np.array_equal(total, np.ones_like(total))  # each pixel owned by exactly one tile


def test_stitcher_streams_rows_in_order_and_holds_one_band():
    emitted = []
    grid = TileGrid.build((1000, 48), 32, 0.25)
    stitcher = Stitcher(grid, 1, lambda a, b, v: emitted.append((a, b, v.copy())), "gaussian")
    image = _image((1000, 48), channels=1)
    for tile in grid:
        stitcher.add(tile, read_tile(image, grid, tile))
        # Rows are emitted while tiles are still being added: memory is one band.
        assert stitcher.nbytes == (1 + 1) * 32 * 48 * 8
    stitcher.finish()
    assert len(emitted) == len(grid.starts[0])
    assert [e[0] for e in emitted] == sorted(e[0] for e in emitted)
    assert emitted[0][0] == 0 and emitted[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(emitted, emitted[1:]))
    merged = np.concatenate([e[2] for e in emitted], axis=1)
    assert np.array_equal(merged, image)


def test_stitcher_rejects_out_of_order_tiles():
    grid = TileGrid.build((64, 16), 16, 0.0)
    stitcher = Stitcher(grid, 1, lambda *a: None)
    tiles = list(grid)
    stitcher.add(tiles[1], np.zeros((1, 16, 16)))
    with pytest.raises(RuntimeError, match="raster order"):
        stitcher.add(tiles[0], np.zeros((1, 16, 16)))


@pytest.mark.parametrize("padding", ["reflect", "edge", "constant"])
def test_read_tile_matches_numpy_pad(padding):
    image = _image((7, 5), channels=1)
    grid = TileGrid.build((7, 5), 16, 0.0)
    pads = [(b, p - s - b) for s, p, b in zip(grid.shape, grid.padded, grid.pad_before)]
    mode = {"constant": "constant", "edge": "edge", "reflect": "reflect"}[padding]
    padded = np.pad(image, [(0, 0)] + pads, mode=mode)
    tile = next(iter(grid))
    assert np.array_equal(read_tile(image, grid, tile, padding), padded[(slice(None),)
                                                                       + tile.input_slices()])


def test_read_tile_reads_lazy_arrays_region_by_region(tmp_path):
    import dask.array as da
    import zarr

    image = _image((64, 80), channels=1)
    store = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=image.shape,
                            dtype=image.dtype, chunks=(1, 16, 16))
    store[...] = image
    for source in (store, da.from_array(image, chunks=(1, 32, 32))):
        out = sliding_window(source, plus_one, 32, overlap=0.5)
        assert np.array_equal(out, image + 1)


def test_grid_boxes_cover_the_image_once_clipped():
    grid = TileGrid.build((50, 70), 32, 0.25)
    covered = np.zeros((50, 70), bool)
    for lo, hi in grid.boxes():
        assert all(0 <= a < b <= n for a, b, n in zip(lo, hi, (50, 70)))
        covered[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    assert covered.all()
    assert grid.computed_pixels == len(grid) * 32 * 32


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
def test_empty_axes_are_refused(shape):
    with pytest.raises(ValueError):
        TileGrid.build(shape, 16)



# --- the tile loop ----------------------------------------------------------------------


def _loop(image, predictor, grid, channels, batch_size=3, **kwargs):
    """Run ``sliding_window_iter`` with one float64 stitcher per output; (outs, yields, done)."""
    outs = [np.full((c,) + grid.out_shape, np.nan, np.float32) for c in channels]

    def writer(out):
        def emit(a, b, values):
            out[:, a:b] = values
        return emit

    stitchers = [Stitcher(grid, c, writer(o)) for c, o in zip(channels, outs)]
    gen = sliding_window_iter(image, grid, predictor, stitchers, batch_size=batch_size,
                              **kwargs)
    yields = []
    while True:
        try:
            yields.append(next(gen))
        except StopIteration as stop:
            return outs, yields, stop.value


def test_the_loop_stitches_every_output_of_a_tuple_and_skips_none():
    image = _image((40, 56))
    grid = TileGrid.build((40, 56), 16, 0.5)

    def two_heads(batch):
        return batch + 1, None, batch.mean(axis=1, keepdims=True)

    outs, yields, done = _loop(image, two_heads, grid, (2, 1, 1))
    assert done and sum(yields) == len(grid) and max(yields) == 3
    assert np.array_equal(outs[0], image + 1)
    assert np.isnan(outs[1]).all()  # its output was None: never stitched, never emitted
    assert np.allclose(outs[2], image.mean(axis=0, keepdims=True), atol=1e-6)


def test_the_loop_asks_the_batch_size_before_every_batch_and_prepares_each_tile():
    image = _image((64, 64), channels=1)
    grid = TileGrid.build((64, 64), 16, 0.0)
    sizes = iter([1, 2, 4, 8, 16])
    seen = []

    def record(batch):
        seen.append(len(batch))
        return batch

    outs, yields, done = _loop(image, record, grid, (1,), batch_size=lambda: next(sizes),
                               prepare=lambda block: block * 2)
    assert done and seen == yields == [1, 2, 4, 8, 1]
    assert np.array_equal(outs[0], image * 2)


def test_the_loop_stops_unfinished_when_cancelled():
    image = _image((64, 64), channels=1)
    grid = TileGrid.build((64, 64), 16, 0.0)  # 4 rows of 4 tiles
    asked = []

    def cancelled():
        asked.append(True)
        return len(asked) == 2  # asked after every batch: cancel after the second

    outs, yields, done = _loop(image, identity, grid, (1,), batch_size=4, cancelled=cancelled)
    assert not done and yields == [4, 4]
    # Only the first row of tiles was final when it stopped (the stitcher is not finished).
    assert np.array_equal(outs[0][:, :16], image[:, :16])
    assert np.isnan(outs[0][:, 16:]).all()


def test_sliding_window_float32_accumulators_stay_within_rounding():
    image = _image((37, 53))
    exact = sliding_window(image, plus_one, 16, overlap=0.5)
    fast = sliding_window(image, plus_one, 16, overlap=0.5, dtype=np.float32)
    assert np.array_equal(exact, image + 1)
    assert np.abs(fast - exact).max() <= 1e-5
