"""Train a network on one of the shared data sets and ship it: weights + model card.

    python scripts/train_shipped.py --network sa2net --dataset dsb2018_nuclei \
        --data-root ../shared/data --minutes 25 [--variant lite] [--steps 3000]

Writes ``weights/<tag>.safetensors`` (fp16) with its JSON description, evaluates the best
checkpoint on the held-out images recorded in it (the validation split, by image or slice
block), and writes the model card ``models/<tag>.yaml`` (network, variant, config, data and
split, settings, device, wall time, validation metrics, sha256, data licence). Then run
``python scripts/results_table.py`` to refresh the README's results table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import tifffile
import yaml

ROOT = Path(__file__).resolve().parents[1]

#: Per data set: channels, normalisation, licence line, and what the mask means.
DATASETS = {
    "dsb2018_nuclei": {
        "in_channels": 3, "task": "instances", "patch": 256,
        "normalization": {"mode": "percentile", "low": 1.0, "high": 99.8},
        "licence": "CC0 1.0 (BBBC038 / Kaggle Data Science Bowl 2018, Caicedo et al. 2019)",
        "target": "nuclei as objects: background, interior and each nucleus's boundary band; "
                  "instances by a seeded watershed",
    },
    "isbi2012_em": {
        "in_channels": 1, "task": "classes", "patch": 256,
        "pixel_size": {"value": 4.0, "unit": "nanometer"},
        "normalization": {"mode": "percentile", "low": 1.0, "high": 99.8},
        "licence": "research use; cite Arganda-Carreras et al. 2015 and Cardona et al. 2010",
        "target": "membranes (1) vs cell interior (0)",
    },
    "ph2_dermoscopy": {
        "in_channels": 3, "task": "classes", "patch": 256,
        # per channel, as the shipped weights were first trained (a warm start keeps it)
        "normalization": {"mode": "percentile", "low": 1.0, "high": 99.8},
        # A lesion is judged against its surroundings: a photograph is predicted in one tile
        # (up to 1536 px a side). With the network's own 768 px tiles, a 1.35x larger
        # camera's photographs (the proxy's clinic device) fell to Dice 0.878 against 0.927.
        "tile": 1536,
        "licence": "PH2: free for research and benchmarking (Mendonca et al. 2013); non-commercial",
        "target": "skin lesion",
    },
    "msd_lung_patches": {
        "in_channels": 1, "task": "classes", "patch": 48,
        # The patches were stored windowed to [0, 1]; the window is estimated from their lung
        # and soft-tissue modes (scripts/estimate_ct_window.py). Training and scoring read
        # them back in HU, so the weights take a CT as a radiologist has it.
        "stored_window": (-977.0, 259.0),
        "normalization": {"mode": "window", "low": -977.0, "high": 259.0, "clip": True},
        "pixel_size": {"value": 2.0, "unit": "millimeter"},
        "licence": "CC BY-SA 4.0 (Medical Segmentation Decathlon, Antonelli et al. 2022)",
        "target": "lung tumour on 2 mm CT patches",
    },
}


def held_out_folders(root: Path, val_files: list[str], planes: list[str],
                     tmp: Path) -> tuple[Path, Path]:
    """Copy a split's held-out images and masks from ``root`` into ``tmp``/images|masks.

    Args:
        root: the data set folder (``images/`` and ``masks/``).
        val_files: stems of the held-out files.
        planes: ``stem@z`` held-out slices of a stack split by slices (empty: whole files).
        tmp: an empty folder.

    Returns:
        The image and mask folders to evaluate on.
    """
    vi, vm = tmp / "images", tmp / "masks"
    vi.mkdir(), vm.mkdir()
    for stem in val_files:
        zs = [int(n.split("@")[1]) for n in planes if n.split("@")[0] == stem]
        for src, dst in ((root / "images", vi), (root / "masks", vm)):
            for f in src.glob(stem + ".*"):
                if zs:  # a stack split by slices: only its held-out slices
                    tifffile.imwrite(dst / (stem + ".tif"), tifffile.imread(f)[zs],
                                     metadata={"axes": "ZYX"})
                else:
                    shutil.copy(f, dst / f.name)
    return vi, vm


def data_root(base: Path, dataset: str, ds: dict, tmp: Path) -> Path:
    """The data set's folder; for data stored windowed to [0, 1], a copy in HU in ``tmp``
    (images float32, masks as they are)."""
    root = base / dataset
    if "stored_window" not in ds:
        return root
    low, high = ds["stored_window"]
    copy = tmp / dataset
    (copy / "images").mkdir(parents=True)
    shutil.copytree(root / "masks", copy / "masks")
    for f in sorted((root / "images").glob("*.tif")):
        hu = low + tifffile.imread(f).astype("float32") * (high - low)
        tifffile.imwrite(copy / "images" / f.name, hu.astype("float32"))
    return copy


def without_type(root: Path, kind: str, tmp: Path) -> Path:
    """A copy of the data set folder (links) without the images of one acquisition type."""
    from napari_medseg.engine.acquisition import acquisition_type

    copy = tmp / f"{root.name}_without_{kind.replace('&', '')}"
    for sub in ("images", "masks"):
        (copy / sub).mkdir(parents=True)
    kept = 0
    for f in sorted((root / "images").glob("*.tif")):
        image = tifffile.imread(f)
        if acquisition_type(image, "YXC"[: image.ndim] if image.ndim == 3 else "YX") == kind:
            continue
        for sub in ("images", "masks"):
            (copy / sub / f.name).symlink_to(root / sub / f.name)
        kept += 1
    print(f"without {kind}: {kept} images kept", flush=True)
    return copy


def _init_path(source: str) -> Path:
    """The checkpoint file of a tag (its card's weights) or of a path."""
    from napari_medseg.engine.cards import list_model_cards

    cards = {c.tag: c for c in list_model_cards()}
    if source in cards:
        path = cards[source].weights_path()
        if path is None:
            raise SystemExit(f"The weights of {source} are not installed.")
        # a copy: the shipped file is overwritten when the new weights have its tag
        copy = Path(tempfile.mkdtemp(prefix="init_")) / path.name
        shutil.copy(path, copy)
        shutil.copy(path.with_suffix(".json"), copy.with_suffix(".json"))
        return copy
    return Path(source)


def _renormalized(init: Path, normalization) -> Path:
    """A copy of the checkpoint ``init`` described with ``normalization``, so a warm start
    trains its weights on images normalised that way (training keeps a parent's own
    normalisation otherwise); the first steps adapt the weights to it."""
    from napari_medseg.engine.checkpoints import load_checkpoint, save_checkpoint

    model, info = load_checkpoint(init)
    out = Path(tempfile.mkdtemp(prefix="renormalized_")) / init.stem
    save_checkpoint(model, out, normalization=normalization, classes=info.classes,
                    training_data=info.training_data, settings=info.settings,
                    metrics=info.metrics, parent=info.parent, dtype="float32")
    return out.with_suffix(".safetensors")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network", required=True)
    p.add_argument("--variant", default="lite")
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--minutes", type=float, default=25.0)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--patch", type=int)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--tag")
    p.add_argument("--override", action="append", default=[], help="network config KEY=VALUE")
    p.add_argument("--work", default=None, help="folder for the training checkpoint")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 autocast")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--augment", action="append", default=[], metavar="KEY=VALUE",
                   help="augmentation setting, e.g. elastic=8 (see AugmentConfig)")
    p.add_argument("--input-downsample", type=int, default=1,
                   help="run the network on the image shrunk by this factor")
    p.add_argument("--task", choices=("classes", "instances"),
                   help="what the masks hold (default: the data set's, instances for nuclei)")
    p.add_argument("--boundary-width", type=int,
                   help="boundary band width of the instance task, in pixels (default: the "
                        "--init weights' own, else 1)")
    p.add_argument("--contact-weight", type=float, default=5.0,
                   help="instance task: loss weight where two objects touch")
    p.add_argument("--normalization", type=yaml.safe_load, metavar="YAML",
                   help="intensity normalisation instead of the data set's, e.g. "
                        "'{mode: percentile, per_channel: false}' (colour-preserving); a "
                        "warm start keeps its parent's")
    p.add_argument("--renormalize", action="store_true",
                   help="with --init and --normalization: train the starting weights on the "
                        "asked normalisation (a warm start keeps its parent's otherwise)")
    p.add_argument("--init", help="start from these weights (a tag or a checkpoint path); "
                   "a foreground network is widened to the instance task's three classes")
    p.add_argument("--exclude-type", choices=("fluorescence", "bright-field", "H&E"),
                   help="train a base that never sees this acquisition type (left out of "
                        "training and validation; the fine-tuning benchmark's bases)")
    p.add_argument("--object-diameter", type=float, metavar="PX",
                   help="instance task: train every image with its objects resized to this "
                        "median diameter (prediction resamples images to it)")
    p.add_argument("--oversample", action="append", default=[], metavar="TYPE=FACTOR",
                   help="draw the training planes of an acquisition type FACTOR times as often "
                        "(e.g. H&E=3)")
    p.add_argument("--out-dir", help="write the weights and card here instead of weights/ "
                   "and models/ (weights that are not shipped)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="instance task: tune the thresholds on flip-averaged (TTA) "
                        "probabilities and score with them; the weights then predict with "
                        "flip TTA by default (default: off for new weights, as before for "
                        "--retune)")
    p.add_argument("--retune", action="store_true",
                   help="do not train: tune the shipped weights' instance thresholds again on "
                        "their validation split, re-score them and rewrite their card (in "
                        "--out-dir when given)")
    return p.parse_args(argv)


def _retune(args: argparse.Namespace, ds: dict, root: Path, tag: str) -> int:
    """``--retune``: the shipped weights re-tuned, re-described with the data set's current
    normalisation and pixel size (:data:`DATASETS`) and re-scored; their card keeps the rest."""
    from napari_medseg.engine.checkpoints import load_checkpoint, save_checkpoint, with_tile
    from napari_medseg.engine.pixel_size import with_pixel_size
    from napari_medseg.config import NormalizationConfig
    from napari_medseg.engine.seg_task import task_of, with_task

    card_path = ROOT / "models" / f"{tag}.yaml"
    model, info = load_checkpoint(ROOT / "weights" / tag)
    weights_dir = Path(args.out_dir) if args.out_dir else ROOT / "weights"
    weights_dir.mkdir(parents=True, exist_ok=True)
    model = with_tile(with_pixel_size(model, ds.get("pixel_size")), ds.get("tile"))
    model.checkpoint_info = info = dataclasses.replace(
        info, normalization=NormalizationConfig.from_mapping(ds["normalization"]).to_dict())
    if task_of(model).instances and not task_of(model).object_diameter:
        # the object size of the training images (not validation); one the training run
        # recorded (it knows how often each image was drawn) is kept
        model = with_task(model, _trained_diameter(task_of(model), root, info.training_data))
    tta = task_of(model).tta if args.tta is None else args.tta
    model, metrics, tuning = _score(model, root, info.training_data.get("val_files", []),
                                    info.training_data.get("val_planes") or [], tta)
    task = task_of(model)
    shipped = save_checkpoint(
        model, weights_dir / tag, normalization=info.normalization, classes=info.classes,
        training_data=info.training_data, settings=info.settings, metrics=metrics,
        parent=info.parent, dtype="float16")
    card = yaml.safe_load(card_path.read_text())
    if task.instances:
        card["task"] = {"description": ds["target"], **task.to_dict()}
    card.update(sha256=shipped.sha256, metrics=metrics, normalization=shipped.normalization,
                size_mb=round((weights_dir / shipped.weights).stat().st_size / 2**20, 2))
    _keep_facts(card, ds)
    if tuning:
        card.setdefault("settings", {})["watershed_tuning"] = tuning
    out_card = (Path(args.out_dir) / card_path.name) if args.out_dir else card_path
    out_card.write_text(yaml.safe_dump(card, sort_keys=False))
    print(json.dumps({"tag": tag, "metrics": metrics}))
    return 0


def _trained_diameter(task, root: Path, training_data: dict):
    """``task`` recording the median object diameter of the training images (every pair of
    ``root`` not held out)."""
    from napari_medseg.engine.training.datasets import _stem, find_pairs, training_diameter

    pairs = find_pairs(root / "images", root / "masks")
    held_out = set(training_data.get("val_files") or [])
    trained = {_stem(img) for img, _ in pairs} - held_out
    return dataclasses.replace(task, object_diameter=training_diameter(pairs, trained))


def _keep_facts(card: dict, ds: dict) -> None:
    """The card states the data set's pixel size, stored window (what the weights take) and
    prediction tile."""
    if ds.get("tile"):
        card["tile"] = int(ds["tile"])
    if ds.get("pixel_size"):
        card.setdefault("intended_for", {})["pixel_size"] = dict(ds["pixel_size"])
    if ds.get("stored_window"):
        low, high = ds["stored_window"]
        card.setdefault("training_data", {})["stored_window"] = {
            "hu": [low, high], "how": "the source stored the patches windowed to [0, 1]; the "
            "window is estimated from their lung and soft-tissue modes "
            "(scripts/estimate_ct_window.py) and the patches read back in HU for training "
            "and scoring"}


def _config(args: argparse.Namespace, ds: dict):
    """The training settings of a run."""
    from napari_medseg.config import TrainConfig

    overrides = {}
    for item in args.override:
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    return TrainConfig.from_mapping({
        "network": args.network, "variant": args.variant, "in_channels": ds["in_channels"],
        "num_classes": 2, "patch": args.patch or ds["patch"], "batch_size": args.batch_size,
        "steps": args.steps, "lr": args.lr, "val_every": args.val_every,
        "max_minutes": args.minutes, "task": args.task or ds["task"],
        "boundary_width": args.boundary_width, "contact_weight": args.contact_weight,
        "object_diameter": args.object_diameter,
        "oversample": {k: float(v) for k, v in (o.split("=", 1) for o in args.oversample)},
        "normalization": args.normalization or ds["normalization"], "dataset": args.dataset,
        "patience": 0,
        "model_overrides": overrides, "resume": True, "precision": args.precision,
        "warmup_steps": args.warmup_steps, "input_downsample": args.input_downsample,
        **({"augment": {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args.augment)}}
           if args.augment else {}),
    })


def _train(root: Path, ckpt: Path, cfg, init: str | None, renormalize: bool = False):
    """Train, printing the steps; returns the train result."""
    from napari_medseg.engine.training.loop import StepEvent, ValidationEvent
    from napari_medseg.engine.training.train import train_iter

    parent = _init_path(init) if init else None
    if parent is not None and renormalize:
        parent = _renormalized(parent, cfg.normalization)
    result = None
    for event in train_iter(root / "images", root / "masks", ckpt, cfg, parent=parent):
        if isinstance(event, StepEvent) and event.step % 10 == 0:
            print(f"step {event.step}/{event.steps} loss {event.loss:.4f} lr {event.lr:.2e} "
                  f"{event.elapsed_s:.0f}s", flush=True)
        elif isinstance(event, ValidationEvent) or not isinstance(event, StepEvent):
            print(event.message, flush=True)
        result = getattr(event, "result", result)
    return result


#: How the instance weights that record an object size were tuned and scored.
OBJECT_SIZE_NOTE = ("each image resampled so its nuclei (measured by a first pass and, where "
                    "that calls for resampling, a second at its zoom) reach the recorded "
                    "object_diameter, as predict does by default")


def _score(model, root: Path, val_files: list[str], planes: list[str], tta: bool = False):
    """Tune the instance task's watershed (if any) and evaluate on the held-out images.

    With ``tta`` the thresholds are tuned on flip-averaged probabilities and the task says so
    (prediction then flip-averages by default).

    Returns:
        ``(model with the tuned task, metrics for the card, tuning summary or None)``.
    """
    from napari_medseg.config import PredictConfig
    from napari_medseg.engine.seg_task import task_of, with_task
    from napari_medseg.engine.training.datasets import find_pairs
    from napari_medseg.engine.training.evaluate import evaluate, format_table
    from napari_medseg.engine.training.instance_tuning import (held_out_probabilities,
                                                               tune_watershed)

    task, tuning = task_of(model), None
    with tempfile.TemporaryDirectory() as tmp:
        vi, vm = held_out_folders(root, val_files, planes, Path(tmp))
        if task.instances:  # thresholds and smallest seed from the validation split
            probs = held_out_probabilities(model, find_pairs(vi, vm), PredictConfig(tta=tta))
            task, table = tune_watershed(model, probs)
            task = dataclasses.replace(task, tta=tta)
            model = with_task(model, task)
            tuning = {"grid": "foreground_threshold by Dice, then seed_threshold x min_seed, "
                              "object_threshold and min_object_fraction in turn by AP@0.5, "
                              "on the validation split" + (
                                  " (flip-averaged probabilities)" if tta else ""),
                      "best": max(r["ap_iou50"] for r in table)}
            if task.object_diameter:
                tuning["object_size"] = OBJECT_SIZE_NOTE
            print(json.dumps({"tuned": task.to_dict(), **tuning}), flush=True)
        scores = evaluate(model, vi, vm, PredictConfig(), instances=task.instances)
    print(format_table(scores))
    metrics = {k: (round(v, 4) if v == v else None) for k, v in scores.mean.items()}
    if getattr(scores, "by_type", None) and task.instances:  # microscopy types: nuclei only
        metrics["by_type"] = {t: {k: (round(v, 4) if isinstance(v, float) else v)
                                  for k, v in row.items()} for t, row in scores.by_type.items()}
    metrics["split"] = "validation"
    metrics["n_images"] = len(planes) or len(scores.rows)  # slices of a stack count one by one
    if root.name == "ph2_dermoscopy":
        metrics["proxy"] = _proxy(model, root, val_files)
    return model, metrics, tuning


def _proxy(model, root: Path, val_files: list[str]) -> dict:
    """Dice on the out-of-device proxy of the held-out photographs (dermoscopy_proxy.py)."""
    import csv

    import dermoscopy_proxy

    with open(root / "labels.csv", newline="") as fh:
        diagnosis = {row["name"]: row["clinical_diagnosis"] for row in csv.DictReader(fh)}
    with tempfile.TemporaryDirectory() as tmp:
        folders = dermoscopy_proxy.build_proxy(root, val_files, Path(tmp))
        result = dermoscopy_proxy.score(model, folders, diagnosis)
    print(json.dumps({"proxy": result}), flush=True)
    return {"what": "the held-out photographs as three other dermoscopes give them "
                    "(scripts/dermoscopy_proxy.py, seed 0)",
            "dice": result["dice"]["proxy"],
            "by_device": {k: v for k, v in result["dice"].items() if k not in ("ph2", "proxy")},
            "gap_to_ph2": result["gap_ph2_minus_proxy"],
            "by_diagnosis": result["by_diagnosis"]}


def _card(args, ds: dict, cfg, info, task, classes, shipped, tuning, wall: float,
          result) -> dict:
    """The model card of shipped weights."""
    weights_dir = Path(args.out_dir) if args.out_dir else ROOT / "weights"
    planes = info.training_data.get("val_planes") or []
    return {
        "tag": args.tag, "network": info.network, "variant": info.variant,
        "dataset": args.dataset,
        "task": {"description": ds["target"], **task.to_dict()} if task.instances
        else ds["target"],
        "in_channels": info.in_channels, "num_classes": info.num_classes,
        "classes": list(classes), "weights": shipped.weights, "sha256": shipped.sha256,
        "size_mb": round((weights_dir / shipped.weights).stat().st_size / 2**20, 2),
        "config": info.config, "normalization": info.normalization,
        "input_downsample": shipped.input_downsample,
        "training_data": {
            "dataset": args.dataset, "split": info.training_data.get("split"),
            "train_files": len(info.training_data.get("train_files", [])),
            "val_files": info.training_data.get("val_files", []),
            **({"val_planes": planes} if planes else {}),
            "data_hash": info.training_data.get("data_hash"), "licence": ds["licence"],
        },
        "settings": {
            "steps": info.settings.get("steps_done"), "batch_size": cfg.batch_size,
            "patch": cfg.patch, "optimizer": "AdamW, linear warm-up, cosine decay",
            **({"augment": cfg.augment.to_dict()} if args.augment else {}),
            "lr": cfg.lr, "precision": info.settings.get("precision"),
            **({"task": cfg.task, "boundary_width": (info.task or {}).get("boundary_width"),
                "contact_weight": cfg.contact_weight} if cfg.task == "instances" else {}),
            **({"object_diameter": f"every image trained with its objects resized to "
                                   f"{cfg.object_diameter:g} px"}
               if cfg.object_diameter else {}),
            **({"oversample": dict(cfg.oversample)} if cfg.oversample else {}),
            "device": f"{info.settings.get('device')} "
                      f"({platform.processor() or platform.machine()})",
            "wall_time_min": round(wall / 60, 1),
            "stopped": getattr(result, "stopped", None),
            **({"init": f"{args.init} (sha256 {getattr(args, 'init_sha', None) or info.parent})"
                        + (", its weights trained on the normalisation above (--renormalize)"
                           if args.renormalize else "")} if args.init else {}),
            **({"watershed_tuning": tuning} if tuning else {}),
        },
        "metrics": shipped.metrics,
    }


def main(argv: list[str] | None = None) -> int:
    from napari_medseg.engine.checkpoints import load_checkpoint, save_checkpoint, with_tile
    from napari_medseg.engine.pixel_size import with_pixel_size
    from napari_medseg.engine.seg_task import INSTANCE_CLASS_NAMES, task_of

    args = _parse(argv)
    ds = DATASETS[args.dataset]
    root = data_root(Path(args.data_root), args.dataset, ds, Path(tempfile.mkdtemp()))
    tag = args.tag or f"{args.network}_{args.variant}_{args.dataset.split('_')[0]}"
    if args.exclude_type:
        root = without_type(root, args.exclude_type, Path(tempfile.mkdtemp()))
        tag = args.tag or f"{tag}_no_{args.exclude_type.replace('&', '').lower()}"
    if args.retune:
        return _retune(args, ds, root, tag)
    cfg = _config(args, ds)
    work = Path(args.work or tempfile.mkdtemp(prefix=f"train_{tag}_"))
    t0 = time.perf_counter()
    if args.renormalize:
        if not (args.init and args.normalization):
            raise SystemExit("--renormalize needs --init and --normalization.")
        from napari_medseg.engine.checkpoints import read_checkpoint_info

        # the lineage names the starting weights, not their re-described copy
        args.init_sha = read_checkpoint_info(_init_path(args.init)).sha256
    result = _train(root, work / tag, cfg, args.init, args.renormalize)
    wall = time.perf_counter() - t0

    model, info = load_checkpoint(work / tag)
    model = with_tile(with_pixel_size(model, ds.get("pixel_size")), ds.get("tile"))
    model, metrics, tuning = _score(model, root, info.training_data.get("val_files", []),
                                    info.training_data.get("val_planes") or [], bool(args.tta))
    task = task_of(model)
    weights_dir = models_dir = Path(args.out_dir) if args.out_dir else None
    if weights_dir is None:
        weights_dir, models_dir = ROOT / "weights", ROOT / "models"
    weights_dir.mkdir(parents=True, exist_ok=True)
    classes = INSTANCE_CLASS_NAMES if task.instances else ("background", "foreground")
    shipped = save_checkpoint(
        model, weights_dir / tag, normalization=info.normalization, classes=classes,
        training_data=info.training_data, settings=info.settings, metrics=metrics,
        dtype="float16")
    card = _card(args, ds, cfg, info, task, classes, shipped, tuning, wall, result)
    card["tag"] = tag
    out_card = models_dir / f"{tag}.yaml"
    # what a person wrote about the weights stays (from the shipped card when writing elsewhere)
    written = next((c for c in (out_card, ROOT / "models" / f"{tag}.yaml") if c.is_file()), None)
    if written is not None:
        for key in ("intended_for",):
            kept = (yaml.safe_load(written.read_text()) or {}).get(key)
            if kept is not None:
                card[key] = kept
    _keep_facts(card, ds)
    models_dir.mkdir(exist_ok=True)
    out_card.write_text(yaml.safe_dump(card, sort_keys=False))
    print(json.dumps({"tag": tag, "metrics": metrics, "wall_min": round(wall / 60, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
