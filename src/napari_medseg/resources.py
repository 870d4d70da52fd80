"""Where model cards, shipped weights, sample data and user data live.

Lookup order for weights and model cards:

1. the environment variable ``NAPARI_MEDSEG_WEIGHTS`` (a folder holding weights files;
   model cards are looked up there too, and in its sibling ``models/`` if present);
2. the copy inside an installed wheel (``napari_medseg/_data/weights`` and ``.../models``);
3. the top-level ``weights/`` and ``models/`` folders of a source checkout (editable install).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ENV_WEIGHTS",
    "package_dir",
    "checkout_root",
    "weights_dirs",
    "model_card_dirs",
    "samples_dir",
    "user_data_dir",
]

ENV_WEIGHTS = "NAPARI_MEDSEG_WEIGHTS"


def package_dir() -> Path:
    """The folder of the installed ``napari_medseg`` package."""
    return Path(__file__).resolve().parent


def checkout_root() -> Path | None:
    """The repository root when running from a source checkout (``src`` layout), else None."""
    root = package_dir().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "src" / "napari_medseg").is_dir():
        return root
    return None


def _candidates(kind: str) -> list[Path]:
    found: list[Path] = []
    env = os.environ.get(ENV_WEIGHTS)
    if env:
        base = Path(env).expanduser()
        found.append(base if kind == "weights" else base)
        if kind == "models":
            found.append(base.parent / "models")
    found.append(package_dir() / "_data" / kind)
    root = checkout_root()
    if root is not None:
        found.append(root / kind)
    unique: list[Path] = []
    for path in found:
        if path.is_dir() and path.resolve() not in [p.resolve() for p in unique]:
            unique.append(path)
    return unique


def weights_dirs() -> list[Path]:
    """Existing folders searched for weights files, in priority order."""
    return _candidates("weights")


def model_card_dirs() -> list[Path]:
    """Existing folders searched for model cards (YAML), in priority order."""
    return _candidates("models")


def samples_dir() -> Path:
    """The folder of the offline sample images shipped inside the package."""
    return package_dir() / "_samples"


def user_data_dir() -> Path:
    """The per-user folder for fine-tuned checkpoints and autosaves (created on demand).

    ``NAPARI_MEDSEG_HOME`` overrides it; otherwise ``$XDG_DATA_HOME/napari-medseg`` or
    ``~/.local/share/napari-medseg``.
    """
    env = os.environ.get("NAPARI_MEDSEG_HOME")
    if env:
        base = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_DATA_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".local" / "share") / "napari-medseg"
    base.mkdir(parents=True, exist_ok=True)
    return base
