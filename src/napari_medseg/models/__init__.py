"""The five networks behind one registry.

``create_model(name, variant, in_channels, num_classes, **overrides)`` builds any of them;
``list_models()`` names them. Network modules are imported on first use of the registry.
"""

from __future__ import annotations

from .registry import (
    config_to_dict,
    create_model,
    get_entry,
    list_models,
    list_variants,
    make_config,
    register_network,
    state_sha256,
)
from .spec import (
    HEAD_BOUNDARY,
    HEAD_CLASSIFICATION,
    HEAD_DEEP_SUPERVISION,
    HEAD_MASK,
    HEAD_SR_IMAGE,
    ModelSpec,
)

__all__ = [
    "create_model",
    "list_models",
    "list_variants",
    "get_entry",
    "make_config",
    "register_network",
    "config_to_dict",
    "state_sha256",
    "ModelSpec",
    "HEAD_MASK",
    "HEAD_BOUNDARY",
    "HEAD_SR_IMAGE",
    "HEAD_DEEP_SUPERVISION",
    "HEAD_CLASSIFICATION",
]
