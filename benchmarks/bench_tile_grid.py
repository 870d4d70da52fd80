"""Accuracy and cost of tile grids with the shipped weights on real held-out images.

Prints one JSON object: for each weights tag and grid, the mean Dice against the ground truth,
the mean Dice against the whole image predicted as one tile (no seams at all) and the pixels
the network computed. The images are the held-out ones of each model card (``val_files`` /
``val_planes``); nuclei images no larger than one 256 px tile are left out, since every grid
is the same single tile there.

Usage::

    python benchmarks/bench_tile_grid.py --data ../shared/data
    python benchmarks/bench_tile_grid.py --data ../shared/data --weights banet_lite_dsb2018
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["main"]



def grids(tile: int) -> dict[str, dict]:
    """Grid name -> prediction settings, for a requested tile side."""
    return {
        f"{tile}/0.25 exact": {"tile": tile, "overlap": 0.25, "balance": False},
        f"{tile}/0.125 exact": {"tile": tile, "overlap": 0.125, "balance": False},
        f"{tile}/0.125 balanced (default grid)": {"tile": tile, "overlap": 0.125,
                                                  "balance": True},
        f"{tile}/0.25 balanced": {"tile": tile, "overlap": 0.25, "balance": True},
        "whole image": {"tile": 4096},
    }


DEFAULT_WEIGHTS = ("sa2net_lite_isbi2012", "msa2net_lite_dsb2018", "banet_lite_dsb2018")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def held_out(info: dict, data: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, truth) pairs of the held-out images (planes of a stack) of a card's
    ``training_data``, read from ``data / <dataset>``."""
    from napari_medseg.io import read_image

    folder = data / info["dataset"]
    images, masks = folder / "images", folder / "masks"
    pairs = []
    planes = info.get("val_planes") or []
    if planes:
        for entry in planes:
            name, z = entry.rsplit("@", 1)
            vol = np.asarray(read_image(images / f"{name}.tif")[0])
            gt = np.asarray(read_image(masks / f"{name}.tif")[0])
            pairs.append((vol[int(z)], gt[int(z)]))
        return pairs
    for name in info["val_files"]:
        image = np.asarray(read_image(images / f"{name}.tif")[0])
        if max(image.shape[:2]) <= 256:
            continue
        pairs.append((image, np.asarray(read_image(masks / f"{name}.tif")[0])))
    return pairs


def bench(tag: str, data: Path, tile: int = 256) -> dict:
    from napari_medseg.engine.checkpoints import resolve_weights
    from napari_medseg.engine.inference.pipeline import predict

    model, info = resolve_weights(tag)
    pairs = held_out(info.training_data, data)
    settings_of = grids(tile)
    rows: dict[str, dict] = {g: {"dice": [], "dice_vs_whole": [], "pixels": 0}
                             for g in settings_of}
    for image, truth in pairs:
        masks = {}
        for grid, settings in settings_of.items():
            result = predict(image, model, outputs="mask", **settings)
            mask = np.asarray(result["mask"])
            step = mask.shape[0] // truth.shape[0]  # super-resolving networks: every s-th
            masks[grid] = mask[::step, ::step]
            rows[grid]["pixels"] += result.plan.grid.computed_pixels
            rows[grid]["dice"].append(_dice(masks[grid], truth))
        for grid in settings_of:
            rows[grid]["dice_vs_whole"].append(_dice(masks[grid], masks["whole image"]))
    return {"images": len(pairs), "grids": {
        g: {"dice": round(float(np.mean(r["dice"])), 4),
            "dice_vs_whole": round(float(np.mean(r["dice_vs_whole"])), 4),
            "pixels_computed": r["pixels"]} for g, r in rows.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="folder holding the data sets (../shared/data)")
    parser.add_argument("--weights", nargs="+", default=list(DEFAULT_WEIGHTS),
                        help="shipped weights tags")
    parser.add_argument("--tile", type=int, default=256, help="requested tile side")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = {tag: bench(tag, args.data, args.tile) for tag in args.weights}
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
