"""Building blocks of SASR-Net, written once for 2D and 3D.

Every block takes ``spatial_dims`` (2 or 3) and picks the matching ``Conv``/``BatchNorm``/
``ConvTranspose`` layers (:mod:`.layers`; its conv-BN-ReLU has a bias, as in the official
code). Tensors are N x C x H x W in 2D and N x C x D x H x W in 3D.

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

from .layers import ConvBNReLU, conv_cls, linear_mode

__all__ = [
    "ScaleAwareDilatedConv",
    "EDSRBlock",
    "UpBlock",
]


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
            [ConvBNReLU(in_channels, out_channels, spatial_dims, kernel_size=1)]
            + [
                ConvBNReLU(in_channels, out_channels, spatial_dims, kernel_size=3, dilation=d)
                for d in dilations
            ]
        )
        self.num_gates = len(self.branches)
        self.gate = conv_cls(spatial_dims)(in_channels, self.num_gates, 3, padding=1)
        self.fuse = ConvBNReLU(
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
        self.conv = ConvBNReLU(in_channels, out_channels, spatial_dims, kernel_size=3)
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
