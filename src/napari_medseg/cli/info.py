"""``napari-medseg info`` and ``models``: versions, devices, networks and shipped weights."""

from __future__ import annotations

import argparse
import json
import os
import platform

from .._version import __version__
from .common import Command

__all__ = ["cmd_info", "cmd_models", "add_info_models"]


def cmd_info(args: argparse.Namespace) -> int:
    """``napari-medseg info``: versions, torch devices and where weights are looked up."""
    from importlib import metadata

    from .. import resources
    from ..engine.device import list_devices  # imports torch when called

    info: dict = {"napari-medseg": __version__, "python": platform.python_version()}
    for dist in ("torch", "timm", "napari", "numpy", "zarr", "tifffile", "nibabel", "pydicom"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    info["devices"] = list_devices()
    info["weights_dirs"] = [str(p) for p in resources.weights_dirs()]
    info["model_card_dirs"] = [str(p) for p in resources.model_card_dirs()]
    info["user_data_dir"] = str(resources.user_data_dir())
    info["env"] = {resources.ENV_WEIGHTS: os.environ.get(resources.ENV_WEIGHTS)}
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


def cmd_models(args: argparse.Namespace) -> int:
    """``napari-medseg models``: the networks with their variants, and the shipped weights."""
    from ..engine.checkpoints import list_shipped_weights
    from ..engine.seg_task import SegTask
    from ..models import get_entry, list_models, list_variants

    networks = [
        {"network": n, "variants": list_variants(n), "summary": get_entry(n).summary}
        for n in list_models()
    ]
    weights = list_shipped_weights()
    if args.json:
        print(json.dumps({"networks": networks, "weights": weights}, indent=2))
        return 0
    print("Networks (create_model name, variants):")
    for net in networks:
        print(f"  {net['network']:<11} {','.join(net['variants']):<16} {net['summary']}")
    print("Shipped weights:" if weights else "Shipped weights: none installed yet.")
    for w in weights:
        task = SegTask.from_dict(w.get("task"))
        notes = ("; objects (instance task)" if task.instances else "") + (
            "; flip TTA by default (--no-tta turns it off)" if task.tta else "")
        print(f"  {w['tag']:<28} {w['network']}/{w['variant']} on {w['dataset']}{notes}")
    return 0


def add_info_models(sub, commands: dict[str, Command]) -> None:
    """The ``info`` and ``models`` sub-commands, entered in ``commands``."""
    p = sub.add_parser("info", help="versions, torch devices and where weights are looked up")
    p.add_argument("--json", action="store_true", help="print JSON")
    commands["info"] = cmd_info

    p = sub.add_parser("models", help="list networks, variants and shipped weights")
    p.add_argument("--json", action="store_true", help="print JSON")
    commands["models"] = cmd_models
