"""Issue #20, point 5: ``napari-medseg eval`` scores what it can and names every file it cannot.

Each test builds an image/mask folder from the bundled nuclei sample plus one faulty file and
runs the CLI with the shipped nuclei weights: the faulty file gets an error row (table, JSON,
and a ``napari-medseg: error: NAME: ...`` line), the good one is still scored, exit status 1.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile

from napari_medseg.cli import main
from napari_medseg.engine.training.datasets import find_pairs, match_pairs
from napari_medseg.errors import ImageReadError
from napari_medseg.io.samples import sample_path

WEIGHTS = "sa2net_lite_dsb2018"


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """images/ and masks/ with the nuclei sample (a good pair)."""
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    shutil.copy(sample_path("nuclei"), images / "good.tif")
    shutil.copy(sample_path("nuclei", mask=True), masks / "good.tif")
    return images, masks


def _eval(images, masks, capsys, *extra):
    capsys.readouterr()
    rc = main(["eval", "--weights", WEIGHTS, "--images", str(images), "--masks", str(masks),
               "-q", *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _rows(stdout: str) -> dict:
    return {r["name"]: r for r in json.loads(stdout)["images"]}


def test_mask_of_another_size_is_an_error_not_a_crop(folders, capsys):
    images, masks = folders
    shutil.copy(sample_path("nuclei"), images / "small.tif")
    ref = tifffile.imread(sample_path("nuclei", mask=True))
    tifffile.imwrite(masks / "small.tif", ref[:200, :230])  # the top-left corner only
    rc, out, err = _eval(images, masks, capsys, "--json")
    assert rc == 1
    rows = _rows(out)
    assert "200x230" in rows["small.tif"]["error"] and "256x256" in rows["small.tif"]["error"]
    assert "dice" not in rows["small.tif"]  # not scored on a cropped corner
    assert rows["good.tif"]["dice"] > 0.8
    assert "napari-medseg: error: small.tif: Mask small.tif is 200x230" in err
    assert json.loads(out)["failed"] == 1 and json.loads(out)["scored"] == 1


def test_unreadable_image_is_reported_and_the_rest_scored_with_a_table(folders, capsys):
    images, masks = folders
    (images / "broken.tif").write_bytes(b"II*\x00 not a tiff at all")
    shutil.copy(sample_path("nuclei", mask=True), masks / "broken.tif")
    shutil.copy(sample_path("nuclei"), images / "later.tif")  # sorted after the broken one
    shutil.copy(sample_path("nuclei", mask=True), masks / "later.tif")
    rc, out, err = _eval(images, masks, capsys)
    assert rc == 1
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["image", "dice", "iou"]
    broken = next(line for line in lines if line.startswith("broken.tif"))
    assert "not scored:" in broken
    assert any(line.startswith("later.tif") and "not scored" not in line for line in lines)
    mean = next(line for line in lines if line.startswith("mean"))
    assert "(2 scored, 1 not)" in mean
    # After the mean row: the object counts and the means per acquisition type (the scored
    # two are the fluorescence sample), never a mean of the failed image.
    after = lines[lines.index(mean) + 1:]
    assert len(after) == 3 and after[0].startswith("objects at IoU 0.5:")
    assert after[1] == "by acquisition type (means):"
    assert after[2].startswith("  fluorescence (n=2)")
    assert "napari-medseg: error: broken.tif:" in err


def test_nan_image_error_names_the_file(folders, capsys):
    images, masks = folders
    img = tifffile.imread(sample_path("nuclei")).astype(np.float32)
    img[10:20, 10:20] = np.nan
    tifffile.imwrite(images / "holes.tif", img)
    shutil.copy(sample_path("nuclei", mask=True), masks / "holes.tif")
    rc, out, err = _eval(images, masks, capsys, "--json")
    assert rc == 1
    assert "NaN" in _rows(out)["holes.tif"]["error"]
    assert any(line.startswith("napari-medseg: error: holes.tif:") and "NaN" in line
               for line in err.splitlines())
    assert "dice" in _rows(out)["good.tif"]


def test_image_without_mask_is_reported(folders, capsys):
    images, masks = folders
    shutil.copy(sample_path("nuclei"), images / "lonely.tif")
    rc, out, err = _eval(images, masks, capsys, "--json")
    assert rc == 1
    assert "has no mask named lonely.* or lonely_mask.*" in _rows(out)["lonely.tif"]["error"]
    assert "napari-medseg: error: lonely.tif:" in err
    assert json.loads(out)["scored"] == 1


def test_all_scored_exits_zero(folders, capsys):
    rc, out, err = _eval(*folders, capsys, "--json")
    assert rc == 0 and json.loads(out)["failed"] == 0 and "error" not in err


def test_image_with_two_masks_is_reported_in_eval_and_refused_in_training(folders, capsys):
    images, masks = folders
    shutil.copy(sample_path("nuclei", mask=True), masks / "good_mask.tif")
    shutil.copy(sample_path("nuclei"), images / "other.tif")
    shutil.copy(sample_path("nuclei", mask=True), masks / "other.tif")
    rc, out, _err = _eval(images, masks, capsys, "--json")
    assert rc == 1
    assert "2 masks" in _rows(out)["good.tif"]["error"] and "dice" in _rows(out)["other.tif"]
    with pytest.raises(ImageReadError, match="good.tif has 2 masks"):
        find_pairs(images, masks)


def test_masks_beside_their_images_are_not_scored_as_images(tmp_path):
    both = tmp_path / "data"
    both.mkdir()
    shutil.copy(sample_path("nuclei"), both / "a.tif")
    shutil.copy(sample_path("nuclei", mask=True), both / "a_mask.tif")
    assert [(p.name, m.name) for p, m in find_pairs(both, both)] == [("a.tif", "a_mask.tif")]
    assert match_pairs(both, both)[1] == []


def test_super_resolution_odd_size_is_scored_on_the_even_part(tmp_path, capsys, monkeypatch):
    """A x2 network is fed the image halved; an odd side loses its last row, nothing else."""
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    tifffile.imwrite(images / "odd.tif", tifffile.imread(sample_path("nuclei"))[:255, :251])
    tifffile.imwrite(masks / "odd.tif", tifffile.imread(sample_path("nuclei", mask=True))[:255, :251])
    capsys.readouterr()
    rc = main(["eval", "--weights", "sasrnet_lite_dsb2018", "--images", str(images),
               "--masks", str(masks), "-q", "--json"])
    assert rc == 0
    assert _rows(capsys.readouterr().out)["odd.tif"]["dice"] > 0.5


def test_mask_saved_as_a_one_plane_stack_is_scored(folders, capsys):
    """Not a size mismatch: a 1 x H x W mask of an H x W image is the same plane."""
    images, masks = folders
    ref = tifffile.imread(sample_path("nuclei", mask=True))
    tifffile.imwrite(masks / "good.tif", ref[None], metadata={"axes": "ZYX"})
    rc, out, err = _eval(images, masks, capsys, "--json")
    assert rc == 0, err
    assert _rows(out)["good.tif"]["dice"] > 0.8


def test_a_dermoscopy_photograph_has_no_microscopy_acquisition_type(tmp_path, capsys):
    """Acquisition types (fluorescence, bright-field, H&E) describe nuclei images; the
    lesion photograph (an RGB image with a one-object mask) was reported as 'H&E' before."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    shutil.copy(sample_path("dermoscopy"), images / "lesion.tif")
    shutil.copy(sample_path("dermoscopy", mask=True), masks / "lesion.tif")
    capsys.readouterr()
    rc = main(["eval", "--weights", "sa2net_lite_ph2", "--images", str(images), "--masks",
               str(masks), "-q", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["mean"]["dice"] > 0.9
    assert not report.get("by_type")
