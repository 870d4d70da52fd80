"""The base class every registered network derives from."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from ..errors import InputShapeError
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

    def _make_spec(self, network: str, **fields: Any) -> ModelSpec:
        """The spec of ``network`` built from ``self.config`` (variant, input channels,
        classes) and the other :class:`ModelSpec` ``fields``."""
        c = self.config
        return ModelSpec(network=network, variant=c.variant, in_channels=c.in_channels,
                         num_classes=c.num_classes, **fields)

    def _check_batch(
        self, x: Tensor, name: str, *, multiple_of: int = 1, min_size: int = 1
    ) -> None:
        """Raise :class:`InputShapeError` unless ``x`` is an N×C×H×W batch that fits.

        C must be ``config.in_channels``; with ``multiple_of`` > 1, H and W must be positive
        multiples of it; with ``min_size`` > 1, neither may be smaller. ``name`` starts the
        messages. The sizes are not passed through ``int()``, so they stay symbolic under
        export.
        """
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise InputShapeError(
                f"{name} expects an N×{self.config.in_channels}×H×W batch, "
                f"got shape {tuple(x.shape)}."
            )
        h, w = x.shape[-2], x.shape[-1]
        if multiple_of > 1 and (h % multiple_of or w % multiple_of
                                or h < multiple_of or w < multiple_of):
            raise InputShapeError(
                f"{name} needs height and width that are multiples of {multiple_of}, "
                f"got {h}×{w}; pad or crop the tile."
            )
        if min_size > 1 and min(h, w) < min_size:
            raise InputShapeError(
                f"{name} needs images of at least {min_size}×{min_size} pixels, "
                f"got {(h, w)}; pad or tile the image to a larger size."
            )

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the encoder, by ``spec.encoder_prefixes``."""
        prefixes = tuple(self.spec.encoder_prefixes)
        for name, param in self.named_parameters():
            if prefixes and name.startswith(prefixes):
                yield param

    def forward(self, x: Tensor) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError
