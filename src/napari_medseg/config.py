"""Settings as data: frozen dataclasses whose defaults are the documented defaults.

CLI flags, widget values and TOML files all go through one door, ``from_mapping()``:

    cfg = PredictConfig.from_mapping({"tile": "256", "overlap": 0.5, "outputs": "mask,boundary"})
    cfg = PredictConfig.from_mapping(load_toml("run.toml", section="predict"))

``from_mapping`` coerces strings (as they come from a command line or a text field) to the
field's type, routes flat keys to nested configs (``tile`` -> ``tiling.tile``), rejects unknown
keys and values outside a field's choices with one :class:`~napari_medseg.errors.ConfigError`
sentence. Values in a mapping equal to ``None`` mean "not given" and keep the default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = [
    "BLEND_MODES",
    "NORMALIZATION_MODES",
    "OUTPUT_NAMES",
    "PRECISIONS",
    "ConfigBase",
    "NormalizationConfig",
    "TilingConfig",
    "PredictConfig",
    "InferenceConfig",
    "config_from_mapping",
    "load_toml",
    "AugmentConfig",
    "TrainConfig",
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

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}
_NONE = {"none", "auto", "null", ""}

C = TypeVar("C", bound="ConfigBase")


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": tuple(values)}


class ConfigBase:
    """Mixin of the config dataclasses: ``from_mapping``, ``to_dict`` and ``replace``."""

    @classmethod
    def from_mapping(cls: type[C], mapping: Mapping[str, Any] | None = None, **extra: Any) -> C:
        """Build the config from a (possibly nested, possibly flat) mapping of settings.

        Args:
            mapping: settings by field name; strings are coerced to the field's type.
            **extra: more settings, applied after ``mapping``.

        Raises:
            ConfigError: an unknown key or an invalid value.
        """
        merged = dict(mapping or {})
        merged.update(extra)
        return config_from_mapping(cls, merged)

    def to_dict(self) -> dict[str, Any]:
        """A JSON/TOML-friendly dict (tuples become lists, nested configs dicts)."""
        return _plain(dataclasses.asdict(self))  # type: ignore[call-overload]

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (coerced and validated like ``from_mapping``)."""
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        current = {f.name: getattr(self, f.name) for f in fields}
        current.update(changes)
        return config_from_mapping(type(self), current)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


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

    mode: str = field(default="percentile", metadata=_choices(*NORMALIZATION_MODES))
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
            uses the network's ``preferred_tile``. Rounded down to the network's divisor and
            clamped to the image (a tile larger than the image is simply made smaller).
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
    blend: str = field(default="gaussian", metadata=_choices(*BLEND_MODES))
    boundary_blend: str = field(default="crop", metadata=_choices(*BLEND_MODES))
    sigma_scale: float = 0.125
    min_weight: float = 1e-3
    padding: str = field(default="reflect", metadata=_choices("reflect", "edge", "constant"))
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
            ``variance`` output.
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
    """

    tiling: TilingConfig = field(default_factory=TilingConfig)
    normalization: NormalizationConfig | None = None
    device: str = "auto"
    precision: str = field(default="auto", metadata=_choices(*PRECISIONS))
    batch_size: int | None = None
    channels_last: bool | None = None
    axes: str | None = None
    axis: str = field(default="Z", metadata=_choices("Z", "Y", "X"))
    volume_mode: str = field(default="slices", metadata=_choices("slices", "orthogonal"))
    channels: str = field(default="auto", metadata=_choices("auto", "grey", "rgb"))
    tta: bool = False
    outputs: tuple[str, ...] = ("mask",)
    probabilities_dtype: str = field(default="float16", metadata=_choices("float16", "uint8"))
    threshold: float = 0.5
    boundary_threshold: float = 0.5
    instance_min_size: int = 8
    store: str | None = None
    resume: bool = True
    overwrite: bool = False
    oom_fallback: bool = True

    def __post_init__(self) -> None:
        bad = [o for o in self.outputs if o not in OUTPUT_NAMES]
        if bad:
            raise ConfigError(
                f"Unknown output {bad[0]!r}; choose from: {', '.join(OUTPUT_NAMES)}."
            )
        if not self.outputs:
            raise ConfigError(f"Ask for at least one output: {', '.join(OUTPUT_NAMES)}.")
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


# --- from_mapping machinery ---------------------------------------------------------------


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp) and issubclass(tp, ConfigBase)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Turn ``value`` into something of type ``hint`` or raise a ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        if NormalizationConfig in members and isinstance(value, str) and (
                value.strip().lower() in NORMALIZATION_MODES):
            # "none" is a normalization mode here, not "not given".
            return NormalizationConfig.from_mapping({"mode": value.strip().lower()})
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            if type(None) in members:
                return None
        errors: list[ConfigError] = []
        # Try the most specific member first: a string "256,320" is a tuple, "256" an int.
        ordered = sorted(
            (m for m in members if m is not type(None)),
            key=lambda m: 0 if (isinstance(value, str) and "," in value) == (
                typing.get_origin(m) is tuple) else 1,
        )
        for member in ordered:
            try:
                return _coerce(value, member, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if _is_config(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, str) and hint is NormalizationConfig:
            return NormalizationConfig.from_mapping({"mode": value.strip().lower()})
        if isinstance(value, Mapping):
            return hint.from_mapping(value)
        raise ConfigError(f"{where} must be a table of settings, not {value!r}.")
    if origin is tuple:
        args = typing.get_args(hint)
        items = value
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            items = [value]
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where} must be a list, not {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in items)
        if len(items) != len(args):
            raise ConfigError(f"{where} needs {len(args)} values, not {len(items)}.")
        return tuple(_coerce(v, a, where) for v, a in zip(items, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where} must be true or false, not {value!r}.")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a whole number, not {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a whole number, not {value!r}.")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, not {value!r}.")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, not {value!r}.")
    if hint is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"{where} must be text, not {value!r}.")
    return value


def config_from_mapping(cls: type[C], mapping: Mapping[str, Any]) -> C:
    """Build the frozen dataclass ``cls`` from a mapping; see the module docstring.

    Keys that are not fields of ``cls`` but are fields of one of its nested configs are
    routed there (``tile`` -> ``tiling.tile``). Dashes in keys are read as underscores.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a value outside the
            field's choices.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    nested = {name: hints[name] for name in fields if _is_config(hints[name])}
    own: dict[str, Any] = {}
    routed: dict[str, dict[str, Any]] = {name: {} for name in nested}
    for raw_key, value in mapping.items():
        key = str(raw_key).replace("-", "_")
        if value is None and key not in fields:
            continue
        if key in fields:
            own[key] = value
            continue
        target = next(
            (n for n, tp in nested.items() if key in {f.name for f in dataclasses.fields(tp)}),
            None,
        )
        if target is None:
            valid = sorted(set(fields) | {
                f.name for tp in nested.values() for f in dataclasses.fields(tp)})
            raise ConfigError(
                f"Unknown setting {raw_key!r} for {cls.__name__}; valid settings: "
                f"{', '.join(valid)}."
            )
        routed[target][key] = value
    kwargs: dict[str, Any] = {}
    for name, value in own.items():
        if value is None and name in nested:
            continue
        where = f"{cls.__name__}.{name}"
        coerced = _coerce(value, hints[name], where) if value is not None else None
        if value is None and type(None) not in typing.get_args(hints[name]):
            continue  # None means "not given": keep the default
        choices = fields[name].metadata.get("choices")
        if choices and coerced is not None:
            if isinstance(coerced, str):
                # Accept any letter case; the choices are stored in their canonical case.
                match = {c.lower(): c for c in choices}.get(coerced.strip().lower())
                if match is None:
                    raise ConfigError(
                        f"{where} must be one of {', '.join(choices)}, not {value!r}."
                    )
                coerced = match
        kwargs[name] = coerced
    for name, sub in routed.items():
        if not sub:
            continue
        base = kwargs.get(name)
        if base is None:
            base = fields[name].default_factory() if fields[name].default_factory is not \
                dataclasses.MISSING else nested[name]()  # type: ignore[misc]
        kwargs[name] = base.replace(**sub)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - a programming error, not a user's
        raise ConfigError(f"Invalid settings for {cls.__name__}: {exc}.") from None


def load_toml(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """Read a TOML file (optionally one ``[section]`` of it) into a plain dict.

    Raises:
        ConfigError: the file is missing, not TOML, or lacks the section.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"The settings file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"The settings file {path} is not valid TOML ({exc}).") from None
    if section is None:
        return data
    if section not in data:
        raise ConfigError(f"The settings file {path} has no [{section}] table.")
    return dict(data[section])


# --- batch runs (engine.batch) ------------------------------------------------------------

#: Output file formats of a batch run and their suffixes.
BATCH_FORMATS = {"tif": ".tif", "zarr": ".zarr", "nii": ".nii.gz"}
#: Label outputs a batch run can write (one file per input).
BATCH_OUTPUTS = ("mask", "instances", "boundary")


@dataclass(frozen=True)
class BatchConfig(ConfigBase):
    """A batch run over a folder (``engine.batch.run_folder_iter``, ``napari-medseg batch``).

    ``from_mapping`` takes the batch fields below and, flat beside them, any prediction
    setting (``device``, ``tile``, ``tta``, ``precision`` ...), which goes to ``predict``.

    Attributes:
        weights: a shipped weights tag or a checkpoint path (``.safetensors``/``.json``).
        model: instead of ``weights``, a network name built with random weights (to test a
            pipeline only; the run warns loudly).
        variant: the variant of ``model``.
        in_channels: image channels of ``model``.
        num_classes: classes of ``model`` (1 = one sigmoid logit).
        pattern: glob pattern the file names must match (``*.tif``).
        recursive: also look in sub-folders (outputs keep the sub-folder layout).
        format: output format: ``tif`` (OME-TIFF), ``zarr`` (OME-Zarr) or ``nii`` (NIfTI,
            ``.nii.gz``).
        output: which label image is written per input: ``mask``, ``instances`` or
            ``boundary``.
        workers: files predicted at the same time in this process (threads, one model each);
            ignored with a Dask cluster.
        scheduler: address of a running Dask scheduler (``tcp://HOST:PORT``).
        dask_local: start a local Dask cluster of this many worker processes (loopback only).
        force: predict every file again, even those an earlier run finished.
        predict: the prediction settings used for every file.
    """

    weights: str | None = None
    model: str | None = None
    variant: str = "lite"
    in_channels: int = 1
    num_classes: int = 2
    pattern: str = "*"
    recursive: bool = False
    format: str = field(default="tif", metadata=_choices(*BATCH_FORMATS))
    output: str = field(default="mask", metadata=_choices(*BATCH_OUTPUTS))
    workers: int = 1
    scheduler: str | None = None
    dask_local: int | None = None
    force: bool = False
    predict: PredictConfig = field(default_factory=PredictConfig)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None = None, **extra: Any) -> BatchConfig:
        """Build from batch fields plus flat prediction settings (see the class docstring).

        Raises:
            ConfigError: an unknown key or an invalid value.
        """
        merged = {str(k).replace("-", "_"): v for k, v in dict(mapping or {}, **extra).items()}
        own = {f.name for f in dataclasses.fields(cls)}
        flat = {k: v for k, v in merged.items() if k not in own}
        if flat:
            base = merged.get("predict")
            if isinstance(base, PredictConfig):
                merged["predict"] = base.replace(**flat)
            else:
                merged["predict"] = PredictConfig.from_mapping(dict(base or {}), **flat)
            merged = {k: v for k, v in merged.items() if k in own}
        return config_from_mapping(cls, merged)

    def __post_init__(self) -> None:
        if self.weights and self.model:
            raise ConfigError("Give either weights (a tag or checkpoint) or a model name for "
                              "random weights, not both.")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, not {self.workers}.")
        if self.dask_local is not None and self.dask_local < 1:
            raise ConfigError(f"dask_local must be at least 1 worker, not {self.dask_local}.")
        if self.scheduler and self.dask_local is not None:
            raise ConfigError("Give either a scheduler address or dask_local, not both.")
        if self.scheduler is not None and "://" not in self.scheduler:
            raise ConfigError(f"The scheduler address {self.scheduler!r} must look like "
                              "tcp://HOST:PORT.")
        if not self.pattern.strip():
            raise ConfigError("The file pattern is empty; use * for every file.")


__all__ += ["BATCH_FORMATS", "BATCH_OUTPUTS", "BatchConfig"]


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
    """

    flips: bool = True
    rot90: bool = True
    scale: tuple[float, float] = (0.8, 1.25)
    intensity: bool = True
    noise_std: float = 0.03
    elastic: float = 0.0

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ConfigError(f"The scale range must satisfy 0 < low <= high, not {self.scale}.")


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """Settings of ``napari-medseg train`` (:mod:`napari_medseg.engine.training.train`).

    Attributes:
        network: registry name of the network.
        variant: ``tiny``, ``lite`` or ``paper``.
        in_channels: image channels the network takes; 0 takes them from the first image
            (RGBA counts as RGB). Grey <-> RGB images are converted to fit.
        num_classes: K; 2 = background + foreground with softmax (the default for binary and
            instance masks), 1 = one sigmoid logit.
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
        instances: treat masks as instance labels (foreground + boundary targets); None
            decides per file.
        pattern: glob of the files to use in the folders.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` autocast.
        max_minutes: stop after this many minutes of training in all (a resumed run counts its
            earlier time); the learning rate decays to ``min_lr`` by then; the best checkpoint
            is kept. 0 = no limit.
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
    instances: bool | None = None
    pattern: str = "*"
    device: str = "auto"
    precision: str = field(default="auto", metadata=_choices(*PRECISIONS))
    max_minutes: float = 0.0
    freeze_encoder: bool = False
    resume: bool = True
    seed: int = 0
    dataset: str = ""
    checkpoint_dtype: str = field(default="float16", metadata=_choices("float16", "float32"))

    def __post_init__(self) -> None:
        for name in ("patch", "batch_size", "steps", "val_every", "input_downsample"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), not {self.val_fraction}.")
        if not self.lr > 0:
            raise ConfigError(f"The learning rate must be positive, not {self.lr}.")


@dataclass(frozen=True)
class FinetuneConfig(ConfigBase):
    """Settings of fine-tuning on a user's corrections (:mod:`napari_medseg.engine.training.finetune`,
    ``napari-medseg finetune`` and the Fine-tune widget).

    The defaults fit a CPU: a plain run on a handful of 256 x 320 images takes a few minutes.

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
        freeze_encoder: train only the decoder and heads (``model.encoder_parameters()``
            stay fixed).
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
        val_every: steps between validations.
        patience: validations without improvement before stopping early; 0 never stops.
        augment: flips, rot90 and intensity changes (no zoom by default).
        instances: treat labels as instances (foreground + boundary targets); None decides
            by the labels (more than one non-zero value means instances).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` autocast.
        max_minutes: stop after this many minutes (the best weights are kept); 0 = no limit.
        seed: random seed of the split, the sampling and the augmentation.
        checkpoint_dtype: ``float32`` (default: fine-tuning steps are small) or ``float16``.
    """

    steps: int = 200
    lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_steps: int = 10
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    batch_size: int = 4
    patch: int = 128
    freeze_encoder: bool = False
    freeze_norm_stats: bool = True
    replay: float = 0.25
    max_replay: int = 64
    margin: int = 16
    context: int = 32
    min_changed: int = 4
    slice_gap: int = 1
    val_fraction: float = 0.25
    val_every: int = 20
    patience: int = 4
    augment: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(scale=(1.0, 1.0), noise_std=0.02))
    instances: bool | None = None
    device: str = "auto"
    precision: str = field(default="auto", metadata=_choices(*PRECISIONS))
    max_minutes: float = 0.0
    seed: int = 0
    checkpoint_dtype: str = field(default="float32", metadata=_choices("float16", "float32"))

    def __post_init__(self) -> None:
        for name in ("patch", "batch_size", "steps", "val_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}.")
        for name in ("margin", "context", "min_changed", "slice_gap", "max_replay",
                     "warmup_steps", "patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, not {getattr(self, name)}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), not {self.val_fraction}.")
        if not 0.0 <= self.replay < 1.0:
            raise ConfigError(f"replay must be a fraction in [0, 1), not {self.replay}.")
        if not self.lr > 0:
            raise ConfigError(f"The learning rate must be positive, not {self.lr}.")


__all__ += ["FinetuneConfig"]
