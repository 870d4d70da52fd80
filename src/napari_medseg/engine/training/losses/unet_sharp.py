"""UNet#'s training loss: deep-supervised BCE + Dice plus the CGMs' classification BCE."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ....models.spec import ModelSpec
from .common import foreground_probabilities
from .registry import register_loss

__all__ = ["unet_sharp_bce_dice", "unet_sharp_cgm_loss", "unet_sharp_loss"]


def unet_sharp_bce_dice(logits: Tensor, mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """UNet#'s per-output loss: 0.5 * BCE + (1 - per-image squared-denominator Dice).

    K == 1 (the official BCEDiceLoss): ``0.5 * BCEWithLogits(z, y) + 1 - mean_n[(2 sum p y +
    1e-5) / (sum p^2 + sum y^2 + 1e-5)]`` with ``p = sigmoid(z)``, sums per image. K >= 2, the
    softmax analogue: 0.5 * cross-entropy, and the same Dice with ``p = softmax(z)`` and the
    one-hot target, the foreground channels 1..K-1 flattened together per image (as the official
    code flattens all its channels). ``valid`` weights the pixels; images without a valid pixel
    are left out of the Dice mean.

    Args:
        logits: N x K x H x W.
        mask: N x H x W class indices (0/1 for K == 1).
        valid: N x H x W pixel weights (1 = counts), or None.
    """
    z = logits.float()
    k = z.shape[1]
    p, y = foreground_probabilities(z, mask)
    if k == 1:
        per_pixel = F.binary_cross_entropy_with_logits(z, y, reduction="none")[:, 0]
    else:
        per_pixel = F.cross_entropy(z, mask.long().clamp(0, k - 1), reduction="none")
    if valid is None:
        bce = per_pixel.mean()
        counted = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    else:
        w = valid.float()
        bce = (per_pixel * w).sum() / w.sum().clamp_min(1.0)
        p, y = p * w[:, None], y * w[:, None]
        counted = w.flatten(1).sum(1) > 0
    inter = (p * y).flatten(1).sum(1)
    denom = p.pow(2).flatten(1).sum(1) + y.pow(2).flatten(1).sum(1)
    dice = (2.0 * inter + 1e-5) / (denom + 1e-5)
    if bool(counted.any()):
        dice_loss = 1.0 - dice[counted].mean()
    else:
        dice_loss = dice.sum() * 0.0
    return 0.5 * bce + dice_loss


def unet_sharp_cgm_loss(cls_logits: Tensor, mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """BCE of a CGM's N x 2 logits against "the image has any foreground" (one-hot 2-vector).

    With ``valid``: an image is positive when a valid pixel is foreground; it is a known negative
    only when every pixel is valid and none is foreground. Any other image (partly annotated
    and no foreground seen) has no reliable label and is left out.

    Args:
        cls_logits: N x 2 logits (column 1 = present).
        mask: N x H x W class indices.
        valid: N x H x W pixel weights, or None.
    """
    fg = (mask > 0).flatten(1)
    if valid is None:
        present = fg.any(1)
        known = torch.ones_like(present)
    else:
        v = valid.flatten(1) > 0
        present = (fg & v).any(1)
        known = present | v.all(1)
    target = torch.stack([~present, present], dim=1).float()
    per_image = F.binary_cross_entropy_with_logits(
        cls_logits.float(), target, reduction="none"
    ).mean(1)
    if not bool(known.any()):
        return per_image.sum() * 0.0
    return per_image[known].mean()


@register_loss("unet_sharp")
def unet_sharp_loss(
    outputs: dict[str, Any], targets: dict[str, Tensor], spec: ModelSpec
) -> tuple[Tensor, dict[str, float]]:
    """UNet#'s training loss: deep-supervised BCE+Dice plus the CGMs' classification BCE.

    Segmentation: :func:`unet_sharp_bce_dice` averaged with equal weights over every output
    (the official 8: ``deep_supervision`` + ``mask``). Classification: the mean of
    :func:`unet_sharp_cgm_loss` over the CGMs (``classification`` and
    ``classification_pruned``), times ``spec.extra["cgm_loss_weight"]`` (1 by default).
    """
    mask = targets["mask"]
    valid = targets.get("valid")
    maps = [*outputs.get("deep_supervision", []), outputs["mask"]]
    seg = torch.stack([unet_sharp_bce_dice(m, mask, valid) for m in maps]).mean()
    parts: dict[str, float] = {"loss_seg": float(seg.detach())}
    total = seg
    cls_maps = []
    if outputs.get("classification") is not None:
        cls_maps = [*outputs.get("classification_pruned", []), outputs["classification"]]
    if cls_maps:
        cls = torch.stack([unet_sharp_cgm_loss(c, mask, valid) for c in cls_maps]).mean()
        total = total + float(spec.extra.get("cgm_loss_weight", 1.0)) * cls
        parts["loss_cls"] = float(cls.detach())
    parts["loss"] = float(total.detach())
    return total, parts
