"""How an image's axes map onto a network's input: planes, stacks and channels.

An image has axes from ``TICZYX`` (as in :class:`napari_medseg.io.ImageMeta`). A 2D network
sees *planes* (two spatial axes) and iterates over the rest (the slicing axis of a volume,
``T`` and ``I``); a 3D network sees ``ZYX`` blocks. :class:`Layout` records that choice, and
:class:`PlaneView` presents one plane of a source array (numpy, zarr, dask) as a lazy
``C x (plane)`` array with the channel conversion the network needs (grey <-> RGB) applied
on read, so the tiler reads only the pixels of each tile.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, InputShapeError

__all__ = [
    "LUMINANCE",
    "CONVERSION_WORDS",
    "channel_conversion",
    "Layout",
    "PlaneView",
    "run_layouts",
    "convert_channels",
]

#: Weights of R, G, B in a grey value (ITU-R BT.709, as scikit-image's rgb2gray).
LUMINANCE = (0.2125, 0.7154, 0.0721)

#: The channel conversions in words (for notices).
CONVERSION_WORDS = {"rgb2grey": "RGB to grey", "rgba2grey": "RGBA to grey",
                    "grey2rgb": "grey to RGB", "rgba2rgb": "RGBA to RGB (alpha dropped)"}

_STACK_LETTERS = "TI"


def channel_conversion(have: int, need: int, mode: str = "auto") -> str | None:
    """The conversion from ``have`` image channels to the ``need`` of a network.

    Args:
        have: channels of the image (1 when it has no channel axis).
        need: channels the network takes.
        mode: ``auto`` (convert only when the counts differ), ``grey`` or ``rgb`` (convert
            the image to that first).

    Returns:
        None (no change), ``"rgb2grey"``, ``"rgba2grey"``, ``"grey2rgb"`` or ``"rgba2rgb"``.

    Raises:
        InputShapeError: the counts cannot be reconciled.
    """
    target = {"grey": 1, "rgb": 3}.get(mode, need)
    steps: dict[tuple[int, int], str] = {
        (3, 1): "rgb2grey", (4, 1): "rgba2grey", (1, 3): "grey2rgb", (4, 3): "rgba2rgb",
    }
    if have == target == need:
        return None
    conversion = steps.get((have, target)) if have != target else None
    if have != target and conversion is None:
        if target == need:
            raise InputShapeError(
                f"The network expects {need} input channel(s) but the image has {have}; give "
                "it an image with that many channels (grey and RGB images are converted "
                "automatically with the channels setting 'auto')."
            )
        raise InputShapeError(
            f"The image has {have} channel(s), which cannot be converted to "
            f"{'grey' if target == 1 else 'RGB'}; the network expects {need}."
        )
    if target != need:
        raise InputShapeError(
            f"The network expects {need} input channel(s) but the image was converted to "
            f"{target}; use --channels auto (or {'rgb' if need == 3 else 'grey'})."
        )
    return conversion


def convert_channels(block: np.ndarray, conversion: str | None) -> np.ndarray:
    """Apply a channel conversion to a C-first block."""
    if conversion is None:
        return block
    if conversion in ("rgb2grey", "rgba2grey"):
        w = np.asarray(LUMINANCE, np.float32).reshape((3,) + (1,) * (block.ndim - 1))
        return (block[:3].astype(np.float32) * w).sum(axis=0, keepdims=True)
    if conversion == "grey2rgb":
        return np.repeat(block, 3, axis=0)
    if conversion == "rgba2rgb":
        return block[:3]
    raise ValueError(f"unknown conversion {conversion!r}")


@dataclass(frozen=True)
class Layout:
    """How a source array is cut into network inputs.

    Attributes:
        axes: the source array's axes, e.g. ``"ZYXC"``.
        shape: the source array's shape.
        plane_axes: the axes one network input spans, in source order (``"YX"``, ``"ZX"``,
            ``"ZYX"``).
        stack_axes: the axes iterated over, in source order (``"Z"``, ``"TZ"``, ``""``).
        conversion: channel conversion applied on read (see :func:`channel_conversion`).
        in_channels: channels after conversion (the network's).
    """

    axes: str
    shape: tuple[int, ...]
    plane_axes: str
    stack_axes: str
    conversion: str | None
    in_channels: int

    @classmethod
    def build(
        cls,
        shape: Sequence[int],
        axes: str,
        spatial_dims: int,
        in_channels: int,
        slice_axis: str = "Z",
        channels: str = "auto",
    ) -> Layout:
        """Decide planes, stacks and channel conversion for a network.

        Args:
            shape: source shape.
            axes: source axes (letters from ``TICZYX``).
            spatial_dims: 2 or 3, from the network's spec.
            in_channels: channels the network takes.
            slice_axis: the axis a 2D network slices a volume along.
            channels: ``auto``, ``grey`` or ``rgb`` (see :func:`channel_conversion`).

        Raises:
            InputShapeError: a zero-length axis, axes that do not fit the shape, a 3D
                network without a Z axis, or channels that cannot be reconciled.
        """
        shape = tuple(int(s) for s in shape)
        axes = axes.upper()
        if len(axes) != len(shape):
            raise InputShapeError(
                f"The axes {axes!r} do not fit an array of shape {shape}."
            )
        if any(s == 0 for s in shape):
            raise InputShapeError(
                f"The image has a zero-length axis (shape {shape}); it holds no pixels."
            )
        spatial = "".join(a for a in axes if a in "ZYX")
        if spatial_dims == 3:
            if spatial != "ZYX":
                raise InputShapeError(
                    f"This network is 3D and needs a volume with Z, Y and X axes, not {axes!r}."
                )
            plane = spatial
        else:
            if "Z" in spatial:
                slice_axis = slice_axis.upper()
                if slice_axis not in spatial:
                    raise InputShapeError(f"The image has no {slice_axis} axis to slice along.")
                plane = "".join(a for a in spatial if a != slice_axis)
            else:
                plane = spatial
            if len(plane) != 2:
                raise InputShapeError(
                    f"A 2D network needs two in-plane axes; the image has {axes!r}.")
        stack = "".join(a for a in axes if a not in plane and a != "C")
        have = shape[axes.index("C")] if "C" in axes else 1
        conversion = channel_conversion(have, in_channels, channels)
        return cls(axes, shape, plane, stack, conversion, int(in_channels))

    @property
    def channel_axis(self) -> int | None:
        """Index of ``C`` in the source, or None."""
        i = self.axes.find("C")
        return None if i < 0 else i

    @property
    def source_channels(self) -> int:
        """Channels in the source (1 without a C axis)."""
        return self.shape[self.channel_axis] if self.channel_axis is not None else 1

    @property
    def plane_shape(self) -> tuple[int, ...]:
        """Spatial shape of one network input region (the whole plane)."""
        return tuple(self.shape[self.axes.index(a)] for a in self.plane_axes)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Sizes of the iterated axes."""
        return tuple(self.shape[self.axes.index(a)] for a in self.stack_axes)

    @property
    def n_planes(self) -> int:
        """Number of planes (network inputs regions)."""
        return math.prod(self.stack_shape)

    @property
    def out_axes(self) -> str:
        """Axes of a label output: the source axes without ``C``."""
        return self.axes.replace("C", "")

    def out_shape(self, scale: int = 1) -> tuple[int, ...]:
        """Shape of a label output: in-plane axes scaled, stack axes kept."""
        return tuple(
            self.shape[self.axes.index(a)] * (scale if a in self.plane_axes else 1)
            for a in self.out_axes
        )

    def plane_indices(self) -> Iterator[tuple[int, ...]]:
        """Stack indices of every plane, in order (one integer per stack axis)."""
        return itertools.product(*(range(n) for n in self.stack_shape))

    def out_index(
        self, stack_index: tuple[int, ...], plane_slices: Sequence[slice] | None = None
    ) -> tuple:
        """Index into a label output (``out_axes``) for a plane, or a region of it."""
        plane_slices = list(plane_slices) if plane_slices is not None else [
            slice(None)] * len(self.plane_axes)
        key = []
        for a in self.out_axes:
            if a in self.stack_axes:
                key.append(stack_index[self.stack_axes.index(a)])
            else:
                key.append(plane_slices[self.plane_axes.index(a)])
        return tuple(key)

    def view(self, source, stack_index: tuple[int, ...]) -> PlaneView:
        """The plane ``stack_index`` of ``source`` as a lazy C x (plane) array."""
        return PlaneView(source, self, tuple(stack_index))


class PlaneView:
    """One plane of a source array as a lazy ``C x (plane axes)`` array.

    Indexing with a tuple of slices (channels first, then the plane's axes) reads only that
    region from the source, moves the channels first, and applies the channel conversion.
    Only basic slicing is supported (what :func:`~napari_medseg.engine.inference.tiling.read_tile`
    needs).
    """

    def __init__(self, source, layout: Layout, stack_index: tuple[int, ...]) -> None:
        self.source = source
        self.layout = layout
        self.stack_index = stack_index
        self.shape = (layout.in_channels,) + layout.plane_shape
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32) if layout.conversion else np.dtype(source.dtype)

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = tuple(key) + (slice(None),) * (self.ndim - len(key))
        c_key, spatial = key[0], key[1:]
        src_key = []
        kept = []  # source letters kept in the result, in order
        for a in self.layout.axes:
            if a == "C":
                src_key.append(slice(None))
                kept.append(a)
            elif a in self.layout.plane_axes:
                src_key.append(spatial[self.layout.plane_axes.index(a)])
                kept.append(a)
            else:
                src_key.append(self.stack_index[self.layout.stack_axes.index(a)])
        block = np.asarray(self.source[tuple(src_key)])
        if "C" in kept:
            block = np.moveaxis(block, kept.index("C"), 0)
        else:
            block = block[None]
        block = convert_channels(block, self.layout.conversion)
        return block[c_key]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[(slice(None),) * self.ndim]
        return out if dtype is None else out.astype(dtype)


def run_layouts(shape: Sequence[int], axes: str, spatial_dims: int, in_channels: int,
                axis: str = "Z", channels: str = "auto", volume_mode: str = "slices",
                scale: int = 1) -> list[Layout]:
    """The layouts of one prediction: one, or three for orthogonal-plane consensus.

    Args:
        shape: the image's shape.
        axes: its axes.
        spatial_dims: the network's spatial axes (2 or 3).
        in_channels: the network's input channels.
        axis: the slicing axis of a volume for a 2D network.
        channels: the channel conversion mode (``auto``, ``grey``, ``rgb``).
        volume_mode: ``slices``, or ``orthogonal`` (a ZYX volume sliced along Z, Y and X).
        scale: the network's output side / input side.

    Raises:
        ConfigError: orthogonal consensus without a 2D network, a Z axis, or a same-size
            output.
    """
    if volume_mode != "orthogonal":
        return [Layout.build(shape, axes, spatial_dims, in_channels, axis, channels)]
    if spatial_dims != 2 or "Z" not in axes:
        raise ConfigError("Orthogonal-plane consensus needs a 2D network and a volume "
                          "with Z, Y and X axes.")
    if scale != 1:
        raise ConfigError("Orthogonal-plane consensus needs a network whose output has "
                          "the input's size (this one upsamples).")
    return [Layout.build(shape, axes, 2, in_channels, a, channels) for a in ("Z", "Y", "X")]
