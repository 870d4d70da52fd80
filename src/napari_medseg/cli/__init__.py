"""The ``napari-medseg`` command line: ``info``, ``models``, ``predict`` and friends.

One module per command group (:mod:`.info`, :mod:`.predict`, :mod:`.batch`,
:mod:`.finetune`, :mod:`.train`, :mod:`.export`) over what they share (:mod:`.common`). Heavy
modules (torch, the engine) are imported inside the command that needs them, so
``napari-medseg --help`` stays fast. Project errors are printed as one sentence, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .._version import __version__
from ..errors import MedsegError
from .batch import add_batch, cmd_batch
from .common import EXIT_CANCELLED, Command
from .export import add_export, cmd_export
from .finetune import add_finetune, cmd_finetune
from .info import add_info_models
from .predict import add_predict, cmd_predict
from .train import add_train_eval_demo

__all__ = ["main", "build_parser"]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    """The argument parser and the command table."""
    parser = argparse.ArgumentParser(
        prog="napari-medseg",
        description="Deep-learning segmentation of microscopy and radiology images.",
    )
    parser.add_argument("--version", action="version", version=f"napari-medseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands: dict[str, Command] = {}
    add_info_models(sub, commands)
    add_predict(sub)
    commands["predict"] = cmd_predict
    add_finetune(sub)
    commands["finetune"] = cmd_finetune
    add_batch(sub)
    commands["batch"] = cmd_batch
    add_train_eval_demo(sub, commands)
    add_export(sub)
    commands["export"] = cmd_export
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
        return EXIT_CANCELLED
