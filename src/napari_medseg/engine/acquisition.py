"""What kind of light-microscopy image a picture is: fluorescence, bright-field or H&E.

Scores are reported per acquisition type (nuclei segmentation behaves very differently on a
dark fluorescence field and on stained tissue), so the type is read from the pixels alone:

* **grey** images (a single channel, or three equal channels R == G == B) are
  ``"fluorescence"`` when the background is dark and ``"bright-field"`` when it is light;
* **colour** images (three channels that differ anywhere) are ``"H&E"`` (stained tissue).

The background is *light* when, for 8-bit images, the mean grey value is above 100 (of 255);
for any other dtype (16-bit, float) the scale is unknown, so it is light when the median lies
above the midpoint between the 1st and 99th percentiles (most pixels are background, so the
median is a background value). Only a single 2D plane with 1 or 3 channels is typed; any
other image (a volume, a stack, 2 or 4 channels) gets None.
"""

from __future__ import annotations

import numpy as np

from ..config.training import ACQUISITION_TYPES  # the types acquisition_type returns

__all__ = ["ACQUISITION_TYPES", "LIGHT_MEAN_8BIT", "acquisition_type"]

#: An 8-bit grey image whose mean is above this has a light background.
LIGHT_MEAN_8BIT = 100.0


def _plane(image: np.ndarray, axes: str) -> np.ndarray | None:
    """The image as Y x X x C (C = 1 without a channel axis), or None when it is not one plane."""
    arr = np.asarray(image)
    if len(axes) != arr.ndim:
        raise ValueError(f"axes {axes!r} do not fit an image of shape {arr.shape}")
    if "Y" not in axes or "X" not in axes:
        return None
    extra = [i for i, a in enumerate(axes) if a not in "YXC"]
    if any(arr.shape[i] != 1 for i in extra):
        return None  # a volume, a time series or a stack of images
    arr = arr.squeeze(tuple(extra)) if extra else arr
    kept = "".join(a for a in axes if a in "YXC")
    if "C" not in kept:
        return np.moveaxis(arr, [kept.index("Y"), kept.index("X")], [0, 1])[..., None]
    return np.moveaxis(arr, [kept.index(a) for a in "YXC"], [0, 1, 2])


def acquisition_type(image: np.ndarray, axes: str) -> str | None:
    """``"fluorescence"``, ``"bright-field"`` or ``"H&E"`` for a 2D light-microscopy image.

    Args:
        image: the image, axes ``axes``.
        axes: its axes, letters of ``TICZYX`` (e.g. ``"YX"``, ``"YXC"``, ``"CYX"``).

    Returns:
        The type (see the module's rules), or None when the image is not a single 2D plane
        with 1 or 3 channels.

    Raises:
        ValueError: ``axes`` does not fit the image's dimensions.
    """
    plane = _plane(image, axes)
    if plane is None or plane.shape[-1] not in (1, 3):
        return None
    if plane.shape[-1] == 3:
        if not (np.array_equal(plane[..., 0], plane[..., 1])
                and np.array_equal(plane[..., 1], plane[..., 2])):
            return "H&E"
    grey = plane[..., 0]
    if grey.dtype == np.uint8:
        light = float(grey.mean()) > LIGHT_MEAN_8BIT
    else:
        values = grey.astype(np.float64)
        low, high = np.nanpercentile(values, [1, 99])
        light = float(np.nanmedian(values)) > (low + high) / 2
    return "bright-field" if light else "fluorescence"
