"""Training from image/mask folders: ``train_iter`` is a generator of progress events.

One loop serves ``napari-medseg train`` and fine-tuning's full-image mode:

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

import json
import math
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...config import NormalizationConfig, PredictConfig, TrainConfig
from ...errors import InputShapeError
from ...models import create_model
from ...models.working_resolution import on_input_grid
from .augment import augment_batch
from ..checkpoints import save_checkpoint
from .start import kept_normalization, starting_point, task_to_learn, widen_classes
from .datasets import PatchSampler, Sample, data_hash, find_pairs, load_samples, split_samples
from ..device import resolve_device
from .losses import compute_loss
from ..metrics import dice
from ..inference.normalization import normalize
from ..precision import autocast, resolve_precision
from ..seg_task import task_of, with_task
from ..progress import CancelToken, FinishedEvent, NoticeEvent, ProgressEvent, StageEvent, drain

__all__ = [
    "StepEvent",
    "ValidationEvent",
    "TrainResult",
    "LoopState",
    "optimise_iter",
    "train_iter",
    "train",
    "validate",
    "make_batch",
]


@dataclass(frozen=True)
class StepEvent(ProgressEvent):
    """One optimisation step finished.

    Attributes:
        step: 1-based step number.
        steps: total steps planned.
        loss: the step's total loss.
        parts: loss components.
        lr: learning rate used.
        elapsed_s: seconds since training started (this session).
    """

    step: int = 0
    steps: int = 0
    loss: float = 0.0
    parts: dict = field(default_factory=dict)
    lr: float = 0.0
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class ValidationEvent(ProgressEvent):
    """A validation pass finished.

    Attributes:
        step: the step it followed.
        dice: mean foreground Dice over the validation images.
        best: best Dice so far.
        improved: True when this pass set a new best (and the checkpoint was written).
    """

    step: int = 0
    dice: float = 0.0
    best: float = 0.0
    improved: bool = False


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


def train_mode(model: torch.nn.Module, freeze_norm_stats: bool = False) -> None:
    """``model.train()``; with ``freeze_norm_stats`` the batch-norm layers stay in eval mode,
    so their running statistics are used and kept (their affine parameters still train)."""
    model.train()
    if freeze_norm_stats:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def _lr_at(step: int, config: TrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to ``min_lr``.

    The decay follows whichever runs out first, the steps or the time budget
    (``time_fraction`` of ``max_minutes`` used), so a run cut by its time limit still ends
    at a small learning rate instead of stopping half-way down the schedule.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    progress = max(progress, time_fraction)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_batch(
    sampler: PatchSampler,
    config: TrainConfig,
    output_scale: int,
    generator: torch.Generator,
    device: torch.device,
    super_resolution: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Draw, augment and (for super-resolution networks) downsample one training batch.

    ``super_resolution`` > 1 with ``output_scale`` 1: a super-resolution network wrapped to
    work on the input grid (it shrinks the patch itself); the patch is its ``image_hr``.

    Patches are drawn at the target resolution; a network with ``output_scale`` s > 1 gets the
    image average-pooled by s as input, and the full-resolution image as ``image_hr``.
    """
    imgs, masks, bnds, valid = sampler.draw(config.batch_size)
    image = torch.from_numpy(imgs).to(device)
    targets: dict[str, torch.Tensor] = {
        "mask": torch.from_numpy(masks).to(device),
        "valid": torch.from_numpy(valid).to(device),
    }
    if bnds is not None:
        targets["boundary"] = torch.from_numpy(bnds.astype(np.float32)).to(device)
    image, targets = augment_batch(image, targets, config.augment, generator)
    if output_scale > 1:
        targets["image_hr"] = image
        image = F.avg_pool2d(image, output_scale)
    elif super_resolution > 1:  # a super-resolution network on the input grid: it shrinks
        targets["image_hr"] = image  # the patch itself, so the patch is its SR target
    targets["image"] = image
    return image.contiguous(), targets


def validate(model, samples: Iterable[Sample], spec, device: str, precision: str) -> float:
    """Mean foreground Dice of whole-image tiled predictions on already normalised samples
    (for the instance task: the mean of the interior's and the boundary's Dice, so that a
    step which blurs the lines between touching objects does not count as better).

    A sample with a ``valid`` map (H x W, fine-tuning regions) is scored on its valid pixels
    only. A super-resolution network gets each image downsampled by its output scale, so its
    prediction comes back at the reference's size.
    """
    from ..inference.pipeline import predict

    instances = task_of(model).instances
    cfg = PredictConfig.from_mapping({
        "normalization": {"mode": "none"}, "device": device, "precision": precision,
        "axes": "CYX", "outputs": "probabilities" if instances else "mask", "overlap": 0.125,
    })
    scores = []
    model.eval()
    for s in samples:
        image = s.image
        if spec.output_scale > 1:
            t = torch.from_numpy(image)[None]
            h, w = (image.shape[1] // spec.output_scale, image.shape[2] // spec.output_scale)
            image = F.interpolate(t, size=(h, w), mode="area")[0].numpy()
        result = predict(image, model, cfg)
        pred = (np.asarray(result["probabilities"]).argmax(0) if instances
                else np.asarray(result["mask"]))
        ref = s.mask
        if pred.shape != ref.shape:
            pred = pred[: ref.shape[0], : ref.shape[1]]
            ref = ref[: pred.shape[0], : pred.shape[1]]
        valid = getattr(s, "valid", None)
        if valid is not None:  # a fine-tuning region: score only its pixels
            keep = valid[: pred.shape[0], : pred.shape[1]] > 0
            pred, ref = pred[keep], ref[keep]
        if instances:  # interior and boundary both count: touching objects must part
            scores.append((dice(pred == 1, ref == 1) + dice(pred == 2, ref == 2)) / 2)
        else:
            scores.append(dice(pred > 0, ref > 0))
    return float(np.mean(scores)) if scores else float("nan")


@dataclass
class LoopState:
    """Counters of an optimisation loop; what a resumed run continues from.

    Attributes:
        step: optimisation steps done.
        best: best validation score so far (the loop improves on it).
        best_step: the step it was reached at (0: not yet, or the starting weights).
        bad: validations since the last improvement.
        history: one row per step (``step``, ``loss``, ``lr``, ``wall_s``, ``val_dice``).
    """

    step: int = 0
    best: float = -1.0
    best_step: int = 0
    bad: int = 0
    history: list[dict] = field(default_factory=list)


def optimise_iter(
    model,
    sampler,
    val_samples: list[Sample],
    config,
    optimizer,
    trainable: list,
    *,
    device: torch.device,
    policy,
    generator: torch.Generator,
    cancel: CancelToken,
    state: LoopState,
    on_best: Callable[[int, float, float], None],
    after_validation: Callable[[LoopState], None] | None = None,
    validate_fn: Callable[..., float] | None = None,
) -> Generator[ProgressEvent, None, tuple[str, int]]:
    """The optimisation loop shared by training and fine-tuning; yields events.

    Each step: learning rate from the schedule (:func:`_lr_at`), a batch from ``sampler``
    (:func:`make_batch`: augmentation, SR downsampling), the network's own loss, AdamW with
    gradient clipping. Every ``config.val_every`` steps (and after the last) the model is
    scored on ``val_samples`` (or by minus its recent loss when there are none); a new best
    calls ``on_best``; ``config.patience`` validations without improvement stop early.

    Args:
        model: the network (moved to ``device`` already).
        sampler: draws patches (``draw(n)`` as :class:`~.datasets.PatchSampler`).
        val_samples: held-out samples (may be empty).
        config: a ``TrainConfig`` or ``FinetuneConfig``: ``steps``, ``lr``, ``min_lr``,
            ``warmup_steps``, ``batch_size``, ``augment``, ``grad_clip``, ``val_every``,
            ``patience``, ``max_minutes`` and (fine-tuning) ``freeze_norm_stats`` are read.
        optimizer: the optimizer over ``trainable``.
        trainable: the parameters that get gradients (clipped together).
        device: the training device.
        policy: the precision policy (autocast).
        generator: the augmentation's random generator.
        cancel: checked before every step.
        state: counters to continue from; updated in place.
        on_best: called as ``on_best(step, score, wall_s)`` when a validation sets a new best.
        after_validation: called with ``state`` after every validation.
        validate_fn: ``validate_fn(model, samples, spec, device, precision) -> score``;
            default :func:`validate`.

    Returns:
        ``(stopped, steps_done)``; ``stopped`` is ``"finished"``, ``"early_stop"``,
        ``"time_limit"`` or ``"cancelled"``.
    """
    spec = model.spec
    score_fn = validate_fn or validate
    history = state.history
    t0 = time.perf_counter()
    wall_before = history[-1]["wall_s"] if history else 0.0
    stopped = "finished"
    freeze_stats = bool(getattr(config, "freeze_norm_stats", False))
    train_mode(model, freeze_stats)
    budget = 60.0 * config.max_minutes

    def used() -> float:
        """Seconds of training so far, earlier sessions of a resumed run included."""
        return wall_before + time.perf_counter() - t0

    step = state.step
    for step in range(state.step, config.steps):
        if cancel.cancelled:
            stopped = "cancelled"
            break
        if budget and wall_before > budget:
            # A resumed run whose budget was spent before (a run that spends it now stops
            # after the step that used it up, validated).
            stopped = "time_limit"
            break
        lr = _lr_at(step, config, used() / budget if budget else 0.0)
        loss, parts = _optimiser_step(model, sampler, config, optimizer, trainable, lr,
                                      device=device, policy=policy, generator=generator)
        row = {"step": step + 1, "loss": loss, "lr": lr,
               "wall_s": round(wall_before + time.perf_counter() - t0, 2)}
        history.append(row)
        yield StepEvent(step=step + 1, steps=config.steps, loss=loss, parts=parts, lr=lr,
                        elapsed_s=time.perf_counter() - t0)
        # The time budget runs out after this step: validate it, then stop.
        time_up = bool(budget) and used() > budget
        last = step + 1 == config.steps or time_up
        if (step + 1) % config.val_every == 0 or last:
            if val_samples:
                score = score_fn(model, val_samples, spec, str(device), policy.name)
                train_mode(model, freeze_stats)
            else:
                score = -float(np.mean([h["loss"] for h in history[-config.val_every:]]))
            patience_out = yield from _record_validation_iter(
                state, step + 1, score, row["wall_s"], config, on_best, after_validation)
            if patience_out or time_up:
                stopped = "early_stop" if patience_out else "time_limit"
                step += 1
                break
    else:
        step = config.steps
    state.step = step
    return stopped, step


def _optimiser_step(model, sampler, config, optimizer, trainable: list, lr: float, *,
                    device: torch.device, policy, generator: torch.Generator,
                    ) -> tuple[float, dict[str, float]]:
    """One step at learning rate ``lr``: a batch, the network's own loss, clipped AdamW.

    Returns:
        ``(loss, parts)``: the total loss and its components.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    x, targets = make_batch(sampler, config, model.spec.output_scale, generator, device,
                            int(model.spec.extra.get("super_resolution", 1)))
    if device.type in ("cpu", "cuda"):
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, policy):
        out = model(x)
    loss, parts = compute_loss(out, targets, model.spec)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
    optimizer.step()
    return float(loss.detach()), parts


def _record_validation_iter(
    state: LoopState, step: int, score: float, wall: float, config,
    on_best: Callable[[int, float, float], None],
    after_validation: Callable[[LoopState], None] | None,
) -> Generator[ProgressEvent, None, bool]:
    """Record a validation at ``step`` in ``state`` (``on_best`` on a new best); yields its
    :class:`ValidationEvent`; returns True when ``config.patience`` is used up."""
    improved = score > state.best
    if improved:
        state.best, state.best_step, state.bad = score, step, 0
        on_best(step, score, wall)
    else:
        state.bad += 1
    state.history[-1]["val_dice"] = score
    yield ValidationEvent(f"step {step}: validation Dice {score:.4f}", step=step, dice=score,
                          best=state.best, improved=improved)
    state.step = step
    if after_validation is not None:
        after_validation(state)
    return bool(config.patience and state.bad >= config.patience)


def _state_path(output: Path) -> Path:
    return output.with_name(output.stem + ".train-state.safetensors")


def _save_state(output: Path, model, optimizer, step: int, best: float, best_step: int,
                bad: int, history: list[dict]) -> None:
    """Resume state: optimiser tensors in safetensors, counters in JSON (no pickles)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta_state: dict[str, Any] = {}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"opt.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                meta_state[f"{pid}.{key}"] = value
    for name, value in model.state_dict().items():
        tensors[f"model.{name}"] = value.detach().cpu().contiguous()
    path = _state_path(output)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    info = {"step": step, "best": best, "best_step": best_step, "bad": bad,
            "scalars": meta_state, "history": history}
    tmpj = path.with_suffix(".json.tmp")
    tmpj.write_text(json.dumps(info))
    tmpj.replace(path.with_suffix(".json"))


def _load_state(output: Path, model, optimizer) -> dict | None:
    from safetensors.torch import load_file

    path = _state_path(output)
    if not path.is_file() or not path.with_suffix(".json").is_file():
        return None
    info = json.loads(path.with_suffix(".json").read_text())
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in info["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt["state"] = state
    optimizer.load_state_dict(opt)
    return info


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
                           contact_weight=config.contact_weight)
    for note in notes:
        yield NoticeEvent(note, level="warning")
    train_s, val_s = split_samples(samples, config.val_fraction, config.seed)
    if config.max_val_images and len(val_s) > config.max_val_images:
        val_s = val_s[: config.max_val_images]
    yield NoticeEvent(f"{len(pairs)} files -> {len(train_s)} training and {len(val_s)} "
                      f"validation planes (split by {_split_kind(samples)}).")

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
    sampler = PatchSampler(train_s, patch, config.fg_fraction, seed=config.seed)
    trainable, optimizer = _optimizer(model, config, device)
    state = yield from _resume_iter(output, model, optimizer, sampler, config)
    norm = norm or NormalizationConfig()
    training_data = _training_data(config, images, masks, pairs, samples, train_s, val_s)

    def save_best(step: int, score: float, wall: float) -> None:
        settings = dict(config.to_dict(), device=str(device), precision=policy.name,
                        steps_done=step, wall_time_s=round(wall, 1))
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
