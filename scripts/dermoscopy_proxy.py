"""Out-of-device proxy for dermoscopy weights: PH2's held-out photographs as other
dermoscopes and clinics would give them, and the weights scored on both.

    python scripts/dermoscopy_proxy.py --data-root ../shared/data [--weights TAG|PATH]

PH2 comes from one dermoscope in one clinic. A user's camera differs in resolution, white
balance, colour rendering, lighting, sharpness and compression. Each "device" below is one
such camera; its settings vary a little from photograph to photograph (a seeded draw), and it
is applied to the held-out images of the weights' card only (never to training images):

- ``phone``: a phone dermatoscope attachment, 0.55x the resolution, warm white balance,
  stronger saturation, vignetting, blur sigma 1.2, JPEG quality 55;
- ``clinic``: a higher-resolution camera, 1.35x, cool white balance, desaturated, brighter
  (gamma 0.8), slight blur, JPEG quality 75;
- ``polarised``: a polarised-light dermatoscope, 0.8x, magenta cast, darker (gamma 1.3),
  uneven light from one side, JPEG quality 65.

Prints JSON: Dice (mean over images) on PH2's held-out images, per device, on the whole
proxy, per diagnosis, and the gap PH2 - proxy. ``--out`` keeps the proxy images.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TAG = "sa2net_lite_ph2"

#: Per device: resolution factor, RGB gains, saturation, gamma, vignetting, one-sided light,
#: blur sigma and JPEG quality.
DEVICES = {
    "phone": {"scale": 0.55, "gains": (1.10, 1.0, 0.82), "saturation": 1.3, "gamma": 1.0,
              "vignette": 0.35, "side_light": 0.0, "blur": 1.2, "jpeg": 55},
    "clinic": {"scale": 1.35, "gains": (0.90, 1.0, 1.12), "saturation": 0.7, "gamma": 0.8,
               "vignette": 0.1, "side_light": 0.0, "blur": 0.6, "jpeg": 75},
    "polarised": {"scale": 0.8, "gains": (1.08, 0.88, 1.05), "saturation": 1.0,
                  "gamma": 1.3, "vignette": 0.0, "side_light": 0.3, "blur": 0.0, "jpeg": 65},
}


def _jitter(value: float, rng: np.random.Generator, spread: float = 0.08) -> float:
    return float(value * rng.uniform(1 - spread, 1 + spread))


def as_device(image: np.ndarray, mask: np.ndarray, device: dict,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One photograph (H x W x 3 uint8) and its mask as ``device`` would give them."""
    scale = _jitter(device["scale"], rng)
    h, w = image.shape[:2]
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    img = Image.fromarray(image).resize(size, Image.Resampling.BICUBIC)
    out_mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    x = np.asarray(img, np.float32) / 255.0
    x = x * np.array([_jitter(g, rng, 0.04) for g in device["gains"]], np.float32)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + _jitter(device["saturation"], rng, 0.05) * (x - grey)
    x = np.clip(x, 0, 1) ** _jitter(device["gamma"], rng, 0.05)
    yy, xx = np.mgrid[-1:1:complex(0, x.shape[0]), -1:1:complex(0, x.shape[1])]
    if device["vignette"]:
        x = x * (1 - _jitter(device["vignette"], rng) * np.clip((xx**2 + yy**2) / 2, 0, 1))[..., None]
    if device["side_light"]:
        angle = rng.uniform(0, 2 * np.pi)
        x = x * (1 + device["side_light"] * (np.cos(angle) * xx + np.sin(angle) * yy) / 2)[..., None]
    img = Image.fromarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8))
    if device["blur"]:
        img = img.filter(ImageFilter.GaussianBlur(_jitter(device["blur"], rng)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(device["jpeg"]))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), out_mask


def build_proxy(folder: Path, names: list[str], out: Path, seed: int = 0) -> dict[str, Path]:
    """Write ``out/<device>/images|masks`` for the named PH2 photographs; returns the device
    folders (and ``ph2``: the photographs as they are)."""
    rng = np.random.default_rng(seed)
    folders = {}
    for device in ["ph2", *DEVICES]:
        (out / device / "images").mkdir(parents=True, exist_ok=True)
        (out / device / "masks").mkdir(parents=True, exist_ok=True)
        folders[device] = out / device
    for name in names:
        image = tifffile.imread(folder / "images" / f"{name}.tif")
        mask = tifffile.imread(folder / "masks" / f"{name}.tif")
        shutil.copy(folder / "images" / f"{name}.tif", out / "ph2" / "images")
        shutil.copy(folder / "masks" / f"{name}.tif", out / "ph2" / "masks")
        for device, settings in DEVICES.items():
            img, msk = as_device(image, mask, settings, rng)
            tifffile.imwrite(out / device / "images" / f"{name}.tif", img,
                             photometric="rgb")
            tifffile.imwrite(out / device / "masks" / f"{name}.tif", msk)
    return folders


def score(model, folders: dict[str, Path], diagnosis: dict[str, str], config=None) -> dict:
    """Mean Dice per folder, over the proxy, per diagnosis, and the gap PH2 - proxy
    (``config``: the prediction settings, a :class:`PredictConfig`; the defaults if None)."""
    from napari_medseg.engine.training.evaluate import evaluate

    out: dict = {"dice": {}, "by_diagnosis": {}}
    proxy_rows = []
    for device, folder in folders.items():
        rows = evaluate(model, folder / "images", folder / "masks", config).rows
        dice = [r.scores["dice"] for r in rows if r.scores]
        out["dice"][device] = round(float(np.mean(dice)), 4)
        if device != "ph2":
            proxy_rows += rows
        for r in rows:
            key = f"{'ph2' if device == 'ph2' else 'proxy'}/{diagnosis.get(Path(r.name).stem)}"
            out["by_diagnosis"].setdefault(key, []).append(r.scores["dice"])
    out["dice"]["proxy"] = round(float(np.mean([r.scores["dice"] for r in proxy_rows])), 4)
    out["gap_ph2_minus_proxy"] = round(out["dice"]["ph2"] - out["dice"]["proxy"], 4)
    out["by_diagnosis"] = {k: {"dice": round(float(np.mean(v)), 4), "n": len(v)}
                           for k, v in sorted(out["by_diagnosis"].items())}
    return out


def main(argv: list[str] | None = None) -> int:
    from napari_medseg.engine.checkpoints import resolve_weights

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--weights", default=DEFAULT_TAG, help="a tag or a checkpoint path")
    p.add_argument("--out", help="keep the proxy images in this folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tta", action="store_true", help="predict with flip test-time augmentation")
    args = p.parse_args(argv)
    folder = Path(args.data_root) / "ph2_dermoscopy"
    model, info = resolve_weights(args.weights)
    names = list(info.training_data.get("val_files") or [])
    if not names:
        raise SystemExit(f"{args.weights} records no held-out images to build the proxy from.")
    with open(folder / "labels.csv", newline="") as fh:
        diagnosis = {row["name"]: row["clinical_diagnosis"] for row in csv.DictReader(fh)}
    tmp = None if args.out else tempfile.TemporaryDirectory()
    out = Path(args.out or tmp.name)
    try:
        folders = build_proxy(folder, names, out, args.seed)
        from napari_medseg.config import PredictConfig

        result = score(model, folders, diagnosis, PredictConfig(tta=args.tta))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(json.dumps({"weights": args.weights, "images": len(names), "tta": args.tta,
                      "devices": sorted(DEVICES), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
