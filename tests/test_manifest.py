"""The npe2 manifest validates, every python_name imports, and the hooks stay light."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from npe2 import PluginManifest

import napari_medseg
from napari_medseg.io import supported_suffixes

PACKAGE_MANIFEST = Path(napari_medseg.__file__).parent / "napari.yaml"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest() -> PluginManifest:
    return PluginManifest.from_file(PACKAGE_MANIFEST)


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True,
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_manifest_validates_and_is_the_installed_one(manifest):
    assert manifest.name == "napari-medseg"
    installed = PluginManifest.from_distribution("napari-medseg")
    assert installed.name == manifest.name
    assert {c.id for c in installed.contributions.commands} == {c.id for c in manifest.contributions.commands}
    top = ROOT / "napari.yaml"
    if top.exists():  # a source checkout: the top-level file points at the package's
        assert top.is_symlink() and top.resolve() == PACKAGE_MANIFEST.resolve()


def test_npe2_validate_command_passes():
    exe = Path(sys.executable).parent / "npe2"
    if not exe.exists():
        pytest.skip("npe2 command line not installed beside this Python")
    result = subprocess.run([str(exe), "validate", "napari-medseg", "--imports"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_python_name_imports(manifest):
    for command in manifest.contributions.commands:
        module, _, attr = command.python_name.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        assert callable(obj), command.python_name


def test_contributions_cover_the_io_layer(manifest):
    contrib = manifest.contributions
    patterns = set(contrib.readers[0].filename_patterns)
    assert contrib.readers[0].accepts_directories  # DICOM folders and zarr stores
    for suffix in supported_suffixes():
        if suffix.startswith(".ome."):
            continue  # matched by *.tif / *.zarr
        assert f"*{suffix}" in patterns, suffix
    labels_exts = {ext for w in contrib.writers if "labels" in str(w.layer_types) for ext in w.filename_extensions}
    assert {".tif", ".zarr", ".nii", ".nii.gz"} <= labels_exts
    assert {s.key for s in contrib.sample_data} >= {"nuclei", "em_stack", "dermoscopy", "ct_patches"}


def test_reader_module_is_light():
    loaded = _modules_after("import napari_medseg._napari.reader")
    heavy = {"torch", "napari", "qtpy", "tifffile", "nibabel", "pydicom", "zarr", "dask"}
    assert not {m.split(".")[0] for m in loaded} & heavy


def test_package_and_io_load_no_gui_and_no_torch():
    loaded = {m.split(".")[0] for m in _modules_after("import napari_medseg, napari_medseg.io")}
    assert not loaded & {"napari", "qtpy", "magicgui", "superqt", "PyQt5", "PyQt6", "torch"}


def test_reading_a_file_loads_no_torch(tmp_path):
    import numpy as np
    import tifffile

    tifffile.imwrite(tmp_path / "x.tif", np.zeros((4, 4), np.uint8))
    code = (
        "from napari_medseg._napari.reader import get_reader\n"
        f"layers = get_reader({str(tmp_path / 'x.tif')!r})({str(tmp_path / 'x.tif')!r})\n"
        "assert layers[0][0].shape == (4, 4)\n"
    )
    assert "torch" not in {m.split(".")[0] for m in _modules_after(code)}
