"""Shared fixtures: a small synthetic CT with 0.7 x 0.7 x 2.5 mm voxels, as NIfTI and DICOM.

Also the one rule of the ``gui`` marker: a test needs a Qt display exactly when it uses a
napari viewer or pytest-qt's ``qtbot`` (directly or through its fixtures), so those tests and
only those are marked (pure session, settings and config tests of the widgets' modules are
not).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_medseg.io.synthetic import ct_phantom, write_dicom_series, write_nifti_volume

#: Fixtures that need a Qt display.
GUI_FIXTURES = frozenset({"make_napari_viewer", "make_napari_viewer_proxy", "qtbot", "qapp"})


def pytest_collection_modifyitems(config, items):
    """Mark the tests that use a viewer or ``qtbot`` as ``gui``."""
    for item in items:
        if GUI_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.gui)


#: (dz, dy, dx) of the synthetic CT, millimetres.
CT_SPACING = (2.5, 0.7, 0.7)
CT_SHAPE = (8, 40, 48)


@pytest.fixture(scope="session")
def ct_volume() -> tuple[np.ndarray, np.ndarray]:
    """``(volume, mask)``: ZYX int16 HU and ZYX uint8 lesion mask, 8 x 40 x 48."""
    return ct_phantom(CT_SHAPE, CT_SPACING)


@pytest.fixture
def dicom_dir(tmp_path, ct_volume):
    """A folder holding the synthetic CT as a DICOM series (files in shuffled order)."""
    folder = tmp_path / "ct_dicom"
    write_dicom_series(folder, ct_volume[0], CT_SPACING)
    return folder


@pytest.fixture
def nifti_path(tmp_path, ct_volume):
    """The synthetic CT as ``ct.nii.gz`` with a diagonal affine."""
    return write_nifti_volume(tmp_path / "ct.nii.gz", ct_volume[0], CT_SPACING, origin=(5.0, -3.0, 2.0))


@pytest.fixture
def nuclei_folders(tmp_path):
    """images/ and masks/ folders holding the two bundled DSB2018 samples (instance labels)."""
    import shutil

    from napari_medseg.io.samples import sample_path

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for name in ("nuclei", "nuclei_he"):
        shutil.copy(sample_path(name), images / f"{name}.tif")
        shutil.copy(sample_path(name, mask=True), masks / f"{name}.tif")
    return images, masks


#: Where the GUI benchmarks record their event-loop stalls (``--save`` / ``--out``).
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
#: How far above a benchmark's stall a GUI test may go. The benchmarks run on a quiet 2-core
#: machine; the tests run while other tests and jobs share those cores (e.g. 186 ms at a load
#: average of 3.8 against the benchmark's 60 ms). Work done on the GUI thread instead of the
#: worker would stall the loop for the whole run (seconds), far above the bar.
STALL_MARGIN = 10


def stall_bar_ms(report: str, key: str) -> float:
    """A benchmark's recorded longest event-loop gap (ms) times :data:`STALL_MARGIN`.

    Args:
        report: the JSON file's name in ``benchmarks/`` (``gui_stall.json``,
            ``finetune_gui_stall.json``).
        key: the figure in it (``longest_gap_during_run_ms``, ``training_longest_gap_ms``).
    """
    figures = json.loads((BENCHMARKS / report).read_text(encoding="utf-8"))
    return STALL_MARGIN * float(figures[key])
