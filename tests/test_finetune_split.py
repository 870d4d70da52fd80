"""Fine-tuning on a handful of images: a strip of each is held out, never a whole image."""

from __future__ import annotations

import numpy as np

from napari_medseg.config import FinetuneConfig
from napari_medseg.engine.training.datasets import Sample, split_within
from napari_medseg.engine.training.finetune import DataEvent, _split_iter


def _samples(n: int = 5, shape=(90, 140)) -> list[Sample]:
    rng = np.random.default_rng(0)
    return [Sample(rng.random((1, *shape), dtype=np.float32),
                   (rng.random(shape) > 0.5).astype(np.int64), None, f"img{i}", f"img{i}")
            for i in range(n)]


def test_every_image_trains_and_its_held_out_strip_weighs_nothing_in_training():
    samples = _samples()
    train, val = split_within(samples, 0.25, gap=8, seed=1)
    assert len(train) == len(val) == 5
    for s, t, v in zip(samples, train, val):
        assert v.mask.shape == (90, 35)  # a quarter of the longer side (140)
        zero = np.flatnonzero((t.weight == 0).all(axis=0))
        start = zero[0] if zero[0] == 0 else (zero[-1] - 34 if zero[-1] == 139 else
                                               zero[0] + 8)
        assert np.array_equal(v.mask, s.mask[:, start:start + 35])  # the image's own labels
        gaps = 1 if zero[0] == 0 or zero[-1] == 139 else 2  # an end strip or the middle one
        assert len(zero) == 35 + 8 * gaps  # the strip and the gap(s) beside it
        assert t.weight.sum() == 90 * (140 - len(zero)) and s.weight is None  # input kept


def test_a_central_lesion_is_validated_on_a_strip_through_it():
    mask = np.zeros((100, 200), np.int64)
    mask[30:70, 70:130] = 1  # one object in the middle, as a skin lesion
    s = Sample(np.zeros((3, 100, 200), np.float32), mask, None, "skin", "skin")
    [t], [v] = split_within([s], 0.25, gap=8, seed=0)
    assert v.mask.any() and v.mask.shape == (100, 50)  # not the empty skin at an edge
    assert np.array_equal(v.mask, mask[:, 75:125])


def test_few_images_are_split_in_strips_and_many_by_image():
    config = FinetuneConfig(strips_below=6)
    gen = _split_iter(_samples(5), [], config)
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as done:
        train, val, _ = done.value
    [data] = [e for e in events if isinstance(e, DataEvent)]
    assert "all train, a strip of 5 held out" in data.message and len(train) == 5
    gen = _split_iter(_samples(8), [], config)
    try:
        while True:
            next(gen)
    except StopIteration as done:
        train, val, _ = done.value
    assert len(train) == 6 and len(val) == 2  # eight images: two whole ones held out
    # one corrected image alone still gets a validation
    train, val = split_within(_samples(1), 0.25, 16, 0)
    assert len(train) == len(val) == 1


def test_a_correction_crop_keeps_its_loss_map_and_holds_out_a_strip_of_its_box():
    from napari_medseg.engine.training.corrections import RegionSample
    from napari_medseg.engine.training.replay import RegionSampler

    rng = np.random.default_rng(0)
    valid = np.zeros((120, 160), np.float32)
    valid[20:100, 30:150] = 1.0  # the corrected box inside its context
    s = RegionSample(rng.random((1, 120, 160), dtype=np.float32),
                     np.ones((120, 160), np.int64), None, "img", "img#g0", valid=valid,
                     plane=(), crop=(10, 20, 130, 180))
    [train], [val] = split_within([s], 0.25, gap=8, seed=0)
    assert isinstance(train, RegionSample) and isinstance(val, RegionSample)
    held = val.valid > 0
    assert held.sum() == 80 * 30  # a quarter of the box's longer side (120), its rows
    lost = (valid > 0) & (train.valid == 0)
    gaps = (lost.sum() // 80 - 30) // 8
    assert gaps in (1, 2) and lost.sum() == 80 * (30 + 8 * gaps)  # strip and gap(s)
    assert train.valid.sum() == valid.sum() - lost.sum() and s.valid is valid
    assert val.crop[0] == 10 and val.crop[2] == 130  # rows kept, columns cut
    assert val.image.shape[-1] == val.crop[3] - val.crop[1]  # context on each side of it
    assert 30 + 8 <= val.image.shape[-1] <= 30 + 16
    # the sampler never centres a training patch on the held-out strip
    sampler = RegionSampler([train], 32, seed=0)
    centres = sampler.pools[0][0]["centres"]
    assert ((train.valid[tuple(centres.T)] > 0)).all()


def test_patch_zero_is_the_side_the_weights_trained_on():
    from napari_medseg.engine.checkpoints import resolve_weights
    from napari_medseg.engine.training.finetune import _patch_side
    from napari_medseg.models import create_model

    skin, info = resolve_weights("sa2net_lite_ph2")  # trained on 768 px patches, at 1/3
    assert info.settings["patch"] == 768 and info.input_downsample == 3
    assert _patch_side(skin, FinetuneConfig(patch=0)) == 768
    assert _patch_side(skin, FinetuneConfig(patch=128)) == 384  # 128 of its own pixels
    bare = create_model("sa2net", variant="tiny", in_channels=1, num_classes=2)
    assert _patch_side(bare, FinetuneConfig(patch=0)) == 128  # no record: 128


def test_the_checkpoint_says_which_split_ran(tmp_path):
    from napari_medseg.engine.checkpoints import read_checkpoint_info
    from napari_medseg.engine.training.corrections import RegionSample
    from napari_medseg.engine.training.finetune import finetune
    from napari_medseg.models import create_model

    rng = np.random.default_rng(0)
    mask = np.zeros((96, 96), np.int64)
    mask[30:66, 30:66] = 1
    samples = [RegionSample(rng.random((1, 96, 96), dtype=np.float32), mask, None, f"r{i}",
                            f"r{i}", valid=np.ones((96, 96), np.float32)) for i in range(3)]
    model = create_model("unet_sharp", variant="tiny", in_channels=1, num_classes=2)
    config = {"steps": 1, "val_every": 1, "batch_size": 2, "patch": 32, "device": "cpu",
              "precision": "fp32", "max_minutes": 0}
    finetune(model, samples, config, output=tmp_path / "strips.safetensors")
    split = read_checkpoint_info(tmp_path / "strips.safetensors").training_data["split"]
    assert split.startswith("a strip of each region held out")
    finetune(model, samples, {**config, "strips_below": 0}, output=tmp_path / "whole.safetensors")
    split = read_checkpoint_info(tmp_path / "whole.safetensors").training_data["split"]
    assert split.startswith("by region group")
