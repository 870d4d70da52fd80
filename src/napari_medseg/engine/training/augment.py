"""Batched, geometry-consistent augmentation of training patches (torch, on the training device).

Image and targets get the same geometric transform: flips, rot90 (square patches), a random
scale (zoom about the centre), and an optional smooth elastic deformation. Photometric
changes touch the image only: what another camera or microscope does to the same scene
(per-channel white balance, saturation, gamma, blur, an uneven light), then gain, offset and noise.
Masks are resampled with nearest neighbour.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...config import AugmentConfig

__all__ = ["AugmentConfig", "augment_batch"]


def _grid(size: tuple[int, int], scales: Tensor, coarse: Tensor | None, elastic: float) -> Tensor:
    """Sampling grid N x H x W x 2 for a zoom by ``scales`` plus an optional elastic field."""
    h, w = size
    n = scales.shape[0]
    theta = torch.zeros(n, 2, 3, device=scales.device)
    theta[:, 0, 0] = 1.0 / scales
    theta[:, 1, 1] = 1.0 / scales
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    if coarse is not None:
        field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
        norm = torch.tensor([w, h], device=scales.device, dtype=field.dtype)
        grid = grid + field.permute(0, 2, 3, 1) * (2.0 * elastic / norm)
    return grid


def _uniform(shape: tuple[int, ...], lo: float, hi: float, generator: torch.Generator,
             device) -> Tensor:
    return torch.empty(shape).uniform_(lo, hi, generator=generator).to(device)


def _photometric(image: Tensor, config: AugmentConfig, generator: torch.Generator) -> Tensor:
    """White balance, saturation, gamma, blur and uneven light, each off at 0 (image only)."""
    n, c = image.shape[:2]
    dev = image.device
    if config.colour > 0 and c > 1:
        image = image * _uniform((n, c, 1, 1), 1 - config.colour, 1 + config.colour,
                                 generator, dev)
    if config.saturation > 0 and c > 1:
        grey = image.mean(dim=1, keepdim=True)
        image = grey + _uniform((n, 1, 1, 1), 1 - config.saturation, 1 + config.saturation,
                                generator, dev) * (image - grey)
    if config.gamma > 0:
        g = torch.exp(_uniform((n, 1, 1, 1), -math.log1p(config.gamma),
                               math.log1p(config.gamma), generator, dev))
        image = torch.where(image > 0, image.clamp(min=0) ** g, image)
    if config.blur > 0:
        sigmas = _uniform((n,), 0.0, config.blur, generator, "cpu")
        blurred = torch.rand(n, generator=generator) < 0.5
        image = image.clone()  # the caller's batch stays as it was
        for i in blurred.nonzero().flatten().tolist():
            image[i] = _gaussian(image[i:i + 1], float(sigmas[i]))[0]
    if config.illumination > 0:
        h, w = image.shape[-2:]
        angle = _uniform((n, 1, 1, 1), 0.0, 2 * math.pi, generator, dev)
        ys = torch.linspace(-1, 1, h, device=dev).view(1, 1, h, 1)
        xs = torch.linspace(-1, 1, w, device=dev).view(1, 1, 1, w)
        ramp = (torch.cos(angle) * xs + torch.sin(angle) * ys) / math.sqrt(2)
        image = image * (1 + config.illumination * ramp)
    return image


def _gaussian(image: Tensor, sigma: float) -> Tensor:
    """A separable Gaussian blur of a 1 x C x H x W tensor (reflect padding)."""
    if sigma < 0.3:
        return image
    # reflect padding needs a radius below the patch side
    radius = max(1, min(int(math.ceil(2.5 * sigma)), min(image.shape[-2:]) - 1))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=image.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(image.dtype)
    c = image.shape[1]
    out = F.pad(image, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def augment_batch(
    image: Tensor,
    targets: dict[str, Tensor],
    config: AugmentConfig,
    generator: torch.Generator,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Augment a batch in place of a copy.

    Args:
        image: N x C x H x W float.
        targets: maps of shape N x H' x W' (H' = s * H for super-resolution targets) or
            N x C x H' x W' (``"image_hr"``); integer maps are resampled with nearest neighbour.
        config: what to apply.
        generator: the CPU random generator (seeded by the caller).

    Returns:
        the augmented image and targets (new tensors).
    """
    n = image.shape[0]
    out_t = dict(targets)

    def geo(fn):
        nonlocal image
        image = fn(image)
        for key, value in out_t.items():
            out_t[key] = fn(value[:, None])[:, 0] if value.dim() == 3 else fn(value)

    if config.flips:
        for dim in (-1, -2):
            flip = torch.rand(n, generator=generator) < 0.5
            if flip.any():
                idx = flip.nonzero().flatten().to(image.device)

                def do_flip(t, idx=idx, dim=dim):
                    t = t.clone()
                    t[idx] = t[idx].flip(dim)
                    return t

                geo(do_flip)
    if config.rot90 and image.shape[-1] == image.shape[-2]:
        k = int(torch.randint(0, 4, (1,), generator=generator))
        if k:
            geo(lambda t: torch.rot90(t, k, dims=(-2, -1)))
    lo, hi = config.scale
    if hi > lo or config.elastic > 0:
        log_s = torch.empty(n).uniform_(math.log(lo), math.log(hi), generator=generator)
        scales = torch.exp(log_s).to(image.device)
        coarse = None
        if config.elastic > 0:
            coarse = torch.randn(n, 2, 5, 5, generator=generator).to(image.device)

        def warp(t: Tensor, mode: str) -> Tensor:
            grid = _grid(tuple(t.shape[-2:]), scales, coarse, config.elastic)
            return F.grid_sample(t, grid, mode=mode, padding_mode="reflection",
                                 align_corners=False)

        image = warp(image.float(), "bilinear")
        for key, value in out_t.items():
            if value.dim() == 3:
                out_t[key] = warp(value[:, None].float(), "nearest")[:, 0].to(value.dtype)
            else:
                out_t[key] = warp(value.float(), "bilinear")
    image = _photometric(image, config, generator)
    if config.intensity:
        gain = torch.empty(n, 1, 1, 1).uniform_(0.8, 1.2, generator=generator).to(image.device)
        offset = torch.empty(n, 1, 1, 1).uniform_(-0.1, 0.1, generator=generator).to(image.device)
        image = image * gain + offset
        if "image_hr" in out_t:
            out_t["image_hr"] = out_t["image_hr"] * gain + offset
    if config.noise_std > 0:
        noise = torch.randn(image.shape, generator=generator).to(image.device)
        image = image + config.noise_std * noise
    return image, out_t
