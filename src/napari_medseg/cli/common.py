"""What the commands share: settings from flags and a TOML file, notices, Ctrl-C, progress
bars, and the argument blocks several commands take."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "EXIT_CANCELLED",
    "Command",
    "Progress",
    "load_config",
    "notice_line",
    "ctrl_c_cancels",
    "compute_flags",
    "add_tiling_args",
    "add_compute_args",
    "add_run_args",
]

#: The exit status of a command stopped by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_CANCELLED = 130

#: A command: parsed arguments -> exit status.
Command = Callable[[argparse.Namespace], int]


def load_config(config_cls, args: argparse.Namespace, section: str | None, flags: dict):
    """``config_cls`` from the ``[section]`` table of ``--config`` (when given), with every
    flag that is not None set over it."""
    from ..config import load_toml

    config_file = getattr(args, "config", None)
    settings: dict = load_toml(config_file, section=section) if section and config_file else {}
    settings.update({k: v for k, v in flags.items() if v is not None})
    return config_cls.from_mapping(settings)


def notice_line(event) -> str:
    """A NoticeEvent as printed: a warning loudly, a notice as one."""
    tag = "WARNING" if event.level == "warning" else "napari-medseg: notice"
    return f"{tag}: {event.message}"


@contextmanager
def ctrl_c_cancels(token, stopping: Callable[[], None]) -> Iterator[None]:
    """Inside: the first Ctrl-C cancels ``token`` and calls ``stopping()`` (to say so), a
    second raises KeyboardInterrupt. Only in the main thread; elsewhere nothing changes.

    A command that ends after a cancel returns :data:`EXIT_CANCELLED`, whatever it kept."""
    import signal

    def on_sigint(signum, frame):
        if token.cancelled:
            raise KeyboardInterrupt
        token.cancel()
        stopping()

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


class Progress:
    """A progress bar on stderr, opened by the first :meth:`advance` (never when quiet), and
    lines printed above it.

    Args:
        unit: what is counted (``tile``, ``file``, ``step``).
        desc: the bar's label.
        quiet: no bar at all (lines are still printed).
        leave: keep the finished bar on screen.
    """

    def __init__(self, unit: str, desc: str | None = None, quiet: bool = False,
                 leave: bool = True) -> None:
        self.unit, self.desc, self.quiet, self.leave = unit, desc, quiet, leave
        self.bar: Any = None

    def advance(self, done: int, total: int) -> None:
        """``done`` of ``total`` finished."""
        if self.bar is None:
            if self.quiet or not total:
                return
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=self.unit, file=sys.stderr, desc=self.desc,
                            leave=self.leave, dynamic_ncols=True)
        self.bar.total = max(self.bar.total, total)
        self.bar.update(done - self.bar.n)

    def postfix(self, text: str) -> None:
        """Text after the bar (the current file, the loss ...)."""
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def say(self, line: str) -> None:
        """Print ``line`` to stderr, above the bar when there is one."""
        (self.bar.write if self.bar is not None else print)(line, file=sys.stderr)

    def close(self) -> None:
        """Close the bar (a later :meth:`advance` opens a new one)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- argument blocks ------------------------------------------------------------------------


def compute_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The prediction settings of :func:`add_tiling_args` and :func:`add_compute_args`."""
    return {"tile": args.tile, "overlap": args.overlap,
            "balance": False if args.exact_tiles else None, "device": args.device,
            "batch_size": args.batch_size, "precision": args.precision,
            "tta": getattr(args, "tta", None),
            "super_resolved": True if getattr(args, "super_resolved", False) else None,
            "native_pixels": True if getattr(args, "native_pixels", False) else None,
            "diameter": getattr(args, "diameter", None)}


def add_super_resolved_arg(p: argparse.ArgumentParser) -> None:
    """``--super-resolved``."""
    p.add_argument("--super-resolved", action="store_true", dest="super_resolved",
                   help="super-resolution networks (SASR-Net): write the outputs at the "
                        "network's scale (2x the image in Y and X) instead of on the image's "
                        "grid")
    p.add_argument("--native-pixels", action="store_true", dest="native_pixels",
                   help="run on the image's own pixels even when the weights declare another "
                        "pixel size or object size (by default each plane is resampled to it "
                        "and the outputs brought back to the image's grid)")
    p.add_argument("--diameter", type=float, metavar="PX",
                   help="typical object diameter in pixels, for weights that learnt objects "
                        "(nuclei): each plane is resampled so objects reach the network at "
                        "the size it learnt (default: measured by a first pass on the "
                        "image's centre)")


def add_tiling_args(p: argparse.ArgumentParser) -> None:
    """``--tile``, ``--overlap`` and ``--exact-tiles``."""
    p.add_argument("--tile", help="tile side in pixels (default: the tile the weights' card "
                                  "records, else the network's)")
    p.add_argument("--overlap", help="tile overlap fraction (default 0.125)")
    p.add_argument("--exact-tiles", action="store_true",
                   help="keep the tile side as given instead of shrinking it to cover the "
                        "image with the same number of tiles")


def add_compute_args(p: argparse.ArgumentParser,
                     batch_help: str = "tiles per forward pass (default: automatic)") -> None:
    """``--device``, ``--batch-size`` and ``--precision``."""
    from ..config import PRECISIONS

    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--batch-size", help=batch_help)
    p.add_argument("--precision", choices=PRECISIONS, help="compute precision (default auto)")


def add_run_args(p: argparse.ArgumentParser, section: str, json: bool = False,
                 quiet_help: str = "no progress bar") -> None:
    """``--config`` (a settings file with a ``[section]`` table), ``--json``, ``-q``."""
    p.add_argument("--config", metavar="TOML", help=f"settings file with a [{section}] table")
    if json:
        p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
