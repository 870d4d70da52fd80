"""The tile plan: what a prediction will cost, shown before it runs.

:class:`TilePlan` holds the tile grid of one plane, the number of planes and tiles, the forward
passes (tiles x TTA flips), the batch size, device and precision, and an estimate of memory
and time. Before anything runs the memory estimate is analytic (model, band buffers, outputs
kept in memory, and activations guessed from the tile size); a one-batch probe then replaces
the activation guess by a measurement (peak bytes of live activations, from forward hooks,
on any device) and adds a time estimate (seconds per forward pass of the probe x passes).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from .tiling import TileGrid

__all__ = ["TilePlan", "band_bytes", "format_bytes", "format_seconds", "available_memory",
           "memory_budget", "memory_shortfall", "unwritten_message"]

#: Activation bytes guessed per input pixel and sample before a probe measures them (a
#: U-Net-like network in fp32 holds roughly this many bytes of live feature maps per pixel).
ACTIVATION_BYTES_PER_PIXEL = 1024


def band_bytes(grid: TileGrid, channels: int, boundary: bool = False) -> int:
    """Bytes of the float32 band buffers of one plane's stitchers.

    Args:
        grid: the plane's tile grid.
        channels: channels of the probability stitcher (with the variance channel).
        boundary: a boundary stitcher too.
    """
    row = grid.out_tile[0] * math.prod(p * grid.scale for p in grid.padded[1:])
    channels = channels + 1 + (2 if boundary else 0)  # + the weight sums
    return row * channels * 4


def format_bytes(n: int | float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def format_seconds(s: float | None) -> str:
    """``75`` -> ``"1 min 15 s"``."""
    if s is None:
        return "?"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec} s"
    h, m = divmod(m, 60)
    return f"{h} h {m} min"


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux ``MemAvailable``, else the free
    physical pages); None when it cannot be told."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def memory_budget(fraction: float = 0.5) -> int | None:
    """Bytes that outputs held in memory may take: ``fraction`` of the memory available now
    (:func:`available_memory`); None when that cannot be told."""
    free = available_memory()
    return None if free is None else int(free * float(fraction))


def memory_shortfall(output_bytes: int, fraction: float = 0.5) -> str | None:
    """One sentence when outputs of ``output_bytes`` held in memory exceed the memory budget
    (``fraction`` of the memory available now), proposing a zarr store; None when they fit."""
    budget = memory_budget(fraction)
    if budget is None or output_bytes <= budget:
        return None
    free = available_memory() or 0
    return (f"The outputs would hold {format_bytes(output_bytes)} in memory, over the memory "
            f"budget of {format_bytes(budget)} ({fraction:.0%} of the {format_bytes(free)} "
            "available); write them to a zarr store instead (-o OUT.zarr on the command line, "
            "store= in Python).")


def unwritten_message(image, meta=None) -> str | None:
    """One sentence when ``image`` is a chunked store array (a zarr array, or one the reader
    found without chunks: ``meta.extra["chunks_written"]`` False) none of whose chunks is
    written, so every pixel is its fill value; None otherwise (or when it cannot be told)."""
    extra = getattr(meta, "extra", None) or {}
    if extra.get("chunks_written") is True:
        return None  # the reader already found a chunk (it stops at the first)
    if extra.get("chunks_written") is False:
        total = math.prod(getattr(image, "numblocks", None) or (0,))
    else:
        count = getattr(image, "nchunks_initialized", None)
        try:
            if int(count() if callable(count) else count):
                return None
            total = int(image.nchunks)
        except (TypeError, ValueError, AttributeError, OSError):
            return None
    if not total:
        return None
    return (f"The image holds no data: none of its {total} chunks is written, so every pixel "
            "is the store's fill value; write the image first or check its path.")


@dataclass(frozen=True)
class TilePlan:
    """What a prediction will do and cost.

    Attributes:
        image_shape: shape of the source array.
        axes: its axes.
        plane_axes: axes of one network input region (``YX``, ``ZYX`` ...).
        stack_axes: axes iterated over.
        grid: the tile grid of one plane.
        planes: number of planes (slices) to predict (all, resumed ones included).
        planes_todo: planes not yet finished in a resumed store.
        passes: volume passes (3 for orthogonal consensus, else 1).
        tta_flips: forward passes per tile (1 without TTA).
        batch_size: tiles per forward pass.
        device: e.g. ``cpu`` or ``cuda:0``.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        channels_last: channels-last memory format used.
        model_bytes: parameters and buffers.
        band_bytes: stitcher buffers (one tile row per head).
        output_bytes: outputs kept in memory (0 when streamed to a store).
        activation_bytes: peak live activations of one batch (measured when ``probed``).
        seconds_per_pass: measured seconds per tile forward pass (probe), or None.
        probed: True once a batch was measured.
        notes: lines worth showing (conversions, clamps, TTA cost).
    """

    image_shape: tuple[int, ...]
    axes: str
    plane_axes: str
    stack_axes: str
    grid: TileGrid
    planes: int
    planes_todo: int
    passes: int
    tta_flips: int
    batch_size: int
    device: str
    precision: str
    channels_last: bool
    model_bytes: int
    band_bytes: int
    output_bytes: int
    activation_bytes: int
    seconds_per_pass: float | None = None
    probed: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tiles_per_plane(self) -> int:
        """Tiles covering one plane."""
        return len(self.grid)

    @property
    def tiles(self) -> int:
        """Tiles still to compute (all passes, planes not yet finished)."""
        return self.tiles_per_plane * self.planes_todo * self.passes

    @property
    def forward_passes(self) -> int:
        """Tile forward passes still to compute (tiles x TTA flips)."""
        return self.tiles * self.tta_flips

    @property
    def batches(self) -> int:
        """Batches still to run (per plane the tiles are batched separately)."""
        per_plane = math.ceil(self.tiles_per_plane / self.batch_size) * self.tta_flips
        return per_plane * self.planes_todo * self.passes

    @property
    def compute_ratio(self) -> float:
        """Pixels the network computes / pixels of the image (the cost of overlap)."""
        return self.grid.computed_pixels / math.prod(self.grid.shape)

    @property
    def memory_bytes(self) -> int:
        """Estimated peak memory of the run (excluding the input image itself)."""
        return self.model_bytes + self.band_bytes + self.output_bytes + self.activation_bytes

    @property
    def seconds(self) -> float | None:
        """Estimated seconds for the remaining forward passes (None before a probe)."""
        if self.seconds_per_pass is None:
            return None
        return self.seconds_per_pass * self.forward_passes

    def replace(self, **changes) -> TilePlan:
        """A copy with fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-friendly summary."""
        return {
            "image_shape": list(self.image_shape), "axes": self.axes,
            "plane_axes": self.plane_axes, "stack_axes": self.stack_axes,
            "tile": list(self.grid.tile), "overlap_starts": [list(s) for s in self.grid.starts],
            "tiles_per_plane": self.tiles_per_plane, "planes": self.planes,
            "planes_todo": self.planes_todo, "passes": self.passes, "tiles": self.tiles,
            "tta_flips": self.tta_flips, "forward_passes": self.forward_passes,
            "batch_size": self.batch_size, "batches": self.batches, "device": self.device,
            "precision": self.precision, "channels_last": self.channels_last,
            "compute_ratio": round(self.compute_ratio, 3),
            "memory_bytes": self.memory_bytes, "model_bytes": self.model_bytes,
            "band_bytes": self.band_bytes, "output_bytes": self.output_bytes,
            "activation_bytes": self.activation_bytes, "probed": self.probed,
            "seconds_per_pass": self.seconds_per_pass, "seconds": self.seconds,
            "notes": list(self.notes),
        }

    def describe(self) -> str:
        """A few lines for a person."""
        tile = "x".join(str(t) for t in self.grid.tile)
        lines = [
            f"{_count(self.tiles, 'tile')} of {tile} ({self.tiles_per_plane} per plane x "
            f"{_count(self.planes_todo, 'plane')}"
            + (f" x {self.passes} passes" if self.passes > 1 else "") + ")"
            + (f", x{self.tta_flips} TTA = {self.forward_passes} forward passes"
               if self.tta_flips > 1 else "")
            + f"; the network computes {self.compute_ratio:.2f}x the image's pixels.",
            f"{self.device}, {self.precision}, batch {self.batch_size}"
            + (", channels-last" if self.channels_last else "") + ".",
            f"Memory ~{format_bytes(self.memory_bytes)} (model {format_bytes(self.model_bytes)}, "
            f"activations {format_bytes(self.activation_bytes)}"
            + ("" if self.probed else " guessed") + f", buffers {format_bytes(self.band_bytes)}, "
            f"outputs {format_bytes(self.output_bytes)}).",
        ]
        if self.seconds is not None:
            lines.append(f"Time ~{format_seconds(self.seconds)} "
                         f"({self.seconds_per_pass * 1000:.0f} ms per tile pass, one-batch probe).")
        lines.extend(self.notes)
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    """``1 tile``, ``4 tiles``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
