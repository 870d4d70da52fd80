"""One rule for the axes of a bare array: the engine, the readers, the writer and the napari
layers all name a shape the same way (io.axes.guess_axes)."""

from __future__ import annotations

import numpy as np
import pytest

from analytic_models import make_analytic
from napari_medseg._napari.layers import meta_from_attributes
from napari_medseg.engine.inference.planning import plan_prediction
from napari_medseg.errors import InputShapeError
from napari_medseg.io import read_image, write_image, write_labels
from napari_medseg.io.axes import guess_axes

# shape -> (axes, napari's rgb flag for such a layer: colour last)
CASES = {
    (40, 48): ("YX", False),
    (6, 40, 48): ("ZYX", False),        # a grey stack
    (3, 40, 48): ("ZYX", False),        # a short stack (no network with 3 channels)
    (40, 48, 3): ("YXC", True),         # RGB
    (40, 48, 4): ("YXC", True),         # RGBA
    (6, 40, 48, 3): ("ZYXC", True),     # an RGB stack
    (1, 6, 40, 48): ("CZYX", None),     # channels first
    (2, 6, 40, 48): ("CZYX", None),
    (5, 6, 40, 48): ("TZYX", False),    # a time series of volumes
}


@pytest.mark.parametrize("shape", sorted(CASES))
def test_the_rule(shape):
    assert guess_axes(shape) == CASES[shape][0]


@pytest.mark.parametrize("shape", sorted(CASES))
def test_the_engine_reads_a_bare_array_by_the_rule(shape):
    image = np.zeros(shape, np.float32)
    if len(shape) == 4 and shape[0] == 2:  # 2 channels or 2 time points, for a grey network
        with pytest.raises(InputShapeError, match="channels or time points"):
            plan_prediction(image, make_analytic(), probe=False)
        return
    assert guess_axes(shape, in_channels=1) == CASES[shape][0]
    if shape[0] == 2:  # two channels for a grey network: read as CYX, then refused
        with pytest.raises(InputShapeError, match="has 2"):
            plan_prediction(image, make_analytic(), probe=False)
        return
    assert plan_prediction(image, make_analytic(), probe=False).axes == CASES[shape][0]


@pytest.mark.parametrize("shape", sorted(CASES))
def test_a_zarr_array_without_metadata_is_read_by_the_rule(shape, tmp_path):
    import zarr

    zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=shape, dtype=np.uint8)
    image, meta = read_image(tmp_path / "a.zarr")
    axes = CASES[shape][0]
    if image.ndim < len(shape):  # the reader drops a channel axis of length 1 after the rule
        axes = axes.replace("C", "")
    assert meta.axes == axes


@pytest.mark.parametrize("shape", [s for s in sorted(CASES) if len(s) < 4])
def test_an_array_written_without_metadata_is_named_by_the_rule(shape, tmp_path):
    _, meta = read_image(write_image(tmp_path / "a.ome.tif", np.zeros(shape, np.uint8)))
    assert meta.axes == CASES[shape][0]
    # Labels have no channel axis: the rule told so.
    _, meta = read_image(write_labels(tmp_path / "l.ome.tif", np.zeros(shape, np.uint8)))
    assert meta.axes == guess_axes(shape, rgb=False)


@pytest.mark.parametrize("shape", sorted(CASES))
def test_a_napari_layer_without_metadata_is_named_by_the_rule(shape):
    axes, rgb = CASES[shape]
    if rgb is None:  # napari shows channels as separate layers: a layer has none but colour
        assert meta_from_attributes(np.zeros(shape), {"rgb": False}).axes == "TZYX"
        return
    assert meta_from_attributes(np.zeros(shape), {"rgb": rgb}).axes == axes


def test_hints_say_what_the_shape_cannot():
    assert guess_axes((3, 40, 48), in_channels=3) == "CYX"  # the network takes 3 channels
    assert guess_axes((40, 48, 3), rgb=False) == "ZYX"      # labels have no channel axis
    assert guess_axes((5, 6, 40, 48, 3), rgb=True) == "TZYXC"
    for shape in [(5,), (2, 3, 4, 5, 6)]:
        with pytest.raises(InputShapeError, match="Cannot tell the axes"):
            guess_axes(shape)


@pytest.mark.parametrize("first", [2, 3, 4])
def test_a_short_first_axis_of_a_4d_array_is_refused_unless_it_fits_the_network(first):
    """3 or 4 time points of a volume look like channels: the engine asks for the axes
    rather than converting them into the network's channels."""
    shape = (first, 6, 40, 48)
    assert guess_axes(shape) == "CZYX"  # readers and writers: no network to compare with
    assert guess_axes(shape, in_channels=first) == "CZYX"
    with pytest.raises(InputShapeError, match="axes='CZYX' or 'TZYX'"):
        guess_axes(shape, in_channels=1 if first != 1 else 3)
    assert guess_axes((1, 6, 40, 48), in_channels=3) == "CZYX"  # one channel: grey -> RGB
