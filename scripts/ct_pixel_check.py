"""CT as a radiologist loads it: the CT weights on their validation patches rebuilt in
Hounsfield units at a finer pixel size (NIfTI), against the same patches at 2 mm.

    python scripts/ct_pixel_check.py --data-root ../shared/data [--pixel 0.7]

The 24 validation patches of ``sa2net_lite_msd`` (its card's split) are read back in HU with
the card's window, upsampled bilinearly to ``--pixel`` mm (masks by nearest neighbour),
stacked into one NIfTI volume with that spacing, read back through the package's reader and
segmented with the defaults, then once more with ``native_pixels`` (no resampling). Prints
JSON: mean Dice at 2 mm, on the rebuilt volume, and on it without resampling.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
TAG = "sa2net_lite_msd"


def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def main(argv: list[str] | None = None) -> int:
    from napari_medseg.engine.cards import list_model_cards
    from napari_medseg.engine.checkpoints import resolve_weights
    from napari_medseg.engine.inference import predict
    from napari_medseg.io.api import read_image, write_image
    from napari_medseg.io.metadata import ImageMeta

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--pixel", type=float, default=0.7, help="pixel size of the rebuilt CT, mm")
    args = p.parse_args(argv)
    card = {c.tag: c for c in list_model_cards()}[TAG]
    model, info = resolve_weights(TAG)
    low, high = info.normalization["low"], info.normalization["high"]
    folder = Path(args.data_root) / "msd_lung_patches"
    names = card.data["training_data"]["val_files"]
    hu = np.stack([low + tifffile.imread(folder / "images" / f"{n}.tif") * (high - low)
                   for n in names]).astype(np.float32)
    labels = np.stack([tifffile.imread(folder / "masks" / f"{n}.tif") for n in names])
    coarse = predict(hu, model, {}, meta=ImageMeta("ZYX", spacing=(2.0, 2.0, 2.0),
                                                   units=("millimeter",) * 3))["mask"]
    side = int(round(hu.shape[-1] * 2.0 / args.pixel))
    fine = np.stack([ndimage.zoom(p, side / hu.shape[-1], order=1, mode="nearest") for p in hu])
    fine_labels = np.stack([ndimage.zoom(m, side / hu.shape[-1], order=0) for m in labels])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct.nii.gz"
        write_image(path, fine, ImageMeta("ZYX", spacing=(2.0, args.pixel, args.pixel),
                                          units=("millimeter",) * 3))
        image, meta = read_image(path)
        image = np.asarray(image)
        rebuilt = predict(image, model, {}, meta=meta)
        native = predict(image, model, {"native_pixels": True}, meta=meta)

    def mean(masks, refs) -> float:
        return round(float(np.mean([_dice(m, r) for m, r in zip(masks, refs)])), 4)

    print(json.dumps({
        "weights": TAG, "patches": len(names), "window_hu": [low, high],
        "dice_patches_2mm": mean(coarse, labels),
        f"dice_nifti_{args.pixel}mm": mean(rebuilt["mask"], fine_labels),
        f"dice_nifti_{args.pixel}mm_not_resampled": mean(native["mask"], fine_labels),
        "notices": list(rebuilt.notices)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
