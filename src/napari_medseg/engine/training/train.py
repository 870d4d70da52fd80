"""Training from image/mask folders: ``train_iter`` is a generator of progress events.

``napari-medseg train`` runs the optimisation loop of :mod:`.loop` (which fine-tuning shares):

* data: image/mask pairs (:mod:`.datasets`), normalised as the checkpoint will record, split by
  image (or by blocks of slices for a stack), sampled as patches with foreground balance;
* the network's own loss (``spec.loss``: deep supervision, boundary, SR and affinity terms);
* augmentation (:mod:`.augment`): flips, rot90, scale, intensity, optional elastic;
* AdamW with linear warm-up and cosine decay (a justified change from each paper's schedule:
  the papers train for hundreds of epochs on a GPU; a CPU budget of minutes needs a schedule
  that anneals within the run), bf16 autocast + channels-last on CPUs that run bf16 natively;
* validation Dice on whole held-out images through the tiled inference engine, early stopping,
  the best checkpoint kept (self-describing: see :mod:`..checkpoints`), resumable, seeded.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...config import NormalizationConfig, TrainConfig
from ...errors import InputShapeError
from ...models import create_model
from ...models.working_resolution import on_input_grid
from ..checkpoints import save_checkpoint
from .start import kept_normalization, starting_point, task_to_learn, widen_classes
from .datasets import (PatchSampler, Sample, data_hash, find_pairs, load_samples,
                       oversampling_weights, split_samples,
                       training_diameter)
from ..device import resolve_device
from ..inference.normalization import normalize
from ..precision import resolve_precision
from ..seg_task import with_task
from ..progress import CancelToken, FinishedEvent, NoticeEvent, ProgressEvent, StageEvent, drain
from .loop import LoopState, _load_state, _save_state, optimise_iter

__all__ = ["TrainResult", "train_iter", "train"]


@dataclass(frozen=True)
class TrainResult:
    """What training leaves behind.

    Attributes:
        checkpoint: path of the best checkpoint's ``.safetensors`` file.
        best_dice: its validation Dice (NaN without a validation split).
        best_step: the step it was reached at.
        steps_done: optimisation steps run in total.
        stopped: ``"finished"``, ``"early_stop"``, ``"time_limit"`` or ``"cancelled"``.
        history: rows of the loss log.
    """

    checkpoint: Path
    best_dice: float
    best_step: int
    steps_done: int
    stopped: str
    history: list[dict] = field(default_factory=list)


def _output_path(output: str | Path) -> Path:
    """The checkpoint path with a ``.safetensors`` suffix, its folder created."""
    output = Path(output)
    if output.suffix != ".safetensors":
        output = output.with_suffix(".safetensors")
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


def _split_kind(samples: list[Sample]) -> str:
    """``"image"`` when every sample is its own split group, else ``"slice block"``."""
    return "image" if all(s.group == s.name for s in samples) else "slice block"


def _training_data(config: TrainConfig, images: str | Path, masks: str | Path, pairs: list,
                   samples: list[Sample], train_s: list[Sample], val_s: list[Sample]) -> dict:
    """What the checkpoint records of its training data."""
    return {
        "dataset": config.dataset or Path(images).resolve().parent.name,
        "images": str(images),
        "masks": str(masks),
        "data_hash": data_hash(pairs),
        "train_files": sorted({s.group.split("#")[0] for s in train_s}),
        "val_files": sorted({s.group.split("#")[0] for s in val_s}),
        # The held-out slices of a stack (``<file>@<z>``): its other slices trained.
        "val_planes": sorted((s.name for s in val_s if "@" in s.name),
                             key=lambda n: (n.split("@")[0], int(n.split("@")[1]))),
        "split": f"by {_split_kind(samples)}, val_fraction {config.val_fraction}, "
                 f"seed {config.seed}",
    }


def _optimizer(model, config: TrainConfig, device: torch.device) -> tuple[list, Any]:
    """The model moved to ``device``; its trainable parameters (the encoder frozen when
    asked) and their AdamW optimizer."""
    model.to(device)
    if device.type in ("cpu", "cuda"):
        model.to(memory_format=torch.channels_last)
    params = [p for n, p in model.named_parameters()]
    if config.freeze_encoder:
        frozen = {id(p) for p in model.encoder_parameters()}
        for p in params:
            if id(p) in frozen:
                p.requires_grad_(False)
    trainable = [p for p in params if p.requires_grad]
    return trainable, torch.optim.AdamW(trainable, lr=config.lr,
                                        weight_decay=config.weight_decay)


def _resume_iter(output: Path, model, optimizer, sampler: PatchSampler, config: TrainConfig
                 ) -> Generator[ProgressEvent, None, LoopState]:
    """The loop state to start from: a saved run's (``config.resume``) or a fresh one."""
    state = _load_state(output, model, optimizer) if config.resume else None
    if state is None:
        return LoopState(0, -1.0, 0, 0, [])
    for _ in range(state["step"]):  # keep the data stream reproducible
        sampler.rng.random()
    yield NoticeEvent(f"Resuming at step {state['step']} (best Dice so far {state['best']:.4f}).")
    return LoopState(state["step"], state["best"], state["best_step"], state["bad"],
                     state["history"])


def train_iter(
    images: str | Path,
    masks: str | Path,
    output: str | Path,
    config: TrainConfig,
    cancel: CancelToken | None = None,
    parent: str | Path | None = None,
) -> Generator[ProgressEvent, None, TrainResult]:
    """Train a network on image/mask folders; yields events, returns a :class:`TrainResult`.

    Args:
        images: folder of images.
        masks: folder of masks with the same file names (binary, class or instance labels).
        output: checkpoint path (``.safetensors``; the JSON description goes beside it).
        config: the training settings.
        cancel: checked after every step; a cancelled run keeps the best checkpoint so far.
        parent: a checkpoint to start from instead of random weights.
    """
    cancel = cancel or CancelToken()
    output = _output_path(output)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    yield StageEvent("Reading the training data ...", stage="loading")
    pairs = find_pairs(images, masks, config.pattern)
    model, parent_info, in_channels, norm = starting_point(parent, config, pairs)
    if (kept := kept_normalization(config, parent_info, norm)) is not None:
        yield NoticeEvent(kept, level="warning")
    task = task_to_learn(config, parent_info)
    if model is not None and task.num_classes and model.spec.num_classes != task.num_classes:
        yield NoticeEvent(f"Starting the {task.kind} task from the parent's weights, its "
                          f"{model.spec.num_classes} classes widened to {task.num_classes}.")
        model = widen_classes(model, task.num_classes)
    if model is not None:
        model = with_task(on_input_grid(model), task)
    num_classes = task.num_classes or (model.spec.num_classes if model is not None
                                       else config.num_classes)
    notes: list[str] = []
    samples = load_samples(pairs, in_channels, lambda img: normalize(img, norm, channel_axis=0),
                           task=task, num_classes=num_classes, notes=notes,
                           contact_weight=config.contact_weight,
                           object_diameter=config.object_diameter)
    for note in notes:
        yield NoticeEvent(note, level="warning")
    train_s, val_s = split_samples(samples, config.val_fraction, config.seed)
    if config.max_val_images and len(val_s) > config.max_val_images:
        val_s = val_s[: config.max_val_images]
    yield NoticeEvent(f"{len(pairs)} files -> {len(train_s)} training and {len(val_s)} "
                      f"validation planes (split by {_split_kind(samples)}).")
    if task.instances:  # the object size that prediction resamples images to
        task = dataclasses.replace(task, object_diameter=config.object_diameter or (
            training_diameter(pairs, {s.group.split("#")[0] for s in train_s})))
        if model is not None:
            model = with_task(model, task)

    device = resolve_device(config.device)
    policy = resolve_precision(config.precision, device)
    if model is None:
        model = with_task(on_input_grid(
            create_model(config.network, config.variant, in_channels, num_classes,
                         **dict(config.model_overrides or {})), config.input_downsample), task)
    spec = model.spec
    if min(min(s.mask.shape) for s in samples) < 2:
        raise InputShapeError("Training images must be at least 2 pixels on each side.")
    patch = spec.valid_size(config.patch // spec.output_scale) * spec.output_scale
    weights = None
    if config.oversample:
        weights, counts = oversampling_weights(train_s, config.oversample)
        yield NoticeEvent("Training planes per acquisition type: " + ", ".join(
            f"{k} {n}" + (f" (drawn {config.oversample[k]:g}x as often)"
                          if k in config.oversample else "") for k, n in counts.items()) + ".")
    sampler = PatchSampler(train_s, patch, config.fg_fraction, seed=config.seed, weights=weights)
    trainable, optimizer = _optimizer(model, config, device)
    state = yield from _resume_iter(output, model, optimizer, sampler, config)
    norm = norm or NormalizationConfig()
    training_data = _training_data(config, images, masks, pairs, samples, train_s, val_s)

    def save_best(step: int, score: float, wall: float) -> None:
        settings = dict(config.to_dict(), device=str(device),
                        precision=state.precision or policy.name, steps_done=step,
                        wall_time_s=round(wall, 1))
        save_checkpoint(
            model, output, normalization=norm, training_data=training_data,
            settings=settings, metrics={"val_dice": round(score, 4), "step": step},
            parent=parent_info.sha256 if parent_info is not None else None,
            dtype=config.checkpoint_dtype,
        )

    def keep_state(st: LoopState) -> None:
        _save_state(output, model, optimizer, st.step, st.best, st.best_step, st.bad, st.history)

    t0 = time.perf_counter()
    wall_before = state.history[-1]["wall_s"] if state.history else 0.0
    yield StageEvent(f"Training {spec.network}/{spec.variant} on {device} ({policy.name}).",
                     stage="training")
    stopped, step = yield from optimise_iter(
        model, sampler, val_s, config, optimizer, trainable, device=device, policy=policy,
        generator=generator, cancel=cancel, state=state, on_best=save_best,
        after_validation=keep_state)
    if state.best_step == 0:  # nothing validated yet (cancelled early): keep what we have
        save_best(step, float("nan"), wall_before + time.perf_counter() - t0)
    output.with_name(output.stem + ".log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in state.history))
    result = TrainResult(output, state.best if val_s else float("nan"), state.best_step, step,
                         stopped, state.history)
    yield FinishedEvent(f"Training {stopped} after {step} steps; best validation Dice "
                        f"{state.best:.4f} at step {state.best_step}.", result=result)
    return result


def train(images, masks, output, config: TrainConfig, **kwargs) -> TrainResult:
    """Run :func:`train_iter` to the end and return its result."""
    return drain(train_iter(images, masks, output, config, **kwargs))
