"""The optimisation loop shared by training and fine-tuning, and the state it resumes from.

Each step draws a batch (:func:`make_batch`: augmentation, SR downsampling), computes the
network's own loss and takes a clipped AdamW step at the learning rate of the schedule
(:func:`_lr_at`: linear warm-up, cosine decay over the steps or the time budget, whichever
runs out first). Validation Dice on whole held-out images (:func:`validate`) decides the best
weights and early stopping; ``max_minutes`` is kept by :class:`_Budget`.
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

from ...config import PredictConfig, TrainConfig
from ...errors import MedsegError
from ..metrics import dice
from ..precision import PrecisionPolicy, autocast
from ..progress import CancelToken, NoticeEvent, ProgressEvent
from ..seg_task import task_of
from .augment import augment_batch
from .datasets import PatchSampler, Sample
from .losses import compute_loss

__all__ = ["StepEvent", "ValidationEvent", "LoopState", "train_mode", "make_batch", "validate",
           "optimise_iter"]

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
        "native_pixels": True,  # the pixels the patches train on
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
        precision: the precision the steps run in (set by the loop: ``fp32`` once a step
            gave NaN in bf16/fp16); what the checkpoint records.
    """

    step: int = 0
    best: float = -1.0
    best_step: int = 0
    bad: int = 0
    history: list[dict] = field(default_factory=list)
    precision: str = ""


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
    spent_s: float = 0.0,
) -> Generator[ProgressEvent, None, tuple[str, int]]:
    """The optimisation loop shared by training and fine-tuning; yields events.

    Each step: learning rate from the schedule (:func:`_lr_at`), a batch from ``sampler``
    (:func:`make_batch`: augmentation, SR downsampling), the network's own loss, AdamW with
    gradient clipping. A step whose loss or gradients are NaN or infinite changes nothing and
    is taken again (in fp32 from then on when it ran in bf16/fp16; three in a row in fp32 stop
    the run with an error). Every ``config.val_every`` steps (and after the last) the model is
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
        spent_s: seconds of this run before the loop (fine-tuning's split and scoring of the
            starting weights) that count against ``max_minutes``: the loop stops when one
            more step and the last validation would not fit in what is left.

    Returns:
        ``(stopped, steps_done)``; ``stopped`` is ``"finished"``, ``"early_stop"``,
        ``"time_limit"`` or ``"cancelled"``.
    """
    spec = model.spec
    score_fn = validate_fn or validate
    history = state.history
    clock = _Budget(config.max_minutes, history[-1]["wall_s"] if history else 0.0, spent_s)
    stopped = "finished"
    freeze_stats = bool(getattr(config, "freeze_norm_stats", False))
    train_mode(model, freeze_stats)
    step = state.step
    state.precision = policy.name
    for step in range(state.step, config.steps):
        if cancel.cancelled:
            stopped = "cancelled"
            break
        if clock.spent_before():
            stopped = "time_limit"
            break
        lr = _lr_at(step, config, clock.fraction())
        t_step = time.perf_counter()
        loss, parts = _optimiser_step(model, sampler, config, optimizer, trainable, lr,
                                      device=device, policy=policy, generator=generator)
        failed = 0  # tries of this step that were not finite in fp32
        while not math.isfinite(loss):  # skipped: the weights are unchanged; take it again
            failed += policy.name == "fp32"
            policy = yield from _non_finite_step_iter(step + 1, policy, failed)
            state.precision = policy.name
            loss, parts = _optimiser_step(model, sampler, config, optimizer, trainable, lr,
                                          device=device, policy=policy, generator=generator)
        clock.stepped(time.perf_counter() - t_step)
        row = {"step": step + 1, "loss": loss, "lr": lr, "wall_s": round(clock.training_s(), 2)}
        history.append(row)
        yield StepEvent(step=step + 1, steps=config.steps, loss=loss, parts=parts, lr=lr,
                        elapsed_s=clock.session_s())
        # Another step and a validation would overrun the budget: validate this one, stop.
        time_up = clock.up()
        last = step + 1 == config.steps or time_up
        if (step + 1) % config.val_every == 0 or last:
            if val_samples:
                t_val = time.perf_counter()
                score = score_fn(model, val_samples, spec, str(device), policy.name)
                clock.val_s = time.perf_counter() - t_val
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


class _Budget:
    """The time budget ``max_minutes`` (0: none) of a run: training of earlier sessions of a
    resumed run (``before``) and seconds spent before the loop (``spent``) count against it,
    and it runs out when one more step (a running mean of the steps) and a validation (the
    last one's duration) would not fit."""

    def __init__(self, minutes: float, before: float, spent: float) -> None:
        self.limit, self.before, self.spent = 60.0 * minutes, before, spent
        self.t0, self.step_s, self.val_s = time.perf_counter(), 0.0, 0.0

    def session_s(self) -> float:
        return time.perf_counter() - self.t0

    def training_s(self) -> float:
        """Seconds of training so far, earlier sessions of a resumed run included."""
        return self.before + self.session_s()

    def fraction(self) -> float:
        return (self.spent + self.training_s()) / self.limit if self.limit else 0.0

    def stepped(self, seconds: float) -> None:
        self.step_s = seconds if not self.step_s else 0.8 * self.step_s + 0.2 * seconds

    def spent_before(self) -> bool:
        """A resumed run whose budget was used up before."""
        return bool(self.limit) and self.before > self.limit

    def up(self) -> bool:
        return bool(self.limit) and (
            self.spent + self.training_s() + self.step_s + self.val_s > self.limit)


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
    norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
    value = float(loss.detach())
    if not (math.isfinite(value) and math.isfinite(float(norm))):
        optimizer.zero_grad(set_to_none=True)  # the weights stay as they were
        return math.nan, parts
    optimizer.step()
    return value, parts


#: Tries of one step whose loss or gradients are NaN or infinite in fp32 before training stops.
MAX_NON_FINITE_STEPS = 3


def _non_finite_step_iter(step: int, policy, failed: int) -> Generator[ProgressEvent, None, Any]:
    """A step whose loss or gradients were not finite was skipped (the weights unchanged)
    and is taken again with another batch; in bf16/fp16 the rest of the run goes on in fp32,
    with a warning; returns the policy. ``failed`` counts the tries of this step that were
    not finite in fp32.

    Raises:
        MedsegError: :data:`MAX_NON_FINITE_STEPS` such tries in fp32.
    """
    if policy.name != "fp32":
        yield NoticeEvent(f"Step {step} gave NaN or infinite values in {policy.name}; it is "
                          "taken again, and training goes on, in fp32 precision.",
                          level="warning")
        return PrecisionPolicy("fp32", f"{policy.name} gave NaN or infinite values")
    if failed >= MAX_NON_FINITE_STEPS:
        raise MedsegError(f"The loss or its gradients were NaN or infinite on {failed} "
                          "steps in a row; lower the learning rate or check the labels.")
    yield NoticeEvent(f"Step {step} gave NaN or infinite values; it is taken again with "
                      "another batch.", level="warning")
    return policy


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
