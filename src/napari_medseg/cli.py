"""The ``napari-medseg`` command line: ``info``, ``models``, ``predict`` and friends.

Heavy modules (torch, the engine) are imported inside the command that needs them, so
``napari-medseg --help`` stays fast. Project errors are printed as one sentence, exit 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ._version import __version__
from .errors import MedsegError

__all__ = ["main", "build_parser"]

Command = Callable[[argparse.Namespace], int]


def _cmd_info(args: argparse.Namespace) -> int:
    from importlib import metadata

    from . import resources

    info: dict = {"napari-medseg": __version__, "python": platform.python_version()}
    for dist in ("torch", "timm", "napari", "numpy", "zarr", "tifffile", "nibabel", "pydicom"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    from .engine.device import list_devices  # imports torch when called

    info["devices"] = list_devices()
    info["weights_dirs"] = [str(p) for p in resources.weights_dirs()]
    info["model_card_dirs"] = [str(p) for p in resources.model_card_dirs()]
    info["user_data_dir"] = str(resources.user_data_dir())
    info["env"] = {resources.ENV_WEIGHTS: __import__("os").environ.get(resources.ENV_WEIGHTS)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "devices":
            print(f"{'devices':<{width}}")
            for dev in value:
                mem = dev.get("total_memory_mb")
                free = dev.get("free_memory_mb")
                extra = f"  {free} MB free of {mem} MB" if mem else ""
                print(f"  {dev['name']:<10} {dev['description']}{extra}")
        elif isinstance(value, list):
            print(f"{key:<{width}}  " + (", ".join(value) if value else "(none found)"))
        else:
            print(f"{key:<{width}}  {value}")
    return 0


def _config(config_cls, args: argparse.Namespace, section: str | None, flags: dict):
    """``config_cls`` from the ``[section]`` table of ``--config`` (when given), with every
    flag that is not None set over it."""
    from .config import load_toml

    config_file = getattr(args, "config", None)
    settings: dict = load_toml(config_file, section=section) if section and config_file else {}
    settings.update({k: v for k, v in flags.items() if v is not None})
    return config_cls.from_mapping(settings)


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import get_entry, list_models, list_variants

    networks = [
        {"network": n, "variants": list_variants(n), "summary": get_entry(n).summary}
        for n in list_models()
    ]
    from .engine.checkpoints import list_shipped_weights

    weights = list_shipped_weights()
    if args.json:
        print(json.dumps({"networks": networks, "weights": weights}, indent=2))
        return 0
    print("Networks (create_model name, variants):")
    for net in networks:
        print(f"  {net['network']:<11} {','.join(net['variants']):<16} {net['summary']}")
    print("Shipped weights:" if weights else "Shipped weights: none installed yet.")
    for w in weights:
        print(f"  {w['tag']:<28} {w['network']}/{w['variant']} on {w['dataset']}")
    return 0


# --- predict ------------------------------------------------------------------------------

_FORMAT_SUFFIX = {"tif": ".tif", "nii": ".nii.gz", "zarr": ".zarr"}


def _stem(path: Path) -> str:
    """The file name without its image suffix (``a.ome.tif`` -> ``a``)."""
    from .io import supported_suffixes

    name = path.name
    for suffix in sorted(supported_suffixes(), key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _collect_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Image paths from files and folders, plus notices about skipped entries."""
    from .errors import ImageReadError
    from .io import is_supported

    found: list[Path] = []
    skipped: list[str] = []
    for text in inputs:
        path = Path(text)
        if not path.exists():
            raise ImageReadError(f"The input {path} does not exist.")
        if path.is_dir() and not is_supported(path):
            children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
            for child in children:
                if is_supported(child):
                    found.append(child)
                else:
                    skipped.append(f"skipping {child.name}: not an image napari-medseg reads")
        else:
            found.append(path)
    if not found:
        raise ImageReadError(f"No images found in {', '.join(inputs)}.")
    return found, skipped


def _output_paths(
    inputs: list[Path], out: Path, fmt: str, outputs: Sequence[str]
) -> list[dict[str, Path]]:
    """Per input: output name -> path (``mask`` at ``<stem>.<ext>``, others suffixed)."""
    from .io import supported_suffixes

    ext = _FORMAT_SUFFIX[fmt]
    single_file = len(inputs) == 1 and any(
        out.name.lower().endswith(s) for s in supported_suffixes(write=True))
    plans = []
    for path in inputs:
        if single_file:
            folder, stem = out.parent, _stem(out)
            ext_here = out.name[len(stem):]
        else:
            folder, stem, ext_here = out, _stem(path), ext
        names = {"mask": folder / f"{stem}{ext_here}"}
        for name in outputs:
            if name != "mask":
                names[name] = folder / f"{stem}_{name}{ext_here}"
        plans.append(names)
    stems = [p["mask"] for p in plans]
    if len(set(stems)) != len(stems):
        from .errors import ConfigError

        raise ConfigError("Two inputs have the same name stem; their outputs would overwrite "
                          "each other, so predict them into separate folders.")
    return plans


def _scaled_meta(meta, plane_axes: str, scale: int):
    """The reader's metadata for an output ``scale`` times finer in the in-plane axes."""
    import numpy as np

    if scale == 1:
        return meta
    spatial = meta.spatial_axes
    spacing = tuple(s / scale if a in plane_axes else s for a, s in zip(spatial, meta.spacing))
    # The first output voxel's centre lies a quarter voxel (for x2) before the input's.
    origin = tuple(o - (s - s / scale) / 2 if a in plane_axes else o
                   for a, o, s in zip(spatial, meta.origin, meta.spacing))
    affine = None
    if meta.affine is not None:
        m = np.eye(4)
        for i, a in enumerate("XYZ"):
            if a in plane_axes:
                m[i, i] = 1.0 / scale
                m[i, 3] = -(scale - 1) / (2.0 * scale)
        affine = np.asarray(meta.affine) @ m
    return meta.replace(spacing=spacing, origin=origin, affine=affine)


def _write_result(result, paths: dict[str, Path], meta, fmt: str) -> list[Path]:
    """Write each in-memory output of ``result`` next to the mask."""
    import numpy as np

    from .io import ImageMeta, write_image, write_labels

    written = []
    label_meta = meta.without_channels() if meta is not None else None
    out_meta = _scaled_meta(label_meta, result.plan.plane_axes, result.scale) \
        if label_meta is not None else None
    for name, array in result.outputs.items():
        path = paths[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        data = np.asarray(array)
        if name in ("mask", "boundary", "instances"):
            written.append(write_labels(path, data, out_meta))
            continue
        axes = result.axes[name]
        if data.dtype == np.float16:
            data = data.astype(np.float32)  # neither OME-TIFF nor NIfTI holds half floats
        img_meta = ImageMeta(axes=axes) if out_meta is None else out_meta.replace(
            axes=axes,
            spacing=out_meta.spacing, origin=out_meta.origin, units=out_meta.units)
        written.append(write_image(path, data, img_meta))
    return written


def _build_model(args: argparse.Namespace, first_channels: int, err) -> tuple[object, str]:
    """The network: from --weights, or randomly initialised from --model (loudly)."""
    from .errors import ConfigError

    if args.weights:
        from .engine.checkpoints import resolve_weights

        model, info = resolve_weights(args.weights)
        if args.model and args.model != info.network:
            raise ConfigError(f"The weights {args.weights!r} are for network {info.network!r}, "
                              f"not {args.model!r}; drop --model or pick matching weights.")
        if args.variant and args.variant != info.variant:
            raise ConfigError(f"The weights {args.weights!r} are for variant {info.variant!r}, "
                              f"not {args.variant!r}.")
        return model, f"{info.network}/{info.variant} with weights {info.tag or args.weights}"
    if not args.model:
        raise ConfigError("Give --model NAME (see `napari-medseg models`) or --weights TAG|PATH.")
    from .models import create_model

    variant = args.variant or "lite"
    in_channels = first_channels if first_channels in (1, 3) else 1
    model = create_model(args.model, variant=variant, in_channels=in_channels,
                         num_classes=args.classes)
    print(f"WARNING: no --weights given: {args.model!r} ({variant}) is RANDOMLY INITIALISED; "
          "its output is meaningless. Pass --weights TAG (see `napari-medseg models`) or a "
          "checkpoint path.", file=err)
    return model, f"{args.model}/{variant} (random weights)"


def _predict_config(args: argparse.Namespace):
    from .config import PredictConfig

    return _config(PredictConfig, args, "predict", {
        "tile": args.tile, "overlap": args.overlap, "blend": args.blend,
        "balance": False if args.exact_tiles else None, "device": args.device,
        "batch_size": args.batch_size, "axis": args.axis,
        "precision": args.precision, "outputs": args.outputs, "channels": args.channels,
        "normalization": args.normalization, "probabilities_dtype": args.probabilities_dtype,
        "tta": True if args.tta else None,
        "volume_mode": "orthogonal" if args.orthogonal else None,
    })


def _cmd_predict(args: argparse.Namespace) -> int:
    from .engine.inference.pipeline import plan_prediction, predict_iter
    from .engine.progress import (
        CancelToken,
        FinishedEvent,
        NoticeEvent,
        PlaneEvent,
        PlanEvent,
        TilesEvent,
    )
    from .errors import MedsegError
    from .io import read_image

    err = sys.stderr
    quiet = args.quiet
    config = _predict_config(args)
    inputs, skipped = _collect_inputs(args.inputs)
    for line in skipped:
        print(f"napari-medseg: notice: {line}", file=err)
    out = Path(args.output)
    plans = _output_paths(inputs, out, args.format, config.outputs)
    model = None
    failures = 0
    token = CancelToken()

    def stopping() -> None:  # first Ctrl-C: stop after the batch; second: abort
        print("\nnapari-medseg: stopping after the current batch (Ctrl-C again to abort)",
              file=err)

    with _ctrl_c_cancels(token, stopping):
        for path, paths in zip(inputs, plans):
            try:
                image, meta = read_image(path)
            except MedsegError as exc:
                if len(inputs) == 1:
                    raise
                failures += 1
                print(f"napari-medseg: error: {path.name}: {exc}", file=err)
                continue
            if model is None:  # an error here (unknown network, weights) stops the run
                channels = image.shape[meta.axes.index("C")] if "C" in meta.axes else 1
                model, described = _build_model(args, channels, err)
                if not quiet:
                    print(f"napari-medseg: model {described}", file=err)
            try:
                cfg = config
                if args.format == "zarr":
                    cfg = config.replace(store=str(paths["mask"]), overwrite=args.overwrite)
                if args.plan_only:
                    plan = plan_prediction(image, model, cfg, meta=meta)
                    print(f"{path.name}:\n{plan.describe()}")
                    continue
                result = None
                bar = None
                for event in predict_iter(image, model, cfg, meta=meta, cancel=token):
                    if isinstance(event, PlanEvent) and not quiet:
                        if not event.probed:
                            print(f"napari-medseg: {path.name}: plan\n  "
                                  + event.plan.describe().replace("\n", "\n  "), file=err)
                        elif event.plan.seconds is not None:
                            print(f"  estimated time {_seconds(event.plan.seconds)} "
                                  "(one-batch probe)", file=err)
                    elif isinstance(event, NoticeEvent):
                        print(_notice_line(event), file=err)
                    elif isinstance(event, TilesEvent) and not quiet:
                        if bar is None:
                            from tqdm import tqdm

                            bar = tqdm(total=event.total, unit="tile", file=err,
                                       desc=path.name[:24], leave=False, dynamic_ncols=True)
                        bar.total = max(bar.total, event.total)
                        bar.update(event.done - bar.n)
                    elif isinstance(event, PlaneEvent) and bar is not None:
                        bar.set_postfix_str(f"slice {event.plane + 1}/{event.planes}")
                    elif isinstance(event, FinishedEvent):
                        result = event.result
                if bar is not None:
                    bar.close()
                assert result is not None
                if result.cancelled:
                    kept = (f"the finished slices are kept in {paths['mask']}"
                            if args.format == "zarr" else "nothing was written")
                    print(f"napari-medseg: {path.name}: cancelled; {kept}.", file=err)
                    return 130
                if args.format == "zarr":
                    written = [paths["mask"]]
                else:
                    written = _write_result(result, paths, meta, args.format)
                if not quiet:
                    extra = ""
                    if result.stats.get("z_consistency") is not None:
                        extra += f", z-consistency {result.stats['z_consistency']:.3f}"
                    if result.stats.get("plane_agreement") is not None:
                        extra += f", plane agreement {result.stats['plane_agreement']:.3f}"
                    print(f"napari-medseg: {path.name} -> "
                          f"{', '.join(str(w) for w in written)} "
                          f"({result.stats['seconds']:.1f} s{extra})", file=err)
            except MedsegError as exc:
                if len(inputs) == 1:
                    raise
                failures += 1
                print(f"napari-medseg: error: {path.name}: {exc}", file=err)
    if failures:
        print(f"napari-medseg: {failures} of {len(inputs)} input(s) failed.", file=err)
        return 2
    return 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _notice_line(event) -> str:
    """A NoticeEvent as printed: a warning loudly, a notice as one."""
    tag = "WARNING" if event.level == "warning" else "napari-medseg: notice"
    return f"{tag}: {event.message}"


@contextmanager
def _ctrl_c_cancels(token, stopping: Callable[[], None]) -> Iterator[None]:
    """Inside: the first Ctrl-C cancels ``token`` and calls ``stopping()`` (to say so), a
    second raises KeyboardInterrupt. Only in the main thread; elsewhere nothing changes."""
    import signal

    def on_sigint(signum, frame):
        if token.cancelled:
            raise KeyboardInterrupt
        token.cancel()
        stopping()

    previous = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _seconds(s: float) -> str:
    from .engine.inference.plan import format_seconds

    return format_seconds(s)


def _add_predict(sub) -> argparse.ArgumentParser:
    from .config import BLEND_MODES, OUTPUT_NAMES, PRECISIONS

    p = sub.add_parser(
        "predict", help="segment images (files or folders) with a network",
        description="Segment images tile by tile. Several inputs or a folder go to the output "
                    "folder as <stem>.tif (mask) and <stem>_<output>.tif beside it.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output folder (or one file name for a single input)")
    p.add_argument("--model", help="network name (see `napari-medseg models`)")
    p.add_argument("--variant", help="network variant (tiny, lite, paper; default lite)")
    p.add_argument("--weights", metavar="TAG|PATH",
                   help="shipped weights tag or a checkpoint path; without it the network is "
                        "randomly initialised")
    p.add_argument("--classes", type=int, default=2,
                   help="classes of a randomly initialised network (default 2)")
    p.add_argument("--tile", help="tile side in pixels (default: the network's)")
    p.add_argument("--overlap", help="tile overlap fraction (default 0.125)")
    p.add_argument("--exact-tiles", action="store_true",
                   help="keep the tile side as given instead of shrinking it to cover the "
                        "image with the same number of tiles")
    p.add_argument("--blend", choices=BLEND_MODES, help="tile blending (default gaussian)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--batch-size", help="tiles per forward pass (default: automatic)")
    p.add_argument("--axis", help="axis a 2D network slices volumes along (Z, Y or X)")
    p.add_argument("--orthogonal", action="store_true",
                   help="average YX, ZX and ZY slicing (volumes, 3x the time)")
    p.add_argument("--tta", action="store_true",
                   help="flip test-time augmentation (4x the time in 2D)")
    p.add_argument("--precision", choices=PRECISIONS, help="compute precision (default auto)")
    p.add_argument("--outputs", help=f"comma-separated, from {','.join(OUTPUT_NAMES)} "
                                     "(default mask)")
    p.add_argument("--format", choices=tuple(_FORMAT_SUFFIX), default="tif",
                   help="output format (default tif; zarr streams and resumes)")
    p.add_argument("--channels", choices=("auto", "grey", "rgb"),
                   help="convert the image's channels (default auto: grey <-> RGB as needed)")
    p.add_argument("--normalization",
                   help="percentile, minmax, zscore, none ... (default: the model card's)")
    p.add_argument("--probabilities-dtype", choices=("float16", "uint8"))
    p.add_argument("--config", metavar="TOML", help="settings file with a [predict] table")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a zarr output that holds another run")
    p.add_argument("--plan-only", action="store_true",
                   help="print the tile plan (with a one-batch probe) and stop")
    p.add_argument("-q", "--quiet", action="store_true", help="no plan and no progress bar")
    return p


# --- batch --------------------------------------------------------------------------------


def _batch_config(args: argparse.Namespace):
    from .config import BatchConfig

    return _config(BatchConfig, args, "batch", {
        "weights": args.weights, "model": args.model, "variant": args.variant,
        "num_classes": args.classes, "pattern": args.pattern, "format": args.format,
        "output": args.output_kind, "device": args.device, "workers": args.workers,
        "scheduler": args.scheduler, "dask_local": args.dask_local, "tile": args.tile,
        "overlap": args.overlap, "batch_size": args.batch_size, "precision": args.precision,
        "balance": False if args.exact_tiles else None,
        **{flag: True for flag in ("recursive", "force", "tta") if getattr(args, flag)},
    })


def _cmd_batch(args: argparse.Namespace) -> int:
    from .engine.batch.run import FileEvent, run_folder_iter
    from .engine.progress import CancelToken, FinishedEvent, NoticeEvent

    err = sys.stderr
    config = _batch_config(args)
    token = CancelToken()
    bar = None
    summary = None

    def say(line: str) -> None:
        (bar.write if bar is not None else print)(line, file=err)

    # first Ctrl-C: stop cleanly; second: abort
    with _ctrl_c_cancels(token, lambda: say(
            "napari-medseg: stopping after the current batch of tiles (Ctrl-C again to abort)")):
        try:
            for event in run_folder_iter(args.input, args.output, config, cancel=token):
                if isinstance(event, NoticeEvent):
                    say(_notice_line(event))
                elif isinstance(event, FileEvent):
                    if event.status == "failed":
                        say(f"napari-medseg: error: {event.name}: {event.error}")
                    elif event.status == "ignored":
                        say(f"napari-medseg: notice: ignoring {event.name}: {event.error}")
                    if bar is None and not args.quiet and event.total:
                        from tqdm import tqdm

                        bar = tqdm(total=event.total, unit="file", file=err, dynamic_ncols=True,
                                   desc="batch")
                    if bar is not None:
                        bar.update(event.finished - bar.n)
                        if event.status == "running":
                            bar.set_postfix_str(event.name[-32:])
                elif isinstance(event, FinishedEvent):
                    summary = event.result
        finally:
            if bar is not None:
                bar.close()
    assert summary is not None
    print(f"napari-medseg: {summary.line()}")
    print(f"napari-medseg: manifest {summary.manifest}")
    if summary.was_cancelled:
        return 130
    return 1 if summary.failed else 0


def _add_batch(sub) -> argparse.ArgumentParser:
    from .config import BATCH_FORMATS, BATCH_OUTPUTS, PRECISIONS

    p = sub.add_parser(
        "batch", help="segment every image in a folder (resumable, optionally on Dask)",
        description="Segment every image in IN_DIR into OUT_DIR as <name>_mask.<ext>, with a "
                    "manifest run.json. A re-run skips the files an earlier run finished with "
                    "the same weights and settings; unreadable files are reported and the "
                    "rest go on.",
        epilog="Exit status: 0 all images done, 1 some failed, 2 the run could not start, "
               "130 cancelled.",
    )
    p.add_argument("input", metavar="IN_DIR", help="folder of images")
    p.add_argument("output", metavar="OUT_DIR", help="folder for the outputs and run.json")
    p.add_argument("--weights", metavar="TAG|PATH",
                   help="shipped weights tag (see `napari-medseg models`) or a checkpoint path")
    p.add_argument("--model", help="without --weights: a network built with RANDOM weights "
                                   "(to test a pipeline only)")
    p.add_argument("--variant", help="variant of --model (default lite)")
    p.add_argument("--classes", type=int, help="classes of --model (default 2)")
    p.add_argument("--pattern", help="glob the file names must match (default *)")
    p.add_argument("--recursive", action="store_true", help="also look in sub-folders")
    p.add_argument("--format", choices=tuple(BATCH_FORMATS), help="output format (default tif)")
    p.add_argument("--output-kind", choices=BATCH_OUTPUTS,
                   help="label image written per input (default mask)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--workers", type=int,
                   help="files predicted at once in this process, one model each (default 1)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="run on an existing Dask cluster (tcp://HOST:PORT); its workers "
                            "must see the folders at the same paths")
    where.add_argument("--dask-local", type=int, metavar="N",
                       help="start a local Dask cluster of N worker processes (loopback)")
    p.add_argument("--tile", help="tile side in pixels (default: the network's)")
    p.add_argument("--overlap", help="tile overlap fraction (default 0.125)")
    p.add_argument("--exact-tiles", action="store_true",
                   help="keep the tile side as given instead of shrinking it to cover the "
                        "image with the same number of tiles")
    p.add_argument("--batch-size", help="tiles per forward pass (default: automatic)")
    p.add_argument("--precision", choices=PRECISIONS, help="compute precision (default auto)")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--force", action="store_true",
                   help="predict every file again, even those finished earlier")
    p.add_argument("--config", metavar="TOML", help="settings file with a [batch] table")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


# --- finetune -----------------------------------------------------------------------------


def _finetune_config(args: argparse.Namespace):
    from .config import FinetuneConfig

    return _config(FinetuneConfig, args, "finetune", {
        "steps": args.steps, "lr": args.lr, "device": args.device, "precision": args.precision,
        "batch_size": args.batch_size, "patch": args.patch, "val_fraction": args.val_fraction,
        "max_minutes": args.max_minutes, "seed": args.seed,
        "freeze_encoder": True if args.freeze_encoder else None,
        "freeze_norm_stats": False if args.update_norm_stats else None,
    })


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .engine.checkpoints import resolve_weights
    from .engine.training.finetune import finetune_iter, samples_from_folders
    from .engine.progress import CancelToken, FinishedEvent, NoticeEvent, StageEvent
    from .engine.training.train import StepEvent, ValidationEvent

    err = sys.stderr
    config = _finetune_config(args)
    model, info = resolve_weights(args.weights)
    spec = model.spec
    samples, files_hash = samples_from_folders(
        args.images, args.masks, num_classes=spec.num_classes, in_channels=spec.in_channels,
        normalization=info.normalization_config(), config=config,
        output_scale=spec.output_scale, pattern=args.pattern or "*")
    if not args.quiet:
        print(f"napari-medseg: fine-tuning {info.network}/{info.variant} "
              f"({info.tag or args.weights}) on {len(samples)} image plane(s)", file=err)
    token = CancelToken()
    bar = None
    result = None

    def say(line: str) -> None:
        (bar.write if bar is not None else print)(line, file=err)

    data = {"images": str(args.images), "masks": str(args.masks), "data_hash": files_hash}
    # first Ctrl-C: stop and keep the best; second: abort
    with _ctrl_c_cancels(token, lambda: say(
            "napari-medseg: stopping after this step; the best weights so far are kept "
            "(Ctrl-C again to abort)")):
        try:
            for event in finetune_iter(model, samples, config, cancel=token, output=args.output,
                                       data=data):
                if isinstance(event, NoticeEvent):
                    say(_notice_line(event))
                elif isinstance(event, StepEvent):
                    if bar is None and not args.quiet:
                        from tqdm import tqdm

                        bar = tqdm(total=event.steps, unit="step", file=err, dynamic_ncols=True,
                                   desc="fine-tune")
                    if bar is not None:
                        bar.update(event.step - bar.n)
                        bar.set_postfix_str(f"loss {event.loss:.4f}")
                elif isinstance(event, ValidationEvent) and not args.quiet:
                    say(f"napari-medseg: {event.message}" + (" (best)" if event.improved else ""))
                elif isinstance(event, StageEvent) and not args.quiet:
                    say(f"napari-medseg: {event.message}")
                elif isinstance(event, FinishedEvent):
                    result = event.result
                    if bar is not None:
                        bar.close()
                        bar = None
                    print(f"napari-medseg: {event.message}", file=err)
        finally:
            if bar is not None:
                bar.close()
    assert result is not None
    def finite(x: float) -> float | None:
        return None if x != x else round(float(x), 4)  # NaN (no validation) -> null

    summary = {
        "checkpoint": str(result.checkpoint), "parent": info.sha256,
        "val_dice_before": finite(result.baseline_dice), "val_dice": finite(result.best_dice),
        "best_step": result.best_step, "steps_done": result.steps_done,
        "stopped": result.stopped, "seconds": round(result.seconds, 1),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"napari-medseg: wrote {result.checkpoint} (use it with --weights "
              f"{result.checkpoint})")
    return 0


def _add_finetune(sub) -> argparse.ArgumentParser:
    from .config import PRECISIONS

    p = sub.add_parser(
        "finetune", help="fine-tune weights on corrected masks (image/mask folders)",
        description="Fine-tune a checkpoint or shipped weights on image/mask pairs matched by "
                    "file name (a.tif <-> a.tif or a_mask.tif). One image in four is held "
                    "out for the validation Dice; the best weights are kept and written to "
                    "CKPT with their lineage (parent, data hash, settings, metrics). Ctrl-C "
                    "stops and keeps the best weights so far.",
    )
    p.add_argument("--weights", required=True, metavar="BASE",
                   help="shipped weights tag (see `napari-medseg models`) or a checkpoint path")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images")
    p.add_argument("--masks", required=True, metavar="DIR",
                   help="folder of masks (class or instance labels) named like the images")
    p.add_argument("-o", "--output", required=True, metavar="CKPT",
                   help="the fine-tuned checkpoint (.safetensors; the .json goes beside it)")
    p.add_argument("--steps", help="optimisation steps at most (default 200)")
    p.add_argument("--lr", help="peak learning rate (default 3e-4)")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="train only the decoder and heads")
    p.add_argument("--update-norm-stats", action="store_true",
                   help="re-estimate batch-norm statistics from the new images (default: "
                        "keep the base model's; only worth it with many images)")
    p.add_argument("--batch-size", help="patches per step (default 4)")
    p.add_argument("--patch", help="patch side in pixels (default 128)")
    p.add_argument("--val-fraction", help="fraction of images held out (default 0.25)")
    p.add_argument("--max-minutes", help="stop after this many minutes, keeping the best")
    p.add_argument("--seed", help="random seed (default 0)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--precision", choices=PRECISIONS, help="compute precision (default auto)")
    p.add_argument("--pattern", help="glob the file names must match (default *)")
    p.add_argument("--config", metavar="TOML", help="settings file with a [finetune] table")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


# --- train / eval / demo ------------------------------------------------------------------


def _print_train_event(event, bar) -> None:
    from .engine.training.train import StepEvent, ValidationEvent

    if isinstance(event, StepEvent):
        if bar is not None:
            bar.total = event.steps
            bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.1e}")
            bar.update(event.step - bar.n)
    elif isinstance(event, ValidationEvent):
        _say(bar, event.message)
    elif getattr(event, "message", ""):
        _say(bar, event.message)


def _say(bar, message: str) -> None:
    if bar is not None:
        bar.write(message)
    else:
        print(message, file=sys.stderr)


def _cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .config import TrainConfig
    from .engine.training.train import train_iter

    renamed = {"model": "network", "classes": "num_classes", "minutes": "max_minutes"}
    config = _config(TrainConfig, args, "train", {
        **{renamed.get(key, key): getattr(args, key, None)
           for key in ("model", "variant", "in_channels", "classes", "input_downsample",
                       "patch", "batch_size", "steps", "lr", "val_fraction", "val_every",
                       "patience", "device", "precision", "minutes", "seed", "pattern",
                       "freeze_encoder")},
        "resume": False if args.no_resume else None,
    })
    bar = None if args.quiet else tqdm(total=config.steps, unit="step", dynamic_ncols=True)
    result = None
    try:
        for event in train_iter(args.images, args.masks, args.output, config,
                                parent=args.weights):
            _print_train_event(event, bar)
            result = getattr(event, "result", result)
    finally:
        if bar is not None:
            bar.close()
    print(f"best checkpoint: {result.checkpoint} (validation Dice {result.best_dice:.4f} at step "
          f"{result.best_step}; {result.stopped})")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .config import PredictConfig
    from .engine.checkpoints import resolve_weights
    from .engine.training.evaluate import evaluate_iter, format_table

    model, _info = resolve_weights(args.weights, device=args.device or "cpu")
    config = _config(PredictConfig, args, None,
                     {"tile": args.tile, "device": args.device, "precision": args.precision})
    result = None
    for event in evaluate_iter(model, args.images, args.masks, config, pattern=args.pattern):
        if not args.json and not args.quiet and getattr(event, "message", ""):
            print(event.message, file=sys.stderr)
        result = getattr(event, "result", result)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_table(result))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import numpy as np

    from .config import PredictConfig
    from .engine.checkpoints import default_weights, resolve_weights
    from .engine.inference.pipeline import predict
    from .engine.metrics import dice
    from .errors import WeightsNotFoundError
    from .io import read_image, write_labels
    from .io.samples import sample_path

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


def _add_train_eval_demo(sub, commands: dict[str, Command]) -> None:
    p = sub.add_parser("train", help="train a network on image/mask folders")
    p.add_argument("--model", help="network name (napari-medseg models)")
    p.add_argument("--variant", help="tiny, lite or paper")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of masks with the same names")
    p.add_argument("-o", "--output", required=True, help="checkpoint path (.safetensors)")
    p.add_argument("--weights", help="start from this checkpoint instead of random weights")
    p.add_argument("--in-channels", type=int, dest="in_channels")
    p.add_argument("--classes", type=int, help="K classes (2 = background + foreground)")
    p.add_argument("--input-downsample", type=int, dest="input_downsample",
                   help="run the network on the image shrunk by this integer factor (large "
                        "objects such as skin lesions; default 1)")
    p.add_argument("--patch", type=int)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--val-fraction", type=float, dest="val_fraction")
    p.add_argument("--val-every", type=int, dest="val_every")
    p.add_argument("--patience", type=int)
    p.add_argument("--minutes", type=float, help="stop after this many minutes")
    p.add_argument("--device")
    p.add_argument("--precision")
    p.add_argument("--seed", type=int)
    p.add_argument("--pattern")
    p.add_argument("--freeze-encoder", action="store_const", const=True, dest="freeze_encoder")
    p.add_argument("--no-resume", action="store_true", help="ignore a saved training state")
    p.add_argument("--config", help="TOML file with a [train] table")
    p.add_argument("-q", "--quiet", action="store_true")
    commands["train"] = _cmd_train

    p = sub.add_parser("eval", help="score weights on image/mask folders")
    p.add_argument("--weights", required=True, help="model-card tag or checkpoint path")
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--pattern", default="*")
    p.add_argument("--tile", type=int)
    p.add_argument("--device")
    p.add_argument("--precision")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    commands["eval"] = _cmd_eval

    p = sub.add_parser("demo", help="segment the bundled nuclei sample (and show it in napari)")
    p.add_argument("--weights", help="model-card tag or checkpoint (default: best nuclei weights)")
    p.add_argument("--out", default="demo_output", help="output folder")
    p.add_argument("--no-viewer", action="store_true", help="do not open napari")
    commands["demo"] = _cmd_demo


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    """The argument parser and the command table."""
    parser = argparse.ArgumentParser(
        prog="napari-medseg",
        description="Deep-learning segmentation of microscopy and radiology images.",
    )
    parser.add_argument("--version", action="version", version=f"napari-medseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands: dict[str, Command] = {}

    p = sub.add_parser("info", help="versions, torch devices and where weights are looked up")
    p.add_argument("--json", action="store_true", help="print JSON")
    commands["info"] = _cmd_info

    p = sub.add_parser("models", help="list networks, variants and shipped weights")
    p.add_argument("--json", action="store_true", help="print JSON")
    commands["models"] = _cmd_models

    _add_predict(sub)
    commands["predict"] = _cmd_predict

    _add_finetune(sub)
    commands["finetune"] = _cmd_finetune

    _add_batch(sub)
    commands["batch"] = _cmd_batch

    _add_train_eval_demo(sub, commands)

    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-medseg`` console script."""
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return commands[args.command](args)
    except MedsegError as exc:
        print(f"napari-medseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("napari-medseg: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
