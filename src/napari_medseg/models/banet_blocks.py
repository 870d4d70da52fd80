"""Building blocks of BA-Net: dilated ResNet encoder, ASPP, MultiTask block, CFF, Fuse.

Re-implemented from ``/work/shared/specs/banet_unetsharp_sasrnet.md`` section 1 (the layer
layout of the official code, ``mathwrx/BA-Net`` @ ``e67ba76``); see ``models/banet.md``.

Every tensor is N×C×H×W unless stated otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ConvBNReLU

__all__ = [
    "resize_to",
    "BasicBlock",
    "Bottleneck",
    "stage_dilations",
    "DilatedResNet",
    "ASPP",
    "DepthwiseSeparable",
    "PyramidEdgeExtraction",
    "InteractiveAttention",
    "MultiTaskBlock",
    "CrossFeatureFusion",
    "Fuse",
]


def resize_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize (``align_corners=True``, as everywhere in BA-Net) to ``size`` (H, W)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


# --------------------------------------------------------------------------- encoder


class _ResidualBlock(nn.Module):
    """A ResNet block: a residual branch plus a shortcut (identity, or 1×1 conv + BN), ReLU.

    Subclasses build their branch's layers, then call :meth:`_add_shortcut` (so the
    parameters keep torchvision's order), and compute the branch in :meth:`_branch`.
    """

    def _add_shortcut(self, in_ch: int, out_ch: int, stride: int) -> None:
        """The block's ReLU and its projection shortcut where the shape changes."""
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def _branch(self, x: Tensor) -> Tensor:
        """The residual branch, ending in a BN without activation."""
        raise NotImplementedError(f"{type(self).__name__} defines no residual branch")

    def forward(self, x: Tensor) -> Tensor:
        """relu(branch(x) + shortcut(x))."""
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self._branch(x) + identity)


class Bottleneck(_ResidualBlock):
    """ResNet v1.5 bottleneck: 1×1, 3×3 (stride s, dilation d), 1×1 to 4× width, + shortcut.

    N×in_ch×H×W → N×4·width×H/s×W/s. Parameter names follow torchvision (``conv1``/``bn1``
    ... ``downsample.0/1``) so ImageNet weights would load by name.
    """

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(
            width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self._add_shortcut(in_ch, out_ch, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        """The BN closing the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn3

    def _branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class BasicBlock(_ResidualBlock):
    """ResNet basic block with both 3×3 convs dilated by d (the first one strided by s).

    N×in_ch×H×W → N×width×H/s×W/s.
    """

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_ch, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self._add_shortcut(in_ch, width, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        """The BN closing the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn2

    def _branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


_BLOCKS: dict[str, type[Bottleneck] | type[BasicBlock]] = {
    "bottleneck": Bottleneck,
    "basic": BasicBlock,
}


def stage_dilations(blocks: Sequence[int]) -> list[list[int]]:
    """BA-Net's OS8 dilation of each block: layer1/2 → 1, layer3 → 1 then 2, layer4 → 4.

    This is the official pattern (spec 1.2). timm's ``output_stride=8`` differs in the first
    block of layer4 (it keeps the previous rate 2), which is why the encoder is built here.
    """
    l1, l2, l3, l4 = blocks
    return [[1] * l1, [1] * l2, [1] + [2] * (l3 - 1), [4] * l4]


class DilatedResNet(nn.Module):
    """ResNet at output stride 8 (spec 1.2), without the classifier (``fc`` is never used).

    Stem: 7×7 conv s2 (no bias), BN, ReLU, 3×3 max-pool s2. layer1 stride 1, layer2 stride 2
    (in the first block's 3×3), layer3 and layer4 unstrided and dilated (see
    :func:`stage_dilations`). Random init as the official backbone: convs
    N(0, √(2 / (k·k·C_out))) (Kaiming normal, fan-out), BN γ = 1, β = 0.

    Args:
        in_channels: image channels.
        block: ``"bottleneck"`` (ResNet-50/101) or ``"basic"`` (ResNet-18/34).
        layers: number of blocks in layer1..layer4.
        widths: block widths of layer1..layer4 (outputs are ×4 for bottlenecks).
        stem_width: channels of the stem conv.
        zero_init_residual: start each residual branch at zero (γ = 0 in its last BN).
    """

    def __init__(
        self,
        in_channels: int,
        block: str = "bottleneck",
        layers: Sequence[int] = (3, 4, 6, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f"block must be one of {sorted(_BLOCKS)}, not {block!r}")
        if len(layers) != 4 or len(widths) != 4 or min(layers) < 1:
            raise ValueError("layers and widths need 4 entries and at least one block per stage")
        block_cls = _BLOCKS[block]
        self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = stem_width
        self.out_channels: list[int] = []
        strides = (1, 2, 1, 1)
        stages = []
        for width, stride, dilations in zip(widths, strides, stage_dilations(layers), strict=True):
            blocks = []
            for b, dilation in enumerate(dilations):
                blocks.append(block_cls(in_ch, width, stride if b == 0 else 1, dilation))
                in_ch = width * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
            self.out_channels.append(in_ch)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck | BasicBlock):
                    nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: Tensor) -> list[Tensor]:
        """N×C×H×W → [c1 (stride 4), c2, c3, c4 (stride 8)]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]


# --------------------------------------------------------------------------- ASPP


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling on c4 (spec 1.3), no dropout.

    Five branches of ``width`` channels (1×1; three 3×3 at ``rates``; image pooling), each
    conv without bias + BN + ReLU, concatenated and projected by 1×1 conv + BN + ReLU.

    The pooling branch is 1×1 spatially, so its BN cannot normalise a single image in training
    mode. For a training batch of one image the branch is broadcast to the map size *before*
    its BN (batch statistics are then well defined; the result equals the usual order up to the
    unbiased-variance factor of the running estimate). Batches of two or more and eval mode
    use the official order.
    """

    def __init__(self, in_ch: int, width: int, rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvBNReLU(in_ch, width, kernel_size=1, bias=False)]
            + [ConvBNReLU(in_ch, width, kernel_size=3, dilation=int(r), bias=False)
               for r in rates]
        )
        self.pool = ConvBNReLU(in_ch, width, kernel_size=1, bias=False)
        self.project = ConvBNReLU(width * (len(rates) + 2), width, kernel_size=1, bias=False)

    def _image_pool(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        conv, bn, relu = self.pool
        pooled = conv(F.adaptive_avg_pool2d(x, 1))
        if self.training and x.shape[0] == 1:
            return relu(bn(pooled.expand(-1, -1, *size)))
        # bilinear, align_corners=True, from 1×1 is a broadcast
        return relu(bn(pooled)).expand(-1, -1, *size)

    def forward(self, x: Tensor) -> Tensor:
        """N×in_ch×h×w → N×width×h×w."""
        feats = [branch(x) for branch in self.branches]
        feats.append(self._image_pool(x))
        return self.project(torch.cat(feats, dim=1))


# --------------------------------------------------------------------------- MultiTask block


class DepthwiseSeparable(nn.Sequential):
    """DS(·): depthwise 3×3 (no bias), BN, pointwise 1×1 (no bias); no final activation."""

    def __init__(self, channels: int, out_ch: int | None = None) -> None:
        out_ch = channels if out_ch is None else out_ch
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.BatchNorm2d(channels),
            nn.Conv2d(channels, out_ch, 1, bias=False),
        )


class PyramidEdgeExtraction(nn.Module):
    """PEE (spec 1.4 step 2): average pools at two kernel sizes, concatenated and fused.

    ``explicit_diff=False`` (the code) concatenates [F', A_k1, A_k2]; ``True`` (the paper)
    concatenates [F', F' − A_k1, F' − A_k2]. The fuse is 1×1 (3C→C, no bias), ReLU,
    depthwise 3×3, BN, 1×1 (C→C, no bias), without a final activation.
    """

    def __init__(self, channels: int, kernels: Sequence[int], explicit_diff: bool = False) -> None:
        super().__init__()
        if any(int(k) % 2 == 0 for k in kernels):
            raise ValueError(f"PEE pooling kernels must be odd, got {tuple(kernels)}")
        self.kernels = tuple(int(k) for k in kernels)
        self.explicit_diff = explicit_diff
        c = channels
        self.fuse = nn.Sequential(
            nn.Conv2d(c * (len(self.kernels) + 1), c, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
            nn.BatchNorm2d(c),
            nn.Conv2d(c, c, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        """N×C×h×w → N×C×h×w."""
        pooled = [
            F.avg_pool2d(x, k, stride=1, padding=(k - 1) // 2, count_include_pad=True)
            for k in self.kernels
        ]
        if self.explicit_diff:
            pooled = [x - a for a in pooled]
        return self.fuse(torch.cat([x, *pooled], dim=1))


class InteractiveAttention(nn.Module):
    """IA (spec 1.4 step 4), both updates from the pre-IA features:

    E' = E + (1 − σ(G_E(E)))·S,   S' = S + (1 − σ(G_S(S)))·E

    ``gate="learned"`` (the code): G_E, G_S are DS blocks; ``"identity"`` (the paper): G = id.
    """

    def __init__(self, channels: int, gate: str = "learned") -> None:
        super().__init__()
        if gate not in ("learned", "identity"):
            raise ValueError(f"ia_gate must be 'learned' or 'identity', not {gate!r}")
        learned = gate == "learned"
        self.gate_edge = DepthwiseSeparable(channels) if learned else nn.Identity()
        self.gate_seg = DepthwiseSeparable(channels) if learned else nn.Identity()

    def edge(self, e: Tensor, s: Tensor) -> Tensor:
        """E' (N×C×h×w)."""
        return e + (1 - torch.sigmoid(self.gate_edge(e))) * s

    def seg(self, e: Tensor, s: Tensor) -> Tensor:
        """S' (N×C×h×w)."""
        return s + (1 - torch.sigmoid(self.gate_seg(s))) * e

    def forward(self, e: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """(E, S) → (E', S')."""
        return self.edge(e, s), self.seg(e, s)


class MultiTaskBlock(nn.Module):
    """One stage's PEE + mini-MTL with IA (spec 1.4).

    reduce (1×1, C_in→C, no bias) → PEE → E = DS_E(P), S = DS_S(P) → IA → edge head
    (3×3 on E') and segmentation head (3×3 on S'), both with bias. The feature passed on to
    CFF is M = S'.

    Args:
        in_ch: C_in of the encoder stage.
        channels: working width C.
        num_classes: logits of the segmentation side head.
        edge_classes: logits of the edge side head (2 = the code's 2-class CE; 1 = BCE).
        pool_kernels: the PEE average-pool kernels of this stage.
        explicit_diff: PEE concatenates differences (paper) instead of pools (code).
        ia_gate: ``"learned"`` (code) or ``"identity"`` (paper).
    """

    def __init__(
        self,
        in_ch: int,
        channels: int,
        num_classes: int,
        edge_classes: int,
        pool_kernels: Sequence[int],
        explicit_diff: bool = False,
        ia_gate: str = "learned",
    ) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_ch, channels, 1, bias=False)
        self.pee = PyramidEdgeExtraction(channels, pool_kernels, explicit_diff)
        self.edge_conv = DepthwiseSeparable(channels)
        self.seg_conv = DepthwiseSeparable(channels)
        self.ia = InteractiveAttention(channels, ia_gate)
        self.edge_head = nn.Conv2d(channels, edge_classes, 3, padding=1)
        self.seg_head = nn.Conv2d(channels, num_classes, 3, padding=1)

    def forward(
        self, x: Tensor, seg_side: bool = True, edge_side: bool = True
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """c_i → (M_i = S', seg logits, edge logits), at c_i's resolution.

        A side output that is not asked for is not computed and comes back as None.
        """
        p = self.pee(self.reduce(x))
        e, s = self.edge_conv(p), self.seg_conv(p)
        m = self.ia.seg(e, s)
        seg = self.seg_head(m) if seg_side else None
        edge = self.edge_head(self.ia.edge(e, s)) if edge_side else None
        return m, seg, edge


# --------------------------------------------------------------------------- CFF and decoder


class CrossFeatureFusion(nn.Module):
    """CFF for one anchor stage (spec 1.5):

    CFF_i = M_i + (1 − σ(T_i(M_i))) · Σ_{j≠i} σ(T_j(M_j↑)) · M_j↑

    where M_j↑ is M_j bilinearly resized to M_i's size. ``gate="learned"`` (the code): each of
    the inputs has its own 3×3 conv T (C→C, no bias, no BN); ``"identity"`` (the paper): T = id.
    Gate 0 belongs to the anchor, gates 1.. to the others in ascending stage order.
    """

    def __init__(self, channels: int, num_inputs: int = 4, gate: str = "learned") -> None:
        super().__init__()
        if gate not in ("learned", "identity"):
            raise ValueError(f"cff_gate must be 'learned' or 'identity', not {gate!r}")
        self.gates = nn.ModuleList(
            [
                nn.Conv2d(channels, channels, 3, padding=1, bias=False)
                if gate == "learned"
                else nn.Identity()
                for _ in range(num_inputs)
            ]
        )

    def forward(self, anchor: Tensor, others: Sequence[Tensor]) -> Tensor:
        """M_i (N×C×h×w) and the other stages' M_j (any sizes) → N×C×h×w."""
        size = anchor.shape[-2:]
        total = None
        for gate, m in zip(self.gates[1:], others, strict=True):
            m = resize_to(m, size)
            term = torch.sigmoid(gate(m)) * m
            total = term if total is None else total + term
        return anchor + (1 - torch.sigmoid(self.gates[0](anchor))) * total


class Fuse(nn.Sequential):
    """Decoder fuse (spec 1.6), pre-activated: ReLU, depthwise 3×3 (no bias), BN, 1×1 (no bias).

    The leading ReLU acts on a concatenation holding un-activated features; keep that order.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch, bias=False),
            nn.BatchNorm2d(in_ch),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
        )
