"""The one rule for the axes of an array that came without them.

Every place that must name the axes of a bare N-D array (a zarr array without metadata, an
array written without an :class:`~napari_medseg.io.ImageMeta`, a napari layer without the
reader's metadata, an image handed to the inference engine, a fine-tuning image next to its
labels) asks :func:`guess_axes`, so a shape reads the same everywhere given the same hints.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InputShapeError

__all__ = ["guess_axes"]

#: Axes of an array with no channel axis, by its number of dimensions.
_NO_CHANNELS = {2: "YX", 3: "ZYX", 4: "TZYX"}


def guess_axes(shape: Sequence[int], in_channels: int | None = None,
               rgb: bool | None = None) -> str:
    """Axes (letters from ``TCZYX``) for an array whose source gave none.

    Rules, for 2 to 4 dimensions:

    * told ``rgb=True`` (the last axis holds colour samples): the rest as with no channel
      axis, then ``C`` (``YXC``, ``ZYXC``, ``TZYXC``);
    * told ``rgb=False`` (no channel axis: labels, or a napari layer that is not RGB, since
      napari shows other channels as separate layers): ``YX``, ``ZYX``, ``TZYX``;
    * otherwise from the shape: 2-D is ``YX``. 3-D is ``YXC`` with 3 or 4 last (and more
      than 4 first), ``CYX`` when the first axis equals the network's channels (2-4), else
      ``ZYX`` (a short stack). 4-D is ``ZYXC`` with 3 or 4 last (and more than 4 second),
      ``CZYX`` with at most 4 first, else ``TZYX``; for a network whose channels differ from
      a first axis of 2-4 the array is refused (channels or time points cannot be told).

    Args:
        shape: the array's shape.
        in_channels: the channels of the network the array is for (None: no network).
        rgb: whether the last axis is colour (None: not known).

    Raises:
        InputShapeError: fewer than 2 or more than 4 axes (besides colour).
    """
    shape = tuple(int(s) for s in shape)
    if rgb:
        return guess_axes(shape[:-1], rgb=False) + "C"
    if rgb is not None or len(shape) not in (3, 4):
        if len(shape) in _NO_CHANNELS:
            return _NO_CHANNELS[len(shape)]
        raise InputShapeError(
            f"Cannot tell the axes of an array of shape {shape}; give them (e.g. axes='ZYX').")
    first, last = shape[0], shape[-1]
    if len(shape) == 3:
        if last in (3, 4) and first > 4:
            return "YXC"
        if in_channels and 2 <= in_channels <= 4 and first == in_channels:
            return "CYX"
        return "ZYX"
    if last in (3, 4) and shape[1] > 4:
        return "ZYXC"
    if first <= 4:
        if in_channels and 1 < first != in_channels:
            raise InputShapeError(
                f"Cannot tell whether the first axis of an array of shape {shape} holds "
                f"channels or time points (the network takes {in_channels} channel(s)); give "
                "the axes (e.g. axes='CZYX' or 'TZYX').")
        return "CZYX"
    return "TZYX"
