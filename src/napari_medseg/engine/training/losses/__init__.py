"""Training losses, one per network as its official training used it, selected by ``spec.loss``.

Every loss takes the network's output dict (training mode) and a targets dict and returns
``(total, parts)``: a scalar tensor and a dict of float components for logging.

Targets:
    ``"mask"``: LongTensor N x H x W of class indices (0/1 for K == 1), at the output resolution.
    ``"valid"`` (optional): float N x H x W, 1 where a pixel counts (fine-tuning regions, padding).
    ``"boundary"`` (optional): float N x H x W; derived from ``"mask"`` when absent.
    ``"image"``: the network input N x C x H x W (networks that reconstruct it).
    ``"image_hr"`` (optional): the high-resolution image N x C x H' x W' (super-resolution).

Modules: :mod:`.registry` (the losses by name, :func:`compute_loss`), :mod:`.common` (shared
building blocks and the generic ``dice_ce``), and one module per network family
(:mod:`.sa2net`, :mod:`.unet_sharp`, :mod:`.banet`, :mod:`.msa2net`, :mod:`.sasrnet`); importing
the package registers them all.
"""

from __future__ import annotations

from .banet import banet_boundary_target, banet_dice_loss, banet_loss
from .common import (
    cross_entropy,
    dice_ce_loss,
    foreground_probabilities,
    loss_parts,
    probabilities,
    soft_dice_loss,
)
from .msa2net import boundary_dou_loss, msa2net_loss
from .registry import LossFn, compute_loss, get_loss, list_losses, register_loss
from .sa2net import sa2net_dice_ce, sa2net_loss, sa2net_weighted_dice_bce
from .sasrnet import affinity_distance, sasr_dice_loss, sasr_reconstruction_loss, sasrnet_loss
from .unet_sharp import unet_sharp_bce_dice, unet_sharp_cgm_loss, unet_sharp_loss

__all__ = [
    "LossFn",
    "register_loss",
    "get_loss",
    "compute_loss",
    "list_losses",
    "soft_dice_loss",
    "cross_entropy",
    "probabilities",
    "foreground_probabilities",
    "loss_parts",
    "dice_ce_loss",
    "sa2net_weighted_dice_bce",
    "sa2net_dice_ce",
    "sa2net_loss",
    "unet_sharp_bce_dice",
    "unet_sharp_cgm_loss",
    "unet_sharp_loss",
    "banet_dice_loss",
    "banet_boundary_target",
    "banet_loss",
    "boundary_dou_loss",
    "msa2net_loss",
    "affinity_distance",
    "sasr_dice_loss",
    "sasr_reconstruction_loss",
    "sasrnet_loss",
]
