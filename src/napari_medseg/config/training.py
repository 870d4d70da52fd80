"""Settings of training from scratch, of fine-tuning on corrections, and their augmentations."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .base import ConfigBase, choices
from .inference import PRECISIONS, NormalizationConfig

#: The acquisition types of light-microscopy images (read from the pixels by
#: :func:`napari_medseg.engine.acquisition.acquisition_type`), e.g. for ``oversample``.
ACQUISITION_TYPES = ("fluorescence", "bright-field", "H&E")

__all__ = ["AugmentConfig", "FinetuneConfig", "TrainConfig"]


@dataclass(frozen=True)
class AugmentConfig(ConfigBase):
    """Training augmentations (:mod:`napari_medseg.engine.training.augment`), and how strong.

    Attributes:
        flips: random horizontal and vertical flips.
        rot90: random multiples of 90 degrees (square patches only).
        scale: (low, high) zoom factors; (1, 1) disables.
        intensity: random gain and offset on the image.
        noise_std: std of additive Gaussian noise (in normalised units); 0 disables.
        elastic: smooth elastic deformation strength in pixels; 0 disables.
        colour: per-channel gain spread (each channel times a factor in [1 - c, 1 + c]):
            another camera's white balance; 0 disables (one-channel images ignore it).
        gamma: gamma drawn log-uniformly in [1 / (1 + g), 1 + g]; 0 disables.
        blur: largest Gaussian blur sigma in pixels (half the patches are blurred); 0
            disables.
        saturation: colour saturation spread (each pixel's distance from its channel mean
            times a factor in [1 - s, 1 + s]): a camera that renders colours washed out or
            vivid; 0 disables (one-channel images ignore it).
        illumination: strength of a random linear light gradient across the patch (times a
            factor from 1 - i to 1 + i); 0 disables.
    """

    flips: bool = True
    rot90: bool = True
    scale: tuple[float, float] = (0.8, 1.25)
    intensity: bool = True
    noise_std: float = 0.03
    elastic: float = 0.0
    colour: float = 0.0
    gamma: float = 0.0
    blur: float = 0.0
    illumination: float = 0.0
    saturation: float = 0.0

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ConfigError(f"The scale range must satisfy 0 < low <= high, not {self.scale}.")
        for name in ("colour", "gamma", "blur", "illumination", "saturation"):
            if not 0 <= getattr(self, name) < (100 if name == "blur" else 1):
                raise ConfigError(f"The {name} augmentation must be at least 0 and below "
                                  f"{100 if name == 'blur' else 1}, not {getattr(self, name)}.")


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """Settings of ``napari-medseg train`` (:mod:`napari_medseg.engine.training.train`).

    Attributes:
        network: registry name of the network.
        variant: ``tiny``, ``lite`` or ``paper``.
        in_channels: image channels the network takes; 0 takes them from the first image
            (RGBA counts as RGB). Grey <-> RGB images are converted to fit.
        num_classes: K; 2 = background + foreground with softmax (the default for binary
            masks), 1 = one sigmoid logit; the ``instances`` task always has 3.
        model_overrides: extra fields of the network's config.
        input_downsample: run the network on the image average-pooled by this integer factor
            (its outputs are upsampled back; see
            :mod:`napari_medseg.models.working_resolution`); 1 = full resolution. Recorded in
            the checkpoint, so prediction and fine-tuning use the same factor.
        patch: training patch side at the target (mask) resolution.
        batch_size: patches per step.
        steps: optimisation steps at most.
        lr: peak learning rate (AdamW), reached after ``warmup_steps``; cosine decay to
            ``min_lr`` over the run.
        min_lr: final learning rate.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clip.
        val_fraction: fraction of images (or slice blocks of a stack) held out.
        max_val_images: cap on validation images (speed on a CPU); 0 = no cap.
        val_every: steps between validations.
        patience: validations without improvement before stopping early; 0 never stops.
        fg_fraction: probability that a patch is centred on a foreground pixel.
        augment: the augmentations.
        normalization: the intensity normalization (recorded in the checkpoint).
        task: ``classes`` (masks hold class indices) or ``instances`` (masks hold one
            number per object; the network learns background, interior and boundary, so
            ``num_classes`` is 3): :mod:`napari_medseg.engine.seg_task`.
        boundary_width: the boundary band's width inside each object (``instances``); None
            for a warm start's own width, else 1, by measurement: perfect three-class targets
            give back the DSB2018 nuclei at AP@0.5 0.986 with width 1, 0.961 with 2 (178 of
            6,960 small nuclei lose their interior) and 0.898 with 3; a trained network
            (SA2-Net nuclei, warm start) scores the same with 2 as with 1 (AP@0.5 0.779 and
            0.778 on the validation split).
        contact_weight: ``instances``: the loss weight of boundary pixels where two objects
            touch (1 elsewhere): the line between touching nuclei is what separates them.
        object_diameter: ``instances``: train every image with its objects resized to this
            median diameter (pixels), as prediction then resamples an image's objects to it
            (:mod:`napari_medseg.engine.object_size`); None trains images at their own size
            (the weights then record the training objects' median diameter).
        oversample: acquisition type -> how many times as often its training planes are
            drawn as the others' (e.g. ``{"H&E": 3}``; the type read from the pixels,
            :mod:`napari_medseg.engine.acquisition`); empty: every plane equally often.
        pattern: glob of the files to use in the folders.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` autocast.
        max_minutes: stop after this many minutes of training in all (a resumed run counts its
            earlier time; the loop stops when one more step and a validation would not fit);
            the learning rate decays to ``min_lr`` by then; the best checkpoint is kept.
            0 = no limit.
        freeze_encoder: train only the decoder and heads.
        resume: continue from the ``.train-state`` files beside the output, if present.
        seed: random seed of the split, the sampling, the augmentation and the init.
        dataset: name recorded in the checkpoint (default: the image folder's parent name).
        checkpoint_dtype: ``float16`` (shipped weights) or ``float32``.
    """

    network: str = "unet_sharp"
    variant: str = "lite"
    in_channels: int = 0
    num_classes: int = 2
    model_overrides: dict = field(default_factory=dict)
    input_downsample: int = 1
    patch: int = 256
    batch_size: int = 8
    steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    val_fraction: float = 0.2
    max_val_images: int = 24
    val_every: int = 100
    patience: int = 8
    fg_fraction: float = 0.5
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig())
    normalization: NormalizationConfig | None = None
    task: str = field(default="classes", metadata=choices("classes", "instances"))
    boundary_width: int | None = None
    contact_weight: float = 5.0
    object_diameter: float | None = None
    oversample: dict = field(default_factory=dict)
    pattern: str = "*"
    device: str = "auto"
    precision: str = field(default="auto", metadata=choices(*PRECISIONS))
    max_minutes: float = 0.0
    freeze_encoder: bool = False
    resume: bool = True
    seed: int = 0
    dataset: str = ""
    checkpoint_dtype: str = field(default="float16", metadata=choices("float16", "float32"))

    def __post_init__(self) -> None:
        for name in ("patch", "batch_size", "steps", "val_every", "input_downsample",
                     "boundary_width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), not {self.val_fraction}.")
        if self.object_diameter is not None and not self.object_diameter > 0:
            raise ConfigError("object_diameter is a positive number of pixels, not "
                              f"{self.object_diameter}.")
        if not self.contact_weight >= 1.0:
            raise ConfigError(f"contact_weight must be at least 1, not {self.contact_weight}.")
        if not self.lr > 0:
            raise ConfigError(f"The learning rate must be positive, not {self.lr}.")
        unknown = sorted(set(self.oversample) - set(ACQUISITION_TYPES))
        if unknown:
            raise ConfigError(f"oversample names {', '.join(map(repr, unknown))}, which is not "
                              f"an acquisition type ({', '.join(ACQUISITION_TYPES)}).")
        for kind, factor in self.oversample.items():
            if not (isinstance(factor, (int, float)) and factor > 0):
                raise ConfigError(f"oversample needs a positive factor for {kind!r}, not "
                                  f"{factor!r}.")


@dataclass(frozen=True)
class FinetuneConfig(ConfigBase):
    """Settings of fine-tuning on a user's corrections.

    Read by :mod:`napari_medseg.engine.training.finetune`, ``napari-medseg finetune`` and the
    Fine-tune widget.

    The defaults are the recipe ``benchmarks/bench_finetune.py`` chose (docs/finetune.md):
    with fewer than six images or regions a strip of each is held out (all of them train),
    the encoder frozen (decoder and heads learn), lr 1e-3 for at most 300 steps or 2 minutes
    in all, the patch the weights were trained with, batch-norm statistics kept.

    Attributes:
        steps: optimisation steps at most.
        lr: peak learning rate (AdamW), lower than training from scratch; linear warm-up,
            cosine decay to ``min_lr``.
        min_lr: final learning rate.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clip.
        batch_size: patches per step.
        patch: patch side at the target (mask) resolution; a network with an
            ``input_downsample`` of N gets N times that side (the same patch at its own scale).
            0: the patch the weights were trained with (their description's
            ``settings.patch``; 128 when it records none), so that fine-tuning sees the
            context training did (a dermoscopy lesion needs the whole photograph).
        freeze_encoder: train only the decoder and heads (``model.encoder_parameters()``
            stay fixed; the default: on a few photographs of another dermoscope training
            every layer unlearnt lesions unlike the five, docs/finetune.md).
        freeze_norm_stats: keep the base model's batch-norm running statistics (the
            layers stay in eval mode while their scale and shift still learn), so that a
            few small batches of a handful of images do not re-estimate them (measured:
            re-estimated statistics cost the shipped nuclei model 1-4 Dice points before
            any step could help).
        replay: fraction of the patches drawn from earlier samples (replay against
            forgetting) when there are any; 0 turns replay off.
        max_replay: earlier samples used for replay at most (the most recent first).
        margin: pixels around each changed area that count in the loss.
        context: image pixels around a region that the network sees but the loss ignores.
        min_changed: changed areas smaller than this many pixels are ignored (stray clicks).
        slice_gap: regions on slices at most this far apart that overlap in-plane form one
            group of the split (never on both sides).
        val_fraction: fraction of the groups (regions, slices or images) held out.
        strips_below: with fewer groups than this, a strip of every group is held out
            instead (``val_fraction`` of its longer side, ``margin`` pixels beside it left
            out of the loss; :func:`~napari_medseg.engine.training.datasets.split_within`):
            five images then all train and the validation is not one image's noise; 0 never.
        val_every: steps between validations.
        patience: validations without improvement before stopping early; 0 never stops.
        augment: flips, rot90 and intensity changes (no zoom by default).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` autocast.
        max_minutes: the whole run (the split and the scoring of the starting weights
            included) ends within this many minutes: it stops when one more step and the last
            validation would not fit; the best weights are kept; 0 = no limit.
        seed: random seed of the split, the sampling and the augmentation.
        checkpoint_dtype: ``float32`` (default: fine-tuning steps are small) or ``float16``.
        save_every_s: with an output file, the best weights so far (and the state a resumed
            run continues from) are written at most this many seconds apart, so a killed run
            loses at most that much.
        resume: continue a killed run from the state written beside the output.
        native_pixels: train on the image's own pixels even when its metadata give a pixel
            size other than the weights' (by default the corrections of a 2D network on the
            input grid are resampled to the weights' pixel size, as ``predict`` does).
    """

    steps: int = 300
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 10
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    batch_size: int = 4
    patch: int = 0
    freeze_encoder: bool = True
    freeze_norm_stats: bool = True
    replay: float = 0.25
    max_replay: int = 64
    margin: int = 16
    context: int = 32
    min_changed: int = 4
    slice_gap: int = 1
    val_fraction: float = 0.25
    strips_below: int = 6
    val_every: int = 20
    patience: int = 4
    augment: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(scale=(1.0, 1.0), noise_std=0.02))
    device: str = "auto"
    precision: str = field(default="auto", metadata=choices(*PRECISIONS))
    max_minutes: float = 2.0
    seed: int = 0
    checkpoint_dtype: str = field(default="float32", metadata=choices("float16", "float32"))
    save_every_s: float = 60.0
    resume: bool = False
    native_pixels: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "steps", "val_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}.")
        for name in ("patch", "margin", "context", "min_changed", "slice_gap", "max_replay",
                     "warmup_steps", "patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, not {getattr(self, name)}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), not {self.val_fraction}.")
        if not 0.0 <= self.replay < 1.0:
            raise ConfigError(f"replay must be a fraction in [0, 1), not {self.replay}.")
        if not self.lr > 0:
            raise ConfigError(f"The learning rate must be positive, not {self.lr}.")
