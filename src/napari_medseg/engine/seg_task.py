"""What a network is trained to predict, and how its outputs become masks and objects.

Two tasks exist:

* ``classes`` (the default): one class per label value of the training masks; the mask is
  the arg-max, a boundary comes from a boundary head or is derived from the mask.
* ``instances`` (boundary-aware): three classes, background (0), interior (1) and boundary
  (2), learnt from instance labels (:func:`instance_target`). The boundary is each object's
  contour band, ``boundary_width`` pixels wide on its inside, so touching objects get a line
  ``2 x boundary_width`` wide between them. At inference ``mask`` = interior + boundary (the
  foreground, so Dice stays comparable with a two-class network), ``boundary`` = the
  boundary class, and ``instances`` = a seeded watershed (:func:`seeded_watershed`): seeds
  are where the interior probability reaches ``seed_threshold`` (seeds smaller than
  ``min_seed`` pixels dropped), flooded over the boundary probability within the
  foreground (or, with an ``object_threshold``, where interior + boundary probability
  exceeds it: :func:`object_region`); fragments smaller than ``min_object_fraction`` of the
  image's median object are then removed (:func:`drop_fragments`). Weights whose
  thresholds were tuned on flip-averaged probabilities say so (``tta``), and prediction then
  flip-averages by default.

The task travels with the weights (the checkpoint description's ``task`` and the model
card's), and is attached to the network's spec when it is loaded (:func:`with_task`): the
engine reads it from there, never from a network's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = [
    "CLASSES",
    "INSTANCES",
    "INSTANCE_CLASS_NAMES",
    "SegTask",
    "task_of",
    "stored_task",
    "with_task",
    "mask_classes",
    "instance_target",
    "contact_weights",
    "training_targets",
    "seeded_watershed",
    "drop_fragments",
    "object_region",
]

CLASSES = "classes"
INSTANCES = "instances"
#: The class names of the boundary-aware task, in class-index order.
INSTANCE_CLASS_NAMES = ("background", "interior", "boundary")


@dataclass(frozen=True)
class SegTask:
    """The task a network was trained for (see the module docstring).

    Attributes:
        kind: ``"classes"`` or ``"instances"``.
        boundary_width: the boundary band's width inside each object, in pixels.
        seed_threshold: interior probability from which a pixel is a watershed seed.
        min_seed: seeds smaller than this many pixels are dropped.
        foreground_threshold: foreground (1 - background probability) above this is mask.
        object_diameter: the median diameter (pixels) of the objects the weights were
            trained on (:mod:`.object_size`), which prediction resamples an image's objects
            to; None when not recorded.
        object_threshold: foreground probability (interior + boundary) above which pixels
            belong to objects, tuned for the objects (AP) apart from the mask's
            ``foreground_threshold`` (Dice); None: the mask itself.
        min_object_fraction: objects smaller than this fraction of the median object's
            size (in their image, or stack) are removed, unless they touch the image's
            edge (nuclei cut by the edge are small); 0 keeps every object.
        tta: the thresholds were tuned on flip-averaged (TTA) probabilities, so prediction
            averages the flipped passes unless told otherwise (``PredictConfig.tta``).
    """

    kind: str = CLASSES
    boundary_width: int = 1
    seed_threshold: float = 0.5
    min_seed: int = 8
    foreground_threshold: float = 0.5
    object_diameter: float | None = None
    min_object_fraction: float = 0.0
    object_threshold: float | None = None
    tta: bool = False

    def __post_init__(self) -> None:
        if self.kind not in (CLASSES, INSTANCES):
            raise ConfigError(f"The task must be '{CLASSES}' or '{INSTANCES}', not "
                              f"{self.kind!r}.")
        if int(self.boundary_width) < 1:
            raise ConfigError(f"boundary_width must be at least 1, not {self.boundary_width}.")
        for name in ("seed_threshold", "foreground_threshold"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise ConfigError(f"{name} must lie in (0, 1), not {getattr(self, name)}.")
        if int(self.min_seed) < 1:
            raise ConfigError(f"min_seed must be at least 1, not {self.min_seed}.")
        if self.object_threshold is not None and not 0.0 < float(self.object_threshold) < 1.0:
            raise ConfigError(f"object_threshold must lie in (0, 1), not {self.object_threshold}.")
        if not 0.0 <= float(self.min_object_fraction) < 1.0:
            raise ConfigError("min_object_fraction must lie in [0, 1), not "
                              f"{self.min_object_fraction}.")
        if self.object_diameter is not None and not float(self.object_diameter) > 0:
            raise ConfigError("object_diameter must be a positive number of pixels, not "
                              f"{self.object_diameter}.")

    @property
    def instances(self) -> bool:
        """Whether this is the boundary-aware instance task."""
        return self.kind == INSTANCES

    @property
    def num_classes(self) -> int | None:
        """The classes the task fixes (3 for instances), None when the data decide."""
        return len(INSTANCE_CLASS_NAMES) if self.instances else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON/YAML form (what checkpoints and cards store); an unrecorded object
        diameter, a zero fragment fraction, an unset object threshold and ``tta`` off are left
        out, so weights described before they existed keep their hash."""
        data = dataclasses.asdict(self)
        for key in ("object_diameter", "min_object_fraction", "object_threshold", "tta"):
            if not data[key]:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict | str | None) -> SegTask:
        """Parse a stored task; None (older weights) is the ``classes`` task.

        A card's free-text ``description`` is ignored; other unknown keys are an error.

        Raises:
            ConfigError: an unknown kind, key or an out-of-range value.
        """
        if data is None:
            return cls()
        if isinstance(data, str):
            return cls(kind=data)
        if not isinstance(data, dict):
            raise ConfigError(f"A task must be a mapping, not {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"description", "classes"})
        if unknown:
            raise ConfigError(f"Unknown task setting {unknown[0]!r} (known: "
                              f"{', '.join(sorted(names))}).")
        kwargs = {k: v for k, v in data.items() if k in names}
        for key, kind in (("boundary_width", int), ("min_seed", int),
                          ("seed_threshold", float), ("foreground_threshold", float),
                          ("object_diameter", float), ("min_object_fraction", float),
                          ("object_threshold", float)):
            if kwargs.get(key) is not None:
                kwargs[key] = kind(kwargs[key])
        if not isinstance(kwargs.get("tta", False), bool):
            raise ConfigError(f"The task's tta is true or false, not {kwargs['tta']!r}.")
        return cls(**kwargs)


def stored_task(value: dict | str | None) -> dict | None:
    """The form weights and cards record a task in: the instance task in full, None for the
    ``classes`` task (so classes weights keep the description, and hash, they had before
    tasks existed, and an absent task equals a written-out classes one).

    Raises:
        ConfigError: an invalid task.
    """
    task = SegTask.from_dict(value)
    return task.to_dict() if task.instances else None


def task_of(model_or_spec) -> SegTask:
    """The task attached to a network (its spec's ``extra["task"]``), ``classes`` if none."""
    spec = getattr(model_or_spec, "spec", model_or_spec)
    return SegTask.from_dict((getattr(spec, "extra", None) or {}).get("task"))


def mask_classes(model_or_spec) -> int:
    """The classes the ``mask`` output holds: 2 (background, foreground) for the instance
    task, else the network's K."""
    spec = getattr(model_or_spec, "spec", model_or_spec)
    return 2 if task_of(spec).instances else int(spec.num_classes)


def with_task(model, task: SegTask | dict | None):
    """Attach ``task`` to ``model``'s spec (and to a wrapped network's); returns ``model``.

    Raises:
        ConfigError: an instance task on a network that does not output three classes.
    """
    task = task if isinstance(task, SegTask) else SegTask.from_dict(task)
    if task.instances and int(model.spec.num_classes) != task.num_classes:
        raise ConfigError(f"The instance task needs a network with {task.num_classes} "
                          f"classes, not {model.spec.num_classes}.")
    inner = getattr(model, "net", None)
    for module in (model, inner):
        if module is not None and hasattr(module, "spec"):
            module.spec = dataclasses.replace(
                module.spec, extra={**module.spec.extra, "task": task.to_dict()})
    return model


def instance_target(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """The three-class target (0 background, 1 interior, 2 boundary) of instance labels.

    A foreground pixel is boundary when a pixel of another label (another object or the
    background) lies within ``width`` pixels of it along each axis (a square neighbourhood
    of side ``2 width + 1``, per plane). The image edge is not a contour.

    Args:
        labels: instance labels (0 = background), YX; a ZYX stack is done plane by plane.
        width: the band's width inside each object.

    Returns:
        int64 class indices of ``labels``' shape.
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    if labels.ndim > 2:
        return np.stack([instance_target(p, width) for p in labels])
    size = 2 * int(width) + 1
    hi = ndi.maximum_filter(labels, size=size, mode="nearest")
    lo = ndi.minimum_filter(labels, size=size, mode="nearest")
    fg = labels > 0
    out = fg.astype(np.int64)
    out[fg & ((hi != labels) | (lo != labels))] = 2
    return out


def contact_weights(labels: np.ndarray, width: int = 1, weight: float = 5.0) -> np.ndarray:
    """Pixel weights that stress where objects touch: ``weight`` on the boundary pixels that
    lie within ``width`` pixels of another object (not of the background), 1 elsewhere.

    The lines between touching nuclei are a small share of the boundary class and the hardest
    part of it (measured: after training without this the nuclei weights drew the outer
    contour of touching H&E nuclei but rarely the line between them); the weights go into
    the loss as its pixel weights.

    Args:
        labels: instance labels, YX (ZYX plane by plane).
        width: the boundary band's width.
        weight: the weight of a contact pixel (>= 1).

    Returns:
        float32 weights of ``labels``' shape.
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    if labels.ndim > 2:
        return np.stack([contact_weights(p, width, weight) for p in labels])
    size = 2 * int(width) + 1
    # another object nearby: the largest label nearby differs, or the smallest non-zero does
    big = int(labels.max(initial=0)) + 1  # stands for the background in the minimum
    positive = np.where(labels > 0, labels.astype(np.int64), big)
    hi = ndi.maximum_filter(labels.astype(np.int64), size=size, mode="nearest")
    lo = ndi.minimum_filter(positive, size=size, mode="nearest")
    contact = (labels > 0) & ((hi != labels) & (hi > 0) | (lo != labels) & (lo != big))
    out = np.ones(labels.shape, np.float32)
    out[contact] = float(weight)
    return out


def training_targets(
    labels: np.ndarray,
    num_classes: int,
    task: SegTask | None = None,
    boundary: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The training targets of a label image for a network of ``num_classes`` classes.

    The task decides how the labels are read, never their values: with the ``instances``
    task they are objects (instance labels, or a binary mask whose separate parts are
    objects) and become :func:`instance_target`; a ``boundary`` layer (a user's corrected
    boundary) adds its pixels inside the foreground to the boundary class. With the
    ``classes`` task a network with one foreground class (K <= 2) learns every label > 0 as
    foreground, and a network with more classes reads the labels as class indices (a value
    with no class is an error): a class mask is never taken for instances.

    Args:
        labels: integer labels, YX (or ZYX, read plane by plane for instances).
        num_classes: K of the network.
        task: the network's task (None: ``classes``).
        boundary: a boundary map of the labels' shape, or None.

    Returns:
        ``(mask, boundary)``: int64 class indices, and the uint8 boundary target (the
        boundary class for instances, the given layer for classes, else None).

    Raises:
        InputShapeError: a label value has no class in the network.
    """
    from ..errors import InputShapeError

    task = task or SegTask()
    labels = np.asarray(labels)
    if task.instances:
        target = instance_target(labels, task.boundary_width)
        if boundary is not None:
            target[(np.asarray(boundary) > 0) & (labels > 0)] = 2
        return target, (target == 2).astype(np.uint8)
    bnd = None if boundary is None else (np.asarray(boundary) > 0).astype(np.uint8)
    if int(num_classes) <= 2:
        return (labels > 0).astype(np.int64), bnd
    top = int(labels.max(initial=0))
    if top >= int(num_classes) or int(labels.min(initial=0)) < 0:
        raise InputShapeError(
            f"The labels hold the value {top} but the network has only {num_classes} classes "
            f"(0..{int(num_classes) - 1}); for instance labels (one number per object) use the "
            "instance task (--task instances), else relabel them.")
    return labels.astype(np.int64), bnd


def seeded_watershed(
    foreground: np.ndarray,
    interior: np.ndarray,
    boundary: np.ndarray,
    task: SegTask,
    min_size: int = 8,
) -> np.ndarray:
    """Objects of a boundary-aware prediction.

    Objects grow within :func:`object_region` (the mask, or where the foreground probability
    passes the task's ``object_threshold``). Seeds are the connected parts of
    ``interior >= seed_threshold`` inside it (smaller than ``min_seed`` pixels dropped); each
    grows over the boundary probability
    (lowest first) until the foreground is filled or it meets another. A part of the
    foreground that holds no seed becomes an object of its own. Objects smaller than
    ``min_size`` pixels are removed, then fragments (:func:`drop_fragments` with the task's
    ``min_object_fraction``). In a ZYX stack seeds and objects are connected across
    slices, so a nucleus keeps one number through the planes it spans.

    Args:
        foreground: the mask (> 0 is foreground), YX or ZYX; with an ``object_threshold``
            the probabilities decide instead.
        interior: interior probability of the same shape (float in [0, 1]).
        boundary: boundary probability (float in [0, 1]).
        task: the thresholds.
        min_size: smallest object kept, in pixels.

    Returns:
        int32 labels numbered 1..N, 0 = background.
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import relabel_sequential, watershed

    interior = np.asarray(interior, np.float32)
    elevation = np.asarray(boundary, np.float32)
    fg = object_region(foreground, interior, elevation, task)
    if not fg.any():
        return np.zeros(fg.shape, np.int32)
    seeds, n = ndi.label(fg & (interior >= task.seed_threshold))
    if n:
        sizes = np.bincount(seeds.ravel())
        seeds[(sizes < task.min_seed)[seeds]] = 0
    labels = watershed(elevation, markers=seeds, mask=fg).astype(np.int32)
    orphans, n_orphans = ndi.label(fg & (labels == 0))
    if n_orphans:
        top = int(labels.max())
        labels[orphans > 0] = orphans[orphans > 0] + top
    if min_size > 1:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        labels[small[labels]] = 0
    if task.min_object_fraction > 0:
        labels = drop_fragments(labels, task.min_object_fraction)
    return relabel_sequential(labels)[0].astype(np.int32)


def object_region(mask: np.ndarray, interior: np.ndarray, boundary: np.ndarray,
                  task: SegTask) -> np.ndarray:
    """Where a boundary-aware prediction's objects grow: ``mask`` > 0, or, when the task has
    an ``object_threshold``, where the interior and boundary probabilities (the foreground
    probability) sum above it."""
    if task.object_threshold is None:
        return np.asarray(mask) > 0
    total = np.asarray(interior, np.float32) + np.asarray(boundary, np.float32)
    return total > float(task.object_threshold)


def drop_fragments(labels: np.ndarray, fraction: float) -> np.ndarray:
    """``labels`` without the objects smaller than ``fraction`` x the median object's size.

    The median is over the objects of ``labels`` itself (an image, or a stack), so the rule
    holds at any magnification. Objects that touch the array's edge are kept whatever their
    size: a nucleus cut by the image's border is small and real.

    Args:
        labels: integer objects (0 = background), YX or ZYX.
        fraction: in [0, 1); 0 keeps every object.

    Returns:
        A new label array (numbers kept, dropped objects set to 0).
    """
    labels = np.array(labels, copy=True)
    sizes = np.bincount(labels.ravel())
    present = np.flatnonzero(sizes[1:]) + 1
    if fraction <= 0 or present.size < 2:
        return labels
    small = sizes < fraction * float(np.median(sizes[present]))
    small[0] = False
    for axis in range(labels.ndim):  # objects on any face of the array stay
        for index in (0, -1):
            small[np.take(labels, index, axis=axis)] = False
    labels[small[labels]] = 0
    return labels
