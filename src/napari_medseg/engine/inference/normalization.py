"""Intensity normalization: statistics fitted once per image, applied tile by tile.

The statistics (percentiles, min/max, mean/std) are computed over the whole image, from a
regular subsample when it is large (at most ``max_samples`` values per channel, taken from
evenly spaced slices), never per tile, so neighbouring tiles see the same mapping and no seam
appears. :func:`fit_normalization` returns a :class:`NormalizationStats` (a per-channel
``offset`` and ``scale``: ``y = (x - offset) / scale``), which :meth:`NormalizationStats.apply`
applies to any block of the image. Training uses :func:`normalize` on whole images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...config import NormalizationConfig
from ...errors import InputShapeError, MedsegError

__all__ = [
    "DEFAULT_NORMALIZATION",
    "MAX_SAMPLES",
    "NormalizationStats",
    "sample_values",
    "fit_normalization",
    "normalize",
    "FLOAT32_MAX",
    "check_pixels",
    "NonFiniteOutputError",
    "check_network_batch",
]

#: Percentile 1-99.8 per channel: the default when neither the user nor the model card says.
DEFAULT_NORMALIZATION = NormalizationConfig()
#: Values per channel read to fit the statistics (a regular subsample beyond this).
MAX_SAMPLES = 2_000_000

_EPS = 1e-6
#: Largest magnitude float32 (the networks' number type) holds.
FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_NONFINITE = "The image contains NaN or infinite pixels; replace them (e.g. with 0) first."
_NONFINITE_NORMALISED = ("The normalised image holds NaN or infinite values (its intensity "
                         "range overflows float32); rescale it or choose another normalization.")


def check_pixels(values) -> None:
    """Refuse pixels the networks cannot take: NaN, infinite, or beyond float32's range.

    Integer images always fit; a float64 image reaching beyond +-3.4e38 would turn into
    infinities at the cast to float32, one whose values all lie below 1.2e-38 into zeros
    (subnormals), either giving an all-background mask. Two passes (min and max), no copy.

    Args:
        values: an array-like of pixels (a whole in-memory image, a tile, or samples).

    Raises:
        InputShapeError: NaN or infinite pixels, or values float32 cannot represent.
    """
    if not np.issubdtype(np.dtype(values.dtype), np.floating):
        return  # integers always fit; a lazy integer array is never read
    values = np.asarray(values)
    if values.size == 0:
        return
    lo, hi = float(values.min()), float(values.max())  # NaN propagates into both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputShapeError(_NONFINITE)
    largest = max(-lo, hi)
    if largest > FLOAT32_MAX or 0 < largest < _FLOAT32_TINY:
        raise InputShapeError(
            f"The image holds values from {lo:.3g} to {hi:.3g}, outside what float32 (the "
            f"networks' number type, magnitudes {_FLOAT32_TINY:.2g} to {FLOAT32_MAX:.2g}) can "
            "represent; rescale it first.")


class NonFiniteOutputError(MedsegError):
    """The network returned NaN or infinite values (the tile predictor retries such a batch
    in fp32 when it ran in a lower precision)."""


def check_network_batch(inputs_finite: bool, outputs_finite: bool, precision: str) -> None:
    """Refuse a batch whose normalised tiles or whose network output is not finite.

    Called once per batch by the tile predictor; both flags are computed on the device and read
    once the output came back (no extra synchronisation).

    Args:
        inputs_finite: whether every value of the normalised batch fed to the network is finite.
        outputs_finite: whether every output probability of the network is finite.
        precision: the precision the network ran in (``fp32``, ``bf16``, ``fp16``).

    Raises:
        InputShapeError: non-finite normalised tiles (the intensity range overflows float32).
        NonFiniteOutputError: the network returned NaN or infinite values.
    """
    if not inputs_finite:
        raise InputShapeError(_NONFINITE_NORMALISED)
    if not outputs_finite:  # in bf16/fp16 the tile predictor runs the batch again in fp32
        raise NonFiniteOutputError(f"The network returned NaN or infinite values in "
                                   f"{precision} precision; the checkpoint may be broken, "
                                   "try other weights.")


@dataclass(frozen=True)
class NormalizationStats:
    """A fitted normalization: ``y = (x - offset) / scale`` per channel, optionally clipped.

    Attributes:
        offset: one value per channel.
        scale: one value per channel (> 0).
        clip: clip the result to [0, 1].
    """

    offset: tuple[float, ...]
    scale: tuple[float, ...]
    clip: bool = False

    def apply(self, block: np.ndarray, channel_axis: int = 0) -> np.ndarray:
        """Normalize a block (float32 out).

        Args:
            block: C x ... with the channel axis at ``channel_axis``.
            channel_axis: where the channels are.
        """
        x = np.asarray(block, dtype=np.float32)
        shape = [1] * x.ndim
        shape[channel_axis] = len(self.offset)
        offset = np.asarray(self.offset, np.float32).reshape(shape)
        scale = np.asarray(self.scale, np.float32).reshape(shape)
        y = (x - offset) / scale
        if self.clip:
            np.clip(y, 0.0, 1.0, out=y)
        return y

    def to_dict(self) -> dict:
        """JSON-friendly form (stored in a resumable zarr store)."""
        return {"offset": list(self.offset), "scale": list(self.scale), "clip": self.clip}

    @classmethod
    def from_dict(cls, data: dict) -> NormalizationStats:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(data["offset"]), tuple(data["scale"]), bool(data.get("clip", False)))


def sample_values(
    image, channel_axis: int | None, max_samples: int | None = None
) -> np.ndarray:
    """A regular subsample of an image, one row of values per channel (float64).

    Reads at most about ``max_samples`` values per channel: evenly spaced positions along the
    slowest non-channel axis, then a pixel stride along the others. Works on numpy, zarr and
    dask arrays without loading them whole.

    Args:
        image: array-like.
        channel_axis: index of the channel axis, or None.
        max_samples: the budget; None uses :data:`MAX_SAMPLES`.

    Returns:
        C x M array of samples.
    """
    max_samples = int(max_samples or MAX_SAMPLES)
    shape = tuple(int(s) for s in image.shape)
    axes = [a for a in range(len(shape)) if a != channel_axis]
    n = math.prod(shape[a] for a in axes)
    c_axis = channel_axis
    if n <= max_samples:
        data = np.asarray(image[...])
    elif len(axes) >= 3:
        # A volume: up to 32 evenly spaced slices along the slowest axis, strided inside.
        first = axes[0]
        chosen = np.unique(np.linspace(0, shape[first] - 1, min(32, shape[first])).round())
        rest = math.prod(shape[a] for a in axes[1:])
        stride = max(1, math.ceil((rest * len(chosen) / max_samples) ** (1 / (len(axes) - 1))))
        blocks = []
        for i in chosen.astype(int):
            sl: list[slice | int] = [slice(None)] * len(shape)
            sl[first] = int(i)
            for a in axes[1:]:
                sl[a] = slice(0, None, stride)
            blocks.append(np.asarray(image[tuple(sl)]))
        data = np.stack(blocks, axis=0)
        if channel_axis is not None:
            c_axis = channel_axis + (0 if channel_axis > first else 1)
    else:
        # A plane: one strided read.
        stride = max(1, math.ceil((n / max_samples) ** (1 / len(axes))))
        sl = [slice(None)] * len(shape)
        for a in axes:
            sl[a] = slice(0, None, stride)
        data = np.asarray(image[tuple(sl)])
    if c_axis is None:
        return data.reshape(1, -1).astype(np.float64)
    data = np.moveaxis(data, c_axis, 0)
    return data.reshape(data.shape[0], -1).astype(np.float64)


def fit_normalization(
    samples: np.ndarray, config: NormalizationConfig | None = None
) -> NormalizationStats:
    """Fit a normalization to samples of an image.

    Args:
        samples: C x M values (see :func:`sample_values`).
        config: the normalization to fit; None is percentile 1-99.8 per channel.

    Raises:
        InputShapeError: the samples hold NaN or infinite values.
    """
    config = config or DEFAULT_NORMALIZATION
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim == 1:
        samples = samples[None]
    check_pixels(samples)
    channels = samples.shape[0]
    groups = [samples[c] for c in range(channels)] if config.per_channel else [samples.ravel()]
    offsets: list[float] = []
    scales: list[float] = []
    clip = bool(config.clip)
    mode = config.mode
    for values in groups:
        if mode == "percentile":
            lo, hi = np.percentile(values, [config.low, config.high])
        elif mode == "minmax":
            lo, hi = float(values.min()), float(values.max())
        elif mode == "window":
            lo, hi = config.low, config.high
        elif mode == "zscore":
            lo, hi = float(values.mean()), float(values.mean() + values.std())
        elif mode == "none":
            lo, hi = 0.0, 1.0
        elif mode == "meanstd":
            lo, hi = 0.0, 1.0  # replaced below
        else:  # pragma: no cover - config validates the mode
            raise ValueError(f"unknown normalization {mode!r}")
        offsets.append(float(lo))
        scales.append(_scale(float(lo), float(hi)))
    if not config.per_channel:
        offsets *= channels
        scales *= channels
    if mode == "meanstd":
        mean = list(config.mean) * (channels if len(config.mean) == 1 else 1)
        std = list(config.std) * (channels if len(config.std) == 1 else 1)
        if len(mean) != channels or len(std) != channels:
            raise InputShapeError(
                f"The normalization gives {len(config.mean)} mean values for an image with "
                f"{channels} channels."
            )
        offsets, scales = [float(m) for m in mean], [float(s) for s in std]
    if mode in ("zscore", "meanstd", "none"):
        clip = False
    _check_float32(offsets, scales)
    return NormalizationStats(tuple(offsets), tuple(scales), clip)


def window_mismatch(samples: np.ndarray, config: NormalizationConfig) -> str | None:
    """A warning when a fixed intensity window (Hounsfield units for CT weights) meets an
    image whose values all lie within a range far narrower than it (already windowed to
    [0, 1], say), which the window would flatten to one grey; None otherwise."""
    if config.mode != "window":
        return None
    values = np.asarray(samples, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    width = config.high - config.low
    if width <= 0 or hi - lo > 0.05 * width:
        return None
    return (f"The weights map intensities through the window {config.low:g}..{config.high:g} "
            f"(Hounsfield units for CT), but this image's values lie within {lo:.3g}..{hi:.3g}, "
            "as if already windowed; give the image in its original units, or choose another "
            "normalization.")


def _scale(lo: float, hi: float) -> float:
    """``hi - lo``; a range within float32's rounding of the values (or none) is floored.

    The floor ``_EPS`` keeps a constant image from dividing by zero; it is not applied to a
    real range of small values (an image in metres, x1e-30), which it would flatten to an
    all-background mask.
    """
    span = hi - lo
    if span >= max(_EPS * max(abs(lo), abs(hi)), _FLOAT32_TINY):
        return span
    return max(span, _EPS)


def _check_float32(offsets: list[float], scales: list[float]) -> None:
    """The fitted statistics as float32 holds them (what :meth:`~NormalizationStats.apply`
    computes with) must be finite, and the scales normal float32 numbers (above 1.2e-38)."""
    with np.errstate(over="ignore"):
        offset32 = np.asarray(offsets, np.float64).astype(np.float32)
        scale32 = np.asarray(scales, np.float64).astype(np.float32)
    if not (np.isfinite(offset32).all() and np.isfinite(scale32).all()
            and (scale32 >= _FLOAT32_TINY).all()):
        raise InputShapeError(
            "The image's intensity range cannot be normalised in float32 (offset "
            f"{max(offsets, key=abs):.3g}, scale {max(scales, key=abs):.3g}); rescale it first.")


def normalize(
    image: np.ndarray,
    config: NormalizationConfig | None = None,
    channel_axis: int | None = None,
) -> np.ndarray:
    """Normalize a whole image in memory (float32), as the network saw it in training.

    Args:
        image: any axes; ``channel_axis`` names the channel axis (None: one channel).
        config: the normalization; None is percentile 1-99.8 per channel.
        channel_axis: index of the channel axis, or None.
    """
    image = np.asarray(image)
    check_pixels(image)
    stats = fit_normalization(sample_values(image, channel_axis), config)
    out = stats.apply(image[None] if channel_axis is None else image, channel_axis or 0)
    if not np.isfinite(out).all():
        raise InputShapeError(_NONFINITE_NORMALISED)
    return out[0] if channel_axis is None else out
