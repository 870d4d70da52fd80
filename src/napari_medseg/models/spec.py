"""The contract a network declares and the engine reads (no torch needed to read it).

The engine never branches on a network's name: tiling reads ``divisor``, ``min_size`` and
``output_scale``; inference reads ``heads``; training reads ``train_outputs`` and ``loss``;
fine-tuning reads ``encoder_prefixes`` to freeze the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "HEAD_MASK",
    "HEAD_BOUNDARY",
    "HEAD_SR_IMAGE",
    "HEAD_DEEP_SUPERVISION",
    "HEAD_CLASSIFICATION",
    "ModelSpec",
]

#: Logits of the segmentation, N x K x H' x W' (H' = H * output_scale).
HEAD_MASK = "mask"
#: Logits of a boundary map, N x 1 x H' x W' (networks that really predict one).
HEAD_BOUNDARY = "boundary"
#: A super-resolved image, N x C x H' x W' (SASR-Net in training).
HEAD_SR_IMAGE = "sr_image"
#: A list of extra mask logits (deep supervision), each N x K x H' x W'.
HEAD_DEEP_SUPERVISION = "deep_supervision"
#: Image-level logits, N x 2 (UNet#'s classification-guided module).
HEAD_CLASSIFICATION = "classification"


@dataclass(frozen=True)
class ModelSpec:
    """What a built network promises to the engine.

    Attributes:
        network: registry name, e.g. ``"unet_sharp"``.
        variant: ``"tiny"``, ``"lite"`` or ``"paper"``.
        in_channels: image channels the network takes.
        num_classes: K. With K == 1 the mask head is a sigmoid logit, else softmax logits.
        spatial_dims: 2 or 3.
        divisor: every spatial input side must be a multiple of this.
        min_size: smallest spatial side the network accepts (a multiple of ``divisor``).
        output_scale: output side / input side (2 for SASR-Net, 1 otherwise).
        heads: keys of the dict ``model(x)`` returns in eval mode.
        train_outputs: keys added in training mode (deep supervision, SR image, ...).
        loss: name of the training loss in ``napari_medseg.engine.training.losses``.
        encoder_prefixes: parameter-name prefixes of the encoder (frozen by "freeze encoder").
        preferred_tile: the tile side the engine uses when none is asked (the side the
            network was designed and trained around, unless a measured reason says otherwise).
        cpu_batch_size: tiles per forward pass on the CPU when none is asked: the batch that
            ran fastest per pixel in bf16 on a 2-core AVX512-BF16 CPU (docs/benchmarks.md).
    """

    network: str
    variant: str
    in_channels: int
    num_classes: int
    spatial_dims: int = 2
    divisor: int = 16
    min_size: int = 16
    output_scale: int = 1
    heads: tuple[str, ...] = (HEAD_MASK,)
    train_outputs: tuple[str, ...] = ()
    loss: str = "dice_ce"
    encoder_prefixes: tuple[str, ...] = ()
    preferred_tile: int = 256
    cpu_batch_size: int = 2
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def input_downsample(self) -> int:
        """The working-resolution factor (``extra["input_downsample"]``; 1 = full
        resolution; see :mod:`napari_medseg.models.working_resolution`)."""
        return int(self.extra.get("input_downsample", 1))

    @property
    def mask_activation(self) -> str:
        """``"sigmoid"`` for one class, ``"softmax"`` otherwise."""
        return "sigmoid" if self.num_classes == 1 else "softmax"

    def valid_size(self, size: int) -> int:
        """The smallest accepted spatial side that is >= ``size``."""
        size = max(int(size), self.min_size)
        return -(-size // self.divisor) * self.divisor
