"""Settings of prediction: intensity normalization, tiling and the whole ``predict`` run.

``PredictConfig`` (also known as ``InferenceConfig``) is everything
``engine.inference.predict`` needs besides the image and the network; it holds a
``TilingConfig`` and an optional ``NormalizationConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..errors import ConfigError
from .base import ConfigBase, choices

__all__ = [
    "BLEND_MODES",
    "NORMALIZATION_MODES",
    "OUTPUT_NAMES",
    "PRECISIONS",
    "InferenceConfig",
    "NormalizationConfig",
    "PredictConfig",
    "TilingConfig",
]

#: Ways overlapping tiles are merged: a gaussian taper, a plain average, or each pixel
#: taken from the one tile whose centre region owns it.
BLEND_MODES = ("gaussian", "constant", "crop")
#: Intensity normalizations (see :mod:`napari_medseg.engine.inference.normalization`).
NORMALIZATION_MODES = ("percentile", "minmax", "zscore", "window", "meanstd", "none")
#: What ``predict`` can produce.
OUTPUT_NAMES = ("mask", "boundary", "probabilities", "instances", "variance")
#: Compute precisions; ``auto`` follows the device policy of ``engine.precision``.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class NormalizationConfig(ConfigBase):
    """How image intensities are mapped before the network sees them.

    Statistics are computed once over the whole image (a regular subsample for large ones),
    never per tile, so tiles agree at their seams.

    Attributes:
        mode: ``percentile`` maps the ``low``/``high`` percentiles to 0/1; ``minmax`` maps the
            minimum/maximum to 0/1; ``zscore`` subtracts the mean and divides by the standard
            deviation; ``window`` maps the fixed values ``low``/``high`` to 0/1 (CT windows);
            ``meanstd`` uses the fixed ``mean``/``std`` per channel; ``none`` casts to float.
        low: lower percentile (``percentile``) or value (``window``).
        high: upper percentile (``percentile``) or value (``window``).
        per_channel: statistics per channel (True) or over all channels together.
        clip: clip the result to [0, 1] (``percentile``, ``minmax``, ``window``).
        mean: per-channel means for ``meanstd`` (one value broadcasts).
        std: per-channel standard deviations for ``meanstd``.
    """

    #: A bare mode name (``"zscore"``, ``"none"``...) stands for that mode's defaults.
    shorthand: ClassVar[str | None] = "mode"

    mode: str = field(default="percentile", metadata=choices(*NORMALIZATION_MODES))
    low: float = 1.0
    high: float = 99.8
    per_channel: bool = True
    clip: bool = False
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.mode == "percentile" and not 0.0 <= self.low < self.high <= 100.0:
            raise ConfigError(
                f"Percentiles must satisfy 0 <= low < high <= 100, not {self.low} and {self.high}."
            )
        if self.mode == "window" and not self.low < self.high:
            raise ConfigError(f"A window needs low < high, not {self.low} and {self.high}.")
        if self.mode == "meanstd":
            if not self.mean or not self.std:
                raise ConfigError("Normalization 'meanstd' needs both mean and std values.")
            if any(s <= 0 for s in self.std):
                raise ConfigError("Normalization 'meanstd' needs std values above zero.")


@dataclass(frozen=True)
class TilingConfig(ConfigBase):
    """How an image is cut into tiles and the tiles merged back.

    Attributes:
        tile: tile side in pixels (one int for every spatial axis, or one per axis); None
            uses the network's ``preferred_tile`` (the weights' ``tile`` where their card
            records one, e.g. 1536 for the dermoscopy weights). Rounded down to the network's
            divisor and clamped to the image (a tile larger than the image is simply made
            smaller).
        overlap: fraction of a tile shared with its neighbour, in [0, 1). 0.125 (32 px of a
            256 px tile; Cellpose uses 0.1) with ``balance`` scored within 0.004 Dice of
            MONAI's usual 0.25 on the held-out nuclei and EM images for 56-65 % of the
            pixels (docs/benchmarks.md).
        blend: merge of probabilities and variance (``gaussian``, ``constant`` or ``crop``).
        boundary_blend: merge of the boundary head; ``crop`` keeps thin lines sharp.
        sigma_scale: gaussian sigma as a fraction of the tile side (0.125, like nnU-Net and
            MONAI).
        min_weight: floor of the gaussian weights relative to the centre (1e-3, like MONAI),
            so pixels seen only by tile borders still get a finite average.
        padding: how an image smaller than a tile is padded (``reflect``, ``edge``,
            ``constant``).
        balance: shrink the tiles to the smallest side that covers each axis with the same
            number of tiles, so less of every tile is computed twice (a 512 px side takes
            three 192 px tiles instead of three 256 px ones at overlap 0.125).
    """

    tile: int | tuple[int, ...] | None = None
    overlap: float = 0.125
    blend: str = field(default="gaussian", metadata=choices(*BLEND_MODES))
    boundary_blend: str = field(default="crop", metadata=choices(*BLEND_MODES))
    sigma_scale: float = 0.125
    min_weight: float = 1e-3
    padding: str = field(default="reflect", metadata=choices("reflect", "edge", "constant"))
    balance: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"Overlap must be a fraction in [0, 1), not {self.overlap}.")
        tiles = (self.tile,) if isinstance(self.tile, int) else (self.tile or ())
        if any(int(t) < 1 for t in tiles):
            raise ConfigError(f"Tile sides must be positive, not {self.tile}.")
        if not self.sigma_scale > 0:
            raise ConfigError(f"sigma_scale must be positive, not {self.sigma_scale}.")
        if not 0.0 < self.min_weight <= 1.0:
            raise ConfigError(f"min_weight must be in (0, 1], not {self.min_weight}.")


@dataclass(frozen=True)
class PredictConfig(ConfigBase):
    """Everything ``engine.inference.predict`` needs besides the image and the network.

    Attributes:
        tiling: tile size, overlap and blending.
        normalization: intensity normalization; None (or ``"auto"`` in a mapping) uses the
            checkpoint's (model card's) normalization, else percentile 1-99.8 per channel. A
            mode name (``"percentile"``, ``"none"``...) stands for that mode's defaults.
        device: ``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        precision: ``auto`` (bf16 where the CPU/GPU runs it natively, fp16 on older CUDA, fp32
            elsewhere), or a fixed ``fp32``/``bf16``/``fp16``.
        batch_size: tiles per forward pass; None picks the network's ``cpu_batch_size`` (2
            or 4) on CPU and fits the free memory on a GPU (from the one-batch probe).
        channels_last: channels-last memory format; None uses it on CPU and CUDA.
        axes: the image's axes, letters from ``TICZYX`` as in ``io.ImageMeta`` (``YX``,
            ``YXC``, ``CYX``, ``ZYX``, ``CZYX``, ``TYX``...); None takes them from the reader's
            metadata or guesses (with a notice). ``T`` and ``I`` axes are iterated over.
        axis: the axis a 2D network slices a volume along (``Z``, ``Y`` or ``X``).
        volume_mode: ``slices`` (along ``axis``) or ``orthogonal`` (YX, ZX and ZY passes
            averaged, 3x the cost; reports the agreement of the planes).
        channels: ``auto`` converts grey <-> RGB when the network needs it (with a notice);
            ``grey``/``rgb`` force the conversion first.
        tta: flip test-time augmentation (4 passes in 2D, 8 for 3D networks); also gives the
            ``variance`` output. None: as the weights say (on for weights whose instance
            thresholds were tuned on flip-averaged probabilities, the task's ``tta``; off
            otherwise).
        outputs: any of ``mask``, ``boundary``, ``probabilities``, ``instances``, ``variance``.
        probabilities_dtype: ``float16``, or ``uint8`` scaled to 0..255.
        threshold: foreground threshold on the probability of a one-class (sigmoid) network.
        boundary_threshold: threshold on the boundary head's probability.
        instance_min_size: smallest instance seed kept, in pixels.
        store: a zarr folder the outputs are streamed into (and resumed from); None keeps
            the outputs in memory.
        resume: continue a run the store holds (finished slices are skipped).
        overwrite: replace a store that holds a different run instead of stopping.
        oom_fallback: on GPU out-of-memory, retry with a smaller batch and tile, then the CPU.
        memory_fraction: the memory budget, as a fraction of the memory available when a run
            starts: outputs held in memory may take at most this much. Larger outputs are
            streamed (a zarr store; a TIFF file through a temporary store beside it) or,
            where the format cannot stream (NIfTI, PNG, an in-memory result), refused before
            any work with one sentence.
        super_resolved: for a super-resolution network (SASR-Net), return its outputs at
            its own scale (s times the image in Y and X, geometry scaled to match) instead
            of on the image's grid (the default).
        native_pixels: run the network on the image's own pixels even when the weights
            declare a pixel size and the image's metadata give another (by default each
            plane is resampled to the weights' pixel size and the outputs brought back to
            the image's grid; :mod:`napari_medseg.engine.pixel_size`), and keep the objects
            at their own size (no ``diameter`` resampling).
        diameter: the typical diameter of the image's objects, in pixels, for weights that
            record the object size they learnt (the instance task): each plane is resampled
            so objects reach the network at that size, the outputs brought back to the
            image's grid. None estimates it from a first pass on the central crop
            (:mod:`napari_medseg.engine.object_size`).
    """

    tiling: TilingConfig = field(default_factory=TilingConfig)
    normalization: NormalizationConfig | None = None
    device: str = "auto"
    precision: str = field(default="auto", metadata=choices(*PRECISIONS))
    batch_size: int | None = None
    channels_last: bool | None = None
    axes: str | None = None
    axis: str = field(default="Z", metadata=choices("Z", "Y", "X"))
    volume_mode: str = field(default="slices", metadata=choices("slices", "orthogonal"))
    channels: str = field(default="auto", metadata=choices("auto", "grey", "rgb"))
    tta: bool | None = None
    outputs: tuple[str, ...] = ("mask",)
    probabilities_dtype: str = field(default="float16", metadata=choices("float16", "uint8"))
    threshold: float = 0.5
    boundary_threshold: float = 0.5
    instance_min_size: int = 8
    store: str | None = None
    resume: bool = True
    overwrite: bool = False
    oom_fallback: bool = True
    memory_fraction: float = 0.5
    super_resolved: bool = False
    native_pixels: bool = False
    diameter: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ConfigError("memory_fraction is the share of the available memory outputs "
                              f"may take, in (0, 1], not {self.memory_fraction}.")
        bad = [o for o in self.outputs if o not in OUTPUT_NAMES]
        if bad:
            raise ConfigError(
                f"Unknown output {bad[0]!r}; choose from: {', '.join(OUTPUT_NAMES)}."
            )
        if not self.outputs:
            raise ConfigError(f"Ask for at least one output: {', '.join(OUTPUT_NAMES)}.")
        if self.diameter is not None and not self.diameter > 0:
            raise ConfigError("The object diameter is a positive number of pixels, not "
                              f"{self.diameter}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, not {self.batch_size}.")
        for name in ("threshold", "boundary_threshold"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, not {value}.")
        if self.axes is not None:
            axes = self.axes.upper()
            valid = set(axes) <= set("TICZYX") and {"Y", "X"} <= set(axes)
            if len(set(axes)) != len(axes) or not valid:
                raise ConfigError(
                    f"Axes {self.axes!r} are not valid; use distinct letters from T, I, C, Z, "
                    "Y, X (Y and X required), e.g. 'YX', 'YXC' or 'ZYX'."
                )
            object.__setattr__(self, "axes", axes)


#: The name the issue uses for the same settings.
InferenceConfig = PredictConfig


#: Switches added after stores and batch runs were first written; off, they are left out of
#: the settings a result is recognised by, so earlier results stay resumable (``diameter``
#: is unset when None).
LATER_SWITCHES = ("super_resolved", "native_pixels", "diameter")


def drop_unset_switches(settings: dict) -> dict:
    """``settings`` (a :class:`PredictConfig` as a dict) without the :data:`LATER_SWITCHES`
    that are off; changed in place and returned."""
    for key in LATER_SWITCHES:
        if not settings.get(key):
            settings.pop(key, None)
    return settings
