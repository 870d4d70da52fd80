"""What a prediction returns: :class:`PredictionResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .plan import TilePlan

__all__ = ["PredictionResult"]


@dataclass
class PredictionResult:
    """What a prediction produced.

    Attributes:
        outputs: output name -> array (numpy, or a zarr array when streamed to a store):
            ``mask`` (labels; the image's axes without C, in-plane axes x output scale),
            ``probabilities`` (C x mask axes; C = K classes, K == 1 the foreground),
            ``boundary`` (uint8, 1 = boundary), ``instances`` (int32), ``variance`` (float16,
            TTA disagreement).
        axes: output name -> axes string (``"YX"``, ``"CZYX"`` ...).
        plan: the tile plan that ran (probed).
        stats: numbers about the run: ``seconds``, ``forward_passes``, ``device``,
            ``precision``, ``batch_size``, ``tile``, ``z_consistency`` (slice-wise volumes),
            ``plane_agreement`` (orthogonal consensus), ``normalization`` ...
        cancelled: True when stopped early; ``planes_done`` says what is complete.
        planes_done: indices of the finished planes.
        notices: the notices sent during the run.
        store: the zarr store path, when streamed.
        scale: output side / input side.
        meta: the label outputs' geometry (:class:`~napari_medseg.io.ImageMeta` on their
            grid: the input's spacing, origin and affine, made finer in-plane for a
            super-resolving network); probabilities add a leading ``C``.
    """

    outputs: dict[str, Any]
    axes: dict[str, str]
    plan: TilePlan | None
    stats: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False
    planes_done: tuple[int, ...] = ()
    notices: tuple[str, ...] = ()
    store: str | None = None
    scale: int = 1
    meta: Any = None

    def __getitem__(self, name: str) -> Any:
        return self.outputs[name]

    def __contains__(self, name: str) -> bool:
        return name in self.outputs
