"""Building blocks shared by the networks' losses: cross-entropy, probabilities, soft Dice.

Also the generic ``dice_ce`` loss (0.5 Dice + 0.5 CE on the main and deep-supervision outputs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ....models.spec import ModelSpec
from .registry import register_loss

__all__ = [
    "cross_entropy",
    "probabilities",
    "foreground_probabilities",
    "soft_dice_loss",
    "dice_ce_loss",
    "loss_parts",
]


def _valid(targets: dict[str, Tensor], like: Tensor) -> Tensor:
    valid = targets.get("valid")
    if valid is None:
        return torch.ones_like(like, dtype=torch.float32)
    return valid.to(torch.float32)


def cross_entropy(logits: Tensor, mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean cross-entropy over valid pixels; K == 1 logits use binary cross-entropy.

    Args:
        logits: N x K x H x W.
        mask: N x H x W class indices.
        valid: N x H x W weights (1 = counts), or None.
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        per_pixel = F.binary_cross_entropy_with_logits(
            logits[:, 0], mask.float(), reduction="none"
        )
    else:
        per_pixel = F.cross_entropy(logits, mask.long(), reduction="none")
    if valid is None:
        return per_pixel.mean()
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1.0)


def probabilities(logits: Tensor) -> Tensor:
    """Class probabilities N x K' x H x W (K' = 2 for a single sigmoid logit)."""
    logits = logits.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def loss_parts(total: Tensor, **terms: Tensor) -> dict[str, float]:
    """The logged components of a loss: ``{"loss": total, <term>: value ...}`` as floats."""
    return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}}


def foreground_probabilities(logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The foreground probabilities and their one-hot targets, both N x K' x (spatial) float.

    K == 1: the sigmoid of the single logit against ``mask > 0`` (K' = 1). K >= 2: the softmax
    of the foreground classes 1..K-1 against their one-hot targets (K' = K - 1).

    Args:
        logits: N x K x (spatial).
        mask: N x (spatial) class indices (0/1 for K == 1).
    """
    z = logits.float()
    k = z.shape[1]
    if k == 1:
        return torch.sigmoid(z), (mask > 0).float()[:, None]
    onehot = F.one_hot(mask.long().clamp(0, k - 1), k).movedim(-1, 1).float()
    return torch.softmax(z, dim=1)[:, 1:], onehot[:, 1:]


def soft_dice_loss(
    logits: Tensor,
    mask: Tensor,
    valid: Tensor | None = None,
    smooth: float = 1.0,
    include_background: bool = False,
) -> Tensor:
    """1 - mean soft Dice over the foreground classes, summed over the batch.

    Args:
        logits: N x K x H x W.
        mask: N x H x W class indices.
        valid: N x H x W weights, or None.
    """
    p = probabilities(logits)
    k = p.shape[1]
    onehot = F.one_hot(mask.long().clamp(0, k - 1), k).permute(0, 3, 1, 2).float()
    if valid is not None:
        p = p * valid[:, None]
        onehot = onehot * valid[:, None]
    start = 0 if include_background else 1
    inter = (p * onehot).sum(dim=(0, 2, 3))[start:]
    denom = (p.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3)))[start:]
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1 - dice.mean()


@register_loss("dice_ce")
def dice_ce_loss(
    outputs: dict[str, Any], targets: dict[str, Tensor], spec: ModelSpec
) -> tuple[Tensor, dict[str, float]]:
    """Generic 0.5 Dice + 0.5 CE on the main mask and any deep-supervision outputs."""
    mask = targets["mask"]
    valid = _valid(targets, mask)
    maps = [outputs["mask"], *outputs.get("deep_supervision", [])]
    total = torch.zeros((), device=mask.device)
    for logits in maps:
        total = total + 0.5 * soft_dice_loss(logits, mask, valid) + 0.5 * cross_entropy(
            logits, mask, valid
        )
    return total, {"loss": float(total.detach())}
