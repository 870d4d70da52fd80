"""Run a network at a coarser working resolution than the image it is given.

Dermoscopy lesions span 300-700 pixels of a 768 x 560 photograph: far more than the
receptive field of a U-Net-sized network, whose patch then sees only lesion texture. The
remedy every dermoscopy pipeline uses (and nnU-Net's target spacing generalises) is to work
on a downsampled image. :class:`WorkingResolution` wraps a network so that it takes and
returns full-resolution tensors: the input is average-pooled by an integer ``factor``, the
network runs, and every spatial output (logits, boundary, deep supervision) is upsampled
bilinearly by the same factor. To the engine it is just a network whose divisor, smallest
side and preferred tile are ``factor`` times larger, so tiling, training, fine-tuning and
evaluation work at full resolution unchanged; a checkpoint stores the inner network's
weights and the factor (``input_downsample``).

A super-resolution network (``output_scale`` s > 1, SASR-Net) wrapped with ``factor`` = s
runs on the image shrunk by s and returns its outputs on the image's own grid (nothing is
upsampled: the network itself gives s times its input). That is the pairing it trains on
(a patch shrunk by s in, the patch's own mask out), so prediction, fine-tuning and
evaluation see the grid the user's image and labels are on. Shrinking by 2 is the spec's
bilinear resampling: at factor 2, bilinear interpolation (half-pixel centres) is the mean
of each 2 x 2 block, which is what the average pool computes. The bare network (a mask s
times the image's size) is :func:`unwrap`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["WorkingResolution", "Resampled", "input_downsample", "unwrap", "with_downsample",
           "super_resolved", "on_input_grid", "resize_image"]


class WorkingResolution(nn.Module):
    """``net`` run on the input average-pooled by ``factor``; outputs upsampled back.

    Attributes:
        net: the wrapped network (its ``state_dict`` keys gain the prefix ``net.``).
        factor: the integer downsampling factor (>= 2).
        spec: the network's spec with ``divisor``, ``min_size`` and ``preferred_tile``
            multiplied by ``factor`` and ``extra["input_downsample"] = factor``.
        config: the wrapped network's config.
    """

    def __init__(self, net: nn.Module, factor: int) -> None:
        super().__init__()
        factor = int(factor)
        if factor < 2:
            raise ConfigError(f"A working-resolution factor must be 2 or more, not {factor}.")
        spec = net.spec
        scale = int(spec.output_scale)
        if spec.spatial_dims != 2 or (scale != 1 and factor != scale):
            raise ConfigError(
                f"{spec.network} cannot run at a working resolution of 1/{factor}: only 2D "
                "networks can, and a super-resolution network only at its own scale "
                f"(1/{scale}).")
        self.net = net
        self.factor = factor
        #: what the outputs are upsampled by (1 for a super-resolution network)
        self.upsample = factor // scale
        self.spec = dataclasses.replace(
            spec, divisor=spec.divisor * factor, min_size=spec.min_size * factor,
            preferred_tile=spec.preferred_tile * factor, output_scale=1,
            extra={**spec.extra, "input_downsample": factor, "super_resolution": scale})
        self.config = net.config

    def encoder_parameters(self):
        """The wrapped network's encoder parameters (what "freeze encoder" freezes)."""
        return self.net.encoder_parameters()

    def _up(self, value: Any) -> Any:
        if self.upsample == 1:
            return value
        if isinstance(value, torch.Tensor) and value.ndim == 4:
            up = F.interpolate(value.float(), scale_factor=self.factor, mode="bilinear",
                               align_corners=False)
            return up.to(value.dtype)
        if isinstance(value, dict):
            return {k: self._up(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._up(v) for v in value)
        return value

    def forward(self, x: torch.Tensor) -> Any:
        small = F.avg_pool2d(x, self.factor)
        return self._up(self.net(small))


def _resize_outputs(value: Any, size: tuple[int, int]) -> Any:
    """Every 4D tensor in ``value`` (a tensor, dict, list or tuple) resized bilinearly."""
    if isinstance(value, torch.Tensor) and value.ndim == 4:
        if tuple(value.shape[-2:]) == size:
            return value
        out = F.interpolate(value.float(), size=size, mode="bilinear", align_corners=False)
        return out.to(value.dtype)
    if isinstance(value, dict):
        return {k: _resize_outputs(v, size) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_resize_outputs(v, size) for v in value)
    return value


class Resampled(nn.Module):
    """``net`` run on each input resampled by ``zoom`` (a float per axis); outputs resized
    back to the input's size.

    What the engine uses when an image's pixel size differs from the one the weights were
    trained at (:func:`napari_medseg.engine.pixel_size.plane_zoom`): a tile of the image is
    resized (bilinear, antialiased when it shrinks) to ``round(side * zoom)``, padded
    (reflect) to a side the network accepts, the network runs, and every spatial output is
    cropped back and resized bilinearly to the tile's own size, so tiling, stitching and the
    outputs stay on the image's grid. A zoom of 1 on both axes runs the network as it is.

    Attributes:
        net: the wrapped network (any 2D network, a working-resolution one included).
        zoom: (zy, zx), the image's pixel size over the weights' (the engine sets it per
            orthogonal pass).
        spec: the network's spec with ``divisor`` and ``min_size`` 1 (any tile works) and
            ``preferred_tile`` divided by the largest zoom the run will use (``tile_zoom``),
            so no pass feeds the network more than its own preferred tile;
            ``extra["resampled"]`` holds the zoom.
    """

    def __init__(self, net: nn.Module, zoom: tuple[float, float],
                 tile_zoom: float | None = None) -> None:
        super().__init__()
        spec = net.spec
        zoom = tuple(float(z) for z in zoom)
        if spec.spatial_dims != 2 or len(zoom) != 2 or min(zoom) <= 0:
            raise ConfigError(f"{spec.network} cannot be resampled by {zoom}: only 2D "
                              "networks can, by two positive factors.")
        self.net = net
        self.zoom = zoom
        largest = max(max(zoom), float(tile_zoom or 0.0))
        self.spec = dataclasses.replace(
            spec, divisor=1, min_size=1,
            preferred_tile=max(spec.divisor, int(round(spec.preferred_tile / largest))),
            output_scale=1, extra={**spec.extra, "resampled": zoom})
        self.config = net.config

    def encoder_parameters(self):
        return self.net.encoder_parameters()

    def forward(self, x: torch.Tensor) -> Any:
        size = tuple(int(s) for s in x.shape[-2:])
        inner = tuple(max(1, int(round(s * z))) for s, z in zip(size, self.zoom))
        d, smallest = int(self.net.spec.divisor), int(self.net.spec.min_size)
        padded = tuple(max(smallest, -(-n // d) * d) for n in inner)
        if inner == size and padded == size:
            return self.net(x)
        small = resize_image(x, inner)
        pad_y, pad_x = padded[0] - inner[0], padded[1] - inner[1]
        if pad_y or pad_x:
            mode = "reflect" if pad_y < inner[0] and pad_x < inner[1] else "replicate"
            small = F.pad(small, (0, pad_x, 0, pad_y), mode=mode)
        return _resize_outputs(_crop_outputs(self.net(small), inner), size)


def resize_image(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x C x H x W resized to ``size`` as :class:`Resampled` feeds its network: bilinear,
    antialiased when it shrinks (the one rule for an image taken to the weights' pixels)."""
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False,
                         antialias=shrink).to(x.dtype)


def _crop_outputs(value: Any, size: tuple[int, int]) -> Any:
    """Every 4D tensor in ``value`` cut to its top-left ``size`` (the padding dropped)."""
    if isinstance(value, torch.Tensor) and value.ndim == 4:
        return value[..., : size[0], : size[1]]
    if isinstance(value, dict):
        return {k: _crop_outputs(v, size) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_crop_outputs(v, size) for v in value)
    return value


def with_downsample(net: nn.Module, factor: int) -> nn.Module:
    """``net`` itself for ``factor`` 1, else ``net`` wrapped in :class:`WorkingResolution`."""
    return net if int(factor) == 1 else WorkingResolution(net, factor)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a :class:`WorkingResolution` (or ``model`` itself)."""
    if isinstance(model, Resampled):
        model = model.net
    return model.net if isinstance(model, WorkingResolution) else model


def input_downsample(model: nn.Module) -> int:
    """The working-resolution factor of ``model`` (1 for a plain network)."""
    return model.spec.input_downsample


def super_resolved(model: nn.Module) -> nn.Module:
    """The bare super-resolution network inside ``model`` (outputs at its own scale).

    Raises:
        ConfigError: ``model`` is not a super-resolution network on the input grid.
    """
    if isinstance(model, WorkingResolution) and model.net.spec.output_scale > 1:
        net = model.net
        if hasattr(model, "checkpoint_info"):  # its normalisation and identity go along
            net.checkpoint_info = model.checkpoint_info
        return net
    if model.spec.output_scale > 1:
        return model
    raise ConfigError(f"{model.spec.network} is not a super-resolution network; it has no "
                      "super-resolved output.")


def on_input_grid(model, factor: int = 1):
    """``model`` at working resolution 1/``factor``; a super-resolution network always on
    its input grid (wrapped at its own scale), so that it learns, validates and is saved in
    the pairing prediction and fine-tuning use (the patch shrunk in, its own mask out)."""
    net = unwrap(model)
    scale = int(net.spec.output_scale)
    if scale > 1:
        return model if model is not net else with_downsample(net, scale)
    if int(factor) > 1 and model is net:
        return with_downsample(net, factor)
    return model
