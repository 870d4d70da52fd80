"""Training augmentations: geometry moves image and mask together; photometric changes
(what another camera does) touch the image only and are off unless asked."""

from __future__ import annotations

import pytest
import torch

from napari_medseg.config import AugmentConfig
from napari_medseg.engine.training.augment import augment_batch
from napari_medseg.errors import ConfigError

OFF = dict(flips=False, rot90=False, scale=(1.0, 1.0), intensity=False, noise_std=0.0)


def _batch(n: int = 6, c: int = 3, side: int = 64):
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(n, side, side, dtype=torch.long)
    mask[:, 10:30, 20:50] = 1
    image = 0.3 + 0.4 * mask[:, None].float().repeat(1, c, 1, 1)
    image = image + 0.01 * torch.rand(image.shape, generator=g)
    return image, mask


def _run(image, mask, **kw):
    return augment_batch(image, {"mask": mask}, AugmentConfig(**{**OFF, **kw}),
                         torch.Generator().manual_seed(0))


def test_geometry_moves_the_image_and_the_mask_together():
    image, mask = _batch()
    out, targets = _run(image, mask, flips=True, rot90=True, scale=(0.7, 1.4), elastic=4.0)
    bright = out[:, 0] > 0.5
    agree = (bright == (targets["mask"] > 0)).float().mean()
    assert agree > 0.97 and not torch.equal(targets["mask"], mask)


def test_photometric_changes_touch_the_image_only_and_are_off_by_default():
    image, mask = _batch()
    same, targets = _run(image, mask)
    assert torch.equal(same, image) and torch.equal(targets["mask"], mask)
    before = image.clone()
    out, targets = _run(image, mask, colour=0.3, gamma=0.5, blur=2.0, illumination=0.4)
    assert torch.equal(image, before), "the caller's batch must not change"
    assert torch.equal(targets["mask"], mask) and not torch.allclose(out, image)


def test_white_balance_changes_the_channels_apart():
    image, mask = _batch()
    out, _ = _run(image, mask, colour=0.3)
    ratio = out.mean(dim=(2, 3)) / image.mean(dim=(2, 3))  # N x C gains
    assert (ratio.max(dim=1).values - ratio.min(dim=1).values).max() > 0.05
    grey, _ = _batch(c=1)
    assert torch.equal(_run(grey, mask, colour=0.3)[0], grey)  # one channel: no colour


def test_saturation_scales_colour_about_the_grey_and_keeps_the_grey():
    image, mask = _batch(n=8)
    image = image.clone()
    image[:, 1] *= 0.5  # a coloured patch: channels differ
    out, _ = _run(image, mask, saturation=0.5)
    grey_in, grey_out = image.mean(dim=1), out.mean(dim=1)
    assert torch.allclose(grey_in, grey_out, atol=1e-5)  # brightness kept
    spread = lambda t: (t - t.mean(dim=1, keepdim=True)).abs().mean(dim=(1, 2, 3))  # noqa: E731
    factors = spread(out) / spread(image)
    assert factors.min() >= 0.5 - 1e-4 and factors.max() <= 1.5 + 1e-4
    assert factors.max() - factors.min() > 0.1  # drawn per patch
    grey, _ = _batch(c=1)
    assert torch.equal(_run(grey, mask, saturation=0.5)[0], grey)  # one channel: nothing


def test_blur_softens_edges_and_uneven_light_tilts_the_background():
    image, mask = _batch(n=8)
    out, _ = _run(image, mask, blur=3.0)
    edge = lambda t: (t[..., 1:] - t[..., :-1]).abs().amax(dim=(1, 2, 3))  # noqa: E731
    assert (edge(out) < 0.8 * edge(image)).sum() >= 2  # about half the patches are blurred
    lit, _ = _run(image, mask, illumination=0.4)
    background = lit[:, 0, 40:, :]
    spread = background.amax(dim=(1, 2)) - background.amin(dim=(1, 2))
    assert spread.min() > 0.03  # a light gradient across every patch


def test_out_of_range_strengths_are_refused():
    with pytest.raises(ConfigError, match="colour augmentation"):
        AugmentConfig(colour=1.5)
    with pytest.raises(ConfigError, match="saturation augmentation"):
        AugmentConfig(saturation=1.0)
    with pytest.raises(ConfigError, match="blur augmentation"):
        AugmentConfig(blur=-1)


def test_a_nested_augment_mapping_refines_fine_tunings_own_defaults():
    from napari_medseg.config import FinetuneConfig

    default = FinetuneConfig().augment
    refined = FinetuneConfig.from_mapping({"augment": {"colour": 0.1}}).augment
    assert refined.colour == 0.1 and refined.scale == default.scale == (1.0, 1.0)
    assert refined.noise_std == default.noise_std
    with pytest.raises(ConfigError, match="Unknown setting 'bogus'"):
        FinetuneConfig.from_mapping({"augment": {"bogus": 1}})


def test_a_blur_wider_than_the_patch_still_runs():
    image, mask = _batch(n=4, c=1, side=16)
    out, _ = _run(image, mask, blur=50.0)
    assert out.shape == image.shape and torch.isfinite(out).all()
