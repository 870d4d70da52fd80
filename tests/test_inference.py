"""The inference engine with analytic networks: exact stitching, layouts, outputs, resume, OOM."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from analytic_models import AnalyticConfig, logits_of, make_analytic
from napari_medseg.config import PredictConfig
from napari_medseg.engine.inference import pipeline as inference
from napari_medseg.engine.inference import postprocess
from napari_medseg.engine.inference.pipeline import predict, predict_iter, tta_flips
from napari_medseg.engine.inference.planning import plan_prediction
from napari_medseg.engine.inference.predictor import TilePredictor, TileTooBig
from napari_medseg.engine.inference.tiling import TileGrid, sliding_window
from napari_medseg.engine.precision import resolve_precision
from napari_medseg.engine.progress import (
    CancelledEvent,
    CancelToken,
    FinishedEvent,
    NoticeEvent,
    PlaneEvent,
    PlanEvent,
    TilesEvent,
)
from napari_medseg.errors import ConfigError, ImageWriteError, InputShapeError
from napari_medseg.models.base import SegmentationNetwork

FP32 = {"precision": "fp32", "normalization": "none"}


def _img(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _reference(image_cfirst: np.ndarray, cfg: AnalyticConfig) -> np.ndarray:
    """Probabilities of the analytic network on the whole image at once (K x spatial)."""
    with torch.inference_mode():
        logits = logits_of(torch.from_numpy(image_cfirst[None].astype(np.float32)), cfg)[0]
    if cfg.num_classes == 1:
        return torch.sigmoid(logits).numpy()
    return torch.softmax(logits, dim=0).numpy()


def _events(gen):
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value


# --- exactness -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(45, 77), (8, 8), (130, 33)])
@pytest.mark.parametrize("blend", ["gaussian", "constant", "crop"])
@pytest.mark.parametrize("overlap", [0.0, 0.5])
@pytest.mark.parametrize("K,scale", [(1, 1), (3, 1), (2, 2)])
def test_tiled_prediction_equals_the_whole_image(shape, blend, overlap, K, scale):
    model = make_analytic(num_classes=K, scale=scale)
    image = _img(shape)
    result = predict(image, model, outputs="mask,probabilities", tile=16, overlap=overlap,
                     blend=blend, **FP32)
    ref = _reference(image[None], model.config)
    probs = result["probabilities"].astype(np.float32)
    assert probs.shape == (K,) + tuple(s * scale for s in shape)
    assert np.abs(probs - ref).max() <= 1e-3  # float16 storage
    clear = np.abs(_reference(image[None], AnalyticConfig(scale=scale))[0] - 0.5) > 1e-3
    expected = (ref[0] > 0.5) if K == 1 else ref.argmax(0)
    assert np.array_equal(result["mask"][clear], expected[clear])
    assert result.axes == {"mask": "YX", "probabilities": "CYX"}


@pytest.mark.parametrize("kind,scale", [("identity", 1), ("plus_one", 1), ("identity", 2)])
@pytest.mark.parametrize("K", [1, 2])
def test_the_engine_runs_the_tested_loop(kind, scale, K):
    # sliding_window (the loop tests/test_tiling.py proves exact) with the engine's own tile
    # predictor and float32 accumulators gives bit for bit what predict() writes.
    model = make_analytic(kind=kind, scale=scale, num_classes=K)
    image = _img((45, 77), seed=2)
    tiling = PredictConfig().tiling
    result = predict(image, model, outputs="mask,probabilities", tile=16, overlap=0.5,
                     batch_size=3, device="cpu", **FP32)
    predictor = TilePredictor(model, torch.device("cpu"), resolve_precision("fp32", "cpu"),
                              channels_last=True, batch_size=3)
    stitched = sliding_window(
        image[None], predictor, 16, overlap=0.5, blend=tiling.blend, divisor=8, min_size=8,
        scale=scale, batch_size=3, padding=tiling.padding, sigma_scale=tiling.sigma_scale,
        min_weight=tiling.min_weight, balance=tiling.balance, dtype=np.float32)
    assert result.plan.grid.tile == TileGrid.build(image.shape, 16, 0.5, 8, 8, scale,
                                                   balance=tiling.balance).tile
    probs = postprocess.two_class(stitched[0]) if K == 2 else stitched
    assert np.array_equal(result["probabilities"],
                          postprocess.quantize_probabilities(probs, "float16"))
    assert np.array_equal(result["mask"],
                          postprocess.mask_from_probabilities(stitched, 0.5))


def test_uint8_probabilities_are_scaled():
    model = make_analytic()
    image = _img((40, 40))
    result = predict(image, model, outputs="probabilities", probabilities_dtype="uint8", **FP32)
    p = result["probabilities"]
    assert p.dtype == np.uint8
    ref = _reference(image[None], model.config)
    assert np.abs(p / 255.0 - ref).max() <= 0.5 / 255 + 1e-6


# --- layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("axes,shape", [("YXC", (40, 50, 3)), ("CYX", (3, 40, 50))])
def test_2d_with_channels(axes, shape):
    model = make_analytic(in_channels=3)
    image = _img(shape)
    result = predict(image, model, outputs="probabilities", axes=axes, **FP32)
    cfirst = np.moveaxis(image, -1, 0) if axes == "YXC" else image
    assert np.abs(result["probabilities"] - _reference(cfirst, model.config)).max() <= 1e-3
    assert result.axes["probabilities"] == "CYX"


def test_rgb_image_on_a_grey_network_is_converted_with_a_notice():
    model = make_analytic(in_channels=1)
    image = _img((30, 40, 3))
    events, result = _events(predict_iter(image, model, outputs="probabilities", axes="YXC",
                                          **FP32))
    notices = [e.message for e in events if isinstance(e, NoticeEvent)]
    assert any("RGB to grey" in n for n in notices)
    grey = (image * np.array([0.2125, 0.7154, 0.0721], np.float32)).sum(-1)
    assert np.abs(result["probabilities"][0] - _reference(grey[None], model.config)[0]).max() \
        <= 1e-3


def test_grey_image_on_an_rgb_network_is_converted():
    model = make_analytic(in_channels=3)
    result = predict(_img((30, 40)), model, **FP32)
    assert any("grey to RGB" in n for n in result.notices)


def test_wrong_channel_count_says_what_the_network_expects():
    model = make_analytic(in_channels=1)
    with pytest.raises(InputShapeError, match="expects 1"):
        predict(_img((2, 30, 40)), model, axes="CYX", **FP32)
    with pytest.raises(InputShapeError, match="expects 3"):
        predict(_img((30, 40)), make_analytic(in_channels=3), channels="grey", **FP32)


@pytest.mark.parametrize("axis", ["Z", "Y", "X"])
def test_volume_slice_wise_along_any_axis(axis):
    model = make_analytic(kind="plus_one")
    volume = _img((5, 24, 36))
    result = predict(volume, model, axes="ZYX", axis=axis, outputs="mask,probabilities",
                     tile=16, **FP32)
    ref = _reference(volume[None], model.config)  # pointwise: slicing must not matter
    assert result["probabilities"].shape == (1, 5, 24, 36)
    assert np.abs(result["probabilities"] - ref).max() <= 1e-3
    assert result.plan.planes == {"Z": 5, "Y": 24, "X": 36}[axis]
    assert 0.0 <= result.stats["z_consistency"] <= 1.0


def test_z_consistency_scores_slice_agreement():
    model = make_analytic()
    steady = np.repeat(_img((1, 32, 32)), 6, axis=0)
    flicker = steady * np.array([1, -1, 1, -1, 1, -1], np.float32)[:, None, None]
    assert predict(steady, model, axes="ZYX", **FP32).stats["z_consistency"] == 1.0
    assert predict(flicker, model, axes="ZYX", **FP32).stats["z_consistency"] < 0.1


def test_orthogonal_consensus_of_a_pointwise_network_agrees_everywhere():
    model = make_analytic(num_classes=2)
    volume = _img((6, 20, 28))
    result = predict(volume, model, axes="ZYX", volume_mode="orthogonal", tile=16,
                     outputs="mask,probabilities", **FP32)
    assert result.stats["plane_agreement"] == 1.0
    ref = _reference(volume[None], model.config)
    assert np.abs(result["probabilities"] - ref).max() <= 1e-3
    assert result.plan.passes == 3


def test_orthogonal_consensus_averages_the_three_slice_wise_passes():
    # The ramp is not the same along every axis, so the three passes disagree somewhere.
    model = make_analytic(kind="ramp")
    volume = _img((12, 20, 28), seed=5)
    settings = dict(axes="ZYX", tile=16, outputs="mask,probabilities", **FP32)
    result = predict(volume, model, volume_mode="orthogonal", **settings)
    passes = [predict(volume, model, axis=a, **settings) for a in "ZYX"]
    mean = sum(p["probabilities"].astype(np.float32) for p in passes) / 3
    assert np.abs(result["probabilities"].astype(np.float32) - mean).max() <= 2e-3
    clear = np.abs(mean[0] - 0.5) > 2e-3
    assert np.array_equal(result["mask"][clear], (mean[0] > 0.5)[clear])
    agree = np.ones(volume.shape, bool)
    for p in passes:
        agree &= p["mask"] == result["mask"]
    assert 0.0 < result.stats["plane_agreement"] < 1.0
    assert abs(result.stats["plane_agreement"] - agree.mean()) <= 1 - clear.mean() + 1e-9
    assert result.planes_done == tuple(range(12))


def test_orthogonal_consensus_needs_a_volume():
    with pytest.raises(ConfigError, match="volume"):
        predict(_img((20, 20)), make_analytic(), volume_mode="orthogonal", **FP32)


def test_3d_network_tiles_the_volume():
    model = make_analytic(spatial_dims=3, divisor=4, min_size=4, preferred_tile=8, scale=2)
    volume = _img((9, 13, 10))
    result = predict(volume, model, axes="ZYX", outputs="probabilities", overlap=0.5, **FP32)
    assert result.plan.plane_axes == "ZYX" and result.plan.planes == 1
    assert result.plan.tiles_per_plane > 1
    assert np.abs(result["probabilities"] - _reference(volume[None], model.config)).max() <= 1e-3


def test_time_and_index_axes_are_iterated():
    model = make_analytic()
    stack = _img((3, 20, 20))
    result = predict(stack, model, axes="IYX", outputs="probabilities", **FP32)
    assert result.axes["probabilities"] == "CIYX" and result.plan.planes == 3
    assert "z_consistency" not in result.stats


# --- outputs -------------------------------------------------------------------------------


def test_boundary_head_and_instances():
    # Two discs touching at one column; the analytic boundary head marks that column.
    yy, xx = np.mgrid[:48, :64]
    discs = ((yy - 24) ** 2 + (xx - 20) ** 2 < 144) | ((yy - 24) ** 2 + (xx - 44) ** 2 < 144)
    image = np.where(discs, 3.0, -3.0).astype(np.float32)
    model = make_analytic(boundary=True)
    result = predict(image, model, outputs="mask,boundary,instances", **FP32)
    assert set(result.outputs) == {"mask", "boundary", "instances"}
    # This head fires wherever the mask does; the engine takes its thresholded map as is.
    assert np.array_equal(result["boundary"], result["mask"])
    assert result["instances"].dtype == np.int32


def _count_stitched_channels(monkeypatch) -> list[int]:
    """Record the channel count of every stitcher the engine opens."""
    opened: list[int] = []

    class Counting(inference.Stitcher):
        def __init__(self, grid, channels, *args, **kwargs):
            opened.append(channels)
            super().__init__(grid, channels, *args, **kwargs)

    monkeypatch.setattr(inference, "Stitcher", Counting)
    return opened


@pytest.mark.parametrize("outputs,expected", [
    ("mask", [1]),                       # two classes: the foreground alone, no boundary
    ("mask,probabilities", [1]),
    ("mask,boundary", [1, 1]),
    ("instances", [1, 1]),
])
def test_only_the_needed_channels_are_stitched(monkeypatch, outputs, expected):
    opened = _count_stitched_channels(monkeypatch)
    model = make_analytic(num_classes=2, boundary=True)
    predict(_img((40, 40)), model, outputs=outputs, tile=16, **FP32)
    assert opened == expected


def test_two_class_probabilities_come_back_whole():
    # Only the foreground is stitched; the background is rebuilt as 1 - foreground.
    model = make_analytic(num_classes=2)
    image = _img((50, 70), seed=3)
    result = predict(image, model, outputs="mask,probabilities", tile=16, overlap=0.5, **FP32)
    probs = result["probabilities"].astype(np.float32)
    ref = _reference(image[None], model.config)
    assert probs.shape == (2, 50, 70)
    assert np.abs(probs - ref).max() <= 1e-3
    assert np.abs(probs.sum(0) - 1.0).max() <= 1e-3
    clear = np.abs(ref[1] - 0.5) > 1e-3
    assert np.array_equal(result["mask"][clear], ref.argmax(0)[clear])


def test_two_class_masks_match_argmax_of_softmax_on_a_real_network():
    torch.manual_seed(0)
    from napari_medseg.models import create_model

    model = create_model("banet", variant="tiny", in_channels=1, num_classes=2).eval()
    image = _img((96, 96), seed=5)
    result = predict(image, model, outputs="mask,probabilities", tile=96, **FP32)
    from napari_medseg.engine.inference.normalization import normalize

    x = torch.from_numpy(normalize(image)[None, None].astype(np.float32))
    with torch.inference_mode():
        ref = torch.softmax(model(x)["mask"].float(), dim=1)[0].numpy()
    assert np.abs(result["probabilities"].astype(np.float32) - ref).max() <= 1e-3
    clear = np.abs(ref[1] - 0.5) > 1e-3
    assert clear.mean() > 0.5
    assert np.array_equal(result["mask"][clear], ref.argmax(0)[clear])


def test_boundary_is_derived_from_instances_without_a_boundary_head():
    yy, xx = np.mgrid[:48, :64]
    discs = ((yy - 24) ** 2 + (xx - 16) ** 2 < 100) | ((yy - 24) ** 2 + (xx - 48) ** 2 < 100)
    image = np.where(discs, 3.0, -3.0).astype(np.float32)
    result = predict(image, make_analytic(), outputs="boundary,instances", **FP32)
    assert result["instances"].max() == 2
    from napari_medseg.engine.boundaries import boundary_from_labels

    assert np.array_equal(result["boundary"],
                          boundary_from_labels(result["instances"], mode="inner"))
    assert "mask" not in result.outputs
    # a one-pixel outline inside each object: no background pixel, every disc's edge
    assert not result["boundary"][~discs].any()
    assert result["boundary"].sum() < 0.3 * discs.sum()


def test_derived_boundary_of_a_stack_outlines_each_plane():
    """A stack's derived boundary is each slice's outline, not a 3D band: slices that differ
    (an anisotropic EM stack) must not turn whole areas into boundary."""
    from napari_medseg.engine.inference.postprocess import boundary_per_block

    labels = np.zeros((2, 32, 32), np.uint8)
    labels[0, 4:28, 4:28] = 1  # a square on slice 0, nothing on slice 1
    boundary = boundary_per_block(labels, "ZYX")
    assert not boundary[1].any()
    assert boundary[0].sum() == 4 * 24 - 4  # the square's one-pixel outline


def test_tta_costs_and_variance():
    model = make_analytic(kind="ramp")  # not flip-equivariant: the flips disagree
    image = _img((32, 48))
    result = predict(image, model, tta=True, outputs="mask,variance", tile=16, overlap=0.0,
                     **FP32)
    assert result.plan.tta_flips == 4 and len(tta_flips(2)) == 4 and len(tta_flips(3)) == 8
    assert result.stats["forward_passes"] == 4 * result.plan.tiles_per_plane
    assert result["variance"].dtype == np.float16 and float(result["variance"].max()) > 0.01
    assert any("4x the time" in n for n in result.notices)
    flat = predict(image, make_analytic(), tta=True, outputs="variance", **FP32)
    assert float(flat["variance"].max()) == 0.0  # an equivariant network never disagrees


def test_variance_without_tta_is_refused():
    with pytest.raises(ConfigError, match="TTA"):
        predict(_img((16, 16)), make_analytic(), outputs="variance", **FP32)


# --- bad input -----------------------------------------------------------------------------


def test_nan_pixels_are_refused():
    image = _img((20, 20))
    image[3, 4] = np.nan
    with pytest.raises(InputShapeError, match="NaN"):
        predict(image, make_analytic(), **FP32)


def test_inf_pixels_in_a_lazy_array_are_refused():
    import dask.array as da

    image = _img((40, 40))
    image[30, 30] = np.inf
    with pytest.raises(InputShapeError, match="infinite"):
        predict(da.from_array(image, chunks=8), make_analytic(), precision="fp32")


def test_zero_length_axis_is_refused():
    with pytest.raises(InputShapeError, match="zero-length"):
        predict(np.zeros((0, 10), np.float32), make_analytic(), **FP32)


def test_tile_larger_than_the_image_is_clamped_with_a_notice():
    result = predict(_img((20, 30)), make_analytic(), tile=512, **FP32)
    assert result.plan.grid.tile == (24, 32)
    assert any("larger than the image" in n for n in result.notices)


# --- progress, plan, cancel ------------------------------------------------------------------


def test_events_plan_first_then_tiles_and_a_final_result():
    image = _img((64, 64))
    events, result = _events(predict_iter(image, make_analytic(), tile=16, **FP32))
    kinds = [type(e) for e in events]
    assert kinds.index(PlanEvent) < kinds.index(TilesEvent)
    plans = [e for e in events if isinstance(e, PlanEvent)]
    assert not plans[0].probed and plans[-1].probed and plans[-1].plan.seconds is not None
    assert isinstance(events[-1], FinishedEvent) and events[-1].result is result
    tiles = [e for e in events if isinstance(e, TilesEvent)]
    assert tiles[-1].done == tiles[-1].total == result.plan.forward_passes
    assert result.plan.tiles == len(result.plan.grid) == 25


def test_plan_prediction_probes_one_batch():
    plan = plan_prediction(_img((100, 100)), make_analytic(), tile=32, **FP32)
    assert plan.probed and plan.seconds_per_pass > 0 and plan.activation_bytes > 0
    assert plan.tiles == 16 and plan.memory_bytes > plan.model_bytes
    assert "tiles of 32x32" in plan.describe()
    unprobed = plan_prediction(_img((100, 100)), make_analytic(), probe=False, **FP32)
    assert not unprobed.probed and unprobed.seconds is None


def test_cancel_keeps_finished_slices():
    volume = _img((4, 32, 32))
    token = CancelToken()
    gen = predict_iter(volume, make_analytic(), axes="ZYX", tile=16, batch_size=2,
                       outputs="probabilities", cancel=token, **FP32)
    events = []
    for event in gen:
        events.append(event)
        if isinstance(event, PlaneEvent) and event.plane == 1:
            token.cancel()
    result = events[-1].result
    assert result.cancelled and result.planes_done == (0, 1)
    assert any(isinstance(e, CancelledEvent) for e in events)
    ref = _reference(volume[None], make_analytic().config)
    probs = result["probabilities"].astype(np.float32)
    assert np.abs(probs[:, :2] - ref[:, :2]).max() <= 1e-3
    assert not probs[:, 2:].any()


def test_cancel_mid_plane_stops_between_batches():
    token = CancelToken()
    model = make_analytic()
    gen = predict_iter(_img((64, 64)), model, tile=16, overlap=0.0, batch_size=1,
                       cancel=token, **FP32)
    for event in gen:
        if isinstance(event, TilesEvent):
            token.cancel()
    assert event.result.cancelled and event.result.planes_done == ()
    assert int(model.calls) == 1  # stopped after the first batch


def test_the_model_mode_is_restored():
    model = make_analytic().train()
    predict(_img((16, 16)), model, **FP32)
    assert model.training


def test_checkpoint_normalization_is_used_by_default():
    model = make_analytic()
    image = _img((30, 30)) * 100 + 1000

    class Info:
        sha256 = "x"

        @staticmethod
        def normalization_config():
            from napari_medseg.config import NormalizationConfig

            return NormalizationConfig(mode="none")

    model.checkpoint_info = Info()
    result = predict(image, model, precision="fp32")
    assert result.stats["normalization"]["config"]["mode"] == "none"
    default = predict(image, make_analytic(), precision="fp32")
    assert default.stats["normalization"]["config"]["mode"] == "percentile"


# --- large inputs: lazy in, zarr out, resume ---------------------------------------------------


def test_dask_and_zarr_inputs_equal_numpy(tmp_path):
    import dask.array as da
    import zarr

    volume = _img((3, 40, 40))
    z = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=volume.shape,
                        dtype=volume.dtype, chunks=(1, 20, 20))
    z[...] = volume
    ref = predict(volume, make_analytic(), axes="ZYX", outputs="probabilities", **FP32)
    for source in (z, da.from_array(volume, chunks=(1, 16, 16))):
        got = predict(source, make_analytic(), axes="ZYX", outputs="probabilities", **FP32)
        assert np.array_equal(got["probabilities"], ref["probabilities"])


def test_store_streams_and_resumes_after_a_cancel(tmp_path):
    volume = _img((5, 32, 32))
    store = str(tmp_path / "out.zarr")
    settings = dict(axes="ZYX", tile=16, outputs="mask,probabilities", store=store, **FP32)
    token = CancelToken()
    for event in predict_iter(volume, make_analytic(), cancel=token, **settings):
        if isinstance(event, PlaneEvent) and event.plane == 2:
            token.cancel()
    assert event.result.cancelled and event.result.planes_done == (0, 1, 2)
    model = make_analytic()
    events, result = _events(predict_iter(volume, model, **settings))
    skipped = [e.plane for e in events if isinstance(e, PlaneEvent) and e.skipped]
    assert skipped == [0, 1, 2] and result.planes_done == (0, 1, 2, 3, 4)
    assert any("Resuming" in n for n in result.notices)
    full = predict(volume, make_analytic(), **{**settings, "store": None})
    assert np.array_equal(np.asarray(result["probabilities"]), full["probabilities"])
    assert np.array_equal(np.asarray(result["mask"]), full["mask"])
    import zarr

    attrs = zarr.open_group(store, mode="r").attrs["napari_medseg"]
    assert attrs["complete"] and attrs["finished"] == [0, 1, 2, 3, 4]


def test_store_with_another_run_is_not_mixed(tmp_path):
    store = str(tmp_path / "out.zarr")
    predict(_img((2, 16, 16)), make_analytic(), axes="ZYX", store=store, **FP32)
    with pytest.raises(ImageWriteError, match="another prediction run"):
        predict(_img((2, 16, 16), seed=1), make_analytic(), axes="ZYX", store=store, **FP32)
    result = predict(_img((2, 16, 16), seed=1), make_analytic(), axes="ZYX", store=store,
                     overwrite=True, **FP32)
    assert not result.cancelled


def test_streaming_memory_does_not_grow_with_the_volume(tmp_path, monkeypatch):
    import zarr

    from napari_medseg.engine.inference import normalization

    # Large volumes are sampled for the normalization; make these small ones count as large.
    monkeypatch.setattr(normalization, "MAX_SAMPLES", 20_000)
    settings = dict(axes="ZYX", tile=96, overlap=0.0, outputs="mask,probabilities",
                    resume=False, overwrite=True, **FP32)
    side = 192

    def volume(depth):
        z = zarr.open_array(str(tmp_path / f"in{depth}.zarr"), mode="w",
                            shape=(depth, side, side), dtype=np.float32, chunks=(1, side, side))
        z[...] = _img((depth, side, side))
        return z

    small, large = volume(4), volume(20)
    for vol in (small, large):  # first calls import modules and fill caches
        predict(vol, make_analytic(), store=str(tmp_path / "warm.zarr"), **settings)
    peaks = {}
    tracemalloc.start()
    try:
        for name, vol, store in (("small", small, "s.zarr"), ("large", large, "l.zarr"),
                                 ("memory", large, None)):
            tracemalloc.reset_peak()
            predict(vol, make_analytic(), store=str(tmp_path / store) if store else None,
                    **settings)
            peaks[name] = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    large_bytes = 20 * side * side * 4
    assert peaks["large"] < peaks["small"] + large_bytes / 8, peaks  # flat in the depth
    assert peaks["large"] < large_bytes / 2, peaks
    assert peaks["memory"] > peaks["large"] + large_bytes / 4, peaks  # outputs in memory


# --- out of memory -------------------------------------------------------------------------


class _Limited(type(make_analytic())):
    """Raises CUDA-style out-of-memory for batches above ``max_batch`` or tiles above
    ``max_side``."""

    max_batch = 99
    max_side = 9999

    def forward(self, x):
        if x.shape[0] > self.max_batch or max(x.shape[2:]) > self.max_side:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return super().forward(x)


def _limited(**attrs):
    model = _Limited(AnalyticConfig())
    for k, v in attrs.items():
        setattr(model, k, v)
    return model.eval()


def test_oom_halves_the_batch_with_a_notice():
    image = _img((64, 64))
    result = predict(image, _limited(max_batch=2), tile=16, batch_size=8,
                     outputs="probabilities", **FP32)
    assert result.stats["batch_size"] == 2
    assert any("batch size reduced" in n for n in result.notices)
    ref = _reference(image[None], AnalyticConfig())
    assert np.abs(result["probabilities"] - ref).max() <= 1e-3


def test_oom_with_one_tile_shrinks_the_tile():
    image = _img((64, 64))
    result = predict(image, _limited(max_side=32), tile=64, batch_size=1,
                     outputs="probabilities", **FP32)
    assert max(result.stats["tile"]) <= 32  # halved, then balanced over the image
    assert any("tile reduced" in n for n in result.notices)
    assert np.abs(result["probabilities"] - _reference(image[None], AnalyticConfig())).max() \
        <= 1e-3


class _CpuOnly(SegmentationNetwork):
    """Parameter-free analytic network that runs out of memory anywhere but on the CPU."""

    def __init__(self):
        super().__init__()
        self.config = AnalyticConfig()
        self.spec = make_analytic().spec

    def forward(self, x):
        if x.device.type != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return {"mask": logits_of(x, self.config)}


def test_oom_on_an_accelerator_falls_back_to_the_cpu(monkeypatch):
    # No GPU here: a "meta" device stands in for one (the model raises OOM off the CPU).
    monkeypatch.setattr(inference, "resolve_device", lambda name: torch.device("meta"))
    image = _img((32, 32))
    events, result = _events(predict_iter(image, _CpuOnly().eval(), tile=32,
                                          outputs="probabilities", **FP32))
    warnings = [e.message for e in events if isinstance(e, NoticeEvent) and e.level == "warning"]
    assert any("continuing on the CPU" in w for w in warnings)
    assert result.stats["device"] == "cpu"
    assert np.abs(result["probabilities"] - _reference(image[None], AnalyticConfig())).max() \
        <= 1e-3


def _predictor(model, device="cpu", batch_size=8, **kwargs):
    device = torch.device(device)
    return TilePredictor(model, device, resolve_precision("fp32", "cpu"), channels_last=False,
                         batch_size=batch_size, **kwargs)


def test_the_predictor_halves_the_batch_on_out_of_memory():
    predictor = _predictor(_limited(max_batch=2))
    batch = _img((8, 1, 16, 16))
    probs, boundary = predictor.forward(batch)
    assert boundary is None and predictor.batch_size == 2
    assert predictor.notices == [("Out of memory on cpu: batch size reduced to 4.", "warning"),
                                 ("Out of memory on cpu: batch size reduced to 2.", "warning")]
    assert np.array_equal(probs, _predictor(make_analytic()).forward(batch)[0])
    with pytest.raises(TileTooBig):
        _predictor(_limited(max_side=8)).forward(batch[:1])


def test_the_predictor_falls_back_to_the_cpu():
    predictor = _predictor(_CpuOnly().eval(), device="meta")
    batch = _img((2, 1, 16, 16))
    with pytest.raises(TileTooBig):
        predictor(batch)
    assert predictor.fall_back_to_cpu()
    assert predictor.device == torch.device("cpu") and predictor.channels_last
    assert "continuing on the CPU" in predictor.notices[-1][0]
    probs, _ = predictor(batch)
    expected = np.stack([_reference(tile, AnalyticConfig()) for tile in batch])
    assert np.abs(probs - expected).max() <= 1e-6
    assert not predictor.fall_back_to_cpu()  # already there


def test_the_predictor_probes_on_its_first_call_then_times_its_forward_passes():
    predictor = _predictor(make_analytic(), batch_size=2, tta=True)
    assert predictor.measured is None
    batch = _img((2, 1, 16, 16))
    first, _ = predictor(batch)
    assert predictor.measured.bytes_per_sample > 0 and predictor.probe_passes == 2 * 4
    assert predictor.forward_seconds == 0.0
    second, _ = predictor(batch)
    assert predictor.forward_seconds > 0.0
    assert np.array_equal(first, second) and first.shape == (2, 2, 16, 16)  # + variance


def test_oom_on_the_cpu_with_the_smallest_tile_is_an_error():
    with pytest.raises(inference.OutOfMemory, match="even with one tile"):
        predict(_img((16, 16)), _limited(max_side=4), tile=16, **FP32)


# --- config -------------------------------------------------------------------------------


def test_config_from_mapping_coerces_cli_strings():
    cfg = PredictConfig.from_mapping({"tile": "128", "overlap": "0.5", "tta": "yes",
                                      "outputs": "mask,boundary", "batch-size": "4",
                                      "normalization": "none", "precision": "BF16"})
    assert cfg.tiling.tile == 128 and cfg.tiling.overlap == 0.5 and cfg.tta
    assert cfg.outputs == ("mask", "boundary") and cfg.batch_size == 4
    assert cfg.normalization.mode == "none" and cfg.precision == "bf16"
    assert PredictConfig.from_mapping(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad,match", [
    ({"tile": "big"}, "whole number"), ({"overlap": 1.0}, "Overlap"),
    ({"blend": "median"}, "one of"), ({"colour": 1}, "Unknown setting"),
    ({"outputs": "mask,edges"}, "Unknown output"), ({"precision": "int8"}, "one of"),
])
def test_config_errors_are_one_sentence(bad, match):
    with pytest.raises(ConfigError, match=match):
        PredictConfig.from_mapping(bad)


def test_config_from_toml(tmp_path):
    from napari_medseg.config import load_toml

    path = tmp_path / "run.toml"
    path.write_text('[predict]\ntile = 64\ntta = true\n[predict.normalization]\n'
                    'mode = "window"\nlow = -1000\nhigh = 400\n')
    cfg = PredictConfig.from_mapping(load_toml(path, "predict"))
    assert cfg.tiling.tile == 64 and cfg.tta and cfg.normalization.high == 400.0


def test_devices_are_explicit():
    from napari_medseg.engine.device import DeviceError, resolve_device

    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="available devices: cpu"):
            resolve_device("cuda:1")
    with pytest.raises(DeviceError, match="not a device name"):
        resolve_device("tpu")


@pytest.mark.parametrize("name,expected", [("banet", 4), ("msa2net", 4), ("sasrnet", 4),
                                           ("sa2net", 2), ("unet_sharp", 2)])
def test_cpu_batch_follows_the_network_unless_asked(name, expected):
    from napari_medseg.models import create_model

    model = create_model(name, variant="tiny", in_channels=1, num_classes=2)
    image = _img((512, 512))
    plan = plan_prediction(image, model, device="cpu", probe=False)
    assert plan.batch_size == model.spec.cpu_batch_size == expected
    assert plan_prediction(image, model, device="cpu", batch_size=3, probe=False).batch_size == 3


def test_per_block_instances_are_numbered_from_one_and_counted_over_blocks():
    """Each T/I block is split on its own (objects 1, 2 in both frames) and the count sums
    the blocks (4), where the highest label alone would say 2."""
    mask = np.zeros((2, 32, 32), np.uint8)
    mask[:, 2:10, 2:10] = 1
    mask[:, 18:30, 16:28] = 1
    inst = postprocess.instances_per_block(mask, None, "TYX", min_size=4)
    for t in range(2):
        assert sorted(np.unique(inst[t]).tolist()) == [0, 1, 2]
    assert postprocess.count_per_block(inst, "TYX") == 4
    # A 3D block stays whole: the same two objects through Z are 2 objects, not 4.
    assert postprocess.count_per_block(postprocess.instances_per_block(
        mask, None, "ZYX", min_size=4), "ZYX") == 2


def test_the_plans_time_per_pass_leaves_the_warm_up_out():
    """The first batch carries one-off costs (the probe); once later batches ran, the plan's
    time per tile pass is theirs, so a time estimate is not inflated by the warm-up."""
    import time

    from napari_medseg.engine.progress import PlanEvent

    model = make_analytic()
    forward = model.forward
    calls = []

    def slow_first(x):
        calls.append(1)
        time.sleep(0.5 if len(calls) == 1 else 0.002)
        return forward(x)

    model.forward = slow_first
    image = _img((64, 64))
    plans = [e.plan for e in predict_iter(image, model, tile=16, overlap=0.0, batch_size=2,
                                          outputs="mask", **FP32)
             if isinstance(e, PlanEvent) and e.plan is not None and e.plan.probed]
    assert len(calls) == 8 and len(plans) == 2  # the probe's plan, then the steady one
    assert plans[0].seconds_per_pass > 0.2  # the probe: 0.5 s over 2 tiles
    assert plans[1].seconds_per_pass < 0.1  # later batches: ~0.001 s a tile


def test_the_automatic_tile_clamped_to_a_small_image_is_not_news():
    result = predict(_img((20, 30)), make_analytic(), **FP32)
    assert result.plan.grid.tile[0] < make_analytic().spec.preferred_tile
    assert not any("larger than the image" in n for n in result.notices)
