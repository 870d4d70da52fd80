"""Rebuild the shipped sample images in src/napari_medseg/_samples from ../shared/data.

Usage: .venv/bin/python scripts/make_samples.py [--data /work/shared/data]

Every file is written through napari_medseg.io (OME-TIFF with spacing and units), so the
samples also exercise the reader. ATTRIBUTION.md is written by hand, not by this script.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile

from napari_medseg.io import ImageMeta, write_image, write_labels
from napari_medseg.resources import samples_dir

NUCLEI = "04acab7636c4cf61"  # grey fluorescence, 256 x 256
NUCLEI_HE = "3bfa8b3b01fd24a2"  # H&E-like tissue, 256 x 320
DERMOSCOPY = "IMD405"  # melanoma, 576 x 768 -> 288 x 384
EM_SLICES, EM_CROP = slice(0, 5), (slice(128, 384), slice(128, 384))
CT_MIN_FRACTION = 0.05
CT_COUNT = 6


def _box_half(image: np.ndarray) -> np.ndarray:
    """Halve Y and X by 2 x 2 averaging (crop to even sizes first)."""
    h, w = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
    image = image[:h, :w].astype(np.float32)
    out = image.reshape(h // 2, 2, w // 2, 2, *image.shape[2:]).mean(axis=(1, 3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    args = parser.parse_args()
    out = samples_dir()
    out.mkdir(parents=True, exist_ok=True)

    dsb = args.data / "dsb2018_nuclei"
    grey = tifffile.imread(dsb / "images" / f"{NUCLEI}.tif")[..., 0]  # R = G = B
    write_image(out / "nuclei.tif", grey, ImageMeta(axes="YX", extra={"sample": NUCLEI}))
    write_labels(out / "nuclei_mask.tif", tifffile.imread(dsb / "masks" / f"{NUCLEI}.tif"))
    rgb = tifffile.imread(dsb / "images" / f"{NUCLEI_HE}.tif")
    write_image(out / "nuclei_he.tif", rgb, ImageMeta(axes="YXC", rgb=True, extra={"sample": NUCLEI_HE}))
    write_labels(out / "nuclei_he_mask.tif", tifffile.imread(dsb / "masks" / f"{NUCLEI_HE}.tif"))

    em = args.data / "isbi2012_em"
    name = "isbi2012_train_z00-21"
    em_meta = ImageMeta(axes="ZYX", spacing=(50.0, 4.0, 4.0), units=("nm",) * 3, extra={"sample": name})
    index = (EM_SLICES, *EM_CROP)
    write_image(out / "em_stack.tif", tifffile.imread(em / "images" / f"{name}.tif")[index], em_meta)
    write_labels(out / "em_stack_mask.tif", tifffile.imread(em / "masks" / f"{name}.tif")[index], em_meta)

    ph2 = args.data / "ph2_dermoscopy"
    image = tifffile.imread(ph2 / "images" / f"{DERMOSCOPY}.tif")
    mask = tifffile.imread(ph2 / "masks" / f"{DERMOSCOPY}.tif")
    small = np.clip(np.round(_box_half(image)), 0, 255).astype(np.uint8)
    small_mask = (_box_half(mask) >= 0.5).astype(np.uint8)
    derm_meta = ImageMeta(axes="YXC", rgb=True, extra={"sample": DERMOSCOPY, "downsampled": 2})
    write_image(out / "dermoscopy.tif", small, derm_meta)
    write_labels(out / "dermoscopy_mask.tif", small_mask)

    lung = args.data / "msd_lung_patches"
    names = sorted(p.stem for p in (lung / "masks").glob("lung_val_*.tif"))
    chosen: list[str] = []
    for n in names[::5]:  # spread over the patients (names are grouped by patient)
        m = tifffile.imread(lung / "masks" / f"{n}.tif")
        if m.mean() >= CT_MIN_FRACTION:
            chosen.append(n)
        if len(chosen) == CT_COUNT:
            break
    patches = np.stack([tifffile.imread(lung / "images" / f"{n}.tif") for n in chosen]).astype(np.float32)
    masks = np.stack([tifffile.imread(lung / "masks" / f"{n}.tif") for n in chosen]).astype(np.uint8)
    ct_meta = ImageMeta(axes="IYX", spacing=(2.0, 2.0), units=("mm", "mm"), extra={"patches": chosen})
    write_image(out / "ct_patches.tif", patches, ct_meta)
    write_labels(out / "ct_patches_mask.tif", masks, ct_meta)

    total = 0
    for path in sorted(out.glob("*.tif")):
        total += path.stat().st_size
        print(f"{path.name:<24} {path.stat().st_size / 1024:8.1f} KiB")
    print(f"{'total':<24} {total / 1024:8.1f} KiB; CT patches: {', '.join(chosen)}")


if __name__ == "__main__":
    main()
