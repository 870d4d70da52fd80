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


def _samples(model, image, labels, meta, config=None):
    """(notices, samples) of fine-tuning ``model`` on ``labels`` drawn over ``image``."""
    gen = prepare_corrections_iter(image, labels, model, config or FinetuneConfig(context=0),
                                   axes="YX", prediction=None, meta=meta)
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
    assert s.image.shape[-2:] == (48, 48) and notes and notes[0].startswith("Resampling")
    strip = _crop(s, 0, slice(24, None))  # the lower half of the 2 mm sample ...
    assert strip.crop[0] == pytest.approx(fine.shape[0] // 2, abs=1)  # ... in 0.7 mm pixels
    same, _ = samples_from_folders(tmp_path / "im", tmp_path / "gt", num_classes=2,
                                   in_channels=1)
    assert same[0].image.shape[-2:] == fine.shape


def test_touching_objects_keep_the_line_between_them_when_shrunk():
    """Instance labels are resampled before the targets are drawn, so the boundary band is
    one of the weights' pixels wide and the line between touching objects survives."""
    from napari_medseg.engine.seg_task import SegTask
    from napari_medseg.engine.training.corrections import samples_from_corrections

    labels = np.zeros((96, 96), np.int32)
    labels[20:70, 10:47], labels[20:70, 47:85] = 1, 2  # two objects touching at x = 47
    image = (labels > 0).astype(np.float32)
    task = SegTask(kind="instances", boundary_width=1)
    for zoom in [(0.5, 0.5), (0.35, 0.35)]:
        [s] = samples_from_corrections(image, labels, num_classes=3, in_channels=1, axes="YX",
                                       config=FinetuneConfig(context=0), task=task, zoom=zoom)
        rows = [r for r in s.mask if (r > 0).any()]
        # every row enters and leaves the objects through boundary (a closed outline; drawn
        # before resampling, the one-pixel band was lost at both zooms)
        assert all(r[np.argmax(r > 0)] == 2 and r[len(r) - 1 - np.argmax(r[::-1] > 0)] == 2
                   for r in rows), zoom
        middle = np.array(rows)[:, round(35 * zoom[1]): round(60 * zoom[1])]
        assert ((middle == 2).any(axis=1)).all(), zoom  # the line between them, no bridge


def test_a_drawn_boundary_line_stays_unbroken_and_native_pixels_opt_out():
    from napari_medseg.engine.training.corrections import samples_from_corrections

    labels = np.zeros((100, 100), np.uint8)
    labels[10:90, 10:90] = 1
    boundary = np.zeros_like(labels)
    boundary[10:90, 51] = 1  # a one-pixel line a user drew
    image = labels.astype(np.float32)
    [s] = samples_from_corrections(image, labels, num_classes=2, in_channels=1, axes="YX",
                                   boundary=boundary, config=FinetuneConfig(context=0),
                                   zoom=(0.35, 0.35))
    line = s.boundary[round(12 * 0.35): round(88 * 0.35)]
    assert line.any(axis=1).all()  # every row still crosses the line
    [n] = samples_from_corrections(image, labels, num_classes=2, in_channels=1, axes="YX",
                                   config=FinetuneConfig(context=0, native_pixels=True),
                                   zoom=(0.35, 0.35))
    assert n.image.shape[-2:] == labels.shape  # the image's own pixels, as asked
    model, _ = resolve_weights("sa2net_lite_msd")
    notes, [k] = _samples(model, image, labels, MM07)
    assert notes and k.image.shape[-2:] == (35, 35)
