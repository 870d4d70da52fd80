"""Training losses, one per network as its official training used it, selected by ``spec.loss``.

Every loss takes the network's output dict (training mode) and a targets dict and returns
``(total, parts)``: a scalar tensor and a dict of float components for logging.

Targets:
    ``"mask"``: LongTensor N x H x W of class indices (0/1 for K == 1), at the output resolution.
    ``"valid"`` (optional): float N x H x W, 1 where a pixel counts (fine-tuning regions, padding).
    ``"boundary"`` (optional): float N x H x W; derived from ``"mask"`` when absent.
    ``"image"``: the network input N x C x H x W (networks that reconstruct it).
    ``"image_hr"`` (optional): the high-resolution image N x C x H' x W' (super-resolution).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.spec import ModelSpec

__all__ = [
    "LossFn",
    "register_loss",
    "get_loss",
    "compute_loss",
    "list_losses",
    "soft_dice_loss",
    "cross_entropy",
    "dice_ce_loss",
]

LossFn = Callable[[dict[str, Any], dict[str, Tensor], ModelSpec], tuple[Tensor, dict[str, float]]]

_LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator registering a loss under ``name`` (the value of ``ModelSpec.loss``)."""

    def decorator(fn: LossFn) -> LossFn:
        _LOSSES[name] = fn
        return fn

    return decorator


def list_losses() -> list[str]:
    """Names of the registered losses."""
    return sorted(_LOSSES)


def get_loss(name: str) -> LossFn:
    """The loss registered as ``name``."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise KeyError(f"Unknown loss {name!r}; known: {', '.join(list_losses())}.") from None


def compute_loss(
    outputs: dict[str, Any], targets: dict[str, Tensor], spec: ModelSpec
) -> tuple[Tensor, dict[str, float]]:
    """The network's own training loss (``spec.loss``) on a training-mode output dict."""
    return get_loss(spec.loss)(outputs, targets, spec)


# --------------------------------------------------------------------------- building blocks


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


# Network-specific losses follow; each network's helper adds its own below its marker.
# --- sa2net loss ---
# --- unet_sharp loss ---
# --- banet loss ---
# --- msa2net loss ---
# --- sasrnet loss ---
