"""SASR-Net's training loss (spec 3.6): Dice, lesion-weighted SR error and affinity terms."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ....models.spec import ModelSpec
from .common import foreground_probabilities, loss_parts
from .registry import register_loss

__all__ = ["affinity_distance", "sasr_dice_loss", "sasr_reconstruction_loss", "sasrnet_loss"]


def affinity_distance(u: Tensor, v: Tensor, pool: int = 16) -> Tensor:
    """SASR-Net's affinity distance Aff(U, V) (FA and SA losses; spec 3.4).

    Both maps are average-pooled (kernel = stride = ``pool``, clipped to the map size), flattened
    to B x C x P, turned into P x P Gram matrices ``S = U^T U`` per sample, and compared:
    ``sum_{b,i,j} |S_V - S_U| / P^2``. As in the released code there is no feature
    normalisation, the sum runs over the batch, and gradients reach both arguments.

    Args:
        u: B x C x (spatial), 2D or 3D.
        v: same shape as ``u``.
        pool: pooling kernel (1/subscale; 16 in the released code).
    """
    if u.shape != v.shape:
        raise ValueError(f"affinity needs equal shapes, got {tuple(u.shape)} and {tuple(v.shape)}")
    dims = u.dim() - 2
    avg_pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
    kernel = [max(1, min(int(pool), int(s))) for s in u.shape[2:]]
    u_p = avg_pool(u.float(), kernel, kernel).flatten(2)
    v_p = avg_pool(v.float(), kernel, kernel).flatten(2)
    positions = u_p.shape[-1]
    s_u = u_p.transpose(1, 2) @ u_p
    s_v = v_p.transpose(1, 2) @ v_p
    return (s_v - s_u).abs().sum() / positions**2


def sasr_dice_loss(logits: Tensor, mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """The released SASR-Net Dice: ``1 - mean_b 2 (sum pY + 1) / (sum p + sum Y + 1)``.

    Per sample, on the sigmoid probability for K == 1 (exactly the released loss; note the
    smoothing term inside the factor 2, so a sample with empty mask and prediction scores 2);
    for K > 1 the same per-sample Dice on the softmax probabilities of each foreground class,
    averaged over samples and classes.

    Args:
        logits: N x K x (spatial).
        mask: N x (spatial) class indices.
        valid: N x (spatial) weights, or None.
    """
    p, y = foreground_probabilities(logits, mask)
    if valid is not None:
        p = p * valid[:, None]
        y = y * valid[:, None]
    axes = tuple(range(2, p.dim()))
    inter = (p * y).sum(dim=axes)
    dice = 2 * (inter + 1) / (p.sum(dim=axes) + y.sum(dim=axes) + 1)
    return 1 - dice.mean()


def sasr_reconstruction_loss(
    sr: Tensor, image_hr: Tensor, mask: Tensor, valid: Tensor | None = None
) -> Tensor:
    """Lesion-weighted MSE of the SR image: mean of ``(SR - I_HR)^2 (0.2 + 0.8 Y)``.

    Y is 1 on any lesion class (mask > 0), so lesion pixels weigh 1.0 and background 0.2.

    Args:
        sr: N x C x (spatial) super-resolved image.
        image_hr: N x C x (spatial) high-resolution image.
        mask: N x (spatial) class indices.
        valid: N x (spatial) weights, or None (then a plain mean over all elements).
    """
    weight = 0.2 + 0.8 * (mask > 0).float()[:, None]
    err = (sr.float() - image_hr.float()) ** 2 * weight
    if valid is None:
        return err.mean()
    valid = valid.float()[:, None]
    return (err * valid).sum() / (valid.sum() * sr.shape[1]).clamp_min(1.0)


@register_loss("sasrnet")
def sasrnet_loss(
    outputs: dict[str, Any], targets: dict[str, Tensor], spec: ModelSpec
) -> tuple[Tensor, dict[str, float]]:
    """SASR-Net's training loss (spec 3.6): ``L_dice + w_sr L_sr + w_fa L_fa + w_sa L_sa``.

    ``L_fa = Aff(seg_features, sr_image)`` and ``L_sa = Aff(gates_seg, gates_sr)``. The weights
    come from ``spec.extra["loss_weights"]`` (released script: sr 1, fa 1, sa 0). The input
    is the x2-downsampled image; ``targets["mask"]`` (and ``"valid"``) are at the output
    resolution and ``targets["image_hr"]`` is the full-resolution image the SR branch rebuilds.
    Invalid pixels are left out of the Dice and the SR error and zeroed in both affinity maps.
    """
    from ....errors import InputShapeError

    logits = outputs["mask"]
    mask = targets["mask"]
    if tuple(mask.shape[1:]) != tuple(logits.shape[2:]):
        raise InputShapeError(
            f"SASR-Net predicts masks of size {tuple(logits.shape[2:])} (twice the input), but "
            f"the target mask is {tuple(mask.shape[1:])}: give the full-resolution mask."
        )
    missing = [k for k in ("sr_image", "seg_features", "gates_seg", "gates_sr") if k not in outputs]
    if missing:
        raise InputShapeError(
            f"SASR-Net's loss needs the training outputs {missing}: run the network in train mode."
        )
    image_hr = targets.get("image_hr")
    if image_hr is None:
        raise InputShapeError(
            "SASR-Net training needs targets['image_hr'], the full-resolution image, beside the "
            "x2-downsampled input image."
        )
    sr = outputs["sr_image"]
    if image_hr.shape != sr.shape:
        raise InputShapeError(
            f"targets['image_hr'] is {tuple(image_hr.shape)} but SASR-Net reconstructs "
            f"{tuple(sr.shape)}: give the full-resolution image (twice the input size)."
        )
    weights = {"sr": 1.0, "fa": 1.0, "sa": 0.0, **spec.extra.get("loss_weights", {})}
    pool = int(spec.extra.get("affinity_pool", 16))
    valid = targets.get("valid")
    valid = None if valid is None else valid.float()

    seg_features = outputs["seg_features"]
    gates_seg, gates_sr = outputs["gates_seg"], outputs["gates_sr"]
    if valid is not None:
        # The affinity terms mask the features (pixel weights > 1 would rescale them).
        inside = (valid > 0).float()
        seg_features = seg_features * inside[:, None]
        sr_fa = sr * inside[:, None]
        lr_pool = F.avg_pool2d if inside.dim() == 3 else F.avg_pool3d
        valid_lr = lr_pool(inside[:, None], 2)
        if valid_lr.shape[2:] != gates_seg.shape[2:]:
            valid_lr = F.interpolate(inside[:, None], size=gates_seg.shape[2:], mode="nearest")
        gates_seg = gates_seg * valid_lr
        gates_sr = gates_sr * valid_lr
    else:
        sr_fa = sr

    dice = sasr_dice_loss(logits, mask, valid)
    l_sr = sasr_reconstruction_loss(sr, image_hr, mask, valid)
    l_fa = affinity_distance(seg_features, sr_fa, pool)
    l_sa = affinity_distance(gates_seg, gates_sr, pool)
    total = dice + weights["sr"] * l_sr + weights["fa"] * l_fa + weights["sa"] * l_sa
    return total, loss_parts(total, dice=dice, sr=l_sr, fa=l_fa, sa=l_sa)
