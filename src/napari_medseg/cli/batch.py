"""``napari-medseg batch``: segment every image of a folder (resumable, optionally on Dask)."""

from __future__ import annotations

import argparse

from .common import EXIT_CANCELLED, Progress, ctrl_c_cancels, load_config, notice_line
from .common import add_compute_args, add_run_args, add_super_resolved_arg, add_tiling_args
from .common import compute_flags

__all__ = ["add_batch", "cmd_batch"]


def _batch_config(args: argparse.Namespace):
    from ..config import BatchConfig

    return load_config(BatchConfig, args, "batch", {
        **compute_flags(args), "weights": args.weights, "model": args.model,
        "variant": args.variant, "num_classes": args.classes, "pattern": args.pattern,
        "format": args.format, "output": args.output_kind, "workers": args.workers,
        "scheduler": args.scheduler, "dask_local": args.dask_local,
        **{flag: True for flag in ("recursive", "force") if getattr(args, flag)},
    })


def _show_file(event, bar: Progress) -> None:
    """A file's status: errors and ignored files as lines, progress on the bar."""
    if event.status == "failed":
        bar.say(f"napari-medseg: error: {event.name}: {event.error}")
    elif event.status == "ignored":
        bar.say(f"napari-medseg: notice: ignoring {event.name}: {event.error}")
    bar.advance(event.finished, event.total)
    if event.status == "running":
        bar.postfix(event.name[-32:])


def cmd_batch(args: argparse.Namespace) -> int:
    """``napari-medseg batch``: 0 all done, 1 some failed, 2 no start, 130 cancelled."""
    from ..engine.batch.run import FileEvent, run_folder_iter
    from ..engine.progress import CancelToken, FinishedEvent, NoticeEvent

    config = _batch_config(args)
    token = CancelToken()
    summary = None
    with Progress("file", desc="batch", quiet=args.quiet) as bar:
        # first Ctrl-C: stop cleanly; second: abort
        with ctrl_c_cancels(token, lambda: bar.say(
                "napari-medseg: stopping after the current batch of tiles (Ctrl-C again to "
                "abort)")):
            for event in run_folder_iter(args.input, args.output, config, cancel=token):
                if isinstance(event, NoticeEvent):
                    bar.say(notice_line(event))
                elif isinstance(event, FileEvent):
                    _show_file(event, bar)
                elif isinstance(event, FinishedEvent):
                    summary = event.result
    assert summary is not None
    print(f"napari-medseg: {summary.line()}")
    print(f"napari-medseg: manifest {summary.manifest}")
    if summary.was_cancelled:
        return EXIT_CANCELLED
    return 1 if summary.failed else 0


def add_batch(sub) -> argparse.ArgumentParser:
    """The ``batch`` sub-command's arguments."""
    from ..config import BATCH_FORMATS, BATCH_OUTPUTS

    p = sub.add_parser(
        "batch", help="segment every image in a folder (resumable, optionally on Dask)",
        description="Segment every image in IN_DIR into OUT_DIR as <name>_mask.<ext>, with a "
                    "manifest run.json. A re-run skips the files an earlier run finished with "
                    "the same weights and settings; unreadable files are reported and the "
                    "rest go on. A file in OUT_DIR that no earlier run recorded is never "
                    "replaced (the run is refused before it starts).",
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
    p.add_argument("--workers", type=int,
                   help="files predicted at once in this process, one model each (default 1)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="run on an existing Dask cluster (tcp://HOST:PORT); its workers "
                            "must see the folders at the same paths")
    where.add_argument("--dask-local", type=int, metavar="N",
                       help="start a local Dask cluster of N worker processes (loopback)")
    add_tiling_args(p)
    add_compute_args(p)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation; default: as the weights say")
    add_super_resolved_arg(p)
    p.add_argument("--force", action="store_true",
                   help="predict every file again, even those finished earlier")
    add_run_args(p, "batch")
    return p
