"""`napari-medseg train`, `eval` and `demo` end to end on the package's samples."""

from __future__ import annotations

import json

import numpy as np

from napari_medseg.cli import main
from napari_medseg.io import read_image
from napari_medseg.io.samples import sample_path


def test_train_then_eval(nuclei_folders, tmp_path, capsys):
    images, masks = nuclei_folders
    out = tmp_path / "ck.safetensors"
    rc = main(["train", "--model", "sa2net", "--variant", "tiny", "--images", str(images),
               "--masks", str(masks), "-o", str(out), "--steps", "4", "--val-every", "2",
               "--patch", "64", "--batch-size", "2", "--val-fraction", "0.5", "-q"])
    assert rc == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["network"] == "sa2net" and meta["training_data"]["val_files"]
    capsys.readouterr()
    rc = main(["eval", "--weights", str(out), "--images", str(images), "--masks", str(masks),
               "--json", "-q"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["images"]) == 2
    assert 0.0 <= report["mean"]["dice"] <= 1.0
    assert "aji" in report["mean"]  # instance labels -> instance metrics


def test_train_unknown_network_is_one_sentence(nuclei_folders, tmp_path, capsys):
    images, masks = nuclei_folders
    rc = main(["train", "--model", "nope", "--images", str(images), "--masks", str(masks),
               "-o", str(tmp_path / "x"), "-q"])
    assert rc == 2
    assert "choose one of" in capsys.readouterr().err


def test_demo_segments_the_sample_with_shipped_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    rc = main(["demo", "--out", str(tmp_path), "--no-viewer"])
    assert rc == 0
    mask, _ = read_image(tmp_path / "nuclei_mask.tif")
    ref, _ = read_image(sample_path("nuclei", mask=True))
    inter = np.logical_and(np.asarray(mask) > 0, np.asarray(ref) > 0).sum()
    dice = 2 * inter / ((np.asarray(mask) > 0).sum() + (np.asarray(ref) > 0).sum())
    assert dice > 0.85, dice  # the shipped nuclei weights work out of the box
    assert "Dice" in capsys.readouterr().out
