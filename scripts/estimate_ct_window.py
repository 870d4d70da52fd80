"""Estimate the Hounsfield window the MSD lung patches were mapped to [0, 1] with.

The source (see ``../shared/data/msd_lung_patches/README.md``) says only that the 2 mm
patches were "windowed/normalised to [0, 1]". A linear window maps HU ``h`` to
``(h - low) / (high - low)``, clipped, so two tissues of known density fix it: the modes of
the patches' histogram for aerated lung parenchyma (about -850 HU) and for soft tissue
(muscle, tumour, unenhanced blood: about +40 HU). Prints JSON: both modes, the HU assumed
for them, the window, and how much of the data sits at the clipped ends.

    python scripts/estimate_ct_window.py --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import tifffile

#: Reference densities (HU) of the two tissues whose histogram modes fix the window.
LUNG_HU, SOFT_TISSUE_HU = -850.0, 40.0
#: Where to look for each mode, in the windowed [0, 1] values.
LUNG_RANGE, SOFT_RANGE = (0.02, 0.5), (0.6, 0.88)


def _mode(values: np.ndarray, lo: float, hi: float) -> float:
    """The histogram mode of ``values`` within [lo, hi) (bins of 0.005, smoothed over 5)."""
    hist, edges = np.histogram(values, bins=int(round((hi - lo) / 0.005)), range=(lo, hi))
    smooth = np.convolve(hist, np.ones(5) / 5, mode="same")
    i = int(np.argmax(smooth))
    return float((edges[i] + edges[i + 1]) / 2)


def estimate(values: np.ndarray) -> dict:
    """The window (low, high) in HU that puts the two modes at their reference densities."""
    lung, soft = _mode(values, *LUNG_RANGE), _mode(values, *SOFT_RANGE)
    width = (SOFT_TISSUE_HU - LUNG_HU) / (soft - lung)
    low = LUNG_HU - lung * width
    return {"lung_mode": round(lung, 4), "soft_tissue_mode": round(soft, 4),
            "assumed_hu": {"lung": LUNG_HU, "soft_tissue": SOFT_TISSUE_HU},
            "window_hu": [round(low), round(low + width)],
            "at_low_end": round(float((values <= 0).mean()), 4),
            "at_high_end": round(float((values >= 1).mean()), 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared"
                                              / "data"))
    args = p.parse_args(argv)
    files = sorted((Path(args.data_root) / "msd_lung_patches" / "images").glob("*.tif"))
    if not files:
        raise SystemExit(f"No patches under {args.data_root}/msd_lung_patches/images.")
    values = np.concatenate([tifffile.imread(f).ravel() for f in files])
    print(json.dumps({"patches": len(files), **estimate(values)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
