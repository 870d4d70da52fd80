"""Fine-tuning sees corrections at the weights' pixel size, as prediction does: a CT at 0.7 mm
corrected in napari trains the 2 mm CT weights on 2 mm crops (the package's CT sample)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from napari_medseg.config import FinetuneConfig
from napari_medseg.engine.checkpoints import resolve_weights
from napari_medseg.engine.pixel_size import PixelSize, with_pixel_size
from napari_medseg.engine.progress import NoticeEvent, drain
from napari_medseg.engine.training import corrections as corr
from napari_medseg.engine.training.corrections import (prepare_corrections_iter,
                                                       samples_from_folders)
from napari_medseg.engine.training.datasets import _crop
from napari_medseg.io.api import write_image
from napari_medseg.io.metadata import ImageMeta
from napari_medseg.io.samples import load_sample
from napari_medseg.models import create_model
from napari_medseg.models.working_resolution import Resampled

MM07 = ImageMeta("YX", spacing=(0.7, 0.7), units=("millimeter",) * 2)


def _ct_at_07_mm():
    """One CT patch of the sample (2 mm, HU) and its labels, and both rebuilt at 0.7 mm."""
    image, meta, labels = load_sample("ct_patches")
    assert meta.spacing == (2.0, 2.0)
    i = int(np.argmax([np.count_nonzero(m) for m in labels]))  # the largest tumour
    patch, mask = np.asarray(image[i], np.float32), np.asarray(labels[i])
    side = int(round(patch.shape[0] * 2.0 / 0.7))
    fine = ndimage.zoom(patch, side / patch.shape[0], order=1, mode="nearest")
    fine_mask = ndimage.zoom(mask, side / patch.shape[0], order=0)
    return patch, mask, fine, fine_mask


def _samples(model, image, labels, meta):
    gen = prepare_corrections_iter(image, labels, model, FinetuneConfig(context=0), axes="YX",
                                   prediction=None, meta=meta)
    notes = []
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return notes, stop.value
        if isinstance(event, NoticeEvent):
            notes.append(event.message)


def _dice(a, b) -> float:
    a, b = a > 0, b > 0
    return 2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def test_corrections_of_a_07_mm_ct_train_the_2_mm_weights_on_2_mm_crops():
    model, _ = resolve_weights("sa2net_lite_msd")
    patch, mask, fine, fine_mask = _ct_at_07_mm()
    notes, [sample] = _samples(model, fine, fine_mask, MM07)
    assert any("from 0.7 x 0.7 mm pixels to the weights' 2 mm" in n for n in notes), notes
    assert sample.image.shape[-2:] == patch.shape == sample.mask.shape == sample.valid.shape
    # what the network trains on is the 2 mm patch it was made from, normalised alike
    _, [native] = _samples(model, patch, mask, ImageMeta("YX", spacing=(2.0, 2.0),
                                                        units=("millimeter",) * 2))
    r = np.corrcoef(sample.image.ravel(), native.image.ravel())[0, 1]
    assert r > 0.9, r  # (the 0.7 mm rebuild interpolated once each way)
    assert _dice(sample.mask, mask) > 0.85 and sample.valid.min() == 1.0
    assert sample.crop == (0, 0) + fine.shape  # the crop stays in the image's pixels
    # without metadata nothing is resampled (and nothing said)
    notes, [plain] = _samples(model, fine, fine_mask, None)
    assert plain.image.shape[-2:] == fine.shape and not notes


def test_the_comparison_is_predicted_on_the_weights_pixels(monkeypatch):
    """Finding what changed predicts as ``predict`` would: through the resampling wrapper."""
    seen = []

    def fake(image, corrected, model, *args):
        seen.append(model)
        return np.zeros_like(corrected), None
        yield  # a generator, like the real one

    monkeypatch.setattr(corr, "_predict_labelled", fake)
    net = with_pixel_size(create_model("unet_sharp", "tiny", 1, 2),
                          PixelSize(1.0, "micrometer"))
    labels = np.zeros((64, 64), np.uint8)
    labels[20:40, 20:40] = 1
    meta = ImageMeta("YX", spacing=(0.5, 0.5), units=("micrometer",) * 2)
    drain(prepare_corrections_iter(np.random.rand(64, 64).astype(np.float32), labels, net,
                                   FinetuneConfig(), axes="YX", meta=meta))
    assert isinstance(seen[0], Resampled) and seen[0].zoom == pytest.approx((0.5, 0.5))
    drain(prepare_corrections_iter(np.random.rand(64, 64).astype(np.float32), labels, net,
                                   FinetuneConfig(), axes="YX"))
    assert seen[1] is net  # no pixel size given: the network as it is


def test_folders_are_resampled_per_file_and_strips_keep_image_pixels(tmp_path):
    (tmp_path / "im").mkdir()
    (tmp_path / "gt").mkdir()
    _, _, fine, fine_mask = _ct_at_07_mm()
    write_image(tmp_path / "im" / "ct.tif", fine, MM07)
    tifffile.imwrite(tmp_path / "gt" / "ct.tif", fine_mask.astype(np.uint8))
    notes: list[str] = []
    samples, _ = samples_from_folders(tmp_path / "im", tmp_path / "gt", num_classes=2,
                                      in_channels=1, pixel_size=PixelSize(2.0, "millimeter"),
                                      notes=notes)
    [s] = samples
    assert s.image.shape[-2:] == (48, 48) and notes and notes[0].startswith("ct: Resampling")
    strip = _crop(s, 0, slice(24, None))  # the lower half of the 2 mm sample ...
    assert strip.crop[0] == pytest.approx(fine.shape[0] // 2, abs=1)  # ... in 0.7 mm pixels
    same, _ = samples_from_folders(tmp_path / "im", tmp_path / "gt", num_classes=2,
                                   in_channels=1)
    assert same[0].image.shape[-2:] == fine.shape
