"""SA²-Net's official losses: weighted Dice + balanced BCE (one class), Dice + CE (more)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ....models.spec import ModelSpec
from .common import cross_entropy
from .registry import register_loss

__all__ = ["sa2net_weighted_dice_bce", "sa2net_dice_ce", "sa2net_loss"]


def sa2net_weighted_dice_bce(
    output: Tensor, mask: Tensor, valid: Tensor | None = None, *, is_probability: bool = False
) -> Tensor:
    """SA²-Net's MoNuSeg/GlaS loss for one class: 0.5 weighted Dice + 0.5 balanced BCE.

    BCE: per-pixel binary cross-entropy, averaged separately over the positive and the negative
    pixels of the whole batch, combined 0.5/0.5. Dice: per sample, with p and t scaled by 0.5,
    1 - (2 sum(pt) + 1e-5) / (sum(p^2) + sum(t^2) + 1e-5), averaged over the batch. The
    official code feeds probabilities from an in-model sigmoid; here the BCE is computed from
    logits (stable under large logits and mixed precision) and Dice from their sigmoid.

    Args:
        output: N x 1 x H x W logits (probabilities if ``is_probability``).
        mask: N x H x W, 1 = foreground.
        valid: N x H x W pixel weights (1 = counts), or None.
        is_probability: ``output`` already holds probabilities (the official in-model sigmoid).
    """
    out = output.float()[:, 0]
    t = (mask > 0).float()
    w = torch.ones_like(t) if valid is None else valid.float()
    if is_probability:
        p = out.clamp(0.0, 1.0)
        bce = F.binary_cross_entropy(p, t, reduction="none")
    else:
        p = torch.sigmoid(out)
        bce = F.binary_cross_entropy_with_logits(out, t, reduction="none")
    pos, neg = t * w, (1.0 - t) * w
    wbce = 0.5 * (bce * pos).sum() / (pos.sum().detach() + 1e-12) + 0.5 * (bce * neg).sum() / (
        neg.sum().detach() + 1e-12
    )
    pw, tw = 0.5 * p * w, 0.5 * t * w
    inter = (pw * tw).flatten(1).sum(1)
    union = pw.pow(2).flatten(1).sum(1) + tw.pow(2).flatten(1).sum(1)
    wdice = (1.0 - (2.0 * inter + 1e-5) / (union + 1e-5)).mean()
    return 0.5 * wdice + 0.5 * wbce


def sa2net_dice_ce(logits: Tensor, mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """SA²-Net's ISIC/SegPC loss for K >= 2: 0.5 softmax Dice + 0.5 cross-entropy.

    Dice = 1 - mean over all K classes (background included) of
    2 sum_{n,h,w}(p t) / (sum p + sum t + 1e-6), p = softmax(logits), t = one-hot target.

    Args:
        logits: N x K x H x W.
        mask: N x H x W class indices.
        valid: N x H x W pixel weights (1 = counts), or None.
    """
    k = logits.shape[1]
    p = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(mask.long().clamp(0, k - 1), k).permute(0, 3, 1, 2).float()
    if valid is not None:
        p = p * valid.float()[:, None]
        onehot = onehot * valid.float()[:, None]
    inter = (p * onehot).sum(dim=(0, 2, 3))
    denom = p.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    dice = 1.0 - (2.0 * inter / (denom + 1e-6)).mean()
    return 0.5 * dice + 0.5 * cross_entropy(logits, mask.long().clamp(0, k - 1), valid)


@register_loss("sa2net")
def sa2net_loss(
    outputs: dict[str, Any], targets: dict[str, Tensor], spec: ModelSpec
) -> tuple[Tensor, dict[str, float]]:
    """SA²-Net's official loss, summed with weight 1 over the main and deep-supervision outputs.

    K == 1: :func:`sa2net_weighted_dice_bce` (MoNuSeg/GlaS recipe); K >= 2:
    :func:`sa2net_dice_ce` (ISIC 2018/SegPC recipe). ``targets["valid"]`` weights the pixels.
    """
    mask = targets["mask"]
    valid = targets.get("valid")
    is_probability = bool(spec.extra.get("mask_is_probability", False))
    maps = [outputs["mask"], *outputs.get("deep_supervision", [])]
    total = torch.zeros((), device=mask.device)
    parts: dict[str, float] = {}
    for i, out in enumerate(maps):
        if out.shape[1] == 1:
            term = sa2net_weighted_dice_bce(out, mask, valid, is_probability=is_probability)
        else:
            term = sa2net_dice_ce(out, mask, valid)
        total = total + term
        parts["loss_main" if i == 0 else f"loss_ds{i}"] = float(term.detach())
    parts["loss"] = float(total.detach())
    return total, parts
