"""``napari-medseg predict``: segment image files or folders with a network.

Each input is one task of the batch wing (:mod:`napari_medseg.engine.batch.task`), run in
this process with one model: the same read -> predict -> write step as ``napari-medseg batch``.
Into an output folder the mask goes to ``<stem>_mask.<ext>`` and every other output to
``<stem>_<output>.<ext>`` (as ``demo`` and ``batch`` name them); ``-o`` naming one file makes
that file the mask. The format follows ``-o``: ``-o x.zarr`` is a zarr store (every output
streamed into it, resumable), ``-o x.tif`` a TIFF, ``-o dir/`` the ``--format`` (default tif).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import EXIT_CANCELLED, Progress, ctrl_c_cancels, load_config, notice_line
from .common import add_compute_args, add_run_args, add_super_resolved_arg, add_tiling_args
from .common import compute_flags

__all__ = ["add_predict", "cmd_predict"]

_FORMAT_SUFFIX = {"tif": ".tif", "nii": ".nii.gz", "zarr": ".zarr"}


def _stem(path: Path) -> str:
    """The file name without its image suffix (``a.ome.tif`` -> ``a``)."""
    from ..engine.batch.scan import image_stem

    stem = image_stem(path.name)
    return stem if stem != path.name else path.stem


def _collect_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Image paths from files and folders, plus notices about skipped entries."""
    from ..errors import ImageReadError
    from ..io import is_supported

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


def _single_file(inputs: list[Path], out: Path) -> bool:
    """``-o`` names one output file (a single input and a suffix napari-medseg writes)."""
    from ..io import supported_suffixes

    return len(inputs) == 1 and any(
        out.name.lower().endswith(s) for s in supported_suffixes(write=True))


def output_format(inputs: list[Path], out: Path, asked: str | None) -> str:
    """The output format: from ``-o``'s suffix when it names one file, else ``--format``
    (default tif).

    Raises:
        ConfigError: ``--format`` contradicts the suffix of ``-o``.
    """
    if not _single_file(inputs, out):
        return asked or "tif"
    from ..io.detect import format_from_name

    found = {"tiff": "tif", "zarr": "zarr", "nifti": "nii"}.get(
        format_from_name(out, write=True) or "", None)
    if found is None and asked:  # png and the like: no stream or store under that name
        from ..errors import ConfigError

        raise ConfigError(f"The output {out.name} cannot hold --format {asked}; drop "
                          "--format or name the output .tif, .zarr or .nii.gz.")
    if found is None:  # png and the like: written whole, as before
        return "tif"
    if asked and asked != found:
        from ..errors import ConfigError

        raise ConfigError(f"The output {out.name} is a {found} name but --format says "
                          f"{asked}; drop --format (the name decides) or rename the output.")
    return found


def _output_paths(
    inputs: list[Path], out: Path, fmt: str, outputs: Sequence[str]
) -> list[dict[str, Path]]:
    """Per input: output name -> path (``<stem>_<output>.<ext>`` in a folder; a file named
    by ``-o`` is the mask, the others beside it suffixed)."""
    ext = _FORMAT_SUFFIX[fmt]
    single_file = _single_file(inputs, out)
    plans = []
    for path in inputs:
        if single_file:
            folder, stem = out.parent, _stem(out)
            ext_here = out.name[len(stem):]
            names = {"mask": out}
        else:
            folder, stem, ext_here = out, _stem(path), ext
            names = {"mask": folder / f"{stem}_mask{ext_here}"}
        for name in outputs:
            if name != "mask":
                names[name] = folder / f"{stem}_{name}{ext_here}"
        plans.append(names)
    stems = [p["mask"] for p in plans]
    if len(set(stems)) != len(stems):
        from ..errors import ConfigError

        raise ConfigError("Two inputs have the same name stem; their outputs would overwrite "
                          "each other, so predict them into separate folders.")
    return plans


def _tasks(args: argparse.Namespace, config) -> list[Any]:
    """One batch task per input image (notices about skipped entries are printed)."""
    from ..engine.batch.task import FileTask

    inputs, skipped = _collect_inputs(args.inputs)
    for line in skipped:
        print(f"napari-medseg: notice: {line}", file=sys.stderr)
    fmt = output_format(inputs, Path(args.output), args.format)
    tasks = []
    for path, paths in zip(inputs, _output_paths(inputs, Path(args.output), fmt,
                                                 config.outputs)):
        cfg = config
        if fmt == "zarr":  # stream into the store (and resume it)
            cfg = config.replace(store=str(paths["mask"]), overwrite=args.overwrite)
        tasks.append(FileTask(name=path.name, input_path=str(path), predict=cfg,
                              outputs=tuple((n, str(p)) for n, p in paths.items())))
    return tasks


def _build_model(args: argparse.Namespace, first_channels: int) -> tuple[object, str]:
    """The network: from --weights, or randomly initialised from --model (loudly)."""
    from ..errors import ConfigError

    if args.weights:
        from ..engine.checkpoints import resolve_weights

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
    from ..models import create_model
    from ..models.working_resolution import on_input_grid

    variant = args.variant or "lite"
    in_channels = first_channels if first_channels in (1, 3) else 1
    model = on_input_grid(create_model(args.model, variant=variant, in_channels=in_channels,
                                       num_classes=args.classes))
    print(f"WARNING: no --weights given: {args.model!r} ({variant}) is RANDOMLY INITIALISED; "
          "its output is meaningless. Pass --weights TAG (see `napari-medseg models`) or a "
          "checkpoint path.", file=sys.stderr)
    return model, f"{args.model}/{variant} (random weights)"


def _predict_config(args: argparse.Namespace):
    from ..config import PredictConfig

    return load_config(PredictConfig, args, "predict", {
        **compute_flags(args), "blend": args.blend, "axis": args.axis,
        "outputs": args.outputs, "channels": args.channels,
        "normalization": args.normalization, "probabilities_dtype": args.probabilities_dtype,
        "volume_mode": "orthogonal" if args.orthogonal else None,
        "memory_fraction": args.memory_fraction,
    })


def _show(events, name: str, quiet: bool):
    """Print a prediction's plan, notices and tile progress; returns its result."""
    from ..engine.inference.plan import format_seconds
    from ..engine.progress import FinishedEvent, NoticeEvent, PlaneEvent, PlanEvent, TilesEvent

    result, said = None, set()
    with Progress("tile", desc=name[:24], quiet=quiet, leave=False) as bar:
        for event in events:
            if isinstance(event, PlanEvent) and not quiet:
                if not event.probed:  # the plan's notes, less the notices already printed
                    lines = [x for x in event.plan.describe().split("\n") if x not in said]
                    bar.say(f"napari-medseg: {name}: plan\n  " + "\n  ".join(lines))
                elif event.plan.seconds is not None:
                    bar.say(f"  estimated time {format_seconds(event.plan.seconds)} "
                            "(one-batch probe)")
            elif isinstance(event, NoticeEvent):
                said.add(event.message)
                bar.say(notice_line(event))
            elif isinstance(event, TilesEvent):
                bar.advance(event.done, event.total)
            elif isinstance(event, PlaneEvent):
                bar.postfix(f"slice {event.plane + 1}/{event.planes}")
            elif isinstance(event, FinishedEvent):
                result = event.result
    return result


def _done_line(task, result) -> str:
    from ..engine.batch.task import written_paths

    extra = ""
    if result.stats.get("z_consistency") is not None:
        extra += f", z-consistency {result.stats['z_consistency']:.3f}"
    if result.stats.get("plane_agreement") is not None:
        extra += f", plane agreement {result.stats['plane_agreement']:.3f}"
    written = ", ".join(str(w) for w in written_paths(task, result))
    return f"napari-medseg: {task.name} -> {written} ({result.stats['seconds']:.1f} s{extra})"


def _kept_line(task, result) -> str:
    """What a cancelled prediction left, and how to go on."""
    from ..engine.batch.staging import is_staging_store

    if result.store and is_staging_store(result.store):
        return (f"the finished slices are kept in {result.store}; the same command resumes "
                "there and writes the outputs")
    if result.store:
        return f"the finished slices are kept in {task.output_path}"
    return "nothing was written"


class _Predictor:
    """Runs the tasks one after the other with one model, built from the first image read.

    Args:
        args: the command's arguments.
        token: Ctrl-C cancels it.
        single: one input: its errors are raised (one sentence, exit 2), not counted.
    """

    def __init__(self, args: argparse.Namespace, token, single: bool) -> None:
        self.args, self.token, self.single = args, token, single
        self.model: Any = None
        self.failures = 0

    def _failed(self, task, exc: Exception) -> None:
        """One input failed: raised for a single input, else counted and reported."""
        if self.single:
            raise exc
        self.failures += 1
        print(f"napari-medseg: error: {task.name}: {exc}", file=sys.stderr)

    def _ensure_model(self, image, meta) -> None:
        if self.model is None:  # an error here (unknown network, weights) stops the run
            channels = image.shape[meta.axes.index("C")] if "C" in meta.axes else 1
            self.model, described = _build_model(self.args, channels)
            if not self.args.quiet:
                print(f"napari-medseg: model {described}", file=sys.stderr)

    def run(self, task) -> int | None:
        """Predict one task; returns an exit status to stop with (cancelled), else None."""
        from ..engine.batch.task import predict_file_iter
        from ..engine.inference.planning import plan_prediction
        from ..errors import MedsegError
        from ..io import read_image

        args, err = self.args, sys.stderr
        try:
            image, meta = read_image(task.input_path, series=args.series)
        except MedsegError as exc:
            self._failed(task, exc)
            return None
        self._ensure_model(image, meta)
        try:
            if args.plan_only:
                from ..engine.batch.staging import plan_config

                plan = plan_prediction(image, self.model, plan_config(task), meta=meta)
                print(f"{task.name}:\n{plan.describe()}")
                return None
            result = _show(predict_file_iter(task, self.model, image, meta, self.token),
                           task.name, args.quiet)
            assert result is not None
            if result.cancelled:
                kept = _kept_line(task, result)
                print(f"napari-medseg: {task.name}: cancelled; {kept}.", file=err)
                return EXIT_CANCELLED
            if not args.quiet:
                print(_done_line(task, result), file=err)
        except MedsegError as exc:
            self._failed(task, exc)
        return None


def cmd_predict(args: argparse.Namespace) -> int:
    """``napari-medseg predict``: 0 done, 2 an error (or some inputs failed), 130 cancelled."""
    from ..engine.progress import CancelToken

    err = sys.stderr
    tasks = _tasks(args, _predict_config(args))
    if not args.plan_only:  # before any prediction: never over an input, nor unasked
        from ..engine.batch.outputs import check_task_outputs

        check_task_outputs(tasks, overwrite=args.overwrite)
    token = CancelToken()
    predictor = _Predictor(args, token, single=len(tasks) == 1)

    def stopping() -> None:  # first Ctrl-C: stop after the batch; second: abort
        print("\nnapari-medseg: stopping after the current batch (Ctrl-C again to abort)",
              file=err)

    with ctrl_c_cancels(token, stopping):
        for task in tasks:
            status = predictor.run(task)
            if status is not None:
                return status
    if predictor.failures:
        print(f"napari-medseg: {predictor.failures} of {len(tasks)} input(s) failed.", file=err)
        return 2
    return 0


def add_predict(sub) -> argparse.ArgumentParser:
    """The ``predict`` sub-command's arguments."""
    from ..config import BLEND_MODES, OUTPUT_NAMES

    p = sub.add_parser(
        "predict", help="segment images (files or folders) with a network",
        description="Segment images tile by tile. Into an output folder the mask goes to "
                    "<stem>_mask.tif and the other outputs to <stem>_<output>.tif; -o naming "
                    "one file (a single input) makes it the mask and sets the format: "
                    "-o out.zarr streams every output into one zarr store and resumes a "
                    "killed run. Volumes and large images are streamed slice by slice; "
                    "outputs that cannot stream (NIfTI) and would exceed the memory budget "
                    "are refused before any work.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output folder, or for a single input the mask's file name (its "
                        "suffix sets the format: .zarr, .tif, .nii.gz)")
    p.add_argument("--series", metavar="UID",
                   help="the DICOM SeriesInstanceUID to read from a folder holding several")
    p.add_argument("--model", help="network name (see `napari-medseg models`)")
    p.add_argument("--variant", help="network variant (tiny, lite, paper; default lite)")
    p.add_argument("--weights", metavar="TAG|PATH",
                   help="shipped weights tag or a checkpoint path; without it the network is "
                        "randomly initialised")
    p.add_argument("--classes", type=int, default=2,
                   help="classes of a randomly initialised network (default 2)")
    add_tiling_args(p)
    p.add_argument("--blend", choices=BLEND_MODES, help="tile blending (default gaussian)")
    add_compute_args(p)
    p.add_argument("--axis", help="axis a 2D network slices volumes along (Z, Y or X)")
    p.add_argument("--orthogonal", action="store_true",
                   help="average YX, ZX and ZY slicing (volumes, 3x the time)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation (4x the time in 2D); default: as the "
                        "weights say (on for those tuned with it, see `models`)")
    add_super_resolved_arg(p)
    p.add_argument("--outputs", help=f"comma-separated, from {','.join(OUTPUT_NAMES)} "
                                     "(default mask)")
    p.add_argument("--format", choices=tuple(_FORMAT_SUFFIX), default=None,
                   help="output format into a folder (default tif; zarr streams and resumes); "
                        "a file name given to -o sets it")
    p.add_argument("--channels", choices=("auto", "grey", "rgb"),
                   help="convert the image's channels (default auto: grey <-> RGB as needed)")
    p.add_argument("--normalization",
                   help="percentile, minmax, zscore, none ... (default: the model card's)")
    p.add_argument("--probabilities-dtype", choices=("float16", "uint8"))
    p.add_argument("--memory-fraction", type=float, metavar="F",
                   help="memory budget: the share of the available memory outputs may hold "
                        "(default 0.5); larger ones stream (zarr, TIFF) or are refused (NIfTI)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (and a zarr output that holds another run); "
                        "an input is never replaced")
    p.add_argument("--plan-only", action="store_true",
                   help="print the tile plan (with a one-batch probe) and stop")
    add_run_args(p, "predict", quiet_help="no plan and no progress bar")
    return p

