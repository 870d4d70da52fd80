"""The example a package carries: a test input cut from a shipped sample, the outputs the
network gives for it, and a cover image.

The test input is the raw sample (float32, not normalised: the package's pre-processing
normalises it), 1 x C x H x W with H and W the largest multiples of the network's divisor
that fit the sample and its preferred tile. The test outputs are the network's
probabilities (sigmoid or softmax of its logits, as the package's post-processing computes
them) on the input normalised as napari-medseg normalises it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import InputShapeError

__all__ = ["Example", "make_example", "cover_image", "activate"]


@dataclass(frozen=True)
class Example:
    """A package's test data.

    Attributes:
        sample: the shipped sample it was cut from.
        raw: 1 x C x H x W float32, the image as read.
        normalised: 1 x C x H x W float32, what the network takes.
        outputs: head name -> 1 x K x H' x W' float32 probabilities.
    """

    sample: str
    raw: np.ndarray
    normalised: np.ndarray
    outputs: dict[str, np.ndarray]


def _plane_cyx(name: str, in_channels: int) -> np.ndarray:
    """The first plane of a shipped sample as C x Y x X float32 with ``in_channels``."""
    from ...io.samples import load_sample
    from ..layout import channel_conversion, convert_channels

    image, meta, _ = load_sample(name)
    array = np.asarray(image)
    axes = meta.axes
    if "C" in axes:
        array = np.moveaxis(array, axes.index("C"), 0)
        axes = "C" + axes.replace("C", "")
    else:
        array, axes = array[None], "C" + axes
    while len(axes) > 3:  # the first plane of a stack
        array, axes = array[:, 0], axes[0] + axes[2:]
    conversion = channel_conversion(array.shape[0], in_channels)
    return convert_channels(array.astype(np.float32), conversion).astype(np.float32)


def _crop(plane: np.ndarray, spec) -> np.ndarray:
    """The centre of ``plane`` at the largest valid side that fits it and the preferred tile."""
    sides = []
    for size in plane.shape[1:]:
        side = min(size, spec.valid_size(spec.preferred_tile)) // spec.divisor * spec.divisor
        if side < spec.min_size:
            raise InputShapeError(
                f"The sample is {size} pixels wide, less than the {spec.min_size} the "
                "network needs; choose another sample.")
        sides.append(side)
    y0, x0 = ((s - c) // 2 for s, c in zip(plane.shape[1:], sides))
    return plane[:, y0:y0 + sides[0], x0:x0 + sides[1]]


def activate(head: str, logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits (C first after the batch): softmax over several mask
    classes, sigmoid otherwise."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    if head == "mask" and t.shape[1] > 1:
        return torch.softmax(t, dim=1).numpy()
    return torch.sigmoid(t).numpy()


def make_example(module, sample: str, normalization) -> Example:
    """The test data of ``module`` (a :class:`~.graphs.HeadLogits`) on ``sample``.

    Args:
        module: the network as exported.
        sample: a shipped sample's name.
        normalization: the checkpoint's :class:`~napari_medseg.config.NormalizationConfig`
            (None: napari-medseg's default).
    """
    import torch

    from ..inference.normalization import normalize

    spec = module.spec
    raw = _crop(_plane_cyx(sample, spec.in_channels), spec)[None]
    normalised = normalize(raw[0], normalization, channel_axis=0)[None].astype(np.float32)
    with torch.no_grad():
        logits = module(torch.from_numpy(normalised))
    outputs = {h: activate(h, t.numpy()) for h, t in zip(module.heads, logits)}
    return Example(sample, np.ascontiguousarray(raw), normalised, outputs)


def cover_image(example: Example) -> np.ndarray:
    """A 2:1 RGB uint8 picture: the test input beside it with the foreground in cyan."""
    from PIL import Image

    image = example.normalised[0]
    grey = image.mean(axis=0) if image.shape[0] != 3 else None
    rgb = np.stack([grey] * 3, -1) if grey is not None else np.moveaxis(image, 0, -1)
    rgb = np.clip(rgb, 0.0, 1.0)
    probs = example.outputs["mask"][0]
    fg = probs[-1] if probs.shape[0] > 1 else probs[0]
    side = rgb.shape[0]
    fg = np.asarray(Image.fromarray((fg * 255).astype(np.uint8)).resize(
        (rgb.shape[1], side)), np.float32)[..., None] / 255.0 > 0.5
    overlay = np.where(fg, 0.5 * rgb + 0.5 * np.array([0.0, 1.0, 1.0]), rgb)
    both = np.concatenate([rgb, overlay], axis=1)
    out = Image.fromarray((both * 255).astype(np.uint8))
    width = max(both.shape[1], 2 * both.shape[0])
    canvas = Image.new("RGB", (width, width // 2))
    scale = min(width / out.width, (width // 2) / out.height)
    out = out.resize((int(out.width * scale), int(out.height * scale)))
    canvas.paste(out, ((width - out.width) // 2, (width // 2 - out.height) // 2))
    return np.asarray(canvas)
