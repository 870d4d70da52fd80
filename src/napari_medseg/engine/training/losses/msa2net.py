"""MSA²Net's official loss: the boundary Difference-over-Union (spec 1.12)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ....models.spec import ModelSpec
from .common import probabilities
from .registry import register_loss

__all__ = ["boundary_dou_loss", "msa2net_loss"]


def boundary_dou_loss(
    logits: Tensor,
    mask: Tensor,
    valid: Tensor | None = None,
    eps: float = 1e-5,
    alpha_max: float = 0.8,
) -> Tensor:
    """Boundary Difference-over-Union loss, MSA²Net's official training loss (spec 1.12).

    With p the softmax probabilities (sigmoid -> [1 - p, p] for K == 1) and t the one-hot
    target, for every class c (background included), with sums over the whole batch:

    * C_c = number of boundary pixels of t_c (target pixels whose 4-neighbour cross
      [[0,1,0],[1,1,1],[0,1,0]], zero-padded, is not entirely inside the target), S_c = number
      of target pixels; alpha = min(2 (1 - (C_c + eps) / (S_c + eps)) - 1, alpha_max);
    * loss_c = (sum p^2 + sum t^2 - 2 sum pt + eps) / (sum p^2 + sum t^2 - (1 + alpha) sum pt + eps).

    The loss is the mean of loss_c over the classes. ``valid`` weights every sum and count
    (boundaries are found on the full target, so a mask edge at a region border is not one).

    Args:
        logits: N x K x H x W.
        mask: N x H x W class indices (0/1 for K == 1).
        valid: N x H x W pixel weights (1 = counts), or None.
        eps: smoothing of the official code.
        alpha_max: upper clip of alpha.
    """
    p = probabilities(logits)
    n, k, h, w = p.shape
    t = F.one_hot(mask.long().clamp(0, k - 1), k).permute(0, 3, 1, 2).float()
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], device=t.device)
    counts = F.conv2d(t.reshape(n * k, 1, h, w), cross[None, None], padding=1).view(n, k, h, w)
    counts = counts * t
    boundary = ((counts > 0.5) & (counts < 4.5)).float()
    weight = torch.ones_like(t[:, :1]) if valid is None else valid.float()[:, None]
    dims = (0, 2, 3)
    c_count = (boundary * weight).sum(dims)
    s_count = (t * weight).sum(dims)
    alpha = (2.0 * (1.0 - (c_count + eps) / (s_count + eps)) - 1.0).clamp(max=alpha_max)
    inter = (p * t * weight).sum(dims)
    p_sq = (p * p * weight).sum(dims)
    t_sq = (t * t * weight).sum(dims)
    per_class = (p_sq + t_sq - 2.0 * inter + eps) / (p_sq + t_sq - (1.0 + alpha) * inter + eps)
    return per_class.mean()


@register_loss("msa2net")
def msa2net_loss(
    outputs: dict[str, Any], targets: dict[str, Tensor], spec: ModelSpec
) -> tuple[Tensor, dict[str, float]]:
    """MSA²Net's official loss: :func:`boundary_dou_loss` on the mask logits only.

    (The config field ``loss="dice_ce"`` of MSA²Net selects the generic ``dice_ce`` instead.)
    ``targets["valid"]`` weights the pixels.
    """
    mask = targets["mask"]
    valid = targets.get("valid")
    total = boundary_dou_loss(outputs["mask"], mask, None if valid is None else valid.float())
    return total, {"loss": float(total.detach()), "boundary_dou": float(total.detach())}
