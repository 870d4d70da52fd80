"""BA-Net: boundary-aware context network (Wang et al., MedIA 2022; arXiv 2005.00966).

A dilated ResNet at output stride 8 feeds, at each of its four stages, a *MultiTask* block
(pyramid edge extraction, then a mini multi-task branch pair whose edge and segmentation
features exchange information through *interactive attention*). Each block emits a
segmentation side output, an edge side output and a feature M_i; a *cross feature fusion*
module per stage mixes M_i with the other stages' features; a top-down decoder merges the four
fused features with ASPP on the last stage into the final map at stride 4, bilinearly upsampled
to the input size.

Outputs (all logits at the input resolution):

* eval: ``"mask"`` N×K×H×W (the final map) and ``"boundary"`` N×1×H×W, the sigmoid logit of the
  edge side output of stage 1 (the finest, stride 4): for 2-logit edge heads it is the logit
  difference ``edge[:, 1] - edge[:, 0]``, whose sigmoid equals the 2-class softmax of the
  boundary class. ``boundary_source="mean"`` averages the four stages' logits instead.
* training adds ``"deep_supervision"`` (the four segmentation side outputs seg1..seg4, each
  N×K×H×W) and ``"edge_sides"`` (the four edge side outputs edge1..edge4, each N×E×H×W with
  E = 2 for K >= 2 as in the code, E = 1 for K == 1). :meth:`BANet.official_outputs` gives the
  code's 9 outputs in its order ``[final, seg1, edge1, ..., seg4, edge4]``.

Re-implemented from ``/work/shared/specs/banet_unetsharp_sasrnet.md`` section 1, without the
modules the official code builds but never runs (the backbone's ``fc``, the decoder's
``up_conv4``). See ``models/banet.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputShapeError
from .banet_blocks import (
    ASPP,
    CrossFeatureFusion,
    DilatedResNet,
    Fuse,
    MultiTaskBlock,
    resize_to,
)
from .base import SegmentationNetwork
from .layers import ConvBNReLU
from .registry import register_network
from .spec import HEAD_BOUNDARY, HEAD_DEEP_SUPERVISION, HEAD_MASK

__all__ = [
    "BANetConfig",
    "BANet",
    "build_banet",
    "DIVISOR",
    "MIN_SIZE",
    "ENCODER_PREFIXES",
    "EDGE_SIDES",
]

#: Input sides should be multiples of this: stem /4, then layer2 /8 (output stride 8).
DIVISOR = 8
#: Smallest input side: 4×4 at stride 8 (the spec checks 32-pixel tiles).
MIN_SIZE = 32
#: Parameter-name prefixes of the ResNet encoder.
ENCODER_PREFIXES = ("encoder.",)
#: Training-output key of the four edge side outputs (list of N×E×H×W logits).
EDGE_SIDES = "edge_sides"


@dataclass(frozen=True)
class BANetConfig:
    """Settings of BA-Net. The defaults are the official code's configuration (ResNet-50).

    Attributes:
        variant: ``"tiny"``, ``"lite"`` or ``"paper"``.
        in_channels: image channels.
        num_classes: K (1 = one sigmoid logit).
        block: encoder block, ``"bottleneck"`` (ResNet-50/101) or ``"basic"`` (ResNet-18/34).
        layers: blocks in layer1..layer4 ((3, 4, 6, 3) = ResNet-50, (3, 4, 23, 3) = ResNet-101).
        widths: block widths of layer1..layer4 (stage outputs are ×4 for bottlenecks).
        stem_width: channels of the 7×7 stem conv.
        zero_init_residual: start every residual branch at zero (random-init training aid).
        reduce_dim: C, the working width of the MultiTask blocks, CFF and decoder (128).
        aspp_width: width of each ASPP branch and of its projection (256).
        aspp_rates: dilation rates of the three 3×3 ASPP branches.
        pool_kernels: PEE average-pool kernels of stages 1..4.
        pee_explicit_diff: PEE concatenates F' − A_k (paper) instead of A_k (code).
        ia_gate: interactive-attention gate, ``"learned"`` DS blocks (code) or
            ``"identity"`` (paper).
        cff_gate: cross-feature-fusion gate, ``"learned"`` 3×3 convs (code) or ``"identity"``.
        boundary_source: the eval ``"boundary"`` head, ``"stage1"`` (finest edge side output)
            or ``"mean"`` (mean of the four edge sides' logits).
    """

    variant: str = "paper"
    in_channels: int = 3
    num_classes: int = 2
    block: str = "bottleneck"
    layers: tuple[int, ...] = (3, 4, 6, 3)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64
    zero_init_residual: bool = False
    reduce_dim: int = 128
    aspp_width: int = 256
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    pool_kernels: tuple[tuple[int, ...], ...] = ((5, 7), (5, 7), (3, 5), (3, 5))
    pee_explicit_diff: bool = False
    ia_gate: str = "learned"
    cff_gate: str = "learned"
    boundary_source: str = "stage1"


class BANet(SegmentationNetwork):
    """BA-Net with a dilated ResNet encoder at output stride 8 (see the module docstring)."""

    def __init__(self, config: BANetConfig) -> None:
        super().__init__()
        if config.in_channels < 1 or config.num_classes < 1:
            raise InputShapeError("BA-Net needs at least 1 input channel and 1 class.")
        if config.boundary_source not in ("stage1", "mean"):
            raise ValueError(
                f"boundary_source must be 'stage1' or 'mean', not {config.boundary_source!r}"
            )
        if len(config.pool_kernels) != 4:
            raise ValueError("pool_kernels needs one kernel pair per encoder stage (4).")
        self.config = config
        self.edge_classes = 1 if config.num_classes == 1 else 2
        self.spec = self._make_spec(
            "banet",
            divisor=DIVISOR,
            min_size=MIN_SIZE,
            heads=(HEAD_MASK, HEAD_BOUNDARY),
            train_outputs=(HEAD_DEEP_SUPERVISION, EDGE_SIDES),
            loss="banet",
            encoder_prefixes=ENCODER_PREFIXES,
            preferred_tile=256,
            cpu_batch_size=4,  # bf16, 256 px tiles: 0.53 us/px at 4, 0.56 at 2
            extra={"edge_classes": self.edge_classes, "boundary_border": "replicate"},
        )
        c = config.reduce_dim
        self.encoder = DilatedResNet(
            config.in_channels,
            block=config.block,
            layers=config.layers,
            widths=config.widths,
            stem_width=config.stem_width,
            zero_init_residual=config.zero_init_residual,
        )
        enc_ch = self.encoder.out_channels
        self.aspp = ASPP(enc_ch[3], config.aspp_width, config.aspp_rates)
        self.stages = nn.ModuleList(
            [
                MultiTaskBlock(
                    ch,
                    c,
                    config.num_classes,
                    self.edge_classes,
                    kernels,
                    explicit_diff=config.pee_explicit_diff,
                    ia_gate=config.ia_gate,
                )
                for ch, kernels in zip(enc_ch, config.pool_kernels, strict=True)
            ]
        )
        self.cff = nn.ModuleList([CrossFeatureFusion(c, 4, config.cff_gate) for _ in range(4)])
        self.decode4 = Fuse(c + config.aspp_width, c)
        self.decode3 = Fuse(2 * c, c)
        self.decode2 = Fuse(2 * c, c)
        self.decode1 = Fuse(2 * c, c)
        self.classifier = nn.Sequential(
            *ConvBNReLU(c, c), nn.Conv2d(c, config.num_classes, 1)
        )

    def _boundary_logit(self, edge: Tensor) -> Tensor:
        """One sigmoid logit N×1×h×w from an edge side output N×E×h×w."""
        return edge if edge.shape[1] == 1 else edge[:, 1:2] - edge[:, 0:1]

    def _run(self, x: Tensor, sides: bool) -> dict[str, Any]:
        self._check_batch(x, "BA-Net", min_size=MIN_SIZE)
        size = x.shape[-2:]
        feats = self.encoder(x)
        all_edges = sides or self.config.boundary_source == "mean"
        m: list[Tensor] = []
        segs: list[Tensor] = []
        edges: list[Tensor] = []
        for i, (stage, f) in enumerate(zip(self.stages, feats, strict=True)):
            mi, seg, edge = stage(f, seg_side=sides, edge_side=all_edges or i == 0)
            m.append(mi)
            if seg is not None:
                segs.append(resize_to(seg, size))
            if edge is not None:
                edges.append(resize_to(edge, size))
        fused = [
            cff(m[i], [m[j] for j in range(4) if j != i]) for i, cff in enumerate(self.cff)
        ]
        d = self.decode4(torch.cat([fused[3], self.aspp(feats[3])], dim=1))
        d = self.decode3(torch.cat([fused[2], d], dim=1))
        d = self.decode2(torch.cat([fused[1], d], dim=1))
        d = self.decode1(torch.cat([fused[0], resize_to(d, fused[0].shape[-2:])], dim=1))
        out: dict[str, Any] = {HEAD_MASK: resize_to(self.classifier(d), size)}
        if self.config.boundary_source == "stage1":
            out[HEAD_BOUNDARY] = self._boundary_logit(edges[0])
        else:
            out[HEAD_BOUNDARY] = torch.stack([self._boundary_logit(e) for e in edges]).mean(0)
        if sides:
            out[HEAD_DEEP_SUPERVISION] = segs
            out[EDGE_SIDES] = edges
        return out

    def forward(self, x: Tensor) -> dict[str, Any]:
        """N×C×H×W image → dict of logits at H×W (keys: see the module docstring)."""
        return self._run(x, sides=self.training)

    def official_outputs(self, x: Tensor) -> list[Tensor]:
        """The official code's 9 outputs ``[final, seg1, edge1, ..., seg4, edge4]`` (any mode)."""
        out = self._run(x, sides=True)
        result = [out[HEAD_MASK]]
        for seg, edge in zip(out[HEAD_DEEP_SUPERVISION], out[EDGE_SIDES], strict=True):
            result += [seg, edge]
        return result


@register_network(
    "banet",
    config_cls=BANetConfig,
    variants={
        "tiny": {
            "layers": (1, 1, 2, 1),
            "widths": (8, 16, 32, 64),
            "stem_width": 8,
            "reduce_dim": 16,
            "aspp_width": 16,
            "aspp_rates": (2, 4, 6),
        },
        "lite": {
            "block": "basic",
            "layers": (2, 2, 2, 2),
            "widths": (32, 64, 128, 256),
            "stem_width": 32,
            "zero_init_residual": True,
            "reduce_dim": 64,
            "aspp_width": 128,
        },
        "paper": {},
    },
    summary="BA-Net (MedIA 2022): boundary-aware context network, dilated ResNet-50 at OS8, "
    "ASPP, PEE, interactive attention, CFF; mask + boundary heads.",
)
def build_banet(config: BANetConfig) -> BANet:
    """Build BA-Net from its config."""
    return BANet(config)
