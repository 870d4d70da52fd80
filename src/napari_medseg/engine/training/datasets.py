"""Training data: image/mask pairs from folders, split by image, sampled as patches.

A *sample* is one 2D plane: an image ``C x H x W`` (float32, already normalised) with its class
mask ``H x W`` (int64) and, for instance data, a boundary map between touching objects. A 3D
stack contributes one sample per slice; its slices form contiguous *groups*, so a validation
split never shares a slice (or a neighbouring block of slices) with training.
"""

from __future__ import annotations

import dataclasses

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ...errors import ConfigError, ImageReadError, InputShapeError
from ..acquisition import ACQUISITION_TYPES, acquisition_type
from ..seg_task import SegTask, contact_weights, training_targets

__all__ = [
    "Sample",
    "find_pairs",
    "match_pairs",
    "Unpaired",
    "to_channels_first",
    "load_samples",
    "at_object_size",
    "training_diameter",
    "split_samples",
    "split_within",
    "counted",
    "oversampling_weights",
    "PatchSampler",
    "data_hash",
]


@dataclass
class Sample:
    """One 2D training plane.

    Attributes:
        image: C x H x W float32, normalised.
        mask: H x W int64 class indices.
        boundary: H x W uint8 boundary target (the boundary class of the instance task; None
            when the network derives its own).
        name: file stem, with ``@z`` for a slice of a stack.
        group: split unit (a file, or a block of neighbouring slices).
        weight: H x W float32 pixel weights of the loss (the instance task's contact
            weights), or None (every pixel 1).
        acquisition: the file's acquisition type (fluorescence, bright-field, H&E) read from
            its pixels as stored, as evaluation reads it; None for a stack or another kind.
    """

    image: np.ndarray
    mask: np.ndarray
    boundary: np.ndarray | None
    name: str
    group: str
    weight: np.ndarray | None = None
    acquisition: str | None = None


class Unpaired(NamedTuple):
    """An image that has no mask to be scored or trained against.

    Attributes:
        image: the image file.
        masks: the candidate masks (none, or more than one).
        reason: one sentence saying what is wrong and what to do.
    """

    image: Path
    masks: tuple[Path, ...]
    reason: str


def match_pairs(
    images: str | Path, masks: str | Path, pattern: str = "*"
) -> tuple[list[tuple[Path, Path]], list[Unpaired]]:
    """Pair every image with its mask by file stem, and say why any image has none.

    The mask of ``a.png`` is ``a.<any supported suffix>`` or ``a_mask.<suffix>`` in ``masks``.
    An image with no such mask, or with more than one, is not paired: it is listed with the
    reason. A file never pairs with itself, and when both folders are the same one, the
    ``<stem>_mask`` files there are masks, not images.

    Args:
        images: image folder.
        masks: mask folder (may be the image folder).
        pattern: glob of the files to use, in both folders.

    Returns:
        ``(pairs, unpaired)``: (image, mask) paths, and an :class:`Unpaired` for the rest.

    Raises:
        ImageReadError: a folder is missing.
    """
    from ...io import is_supported

    images, masks = Path(images), Path(masks)
    for folder in (images, masks):
        if not folder.is_dir():
            raise ImageReadError(f"{folder} is not a folder.")
    by_stem: dict[str, list[Path]] = {}
    for m in sorted(masks.glob(pattern)):
        if m.is_file() and is_supported(m):
            by_stem.setdefault(_stem(m), []).append(m)
    candidates = [p for p in sorted(images.glob(pattern)) if p.is_file() and is_supported(p)]
    if images.resolve() == masks.resolve():  # masks stored beside their images
        stems = {_stem(p) for p in candidates}
        candidates = [p for p in candidates
                      if not (_stem(p).endswith("_mask") and _stem(p)[: -len("_mask")] in stems)]
    pairs: list[tuple[Path, Path]] = []
    unpaired: list[Unpaired] = []
    for p in candidates:
        found = [m for m in by_stem.get(_stem(p), []) + by_stem.get(_stem(p) + "_mask", [])
                 if m.resolve() != p.resolve()]
        if len(found) == 1:
            pairs.append((p, found[0]))
        elif not found:
            unpaired.append(Unpaired(p, (), f"{p.name} has no mask named {_stem(p)}.* or "
                                             f"{_stem(p)}_mask.* in {masks}; add one."))
        else:
            unpaired.append(Unpaired(p, tuple(found), f"{p.name} has {len(found)} masks in "
                                     f"{masks} ({', '.join(m.name for m in found)}); keep one."))
    return pairs, unpaired


def find_pairs(images: str | Path, masks: str | Path, pattern: str = "*") -> list[tuple[Path, Path]]:
    """Image and mask files matched by file stem (``a.tif`` <-> ``a.tif`` or ``a_mask.tif``).

    Images without a mask are left out (see :func:`match_pairs`); an image with two masks is
    an error, since either could be the wrong one.

    Raises:
        ImageReadError: a folder is missing, an image has several masks, or no pair matched.
    """
    pairs, unpaired = match_pairs(images, masks, pattern)
    for item in unpaired:
        if item.masks:
            raise ImageReadError(item.reason)
    if not pairs:
        raise ImageReadError(
            f"No image in {images} has a mask of the same name in {masks}."
        )
    return pairs


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def to_channels_first(array: np.ndarray, axes: str) -> tuple[np.ndarray, str]:
    """Reorder an image to ``C`` + spatial axes (``CYX`` or ``CZYX``), adding C if missing.

    Args:
        array: the image as read.
        axes: its axes string (``"YX"``, ``"YXC"``, ``"ZYX"``, ``"CZYX"`` ...).
    """
    axes = axes.upper()
    extra = [a for a in axes if a not in "CZYX"]
    for a in extra:  # T or I of length 1 only
        if array.shape[axes.index(a)] != 1:
            raise InputShapeError(
                f"An image with a {a} axis of length {array.shape[axes.index(a)]} cannot be "
                "used as training data; split it into single images first."
            )
        array = np.take(array, 0, axis=axes.index(a))
        axes = axes.replace(a, "")
    if "C" not in axes:
        array, axes = array[None], "C" + axes
    spatial = [a for a in "ZYX" if a in axes]
    order = [axes.index("C")] + [axes.index(a) for a in spatial]
    return np.transpose(array, order), "C" + "".join(spatial)


def _match_channels(image: np.ndarray, in_channels: int, name: str) -> np.ndarray:
    c = image.shape[0]
    if c == in_channels:
        return image
    if in_channels == 1 and c in (3, 4):
        return image[:3].mean(axis=0, keepdims=True)
    if in_channels == 3 and c == 1:
        return np.repeat(image, 3, axis=0)
    if in_channels == 3 and c == 4:
        return image[:3]
    raise InputShapeError(f"{name} has {c} channels but the network takes {in_channels}.")


def load_samples(
    pairs: Iterable[tuple[Path, Path]],
    in_channels: int,
    normalize: Callable[[np.ndarray], np.ndarray],
    task: SegTask | None = None,
    block: int = 4,
    num_classes: int = 2,
    notes: list[str] | None = None,
    contact_weight: float = 1.0,
    object_diameter: float | None = None,
) -> list[Sample]:
    """Read image/mask pairs into 2D samples.

    Args:
        pairs: (image, mask) paths.
        in_channels: channels the network takes (RGB <-> grey converted as needed).
        normalize: maps a C x ... image to normalised float32 (the model card's normalisation).
        task: how the masks are read (:func:`~napari_medseg.engine.seg_task.training_targets`):
            objects for the ``instances`` task (three-class targets), class indices for
            ``classes`` (the default). Never decided from the masks' values.
        block: slices of a stack per split group.
        num_classes: K of the network (a class mask's values must be below it).
        notes: where a sentence is added when masks hold values above 1 that a one-class
            network reads as foreground (objects, or classes it merges).
        contact_weight: the instance task's loss weight on pixels where objects touch
            (:func:`~napari_medseg.engine.seg_task.contact_weights`); 1 = none.
        object_diameter: the ``instances`` task: each plane resized so the median diameter
            of its objects is this many pixels (:func:`at_object_size`); None keeps them.

    Raises:
        InputShapeError: a mask that does not fit its image, or a value with no class.
    """
    from ...io import read_image

    samples: list[Sample] = []
    for img_path, mask_path in pairs:
        image, meta = read_image(img_path)
        mask, mmeta = read_image(mask_path)
        image, axes = to_channels_first(np.asarray(image), meta.axes)
        kind = acquisition_type(image, axes)  # before normalising, as evaluation types it
        mask = np.asarray(mask)
        if mask.ndim == image.ndim:  # a mask stored with a channel axis
            mask = mask[..., 0] if mmeta.axes.endswith("C") else mask[0]
        if mask.shape != image.shape[1:]:
            raise InputShapeError(
                f"{mask_path.name} has shape {mask.shape} but its image {img_path.name} has "
                f"{image.shape[1:]}."
            )
        image = _match_channels(normalize(image.astype(np.float32)), in_channels, img_path.name)
        if notes is not None and not (task and task.instances) and num_classes <= 2 and int(
                mask.max(initial=0)) > 1 and not notes:
            notes.append(f"{mask_path.name} (and maybe others) holds labels above 1; a network "
                         "with one foreground class learns them all as foreground. For "
                         "separate objects train with --task instances, for several classes "
                         "with --classes K.")
        planes = [(image, mask, "")] if image.ndim == 3 else [
            (image[:, z], mask[z], f"@{z}") for z in range(image.shape[1])
        ]
        for i, (img2d, m2d, suffix) in enumerate(planes):
            if object_diameter and task is not None and task.instances:
                img2d, m2d = at_object_size(img2d, m2d, object_diameter)
            try:
                cls, boundary = training_targets(m2d, num_classes, task)
            except InputShapeError as exc:
                raise InputShapeError(f"{mask_path.name}: {exc}") from None
            group = _stem(img_path) + (f"#{i // block}" if suffix else "")
            weight = None
            if task is not None and task.instances and contact_weight != 1.0:
                weight = contact_weights(m2d, task.boundary_width, contact_weight)
            samples.append(Sample(np.ascontiguousarray(img2d, np.float32), cls, boundary,
                                  _stem(img_path) + suffix, group, weight, kind))
    return samples


def at_object_size(image: np.ndarray, labels: np.ndarray, diameter: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A C x H x W image and its H x W instance labels resized so the objects' median
    diameter is ``diameter`` pixels (the image as prediction's resampling feeds it, the
    labels by nearest neighbour); unchanged within the tolerance or without objects
    (:func:`~napari_medseg.engine.object_size.diameter_zoom`)."""
    import torch

    from ...models.working_resolution import resize_image
    from ..object_size import diameter_zoom, median_diameter

    measured = median_diameter([labels])
    zoom = None if measured is None else diameter_zoom(diameter, measured)
    if zoom is None:
        return image, labels
    size = tuple(max(1, int(round(s * zoom))) for s in labels.shape)
    resized = resize_image(torch.from_numpy(np.ascontiguousarray(image))[None], size)[0]
    rows = np.minimum(((np.arange(size[0]) + 0.5) / zoom).astype(int), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) / zoom).astype(int), labels.shape[1] - 1)
    return resized.numpy().astype(np.float32), labels[np.ix_(rows, cols)]


def training_diameter(pairs, stems: Iterable[str]) -> float | None:
    """The median object diameter of the masks of ``pairs`` (``(image, mask)`` paths) whose
    image's file stem is in ``stems``; each 2D plane of a stack is measured on its own."""
    from ...io import read_image
    from ..object_size import median_diameter

    wanted = set(stems)

    def planes():
        for image_path, mask_path in pairs:
            if _stem(Path(image_path)) not in wanted:
                continue
            labels, _ = read_image(mask_path)
            labels = np.asarray(labels)
            yield from labels.reshape((-1, *labels.shape[-2:]))

    return median_diameter(planes())


def split_samples(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split by group (never a group on both sides); at least one group on each side."""
    groups = sorted({s.group for s in samples})
    if len(groups) < 2 or val_fraction <= 0:
        return list(samples), []
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    n_val = min(len(groups) - 1, max(1, round(val_fraction * len(groups))))
    val_groups = {groups[i] for i in order[:n_val]}
    return ([s for s in samples if s.group not in val_groups],
            [s for s in samples if s.group in val_groups])


def split_within(samples: Sequence[Sample], val_fraction: float, gap: int,
                 seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out a strip of every sample instead of whole samples (for a handful of them).

    The strip is ``val_fraction`` of the longer side of the part of a sample that counts
    (its ``valid`` box for a correction crop, else the whole sample), at either end or in the
    middle, whichever holds the most of its rarer class. The validation sample is the strip
    (a correction crop keeps ``gap`` pixels of context on each side, where its ``valid`` map
    is 0); in the training copy the strip and ``gap`` pixels on each side of it count for
    nothing, so no labelled pixel is on
    both sides while every image still teaches most of itself. A sample too small to cut
    (fewer than 16 pixels in the strip or left over) stays whole in training.
    """
    rng = np.random.default_rng(seed)
    train_s: list[Sample] = []
    val_s: list[Sample] = []
    for s in samples:
        loss_map = counted(s)
        ys, xs = np.nonzero(loss_map > 0)
        if not len(ys):
            train_s.append(s)
            continue
        box = ((ys.min(), ys.max() + 1), (xs.min(), xs.max() + 1))
        axis = 0 if box[0][1] - box[0][0] >= box[1][1] - box[1][0] else 1
        lo, hi = box[axis]
        n = int(round(val_fraction * (hi - lo)))
        if val_fraction <= 0 or n < 16 or hi - lo - n - gap < 16:
            train_s.append(s)
            continue
        strip = _representative_strip(s.mask > 0, loss_map > 0, axis, lo, hi, n, rng)
        dropped = (max(lo, strip[0] - gap), min(hi, strip[1] + gap))
        # the network sees context beside the strip where a loss map can mask it out
        context = gap if hasattr(s, "valid") else 0
        kept = (max(0, strip[0] - context), min(s.mask.shape[axis], strip[1] + context))
        train_valid = loss_map.copy()
        _along(train_valid, axis, slice(*dropped))[...] = 0.0
        val_valid = np.zeros_like(loss_map)
        _along(val_valid, axis, slice(*strip))[...] = _along(loss_map, axis, slice(*strip))
        train_s.append(_with_loss_map(s, train_valid))
        val_s.append(_crop(_with_loss_map(s, val_valid), axis, slice(*kept)))
    return train_s, val_s


def _representative_strip(foreground: np.ndarray, counts: np.ndarray, axis: int, lo: int,
                          hi: int, n: int, rng: np.random.Generator) -> tuple[int, int]:
    """Of the strips of ``n`` at either end or the middle of ``[lo, hi)``, the one holding
    the most of its rarer class (foreground or background), so that its Dice says something
    (a lesion in the middle of a photograph is not validated on empty skin at its edges);
    ties drawn with ``rng``."""
    fg = (foreground & counts).sum(axis=1 - axis).astype(np.int64)
    area = counts.sum(axis=1 - axis).astype(np.int64)
    starts = [lo, (lo + hi - n) // 2, hi - n]
    rng.shuffle(starts)

    def rarer(a: int) -> int:
        f = int(fg[a:a + n].sum())
        return min(f, int(area[a:a + n].sum()) - f)

    best = max(starts, key=rarer)
    return best, best + n


def counted(s: Sample) -> np.ndarray:
    """Where a sample's loss counts: its ``valid`` map (correction crops) times its weights."""
    valid = getattr(s, "valid", None)
    out = np.ones(s.mask.shape, np.float32) if valid is None else valid.astype(np.float32)
    return out if s.weight is None else out * (s.weight > 0)


def _along(a: np.ndarray, axis: int, sl: slice) -> np.ndarray:
    index = [slice(None)] * a.ndim
    index[a.ndim - 2 + axis] = sl
    return a[tuple(index)]


def _with_loss_map(s: Sample, loss_map: np.ndarray) -> Sample:
    """``s`` whose loss counts only where ``loss_map`` > 0 (its ``valid`` map when it has
    one, else its pixel weights)."""
    if hasattr(s, "valid"):
        return dataclasses.replace(s, valid=loss_map)
    weight = loss_map if s.weight is None else s.weight * (loss_map > 0)
    return dataclasses.replace(s, weight=weight.astype(np.float32))


def _crop(s: Sample, axis: int, sl: slice) -> Sample:
    """``s`` cut to ``sl`` along ``axis`` (0: rows, 1: columns), every map alike."""
    changes = {name: np.ascontiguousarray(_along(getattr(s, name), axis, sl))
               for name in ("image", "mask", "boundary", "weight", "valid")
               if getattr(s, name, None) is not None}
    if getattr(s, "crop", None) and len(s.crop) == 4:
        y0, x0, y1, x1 = s.crop  # the image's pixels: arrays resampled from them scale back
        span = (y1 - y0, x1 - x0)[axis]
        per = span / max(1, s.mask.shape[axis])
        start = round((sl.start or 0) * per)
        stop = round(sl.stop * per) if sl.stop is not None else span
        changes["crop"] = ((y0 + start, x0, y0 + stop, x1) if axis == 0
                           else (y0, x0 + start, y1, x0 + stop))
    return dataclasses.replace(s, name=f"{s.name} (held-out strip)", **changes)


def oversampling_weights(samples: Sequence[Sample], factors: dict[str, float]
                         ) -> tuple[np.ndarray, dict[str, int]]:
    """How often each sample is drawn (relative weights) when the planes of some acquisition
    types (``TrainConfig.oversample``) are drawn ``factors[type]`` times as often as the
    others; and the planes per type."""
    kinds = [s.acquisition for s in samples]
    counts = {k: kinds.count(k) for k in ACQUISITION_TYPES if k in kinds}
    return np.array([float(factors.get(k, 1.0)) for k in kinds]), counts


class PatchSampler:
    """Random patches with foreground balance, padded (reflect) when an image is smaller.

    Args:
        samples: training samples.
        patch: patch side (input resolution x ``scale`` = the target's side).
        fg_fraction: probability that a patch is centred on a foreground pixel.
        seed: random seed.
        weights: how often each sample is drawn, relative to the others (None: equally).
    """

    def __init__(self, samples: Sequence[Sample], patch: int, fg_fraction: float = 0.5,
                 seed: int = 0, weights: Sequence[float] | None = None):
        if not samples:
            raise InputShapeError("There are no training samples.")
        self.samples = list(samples)
        self.patch = int(patch)
        self.fg_fraction = fg_fraction
        self.rng = np.random.default_rng(seed)
        self._fg = [np.argwhere(s.mask > 0) for s in self.samples]
        self._p = None
        if weights is not None:
            w = np.asarray(weights, np.float64)
            if w.shape != (len(self.samples),) or not (w >= 0).all() or not w.sum() > 0:
                raise ConfigError("The sampling weights need one non-negative number per "
                                  "sample, not all zero.")
            self._p = w / w.sum()

    def _pad(self, s: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                       np.ndarray | None]:
        h, w = s.mask.shape
        ph, pw = max(0, self.patch - h), max(0, self.patch - w)
        if not ph and not pw:
            return s.image, s.mask, s.boundary, s.weight
        pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        img = np.pad(s.image, ((0, 0), *pads), mode="reflect" if min(h, w) > 1 else "edge")
        mask = np.pad(s.mask, pads, mode="constant")
        bnd = None if s.boundary is None else np.pad(s.boundary, pads, mode="constant")
        weight = None if s.weight is None else np.pad(s.weight, pads, mode="edge")
        return img, mask, bnd, weight

    def draw(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """``n`` patches: images N x C x P x P, masks N x P x P, boundaries (or None), valid.

        ``valid`` (N x P x P float32) is 0 on padding, so losses ignore it, and carries
        the samples' pixel weights elsewhere.
        """
        imgs, masks, bnds, valids = [], [], [], []
        any_boundary = any(s.boundary is not None for s in self.samples)
        for _ in range(n):
            i = int(self.rng.integers(len(self.samples)) if self._p is None
                    else self.rng.choice(len(self.samples), p=self._p))
            s = self.samples[i]
            img, mask, bnd, weight = self._pad(s)
            h, w = mask.shape
            oy = (self.patch - s.mask.shape[0]) // 2 if s.mask.shape[0] < self.patch else 0
            ox = (self.patch - s.mask.shape[1]) // 2 if s.mask.shape[1] < self.patch else 0
            valid = np.zeros((h, w), np.float32)
            valid[max(oy, 0): max(oy, 0) + s.mask.shape[0], max(ox, 0): max(ox, 0) + s.mask.shape[1]] = 1
            fg = self._fg[i]
            if len(fg) and self.rng.random() < self.fg_fraction:
                cy, cx = fg[int(self.rng.integers(len(fg)))] + (max(oy, 0), max(ox, 0))
                y0 = int(np.clip(cy - self.patch // 2, 0, h - self.patch))
                x0 = int(np.clip(cx - self.patch // 2, 0, w - self.patch))
            else:
                y0 = int(self.rng.integers(0, h - self.patch + 1))
                x0 = int(self.rng.integers(0, w - self.patch + 1))
            sl = (slice(y0, y0 + self.patch), slice(x0, x0 + self.patch))
            imgs.append(img[(slice(None), *sl)])
            masks.append(mask[sl])
            valids.append(valid[sl] if weight is None else valid[sl] * weight[sl])
            if any_boundary:
                bnds.append(bnd[sl] if bnd is not None else np.zeros_like(mask[sl], np.uint8))
        return (np.stack(imgs), np.stack(masks), np.stack(bnds) if any_boundary else None,
                np.stack(valids))


def data_hash(pairs: Iterable[tuple[Path, Path]]) -> str:
    """A short sha256 over the training files' names and bytes (checkpoint lineage)."""
    h = hashlib.sha256()
    for img, mask in pairs:
        for p in (img, mask):
            h.update(p.name.encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()[:16]
