"""Weights that declare a pixel size: each plane is resampled to it, results on the input grid.

The end-to-end test rebuilds the shipped CT sample (MSD lung patches in Hounsfield units at
2 mm) as a radiologist's file would hold it, a NIfTI volume at 0.7 mm, and checks that the
command line scores it within 0.03 Dice of the 2 mm patches (the issue's acceptance test;
``scripts/ct_pixel_check.py`` runs the same on the 24 validation patches of ../shared/data).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_medseg.engine.cards import list_model_cards
from napari_medseg.engine.checkpoints import (CheckpointInfo, load_checkpoint,
                                              resolve_weights, save_checkpoint)
from napari_medseg.engine.inference import predict
from napari_medseg.engine.pixel_size import (PixelSize, plane_zoom, pixel_size_of,
                                             with_pixel_size)
from napari_medseg.errors import CheckpointError
from napari_medseg.io.api import read_image, write_image
from napari_medseg.io.metadata import ImageMeta
from napari_medseg.io.samples import load_sample
from napari_medseg.models import create_model
from napari_medseg.models.working_resolution import Resampled

MM = ("millimeter", "millimeter")


def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def test_the_zoom_is_image_pixel_over_weights_pixel_in_any_unit():
    two_mm = PixelSize(2.0, "millimeter")
    assert plane_zoom((0.7, 0.7), MM, two_mm) == pytest.approx((0.35, 0.35))
    assert plane_zoom((1500.0, 3000.0), ("micrometer",) * 2, two_mm) == pytest.approx((0.75, 1.5))
    assert plane_zoom((1.9, 2.1), MM, two_mm) is None  # within 10 %: used as it is
    assert plane_zoom((0.7, 0.7), (None, None), two_mm) is None  # pixels without a unit
    assert plane_zoom((0.7, 0.7), MM, None) is None  # weights without a pixel size
    with pytest.raises(CheckpointError, match="positive value"):
        PixelSize.from_mapping({"value": 0, "unit": "millimeter"})
    with pytest.raises(CheckpointError, match="one of the units"):
        PixelSize.from_mapping({"value": 2, "unit": "pixel"})


def test_a_resampled_network_returns_outputs_on_the_input_grid():
    net = create_model("sa2net", variant="tiny", in_channels=1, num_classes=2).eval()
    wrapped = Resampled(net, (0.35, 0.5))
    with torch.no_grad():
        out = wrapped(torch.rand(1, 1, 137, 90))
    logits = out if isinstance(out, torch.Tensor) else out["mask"]
    assert tuple(logits.shape[-2:]) == (137, 90)
    assert wrapped.spec.divisor == 1 and wrapped.spec.extra["resampled"] == (0.35, 0.5)


def test_the_pixel_size_travels_with_the_weights_and_is_verified(tmp_path):
    net = with_pixel_size(create_model("sa2net", variant="tiny", in_channels=1, num_classes=2),
                          {"value": 4.0, "unit": "nanometer"})
    info = save_checkpoint(net, tmp_path / "em", dtype="float32")
    assert info.pixel_size == {"value": 4.0, "unit": "nanometer"}
    model, loaded = load_checkpoint(tmp_path / "em")
    assert pixel_size_of(model) == PixelSize(4.0, "nanometer") and loaded.pixel_size
    # an edited pixel size is an edited description: refused
    described = json.loads((tmp_path / "em.json").read_text())
    described["pixel_size"]["value"] = 8.0
    (tmp_path / "em.json").write_text(json.dumps(described))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "em")
    # weights saved without one keep the description they had (no key)
    plain = save_checkpoint(create_model("sa2net", variant="tiny", in_channels=1,
                                         num_classes=2), tmp_path / "plain")
    assert "pixel_size" not in plain.to_dict()
    assert CheckpointInfo.from_dict(plain.to_dict()).pixel_size is None


def test_shipped_cards_declare_the_pixel_size_the_weights_carry():
    cards = {c.tag: c for c in list_model_cards()}
    assert cards["sa2net_lite_msd"].pixel_size == {"value": 2.0, "unit": "millimeter"}
    assert cards["sa2net_lite_isbi2012"].pixel_size == {"value": 4.0, "unit": "nanometer"}
    model, info = resolve_weights("sa2net_lite_msd")  # the card and the header agree
    assert pixel_size_of(model) == PixelSize(2.0, "millimeter")
    assert info.normalization["mode"] == "window" and info.normalization["clip"]


def test_a_ct_in_hounsfield_units_at_07_mm_scores_as_the_2_mm_patches(tmp_path):
    """The shipped sample's patches, rebuilt at 0.7 mm as one NIfTI volume, through the CLI."""
    from napari_medseg.cli import main

    image, meta, labels = load_sample("ct_patches")  # IYX, HU, 2 mm
    image, labels = np.asarray(image, np.float32), np.asarray(labels)
    assert image.min() < -500 and meta.spacing == (2.0, 2.0)  # Hounsfield units
    model, _ = resolve_weights("sa2net_lite_msd")
    at_2mm = predict(image, model, {}, meta=meta)
    side = int(round(48 * 2.0 / 0.7))
    fine = np.stack([ndimage.zoom(p, side / 48, order=1, mode="nearest") for p in image])
    fine_labels = np.stack([ndimage.zoom(m, side / 48, order=0) for m in labels])
    write_image(tmp_path / "ct.nii.gz", fine.astype(np.float32),
                ImageMeta("ZYX", spacing=(2.0, 0.7, 0.7), units=("millimeter",) * 3))
    assert main(["predict", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "out"),
                 "--weights", "sa2net_lite_msd", "--format", "nii", "-q"]) == 0
    [mask_file] = (tmp_path / "out").glob("ct_mask.nii*")
    mask, mask_meta = read_image(mask_file)
    assert mask.shape == fine.shape and mask_meta.spacing == pytest.approx((2.0, 0.7, 0.7))
    coarse = np.mean([_dice(at_2mm["mask"][i], labels[i]) for i in range(len(labels))])
    rebuilt = np.mean([_dice(mask[i], fine_labels[i]) for i in range(len(labels))])
    assert coarse > 0.6 and abs(rebuilt - coarse) <= 0.03, (coarse, rebuilt)
    # without the resampling the same file is segmented far worse: the test can fail
    native = predict(fine, model, {"native_pixels": True},
                     meta=ImageMeta("ZYX", spacing=(2.0, 0.7, 0.7), units=("millimeter",) * 3))
    assert np.mean([_dice(native["mask"][i], fine_labels[i]) for i in range(len(labels))]) < \
        rebuilt - 0.1
    assert any("Resampling each plane from 0.7 x 0.7 mm" in n for n in
               predict(fine, model, {}, meta=mask_meta).notices)


def test_an_already_windowed_ct_is_warned_about():
    image, meta, _ = load_sample("ct_patches")
    model, info = resolve_weights("sa2net_lite_msd")
    low, high = info.normalization["low"], info.normalization["high"]
    windowed = (np.asarray(image, np.float32) - low) / (high - low)  # what the source stored
    warned = predict(windowed, model, {}, meta=meta).notices
    assert any("as if already windowed" in n for n in warned)
    assert not any("already windowed" in n for n in predict(image, model, {}, meta=meta).notices)
