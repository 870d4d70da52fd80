"""Layers shared by the networks, written once.

- :func:`conv_cls`, :func:`batchnorm_cls`, :func:`conv_transpose_cls`, :func:`linear_mode`:
  the 2D or 3D flavour of a layer, for blocks written once for both (SASR-Net).
- :class:`ConvBNReLU`: convolution, batch norm, ReLU, as one ``nn.Sequential`` (parameter
  names ``0.weight``, ``0.bias``, ``1.weight`` ...), used by SA²-Net, SASR-Net and BA-Net.
- :class:`ChannelLayerNorm`: layer norm over the channels of every pixel of an N×C×H×W map,
  used by SA²-Net (eps 1e-6) and MSA²-Net (eps 1e-5).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ChannelLayerNorm",
    "ConvBNReLU",
    "batchnorm_cls",
    "conv_cls",
    "conv_transpose_cls",
    "linear_mode",
]


def _check_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, not {spatial_dims!r}")
    return spatial_dims


def conv_cls(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return nn.Conv2d if _check_dims(spatial_dims) == 2 else nn.Conv3d


def batchnorm_cls(spatial_dims: int) -> type[nn.Module]:
    """``nn.BatchNorm2d`` or ``nn.BatchNorm3d``."""
    return nn.BatchNorm2d if _check_dims(spatial_dims) == 2 else nn.BatchNorm3d


def conv_transpose_cls(spatial_dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return nn.ConvTranspose2d if _check_dims(spatial_dims) == 2 else nn.ConvTranspose3d


def linear_mode(spatial_dims: int) -> str:
    """The (bi/tri)linear interpolation mode name for ``F.interpolate``."""
    return "bilinear" if _check_dims(spatial_dims) == 2 else "trilinear"


class ConvBNReLU(nn.Sequential):
    """Conv (stride 1, padding that keeps the spatial size) -> BatchNorm -> ReLU (in place).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        spatial_dims: 2 or 3.
        kernel_size: odd kernel side (1 or 3 in the networks).
        dilation: dilation of the kernel.
        bias: whether the conv has a bias (SA²-Net and SASR-Net: yes; BA-Net's ASPP: no).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 2,
        kernel_size: int = 3,
        dilation: int = 1,
        bias: bool = True,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            conv_cls(spatial_dims)(
                in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                bias=bias,
            ),
            batchnorm_cls(spatial_dims)(out_channels),
            nn.ReLU(inplace=True),
        )


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of every pixel of an N×C×H×W map.

    (x - mean) / sqrt(var + eps) · weight + bias over C (biased variance), with a learnable
    per-channel scale ``weight`` (ones) and shift ``bias`` (zeros).

    Args:
        channels: C.
        eps: added to the variance; each network states its own (SA²-Net 1e-6, MSA²-Net
            1e-5).
    """

    def __init__(self, channels: int, *, eps: float) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` (N×C×H×W) over C.

        One fused ``layer_norm`` over the last axis of the N×H×W×C view (a plain view for
        channels-last input). It keeps a bf16 input in bf16 under autocast, where an
        elementwise form promoted the map to fp32 through the fp32 weight.
        """
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return y.permute(0, 3, 1, 2)
