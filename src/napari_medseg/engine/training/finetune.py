"""Fine-tuning on a user's corrections: ``finetune_iter`` is a generator of progress events.

The loop users come for: segment, correct the labels, fine-tune, segment better. The
corrections become training samples (:mod:`.changes`: what changed and where;
:mod:`.corrections`: the crops), and this module runs the shared optimisation loop of
:mod:`.loop` (:func:`~.loop.optimise_iter`: the network's own loss, AdamW with warm-up and
cosine decay, augmentation, early stopping) on them:

1. **Split.** The held-out split is by region group (:func:`~.datasets.split_samples`), so no
   area is ever on both sides; with fewer groups than ``strips_below`` a strip of each is
   held out instead (:func:`~.datasets.split_within`) and every group trains.
2. **Replay.** Samples of earlier rounds of the same model line (:class:`~.replay.ReplayStore`)
   are mixed into the batches (``config.replay`` of the patches) against forgetting.
3. **Training.** :class:`~.replay.RegionSampler` draws patches centred on valid pixels; the
   validation Dice before training is the baseline; the best weights so far are kept in
   memory, so Stop (the :class:`~..progress.CancelToken`) and early stopping keep them. The
   result is written as a self-describing checkpoint with its lineage (parent sha256, data
   hash, settings, metrics), atomically (:mod:`.lineage`).

The whole workflow around it (autosave, replay store, active checkpoint) is :mod:`.workflow`.
The names of :mod:`.changes`, :mod:`.corrections` and :mod:`.replay` are importable from here too.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...config import FinetuneConfig
from ...errors import InputShapeError
from ..progress import CancelToken, FinishedEvent, NoticeEvent, ProgressEvent, StageEvent, drain
from .changes import CorrectionRegion, changed_mask, class_targets, find_regions, group_regions
from .corrections import (
    RegionSample,
    prepare_corrections_iter,
    samples_from_corrections,
    samples_from_folders,
    samples_hash,
)
from .datasets import Sample, counted, split_samples, split_within
from .replay import RegionSampler, ReplayStore

__all__ = [
    "CorrectionRegion",
    "RegionSample",
    "DataEvent",
    "FinetuneResult",
    "class_targets",
    "changed_mask",
    "find_regions",
    "group_regions",
    "samples_from_corrections",
    "prepare_corrections_iter",
    "samples_from_folders",
    "samples_hash",
    "RegionSampler",
    "ReplayStore",
    "finetune_iter",
    "finetune",
]


@dataclass(frozen=True)
class DataEvent(ProgressEvent):
    """What fine-tuning will learn from (sent once, before the first step).

    Attributes:
        regions: corrected regions in total.
        groups: split groups they form.
        train: regions used for training.
        val: regions held out for validation (0: no validation Dice).
        replay: earlier samples mixed in.
        pixels: pixels that count in the loss (training regions).
    """

    regions: int = 0
    groups: int = 0
    train: int = 0
    val: int = 0
    replay: int = 0
    pixels: int = 0


@dataclass
class FinetuneResult:
    """What fine-tuning leaves behind.

    Attributes:
        model: the network with the best weights (eval mode; a copy, the input is untouched).
        checkpoint: the written ``.safetensors`` file, or None when no output was asked.
        info: its description (None without a checkpoint).
        baseline_dice: validation Dice of the starting weights (NaN without validation).
        best_dice: validation Dice of the kept weights (NaN without validation).
        best_step: the step they come from (0: the starting weights were not beaten).
        steps_done: optimisation steps run.
        stopped: ``"finished"``, ``"early_stop"``, ``"time_limit"`` or ``"cancelled"``.
        history: one row per step (``step``, ``loss``, ``lr``, ``wall_s``, ``val_dice``).
        n_train: training regions.
        n_val: validation regions.
        n_replay: replayed samples.
        data_hash: hash of the training data.
        seconds: wall time.
        precision: the precision the steps ran in (``fp32`` once a step gave NaN in bf16).
    """

    model: Any
    checkpoint: Path | None
    info: Any
    baseline_dice: float
    best_dice: float
    best_step: int
    steps_done: int
    stopped: str
    history: list[dict] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0
    n_replay: int = 0
    data_hash: str = ""
    seconds: float = 0.0
    precision: str = ""

    @property
    def improved(self) -> bool:
        """True when fine-tuning beat the starting weights (on validation, if any)."""
        return self.best_step > 0


def _as_config(config: FinetuneConfig | Mapping[str, Any] | None) -> FinetuneConfig:
    """The settings as a :class:`~napari_medseg.config.FinetuneConfig` (None: the defaults)."""
    if config is None:
        return FinetuneConfig()
    if isinstance(config, FinetuneConfig):
        return config
    return FinetuneConfig.from_mapping(dict(config))


def _check_samples(samples: Sequence[Sample], replay: Sequence[Sample], spec: Any) -> None:
    """Raise :class:`InputShapeError` for no samples or samples the network cannot take."""
    if not samples:
        raise InputShapeError(
            "There is nothing to learn from: no corrected region was found. Edit the labels "
            "where the prediction was wrong (or compare with no prediction) and start again.")
    for s in list(samples) + list(replay):
        if s.image.shape[0] != spec.in_channels:
            raise InputShapeError(
                f"The sample {s.name} has {s.image.shape[0]} channel(s); the network takes "
                f"{spec.in_channels}.")


def _in_strips(samples: Sequence[Sample], config: FinetuneConfig) -> bool:
    """Whether the split holds out a strip of each group (fewer than ``strips_below``)."""
    return len({s.group for s in samples}) < config.strips_below


def _split_iter(
    samples: list[Sample], replay: Sequence[Sample], config: FinetuneConfig
) -> Generator[ProgressEvent, None, tuple[list[Sample], list[Sample], list[Sample]]]:
    """The held-out split and the replay actually used; yields the :class:`DataEvent`."""
    groups = len({s.group for s in samples})
    strips = _in_strips(samples, config)
    if strips:
        train_s, val_s = split_within(samples, config.val_fraction, config.margin, config.seed)
    else:
        train_s, val_s = split_samples(samples, config.val_fraction, config.seed)
    replay = list(replay)[: config.max_replay] if config.replay > 0 else []
    pixels = sum(int(np.count_nonzero(counted(s))) for s in train_s)
    held = (f"all train, a strip of {len(val_s)} held out" if strips else
            f"{len(train_s)} for training, {len(val_s)} held out")
    yield DataEvent(
        f"{len(samples)} region(s) in {groups} group(s): {held}"
        + (f", {len(replay)} replayed" if replay else "") + ".",
        regions=len(samples), groups=groups, train=len(train_s), val=len(val_s),
        replay=len(replay), pixels=pixels)
    if not val_s:
        yield NoticeEvent(
            "All corrections form one group (they overlap), so none can be held out: there is "
            "no validation Dice, and the weights with the lowest recent loss are kept. Correct "
            "a second, separate area to get a validation.", level="warning")
    return train_s, val_s, replay


@dataclass
class _Setup:
    """The working copy of the network and what trains it."""

    work: Any
    device: Any
    policy: Any
    params: list
    trainable: list
    optimizer: Any


def _setup_iter(model: Any, config: FinetuneConfig) -> Generator[ProgressEvent, None, _Setup]:
    """A float copy of ``model`` on the device, its trainable parameters and the optimizer."""
    import torch

    from ..device import resolve_device
    from ..precision import resolve_precision

    device = resolve_device(config.device)
    policy = resolve_precision(config.precision, device)
    work = copy.deepcopy(model)
    work.float()
    work.to(device)
    if device.type in ("cpu", "cuda"):
        work.to(memory_format=torch.channels_last)
    params = list(work.parameters())
    if config.freeze_encoder:
        frozen = {id(p) for p in work.encoder_parameters()}
        if not frozen:
            yield NoticeEvent(f"{model.spec.network} names no encoder; every layer is trained.",
                              level="warning")
        for p in params:
            p.requires_grad_(id(p) not in frozen)
    trainable = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    return _Setup(work, device, policy, params, trainable, optimizer)


def _patch_side(model: Any, config: FinetuneConfig) -> int:
    """The patch side at the target resolution; a network at a coarser working resolution
    sees ``config.patch`` pixels of its own; patch 0 is the side the weights trained on."""
    spec = model.spec
    # a super-resolution network on the input grid shrinks by its own scale, not for context
    coarser = spec.input_downsample // int(spec.extra.get("super_resolution", 1))
    trained = (getattr(getattr(model, "checkpoint_info", None), "settings", None) or {}).get(
        "patch")
    if config.patch:
        side = config.patch * max(1, coarser)
    else:  # the trained side is already at the target resolution
        side = int(trained) if trained else 128 * max(1, coarser)
    return spec.valid_size(max(1, side // spec.output_scale)) * spec.output_scale


def _baseline_iter(setup: _Setup, val_s: list[Sample]) -> Generator[ProgressEvent, None, float]:
    """Validation Dice of the starting weights (NaN without held-out samples)."""
    from . import loop

    if not val_s:
        return float("nan")
    yield StageEvent("Scoring the starting weights on the held-out regions.", stage="validating")
    baseline = loop.validate(setup.work, val_s, setup.work.spec, str(setup.device),
                             setup.policy.name)
    yield loop.ValidationEvent(f"before fine-tuning: validation Dice {baseline:.4f}", step=0,
                               dice=baseline, best=baseline, improved=False)
    return baseline


def _write_checkpoint(work: Any, output: str | Path, parent_info: Any, config: FinetuneConfig,
                      result: FinetuneResult, setup: _Setup, val_s: list[Sample],
                      train_s: list[Sample], data: Mapping[str, Any] | None) -> tuple[Path, Any]:
    """Write the fine-tuned checkpoint with its lineage, atomically; returns (path, info)."""
    from ..checkpoints import checkpoint_paths
    from .lineage import lineage_root, save_checkpoint_atomic

    output = checkpoint_paths(output)[0]
    training_data = {
        "kind": "corrections", "data_hash": result.data_hash,
        "train_regions": sorted(s.name for s in train_s),
        "val_regions": sorted(s.name for s in val_s),
        "replayed": result.n_replay,
        "split": ("a strip of each region held out (split_within)"
                  if _in_strips(train_s + val_s, config) else
                  "by region group (crops never overlap across the split)")
                 + f", val_fraction {config.val_fraction}, seed {config.seed}",
    }
    if parent_info is not None and parent_info.training_data.get("dataset"):
        training_data["dataset"] = parent_info.training_data["dataset"]
    training_data.update(dict(data or {}))
    settings = dict(config.to_dict(), device=str(setup.device),
                    precision=result.precision or setup.policy.name,
                    steps_done=result.steps_done, stopped=result.stopped,
                    wall_time_s=round(result.seconds, 1))
    metrics = {"val_dice": _round(result.best_dice),
               "val_dice_before": _round(result.baseline_dice), "best_step": result.best_step,
               "improved": result.best_step > 0,
               "split": "held-out correction regions"}
    root = lineage_root(parent_info)
    norm = None if parent_info is None else parent_info.normalization_config()
    info = save_checkpoint_atomic(
        work, output, normalization=norm,
        classes=parent_info.classes if parent_info is not None else (),
        training_data=training_data, settings=settings, metrics=metrics,
        parent=parent_info.sha256 if parent_info is not None else None,
        dtype=config.checkpoint_dtype, extra={"lineage_root": root} if root else None)
    return output, info


def _verdict(result: FinetuneResult) -> str:
    """The last event's message."""
    if not result.n_val:
        verdict = "no validation split"
    elif result.improved:
        verdict = (f"validation Dice {result.baseline_dice:.4f} -> {result.best_dice:.4f} "
                   f"(step {result.best_step})")
    else:
        verdict = (f"no step beat the starting weights (validation Dice "
                   f"{result.baseline_dice:.4f}); they are kept")
    how = {"finished": "finished", "early_stop": "stopped early",
           "time_limit": "reached its time limit", "cancelled": "was stopped"}.get(
        result.stopped, result.stopped)
    return f"Fine-tuning {how} after {result.steps_done} steps: {verdict}."


def finetune_iter(
    model: Any,
    samples: Sequence[Sample],
    config: FinetuneConfig | Mapping[str, Any] | None = None,
    *,
    replay: Sequence[Sample] = (),
    cancel: CancelToken | None = None,
    output: str | Path | None = None,
    data: Mapping[str, Any] | None = None,
) -> Generator[ProgressEvent, None, FinetuneResult]:
    """Fine-tune a copy of ``model`` on ``samples``; yields events, returns a result.

    Args:
        model: a loaded network (``resolve_weights``/``create_model``); it is not modified.
        samples: training samples (:func:`samples_from_corrections`, or whole images); the
            held-out split is by their ``group``.
        config: the settings (a :class:`~napari_medseg.config.FinetuneConfig` or a mapping).
        replay: earlier samples mixed into the batches (``config.replay`` of the patches).
        cancel: checked before every step; a cancelled run keeps the best weights so far.
        output: where to write the checkpoint (atomically); None keeps it in memory only.
        data: more to record in the checkpoint's ``training_data`` (image names ...).

    Returns:
        A :class:`FinetuneResult` (also carried by the last event, a ``FinishedEvent``).

    Raises:
        InputShapeError: no samples, or samples that do not fit the network.
    """
    import torch

    from .loop import LoopState, optimise_iter

    config, cancel = _as_config(config), cancel or CancelToken()
    t_start = time.perf_counter()
    samples, spec = list(samples), model.spec
    _check_samples(samples, replay, spec)
    parent_info = getattr(model, "checkpoint_info", None)
    yield StageEvent("Preparing fine-tuning.", stage="loading")
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    train_s, val_s, replay = yield from _split_iter(samples, replay, config)
    sampler = RegionSampler(train_s, _patch_side(model, config), replay, config.replay,
                            seed=config.seed)
    setup = yield from _setup_iter(model, config)
    work = setup.work
    baseline = yield from _baseline_iter(setup, val_s)
    state = LoopState(step=0, best=baseline if val_s else -math.inf, best_step=0)
    kept = {k: v.detach().clone() for k, v in work.state_dict().items()}
    interim = None
    if output is not None:
        interim = _Interim(output, config, setup)
        if config.resume:
            state = yield from interim.resume_iter(work, sampler, kept, state)

    def keep_best(step: int, score: float, wall: float) -> None:
        kept.update({k: v.detach().clone() for k, v in work.state_dict().items()})
        if interim is not None:
            interim.dirty = True

    def after_validation(st: LoopState) -> None:
        if interim is not None:
            interim.maybe_write(work, kept, st, lambda snap: _write_checkpoint(
                snap, output, parent_info, config,
                _partial(snap, baseline, st, t_start, samples_hash(samples)),
                setup, val_s, train_s, data))

    yield StageEvent(
        f"Fine-tuning {spec.network}/{spec.variant} on {setup.device} ({setup.policy.name}): "
        f"{config.steps} steps at most, {len(setup.trainable)} of {len(setup.params)} tensors "
        "trained.", stage="training")
    stopped, steps_done = yield from optimise_iter(
        work, sampler, val_s, config, setup.optimizer, setup.trainable, device=setup.device,
        policy=setup.policy, generator=generator, cancel=cancel, state=state, on_best=keep_best,
        after_validation=after_validation, spent_s=time.perf_counter() - t_start)
    for p in setup.params:
        p.requires_grad_(True)
    work.load_state_dict(kept)
    work.eval()
    result = FinetuneResult(
        model=work, checkpoint=None, info=None, baseline_dice=baseline,
        best_dice=state.best if val_s else float("nan"), best_step=state.best_step,
        steps_done=steps_done, stopped=stopped, history=state.history, n_train=len(train_s),
        n_val=len(val_s), n_replay=len(replay), data_hash=samples_hash(samples),
        seconds=time.perf_counter() - t_start, precision=state.precision or setup.policy.name)
    if output is not None:
        result.checkpoint, result.info = _write_checkpoint(
            work, output, parent_info, config, result, setup, val_s, train_s, data)
        interim.finish()
    info = result.info if result.info is not None else parent_info
    if info is not None:
        work.checkpoint_info = info
    yield FinishedEvent(_verdict(result), result=result)
    return result


class _Interim:
    """The best weights so far written to the output at intervals, with the state a
    resumed run continues from (optimiser, counters; safetensors and JSON beside the output,
    removed when the run ends)."""

    def __init__(self, output: str | Path, config: FinetuneConfig, setup: _Setup) -> None:
        from ..checkpoints import checkpoint_paths

        self.output = checkpoint_paths(output)[0]
        self.config = config
        self.setup = setup
        self.dirty = True  # the starting weights are the best until a step beats them
        self.last = time.perf_counter()

    def resume_iter(self, work: Any, sampler: Any, kept: dict, state: Any
                    ) -> Generator[ProgressEvent, None, Any]:
        """The state to start from: a killed run's, when one was written, else ``state``."""
        from ..checkpoints import load_checkpoint
        from .loop import LoopState, _load_state

        saved = _load_state(self.output, work, self.setup.optimizer)
        if saved is None:
            return state
        if self.output.is_file():  # the best weights it had written
            best_model, _ = load_checkpoint(self.output, verify=False)
            kept.update({k: v.detach().clone() for k, v in best_model.state_dict().items()
                         if k in kept})
        for _ in range(saved["step"]):  # keep the data stream reproducible
            sampler.rng.random()
        yield NoticeEvent(f"Resuming at step {saved['step']} (best validation score so far "
                          f"{saved['best']:.4f}).")
        return LoopState(saved["step"], saved["best"], saved["best_step"], saved["bad"],
                         saved["history"])

    def maybe_write(self, work: Any, kept: dict, state: Any, write: Any) -> None:
        """Write the state, and the best weights if they changed, when it is time."""
        from .loop import _save_state

        if time.perf_counter() - self.last < self.config.save_every_s:
            return
        if self.dirty:
            snap = copy.deepcopy(work)
            snap.load_state_dict(kept)
            write(snap.eval())
            self.dirty = False
        _save_state(self.output, work, self.setup.optimizer, state.step, state.best,
                    state.best_step, state.bad, state.history)
        self.last = time.perf_counter()

    def finish(self) -> None:
        """The run ended: its resume state goes."""
        from .loop import _state_path

        path = _state_path(self.output)
        for p in (path, path.with_suffix(".json")):
            p.unlink(missing_ok=True)


def _partial(model: Any, baseline: float, state: Any, t_start: float,
             data_hash: str) -> FinetuneResult:
    """The result so far, for an interim checkpoint."""
    return FinetuneResult(model=model, checkpoint=None, info=None, baseline_dice=baseline,
                          best_dice=state.best, best_step=state.best_step,
                          steps_done=state.step, stopped="running", history=state.history,
                          data_hash=data_hash, seconds=time.perf_counter() - t_start,
                          precision=state.precision)


def _round(value: float) -> float | None:
    """``value`` to 4 decimals for the checkpoint's metrics; None when it is not finite."""
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def finetune(model: Any, samples: Sequence[Sample], config: Any = None,
             **kwargs: Any) -> FinetuneResult:
    """Run :func:`finetune_iter` to the end and return its result."""
    return drain(finetune_iter(model, samples, config, **kwargs))
