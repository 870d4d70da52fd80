"""Does fine-tuning on a few corrected images help where the shipped model does worst?

On the DSB2018 nuclei data (``../shared/data/dsb2018_nuclei``):

1. every image gets an *acquisition type* from its size, colour (grey when R = G = B) and
   brightness (light background when the mean grey value is above 100);
2. the base weights are scored (foreground Dice) on up to ``--probe`` images of every type
   that has at least ``--n-train`` + 3 images (held-out images of the base first); the type
   with the lowest mean Dice is the one it does worst on;
3. ``--n-train`` images of that type (the base's training images first, so its held-out ones
   stay for evaluation) are the user's corrections: fine-tuned on whole (``--mode whole``,
   what ``napari-medseg finetune`` does) or only where the base's prediction was wrong
   (``--mode corrections``, what the Fine-tune widget does), with the default
   :class:`~napari_medseg.config.FinetuneConfig` unless ``--steps`` says otherwise;
4. Dice before and after on the other images of that type (at most ``--max-eval``, the
   base's held-out ones first; their mean is also given alone, ``mean_held_out_by_base``:
   the base has seen the others in training, which flatters its "before").

Prints one JSON object (also written to ``--out``). Re-run it with::

    .venv/bin/python benchmarks/bench_finetune.py [--weights TAG|PATH] [--mode both]

``--gui`` instead measures the longest event-loop stall of napari while the Fine-tune widget
trains (needs a display; ``xvfb-run -a`` gives a virtual one).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

__all__ = ["main", "acquisition_types", "pick_base", "run"]

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dsb2018_nuclei"


def acquisition_types(data: Path) -> dict[str, str]:
    """Image stem -> ``"<H>x<W> grey|colour light|dark"``."""
    import tifffile

    out = {}
    with open(data / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            img = tifffile.imread(data / "images" / f"{row['name']}.tif")
            grey = img.ndim == 2 or bool(np.all(img[..., 0] == img[..., 1]) and np.all(
                img[..., 1] == img[..., 2]))
            light = float(img.mean()) > 100
            size = "x".join(str(s) for s in img.shape[:2])
            colour = "grey" if grey else "colour"
            out[row["name"]] = f"{size} {colour} {'light' if light else 'dark'}"
    return out


def pick_base(weights: str | None) -> str:
    """The weights to start from: ``--weights``, else the shipped DSB2018 weights the demo
    uses (the best validation Dice)."""
    if weights:
        return weights
    from napari_medseg.engine.checkpoints import default_weights

    tag = default_weights("dsb2018_nuclei")
    if tag is None:
        raise SystemExit("No shipped weights trained on dsb2018_nuclei; pass --weights PATH.")
    return tag


def _folder(tmp: Path, name: str, data: Path, stems: list[str]) -> tuple[Path, Path]:
    """Symlinked image/mask folders holding ``stems``."""
    images, masks = tmp / name / "images", tmp / name / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for stem in stems:
        os.symlink(data / "images" / f"{stem}.tif", images / f"{stem}.tif")
        os.symlink(data / "masks" / f"{stem}.tif", masks / f"{stem}.tif")
    return images, masks


def _dice(model, tmp: Path, name: str, data: Path, stems: list[str], device: str,
          held_out: set[str] = frozenset()) -> dict:
    from napari_medseg.config import PredictConfig
    from napari_medseg.engine.training.evaluate import evaluate

    images, masks = _folder(tmp, name, data, stems)
    result = evaluate(model, images, masks, PredictConfig.from_mapping({"device": device}),
                      instances=False)
    per = {r.name.rsplit(".", 1)[0]: round(r.scores["dice"], 4) for r in result.rows}
    unseen = [v for k, v in per.items() if k in held_out]
    return {"mean": round(float(np.mean(list(per.values()))), 4),
            "mean_held_out_by_base": round(float(np.mean(unseen)), 4) if unseen else None,
            "images": per, "seconds": round(result.seconds, 1)}


def _samples(model, data: Path, stems: list[str], mode: str, config, device: str):
    """Fine-tuning samples of ``stems``: whole images, or the regions the base got wrong."""
    from napari_medseg.engine.seg_task import task_of
    from napari_medseg.engine.training.finetune import samples_from_corrections
    from napari_medseg.engine.inference.pipeline import predict
    from napari_medseg.io import read_image

    spec, info = model.spec, model.checkpoint_info
    samples = []
    for stem in stems:
        image, meta = read_image(data / "images" / f"{stem}.tif")
        labels, _ = read_image(data / "masks" / f"{stem}.tif")
        labels = np.asarray(labels)
        prediction = None
        if mode == "corrections":
            prediction = np.asarray(predict(image, model, {"device": device, "axes": meta.axes})[
                "mask"])
        found = samples_from_corrections(
            image, labels, num_classes=spec.num_classes, in_channels=spec.in_channels,
            axes=meta.axes, prediction=prediction, normalization=info.normalization_config(),
            config=config, output_scale=spec.output_scale, name=stem, task=task_of(model))
        if mode == "whole":
            for s in found:
                s.group = stem
        samples.extend(found)
    return samples


def run(args: argparse.Namespace) -> dict:
    """The benchmark (see the module docstring); returns the JSON-friendly report."""
    import torch

    from napari_medseg.config import FinetuneConfig
    from napari_medseg.engine.checkpoints import resolve_weights
    from napari_medseg.engine.training.finetune import finetune

    data = Path(args.data)
    t_all = time.perf_counter()
    base_source = pick_base(args.weights)
    base, info = resolve_weights(base_source)
    held_out = set(info.training_data.get("val_files") or [])
    types = acquisition_types(data)
    by_type: dict[str, list[str]] = {}
    for stem, kind in sorted(types.items()):
        by_type.setdefault(kind, []).append(stem)
    rng = np.random.default_rng(args.seed)
    report: dict = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_threads": torch.get_num_threads(), "device": args.device,
        "base": {"weights": str(base_source), "network": info.network, "variant": info.variant,
                 "sha256": info.sha256, "held_out_images": len(held_out)},
        "types": {},
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # 1-2: the type the base does worst on.
        for kind, stems in sorted(by_type.items(), key=lambda kv: -len(kv[1])):
            if len(stems) < args.n_train + 3:
                continue
            ordered = sorted(stems, key=lambda s: (s not in held_out, s))
            probe = ordered[: args.probe]
            score = _dice(base, tmp, f"probe-{len(report['types'])}", data, probe, args.device)
            report["types"][kind] = {"images": len(stems), "probed": len(probe),
                                     "dice": score["mean"]}
        worst = min(report["types"], key=lambda k: report["types"][k]["dice"])
        stems = by_type[worst]
        train_pool = [s for s in stems if s not in held_out]
        if len(train_pool) < args.n_train:
            train_pool = stems
        train = sorted(rng.choice(train_pool, size=args.n_train, replace=False).tolist())
        rest = [s for s in stems if s not in train]
        rest = sorted(rest, key=lambda s: (s not in held_out, s))[: args.max_eval]
        report["worst_type"] = worst
        report["finetune_images"] = train
        report["eval_images"] = rest
        report["eval_held_out_by_base"] = sum(s in held_out for s in rest)
        # 4: before.
        before = _dice(base, tmp, "before", data, rest, args.device, held_out)
        report["dice_before"] = before
        settings = {"device": args.device}
        if args.steps:
            settings["steps"] = args.steps
        if args.max_minutes:
            settings["max_minutes"] = args.max_minutes
        for item in args.set:
            key, value = item.split("=", 1)
            settings[key] = yaml.safe_load(value)
        config = FinetuneConfig.from_mapping(settings)
        report["config"] = config.to_dict()
        modes = ["whole", "corrections"] if args.mode == "both" else [args.mode]
        for mode in modes:
            t0 = time.perf_counter()
            samples = _samples(base, data, train, mode, config, args.device)
            result = finetune(base, samples, config,
                              output=tmp / f"ft-{mode}" if args.keep is None else
                              Path(args.keep) / f"finetuned-{mode}")
            seconds = time.perf_counter() - t0
            after = _dice(result.model, tmp, f"after-{mode}", data, rest, args.device,
                          held_out)
            report[mode] = {
                "regions": len(samples), "train_regions": result.n_train,
                "val_regions": result.n_val,
                "loss_pixels": int(sum(float(s.valid.sum()) for s in samples)),
                "steps_done": result.steps_done, "stopped": result.stopped,
                "best_step": result.best_step,
                "val_dice_before": round(result.baseline_dice, 4),
                "val_dice_after": round(result.best_dice, 4),
                "finetune_seconds": round(seconds, 1),
                "dice_after": after,
                "dice_gain": round(after["mean"] - before["mean"], 4),
                "checkpoint": str(result.checkpoint) if args.keep else None,
            }
            print(json.dumps({mode: report[mode]}), file=sys.stderr, flush=True)
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    return report


def measure_gui_stall(args: argparse.Namespace) -> dict:
    """The longest gap between 5 ms ticks of napari's event loop while the widget trains."""
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_medseg._napari.finetune_widget import COMPARE_NONE, FinetuneWidget
    from napari_medseg._napari.segment_widget import SegmentWidget
    from napari_medseg.engine.checkpoints import checkpoint_paths, resolve_weights
    from napari_medseg.io import read_image

    data = Path(args.data)
    stem = sorted(p.stem for p in (data / "images").glob("*.tif"))[0]
    image, _ = read_image(data / "images" / f"{stem}.tif")
    labels, _ = read_image(data / "masks" / f"{stem}.tif")
    viewer = napari.Viewer(show=True)
    viewer.add_image(np.asarray(image), name="cells", rgb=True)
    viewer.add_labels(np.asarray(labels).astype(np.int32), name="cells corrected")
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment")
    app = QApplication.instance()
    while not seg.ready:  # the network list loads in a worker
        app.processEvents()
        time.sleep(0.01)
    source = pick_base(args.weights)
    weights, description = checkpoint_paths(source)
    if weights.is_file() or description.is_file():
        seg.add_checkpoint(str(description if description.is_file() else weights))
    else:
        resolve_weights(source)  # fails loudly when the tag is unknown
        seg.use_weights(source, scope=None)
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune")
    widget.labels_combo.setCurrentText("cells corrected")
    widget.compare_combo.setCurrentText(COMPARE_NONE)
    widget.steps_spin.setValue(args.steps or 40)
    widget.device_combo.setCurrentIndex(max(0, widget.device_combo.findData(args.device)))
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))

    def settle(until) -> None:
        t_end = time.perf_counter() + 900
        while not until() and time.perf_counter() < t_end:
            app.processEvents()
            time.sleep(0.002)

    settle(lambda: not seg.busy and not seg.running)
    timer.start()
    settle(lambda: len(ticks) > 200)  # idle baseline, about 1 s
    idle = np.diff(ticks)
    ticks.clear()
    t0 = time.perf_counter()
    widget.start()
    settle(lambda: not widget.running)
    seconds = time.perf_counter() - t0
    timer.stop()
    gaps = np.diff(ticks)
    result = widget.last_result
    out = {
        "mode": "gui", "image": stem, "weights": str(source), "steps": widget.steps_spin.value(),
        "train_seconds": round(seconds, 1),
        "steps_done": None if result is None else result.steps_done,
        "error": None if widget.last_outcome is None else widget.last_outcome.error,
        "idle_longest_gap_ms": round(float(idle.max()) * 1000, 1),
        "training_longest_gap_ms": round(float(gaps.max()) * 1000, 1),
        "training_gaps_over_100ms": int((gaps > 0.1).sum()),
        "training_p99_gap_ms": round(float(np.percentile(gaps, 99)) * 1000, 1),
        "ticks": int(len(gaps)),
    }
    settle(lambda: not seg.busy and not seg.running)
    viewer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; prints the JSON report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", help="base weights (tag or checkpoint path); default: the "
                                     "shipped DSB2018 nuclei weights")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--n-train", type=int, default=5)
    p.add_argument("--probe", type=int, default=6, help="images scored per type")
    p.add_argument("--max-eval", type=int, default=20)
    p.add_argument("--mode", choices=("whole", "corrections", "both"), default="whole")
    p.add_argument("--steps", type=int, help="fine-tuning steps (default: FinetuneConfig's)")
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another FinetuneConfig setting, e.g. --set lr=1e-4 (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", help="folder to keep the fine-tuned checkpoints in")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--gui", action="store_true",
                   help="measure napari's event-loop stalls while the Fine-tune widget trains")
    args = p.parse_args(argv)
    report = measure_gui_stall(args) if args.gui else run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
