"""The boundary-aware instance task: targets, the seeded watershed, and the task travelling
with the weights (checkpoint, card, spec) into the engine's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medseg.engine.metrics import instance_scores
from napari_medseg.engine.seg_task import (
    SegTask,
    drop_fragments,
    instance_target,
    object_region,
    seeded_watershed,
    task_of,
    training_targets,
    with_task,
)
from napari_medseg.errors import ConfigError, InputShapeError

INSTANCES = SegTask(kind="instances")


def touching_discs(shape=(48, 64), radius=10, gap=19):
    """Two discs whose centres are ``gap`` pixels apart (they overlap: touching nuclei)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = shape[0] // 2, shape[1] // 2 - gap // 2
    labels = np.zeros(shape, np.int32)
    labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = 1
    labels[(yy - cy) ** 2 + (xx - cx - gap) ** 2 <= radius ** 2] = 2
    return labels


def perfect_probabilities(labels, width=1):
    """The three class probabilities a perfect network would give for ``labels``."""
    target = instance_target(labels, width)
    return np.stack([(target == k).astype(np.float32) for k in range(3)])


def test_touching_discs_come_out_as_two_objects_from_a_perfect_prediction():
    labels = touching_discs()
    probs = perfect_probabilities(labels)
    fg = probs[0] < 0.5
    # The foreground alone is one connected blob: connected components would fuse them.
    from scipy import ndimage as ndi

    assert ndi.label(fg)[1] == 1
    objects = seeded_watershed(fg, probs[1], probs[2], INSTANCES)
    assert objects.max() == 2
    scores = instance_scores(objects, labels)
    assert scores["tp"] == 2 and scores["fp"] == 0 and scores["fn"] == 0
    # every foreground pixel belongs to an object (the boundary band is flooded back)
    assert np.array_equal(objects > 0, labels > 0)


def test_instance_target_marks_contours_and_the_line_between_touching_objects():
    labels = touching_discs()
    target = instance_target(labels, 1)
    assert set(np.unique(target)) == {0, 1, 2}
    assert np.array_equal(target > 0, labels > 0)
    # where the discs meet, both sides are boundary
    meet = (labels == 1) & (np.roll(labels, -1, axis=1) == 2)
    assert meet.any() and (target[meet] == 2).all()
    assert (target[np.roll(meet, 1, axis=1)] == 2).all()
    # a wider band eats more of each object
    assert (instance_target(labels, 2) == 2).sum() > (target == 2).sum()
    # the image edge is not a contour
    edge = np.zeros((10, 10), np.int32)
    edge[:, :5] = 1
    t = instance_target(edge, 1)
    assert (t[:, 0] == 1)[1:-1].all() and (t[:, 4] == 2).all()


def test_seeded_watershed_numbers_a_nucleus_once_through_the_slices_of_a_stack():
    labels = np.stack([touching_discs()] * 3)
    probs = np.stack([perfect_probabilities(p) for p in labels], axis=1)  # 3 x Z x Y x X
    objects = seeded_watershed(probs[0] < 0.5, probs[1], probs[2], INSTANCES)
    assert objects.max() == 2
    for z in range(3):
        assert instance_scores(objects[z], labels[z])["tp"] == 2
    for disc in (1, 2):  # each disc keeps one number through the slices
        ids = {int(np.bincount(objects[z][labels[z] == disc]).argmax()) for z in range(3)}
        assert len(ids) == 1 and 0 not in ids


def test_foreground_without_a_seed_is_kept_and_tiny_objects_go():
    fg = np.zeros((30, 30), bool)
    fg[2:8, 2:8] = True  # no interior probability at all: an object of its own
    fg[20, 20] = True  # one pixel: below min_size
    interior = np.zeros(fg.shape, np.float32)
    boundary = np.ones(fg.shape, np.float32)
    objects = seeded_watershed(fg, interior, boundary, INSTANCES, min_size=4)
    assert objects.max() == 1 and (objects > 0).sum() == 36


def test_small_seeds_are_dropped_by_min_seed():
    fg = np.zeros((20, 40), bool)
    fg[5:15, 5:35] = True
    interior = np.zeros(fg.shape, np.float32)
    interior[8:12, 8:12] = 1.0  # 16 pixels
    interior[9:11, 28:30] = 1.0  # 4 pixels: a speck of interior
    boundary = 1.0 - interior
    task = SegTask(kind="instances", min_seed=8)
    assert seeded_watershed(fg, interior, boundary, task).max() == 1
    task = SegTask(kind="instances", min_seed=2)
    assert seeded_watershed(fg, interior, boundary, task).max() == 2


def test_fragments_below_a_fraction_of_the_median_object_go_unless_on_the_edge():
    labels = np.zeros((60, 60), np.int32)
    labels[10:20, 10:20] = 1  # three nuclei of 100 pixels
    labels[10:20, 30:40] = 2
    labels[30:40, 10:20] = 3
    labels[35:37, 35:37] = 4  # a 4-pixel speck inside the image: 0.04 of the median
    labels[0:2, 50:52] = 5  # a 4-pixel nucleus cut by the image's top edge
    kept = drop_fragments(labels, 0.15)
    assert set(np.unique(kept)) == {0, 1, 2, 3, 5}
    assert np.array_equal(drop_fragments(labels, 0.0), labels)  # 0 keeps all
    assert labels[35, 35] == 4  # the input is not changed
    # the same rule inside the watershed: the speck, seeded on its own, is removed
    interior = (labels > 0).astype(np.float32)
    task = SegTask(kind="instances", min_seed=1, min_object_fraction=0.15)
    objects = seeded_watershed(labels > 0, interior, 1.0 - interior, task, min_size=1)
    assert objects.max() == 4 and objects[35, 35] == 0 and objects[0, 50] > 0
    with pytest.raises(ConfigError, match="min_object_fraction"):
        SegTask(kind="instances", min_object_fraction=1.0)
    # stored only when set, so weights described before it keep their description
    assert "min_object_fraction" not in SegTask(kind="instances").to_dict()
    assert SegTask.from_dict(task.to_dict()) == task


def test_tuning_picks_the_fragment_fraction_that_scores_best():
    from napari_medseg.engine.training.instance_tuning import tune_watershed

    labels = np.zeros((60, 60), np.int32)
    for i, (y, x) in enumerate([(8, 8), (8, 30), (30, 8), (30, 30)], start=1):
        labels[y:y + 12, x:x + 12] = i
    probs = perfect_probabilities(labels)
    noisy = probs.copy()
    noisy[:, 50:52, 48:50] = np.array([0.0, 1.0, 0.0])[:, None, None]  # a spurious speck
    from napari_medseg.models import create_model

    model = with_task(create_model("unet_sharp", "tiny", 1, 3), SegTask(kind="instances"))
    task, table = tune_watershed(model, [(noisy, labels)], seed_thresholds=(0.5,),
                                 min_seeds=(1,), min_size=1, foreground_thresholds=(0.5,),
                                 fragment_fractions=(0.0, 0.15))
    assert task.min_object_fraction == 0.15
    assert [r["ap_iou50"] for r in table[-2:]] == [0.8, 1.0]
    # nothing to remove: a tie, and the first listed (0, keep everything) wins
    task, _ = tune_watershed(model, [(probs, labels)], seed_thresholds=(0.5,), min_seeds=(1,),
                             min_size=1, foreground_thresholds=(0.5,),
                             fragment_fractions=(0.0, 0.15))
    assert task.min_object_fraction == 0.0


def test_objects_grow_to_their_own_threshold_apart_from_the_mask():
    from napari_medseg.engine.training.instance_tuning import tune_watershed
    from napari_medseg.models import create_model

    labels = np.zeros((40, 40), np.int32)
    labels[5:17, 5:17] = 1
    probs = perfect_probabilities(labels)
    # a faint nucleus: the network gives it foreground 0.45 (interior 0.3 + boundary 0.15)
    probs[:, 22:34, 22:34] = np.array([0.55, 0.3, 0.15])[:, None, None]
    labels[22:34, 22:34] = 2
    mask = probs[0] < 0.5  # the mask (by Dice) leaves it out
    task = SegTask(kind="instances", seed_threshold=0.25, min_seed=1)
    assert np.array_equal(object_region(mask, probs[1], probs[2], task), mask)
    grown = SegTask(kind="instances", seed_threshold=0.25, min_seed=1, object_threshold=0.4)
    region = object_region(mask, probs[1], probs[2], grown)
    assert region[28, 28] and not mask[28, 28]
    assert seeded_watershed(region, probs[1], probs[2], grown).max() == 2
    with pytest.raises(ConfigError, match="object_threshold"):
        SegTask(kind="instances", object_threshold=1.0)
    assert "object_threshold" not in task.to_dict()
    assert SegTask.from_dict(grown.to_dict()) == grown
    # tuning finds it: the mask's threshold stays where Dice puts it
    model = with_task(create_model("unet_sharp", "tiny", 1, 3), SegTask(kind="instances"))
    tuned, table = tune_watershed(model, [(probs, labels)], seed_thresholds=(0.25,),
                                  min_seeds=(1,), min_size=1, foreground_thresholds=(0.5,),
                                  fragment_fractions=(0.0,),
                                  object_thresholds=(None, 0.4, 0.6))
    assert tuned.object_threshold == 0.4 and tuned.foreground_threshold == 0.5
    assert [r["ap_iou50"] for r in table if r["min_object_fraction"] == 0.0][-4:-1] == [
        0.5, 1.0, 0.5]
    # and prediction's path (the stored uint8 helpers, per block) draws the same objects
    from napari_medseg.engine.inference.postprocess import (quantize_probabilities,
                                                            seeded_instances_per_block)

    inner, line = (quantize_probabilities(probs[k], "uint8") for k in (1, 2))
    for setting, count in ((task, 1), (grown, 2)):
        objects = seeded_instances_per_block(mask, inner, line, "YX", setting, min_size=1)
        assert objects.max() == count


def test_a_class_mask_is_never_read_as_instances():
    semantic = np.zeros((8, 8), np.int64)
    semantic[:4] = 1
    semantic[4:6] = 2
    # three classes: the values are classes, untouched
    mask, boundary = training_targets(semantic, 3)
    assert np.array_equal(mask, semantic) and boundary is None
    # more classes than the network has: an error that names the instance task
    with pytest.raises(InputShapeError, match="--task instances"):
        training_targets(semantic + 1, 3)
    # one foreground class: every label is foreground, and no boundary is made up
    mask, boundary = training_targets(semantic, 2)
    assert np.array_equal(mask, (semantic > 0).astype(np.int64)) and boundary is None
    # the instance task reads the same values as objects
    mask, boundary = training_targets(semantic, 3, INSTANCES)
    assert set(np.unique(mask)) == {0, 1, 2} and boundary is not None
    assert np.array_equal(boundary, (mask == 2).astype(np.uint8))


def test_a_corrected_boundary_layer_becomes_boundary_target():
    mask = np.zeros((12, 20), np.int32)
    mask[2:10, 2:18] = 1  # the user's mask: one blob
    line = np.zeros_like(mask)
    line[:, 10] = 1  # the user's boundary stroke splitting it
    target, boundary = training_targets(mask, 3, INSTANCES, boundary=line)
    assert (target[2:10, 10] == 2).all()
    assert target[0, 10] == 0  # a stroke outside the mask is not foreground
    assert boundary[5, 10] == 1


def test_task_validation_and_round_trip():
    task = SegTask.from_dict({"kind": "instances", "boundary_width": 2, "seed_threshold": 0.6,
                              "min_seed": 4, "description": "free text"})
    assert SegTask.from_dict(task.to_dict()) == task
    assert SegTask.from_dict(None) == SegTask() and not SegTask().instances
    with pytest.raises(ConfigError):
        SegTask.from_dict({"kind": "panoptic"})
    with pytest.raises(ConfigError):
        SegTask.from_dict({"kind": "instances", "seed_threshold": 1.5})
    with pytest.raises(ConfigError):
        SegTask.from_dict({"kind": "instances", "unknown": 1})
    # tuned on flip-averaged probabilities: recorded when on, left out when off (weights
    # described before keep their hash), and a yes/no only
    assert "tta" not in INSTANCES.to_dict()
    tta = SegTask.from_dict({"kind": "instances", "tta": True})
    assert tta.tta and tta.to_dict()["tta"] is True and SegTask.from_dict(tta.to_dict()) == tta
    with pytest.raises(ConfigError, match="tta"):
        SegTask.from_dict({"kind": "instances", "tta": "sometimes"})


def test_weights_tuned_with_tta_predict_with_it_unless_told_otherwise(tmp_path):
    from napari_medseg.engine.checkpoints import load_checkpoint, save_checkpoint
    from napari_medseg.engine.inference.pipeline import predict, with_weights_defaults
    from napari_medseg.config import PredictConfig
    from napari_medseg.models import create_model

    torch.manual_seed(0)
    model = with_task(create_model("unet_sharp", "tiny", 1, 3), SegTask("instances", tta=True))
    save_checkpoint(model, tmp_path / "tta", classes=("background", "interior", "boundary"))
    loaded, info = load_checkpoint(tmp_path / "tta")
    assert info.task["tta"] is True and task_of(loaded).tta
    assert with_weights_defaults(PredictConfig(), loaded).tta is True
    assert with_weights_defaults(PredictConfig(tta=False), loaded).tta is False
    plain = with_task(create_model("unet_sharp", "tiny", 1, 3), INSTANCES)
    assert with_weights_defaults(PredictConfig(), plain).tta is False
    image = np.random.default_rng(0).random((32, 40)).astype(np.float32)
    settings = {"outputs": "instances", "device": "cpu", "tile": 32}
    default = predict(image, loaded, settings)
    assert default.plan.tta_flips == 4  # flip-averaged, as the thresholds were tuned
    assert default.stats["forward_passes"] == 4 * default.plan.tiles_per_plane
    assert predict(image, loaded, {**settings, "tta": False}).plan.tta_flips == 1
    assert predict(image, plain, settings).plan.tta_flips == 1


def test_the_task_travels_with_the_checkpoint_into_the_outputs(tmp_path):
    from napari_medseg.engine.checkpoints import load_checkpoint, save_checkpoint
    from napari_medseg.engine.inference.pipeline import predict
    from napari_medseg.models import create_model

    torch.manual_seed(0)
    with pytest.raises(ConfigError):
        with_task(create_model("unet_sharp", "tiny", 1, 2), INSTANCES)
    model = with_task(create_model("unet_sharp", "tiny", 1, 3), SegTask("instances",
                                                                         min_seed=3))
    save_checkpoint(model, tmp_path / "inst", classes=("background", "interior", "boundary"))
    loaded, info = load_checkpoint(tmp_path / "inst")
    assert info.task["kind"] == "instances" and task_of(loaded).min_seed == 3
    image = np.random.default_rng(0).random((40, 56)).astype(np.float32)
    out = predict(image, loaded, {"outputs": "mask,boundary,instances,probabilities",
                                  "device": "cpu"})
    probs = np.asarray(out["probabilities"], np.float32)
    assert probs.shape == (3, 40, 56)
    # mask = interior + boundary (the foreground), boundary = the boundary class
    assert np.array_equal(np.asarray(out["mask"]), (probs[0] < 0.5).astype(np.uint8))
    assert set(np.unique(np.asarray(out["boundary"]))) <= {0, 1}
    assert np.asarray(out["instances"]).dtype == np.int32
    assert not ({"interior_probability", "boundary_probability"} & set(out.outputs))
    # older weights (no task) stay the classes task, and their description is unchanged
    plain = create_model("unet_sharp", "tiny", 1, 2)
    written = save_checkpoint(plain, tmp_path / "plain")
    assert "task" not in written.to_dict()
    assert not task_of(load_checkpoint(tmp_path / "plain")[0]).instances


def test_contact_weights_stress_only_where_objects_touch():
    from napari_medseg.engine.seg_task import contact_weights

    labels = touching_discs()
    weights = contact_weights(labels, 1, 5.0)
    heavy = weights > 1
    assert heavy.any() and (weights[heavy] == 5.0).all() and (weights[~heavy] == 1.0).all()
    # only pixels next to the other disc: none on the outer contour, none in the background
    cols = np.unique(np.argwhere(heavy)[:, 1])
    assert cols.min() >= 28 and cols.max() <= 36 and not heavy[labels == 0].any()
    lone = np.zeros((20, 20), np.int32)
    lone[5:15, 5:15] = 3
    assert (contact_weights(lone, 1, 5.0) == 1.0).all()


def test_training_patches_carry_the_contact_weights(tmp_path):
    import tifffile

    from napari_medseg.engine.training.datasets import PatchSampler, load_samples

    labels = touching_discs()
    image = (labels > 0).astype(np.float32) * 200
    tifffile.imwrite(tmp_path / "a.tif", image)
    tifffile.imwrite(tmp_path / "a_mask.tif", labels.astype(np.uint16))
    (s,) = load_samples([(tmp_path / "a.tif", tmp_path / "a_mask.tif")], 1, lambda x: x / 200,
                        task=INSTANCES, num_classes=3, contact_weight=4.0)
    assert s.weight is not None and s.weight.max() == 4.0
    _, masks, bnds, valid = PatchSampler([s], 64, seed=0).draw(2)
    assert valid.max() == 4.0 and set(np.unique(masks)) == {0, 1, 2}
    assert np.array_equal(bnds, (masks == 2).astype(np.uint8))


def test_banet_with_the_instance_task_takes_its_boundary_from_the_boundary_class():
    """Its edge head learns the same boundary in training; prediction reads the class."""
    from napari_medseg.engine.inference.pipeline import predict
    from napari_medseg.models import create_model

    torch.manual_seed(0)
    model = with_task(create_model("banet", "tiny", 1, 3), INSTANCES)
    out = predict(np.random.default_rng(2).random((64, 80)).astype(np.float32), model,
                  {"outputs": "boundary,probabilities", "device": "cpu"})
    probs = np.asarray(out["probabilities"], np.float32)
    assert np.array_equal(np.asarray(out["boundary"]), (probs[2] > 0.5).astype(np.uint8))


def test_train_reads_a_three_class_mask_as_classes_and_instances_only_when_told(tmp_path):
    """The bug this replaces: any mask above 1 was taken for instances (foreground plus a
    boundary), so a {0, 1, 2} class mask lost its classes."""
    import tifffile

    from napari_medseg.engine.training.datasets import load_samples

    semantic = np.zeros((32, 32), np.uint8)
    semantic[4:14, 4:28] = 1
    semantic[18:28, 4:28] = 2
    tifffile.imwrite(tmp_path / "s.tif", semantic.astype(np.float32))
    tifffile.imwrite(tmp_path / "s_mask.tif", semantic)
    pairs = [(tmp_path / "s.tif", tmp_path / "s_mask.tif")]
    (as_classes,) = load_samples(pairs, 1, lambda x: x, num_classes=3)
    assert np.array_equal(as_classes.mask, semantic) and as_classes.boundary is None
    (as_objects,) = load_samples(pairs, 1, lambda x: x, task=INSTANCES, num_classes=3)
    assert np.array_equal(as_objects.mask, instance_target(semantic))
    notes: list[str] = []
    (merged,) = load_samples(pairs, 1, lambda x: x, num_classes=2, notes=notes)
    assert merged.mask.max() == 1 and "--task instances" in notes[0]


def test_objects_of_a_second_region_are_numbered_after_the_first():
    from napari_medseg.engine.inference.postprocess import offset_labels

    part = np.array([[0, 1, 1], [2, 0, 0]], np.int32)
    shifted = offset_labels(part, 40)
    assert shifted.tolist() == [[0, 41, 41], [42, 0, 0]] and shifted.dtype == np.int32


def test_a_warm_start_keeps_its_parents_boundary_width_unless_another_is_asked():
    from types import SimpleNamespace

    from napari_medseg.config import TrainConfig
    from napari_medseg.engine.training.start import task_to_learn

    parent = SimpleNamespace(task={"kind": "instances", "boundary_width": 1,
                                   "seed_threshold": 0.8, "min_seed": 32,
                                   "object_diameter": 20.4})
    kept = task_to_learn(TrainConfig(task="instances"), parent)
    assert (kept.boundary_width, kept.seed_threshold, kept.min_seed) == (1, 0.8, 32)
    same = task_to_learn(TrainConfig(task="instances", boundary_width=1), parent)
    assert same == kept
    wider = task_to_learn(TrainConfig(task="instances", boundary_width=2), parent)
    assert wider.instances and wider.boundary_width == 2
    assert wider.object_diameter == 20.4  # the data's nuclei, not the band's
    assert wider.seed_threshold == SegTask().seed_threshold  # tuned again after training
    fresh = task_to_learn(TrainConfig(task="instances"), None)
    assert fresh.boundary_width == 1
    with pytest.raises(ConfigError):
        TrainConfig(task="instances", boundary_width=0)
