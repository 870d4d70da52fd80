"""Where training starts: the parent's weights (widened to the task's classes) or none,
the image channels, the normalization, and the task to learn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...config import NormalizationConfig, TrainConfig
from ...models import config_to_dict
from ...models.working_resolution import with_downsample
from ..checkpoints import load_checkpoint, with_tile
from ..pixel_size import with_pixel_size
from ..seg_task import SegTask

__all__ = ["starting_point", "task_to_learn", "widen_classes", "kept_normalization"]


def starting_point(parent: str | Path | None, config: TrainConfig, pairs: list
                    ) -> tuple[Any, Any, int, NormalizationConfig | None]:
    """``(parent model or None, its info or None, input channels, normalization)``.

    The channels come from the parent, the settings, or else the first image (4 -> RGB).
    """
    model, parent_info, norm = None, None, config.normalization
    if parent is not None:
        model, parent_info = load_checkpoint(parent)
        in_channels = model.spec.in_channels
        norm = parent_info.normalization_config() or norm
    else:
        in_channels = config.in_channels or 0
    if not in_channels:
        from ...io import read_image

        probe, meta = read_image(pairs[0][0])
        in_channels = probe.shape[meta.axes.index("C")] if "C" in meta.axes else 1
        in_channels = 3 if in_channels == 4 else in_channels
    return model, parent_info, in_channels, norm


def task_to_learn(config: TrainConfig, parent_info: Any) -> SegTask:
    """The task to learn: an instance parent's own, else the settings' (``--task``).

    An explicit ``boundary_width`` replaces an instance parent's (the thresholds it was tuned
    with go back to the defaults: they are tuned again after training).
    """
    if parent_info is not None and parent_info.task is not None:
        parent_task = SegTask.from_dict(parent_info.task)
        if parent_task.instances:
            width = config.boundary_width
            if width is None or width == parent_task.boundary_width:
                return parent_task
            return SegTask(kind=parent_task.kind, boundary_width=width,
                           object_diameter=parent_task.object_diameter)
    return SegTask(kind=config.task, boundary_width=config.boundary_width or 1)


def widen_classes(model, num_classes: int):
    """A copy of ``model`` with ``num_classes`` output classes, started from its weights.

    Every tensor of the same shape is copied; a class-output tensor (first dimension the old
    class count) gets the old rows, each new class a copy of the last old one, so a
    foreground network starts the instance task with its foreground split in two (interior
    and boundary) that training then tells apart. A layer fed the class maps (second
    dimension the class count, SASR-Net's projector) gets the last column copied the same
    way, so it sees interior + boundary as it saw the foreground.

    Raises:
        ConfigError: a tensor that differs in another way (not a class output).
    """
    from ...errors import ConfigError
    from ...models import get_entry, make_config
    from ...models.working_resolution import input_downsample, unwrap

    net = unwrap(model)
    old_k = int(net.spec.num_classes)
    cfg = {k: v for k, v in config_to_dict(net.config).items()
           if k not in ("variant", "in_channels", "num_classes")}
    new = get_entry(net.spec.network).build(make_config(
        net.spec.network, net.spec.variant, net.spec.in_channels, num_classes, **cfg))
    target = new.state_dict()
    for key, value in net.state_dict().items():
        want = target[key]
        grown = value
        for dim in (0, 1):  # class outputs (rows), and layers fed the class maps (columns)
            if (grown.dim() > dim and grown.shape[dim] == old_k and want.shape[dim] == num_classes
                    and want.shape[dim] != grown.shape[dim]):
                extra = grown.narrow(dim, old_k - 1, 1)
                grown = torch.cat([grown] + [extra] * (num_classes - old_k), dim=dim)
        if grown.shape != want.shape:
            raise ConfigError(f"Cannot widen {net.spec.network} to {num_classes} classes: "
                              f"{key} is {tuple(value.shape)}, not a class output.")
        target[key] = grown.clone().to(want.dtype)
    new.load_state_dict(target)
    # what the parent's description carries beyond its tensors: pixel size and tile
    widened = with_pixel_size(with_downsample(new, input_downsample(model)),
                              model.spec.extra.get("pixel_size"))
    return with_tile(widened, model.spec.extra.get("tile"))


def kept_normalization(config, parent_info, norm) -> str | None:
    """The warning when a warm start keeps its parent's normalisation over the one asked."""
    asked = config.normalization
    if parent_info is None or asked is None or norm is None or norm == asked:
        return None

    def words(n) -> str:
        return f"{n.mode} {n.low:g}-{n.high:g}, " + (
            "per channel" if n.per_channel else "channels together")

    return (f"Starting from the parent's weights keeps their intensity normalisation "
            f"({words(norm)}); the one asked for ({words(asked)}) is not used.")
