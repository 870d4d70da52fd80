"""The losses by name: each network's loss registers under the value of ``ModelSpec.loss``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ....models.spec import ModelSpec

__all__ = ["LossFn", "register_loss", "get_loss", "compute_loss", "list_losses"]

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
