"""Analytic networks that follow the network contract, for engine tests (not collected).

Their mask logits are a pointwise function of the input, so a tiled prediction must equal the
untiled one exactly; ``kind="ramp"`` adds a position-dependent term (not flip-equivariant) to
give TTA something to disagree about.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from napari_medseg.models import registry
from napari_medseg.models.base import SegmentationNetwork
from napari_medseg.models.spec import ModelSpec

__all__ = ["AnalyticConfig", "AnalyticNet", "make_analytic", "registered_analytic", "logits_of"]


@dataclass(frozen=True)
class AnalyticConfig:
    """Config of :class:`AnalyticNet`."""

    variant: str = "tiny"
    in_channels: int = 1
    num_classes: int = 1
    scale: int = 1
    boundary: bool = False
    spatial_dims: int = 2
    divisor: int = 8
    min_size: int = 8
    preferred_tile: int = 32
    kind: str = "identity"


def logits_of(x: torch.Tensor, cfg: AnalyticConfig) -> torch.Tensor:
    """The mask logits of the analytic network for a batch N x C x (spatial)."""
    m = x.mean(dim=1, keepdim=True)
    if cfg.kind == "plus_one":
        m = m + 1.0
    elif cfg.kind == "ramp":
        ramp = torch.linspace(-2.0, 2.0, m.shape[-1], device=m.device, dtype=m.dtype)
        m = m + ramp
    for axis in range(-cfg.spatial_dims, 0):
        m = m.repeat_interleave(cfg.scale, dim=axis)
    if cfg.num_classes == 1:
        return m
    return torch.cat([m * k for k in range(cfg.num_classes)], dim=1)


class AnalyticNet(SegmentationNetwork):
    """``mask`` logits = a pointwise function of the channel mean (see :func:`logits_of`)."""

    def __init__(self, config: AnalyticConfig) -> None:
        super().__init__()
        self.config = config
        heads = ("mask", "boundary") if config.boundary else ("mask",)
        self.spec = ModelSpec(
            network="analytic", variant=config.variant, in_channels=config.in_channels,
            num_classes=config.num_classes, spatial_dims=config.spatial_dims,
            divisor=config.divisor, min_size=config.min_size, output_scale=config.scale,
            heads=heads, preferred_tile=config.preferred_tile,
        )
        self.gain = torch.nn.Parameter(torch.ones(1))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls += 1
        m = logits_of(x, self.config) * self.gain
        out = {"mask": m}
        if self.config.boundary:
            out["boundary"] = m[:, :1]
        return out


def make_analytic(**kwargs) -> AnalyticNet:
    """An :class:`AnalyticNet` with config overrides."""
    return AnalyticNet(AnalyticConfig(**kwargs)).eval()


@contextlib.contextmanager
def registered_analytic():
    """Register ``analytic`` in the network registry for the duration of the block."""
    registry._load_all()
    entry = registry.NetworkEntry(
        "analytic", AnalyticConfig, {"tiny": {}, "lite": {}, "paper": {}},
        AnalyticNet, "analytic test network")
    previous = registry._REGISTRY.get("analytic")
    registry._REGISTRY["analytic"] = entry
    try:
        yield entry
    finally:
        if previous is None:
            registry._REGISTRY.pop("analytic", None)
        else:
            registry._REGISTRY["analytic"] = previous
