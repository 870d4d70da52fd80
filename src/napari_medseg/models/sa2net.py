"""SA²-Net: scale-aware attention on the skips and adaptive up-attention (BMVC 2023).

A from-scratch CNN U-Net (base width ``c``) with two additions:

* the **SA² module** on the skip connections: four encoder levels are resampled to the
  stride-4 grid, each goes through its own *local* gated multi-kernel FFN, all four are fused
  into one spatial query map plus one gate per scale (*global* cross-scale attention), each
  gated map is sent back to its native size with a residual, refined by a conv-MLP and
  projected to the decoder width of its level;
* **AuA** (adaptive up-attention) decoder stages: the nearest-upsampled decoder feature only
  produces a one-channel attention map ψ over a depthwise-filtered skip (no concatenation).

Four 1×1 heads (main + three deep-supervision heads) all at full resolution. The network
always returns logits; ``output_sigmoid=True`` reproduces the official in-model sigmoid for
``num_classes == 1`` (reproduction only: the engine expects logits).

Re-implemented from ``/work/shared/specs/msa2net_sa2net.md`` section 2 without the modules
the official code builds but never runs (``Multi_scale_Fuse``, the AuA ``weight`` branch,
unused depthwise convs). See ``models/sa2net.md``.

Every tensor below is N×C×H×W unless stated otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputShapeError
from .base import SegmentationNetwork
from .layers import ChannelLayerNorm, ConvBNReLU
from .registry import register_network
from .spec import HEAD_DEEP_SUPERVISION, HEAD_MASK

__all__ = [
    "SA2NetConfig",
    "DownBlock",
    "LocalScaleAttention",
    "RefineMLP",
    "SA2Module",
    "AdaptiveUpAttention",
    "UpStage",
    "SA2Net",
    "resize_to",
    "build_sa2net",
]

#: Input sides must be multiples of this (four 2× max-pools).
DIVISOR = 16
#: Index of the SA² reference scale (F₃, stride 4) among the four skip inputs.
REFERENCE_SCALE = 2
#: Parameter-name prefixes of the U-Net encoder.
ENCODER_PREFIXES = ("inc.", "down1.", "down2.", "down3.", "down4.")


@dataclass(frozen=True)
class SA2NetConfig:
    """Settings of SA²-Net. The defaults are the published (paper) configuration.

    Attributes:
        variant: ``"tiny"``, ``"lite"`` or ``"paper"``.
        in_channels: image channels.
        num_classes: K (1 = one sigmoid logit).
        base_channels: c, the width of the first encoder level; the encoder widths are
            c, 2c, 4c, 8c, 8c and the SA² module works at width c.
        ffn_expansion: hidden width of the local gated FFN as a multiple of c (its 1×1
            expansion produces twice that, 4c for the official 2).
        mlp_ratio: expansion of the SA² refine MLP.
        up_kernel: kernel of the depthwise conv on the upsampled decoder feature in AuA.
        output_sigmoid: apply the official in-model sigmoid when ``num_classes == 1`` (all
            outputs become probabilities). Only for reproducing the original; the engine and
            the default loss path expect logits.
    """

    variant: str = "paper"
    in_channels: int = 3
    num_classes: int = 1
    base_channels: int = 64
    ffn_expansion: int = 2
    mlp_ratio: int = 4
    up_kernel: int = 11
    output_sigmoid: bool = False


# --------------------------------------------------------------------------- small layers


def resize_to(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize (align_corners=False) of ``x`` (N×C×H×W) to ``size`` (H', W').

    Returns ``x`` itself when it already has that size (an identity-sized resample is a
    no-op, also numerically).
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _dw(channels: int, kernel: int) -> nn.Conv2d:
    """Depthwise conv with bias and 'same' padding."""
    return nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)


class DownBlock(nn.Sequential):
    """2×2 max-pool → two conv-BN-ReLU (halves H and W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.MaxPool2d(2),
            ConvBNReLU(in_channels, out_channels),
            ConvBNReLU(out_channels, out_channels),
        )


# --------------------------------------------------------------------------- SA² module


class LocalScaleAttention(nn.Module):
    """Local (per-scale) attention: a gated multi-kernel FFN.

    u = 1×1(c→2h); A₃ = ReLU(DW3×3 u), A₅ = ReLU(DW5×5 u); with (a, b) the two channel
    halves, L = 1×1(2h→c)([a₃·σ(a₅); b₃·σ(b₅)]). h = ``expansion``·c.

    Args:
        channels: c.
        expansion: h / c.
    """

    def __init__(self, channels: int, expansion: int = 2) -> None:
        super().__init__()
        hidden = channels * expansion
        self.expand = nn.Conv2d(channels, 2 * hidden, 1)
        self.dw3 = _dw(2 * hidden, 3)
        self.dw5 = _dw(2 * hidden, 5)
        self.reduce = nn.Conv2d(2 * hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (N×c×H×W) → L (N×c×H×W)."""
        u = self.expand(x)
        a3, b3 = F.relu(self.dw3(u)).chunk(2, dim=1)
        a5, b5 = F.relu(self.dw5(u)).chunk(2, dim=1)
        return self.reduce(torch.cat([a3 * torch.sigmoid(a5), b3 * torch.sigmoid(b5)], dim=1))


class RefineMLP(nn.Module):
    """Refine step of SA²: M = y + 1×1(GELU(1×1(n + GELU(DW3×3 n)))), n = LN(y).

    Args:
        channels: c.
        ratio: hidden expansion of the MLP.
    """

    def __init__(self, channels: int, ratio: int = 4) -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(channels, eps=1e-6)
        self.dw = _dw(channels, 3)
        self.fc1 = nn.Conv2d(channels, channels * ratio, 1)
        self.fc2 = nn.Conv2d(channels * ratio, channels, 1)

    def forward(self, y: Tensor) -> Tensor:
        """``y`` (N×c×H×W) → M (N×c×H×W)."""
        n = self.norm(y)
        n = n + F.gelu(self.dw(n))
        return y + self.fc2(F.gelu(self.fc1(n)))


class SA2Module(nn.Module):
    """Scale-aware attention over the four skips F₁…F₄ (strides 1, 2, 4, 8; c channels each).

    1. resample every F_i to the size of F₃ (bilinear);
    2. local attention per scale → L_i;
    3. global attention: Z = GELU(conv3×3(BN([L₁;…;L₄]))) with c + 4 channels,
       Q = GELU(DW5×5(Z[:c])), γ_i = Z[c + i]; Y_i = L_i · γ_i · Q;
    4. Y′_i = resample(Y_i → size of F_i) + F_i;
    5. M_i = refine_i(Y′_i);
    6. O_i = conv3×3(c → c·2^(i−1))(M_i).

    Args:
        channels: c.
        ffn_expansion: hidden width of the local FFN / c.
        mlp_ratio: expansion of the refine MLP.
    """

    num_scales = 4

    def __init__(self, channels: int, ffn_expansion: int = 2, mlp_ratio: int = 4) -> None:
        super().__init__()
        s = self.num_scales
        self.channels = channels
        self.local = nn.ModuleList(LocalScaleAttention(channels, ffn_expansion) for _ in range(s))
        self.fuse_norm = nn.BatchNorm2d(s * channels)
        self.fuse = nn.Conv2d(s * channels, channels + s, 3, padding=1)
        self.query = _dw(channels, 5)
        self.refine = nn.ModuleList(RefineMLP(channels, mlp_ratio) for _ in range(s))
        self.project = nn.ModuleList(
            nn.Conv2d(channels, channels * 2**i, 3, padding=1) for i in range(s)
        )

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Four skips (N×c×H_i×W_i) → four refined skips (N×c·2^(i−1)×H_i×W_i)."""
        if len(features) != self.num_scales:
            raise InputShapeError(
                f"The SA² module takes {self.num_scales} feature maps, got {len(features)}."
            )
        ref = features[REFERENCE_SCALE].shape[-2:]
        local = [
            branch(resize_to(f, ref)) for branch, f in zip(self.local, features, strict=True)
        ]
        z = F.gelu(self.fuse(self.fuse_norm(torch.cat(local, dim=1))))
        c = self.channels
        query = F.gelu(self.query(z[:, :c]))
        out = []
        for i, (f, l_i) in enumerate(zip(features, local, strict=True)):
            y = l_i * z[:, c + i : c + i + 1] * query
            y = resize_to(y, f.shape[-2:]) + f
            out.append(self.project[i](self.refine[i](y)))
        return out


# --------------------------------------------------------------------------- AuA decoder


class AdaptiveUpAttention(nn.Module):
    """AuA: the upsampled decoder feature only gates the skip through a 1-channel map ψ.

    g = nearest×2(D); ĝ = DW_k(GELU(1×1(LN(g)))); x̂ = DW5×5(x);
    ψ = σ(BN(1×1(2C→1)(GELU([ĝ; x̂])))); AuA(D, x) = conv3×3(ψ·x̂) + x.

    Args:
        channels: C (decoder feature and skip alike).
        up_kernel: k, the depthwise kernel on the upsampled decoder feature.
    """

    def __init__(self, channels: int, up_kernel: int = 11) -> None:
        super().__init__()
        self.g_norm = ChannelLayerNorm(channels, eps=1e-6)
        self.g_proj = nn.Conv2d(channels, channels, 1)
        self.g_dw = _dw(channels, up_kernel)
        self.x_dw = _dw(channels, 5)
        self.psi_conv = nn.Conv2d(2 * channels, 1, 1)
        self.psi_norm = nn.BatchNorm2d(1)
        self.out = nn.Conv2d(channels, channels, 3, padding=1)

    def gate(self, g: Tensor, x_hat: Tensor) -> Tensor:
        """ψ (N×1×H×W) from the upsampled decoder feature ``g`` and the filtered skip."""
        g_hat = self.g_dw(F.gelu(self.g_proj(self.g_norm(g))))
        a = F.gelu(torch.cat([g_hat, x_hat], dim=1))
        return torch.sigmoid(self.psi_norm(self.psi_conv(a)))

    def forward(self, d: Tensor, x: Tensor) -> Tensor:
        """``d`` (N×C×H/2×W/2 decoder feature), ``x`` (N×C×H×W skip) → N×C×H×W."""
        g = F.interpolate(d, size=x.shape[-2:], mode="nearest")
        x_hat = self.x_dw(x)
        return self.out(self.gate(g, x_hat) * x_hat) + x


class UpStage(nn.Module):
    """AuA followed by two conv-BN-ReLU (C → C_out → C_out).

    Args:
        channels: C of the decoder feature and of the skip.
        out_channels: C_out.
        up_kernel: AuA's depthwise kernel.
    """

    def __init__(self, channels: int, out_channels: int, up_kernel: int = 11) -> None:
        super().__init__()
        self.aua = AdaptiveUpAttention(channels, up_kernel)
        self.conv = nn.Sequential(
            ConvBNReLU(channels, out_channels), ConvBNReLU(out_channels, out_channels)
        )

    def forward(self, d: Tensor, x: Tensor) -> Tensor:
        """``d`` (N×C×H/2×W/2), ``x`` (N×C×H×W) → N×C_out×H×W."""
        return self.conv(self.aua(d, x))


# --------------------------------------------------------------------------- network


class SA2Net(SegmentationNetwork):
    """SA²-Net (see the module docstring).

    Eval mode returns ``{"mask": logits N×K×H×W}``; training mode also returns
    ``"deep_supervision"``: the three auxiliary heads (from decoder stages 2, 3, 4, i.e.
    strides 2, 4, 8) at full resolution, each N×K×H×W.

    Args:
        config: the frozen settings.
    """

    def __init__(self, config: SA2NetConfig) -> None:
        super().__init__()
        if config.in_channels < 1 or config.num_classes < 1 or config.base_channels < 1:
            raise InputShapeError(
                "SA²-Net needs at least 1 input channel, 1 class and a positive base width."
            )
        self.config = config
        self.spec = self._make_spec(
            "sa2net",
            divisor=DIVISOR,
            min_size=DIVISOR,
            output_scale=1,
            heads=(HEAD_MASK,),
            train_outputs=(HEAD_DEEP_SUPERVISION,),
            loss="sa2net",
            encoder_prefixes=ENCODER_PREFIXES,
            preferred_tile=256,
            extra={"mask_is_probability": config.output_sigmoid and config.num_classes == 1},
        )
        c = config.base_channels
        k = config.num_classes
        self.inc = ConvBNReLU(config.in_channels, c)
        self.down1 = DownBlock(c, 2 * c)
        self.down2 = DownBlock(2 * c, 4 * c)
        self.down3 = DownBlock(4 * c, 8 * c)
        self.down4 = DownBlock(8 * c, 8 * c)
        # Side convs bring e2..e4 to width c for SA²; e5 stays at 8c as the decoder input.
        self.side2 = nn.Conv2d(2 * c, c, 3, padding=1)
        self.side3 = nn.Conv2d(4 * c, c, 3, padding=1)
        self.side4 = nn.Conv2d(8 * c, c, 3, padding=1)
        self.side5 = nn.Conv2d(8 * c, 8 * c, 3, padding=1)
        self.sa2 = SA2Module(c, config.ffn_expansion, config.mlp_ratio)
        self.up4 = UpStage(8 * c, 4 * c, config.up_kernel)
        self.up3 = UpStage(4 * c, 2 * c, config.up_kernel)
        self.up2 = UpStage(2 * c, c, config.up_kernel)
        self.up1 = UpStage(c, c, config.up_kernel)
        self.head = nn.Conv2d(c, k, 1)
        self.head2 = nn.Conv2d(c, k, 1)
        self.head3 = nn.Conv2d(2 * c, k, 1)
        self.head4 = nn.Conv2d(4 * c, k, 1)


    def decode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Run encoder, SA² and decoder on ``x`` (N×C_in×H×W).

        Returns:
            u1 (c @ H), u2 (c @ H/2), u3 (2c @ H/4), u4 (4c @ H/8).
        """
        e1 = self.inc(x)
        e2 = self.down1(e1)
        e3 = self.down2(e2)
        e4 = self.down3(e3)
        e5 = self.down4(e4)
        k1, k2, k3, k4 = self.sa2([e1, self.side2(e2), self.side3(e3), self.side4(e4)])
        u4 = self.up4(self.side5(e5), k4)
        u3 = self.up3(u4, k3)
        u2 = self.up2(u3, k2)
        u1 = self.up1(u2, k1)
        return u1, u2, u3, u4

    def _finish(self, logits: Tensor) -> Tensor:
        if self.config.output_sigmoid and self.config.num_classes == 1:
            return torch.sigmoid(logits)
        return logits

    def forward(self, x: Tensor) -> dict[str, Any]:
        """``x`` (N×C_in×H×W, H and W multiples of 16) → dict of N×K×H×W logits."""
        self._check_batch(x, "SA²-Net", multiple_of=DIVISOR)
        u1, u2, u3, u4 = self.decode(x)
        out: dict[str, Any] = {HEAD_MASK: self._finish(self.head(u1))}
        if self.training:
            size = x.shape[-2:]
            # The official code upsamples u2..u4 bilinearly, then applies the 1×1 head. Both
            # are linear and bilinear weights sum to one, so head-then-upsample is the same
            # function at a fraction of the cost (K channels upsampled instead of c..4c).
            out[HEAD_DEEP_SUPERVISION] = [
                self._finish(resize_to(head(u), size))
                for head, u in ((self.head2, u2), (self.head3, u3), (self.head4, u4))
            ]
        return out


@register_network(
    "sa2net",
    config_cls=SA2NetConfig,
    variants={
        "tiny": {"base_channels": 8},
        "lite": {"base_channels": 16},
        "paper": {"base_channels": 64},
    },
    summary="SA²-Net (BMVC 2023): U-Net with scale-aware skip attention and AuA upsampling, "
    "4 deep-supervision heads.",
)
def build_sa2net(config: SA2NetConfig) -> SA2Net:
    """Build SA²-Net from its config."""
    return SA2Net(config)
