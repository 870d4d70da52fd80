"""Object size: weights record the diameter of the objects they learnt, and prediction
resamples an image whose objects are larger or smaller (measured by a first pass, or given)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tifffile
from skimage.transform import rescale

from napari_medseg.config import PredictConfig, TrainConfig
from napari_medseg.engine.inference.pipeline import predict
from napari_medseg.engine.metrics import match_instances
from napari_medseg.engine.object_size import (
    ZOOM_RANGE,
    diameter_zoom,
    equivalent_diameters,
    median_diameter,
)
from napari_medseg.engine.seg_task import SegTask, task_of
from napari_medseg.errors import ConfigError
from napari_medseg.io.samples import sample_path


def discs(radii, shape=(200, 200)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for i, r in enumerate(radii, 1):
        cy, cx = 40 + 60 * ((i - 1) // 3), 40 + 60 * ((i - 1) % 3)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2] = i
    return labels


def zoom_of(notice: str) -> float:
    return float(re.search(r"resampled by ([0-9.]+)", notice).group(1))


def ap50(pred, ref):
    m = match_instances(np.asarray(pred), ref, 0.5)
    return m["tp"] / (m["tp"] + m["fp"] + m["fn"])


def test_diameters_are_those_of_discs_of_the_objects_areas():
    d = equivalent_diameters(discs([5, 10, 20]))
    assert d == pytest.approx([10, 20, 40], rel=0.05)
    # pooled over images: the middle of 5 objects
    assert median_diameter([discs([5, 10]), discs([20, 20, 20])]) == pytest.approx(40, rel=0.05)
    assert median_diameter([np.zeros((8, 8), np.int32)]) is None


def test_a_zoom_near_one_resamples_nothing_and_extremes_are_clipped():
    assert diameter_zoom(20, 21) is None and diameter_zoom(20, 18) is None
    assert diameter_zoom(20, 40) == pytest.approx(0.5)
    assert diameter_zoom(20, 200) == ZOOM_RANGE[0] and diameter_zoom(20, 1) == ZOOM_RANGE[1]


def test_the_diameter_travels_with_the_task_and_older_tasks_keep_their_form():
    task = SegTask.from_dict({"kind": "instances", "object_diameter": 20.1})
    assert task.object_diameter == 20.1 and SegTask.from_dict(task.to_dict()) == task
    # weights described before the diameter existed keep the same description
    assert "object_diameter" not in SegTask(kind="instances").to_dict()
    with pytest.raises(ConfigError):
        SegTask(kind="instances", object_diameter=0)
    with pytest.raises(ConfigError):
        PredictConfig(diameter=-3)


@pytest.fixture(scope="module")
def nuclei_weights():
    from napari_medseg.engine.checkpoints import resolve_weights

    model = resolve_weights("sa2net_lite_dsb2018")
    return model[0] if isinstance(model, tuple) else model


@pytest.fixture(scope="module")
def enlarged_sample():
    """The fluorescence nuclei sample at three times its magnification (nuclei about 38 px,
    nearly twice the size the nuclei weights learnt), with its labels."""
    image = tifffile.imread(sample_path("nuclei"))
    labels = tifffile.imread(sample_path("nuclei", mask=True))
    big = rescale(image.astype(np.float32), 3, order=1, preserve_range=True)
    big_labels = rescale(labels, 3, order=0, preserve_range=True,
                         anti_aliasing=False).astype(np.int32)
    return big.astype(np.uint8), big_labels


def test_shipped_nuclei_weights_record_the_size_of_their_training_nuclei(nuclei_weights):
    assert 15 < task_of(nuclei_weights).object_diameter < 25


def test_nuclei_at_twice_the_learnt_size_are_measured_and_resampled(nuclei_weights,
                                                                   enlarged_sample):
    image, labels = enlarged_sample
    config = PredictConfig(outputs=("instances",), axes="YX", device="cpu")
    auto = predict(image, nuclei_weights, config)
    native = predict(image, nuclei_weights, config.replace(native_pixels=True))
    (notice,) = [n for n in auto.notices if "px across" in n]
    assert "by a second pass at the size a first pass gave" in notice, notice
    assert 0.4 < zoom_of(notice) < 0.6, notice  # 20.4 px learnt / about 40 px measured
    assert not any("px across" in n for n in native.notices)
    assert np.asarray(auto["instances"]).shape == image.shape
    # at their learnt size the nuclei come out better than at twice it (measured with the
    # weights of 2026-12-04: AP@0.5 0.822 against 0.702; at 2x magnification, nuclei 1.25x
    # the learnt size, the image's own pixels did as well or better: 0.833 against 0.791)
    assert ap50(auto["instances"], labels) > ap50(native["instances"], labels) + 0.01


def test_a_second_pass_at_the_first_estimate_gives_the_size(nuclei_weights, monkeypatch):
    """The first pass at the image's own pixels is biased toward the learnt size (big nuclei
    cut in pieces); where it calls for resampling, the objects of a second pass at its zoom
    are measured, and a second pass that finds too few keeps the first estimate."""
    from napari_medseg.engine.inference import object_size as inference_size

    learnt = task_of(nuclei_weights).object_diameter
    seen = []
    found_again = [True]

    def measure(model, crop, crop_axes, config, zoom=None):
        seen.append(zoom)
        if zoom is None:  # at the image's pixels: 40 px nuclei found as 30 px pieces
            return 30.0, 12
        return (40.0, 9) if found_again[0] else (None, 1)

    def estimate():
        return inference_size.estimate_diameter(nuclei_weights, np.zeros((64, 64), np.uint8),
                                                "YX", "YX", PredictConfig(axes="YX"), learnt)

    monkeypatch.setattr(inference_size, "_measure", measure)
    assert estimate() == (40.0, 9, 2, (64, 64))
    assert seen == [None, pytest.approx(learnt / 30.0)]
    found_again[0] = False
    assert estimate()[:3] == (30.0, 12, 1)
    seen.clear()
    monkeypatch.setattr(inference_size, "_measure",
                        lambda *a, **k: seen.append(1) or (learnt * 1.05, 20))
    assert estimate()[2] == 1 and seen == [1]  # near the learnt size: one pass only


def test_the_second_pass_keeps_the_smallest_seed_at_the_networks_scale(nuclei_weights,
                                                                        monkeypatch):
    """Objects of a resampled pass are measured on the crop's grid, so the smallest seed
    (32 px as the network sees it) is divided by the zoom's area there."""
    from napari_medseg.engine import seg_task
    from napari_medseg.engine.inference import object_size as inference_size

    seeds = []
    real = seg_task.seeded_watershed

    def spy(foreground, interior, boundary, task, *rest):
        seeds.append((task.min_seed, task.object_threshold))
        return real(foreground, interior, boundary, task, *rest)

    monkeypatch.setattr(seg_task, "seeded_watershed", spy)
    crop = tifffile.imread(sample_path("nuclei"))[:64, :64]
    config = PredictConfig(axes="YX", device="cpu")
    for zoom in (None, 2.0, 0.5):
        inference_size._measure(nuclei_weights, crop, "YX", config, zoom)
    # fixed settings: the weights' own object threshold is not used for the estimate
    assert seeds == [(32, None), (8, None), (128, None)]


def test_a_given_diameter_sets_the_zoom_and_one_near_the_learnt_size_changes_nothing(
        nuclei_weights):
    image = tifffile.imread(sample_path("nuclei"))
    config = PredictConfig(outputs=("mask",), axes="YX", device="cpu")
    given = predict(image, nuclei_weights, config.replace(diameter=40.0))
    assert any("as given" in n and "resampled by 0.5" in n for n in given.notices)
    learnt = task_of(nuclei_weights).object_diameter
    same = predict(image, nuclei_weights, config.replace(diameter=learnt))
    assert not any("px across" in n for n in same.notices)


def test_the_cli_says_the_resampling_once(tmp_path, capsys):
    from napari_medseg.cli import main

    rc = main(["predict", str(sample_path("nuclei")), "-o", str(tmp_path),
               "--weights", "sa2net_lite_dsb2018", "--diameter", "40", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.count("resampled by 0.5") == 1, err  # was: as a notice and again in the plan
    assert "plan" in err and (tmp_path / "nuclei_mask.tif").exists()

def test_an_image_without_objects_runs_at_its_own_pixels_and_says_why(nuclei_weights):
    blank = np.zeros((96, 96), np.uint8)
    out = predict(blank, nuclei_weights, PredictConfig(outputs=("mask",), axes="YX",
                                                       device="cpu"))
    assert any("Object size not estimated" in n for n in out.notices)
    assert np.asarray(out["mask"]).shape == blank.shape


def test_training_records_the_diameter_of_the_training_objects_only(tmp_path,
                                                                     nuclei_folders):
    from napari_medseg.engine.checkpoints import load_checkpoint
    from napari_medseg.engine.training.train import train

    images, masks = nuclei_folders
    cfg = TrainConfig.from_mapping({
        "network": "unet_sharp", "variant": "tiny", "in_channels": 3, "num_classes": 2,
        "task": "instances", "steps": 1, "patch": 64, "batch_size": 1, "val_fraction": 0.5,
        "warmup_steps": 1, "val_every": 1})
    train(images, masks, tmp_path / "ck.safetensors", cfg)
    _, info = load_checkpoint(tmp_path / "ck.safetensors")
    (trained,) = info.training_data["train_files"]
    expected = median_diameter([tifffile.imread(masks / f"{trained}.tif")])
    assert info.task["object_diameter"] == pytest.approx(expected)


def test_training_can_bring_every_image_to_one_object_size():
    from napari_medseg.engine.training.datasets import at_object_size

    labels = discs([20, 20, 21, 19])
    image = np.stack([labels > 0] * 3).astype(np.float32)
    small, small_labels = at_object_size(image, labels, 20.0)
    assert small.shape == (3, 100, 100) and small_labels.shape == (100, 100)
    assert median_diameter([small_labels]) == pytest.approx(20, rel=0.06)
    assert set(np.unique(small_labels)) == {0, 1, 2, 3, 4}
    # the image moves with its labels
    assert ((small.mean(0) > 0.5) == (small_labels > 0)).mean() > 0.97
    # objects already near the size stay as they are
    same, same_labels = at_object_size(image, labels, 38.0)
    assert same is image and same_labels is labels


def test_corrections_train_at_the_object_size_prediction_resamples_to(nuclei_weights,
                                                                      enlarged_sample):
    """Nuclei at twice the learnt size: predict resamples them by about 0.5, so the
    corrections of that image train the network at that zoom too (not on nuclei twice the
    size it will see them)."""
    from test_finetune_pixel_size import _samples

    from napari_medseg.config import FinetuneConfig

    image, labels = enlarged_sample
    notes, samples = _samples(nuclei_weights, image, labels, None,
                              FinetuneConfig(context=0))
    (notice,) = [n for n in notes if "px across" in n]
    assert "corrections" in notice and 0.4 < zoom_of(notice) < 0.6, notice
    (sample,) = samples
    zoom = zoom_of(notice)
    assert sample.image.shape[-2:] == tuple(round(s * zoom) for s in image.shape)
    from scipy import ndimage as ndi

    interiors = ndi.label(sample.mask == 1)[0]  # each nucleus's inside, at the learnt size
    learnt = task_of(nuclei_weights).object_diameter
    assert 0.6 * learnt < median_diameter([interiors]) < 1.3 * learnt
    # --native-pixels keeps the image's own
    notes, (native,) = _samples(nuclei_weights, image, labels, None,
                                FinetuneConfig(context=0, native_pixels=True))
    assert native.image.shape[-2:] == image.shape and not notes
