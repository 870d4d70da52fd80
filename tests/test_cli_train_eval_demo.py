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


def test_eval_reports_object_scores_and_means_per_acquisition_type(nuclei_folders, tmp_path,
                                                                   capsys, monkeypatch):
    """The shipped nuclei weights on the fluorescence and the H&E sample: each row has the
    object scores and its type, the JSON and the table have the per-type means."""
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    images, masks = nuclei_folders
    args = ["eval", "--weights", "sa2net_lite_dsb2018", "--images", str(images), "--masks",
            str(masks), "-q"]
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in report["images"]}
    assert rows["nuclei.tif"]["acquisition"] == "fluorescence"
    assert rows["nuclei_he.tif"]["acquisition"] == "H&E"
    for row in rows.values():
        tp, fp, fn = row["tp"], row["fp"], row["fn"]
        assert tp + fn == 82  # every sample has 82 labelled nuclei
        assert row["ap_iou50"] == round(tp / (tp + fp + fn), 4)
        assert row["f1_iou50"] == round(2 * tp / (2 * tp + fp + fn), 4)
        assert 0.0 < row["dsb_score"] < row["ap_iou50"]
    assert report["totals"] == {k: sum(r[k] for r in rows.values()) for k in ("tp", "fp", "fn")}
    for key in ("ap_iou50", "dsb_score", "aji", "f1_iou50"):
        assert report["mean"][key] is not None
    assert "tp" not in report["mean"]  # counts are summed, never averaged
    by_type = report["by_type"]
    assert set(by_type) == {"fluorescence", "H&E"}
    assert by_type["H&E"]["n_images"] == 1
    assert by_type["H&E"]["dsb_score"] == rows["nuclei_he.tif"]["dsb_score"]
    assert by_type["fluorescence"]["dice"] == rows["nuclei.tif"]["dice"]
    # The table has the new columns and one mean row per type after the mean row.
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", "dice", "iou", "hd95", "boundary_f1", "f1_iou50",
                                "ap_iou50", "dsb_score", "aji"]
    after = lines[[line.split()[0] for line in lines].index("mean") + 1:]
    assert after[0].startswith("objects at IoU 0.5:")
    assert after[1] == "by acquisition type (means):"
    he = next(line for line in after if line.strip().startswith("H&E (n=1)"))
    assert f"{by_type['H&E']['dsb_score']:.4f}" in he.split()
