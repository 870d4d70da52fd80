"""SASR-Net: scale-aware super-resolution lesion segmentation with dual affinity learning.

Luo et al., "Scale-aware Super-resolution Network with Dual Affinity Learning for Lesion
Segmentation from Medical Images", arXiv 2305.19063 / IEEE TNNLS 2024. A 2D port (and the 3D
original) of the released network, written from the spec (``banet_unetsharp_sasrnet.md`` §3):

- a shared U-Net encoder (four levels, widths 32/64/128/256 in the paper variant);
- two decoders of identical structure and separate weights, built from scale-aware dilated
  convolution (SDC) blocks: the lesion-mask SR (segmentation) decoder and the lesion-image SR
  decoder;
- a segmentation head (1x1 conv at the input resolution, then x2 (bi/tri)linear interpolation
  of the logits with align_corners=True: the mask is exactly twice the input size);
- the SR tail on the image decoder (x2 transposed conv, EDSR block, 1x1 conv to the image
  channels) and a pointwise projector (1x1 conv, BN, ReLU) of the x2 segmentation logits, used
  by the feature-affinity (FA) loss;
- the SDC gate maps of both decoders, resized to the input resolution and concatenated, used by
  the scale-affinity (SA) loss.

In eval mode only the encoder, the segmentation decoder and the head run (the SR branch and the
projector serve only the training losses). Dropout is a registered module, so unlike the released
code it is off in eval mode and inference is deterministic.

Tensors are N x C x H x W (2D) or N x C x D x H x W (3D, ``spatial_dims=3``); the input is the
low-resolution image, every output is at twice its size except the gate maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputShapeError
from .base import SegmentationNetwork
from .registry import register_network
from .layers import ConvBNReLU, conv_cls, conv_transpose_cls, linear_mode
from .sasrnet_blocks import EDSRBlock, UpBlock
from .spec import HEAD_MASK, HEAD_SR_IMAGE, ModelSpec

__all__ = [
    "SASRNetConfig",
    "SASRNet",
    "SASRDecoder",
    "build_sasrnet",
    "TRAIN_SEG_FEATURES",
    "TRAIN_GATES_SEG",
    "TRAIN_GATES_SR",
]

#: Training output: the pointwise projection of the x2 mask logits, N x C_img x H' x W' (FA loss).
TRAIN_SEG_FEATURES = "seg_features"
#: Training output: gate maps of the segmentation decoder at input resolution, N x L*G x H x W
#: (L decoder levels, G = 1 + len(dilations) gates per SDC block: 3 x 4 = 12 by default).
TRAIN_GATES_SEG = "gates_seg"
#: Training output: gate maps of the image-SR decoder at input resolution, N x L*G x H x W.
TRAIN_GATES_SR = "gates_sr"


@dataclass(frozen=True)
class SASRNetConfig:
    """Settings of SASR-Net.

    Attributes:
        variant: ``"tiny"``, ``"lite"`` or ``"paper"``.
        in_channels: image channels C_img; the SR branch reconstructs the same channels.
        num_classes: K mask logits (1 = one sigmoid logit, as in the released code).
        spatial_dims: 2 (the port for 2D lesion images) or 3 (the released volumetric model).
        widths: encoder widths per level, finest first; the decoders mirror them.
        dilations: dilations of the 3x3 branches of every SDC block (a 1x1 branch is added).
        dropout: dropout rate after every SDC block (training only).
        affinity_pool: average-pooling kernel of the FA/SA affinity (1/subscale = 16 in the code).
        sr_weight: weight of the SR reconstruction loss (1.0 in the released script).
        fa_weight: weight of the feature-affinity loss (1.0 in the released script).
        sa_weight: weight of the scale-affinity loss (0.0 in the released script: SA is built and
            computed but switched off there; the paper's value is unknown).
        preferred_tile: input (low-resolution) tile side the engine uses; None picks 256 in
            2D (training uses the spec's 128 -> 256 patches; 256 px inference tiles scored
            the held-out nuclei within 0.002 Dice of 128 px ones and run 22 % faster per
            pixel) and 48 in 3D (the released 48^3 -> 96^3 patches).
    """

    variant: str = "paper"
    in_channels: int = 1
    num_classes: int = 1
    spatial_dims: int = 2
    widths: tuple[int, ...] = (32, 64, 128, 256)
    dilations: tuple[int, ...] = (1, 2, 5)
    dropout: float = 0.5
    affinity_pool: int = 16
    sr_weight: float = 1.0
    fa_weight: float = 1.0
    sa_weight: float = 0.0
    preferred_tile: int | None = None


class SASRDecoder(nn.Module):
    """A U-Net decoder of :class:`UpBlock` levels (SDC blocks), coarsest first.

    Args:
        widths: encoder widths, finest first.
        spatial_dims: 2 or 3.
        dilations: SDC dilations.
        dropout: dropout rate after each SDC block.
    """

    def __init__(
        self,
        widths: tuple[int, ...],
        spatial_dims: int,
        dilations: tuple[int, ...],
        dropout: float,
    ) -> None:
        super().__init__()
        self.levels = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], spatial_dims, dilations, dropout)
            for i in reversed(range(len(widths) - 1))
        )

    def forward(self, features: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Decode the encoder features.

        Args:
            features: encoder outputs, finest first, each N x C_l x (spatial / 2^l).

        Returns:
            ``(x, gates)``: x is N x widths[0] x (spatial); gates lists the gate maps of each
            level, coarsest first (N x G x (spatial / 2^l)).
        """
        x = features[-1]
        gates = []
        for level, skip in zip(self.levels, reversed(features[:-1])):
            x, g = level(x, skip)
            gates.append(g)
        return x, gates


class SASRNet(SegmentationNetwork):
    """SASR-Net (see the module docstring).

    ``forward(x)`` with x the low-resolution image N x C_img x (spatial) returns, in eval mode,
    ``{"mask": N x K x (2 * spatial)}`` logits. In training mode it adds ``"sr_image"``
    (N x C_img x (2 * spatial)), ``"seg_features"`` (projected mask logits, same shape as the SR
    image), ``"gates_seg"`` and ``"gates_sr"`` (N x L*G x (spatial): L = len(widths) - 1 decoder levels,
    G = 1 + len(dilations) gates per level; 12 by default).
    """

    def __init__(self, config: SASRNetConfig) -> None:
        super().__init__()
        if len(config.widths) < 2:
            raise ValueError("SASR-Net needs at least two encoder widths")
        if config.affinity_pool < 1:
            raise ValueError("affinity_pool must be a positive integer")
        self.config = config
        dims = config.spatial_dims
        widths = tuple(int(w) for w in config.widths)
        dilations = tuple(int(d) for d in config.dilations)
        self.mode = linear_mode(dims)
        pool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d

        stages = []
        prev = config.in_channels
        for i, w in enumerate(widths):
            layers: list[nn.Module] = [] if i == 0 else [pool(2)]
            layers += [ConvBNReLU(prev, w, dims), ConvBNReLU(w, w, dims)]
            stages.append(nn.Sequential(*layers))
            prev = w
        self.encoder = nn.ModuleList(stages)

        self.seg_decoder = SASRDecoder(widths, dims, dilations, config.dropout)
        self.seg_head = conv_cls(dims)(widths[0], config.num_classes, 1)

        self.sr_decoder = SASRDecoder(widths, dims, dilations, config.dropout)
        c = widths[0]
        self.sr_tail = nn.Sequential(
            conv_transpose_cls(dims)(c, c, 2, stride=2),
            EDSRBlock(c, dims),
            conv_cls(dims)(c, config.in_channels, 1),
        )
        self.projector = ConvBNReLU(config.num_classes, config.in_channels, dims, kernel_size=1)

        n_pools = len(widths) - 1
        divisor = math.lcm(2**n_pools, int(config.affinity_pool))
        self.spec = ModelSpec(
            network="sasrnet",
            variant=config.variant,
            in_channels=config.in_channels,
            num_classes=config.num_classes,
            spatial_dims=dims,
            divisor=divisor,
            min_size=divisor,
            output_scale=2,
            heads=(HEAD_MASK,),
            train_outputs=(HEAD_SR_IMAGE, TRAIN_SEG_FEATURES, TRAIN_GATES_SEG, TRAIN_GATES_SR),
            loss="sasrnet",
            encoder_prefixes=("encoder.",),
            preferred_tile=int(
                config.preferred_tile
                if config.preferred_tile is not None
                else (256 if dims == 2 else 48)
            ),
            # bf16, 2D: 0.67 us/px at 256 px tiles in batches of 4, 0.86 at 128 px in 2s.
            cpu_batch_size=4 if dims == 2 else 2,
            extra={
                "affinity_pool": int(config.affinity_pool),
                "loss_weights": {
                    "sr": float(config.sr_weight),
                    "fa": float(config.fa_weight),
                    "sa": float(config.sa_weight),
                },
                "input_resampling": {"mode": self.mode, "align_corners": True},
            },
        )

    def encode(self, x: Tensor) -> list[Tensor]:
        """Encoder features, finest first: N x widths[l] x (spatial / 2^l)."""
        features = []
        for stage in self.encoder:
            x = stage(x)
            features.append(x)
        return features

    def _gate_stack(self, gates: list[Tensor], size: torch.Size) -> Tensor:
        """Gate maps of all levels resized (align_corners=True) to ``size``, concatenated."""
        resized = [
            g if g.shape[2:] == size
            else F.interpolate(g, size=size, mode=self.mode, align_corners=True)
            for g in gates
        ]
        return torch.cat(resized, dim=1)

    def forward(self, x: Tensor) -> dict[str, Any]:
        """Predict the x2 mask (and, in training, the SR outputs).

        Args:
            x: low-resolution image, N x C_img x H x W (2D) or N x C_img x D x H x W (3D).
        """
        return self._run(x, full=self.training)

    def _check_input(self, x: Tensor) -> None:
        dims = self.config.spatial_dims
        if x.dim() != dims + 2:
            axes = "N x C x H x W" if dims == 2 else "N x C x D x H x W"
            raise InputShapeError(
                f"SASR-Net ({dims}D) takes a batch {axes}, got a tensor with {x.dim()} dimensions."
            )
        if x.shape[1] != self.config.in_channels:
            raise InputShapeError(
                f"SASR-Net was built for {self.config.in_channels} input channel(s), "
                f"got {x.shape[1]}."
            )
        step = 2 ** (len(self.encoder) - 1)
        if any(int(s) % step for s in x.shape[2:]):
            raise InputShapeError(
                f"SASR-Net needs every spatial side divisible by {step}, got "
                f"{' x '.join(str(int(s)) for s in x.shape[2:])}; pad or crop the image."
            )

    def _run(self, x: Tensor, full: bool) -> dict[str, Any]:
        self._check_input(x)
        features = self.encode(x)
        seg, seg_gates = self.seg_decoder(features)
        logits_lr = self.seg_head(seg)
        logits = F.interpolate(logits_lr, scale_factor=2.0, mode=self.mode, align_corners=True)
        out: dict[str, Any] = {HEAD_MASK: logits}
        if not full:
            return out
        sr, sr_gates = self.sr_decoder(features)
        size = x.shape[2:]
        out[HEAD_SR_IMAGE] = self.sr_tail(sr)
        out[TRAIN_SEG_FEATURES] = self.projector(logits)
        out[TRAIN_GATES_SEG] = self._gate_stack(seg_gates, size)
        out[TRAIN_GATES_SR] = self._gate_stack(sr_gates, size)
        return out

    def official_outputs(self, x: Tensor) -> tuple[Tensor, ...]:
        """The released forward's six outputs in their order, for weight-mapping checks.

        Runs the full graph in the current mode (BN and dropout as set by ``train``/``eval``):
        (mask probabilities at x2, SR image, projected mask logits, SR image again,
        segmentation gates, SR gates). Probabilities are the sigmoid for K == 1 and the softmax
        otherwise, as the released ``final_sigmoid`` switch.

        Args:
            x: low-resolution image, N x C_img x (spatial).
        """
        out = self._run(x, full=True)
        logits = out[HEAD_MASK]
        probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
        sr = out[HEAD_SR_IMAGE]
        return (
            probs, sr, out[TRAIN_SEG_FEATURES], sr, out[TRAIN_GATES_SEG], out[TRAIN_GATES_SR]
        )


@register_network(
    "sasrnet",
    config_cls=SASRNetConfig,
    variants={
        "tiny": {"widths": (4, 8, 16, 32)},
        "lite": {"widths": (16, 32, 64, 128)},
        "paper": {"widths": (32, 64, 128, 256)},
    },
    summary="SASR-Net (TNNLS 2024): U-Net + scale-aware dilated conv, x2 mask super-resolution",
)
def build_sasrnet(config: SASRNetConfig) -> SASRNet:
    """Build SASR-Net from its config."""
    return SASRNet(config)
