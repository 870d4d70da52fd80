"""Fine-tuning on corrections: regions from a diff, the split, replay, stop/keep-best, lineage,
autosave and the CLI round trip (tiny networks, a few steps, the package's nuclei sample)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from napari_medseg.config import FinetuneConfig
from napari_medseg.engine.seg_task import SegTask, instance_target
from napari_medseg.engine.training import loop as train_mod
from napari_medseg.engine.checkpoints import load_checkpoint, read_checkpoint_info, save_checkpoint
from napari_medseg.engine.training.datasets import split_samples
from napari_medseg.engine.training.finetune import (
    CorrectionRegion,
    DataEvent,
    RegionSampler,
    ReplayStore,
    changed_mask,
    class_targets,
    find_regions,
    finetune,
    finetune_iter,
    group_regions,
    prepare_corrections_iter,
    samples_from_corrections,
)
from napari_medseg.engine.training.lineage import (
    active_source,
    ancestors,
    autosave_labels,
    checkpoints_dir,
    list_lineage,
    revert,
    save_checkpoint_atomic,
    set_active,
    unique_checkpoint_path,
)
from napari_medseg.engine.progress import (
    CancelToken,
    FinishedEvent,
    NoticeEvent,
    StageEvent,
    drain,
)
from napari_medseg.engine.training.loop import StepEvent, ValidationEvent
from napari_medseg.engine.training.workflow import (
    Corrections,
    finetune_corrections_iter,
    finetune_samples_iter,
)
from napari_medseg.errors import CheckpointError, InputShapeError, MedsegError
from napari_medseg.models import create_model
from napari_medseg.resources import samples_dir

FAST = {"device": "cpu", "precision": "fp32", "batch_size": 2, "patch": 64}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A private user data folder and no shipped weights."""
    folder = tmp_path / "home"
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(folder))
    weights = tmp_path / "shipped"
    weights.mkdir()
    monkeypatch.setenv("NAPARI_MEDSEG_WEIGHTS", str(weights))
    return folder


@pytest.fixture(scope="module")
def nuclei() -> tuple[np.ndarray, np.ndarray]:
    """The 256 x 256 grey nuclei sample and its instance labels (YX)."""
    return (tifffile.imread(samples_dir() / "nuclei.tif"),
            tifffile.imread(samples_dir() / "nuclei_mask.tif"))


def _edited(gt: np.ndarray) -> np.ndarray:
    """A 'prediction' that differs from the truth in every pixel of three separate boxes."""
    pred = (gt > 0).astype(np.uint8)
    for box in ((slice(20, 50), slice(20, 60)), (slice(150, 170), slice(180, 230)),
                (slice(200, 240), slice(30, 60))):
        pred[box] = 1 - pred[box]
    return pred


def _tiny(in_channels: int = 1, num_classes: int = 2, network: str = "unet_sharp", seed=0):
    torch.manual_seed(seed)
    return create_model(network, "tiny", in_channels, num_classes)


def _base_checkpoint(tmp_path, network="unet_sharp", in_channels=1):
    model = _tiny(in_channels, network=network)
    info = save_checkpoint(model, tmp_path / "base", dtype="float32",
                           normalization={"mode": "percentile", "low": 1.0, "high": 99.8},
                           training_data={"dataset": "dsb2018_nuclei"})
    loaded, info = load_checkpoint(tmp_path / "base")
    return loaded, info


# --- regions from a diff -------------------------------------------------------------------


def test_find_regions_boxes_margins_merging_and_stray_pixels():
    changed = np.zeros((64, 80), bool)
    changed[10:14, 10:20] = True          # 40 px
    changed[40:44, 60:64] = True          # 16 px, far away
    changed[30, 5] = True                 # one stray pixel: ignored
    regions = find_regions(changed, margin=3, min_changed=4)
    assert [r.box for r in regions] == [(7, 7, 17, 23), (37, 57, 47, 67)]
    assert [r.changed for r in regions] == [40, 16]
    # Margin clipped at the edges; two changes whose grown boxes touch are merged.
    changed[:] = False
    changed[0:2, 0:2] = True
    changed[0:2, 8:10] = True
    (merged,) = find_regions(changed, margin=3, min_changed=1)
    assert merged.box == (0, 0, 5, 13) and merged.changed == 8
    # Per slice of a volume.
    vol = np.zeros((3, 32, 32), bool)
    vol[2, 5:9, 5:9] = True
    (r,) = find_regions(vol, margin=0)
    assert r.plane == (2,) and r.box == (5, 5, 9, 9)


def test_changed_mask_compares_foreground_or_classes():
    pred = np.array([[0, 1, 1], [0, 2, 0]])
    fixed = np.array([[0, 5, 7], [1, 2, 0]])  # instances renumbered, one pixel added
    assert changed_mask(pred, fixed, 2).tolist() == [[False, False, False],
                                                     [True, False, False]]
    assert changed_mask(pred, fixed, 8).sum() == 3
    with pytest.raises(InputShapeError):
        changed_mask(pred, fixed[:, :2], 2)
    # The task says how labels are read, never their values: objects for the instance task,
    mask, boundary = class_targets(fixed, 3, SegTask("instances"))
    assert mask.max() == 2 and boundary is not None
    # class indices otherwise (a value with no class is an error, not "instances").
    with pytest.raises(InputShapeError, match="only 3 classes"):
        class_targets(fixed, 3)
    mask, boundary = class_targets(fixed, 2)  # one foreground class: foreground, no boundary
    assert mask.max() == 1 and boundary is None


def test_samples_cover_only_the_corrected_regions(nuclei):
    img, gt = nuclei
    cfg = FinetuneConfig.from_mapping(dict(margin=4, context=16))
    samples = samples_from_corrections(img, gt, num_classes=3, in_channels=1,
                                       prediction=_edited(gt), config=cfg, name="nuc",
                                       task=SegTask("instances"))
    assert len(samples) == 3
    for s in samples:
        y0, x0, y1, x1 = s.crop
        assert s.image.shape == (1, y1 - y0, x1 - x0) and s.mask.shape == s.valid.shape
        assert s.boundary is not None  # the instance task gives boundary targets
        # The valid map is exactly the changed box grown by the margin ...
        ys, xs = np.nonzero(s.valid)
        box = (ys.min() + y0, xs.min() + x0, ys.max() + 1 + y0, xs.max() + 1 + x0)
        assert s.valid.sum() == (box[2] - box[0]) * (box[3] - box[1])
        # ... and the crop adds the context around it (clipped at the image edge).
        assert box[0] - y0 == min(16, box[0]) and x1 - box[3] == min(16, 256 - box[3])
        np.testing.assert_array_equal(s.mask, instance_target(gt[y0:y1, x0:x1]))
    first = min(samples, key=lambda s: s.crop)
    assert first.name == "nuc@Y16-54,X16-64"
    # Normalised as inference does: percentile 1-99.8 of the whole image maps to 0-1.
    lo, hi = np.percentile(img, [1, 99.8])
    np.testing.assert_allclose(first.image[0], (img[first.crop[0]:first.crop[2],
                                                    first.crop[1]:first.crop[3]] - lo) / (hi - lo),
                               rtol=1e-5, atol=1e-5)
    # Nothing changed: nothing to learn; no prediction: every labelled plane, whole.
    assert samples_from_corrections(img, gt, num_classes=2, in_channels=1,
                                    prediction=gt > 0) == []
    (whole,) = samples_from_corrections(img, gt, num_classes=2, in_channels=3)
    assert whole.image.shape == (3, 256, 256) and whole.valid.all()


def test_samples_for_a_super_resolution_network_are_at_the_output_grid():
    rng = np.random.default_rng(0)
    img = rng.random((32, 40)).astype(np.float32)
    labels = np.zeros((64, 80), np.uint8)
    labels[10:30, 10:30] = 1
    (s,) = samples_from_corrections(img, labels, num_classes=2, in_channels=1, output_scale=2,
                                    prediction=np.zeros_like(labels),
                                    config=FinetuneConfig(margin=2, context=4))
    y0, x0, y1, x1 = s.crop
    assert y0 % 2 == 0 and x1 % 2 == 0 and s.image.shape[1:] == s.mask.shape
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(s.image)[None], 2)[0, 0].numpy()
    stats_img = (img - np.percentile(img, 1)) / (np.percentile(img, 99.8) - np.percentile(img, 1))
    np.testing.assert_allclose(pooled, stats_img[y0 // 2:y1 // 2, x0 // 2:x1 // 2], atol=1e-5)
    with pytest.raises(InputShapeError, match="upsamples"):
        samples_from_corrections(img, labels[:32, :40], num_classes=2, in_channels=1,
                                 output_scale=2)


# --- the split ---------------------------------------------------------------------------


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_split_never_puts_an_area_on_both_sides():
    rng = np.random.default_rng(1)
    vol = np.zeros((6, 128, 128), np.uint8)
    truth = vol.copy()
    for _ in range(14):  # scattered corrections, some overlapping across slices
        z, y, x = rng.integers(0, 6), rng.integers(0, 110), rng.integers(0, 110)
        truth[z, y:y + 12, x:x + 12] = 1
    image = rng.random(vol.shape).astype(np.float32)
    cfg = FinetuneConfig(margin=4, context=8, slice_gap=1)
    samples = samples_from_corrections(image, truth, num_classes=2, in_channels=1,
                                       prediction=vol, axes="ZYX", config=cfg)
    assert len({s.group for s in samples}) > 2
    for seed in range(5):
        train, val = split_samples(samples, 0.3, seed)
        assert train and val
        for a in train:
            for b in val:
                near = abs(a.plane[0] - b.plane[0]) <= cfg.slice_gap
                assert not (near and _overlap(a.crop, b.crop)), (a.name, b.name)


def test_group_regions_links_overlapping_crops_and_neighbouring_slices_only():
    regions = [
        CorrectionRegion((0,), (10, 10, 20, 20)),
        CorrectionRegion((1,), (25, 25, 30, 30)),   # crop overlaps the first, next slice
        CorrectionRegion((5,), (10, 10, 20, 20)),   # same place, far slice
        CorrectionRegion((0,), (80, 80, 90, 90)),   # same slice, far away
    ]
    assert group_regions(regions, (100, 100), context=4, slice_gap=1, lead_axes="Z") == [
        0, 0, 1, 2]
    # Independent images (I axis) never link across indices.
    assert group_regions(regions[:2], (100, 100), context=4, lead_axes="I") == [0, 1]


# --- sampling and replay ---------------------------------------------------------------------


def test_region_sampler_keeps_corrections_in_view_and_mixes_replay(nuclei, tmp_path):
    img, gt = nuclei
    samples = samples_from_corrections(img, gt, num_classes=3, in_channels=1,
                                       prediction=_edited(gt), name="nuc",
                                       task=SegTask("instances"))
    store = ReplayStore(tmp_path / "replay")
    assert store.add(samples, root="abc") == 3 and store.add(samples, root="abc") == 0
    earlier = store.load("abc", in_channels=1, exclude=[samples[0].name])
    assert len(earlier) == 2 and all(e.valid is not None for e in earlier)
    assert store.load("abc", in_channels=3) == [] and store.load("other", 1) == []
    np.testing.assert_array_equal(earlier[0].mask, next(
        s for s in samples if s.name == earlier[0].name).mask)
    # Replayed patches are marked by a constant image.
    replay = [type(samples[0])(image=np.full((1, 80, 80), 7.0, np.float32),
                               mask=np.zeros((80, 80), np.int64), boundary=None, name="old",
                               group="old")]
    sampler = RegionSampler(samples, 64, replay, replay_fraction=0.5, seed=0)
    imgs, masks, bnds, valid = sampler.draw(200)
    assert imgs.shape == (200, 1, 64, 64) and bnds.shape == masks.shape == valid.shape[:1] + (
        64, 64)
    from_replay = (imgs == 7.0).all(axis=(1, 2, 3))
    assert 60 < from_replay.sum() < 140
    assert (valid[~from_replay].sum(axis=(1, 2)) > 0).all()  # every patch sees a correction
    assert valid[from_replay].all()  # a whole image counts everywhere


# --- the loop: stop keeps the best, early stop, freeze ------------------------------------


def _scripted_validation(monkeypatch, scores):
    """Validation returns ``scores`` in turn and snapshots the weights it scored."""
    seen = []

    def fake(model, samples, spec, device, precision):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return scores[len(seen) - 1]

    monkeypatch.setattr(train_mod, "validate", fake)
    return seen


def test_stop_keeps_the_best_weights_so_far(nuclei, monkeypatch, tmp_path):
    img, gt = nuclei
    model, info = _base_checkpoint(tmp_path)
    samples = samples_from_corrections(img, gt, num_classes=2, in_channels=1,
                                       prediction=_edited(gt))
    seen = _scripted_validation(monkeypatch, [0.50, 0.70, 0.60, 0.90])
    cancel = CancelToken()
    cfg = FinetuneConfig.from_mapping(dict(FAST, steps=20, val_every=2, lr=1e-2))
    events = []
    for event in finetune_iter(model, samples, cfg, cancel=cancel, output=tmp_path / "ft"):
        events.append(event)
        if isinstance(event, ValidationEvent) and event.step == 4:
            cancel.cancel()  # Stop pressed after the second validation of training
    result = events[-1].result
    assert isinstance(events[-1], FinishedEvent) and result.stopped == "cancelled"
    assert [e.dice for e in events if isinstance(e, ValidationEvent)] == [0.5, 0.7, 0.6]
    assert result.steps_done == 4 and result.best_step == 2
    assert result.baseline_dice == 0.5 and result.best_dice == 0.7
    for key, value in result.model.state_dict().items():
        torch.testing.assert_close(value, seen[1][key])  # the weights scored 0.70
    assert any(not torch.equal(seen[1][k], seen[0][k]) for k in seen[0])  # it did train
    reloaded, ckpt = load_checkpoint(result.checkpoint)
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, seen[1][key])
    assert ckpt.parent == info.sha256 and ckpt.metrics["val_dice"] == 0.7
    assert ckpt.metrics["val_dice_before"] == 0.5 and ckpt.extra["lineage_root"] == info.sha256
    assert ckpt.training_data["dataset"] == "dsb2018_nuclei"
    assert ckpt.settings["steps_done"] == 4 and ckpt.settings["stopped"] == "cancelled"
    # The input network is untouched.
    for key, value in load_checkpoint(tmp_path / "base")[0].state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_no_improvement_keeps_the_starting_weights_and_early_stops(nuclei, monkeypatch,
                                                                   tmp_path):
    img, gt = nuclei
    model, _ = _base_checkpoint(tmp_path)
    samples = samples_from_corrections(img, gt, num_classes=2, in_channels=1,
                                       prediction=_edited(gt))
    _scripted_validation(monkeypatch, [0.8, 0.7, 0.6, 0.5, 0.4])
    cfg = FinetuneConfig.from_mapping(dict(FAST, steps=50, val_every=1, patience=2, lr=1e-2))
    result = finetune(model, samples, cfg)
    assert result.stopped == "early_stop" and result.steps_done == 2
    assert not result.improved and result.best_dice == 0.8 and result.checkpoint is None
    for key, value in model.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[key], value)


def test_by_default_real_steps_train_only_the_decoder(nuclei, monkeypatch):
    img, gt = nuclei
    model = _tiny()
    samples = samples_from_corrections(img, gt, num_classes=2, in_channels=1,
                                       prediction=_edited(gt))
    # the step-2 validation beats the start, so the trained weights are the ones kept
    _scripted_validation(monkeypatch, [0.2, 0.6])
    cfg = FinetuneConfig.from_mapping(dict(FAST, steps=2, val_every=2, lr=1e-2))
    assert cfg.freeze_encoder  # the default (docs/finetune.md)
    events = list(finetune_iter(model, samples, cfg))
    data = next(e for e in events if isinstance(e, DataEvent))
    # three regions (fewer than six): all train and a strip of each is held out
    assert (data.regions, data.groups, data.train, data.val) == (3, 3, 3, 3)
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert len(steps) == 2 and all(np.isfinite(e.loss) for e in steps)
    vals = [e for e in events if isinstance(e, ValidationEvent)]
    assert [v.step for v in vals] == [0, 2]
    result = events[-1].result
    assert result.improved and result.best_step == 2
    new, old = result.model.state_dict(), model.state_dict()
    enc = {n for n, _ in model.named_parameters() if n.startswith(
        tuple(model.spec.encoder_prefixes))}
    assert enc and all(torch.equal(new[n], old[n]) for n in enc)
    assert any(not torch.equal(new[n], old[n]) for n in old if n not in enc
               and new[n].is_floating_point())


def _nan_outputs(model, always: bool = False):
    """Make ``model`` return NaN under bf16/fp16 autocast (or always): a forward hook, which
    the fine-tuning's copy of the model keeps."""
    def hook(_module, _inputs, out):
        if always or torch.is_autocast_enabled("cpu"):
            return {k: ([t * float("nan") for t in v] if isinstance(v, list)
                        else v * float("nan")) for k, v in out.items()}
        return None

    model.register_forward_hook(hook)
    return model


def test_a_step_with_nan_in_bf16_is_taken_again_in_fp32_and_the_weights_stay_finite(nuclei):
    # On one CI machine a bf16 kernel returned NaN: the step used to corrupt every weight and
    # the validation after it failed the whole fine-tuning.
    img, gt = nuclei
    model = _nan_outputs(_tiny())
    samples = samples_from_corrections(img, gt, num_classes=2, in_channels=1,
                                       prediction=_edited(gt))
    cfg = FinetuneConfig.from_mapping(dict(FAST, precision="bf16", steps=3, val_every=3,
                                           lr=1e-2))
    events = list(finetune_iter(model, samples, cfg))
    warnings = [e.message for e in events if isinstance(e, NoticeEvent) and e.level == "warning"]
    assert any("gave NaN or infinite values in bf16" in w and "in fp32 precision" in w
               for w in warnings), warnings
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert [e.step for e in steps] == [1, 2, 3] and all(np.isfinite(e.loss) for e in steps)
    vals = [e for e in events if isinstance(e, ValidationEvent)]
    assert [v.step for v in vals] == [0, 3] and all(np.isfinite(v.dice) for v in vals)
    result = events[-1].result
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values()
               if v.is_floating_point())
    assert result.precision == "fp32"  # what the checkpoint records


def test_nan_in_fp32_steps_in_a_row_stop_training_with_a_clear_error(nuclei, monkeypatch):
    img, gt = nuclei
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _nan_outputs(model, always=True)
    samples = samples_from_corrections(img, gt, num_classes=2, in_channels=1,
                                       prediction=_edited(gt))
    _scripted_validation(monkeypatch, [0.5])
    cfg = FinetuneConfig.from_mapping(dict(FAST, steps=5, lr=1e-2))
    with pytest.raises(MedsegError, match="NaN or infinite on 3 steps in a row") as err:
        finetune(model, samples, cfg)
    assert str(err.value).count(". ") == 0
    for key, value in model.state_dict().items():  # the user's model is untouched
        torch.testing.assert_close(value, before[key])

def test_fine_tuning_learns_a_correction(monkeypatch):
    """A tiny network learns that bright squares are foreground (Dice on held-out regions)."""
    rng = np.random.default_rng(0)
    image = rng.normal(0.2, 0.05, (192, 192)).astype(np.float32)
    truth = np.zeros((192, 192), np.uint8)
    for y, x in [(16, 16), (16, 140), (130, 16), (130, 140), (72, 78)]:
        image[y:y + 28, x:x + 28] += 0.7
        truth[y:y + 28, x:x + 28] = 1
    model = _tiny()
    cfg = FinetuneConfig.from_mapping(dict(FAST, steps=24, val_every=6, lr=1e-2, margin=6,
                                           context=8, patience=0, val_fraction=0.4,
                                           strips_below=0))  # whole regions held out
    samples = samples_from_corrections(image, truth, num_classes=2, in_channels=1,
                                       prediction=np.zeros_like(truth), config=cfg)
    assert len(samples) == 5 and len({s.group for s in samples}) == 5
    result = finetune(model, samples, cfg)
    assert result.n_val == 2
    assert result.best_dice > max(0.6, result.baseline_dice + 0.3), result.history


# --- prediction as the comparison ------------------------------------------------------------


def test_the_model_prediction_is_the_comparison(nuclei):
    img, _ = nuclei
    model = _tiny()
    from napari_medseg.engine.inference.pipeline import predict

    pred = np.asarray(predict(img, model, {"device": "cpu", "precision": "fp32"})["mask"])
    corrected = pred.copy()
    corrected[100:120, 100:130] = 1 - corrected[100:120, 100:130]
    cfg = FinetuneConfig(device="cpu", precision="fp32", margin=5)
    gen = prepare_corrections_iter(img, corrected, model, cfg, axes="YX", name="nuc")
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            samples = stop.value
            break
    assert len(samples) == 1 and samples[0].name == "nuc@Y95-125,X95-135"


# --- lineage, revert, autosave ----------------------------------------------------------------


def test_lineage_list_revert_and_atomic_writes(nuclei, tmp_path, monkeypatch):
    img, gt = nuclei
    base, info = _base_checkpoint(tmp_path)
    samples = samples_from_corrections(img, gt, num_classes=2, in_channels=1,
                                       prediction=_edited(gt))
    cfg = FinetuneConfig.from_mapping(dict(FAST, steps=1, val_every=1))
    first = finetune(base, samples, cfg, output=unique_checkpoint_path("nuc"))
    second = finetune(first.model, samples[:2], cfg, output=unique_checkpoint_path("nuc"))
    entries = list_lineage()
    assert [e.path for e in entries] == [first.checkpoint.with_suffix(".json"),
                                        second.checkpoint.with_suffix(".json")]
    one, two = entries
    assert two.parent == one.sha256 and one.parent == info.sha256
    assert one.root == two.root == info.sha256
    chain = ancestors(two, entries)
    assert chain[0] == one and chain[1] == f"weights {info.sha256[:12]}"
    assert "Dice" in two.describe() and "1 steps" in two.describe()
    set_active(two.root, two.source, reason="fine-tuned")
    assert active_source(two.root) == two.source
    assert revert(two, entries) == one.source and active_source(one.root) == one.source
    with pytest.raises(CheckpointError, match="neither"):
        revert(one, entries)
    assert revert(one, entries, root_source=str(tmp_path / "base.json")) == str(
        tmp_path / "base.json")
    assert not list((tmp_path / "home" / "checkpoints").glob(".partial-*"))
    # A crash while writing leaves no checkpoint behind (and no partial files).
    from napari_medseg.engine.training import lineage

    def broken(model, path, **kwargs):
        save_checkpoint(model, path, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(lineage, "save_checkpoint", broken)
    target = unique_checkpoint_path("crash")
    with pytest.raises(OSError):
        save_checkpoint_atomic(base, target)
    assert not target.exists() and not target.with_suffix(".json").exists()
    assert len(list_lineage()) == 2
    assert not list(target.parent.glob(".partial-*"))


def test_autosave_keeps_two_versions(tmp_path):
    from napari_medseg.io import read_image

    labels = np.zeros((5, 20, 30), np.uint16)
    labels[2, 3:9, 4:12] = 7
    path = autosave_labels(labels, "cells mask")
    assert path.name == "cells_mask.tif"
    data, _ = read_image(path)
    np.testing.assert_array_equal(np.asarray(data), labels)
    labels[0, 0, 0] = 3
    autosave_labels(labels, "cells mask")
    prev, _ = read_image(path.with_name("cells_mask.prev.tif"))
    assert np.asarray(prev)[0, 0, 0] == 0 and np.asarray(read_image(path)[0])[0, 0, 0] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["cells_mask.prev.tif",
                                                             "cells_mask.tif"]


# --- the workflow: autosave, replay store, active checkpoint -------------------------------


def _corrections(nuclei, name: str = "nuc") -> Corrections:
    img, gt = nuclei
    return Corrections(image=img, axes="YX", labels=gt.copy(), image_name=name,
                       labels_name=f"{name} mask", boundary=(gt > 0).astype(np.uint8),
                       prediction=_edited(gt))


def test_workflow_autosaves_first_and_keeps_it_when_loading_fails(nuclei, home):
    events = []

    def broken_loader():
        assert (home / "autosave" / "nuc_mask.tif").is_file()  # saved before loading
        raise RuntimeError("no weights")

    cfg = FinetuneConfig.from_mapping(dict(FAST, steps=1))
    with pytest.raises(RuntimeError, match="no weights"):
        for event in finetune_corrections_iter(broken_loader, _corrections(nuclei), cfg):
            events.append(event)
    assert [e.stage for e in events if isinstance(e, StageEvent)] == ["autosave", "loading"]
    notice = next(e for e in events if isinstance(e, NoticeEvent))
    assert str(home / "autosave" / "nuc_mask.tif") in notice.message
    from napari_medseg.io import read_image

    saved, _ = read_image(home / "autosave" / "nuc_mask.tif")
    np.testing.assert_array_equal(np.asarray(saved), nuclei[1])
    assert (home / "autosave" / "nuc_mask_boundary.tif").is_file()
    assert not list_lineage()


def test_workflow_replays_earlier_samples_of_the_same_line(nuclei, tmp_path):
    model, info = _base_checkpoint(tmp_path)
    store = ReplayStore(tmp_path / "replay")
    cfg = FinetuneConfig.from_mapping(dict(FAST, steps=1, val_every=1, replay=0.5))
    first = drain(finetune_corrections_iter(lambda: model, _corrections(nuclei, "one"), cfg,
                                        replay_store=store))
    assert first.n_replay == 0 and first.checkpoint.parent == checkpoints_dir()
    assert first.checkpoint.name.startswith("unet_sharp-one-")
    assert first.info.training_data["autosave"].endswith("one_mask.tif")
    # the regions themselves are kept (their held-out strips are cut again next round)
    assert len(store.load(info.sha256, 1)) == first.n_train == 3
    # The next round on another image of the same line replays the first round's samples ...
    second = drain(finetune_corrections_iter(
        lambda: model, _corrections(nuclei, "two"), cfg, replay_store=store,
        output=tmp_path / "second"))
    assert second.n_replay == 3 and second.checkpoint == tmp_path / "second.safetensors"
    # ... but never a round's own samples, and not without replay; the user is told.
    samples = store.load(info.sha256, 1)
    events = list(finetune_samples_iter(model, samples[:3], cfg, replay_store=store))
    third = events[-1].result
    assert third.n_replay == 3 and third.checkpoint is None
    assert any("Mixing in 3 sample(s)" in getattr(e, "message", "") for e in events)
    off = cfg.replace(replay=0.0)
    fourth = drain(finetune_samples_iter(model, samples[:3], off, replay_store=store))
    assert fourth.n_replay == 0


def test_workflow_activates_an_improved_checkpoint_only(nuclei, monkeypatch, tmp_path):
    model, info = _base_checkpoint(tmp_path)
    store = ReplayStore(tmp_path / "replay")
    cfg = FinetuneConfig.from_mapping(dict(FAST, steps=1, val_every=1, replay=0.0))
    _scripted_validation(monkeypatch, [0.8, 0.6])
    worse = drain(finetune_corrections_iter(lambda: model, _corrections(nuclei), cfg,
                                            replay_store=store, base_source="base"))
    assert not worse.improved and worse.checkpoint.is_file()
    assert active_source(info.sha256) is None
    assert worse.info.training_data["parent_source"] == "base"
    _scripted_validation(monkeypatch, [0.5, 0.7])
    better = drain(finetune_corrections_iter(lambda: model, _corrections(nuclei), cfg,
                                             replay_store=store))
    assert better.improved
    assert active_source(info.sha256) == str(better.checkpoint.with_suffix(".json"))


def test_workflow_stopped_before_training_changes_nothing(nuclei, tmp_path, home):
    model, info = _base_checkpoint(tmp_path)
    store = ReplayStore(tmp_path / "replay")
    cancel = CancelToken()
    cancel.cancel()
    cfg = FinetuneConfig.from_mapping(dict(FAST, steps=1))
    gen = finetune_corrections_iter(lambda: model, _corrections(nuclei), cfg, cancel=cancel,
                                    replay_store=store)
    with pytest.raises(MedsegError, match="Stopped before training started"):
        drain(gen)
    assert (home / "autosave" / "nuc_mask.tif").is_file()  # the labels are still saved
    assert not list(checkpoints_dir().iterdir()) and not list_lineage()
    assert store.load(info.sha256, 1) == [] and active_source(info.sha256) is None


# --- CLI ------------------------------------------------------------------------------------


def test_cli_finetune_round_trip(nuclei, tmp_path, capsys):
    from napari_medseg.cli import main

    img, gt = nuclei
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i, (y, x) in enumerate([(0, 0), (0, 128), (128, 0), (128, 128)]):
        tifffile.imwrite(images / f"n{i}.tif", img[y:y + 128, x:x + 128])
        tifffile.imwrite(masks / f"n{i}_mask.tif", gt[y:y + 128, x:x + 128])
    (images / "notes.txt").write_text("not an image")
    _, info = _base_checkpoint(tmp_path)
    out = tmp_path / "out" / "tuned.safetensors"
    rc = main(["finetune", "--weights", str(tmp_path / "base.safetensors"), "--images",
               str(images), "--masks", str(masks), "-o", str(out), "--steps", "2",
               "--batch-size", "2", "--patch", "64", "--device", "cpu", "--precision", "fp32",
               "--json", "-q"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["checkpoint"] == str(out) and summary["steps_done"] == 2
    described = read_checkpoint_info(out)
    # the encoder is frozen by default (docs/finetune.md)
    assert described.parent == info.sha256 and described.settings["freeze_encoder"] is True
    assert described.training_data["images"] == str(images)
    # four images (fewer than six): all train, a strip of each is held out
    assert len(described.training_data["train_regions"]) == 4
    assert [r.endswith("(held-out strip)") for r in described.training_data["val_regions"]] \
        == [True] * 4
    # Usable as --weights everywhere.
    rc = main(["predict", str(images / "n0.tif"), "--weights", str(out), "-o",
               str(tmp_path / "pred.tif"), "--device", "cpu", "-q"])
    assert rc == 0 and (tmp_path / "pred.tif").is_file()
    # Errors are one sentence.
    rc = main(["finetune", "--weights", str(tmp_path / "missing.safetensors"), "--images",
               str(images), "--masks", str(masks), "-o", str(out)])
    assert rc == 2 and "error:" in capsys.readouterr().err


def test_mask_corrections_of_an_instance_model_keep_its_lines_between_objects(nuclei):
    """A corrected foreground mask cannot say where touching nuclei part: the network's own
    predicted boundary stands in for a corrected boundary layer."""
    from napari_medseg.engine.inference.pipeline import predict
    from napari_medseg.engine.seg_task import with_task
    from napari_medseg.models import create_model

    img, _ = nuclei
    torch.manual_seed(0)
    model = with_task(create_model("unet_sharp", "tiny", 1, 3), SegTask("instances")).eval()
    out = predict(img, model, {"device": "cpu", "precision": "fp32",
                               "outputs": "mask,boundary"})
    pred, lines = np.asarray(out["mask"]), np.asarray(out["boundary"])
    corrected = pred.copy()
    corrected[100:120, 100:130] = 1 - corrected[100:120, 100:130]
    cfg = FinetuneConfig(device="cpu", precision="fp32", margin=5, context=0)
    gen = prepare_corrections_iter(img, corrected, model, cfg, axes="YX", name="nuc")
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            (sample,) = stop.value
            break
    y0, x0, y1, x1 = sample.crop
    crop_lines = (lines[y0:y1, x0:x1] > 0) & (corrected[y0:y1, x0:x1] > 0)
    assert (sample.mask[crop_lines] == 2).all()
    assert set(np.unique(sample.mask)) <= {0, 1, 2}


def test_cli_finetune_of_an_instance_model_reads_instance_masks_as_objects(tmp_path, monkeypatch,
                                                                          capsys):
    """Instance masks (values up to the number of nuclei) are objects for an instance-task
    network, not class indices it does not have."""
    from napari_medseg.cli import main
    from napari_medseg.engine.checkpoints import load_checkpoint, save_checkpoint
    from napari_medseg.engine.seg_task import task_of, with_task
    from napari_medseg.models import create_model

    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    img = tifffile.imread(samples_dir() / "nuclei.tif")
    ref = tifffile.imread(samples_dir() / "nuclei_mask.tif")
    assert ref.max() > 3
    (tmp_path / "i").mkdir(), (tmp_path / "m").mkdir()
    for name, flip in (("a", slice(None)), ("b", slice(None, None, -1))):
        tifffile.imwrite(tmp_path / "i" / f"{name}.tif", img[flip])
        tifffile.imwrite(tmp_path / "m" / f"{name}.tif", ref[flip])
    torch.manual_seed(0)
    save_checkpoint(with_task(create_model("unet_sharp", "tiny", 1, 3), SegTask("instances")),
                    tmp_path / "base", dtype="float32")
    rc = main(["finetune", "--weights", str(tmp_path / "base.safetensors"), "--images",
               str(tmp_path / "i"), "--masks", str(tmp_path / "m"), "-o",
               str(tmp_path / "ft.safetensors"), "--steps", "2", "--device", "cpu", "-q"])
    assert rc == 0, capsys.readouterr().err
    assert task_of(load_checkpoint(tmp_path / "ft.safetensors")[0]).instances


def test_a_killed_finetune_keeps_its_best_weights_and_resumes(nuclei, tmp_path):
    """The best weights so far and the loop state are written at intervals; a run stopped
    mid-way (the generator abandoned, as a kill leaves it) is continued with resume."""
    from napari_medseg.engine.progress import NoticeEvent
    from napari_medseg.engine.training.loop import StepEvent

    img, gt = nuclei
    samples = []
    for name, flip in (("a", slice(None)), ("b", slice(None, None, -1))):
        (s,) = samples_from_corrections(img[flip], gt[flip], num_classes=2, in_channels=1,
                                        name=name)
        s.group = name
        samples.append(s)
    model = _tiny()
    cfg = FinetuneConfig(device="cpu", precision="fp32", steps=6, val_every=1, patience=0,
                         val_fraction=0.5, save_every_s=0.0, batch_size=2, patch=64)
    out = tmp_path / "ft.safetensors"
    run = finetune_iter(model, samples, cfg, output=out)
    for event in run:
        if isinstance(event, StepEvent) and event.step == 3:
            break
    run.close()  # killed after step 3: no final write
    assert out.is_file() and out.with_suffix(".json").is_file()
    state = tmp_path / "ft.train-state.json"
    assert state.is_file() and json.loads(state.read_text())["step"] >= 2
    events = list(finetune_iter(model, samples, cfg.replace(resume=True), output=out))
    assert any(isinstance(e, NoticeEvent) and "Resuming at step" in e.message for e in events)
    steps = [e.step for e in events if isinstance(e, StepEvent)]
    assert steps and steps[0] > 1 and steps[-1] == 6
    assert not state.exists()  # a finished run leaves no resume state


def test_cli_encoder_choice_defaults_to_frozen_and_can_train_every_layer():
    from napari_medseg.cli import build_parser
    from napari_medseg.cli.finetune import _finetune_config

    parser, _ = build_parser()
    base = ["finetune", "--weights", "w", "--images", "i", "--masks", "m", "-o", "o"]
    assert _finetune_config(parser.parse_args(base)).freeze_encoder is True
    assert _finetune_config(parser.parse_args(base + ["--freeze-encoder"])).freeze_encoder
    assert not _finetune_config(parser.parse_args(base + ["--no-freeze-encoder"])).freeze_encoder
