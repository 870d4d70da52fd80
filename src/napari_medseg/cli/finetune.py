"""``napari-medseg finetune``: fine-tune weights on image/mask folders within their model line."""

from __future__ import annotations

import argparse
import json
import sys

from .common import EXIT_CANCELLED, Progress, add_compute_args, add_run_args, ctrl_c_cancels
from .common import load_config, notice_line

__all__ = ["add_finetune", "cmd_finetune"]

def _description() -> str:
    """What ``finetune --help`` says, its numbers read from the defaults."""
    from ..config import FinetuneConfig

    d = FinetuneConfig()
    return (
        "Fine-tune a checkpoint or shipped weights on image/mask pairs matched by file name "
        f"(a.tif <-> a.tif or a_mask.tif). With fewer than {d.strips_below} images a strip of "
        "each is held out for the validation Dice (with more, a fraction "
        f"{d.val_fraction:g} of the images); the encoder "
        f"{'stays as it was and the decoder and heads learn' if d.freeze_encoder else 'learns too'}"
        ". The best weights are kept and written to CKPT with their lineage (parent, data "
        "hash, settings, metrics). As in the Fine-tune widget, samples from earlier rounds on "
        f"the same weights are mixed in ({d.replay:.0%} of each batch), these images are kept "
        "for the next round, and weights that beat their parent become the active ones of "
        "their line (user data folder, NAPARI_MEDSEG_HOME). For a 2D network on the input "
        "grid, images whose metadata give a pixel size other than the weights' are resampled "
        "to it (--native-pixels keeps their own). Ctrl-C stops and keeps the best "
        "weights so far (exit 130); the best weights are also written to CKPT every minute, so "
        "a killed run loses at most a minute and --resume continues it.")


def _finetune_config(args: argparse.Namespace):
    from ..config import FinetuneConfig

    return load_config(FinetuneConfig, args, "finetune", {
        "steps": args.steps, "lr": args.lr, "device": args.device, "precision": args.precision,
        "batch_size": args.batch_size, "patch": args.patch, "val_fraction": args.val_fraction,
        "max_minutes": args.max_minutes, "seed": args.seed,
        "freeze_encoder": args.freeze_encoder,
        "native_pixels": args.native_pixels or None,
        "freeze_norm_stats": False if args.update_norm_stats else None,
        "resume": True if args.resume else None,
    })


def _show(events, bar: Progress, quiet: bool):
    """Print fine-tuning's stages, validations and step progress; returns its result."""
    from ..engine.progress import FinishedEvent, NoticeEvent, StageEvent
    from ..engine.training.loop import StepEvent, ValidationEvent

    result = None
    for event in events:
        if isinstance(event, NoticeEvent):
            bar.say(notice_line(event))
        elif isinstance(event, StepEvent):
            bar.advance(event.step, event.steps)
            bar.postfix(f"loss {event.loss:.4f}")
        elif isinstance(event, ValidationEvent) and not quiet:
            bar.say(f"napari-medseg: {event.message}" + (" (best)" if event.improved else ""))
        elif isinstance(event, StageEvent) and not quiet:
            bar.say(f"napari-medseg: {event.message}")
        elif isinstance(event, FinishedEvent):
            result = event.result
            bar.close()
            print(f"napari-medseg: {event.message}", file=sys.stderr)
    return result


def _summary(result, parent: str | None) -> dict:
    def finite(x: float) -> float | None:
        return None if x != x else round(float(x), 4)  # NaN (no validation) -> null

    return {
        "checkpoint": str(result.checkpoint), "parent": parent,
        "val_dice_before": finite(result.baseline_dice), "val_dice": finite(result.best_dice),
        "best_step": result.best_step, "steps_done": result.steps_done,
        "stopped": result.stopped, "seconds": round(result.seconds, 1),
    }


def cmd_finetune(args: argparse.Namespace) -> int:
    """``napari-medseg finetune``: writes the checkpoint; 0 done, 2 an error, 130 stopped by
    Ctrl-C (the best weights so far are written all the same)."""
    from ..engine.batch.outputs import check_checkpoint_output
    from ..engine.checkpoints import resolve_weights
    from ..engine.pixel_size import pixel_size_of
    from ..engine.progress import CancelToken
    from ..engine.seg_task import task_of
    from ..engine.training.corrections import samples_from_folders
    from ..engine.training.workflow import finetune_samples_iter

    config = _finetune_config(args)
    # --resume continues the run that wrote CKPT (its best weights so far are there)
    check_checkpoint_output(args.output, args.weights, args.overwrite or args.resume)
    model, info = resolve_weights(args.weights)
    spec = model.spec
    notes: list[str] = []
    samples, files_hash = samples_from_folders(
        args.images, args.masks, num_classes=spec.num_classes, in_channels=spec.in_channels,
        normalization=info.normalization_config(), config=config,
        output_scale=spec.output_scale, pattern=args.pattern or "*", task=task_of(model),
        pixel_size=pixel_size_of(model) if spec.spatial_dims == 2 else None, notes=notes,
        model=None if config.native_pixels else model)
    for note in dict.fromkeys(notes) if not args.quiet else ():  # the same sentence once
        print(f"napari-medseg: {note}", file=sys.stderr)
    if not args.quiet:
        print(f"napari-medseg: fine-tuning {info.network}/{info.variant} "
              f"({info.tag or args.weights}) on {len(samples)} image plane(s)", file=sys.stderr)
    token = CancelToken()
    data = {"images": str(args.images), "masks": str(args.masks), "data_hash": files_hash}
    with Progress("step", desc="fine-tune", quiet=args.quiet) as bar:
        # first Ctrl-C: stop and keep the best; second: abort
        with ctrl_c_cancels(token, lambda: bar.say(
                "napari-medseg: stopping after this step; the best weights so far are kept "
                "(Ctrl-C again to abort)")):
            result = _show(finetune_samples_iter(
                model, samples, config, output=args.output, data=data,
                base_source=args.weights, cancel=token), bar, args.quiet)
    assert result is not None
    cancelled = result.stopped == "cancelled"
    if args.json:
        print(json.dumps(_summary(result, info.sha256), indent=2))
    else:
        print(f"napari-medseg: wrote {result.checkpoint} (use it with --weights "
              f"{result.checkpoint})")
    return EXIT_CANCELLED if cancelled else 0


def add_finetune(sub) -> argparse.ArgumentParser:
    """The ``finetune`` sub-command's arguments."""
    from ..config import FinetuneConfig

    d = FinetuneConfig()  # the defaults the help states
    p = sub.add_parser("finetune", description=_description(),
                       help="fine-tune weights on corrected masks (image/mask folders)")
    p.add_argument("--weights", required=True, metavar="BASE",
                   help="shipped weights tag (see `napari-medseg models`) or a checkpoint path")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images")
    p.add_argument("--masks", required=True, metavar="DIR",
                   help="folder of masks (class or instance labels) named like the images")
    p.add_argument("-o", "--output", required=True, metavar="CKPT",
                   help="the fine-tuned checkpoint (.safetensors; the .json goes beside it)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing CKPT (never the base checkpoint)")
    p.add_argument("--resume", action="store_true",
                   help="continue a run that was killed: from the best weights it wrote to "
                        "CKPT (at most a minute old) and its saved optimiser state")
    p.add_argument("--steps", help=f"optimisation steps at most (default {d.steps})")
    p.add_argument("--lr", help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--freeze-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="train only the decoder and heads (the default); "
                        "--no-freeze-encoder trains every layer")
    p.add_argument("--update-norm-stats", action="store_true",
                   help="re-estimate batch-norm statistics from the new images (default: "
                        "keep the base model's; only worth it with many images)")
    p.add_argument("--native-pixels", action="store_true",
                   help="train on the images' own pixels even when their metadata give a pixel "
                        "size other than the weights' (default: resample to the weights')")
    p.add_argument("--patch", help="patch side in pixels (default: the one the weights "
                   "were trained with)")
    p.add_argument("--val-fraction", help=f"fraction held out (default {d.val_fraction:g}: of "
                   f"the images, or with fewer than {d.strips_below} a strip of each)")
    p.add_argument("--max-minutes", help="end within this many minutes in all, keeping the "
                   f"best weights (default {d.max_minutes:g}; 0 no limit)")
    p.add_argument("--seed", help=f"random seed (default {d.seed})")
    add_compute_args(p, batch_help=f"patches per step (default {d.batch_size})")
    p.add_argument("--pattern", help="glob the file names must match (default *)")
    add_run_args(p, "finetune", json=True)
    return p
