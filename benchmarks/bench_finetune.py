"""Leave-one-acquisition-type-out proof of fine-tuning: does the default fine-tune on a few
corrected images raise the scores on images of a type the base never saw, and leave a base
alone on a type it knows?

Every case takes a base and a pool of images of one type. ``--n-train`` of them (drawn with
``numpy.random.default_rng(--seed)``) are the user's corrections: a fresh copy of the base is
fine-tuned on them as ``napari-medseg finetune`` does (whole images,
:func:`~napari_medseg.engine.training.corrections.samples_from_folders`, a first round: no
replay), with the default :class:`~napari_medseg.config.FinetuneConfig` changed only by
``--set``. The base and the fine-tuned model are scored on the other images of the pool (at
most ``--max-eval``) with :func:`~napari_medseg.engine.training.evaluate.evaluate`:

- ``nuclei_no_he``: ``--base-no-he``, a nuclei base trained without H&E images; the pool is
  every DSB2018 image (``<data-root>/dsb2018_nuclei``) whose
  :func:`~napari_medseg.engine.acquisition.acquisition_type` is H&E. Dice and AP@0.5.
- ``nuclei_no_bf``: the same with ``--base-no-bf`` and bright-field images.
- ``dermoscopy_proxy``: ``--base-dermoscopy`` (default ``sa2net_lite_ph2``); the pool is the
  base's held-out PH2 photographs as the ``--device-proxy`` camera (default ``clinic``) of
  ``scripts/dermoscopy_proxy.py`` renders them (built in a temporary folder, seed 0). Dice.
- ``nuclei_known``: ``--base-known`` (default ``sa2net_lite_dsb2018``); the pool is the
  base's held-out fluorescence images, a type it trained on: fine-tuning must not harm it.

A base is a shipped tag or a checkpoint path. A case without its base, or with fewer than
``--n-train`` + 1 images of its type, is reported as ``{"skipped": why}``. Prints one JSON
object (also written to ``--out``, rewritten after every case): ``recipe`` (the ``--set``
overrides), ``config`` (the whole FinetuneConfig), ``n_train``, ``seed``, ``machine``, and per
case the images trained on, ``scored``, ``before``/``after``/``gain`` (mean Dice, and
``ap_iou50`` for nuclei), the fine-tune's ``minutes`` (the optimisation alone), ``steps_done``
and ``stopped`` (``finished`` or ``early_stop``: the default keeps one image in four for a
validation Dice and stops when it stops rising). Re-run with::

    .venv/bin/python benchmarks/bench_finetune.py --data-root ../shared/data \\
        --cases nuclei_no_he,nuclei_no_bf,dermoscopy_proxy,nuclei_known \\
        --base-no-he NO_HE.safetensors --base-no-bf NO_BF.safetensors --out FILE.json

``--gui`` instead measures the longest event-loop stall of napari while the Fine-tune widget
trains (needs a display; ``xvfb-run -a`` gives a virtual one).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = ["CASES", "main", "measure_gui_stall", "run_cases"]

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = ROOT.parent / "shared" / "data"
CASES = ("nuclei_no_he", "nuclei_no_bf", "dermoscopy_proxy", "nuclei_known")


class _Skip(Exception):
    """A case that cannot run; the message says why (one sentence)."""


@dataclass
class _Case:
    """A base and the pool of images of one type to fine-tune on and score."""

    base: str
    model: Any
    info: Any
    kind: str
    data: Path  # holds images/ and masks/, <stem>.tif
    pool: list[str]
    instances: bool
    notes: dict = field(default_factory=dict)


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def _proxy_module():
    """``scripts/dermoscopy_proxy.py`` as a module."""
    path = ROOT / "scripts" / "dermoscopy_proxy.py"
    spec = importlib.util.spec_from_file_location("dermoscopy_proxy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recipe(items: list[str]) -> dict:
    """The ``--set KEY=VALUE`` overrides (values read as YAML)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set wants KEY=VALUE, not {item!r}.")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _config(recipe: dict, device: str):
    """The default FinetuneConfig with ``recipe`` applied (a nested ``augment`` mapping
    refines fine-tuning's own augmentation defaults)."""
    from napari_medseg.config import FinetuneConfig

    return FinetuneConfig.from_mapping({"device": device, **recipe})


def _machine(device: str) -> dict:
    import torch

    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or None,
            "device": device, "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _folder(tmp: Path, name: str, data: Path, stems: list[str]) -> tuple[Path, Path]:
    """Symlinked image/mask folders holding ``stems`` (links to absolute paths)."""
    data = data.resolve()
    images, masks = tmp / name / "images", tmp / name / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for stem in stems:
        os.symlink(data / "images" / f"{stem}.tif", images / f"{stem}.tif")
        os.symlink(data / "masks" / f"{stem}.tif", masks / f"{stem}.tif")
    return images, masks


@functools.lru_cache(maxsize=None)
def _types(data: Path) -> dict[str, str | None]:
    """Image stem -> acquisition type, for the images of ``data`` that have a mask."""
    from napari_medseg.engine.acquisition import acquisition_type
    from napari_medseg.io import read_image

    out = {}
    for path in sorted((data / "images").glob("*.tif")):
        if (data / "masks" / path.name).is_file():
            image, meta = read_image(path)
            out[path.stem] = acquisition_type(np.asarray(image), meta.axes)
    return out


def _base(source: str | None, option: str) -> tuple[Any, Any]:
    """``resolve_weights(source)``; a missing base skips the case."""
    from napari_medseg.engine.checkpoints import checkpoint_paths, resolve_weights
    from napari_medseg.errors import MedsegError

    if not source:
        raise _Skip(f"No base was given ({option}).")
    files = (Path(source), *checkpoint_paths(source))
    if os.sep in str(source) and not any(f.is_file() for f in files):
        raise _Skip(f"The base file {source} does not exist.")
    try:
        return resolve_weights(source)
    except MedsegError as exc:
        raise _Skip(f"The base {source} cannot be loaded: {exc}") from None


def _held_out(info: Any, source: str) -> list[str]:
    stems = list(info.training_data.get("val_files") or [])
    if not stems:
        raise _Skip(f"The base {source} records no held-out images (training_data.val_files).")
    return stems


def _dsb(args: argparse.Namespace) -> Path:
    data = Path(args.data_root) / "dsb2018_nuclei"
    if not (data / "images").is_dir():
        raise _Skip(f"There are no DSB2018 images in {data}.")
    return data


def _plan(name: str, args: argparse.Namespace, tmp: Path) -> _Case:
    """The base and the image pool of case ``name``."""
    if name in ("nuclei_no_he", "nuclei_no_bf"):
        kind, option = {"nuclei_no_he": ("H&E", "--base-no-he"),
                        "nuclei_no_bf": ("bright-field", "--base-no-bf")}[name]
        source = getattr(args, option[2:].replace("-", "_"))
        model, info = _base(source, option)
        data = _dsb(args)
        pool = [s for s, t in _types(data).items() if t == kind]
        return _Case(str(source), model, info, kind, data, pool, instances=True)
    if name == "nuclei_known":
        model, info = _base(args.base_known, "--base-known")
        data = _dsb(args)
        types = _types(data)
        pool = sorted(s for s in _held_out(info, args.base_known)
                      if types.get(s) == "fluorescence")
        return _Case(str(args.base_known), model, info, "fluorescence", data, pool,
                     instances=True, notes={"pool": "the base's held-out images of the type"})
    model, info = _base(args.base_dermoscopy, "--base-dermoscopy")
    ph2 = Path(args.data_root) / "ph2_dermoscopy"
    held = [s for s in _held_out(info, args.base_dermoscopy)
            if (ph2 / "images" / f"{s}.tif").is_file()]
    if not held:
        raise _Skip(f"None of the base's held-out photographs is in {ph2}.")
    folders = _proxy_module().build_proxy(ph2, held, tmp / "proxy", seed=0)
    data = folders[args.device_proxy]
    pool = sorted(p.stem for p in (data / "images").glob("*.tif"))
    return _Case(str(args.base_dermoscopy), model, info,
                 f"{args.device_proxy} (dermoscopy proxy)", data, pool, instances=False,
                 notes={"pool": "the base's held-out PH2 photographs, as the proxy device"})


def _score(model: Any, folders: tuple[Path, Path], case: _Case, device: str) -> tuple[dict, int]:
    """Mean Dice (and AP@0.5 for instances) over a folder; and how many images were scored."""
    from napari_medseg.config import PredictConfig
    from napari_medseg.engine.training.evaluate import evaluate

    result = evaluate(model, *folders, PredictConfig.from_mapping({"device": device}),
                      instances=case.instances)
    keys = ("dice", "ap_iou50") if case.instances else ("dice",)
    return {k: _round(result.mean.get(k)) for k in keys}, len(result.rows) - result.failed


def _finetune(case: _Case, folders: tuple[Path, Path], config: Any) -> tuple[Any, float]:
    """Fine-tune a copy of the base on whole images, as ``napari-medseg finetune`` does;
    returns the result and the minutes of the fine-tune itself."""
    from napari_medseg.engine.seg_task import task_of
    from napari_medseg.engine.training.corrections import samples_from_folders
    from napari_medseg.engine.training.finetune import finetune

    spec = case.model.spec
    samples, _ = samples_from_folders(
        *folders, num_classes=spec.num_classes, in_channels=spec.in_channels,
        normalization=case.info.normalization_config(), config=config,
        output_scale=spec.output_scale, task=task_of(case.model), model=case.model)
    t0 = time.perf_counter()
    result = finetune(case.model, samples, config)
    return result, (time.perf_counter() - t0) / 60


def _run_case(name: str, case: _Case, args: argparse.Namespace, config: Any,
              tmp: Path) -> dict:
    """Pick the images, score the base, fine-tune, score again."""
    need = args.n_train + 1
    if len(case.pool) < need:
        raise _Skip(f"Only {len(case.pool)} {case.kind} image(s) with masks were found; the "
                    f"case needs {need} ({args.n_train} to fine-tune, at least one to score).")
    rng = np.random.default_rng(args.seed)
    train = sorted(rng.choice(case.pool, size=args.n_train, replace=False).tolist())
    rest = [s for s in case.pool if s not in train][: args.max_eval]
    scored_on = _folder(tmp, f"{name}-eval", case.data, rest)
    before, scored = _score(case.model, scored_on, case, args.device)
    result, minutes = _finetune(case, _folder(tmp, f"{name}-train", case.data, train), config)
    after, _ = _score(result.model, scored_on, case, args.device)
    gain = {k: None if before[k] is None or after[k] is None else round(after[k] - before[k], 4)
            for k in before}
    return {"base": case.base, "type": case.kind, "trained_on": train, "scored": scored,
            "before": before, "after": after, "gain": gain, "minutes": round(minutes, 3),
            "steps_done": result.steps_done, "stopped": result.stopped,
            "best_step": result.best_step, "val_images": result.n_val,
            "val_dice_before": _round(result.baseline_dice),
            "val_dice_after": _round(result.best_dice), **case.notes}


def run_cases(args: argparse.Namespace) -> dict:
    """The benchmark (see the module docstring); returns the JSON-friendly report."""
    recipe = _recipe(args.set)
    config = _config(recipe, args.device)
    report = {"recipe": recipe, "config": config.to_dict(), "n_train": args.n_train,
              "seed": args.seed, "machine": _machine(args.device), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.cases:
            try:
                case = _plan(name, args, tmp)
                report["cases"][name] = _run_case(name, case, args, config, tmp)
            except _Skip as exc:
                report["cases"][name] = {"skipped": str(exc)}
            print(json.dumps({name: report["cases"][name]}), file=sys.stderr, flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _gui_weights(weights: str | None) -> str:
    """The weights the ``--gui`` run starts from: ``--weights``, else the shipped DSB2018
    weights the demo uses."""
    if weights:
        return weights
    from napari_medseg.engine.checkpoints import default_weights

    tag = default_weights("dsb2018_nuclei")
    if tag is None:
        raise SystemExit("No shipped weights trained on dsb2018_nuclei; pass --weights PATH.")
    return tag


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
    source = _gui_weights(args.weights)
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



def _cases(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(CASES)}")
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--data-root", default=str(DATA_ROOT),
                   help="folder holding dsb2018_nuclei/ and ph2_dermoscopy/ (default "
                        "../shared/data)")
    p.add_argument("--cases", type=_cases, default=list(CASES), metavar="CASE[,CASE...]",
                   help=f"comma-separated, of {', '.join(CASES)} (default all)")
    p.add_argument("--base-no-he", metavar="TAG|PATH", help="nuclei base trained without H&E")
    p.add_argument("--base-no-bf", metavar="TAG|PATH",
                   help="nuclei base trained without bright-field")
    p.add_argument("--base-dermoscopy", metavar="TAG|PATH", default="sa2net_lite_ph2",
                   help="dermoscopy base (default %(default)s)")
    p.add_argument("--device-proxy", default="clinic",
                   choices=("ph2", *_proxy_module().DEVICES),
                   help="the dermoscopy proxy's camera (scripts/dermoscopy_proxy.py; default "
                        "%(default)s)")
    p.add_argument("--base-known", metavar="TAG|PATH", default="sa2net_lite_dsb2018",
                   help="nuclei base for the type it knows (default %(default)s)")
    p.add_argument("--n-train", type=int, default=5,
                   help="images to fine-tune on (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a FinetuneConfig setting (YAML value), e.g. --set lr=1e-3 or "
                        "--set 'augment={colour: 0.1}' (repeatable)")
    p.add_argument("--seed", type=int, default=0,
                   help="draw of the fine-tuning images (default %(default)s)")
    p.add_argument("--max-eval", type=int, help="images scored per case at most (default all)")
    p.add_argument("--device", default="cpu",
                   help="fine-tuning and inference device (default %(default)s)")
    p.add_argument("--out", help="also write the JSON here")
    gui = p.add_argument_group("--gui (napari's event-loop stalls while the widget trains)")
    gui.add_argument("--gui", action="store_true",
                     help="measure napari's event-loop stalls while the Fine-tune widget trains")
    gui.add_argument("--weights", help="base weights (tag or checkpoint path); default: the "
                                       "shipped DSB2018 nuclei weights")
    gui.add_argument("--data", help="image/mask folders (default: <data-root>/dsb2018_nuclei)")
    gui.add_argument("--steps", type=int, help="fine-tuning steps of the widget (default 40)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; prints the JSON report."""
    from napari_medseg.errors import ConfigError

    p = _parser()
    args = p.parse_args(argv)
    if args.n_train < 1:
        p.error("--n-train must be at least 1")
    if args.gui:
        args.data = args.data or str(Path(args.data_root) / "dsb2018_nuclei")
        report = measure_gui_stall(args)
    else:
        try:
            report = run_cases(args)
        except ConfigError as exc:
            p.error(str(exc))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
