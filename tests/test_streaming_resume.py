"""Issue #23: a zarr output resumes within a plane, band by band.

A plane left half written (a cancelled or killed run) records the rows written so far; the
same run again skips the tiles that end above them and writes the rest, giving exactly the
uninterrupted result.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest
import zarr

from analytic_models import make_analytic
from napari_medseg.engine.inference.pipeline import predict, predict_iter
from napari_medseg.engine.inference.stitching import Stitcher
from napari_medseg.engine.inference.tiling import TileGrid, sliding_window_iter
from napari_medseg.engine.progress import CancelToken, FinishedEvent, TilesEvent
from napari_medseg.io import ImageMeta, read_image, write_image
from test_batch import _blobs, checkpoint  # noqa: F401 - the tiny checkpoint fixture
from test_faults_kill import FAST, _json, _run, _signal, _start, _wait_for

SETTINGS = {"precision": "fp32", "device": "cpu", "tile": 32, "batch_size": 2}


@pytest.mark.parametrize("blend", ["gaussian", "crop"])
@pytest.mark.parametrize("scale", [1, 2])
def test_a_stitch_resumed_at_any_row_gives_the_same_rows(blend, scale):
    grid = TileGrid.build((150, 70), 32, 0.25, scale=scale)
    rng = np.random.default_rng(0)
    image = rng.random((1, 150, 70))

    def predictor(batch):
        out = np.repeat(np.repeat(batch, scale, axis=2), scale, axis=3)
        return out * 2.0 + 1.0

    def stitch(resume_row: int) -> np.ndarray:
        out = np.full((1, 150 * scale, 70 * scale), np.nan)

        def emit(a, b, values):
            assert a >= resume_row  # nothing above the resume row is written again
            out[:, a:b] = values

        stitcher = Stitcher(grid, 1, emit, blend, resume_row=resume_row)
        list(sliding_window_iter(image, grid, predictor, (stitcher,), batch_size=3,
                                 resume_row=resume_row))
        return out

    full = stitch(0)
    for row in (1, 23, 24, 48 * scale, 100, 150 * scale - 1):
        resumed = stitch(row)
        assert np.isnan(resumed[:, :row]).all()
        np.testing.assert_array_equal(resumed[:, row:], full[:, row:])


def _cancel_after(image, model, store, batches: int, **settings):
    """Run into ``store`` and cancel after ``batches`` batches; returns the result."""
    token = CancelToken()
    seen = 0
    for event in predict_iter(image, model, store=str(store), cancel=token, **settings):
        if isinstance(event, TilesEvent):
            seen += 1
            if seen == batches:
                token.cancel()
        if isinstance(event, FinishedEvent):
            return event.result
    raise AssertionError("no result")


@pytest.mark.parametrize("boundary,scale", [(False, 1), (True, 2)])
def test_a_half_written_plane_resumes_after_its_rows(tmp_path, boundary, scale):
    def model():  # a fresh one per run: the analytic network counts its calls in its state
        return make_analytic(num_classes=2, boundary=boundary, scale=scale, kind="ramp")

    image = np.random.default_rng(1).random((200, 90)).astype(np.float32)
    outputs = ("mask", "probabilities") + (("boundary",) if boundary else ())
    ref = predict(image, model(), outputs=outputs, **SETTINGS)
    store = tmp_path / "out.zarr"
    first = _cancel_after(image, model(), store, 5, outputs=outputs, **SETTINGS)
    assert first.cancelled
    attrs = zarr.open_group(str(store), mode="r").attrs["napari_medseg"]
    rows = attrs["rows"]["0"]
    assert 0 < rows < 200 * scale and attrs["finished"] == [] and attrs["complete"] is False
    np.testing.assert_array_equal(zarr.open_group(str(store))["mask"][:rows], ref["mask"][:rows])

    second = predict(image, model(), store=str(store), outputs=outputs, **SETTINGS)
    assert f"and {rows} rows of slice 1" in " ".join(second.notices)
    total = len(TileGrid.build((200, 90), 32, SETTINGS.get("overlap", 0.125),
                               8, 8, scale, balance=True))
    assert first.stats["forward_passes"] + second.stats["forward_passes"] < total + 2 * 3 * 2
    assert second.stats["forward_passes"] < total  # the rows done were not computed again
    for name in outputs:
        np.testing.assert_array_equal(np.asarray(second[name][...]), ref[name])
    done = zarr.open_group(str(store), mode="r").attrs["napari_medseg"]
    assert done["complete"] is True and done["finished"] == [0] and done["rows"] == {}


def test_a_plane_to_zarr_killed_midway_resumes_band_by_band(tmp_path, checkpoint):  # noqa: F811
    plane = tmp_path / "plane.tif"
    write_image(plane, _blobs((1536, 512), 7), ImageMeta("YX"))
    argv = ("predict", plane, "--weights", checkpoint[0], "--batch-size", "1", *FAST)
    rc, err = _run(tmp_path, *argv, "-o", tmp_path / "ref.zarr")
    assert rc == 0, err
    reference = np.asarray(read_image(tmp_path / "ref.zarr")[0])
    out = tmp_path / "plane_out.zarr"

    def rows() -> int:
        attrs = (_json(out / "zarr.json") or {}).get("attributes", {}).get("napari_medseg", {})
        return int((attrs.get("rows") or {}).get("0", 0))

    proc = _start(tmp_path, *argv, "-o", out)
    _wait_for(proc, lambda: rows() >= 300, "300 rows of the plane recorded")
    assert _signal(proc, signal.SIGKILL) == -signal.SIGKILL
    kept = rows()
    assert 300 <= kept < 1536
    rc, err = _run(tmp_path, *argv, "-o", out)
    assert rc == 0, err
    assert f"Resuming: 0 of 1 slice(s) are already in the store, and {kept} rows of slice 1" \
        in err
    assert np.array_equal(np.asarray(read_image(out)[0]), reference)
