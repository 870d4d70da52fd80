"""Settings as data: frozen dataclasses whose defaults are the documented defaults.

One module a concept, every name re-exported here (``from napari_medseg.config import X``):

- :mod:`.base`: ``ConfigBase`` and ``from_mapping``, the one door of CLI flags, widget values
  and TOML files (``load_toml``), with its coercion rules;
- :mod:`.inference`: ``NormalizationConfig``, ``TilingConfig``, ``PredictConfig``
  (``InferenceConfig``) and the choices they take;
- :mod:`.training`: ``TrainConfig``, ``FinetuneConfig``, ``AugmentConfig``;
- :mod:`.batch`: ``BatchConfig`` and the batch output formats.

The config layer imports nothing from the engine, the models or io.
"""

from __future__ import annotations

from .base import ConfigBase, config_from_mapping, load_toml
from .batch import BATCH_FORMATS, BATCH_OUTPUTS, BatchConfig
from .inference import (
    BLEND_MODES,
    NORMALIZATION_MODES,
    OUTPUT_NAMES,
    PRECISIONS,
    InferenceConfig,
    NormalizationConfig,
    PredictConfig,
    TilingConfig,
)
from .training import AugmentConfig, FinetuneConfig, TrainConfig

__all__ = [
    "BATCH_FORMATS",
    "BATCH_OUTPUTS",
    "BLEND_MODES",
    "NORMALIZATION_MODES",
    "OUTPUT_NAMES",
    "PRECISIONS",
    "AugmentConfig",
    "BatchConfig",
    "ConfigBase",
    "FinetuneConfig",
    "InferenceConfig",
    "NormalizationConfig",
    "PredictConfig",
    "TilingConfig",
    "TrainConfig",
    "config_from_mapping",
    "load_toml",
]
