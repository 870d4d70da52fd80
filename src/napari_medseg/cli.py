"""The ``napari-medseg`` command line: ``info``, ``models``, ``predict`` and friends.

Heavy modules (torch, the engine) are imported inside the command that needs them, so
``napari-medseg --help`` stays fast. Project errors are printed as one sentence, exit 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable, Sequence

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
    info["devices"] = _devices()
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


def _devices() -> list[dict]:
    """Torch devices with their memory; imports torch."""
    import torch

    devices = [{"name": "cpu", "description": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append({
                "name": f"cuda:{i}",
                "description": torch.cuda.get_device_name(i),
                "total_memory_mb": total // 2**20,
                "free_memory_mb": free // 2**20,
            })
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append({"name": "mps", "description": "Apple Metal"})
    return devices


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import get_entry, list_models, list_variants

    networks = [
        {"network": n, "variants": list_variants(n), "summary": get_entry(n).summary}
        for n in list_models()
    ]
    weights: list[dict] = []
    try:
        from .engine.checkpoints import list_shipped_weights
    except ImportError:
        list_shipped_weights = None
    if list_shipped_weights is not None:
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
