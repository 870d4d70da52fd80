"""The training loop: learning-rate schedule, time budget, frozen batch-norm statistics."""

from __future__ import annotations

import pytest
import torch

from napari_medseg.config import FinetuneConfig, TrainConfig
from napari_medseg.engine.training.loop import StepEvent, ValidationEvent, _lr_at, train_mode
from napari_medseg.engine.training.train import train_iter
from napari_medseg.models import create_model


def _config(**kw) -> TrainConfig:
    base = {"network": "sa2net", "variant": "tiny", "in_channels": 3, "num_classes": 2,
            "steps": 100, "lr": 1e-3, "min_lr": 1e-5, "warmup_steps": 10}
    base.update(kw)
    return TrainConfig.from_mapping(base)


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = _config()
    assert _lr_at(0, cfg) == pytest.approx(1e-4)
    assert _lr_at(9, cfg) == pytest.approx(1e-3)
    lrs = [_lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert _lr_at(100, cfg) == pytest.approx(1e-5)


def test_schedule_follows_the_time_budget_when_it_runs_out_first():
    cfg = _config(max_minutes=1.0)
    # Step 20 of 100 alone would still be near the peak ...
    assert _lr_at(20, cfg) > 9e-4
    # ... but with the whole time budget used the rate has decayed to its minimum,
    assert _lr_at(20, cfg, time_fraction=1.0) == pytest.approx(1e-5)
    # and half the budget gives the middle of the cosine.
    assert _lr_at(20, cfg, time_fraction=0.5) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-6)
    # Warm-up is not cut short by the clock.
    assert _lr_at(2, cfg, time_fraction=0.9) == pytest.approx(3e-4)


def test_train_mode_can_keep_batch_norm_statistics():
    model = create_model("sa2net", variant="tiny", in_channels=1, num_classes=2)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    before = [m.running_mean.clone() for m in bns]
    train_mode(model, freeze_norm_stats=True)
    assert model.training and not any(m.training for m in bns)
    model(torch.randn(2, 1, 64, 64) * 5 + 3)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))
    train_mode(model, freeze_norm_stats=False)
    model(torch.randn(2, 1, 64, 64) * 5 + 3)
    assert any(not torch.equal(a, m.running_mean) for a, m in zip(before, bns))


def test_finetune_keeps_norm_statistics_by_default():
    assert FinetuneConfig().freeze_norm_stats is True
    assert not getattr(TrainConfig(), "freeze_norm_stats", False)


def test_time_limit_validates_the_last_step_then_stops(tmp_path, nuclei_folders):
    images, masks = nuclei_folders
    # A budget of ~0 s: the first step already exceeds it. Without the time rule the
    # run would take 1000 steps and validate at step 500 first.
    cfg = _config(in_channels=3, steps=1000, val_every=500, patch=64, batch_size=2,
                  val_fraction=0.5, max_minutes=1e-6, warmup_steps=1)
    gen = train_iter(images, masks, tmp_path / "ck.safetensors", cfg)
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        result = stop.value
    steps = [e for e in events if isinstance(e, StepEvent)]
    vals = [e for e in events if isinstance(e, ValidationEvent)]
    assert len(steps) == 1
    assert len(vals) == 1 and vals[0].step == 1
    assert result.stopped == "time_limit"
    assert (tmp_path / "ck.safetensors").is_file()


def test_budget_counts_the_setup_and_ends_before_a_step_and_validation_would_overrun(
        monkeypatch):
    from napari_medseg.engine.training import loop

    now = [100.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    clock = loop._Budget(minutes=1.0, before=0.0, spent=30.0)  # 30 s of split and scoring
    assert clock.fraction() == pytest.approx(0.5) and not clock.up()
    now[0] += 10.0
    clock.stepped(10.0)
    assert not clock.up()  # 40 s used, a step (10 s) more fits
    clock.val_s = 15.0
    assert clock.up()  # 40 + 10 + 15 > 60: validate this step and stop
    assert loop._Budget(minutes=0.0, before=0.0, spent=1e9).up() is False  # no limit
    assert loop._Budget(minutes=1.0, before=61.0, spent=0.0).spent_before()


def test_oversampling_draws_the_named_acquisition_type_as_often_as_asked(nuclei_folders):
    """The bundled fluorescence and H&E samples: H&E drawn 3x as often gives it 3 patches
    in 4 (every other type keeps weight 1); no weights gives 1 in 2."""
    import numpy as np

    from napari_medseg.engine.training.datasets import (PatchSampler, find_pairs, load_samples,
                                                        oversampling_weights)

    images, masks = nuclei_folders
    samples = load_samples(find_pairs(images, masks), 3, lambda x: x.astype(np.float32) / 255)
    weights, counts = oversampling_weights(samples, {"H&E": 3})
    assert counts == {"fluorescence": 1, "H&E": 1}
    colour = [bool(np.ptp(s.image, axis=0).max() > 0) for s in samples]
    assert list(weights) == [3.0 if c else 1.0 for c in colour]

    def he_share(sampler: PatchSampler) -> float:
        patches = sampler.draw(600)[0]
        return float(np.mean([np.ptp(p, axis=0).max() > 0 for p in patches]))

    assert abs(he_share(PatchSampler(samples, 32, seed=1, weights=weights)) - 0.75) < 0.06
    assert abs(he_share(PatchSampler(samples, 32, seed=1)) - 0.5) < 0.06


def test_oversampling_a_type_that_does_not_exist_or_by_zero_is_refused():
    """Refused with the settings, before any image is read."""
    from napari_medseg.errors import ConfigError

    with pytest.raises(ConfigError, match="'HE', which is not an acquisition type"):
        _config(oversample={"HE": 3})
    with pytest.raises(ConfigError, match="positive factor"):
        _config(oversample={"H&E": 0})


def test_training_planes_are_typed_from_the_pixels_as_stored(tmp_path):
    """The type evaluation reports: a dim grey 8-bit image whose percentile-stretched copy
    looks light (its median is its 99th percentile) stays fluorescence (the bug: one DSB2018
    fluorescence image was counted as bright-field)."""
    import numpy as np
    import tifffile

    from napari_medseg.engine.acquisition import acquisition_type
    from napari_medseg.engine.training.datasets import find_pairs, load_samples

    image = np.full((64, 64), 60, np.uint8)  # a dim field (mean < 100: fluorescence) ...
    image[:26] = 10  # ... darker at the top ...
    image[:4, :4] = 250  # ... with one small bright nucleus (0.4 % of the pixels)
    (tmp_path / "i").mkdir(), (tmp_path / "m").mkdir()
    tifffile.imwrite(tmp_path / "i" / "a.tif", image)
    tifffile.imwrite(tmp_path / "m" / "a.tif", (image == 250).astype(np.uint8))

    def stretch(x):
        lo, hi = np.percentile(x, (1, 99.8))
        return ((x - lo) / (hi - lo)).astype(np.float32)

    (s,) = load_samples(find_pairs(tmp_path / "i", tmp_path / "m"), 1, stretch)
    assert acquisition_type(image, "YX") == "fluorescence"
    assert acquisition_type(s.image, "CYX") == "bright-field"  # what typing it there gave
    assert s.acquisition == "fluorescence"
