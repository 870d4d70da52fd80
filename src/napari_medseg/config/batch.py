"""Settings of a batch run over a folder (``engine.batch``, ``napari-medseg batch``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .base import ConfigBase, choices, config_from_mapping
from .inference import PredictConfig

__all__ = ["BATCH_FORMATS", "BATCH_OUTPUTS", "BatchConfig"]

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
    format: str = field(default="tif", metadata=choices(*BATCH_FORMATS))
    output: str = field(default="mask", metadata=choices(*BATCH_OUTPUTS))
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
