"""UNet# (UNet-sharp): a nested UNet grid with dense and full-scale skips.

Re-implemented from the project spec (``shared/specs/banet_unetsharp_sasrnet.md``, section 2)
after Qian, Zhou, Li and Hu, "UNet#: A UNet-like Redesigning Skip Connections for Medical Image
Segmentation" (arXiv 2205.11759). No code of the official repository was used.

The network is a grid of nodes ``X^{i,j}`` (``i`` the depth, resolution ``H / 2**i``; ``j`` the
column). Every node is a VGG block (two conv3x3 + BN + ReLU). A decoder node ``X^{i,j}``
(``j >= 1``, ``i + j <= 4``) concatenates, on raw channels and in this order:

* the dense same-row skips ``X^{i,0}, ..., X^{i,j-1}`` (UNet++), and
* the full-scale skips ``U_2(X^{i+1,j-1}), U_4(X^{i+2,j-2}), ..., U_{2**j}(X^{i+j,0})``
  (UNet3+), bilinear with ``align_corners=True``.

Heads (the official deep supervision): ``o1``..``o4`` are 1x1 convs on ``X^{0,1}``..``X^{0,4}``;
``o5``..``o8`` are 3x3 convs on ``X^{4,0}, X^{3,1}, X^{2,2}, X^{1,3}``, upsampled x16, x8, x4,
x2. The official return order is ``[o1, o2, o3, o5, o6, o7, o8, o4]`` (final output last).

Pruning: in eval mode a model with ``prune_level = l`` (1..4) computes only the anti-diagonals
``1..l`` of the grid and returns ``o_l``; it equals the full model's head ``o_l``.

Classification-guided module (CGM, UNet3+ style, trained as the spec recommends): on an encoder
node ``X^{d,0}``, ``Dropout -> Conv1x1(C -> 2) -> global max pool`` gives N x 2 logits
("absent", "present"). It is trained with binary cross-entropy on "the mask has any
foreground" and gates **only at inference**: images whose argmax is "absent" get their mask
logits replaced by :data:`REJECTED_LOGIT` for every foreground channel (and 0 for the
background channel when K >= 2), so their foreground probabilities are exactly 0.

Output dict (axes N x K x H x W for every map; the output has the input's size):

* eval: ``{"mask": logits}``, the pruned level's head, gated by the CGM.
* training (always the full grid, never gated): ``"mask"`` (``o4``), ``"deep_supervision"``
  (``[o1, o2, o3, o5, o6, o7, o8]``), and with the CGM ``"classification"`` (N x 2 logits of the
  CGM that gates the full model) and ``"classification_pruned"`` (a list of N x 2 logits of the
  other CGMs, shallowest first; empty with one CGM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .base import SegmentationNetwork
from .registry import register_network
from .spec import HEAD_CLASSIFICATION, HEAD_DEEP_SUPERVISION, HEAD_MASK, ModelSpec

__all__ = [
    "UNetSharpConfig",
    "UNetSharp",
    "VGGBlock",
    "ClassificationGuide",
    "node_in_channels",
    "cgm_gate",
    "official_order",
    "REJECTED_LOGIT",
    "DEPTH",
    "OFFICIAL_OUTPUT_ORDER",
    "build",
]

#: Number of poolings; the grid has anti-diagonals 1..DEPTH and five widths.
DEPTH = 4

#: Logit given to every foreground channel of an image the CGM rejects (sigmoid -> 0 exactly
#: in float32/bfloat16, softmax against a background logit of 0 -> 0 exactly).
REJECTED_LOGIT = -1.0e4

#: Names of the heads in the official return order (the final output ``o4`` is last).
OFFICIAL_OUTPUT_ORDER = ("o1", "o2", "o3", "o5", "o6", "o7", "o8", "o4")

# Full-scale heads: head name -> (source node (i, j), upsampling factor).
_FULL_SCALE_HEADS = {"o5": ((4, 0), 16), "o6": ((3, 1), 8), "o7": ((2, 2), 4), "o8": ((1, 3), 2)}


@dataclass(frozen=True)
class UNetSharpConfig:
    """Settings of a UNet# network.

    Attributes:
        variant: ``"tiny"``, ``"lite"`` or ``"paper"``.
        in_channels: image channels.
        num_classes: K output channels (1 = one sigmoid logit, else softmax logits).
        widths: the five node widths ``nb[0..4]`` (paper: 32, 64, 128, 256, 512).
        deep_supervision: build all eight heads (needed for pruning); else only ``o4``.
        prune_level: depth 1..4 the model runs at in eval mode (4 = full); training always runs
            the full grid. Changeable at run time through ``model.prune_level``.
        cgm: build the classification-guided module(s).
        cgm_depths: encoder depths ``d`` (0..4) whose node ``X^{d,0}`` gets a CGM. A model at
            level ``l`` is gated by the CGM at the deepest ``d <= l`` (none if there is none).
            The default ``(2, 4)`` reads the paper's "two CGMs" as one on ``X^{4,0}`` for the
            full model and one on ``X^{2,0}`` that pruned levels 2 and 3 still compute.
        cgm_dropout: dropout probability before the CGM's 1x1 conv (UNet3+: 0.5).
        cgm_loss_weight: weight of the CGMs' classification loss next to the segmentation loss.
    """

    variant: str = "lite"
    in_channels: int = 1
    num_classes: int = 2
    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    deep_supervision: bool = True
    prune_level: int = DEPTH
    cgm: bool = True
    cgm_depths: tuple[int, ...] = (2, 4)
    cgm_dropout: float = 0.5
    cgm_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if len(self.widths) != DEPTH + 1 or min(self.widths) < 1:
            raise ConfigError(
                f"UNet# needs {DEPTH + 1} positive widths, got {tuple(self.widths)}."
            )
        if self.in_channels < 1 or self.num_classes < 1:
            raise ConfigError("UNet# needs at least one input channel and one output class.")
        _check_prune_level(self.prune_level, self.deep_supervision)
        if self.cgm and (
            not self.cgm_depths or any(not 0 <= d <= DEPTH for d in self.cgm_depths)
        ):
            raise ConfigError(
                f"UNet# CGM depths must be between 0 and {DEPTH}, got {tuple(self.cgm_depths)}."
            )
        if not 0.0 <= self.cgm_dropout < 1.0:
            raise ConfigError(f"UNet# CGM dropout must be in [0, 1), got {self.cgm_dropout}.")


def _check_prune_level(level: int, deep_supervision: bool) -> None:
    if not isinstance(level, int) or not 1 <= level <= DEPTH:
        raise ConfigError(f"UNet# prune level must be an integer from 1 to {DEPTH}, got {level!r}.")
    if level < DEPTH and not deep_supervision:
        raise ConfigError(
            "UNet# can be pruned only with deep supervision (its shallow heads exist only then)."
        )


def node_in_channels(widths: tuple[int, ...], i: int, j: int, in_channels: int) -> int:
    """Input channels of node ``X^{i,j}``.

    ``X^{0,0}`` takes the image, ``X^{i,0}`` the pooled ``X^{i-1,0}``, and a decoder node
    ``j * nb[i] + sum_{k=1..j} nb[i+k]``.
    """
    if j == 0:
        return in_channels if i == 0 else widths[i - 1]
    return j * widths[i] + sum(widths[i + k] for k in range(1, j + 1))


def _up(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize (align_corners=True) of N x C x h x w to ``size``."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class VGGBlock(nn.Module):
    """``H(.)``: conv3x3 (bias), BN, ReLU, conv3x3 (bias), BN, ReLU; N x C_in x H x W -> N x C_out."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))


class ClassificationGuide(nn.Module):
    """The CGM: Dropout, Conv1x1(C -> 2, bias), global max pool; N x C x h x w -> N x 2 logits.

    Column 1 is "target present"; ``sigmoid`` of the logits gives UNet3+'s scores ``s``.
    """

    def __init__(self, channels: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.conv = nn.Conv2d(channels, 2, 1)

    def forward(self, feature: Tensor) -> Tensor:
        return torch.amax(self.conv(self.dropout(feature)), dim=(-2, -1))


def cgm_gate(mask_logits: Tensor, cls_logits: Tensor) -> Tensor:
    """Suppress the foreground of images the CGM rejects (inference only).

    An image is kept when ``argmax(cls_logits) == 1``. A rejected image's logits become
    :data:`REJECTED_LOGIT` on every foreground channel (the single channel when K == 1) and 0 on
    the background channel (K >= 2), so its foreground probabilities are exactly 0.

    Args:
        mask_logits: N x K x H x W.
        cls_logits: N x 2.

    Returns:
        N x K x H x W logits.
    """
    keep = (cls_logits.argmax(dim=1) == 1)[:, None, None, None]
    k = mask_logits.shape[1]
    fill = torch.full((1, k, 1, 1), REJECTED_LOGIT, dtype=mask_logits.dtype,
                      device=mask_logits.device)
    if k > 1:
        fill[:, 0] = 0.0
    return torch.where(keep, mask_logits, fill)


def official_order(outputs: dict[str, Tensor | list[Tensor]]) -> list[Tensor]:
    """A training-mode output dict as the official list ``[o1, o2, o3, o5, o6, o7, o8, o4]``."""
    return [*outputs[HEAD_DEEP_SUPERVISION], outputs[HEAD_MASK]]


class UNetSharp(SegmentationNetwork):
    """UNet# with eight deep-supervision heads, pruning and classification-guided modules.

    Args:
        config: the frozen settings.

    Submodules:
        ``nodes["x{i}_{j}"]``: the 15 VGG blocks; ``heads["o1".."o8"]`` (only ``"o4"`` without
        deep supervision); ``cgm["x{d}_0"]`` per CGM depth.
    """

    def __init__(self, config: UNetSharpConfig) -> None:
        super().__init__()
        self.config = config
        nb = tuple(config.widths)
        k = config.num_classes
        self.pool = nn.MaxPool2d(2, 2)
        self.nodes = nn.ModuleDict()
        for d in range(DEPTH + 1):  # build in computation order: anti-diagonal d
            for j in range(d + 1):
                i = d - j
                self.nodes[f"x{i}_{j}"] = VGGBlock(
                    node_in_channels(nb, i, j, config.in_channels), nb[i]
                )
        self.heads = nn.ModuleDict()
        if config.deep_supervision:
            for j in range(1, DEPTH + 1):
                self.heads[f"o{j}"] = nn.Conv2d(nb[0], k, 1)
            for name, ((i, _), _) in _FULL_SCALE_HEADS.items():
                self.heads[name] = nn.Conv2d(nb[i], k, 3, padding=1)
        else:
            self.heads["o4"] = nn.Conv2d(nb[0], k, 1)
        self.cgm = nn.ModuleDict()
        depths = tuple(sorted(set(config.cgm_depths))) if config.cgm else ()
        for d in depths:
            self.cgm[f"x{d}_0"] = ClassificationGuide(nb[d], config.cgm_dropout)
        self._cgm_depths = depths
        self._prune_level = config.prune_level

        train_outputs: tuple[str, ...] = ()
        if config.deep_supervision:
            train_outputs += (HEAD_DEEP_SUPERVISION,)
        if depths:
            train_outputs += (HEAD_CLASSIFICATION,)
        self.spec = ModelSpec(
            network="unet_sharp",
            variant=config.variant,
            in_channels=config.in_channels,
            num_classes=k,
            divisor=2**DEPTH,
            min_size=2**DEPTH,
            output_scale=1,
            heads=(HEAD_MASK,),
            train_outputs=train_outputs,
            loss="unet_sharp",
            encoder_prefixes=tuple(f"nodes.x{i}_0." for i in range(DEPTH + 1)),
            preferred_tile=256,
            extra={
                "official_output_order": OFFICIAL_OUTPUT_ORDER,
                "cgm_depths": depths,
                "cgm_loss_weight": config.cgm_loss_weight,
                "rejected_logit": REJECTED_LOGIT,
            },
        )

    # ------------------------------------------------------------------ pruning

    @property
    def prune_level(self) -> int:
        """Depth 1..4 the model runs at in eval mode (4 = the full grid)."""
        return self._prune_level

    @prune_level.setter
    def prune_level(self, level: int) -> None:
        _check_prune_level(level, self.config.deep_supervision)
        self._prune_level = level

    def gating_depth(self, level: int | None = None) -> int | None:
        """Depth of the CGM that gates a model at ``level`` (default: the current level)."""
        level = self._prune_level if level is None else level
        usable = [d for d in self._cgm_depths if d <= level]
        return usable[-1] if usable else None

    # ------------------------------------------------------------------ forward

    def grid(self, x: Tensor, level: int = DEPTH) -> dict[tuple[int, int], Tensor]:
        """The node outputs of anti-diagonals 0..``level``.

        Args:
            x: N x C x H x W image batch.
            level: last anti-diagonal ``i + j`` to compute.

        Returns:
            ``(i, j) -> X^{i,j}`` of shape N x nb[i] x H/2**i x W/2**i.
        """
        nodes: dict[tuple[int, int], Tensor] = {(0, 0): self.nodes["x0_0"](x)}
        for d in range(1, level + 1):
            nodes[(d, 0)] = self.nodes[f"x{d}_0"](self.pool(nodes[(d - 1, 0)]))
            for j in range(1, d + 1):
                i = d - j
                size = nodes[(i, 0)].shape[-2:]
                parts = [nodes[(i, c)] for c in range(j)]
                parts += [_up(nodes[(i + s, j - s)], size) for s in range(1, j + 1)]
                nodes[(i, j)] = self.nodes[f"x{i}_{j}"](torch.cat(parts, dim=1))
        return nodes

    def _head(self, name: str, nodes: dict[tuple[int, int], Tensor]) -> Tensor:
        if name in _FULL_SCALE_HEADS:
            src, _ = _FULL_SCALE_HEADS[name]
            return _up(self.heads[name](nodes[src]), nodes[(0, 0)].shape[-2:])
        return self.heads[name](nodes[(0, int(name[1:]))])

    def official_outputs(self, x: Tensor) -> list[Tensor]:
        """All heads of the full grid in the official order, never gated (any mode).

        Args:
            x: N x C x H x W.

        Returns:
            ``[o1, o2, o3, o5, o6, o7, o8, o4]`` with deep supervision, else ``[o4]``; each
            N x K x H x W logits.
        """
        self._check_batch(x, "UNet#", multiple_of=self.spec.divisor)
        nodes = self.grid(x, DEPTH)
        return [self._head(n, nodes) for n in OFFICIAL_OUTPUT_ORDER if n in self.heads]

    def forward(self, x: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """Segment a batch.

        Args:
            x: N x C x H x W, H and W divisible by 16.

        Returns:
            eval: ``{"mask": N x K x H x W logits}`` of the pruned level, CGM-gated.
            training: also ``"deep_supervision"`` and ``"classification"`` (see the module doc).
        """
        self._check_batch(x, "UNet#", multiple_of=self.spec.divisor)
        if self.training:
            nodes = self.grid(x, DEPTH)
            out: dict[str, Tensor | list[Tensor]] = {HEAD_MASK: self._head("o4", nodes)}
            if self.config.deep_supervision:
                out[HEAD_DEEP_SUPERVISION] = [
                    self._head(n, nodes) for n in OFFICIAL_OUTPUT_ORDER[:-1]
                ]
            if self._cgm_depths:
                logits = [self.cgm[f"x{d}_0"](nodes[(d, 0)]) for d in self._cgm_depths]
                out[HEAD_CLASSIFICATION] = logits[-1]
                out["classification_pruned"] = logits[:-1]
            return out
        level = self._prune_level
        nodes = self.grid(x, level)
        mask = self._head(f"o{level}", nodes)
        depth = self.gating_depth(level)
        if depth is not None:
            mask = cgm_gate(mask, self.cgm[f"x{depth}_0"](nodes[(depth, 0)]))
        return {HEAD_MASK: mask}


@register_network(
    "unet_sharp",
    config_cls=UNetSharpConfig,
    variants={
        "tiny": {"widths": (4, 8, 16, 32, 64)},
        "lite": {"widths": (16, 32, 64, 128, 256)},
        "paper": {"widths": (32, 64, 128, 256, 512)},
    },
    summary="UNet#: nested grid with dense + full-scale skips, 8 deep-supervision heads, "
    "pruning to depth 1-4, classification-guided module",
)
def build(config: UNetSharpConfig) -> UNetSharp:
    """Build a randomly initialised (PyTorch default init) UNet# from ``config``."""
    return UNetSharp(config)
