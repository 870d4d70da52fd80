"""MASAG: the Multi-Scale Adaptive Spatial Attention Gate of MSA²Net (BMVC 2024).

MASAG fuses an encoder skip ``x`` with the decoder feature ``g`` of the same size. It builds a
*local* context of ``x`` (depthwise 3×3 then a dense dilated 3×3 and a 1×1 conv) and a *global*
context of ``g`` (channel mean and max, mixed by a 1×1 conv), lets their sum choose, per pixel,
how much to amplify ``x`` versus ``g`` (a two-way softmax), multiplies the two amplified maps
with each other's sigmoid gate and uses the result to recalibrate ``x``.

In the notation of ``/work/shared/specs/msa2net_sa2net.md`` section 1.6 (σ = sigmoid,
⊙ = element-wise product)::

    L      = BN(W3 ∗ ReLU(BN(D2 ∗ ReLU(BN(DW1 ∗ x)))))
    Γ      = BN(w · [mean_c(g); max_c(g)] + β)
    (a, b) = softmax_2(Ws ∗ BN(L + Γ))
    x′     = (1 + a) ⊙ x,   g′ = (1 + b) ⊙ g
    I      = σ(g′) ⊙ σ(x′) ⊙ x′ ⊙ g′
    MASAG  = BN(Wo ∗ (σ(BN(Wr ∗ I)) ⊙ x))

Every tensor is N×C×H×W. All convolutions have a bias; every BN is a default BatchNorm2d.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MASAG"]


class MASAG(nn.Module):
    """Multi-scale adaptive spatial attention gate (spec 1.6).

    Args:
        channels: C, the width of both the skip ``x`` and the decoder feature ``g``.

    Shapes:
        x, g: N×C×H×W. Output: N×C×H×W.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = int(channels)
        self.channels = c
        # 1. local context of x: DW 3x3 -> BN -> ReLU -> dense dilated 3x3 -> BN -> ReLU
        #    -> 1x1 -> BN
        self.local_dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.local_dw_norm = nn.BatchNorm2d(c)
        self.local_dilated = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        self.local_dilated_norm = nn.BatchNorm2d(c)
        self.local_pw = nn.Conv2d(c, c, 1)
        self.local_pw_norm = nn.BatchNorm2d(c)
        # 2. global context of g: [mean_c; max_c] -> 1x1 conv 2->1 -> BN(1)
        self.global_conv = nn.Conv2d(2, 1, 1)
        self.global_norm = nn.BatchNorm2d(1)
        # 3. fusion BN and 4. spatial selection (two maps, softmax over them)
        self.fuse_norm = nn.BatchNorm2d(c)
        self.select = nn.Conv2d(c, 2, 1)
        # 7. recalibration and output projection
        self.recal_conv = nn.Conv2d(c, c, 1)
        self.recal_norm = nn.BatchNorm2d(c)
        self.out_conv = nn.Conv2d(c, c, 1)
        self.out_norm = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def local_context(self, x: Tensor) -> Tensor:
        """L, the multi-scale local context of the skip (N×C×H×W)."""
        y = self.act(self.local_dw_norm(self.local_dw(x)))
        y = self.act(self.local_dilated_norm(self.local_dilated(y)))
        return self.local_pw_norm(self.local_pw(y))

    def global_context(self, g: Tensor) -> Tensor:
        """Γ, one map from the channel mean and max of the decoder feature (N×1×H×W)."""
        stats = torch.cat([g.mean(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)], dim=1)
        return self.global_norm(self.global_conv(stats))

    def selection(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """The per-pixel weights (a, b), each N×1×H×W, with a + b = 1."""
        fused = self.fuse_norm(self.local_context(x) + self.global_context(g))
        weights = torch.softmax(self.select(fused), dim=1)
        return weights[:, 0:1], weights[:, 1:2]

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        """Gate the skip ``x`` (N×C×H×W) with the decoder feature ``g`` (N×C×H×W)."""
        a, b = self.selection(x, g)
        x_amp = x + a * x
        g_amp = g + b * g
        interaction = (x_amp * torch.sigmoid(g_amp)) * (g_amp * torch.sigmoid(x_amp))
        recal = torch.sigmoid(self.recal_norm(self.recal_conv(interaction)))
        return self.out_norm(self.out_conv(recal * x))
