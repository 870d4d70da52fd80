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

from ...models.spec import ModelSpec

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
__all__ += ["sa2net_weighted_dice_bce", "sa2net_dice_ce", "sa2net_loss"]


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


# --- unet_sharp loss ---
__all__ += ["unet_sharp_bce_dice", "unet_sharp_cgm_loss", "unet_sharp_loss"]


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
    if k == 1:
        y = (mask > 0).float()[:, None]
        per_pixel = F.binary_cross_entropy_with_logits(z, y, reduction="none")[:, 0]
        p = torch.sigmoid(z)
    else:
        target = mask.long().clamp(0, k - 1)
        per_pixel = F.cross_entropy(z, target, reduction="none")
        p = torch.softmax(z, dim=1)[:, 1:]
        y = F.one_hot(target, k).permute(0, 3, 1, 2)[:, 1:].float()
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


# --- banet loss ---
__all__ += ["banet_dice_loss", "banet_boundary_target", "banet_loss"]


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
    z = logits.float()
    k = z.shape[1]
    if k == 1:
        p = torch.sigmoid(z)
        y = (mask > 0).float()[:, None]
    else:
        p = torch.softmax(z, dim=1)[:, 1:]
        y = F.one_hot(mask.long().clamp(0, k - 1), k).permute(0, 3, 1, 2)[:, 1:].float()
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
    from ..boundaries import boundary_target

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
    parts = {
        "loss": float(total.detach()),
        "ce": float(ce.detach()),
        "dice": float(dice.detach()),
        "seg_sides": float(seg.detach()),
        "edge_sides": float(edge.detach()),
    }
    return total, parts


# --- msa2net loss ---
__all__ += ["boundary_dou_loss", "msa2net_loss"]


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


# --- sasrnet loss ---

__all__ += ["affinity_distance", "sasr_dice_loss", "sasr_reconstruction_loss", "sasrnet_loss"]


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


def _onehot(mask: Tensor, classes: int) -> Tensor:
    """N x (spatial) class indices -> N x classes x (spatial) float one-hot."""
    return F.one_hot(mask.long().clamp(0, classes - 1), classes).movedim(-1, 1).float()


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
    logits = logits.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        y = (mask > 0).float()[:, None]
    else:
        p = torch.softmax(logits, dim=1)[:, 1:]
        y = _onehot(mask, logits.shape[1])[:, 1:]
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
    from ...errors import InputShapeError

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
        seg_features = seg_features * valid[:, None]
        sr_fa = sr * valid[:, None]
        lr_pool = F.avg_pool2d if valid.dim() == 3 else F.avg_pool3d
        valid_lr = lr_pool(valid[:, None], 2)
        if valid_lr.shape[2:] != gates_seg.shape[2:]:
            valid_lr = F.interpolate(valid[:, None], size=gates_seg.shape[2:], mode="nearest")
        gates_seg = gates_seg * valid_lr
        gates_sr = gates_sr * valid_lr
    else:
        sr_fa = sr

    dice = sasr_dice_loss(logits, mask, valid)
    l_sr = sasr_reconstruction_loss(sr, image_hr, mask, valid)
    l_fa = affinity_distance(seg_features, sr_fa, pool)
    l_sa = affinity_distance(gates_seg, gates_sr, pool)
    total = dice + weights["sr"] * l_sr + weights["fa"] * l_fa + weights["sa"] * l_sa
    parts = {
        "loss": float(total.detach()),
        "dice": float(dice.detach()),
        "sr": float(l_sr.detach()),
        "fa": float(l_fa.detach()),
        "sa": float(l_sa.detach()),
    }
    return total, parts
