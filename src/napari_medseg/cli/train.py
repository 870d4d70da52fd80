"""``napari-medseg train``, ``eval`` and ``demo``: train a network, score weights, try the
shipped nuclei weights on the bundled sample."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .common import Command, Progress, load_config

__all__ = ["cmd_train", "cmd_eval", "cmd_demo", "add_train_eval_demo"]


def _show_train(events, bar: Progress):
    """Print training's messages and step progress; returns its result."""
    from ..engine.training.loop import StepEvent

    result = None
    for event in events:
        if isinstance(event, StepEvent):
            bar.advance(event.step, event.steps)
            bar.postfix(f"loss={event.loss:.4f}, lr={event.lr:.1e}")
        elif getattr(event, "message", ""):
            bar.say(event.message)
        result = getattr(event, "result", result)
    return result


def cmd_train(args: argparse.Namespace) -> int:
    """``napari-medseg train``: writes the best checkpoint; 0 done, 2 an error."""
    from ..config import TrainConfig
    from ..engine.training.train import train_iter

    renamed = {"model": "network", "classes": "num_classes", "minutes": "max_minutes"}
    config = load_config(TrainConfig, args, "train", {
        **{renamed.get(key, key): getattr(args, key, None)
           for key in ("model", "variant", "in_channels", "classes", "input_downsample",
                       "patch", "batch_size", "steps", "lr", "val_fraction", "val_every",
                       "patience", "device", "precision", "minutes", "seed", "pattern",
                       "freeze_encoder", "task", "boundary_width")},
        "resume": False if args.no_resume else None,
    })
    from ..engine.batch.outputs import check_checkpoint_output

    # Never the starting weights; an earlier output of its own is replaced (a re-run resumes).
    check_checkpoint_output(args.output, args.weights, overwrite=True)
    with Progress("step", quiet=args.quiet) as bar:
        bar.advance(0, config.steps)
        result = _show_train(train_iter(args.images, args.masks, args.output, config,
                                        parent=args.weights), bar)
    print(f"best checkpoint: {result.checkpoint} (validation Dice {result.best_dice:.4f} at step "
          f"{result.best_step}; {result.stopped})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``napari-medseg eval``: a table (or JSON) of metrics per image, their means, the object
    counts and the means per acquisition type (``format_table`` / ``EvalResult.to_dict``).

    Returns 0 when every image was scored, 1 when some could not be (each named on stderr as
    ``napari-medseg: error: NAME: why``, and in the table or JSON); 2 (raised) when the run
    could not start.
    """
    from ..config import PredictConfig
    from ..engine.checkpoints import resolve_weights
    from ..engine.training.evaluate import evaluate_iter, format_table

    model, _info = resolve_weights(args.weights, device=args.device or "cpu")
    config = load_config(PredictConfig, args, None,
                         {"tile": args.tile, "device": args.device, "precision": args.precision,
                          "tta": args.tta})
    result = None
    for event in evaluate_iter(model, args.images, args.masks, config, pattern=args.pattern):
        if getattr(event, "error", ""):
            print(f"napari-medseg: error: {event.name}: {event.error}", file=sys.stderr)
        elif not args.json and not args.quiet and getattr(event, "message", ""):
            print(event.message, file=sys.stderr)
        result = getattr(event, "result", result)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_table(result))
    return 1 if result.failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``napari-medseg demo``: segment the nuclei sample, score it, and show it in napari."""
    import numpy as np

    from ..config import PredictConfig
    from ..engine.checkpoints import default_weights, resolve_weights
    from ..engine.inference.pipeline import predict
    from ..engine.metrics import dice
    from ..errors import WeightsNotFoundError
    from ..io import read_image, write_labels
    from ..io.samples import sample_path

    tag = args.weights or default_weights()
    if tag is None:
        raise WeightsNotFoundError(
            "No nuclei weights are installed; train some with scripts/train_shipped.py or "
            "pass --weights CHECKPOINT."
        )
    image_path = sample_path("nuclei")
    image, meta = read_image(image_path)
    model, info = resolve_weights(tag)
    print(f"Segmenting {image_path.name} {tuple(image.shape)} with {tag} "
          f"({info.network}/{info.variant}) ...")
    result = predict(image, model, PredictConfig.from_mapping(
        {"outputs": "mask,boundary,instances"}), meta=meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("mask", "boundary", "instances"):
        path = out / (f"nuclei_{name}.tif")
        write_labels(path, np.asarray(result[name]), meta)
        written.append(path)
    reference, _ = read_image(sample_path("nuclei", mask=True))
    score = dice(np.asarray(result["mask"]) > 0, np.asarray(reference) > 0)
    n = int(np.asarray(result["instances"]).max())
    print(f"{n} nuclei, Dice {score:.3f} against the sample's annotation; "
          f"{result.stats.get('seconds', float('nan')):.2f} s on {result.stats.get('device')} "
          f"({result.stats.get('precision')}).")
    for path in written:
        print(f"wrote {path}")
    if args.no_viewer or not os.environ.get("DISPLAY"):
        if not args.no_viewer:
            print("No display: skipping the napari window (set DISPLAY, or run under xvfb-run).")
        return 0
    import subprocess

    print("Opening napari with the result and the Segment widget ...")
    subprocess.run([sys.executable, "-m", "napari_medseg._napari.demo", str(image_path),
                    *map(str, written), "--weights", tag], check=False)
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a network on image/mask folders")
    p.add_argument("--model", help="network name (napari-medseg models)")
    p.add_argument("--variant", help="tiny, lite or paper")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of masks with the same names")
    p.add_argument("-o", "--output", required=True, help="checkpoint path (.safetensors)")
    p.add_argument("--weights", help="start from this checkpoint instead of random weights")
    p.add_argument("--in-channels", type=int, dest="in_channels")
    p.add_argument("--classes", type=int, help="K classes (2 = background + foreground)")
    p.add_argument("--task", choices=("classes", "instances"),
                   help="what the masks hold: class indices (default) or one number per "
                        "object (instances: the network learns background, interior and "
                        "boundary, 3 classes, and predicts separate objects)")
    p.add_argument("--boundary-width", type=int, dest="boundary_width",
                   help="instances: the boundary band's width inside each object (default: the "
                        "--init weights' own, else 1)")
    p.add_argument("--input-downsample", type=int, dest="input_downsample",
                   help="run the network on the image shrunk by this integer factor (large "
                        "objects such as skin lesions; default 1)")
    for flag, kind in (("--patch", int), ("--batch-size", int), ("--steps", int), ("--lr", float),
                       ("--val-fraction", float), ("--val-every", int), ("--patience", int)):
        p.add_argument(flag, type=kind)
    p.add_argument("--minutes", type=float, help="stop after this many minutes")
    p.add_argument("--device")
    p.add_argument("--precision")
    p.add_argument("--seed", type=int)
    p.add_argument("--pattern")
    p.add_argument("--freeze-encoder", action="store_const", const=True, dest="freeze_encoder")
    p.add_argument("--no-resume", action="store_true", help="ignore a saved training state")
    p.add_argument("--config", help="TOML file with a [train] table")
    p.add_argument("-q", "--quiet", action="store_true")


def add_train_eval_demo(sub, commands: dict[str, Command]) -> None:
    """The ``train``, ``eval`` and ``demo`` sub-commands, entered in ``commands``."""
    _add_train(sub)
    commands["train"] = cmd_train

    p = sub.add_parser(
        "eval", help="score weights on image/mask folders",
        description="Score weights on every image of IMAGES against the mask of the same name "
                    "in MASKS (a.png <-> a.* or a_mask.*). An image that cannot be scored (no "
                    "mask, unreadable, a mask of another size) is reported and the rest go on. "
                    "A reference with instance labels is also scored per object (F1 and AP at "
                    "IoU 0.5, DSB 2018 score, AJI), and for such 2D images the means are repeated "
                    "per acquisition type (fluorescence, bright-field, H&E).",
        epilog="Exit status: 0 every image scored, 1 some could not be, 2 the run could not "
               "start.")
    p.add_argument("--weights", required=True, help="model-card tag or checkpoint path")
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--pattern", default="*")
    p.add_argument("--tile", type=int)
    p.add_argument("--device")
    p.add_argument("--precision")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation; default: as the weights say")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    commands["eval"] = cmd_eval

    p = sub.add_parser("demo", help="segment the bundled nuclei sample (and show it in napari)")
    p.add_argument("--weights", help="model-card tag or checkpoint (default: best nuclei weights)")
    p.add_argument("--out", default="demo_output", help="output folder")
    p.add_argument("--no-viewer", action="store_true", help="do not open napari")
    commands["demo"] = cmd_demo
