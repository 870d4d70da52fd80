"""Building blocks of SASR-Net, written once for 2D and 3D.

Every block takes ``spatial_dims`` (2 or 3) and picks the matching ``Conv``/``BatchNorm``/
``ConvTranspose`` layers. Tensors are N x C x H x W in 2D and N x C x D x H x W in 3D.

- :class:`ConvBnReLU`: convolution (with bias, as in the official code), batch norm, ReLU.
- :class:`ScaleAwareDilatedConv`: the SDC block of spec 3.3 (parallel 1x1 and dilated 3x3
  branches mixed by independent per-pixel sigmoid gates).
- :class:`EDSRBlock`: the residual block of the SR tail, with a 1x1 projection shortcut.
- :class:`UpBlock`: one decoder level (x2 interpolation, conv, concat skip, SDC, dropout).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "conv_cls",
    "batchnorm_cls",
    "conv_transpose_cls",
    "linear_mode",
    "ConvBnReLU",
    "ScaleAwareDilatedConv",
    "EDSRBlock",
    "UpBlock",
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


class ConvBnReLU(nn.Sequential):
    """Conv (with bias) -> BatchNorm -> ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        spatial_dims: 2 or 3.
        kernel_size: 1 or 3.
        dilation: dilation of the kernel; padding keeps the spatial size.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 2,
        kernel_size: int = 3,
        dilation: int = 1,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            conv_cls(spatial_dims)(
                in_channels, out_channels, kernel_size, padding=padding, dilation=dilation
            ),
            batchnorm_cls(spatial_dims)(out_channels),
            nn.ReLU(inplace=True),
        )


class ScaleAwareDilatedConv(nn.Module):
    """Scale-aware dilated convolution (SDC) block (spec 3.3).

    With ``dilations = (1, 2, 5)`` it has four branches: ``b0`` a 1x1 conv and ``b1..b3`` 3x3
    convs at dilation 1, 2 and 5, each followed by BN and ReLU. A 3x3 conv maps the input to one
    gate map per branch; the gates are independent sigmoids (no softmax across branches). Each
    branch is multiplied by its gate (broadcast over channels), the products are concatenated
    and fused by a 1x1 conv, BN and ReLU.

    Args:
        in_channels: C_in.
        out_channels: C_out of every branch and of the fused output.
        spatial_dims: 2 or 3.
        dilations: dilations of the 3x3 branches.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 2,
        dilations: Sequence[int] = (1, 2, 5),
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvBnReLU(in_channels, out_channels, spatial_dims, kernel_size=1)]
            + [
                ConvBnReLU(in_channels, out_channels, spatial_dims, kernel_size=3, dilation=d)
                for d in dilations
            ]
        )
        self.num_gates = len(self.branches)
        self.gate = conv_cls(spatial_dims)(in_channels, self.num_gates, 3, padding=1)
        self.fuse = ConvBnReLU(
            self.num_gates * out_channels, out_channels, spatial_dims, kernel_size=1
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Fused features and the gate maps.

        Args:
            x: N x C_in x (spatial).

        Returns:
            ``(y, gates)``: y is N x C_out x (spatial); gates is N x G x (spatial), values in
            (0, 1), G = 1 + len(dilations).
        """
        gates = torch.sigmoid(self.gate(x))
        mixed = [branch(x) * gates[:, k : k + 1] for k, branch in enumerate(self.branches)]
        return self.fuse(torch.cat(mixed, dim=1)), gates


class EDSRBlock(nn.Module):
    """Residual block of the SR tail: ``conv3(relu(conv3(x))) + conv1_nobias(x)``.

    Args:
        channels: input and output channels.
        spatial_dims: 2 or 3.
    """

    def __init__(self, channels: int, spatial_dims: int = 2) -> None:
        super().__init__()
        conv = conv_cls(spatial_dims)
        self.body = nn.Sequential(
            conv(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            conv(channels, channels, 3, padding=1),
        )
        self.shortcut = conv(channels, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: N x C x (spatial) -> N x C x (spatial)."""
        return self.body(x) + self.shortcut(x)


class UpBlock(nn.Module):
    """One decoder level: x2 (bi/tri)linear upsampling (align_corners=False), conv-BN-ReLU,
    concatenation with the encoder skip, SDC block, dropout.

    Args:
        in_channels: channels of the coarser decoder input.
        out_channels: channels of the skip and of the output.
        spatial_dims: 2 or 3.
        dilations: dilations of the SDC block.
        dropout: element-wise dropout rate after the SDC block (active in training only).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 2,
        dilations: Sequence[int] = (1, 2, 5),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.mode = linear_mode(spatial_dims)
        self.conv = ConvBnReLU(in_channels, out_channels, spatial_dims, kernel_size=3)
        self.sdc = ScaleAwareDilatedConv(2 * out_channels, out_channels, spatial_dims, dilations)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, skip: Tensor) -> tuple[Tensor, Tensor]:
        """Decode one level.

        Args:
            x: N x C_in x (spatial / 2).
            skip: N x C_out x (spatial), the encoder features of this level.

        Returns:
            ``(features N x C_out x (spatial), gates N x G x (spatial))``.
        """
        x = F.interpolate(x, scale_factor=2.0, mode=self.mode, align_corners=False)
        x = torch.cat([skip, self.conv(x)], dim=1)
        y, gates = self.sdc(x)
        return self.dropout(y), gates
