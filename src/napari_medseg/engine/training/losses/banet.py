"""BA-Net's official loss (spec 1.8): CE + Dice on the mask, CE on every side output."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ....models.spec import ModelSpec
from .common import cross_entropy, foreground_probabilities, loss_parts
from .registry import register_loss

__all__ = ["banet_dice_loss", "banet_boundary_target", "banet_loss"]


def banet_dice_loss(logits: Tensor, mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """BA-Net's Dice term: ``1 - mean_n 2 (sum p y + 1) / (sum p + sum y + 1)`` (spec 1.8).

    Sums run over the pixels of each image. As in the official code the smoothing term sits
    inside the factor 2, so an image with empty target and empty prediction scores 2 (loss -1).
    p is the probability of class 1 (softmax for K == 2 as in the code; sigmoid for K == 1);
    for K > 2 the same per-image Dice is averaged over the foreground classes 1..K-1.

    Args:
        logits: N x K x H x W.
        mask: N x H x W class indices (0/1 for K == 1).
        valid: N x H x W pixel weights (1 = counts), or None.
    """
    p, y = foreground_probabilities(logits, mask)
    if valid is not None:
        w = valid.float()[:, None]
        p, y = p * w, y * w
    inter = (p * y).sum(dim=(2, 3))
    dice = 2 * (inter + 1) / (p.sum(dim=(2, 3)) + y.sum(dim=(2, 3)) + 1)
    return 1 - dice.mean()


def banet_boundary_target(
    mask: Tensor, num_classes: int, border: str = "replicate", valid: Tensor | None = None
) -> Tensor:
    """BA-Net's boundary target b (N x H x W float, 1 = boundary) from a class-index mask.

    K <= 2 without ``valid``: :func:`napari_medseg.engine.boundaries.boundary_target` (the
    code's ``|y - avgpool3x3(y)| > 0`` on y = mask > 0). Otherwise: pixels whose 3x3
    neighbourhood, counting only valid pixels, holds more than one label (spec 1.11 (a)); on a
    binary mask with every pixel valid this is the same band. So a foreground pixel next to an
    invalid region (padding, unannotated area) is not marked because of that region.
    ``border="replicate"`` does not mark the image edge (tiles); ``"zeros"`` is the code's zero
    padding (the outside counts as background).

    Args:
        mask: N x H x W class indices.
        num_classes: K of the network.
        border: ``"replicate"`` or ``"zeros"``.
        valid: N x H x W pixel weights (> 0 = annotated), or None.
    """
    from ...boundaries import boundary_target

    if border not in ("replicate", "zeros"):
        raise ValueError(f"border must be 'replicate' or 'zeros', not {border!r}")
    if num_classes <= 2 and valid is None:
        return boundary_target(mask, border=border)
    y = (mask > 0).float() if num_classes <= 2 else mask.float()
    v = torch.ones_like(y) if valid is None else (valid > 0).float()
    y, v = y[:, None], v[:, None]
    outside_counts = 1.0 if border == "zeros" else 0.0
    y = F.pad(y, (1, 1, 1, 1), value=0.0)
    v = F.pad(v, (1, 1, 1, 1), value=outside_counts) > 0
    far = torch.finfo(torch.float32).max
    hi = F.max_pool2d(torch.where(v, y, -far), 3, stride=1)
    lo = -F.max_pool2d(torch.where(v, -y, -far), 3, stride=1)
    return (hi != lo).float()[:, 0]


@register_loss("banet")
def banet_loss(
    outputs: dict[str, Any], targets: dict[str, Tensor], spec: ModelSpec
) -> tuple[Tensor, dict[str, float]]:
    """BA-Net's official loss (spec 1.8), every term with weight 1:

    ``CE(final, y) + Dice(final, y) + sum_i [CE(seg_i, y) + CE(edge_i, b)]``

    with the four segmentation side outputs (``deep_supervision``) and the four edge side
    outputs (``edge_sides``; 2-logit softmax CE, or BCE for a 1-logit edge head). b is
    ``targets["boundary"]`` when given, else :func:`banet_boundary_target` of the mask with
    ``spec.extra["boundary_border"]`` padding (``"replicate"``: no false boundary on tile
    edges), ignoring invalid pixels. ``targets["valid"]`` weights the pixels of every term.
    """
    mask = targets["mask"]
    valid = targets.get("valid")
    valid = None if valid is None else valid.float()
    final = outputs["mask"]
    boundary = targets.get("boundary")
    if boundary is None:
        border = str(spec.extra.get("boundary_border", "replicate"))
        boundary = banet_boundary_target(mask, final.shape[1], border, valid)
    boundary = (boundary > 0.5).long()
    ce = cross_entropy(final, mask, valid)
    dice = banet_dice_loss(final, mask, valid)
    seg_sides = outputs.get("deep_supervision", [])
    edge_sides = outputs.get("edge_sides", [])
    seg = torch.zeros((), device=final.device)
    for logits in seg_sides:
        seg = seg + cross_entropy(logits, mask, valid)
    edge = torch.zeros((), device=final.device)
    for logits in edge_sides:
        edge = edge + cross_entropy(logits, boundary, valid)
    total = ce + dice + seg + edge
    return total, loss_parts(total, ce=ce, dice=dice, seg_sides=seg, edge_sides=edge)
