"""The default tile grid (overlap 0.125, balanced tiles) loses nothing on real data.

The engine's default computes fewer pixels than MONAI's usual tile 256 / overlap 0.25 grid
(docs/benchmarks.md); these tests check, with shipped weights on the bundled real samples,
that the masks it gives match the ones of the denser grid, against the sample's labels too.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.config import TilingConfig
from napari_medseg.engine.checkpoints import resolve_weights
from napari_medseg.engine.inference.pipeline import predict
from napari_medseg.io.samples import load_sample

DENSE = {"overlap": 0.25, "balance": False}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_the_defaults_are_the_sparse_balanced_grid():
    assert TilingConfig().overlap == 0.125 and TilingConfig().balance


@pytest.mark.parametrize("sample,tag,tile", [
    ("em_stack", "sa2net_lite_isbi2012", 128),   # 256 x 256 slices: 3 x 3 tiles either way
    ("nuclei_he", "msa2net_lite_dsb2018", 128),  # 256 x 320 colour
])
def test_default_grid_matches_the_dense_grid_on_real_data(sample, tag, tile):
    image, meta, labels = load_sample(sample)
    image, labels = np.asarray(image), np.asarray(labels)
    if meta.axes == "ZYX":
        image, labels = image[:2], labels[:2]
    model, _ = resolve_weights(tag)
    sparse = predict(image, model, axes=meta.axes, tile=tile, outputs="mask", precision="fp32")
    dense = predict(image, model, axes=meta.axes, tile=tile, outputs="mask", precision="fp32",
                    **DENSE)
    assert sparse.plan.grid.counts == dense.plan.grid.counts
    assert sparse.plan.grid.computed_pixels < 0.8 * dense.plan.grid.computed_pixels
    m_sparse, m_dense = np.asarray(sparse["mask"]), np.asarray(dense["mask"])
    assert _dice(m_sparse, m_dense) > 0.97, _dice(m_sparse, m_dense)
    assert abs(_dice(m_sparse, labels) - _dice(m_dense, labels)) < 0.01
