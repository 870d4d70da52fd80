"""The base class every registered network derives from."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from .spec import ModelSpec

__all__ = ["SegmentationNetwork"]


class SegmentationNetwork(nn.Module):
    """A network with a frozen ``config`` and a ``spec`` the engine reads.

    Subclasses set ``self.config`` (a frozen dataclass) and ``self.spec`` in ``__init__``
    and implement ``forward(x) -> dict[str, Tensor | list[Tensor]]``: in eval mode the keys
    are ``spec.heads``; in training mode ``spec.train_outputs`` are added.
    """

    config: Any
    spec: ModelSpec

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the encoder, by ``spec.encoder_prefixes``."""
        prefixes = tuple(self.spec.encoder_prefixes)
        for name, param in self.named_parameters():
            if prefixes and name.startswith(prefixes):
                yield param

    def forward(self, x: Tensor) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError
