"""The GPU paths, run for real on a machine with CUDA, in a few minutes; JSON out.

    .venv/bin/python benchmarks/gpu_check.py --out benchmarks/gpu_check.json

What it checks, each in its own ``try`` (one failure is recorded, the rest still run):

* ``networks``: every network's ``lite`` and ``paper`` variant on the GPU, one batch of
  tiles of its preferred size: milliseconds per tile in fp32 and under the engine's
  autocast (bf16 from compute capability 8.0, fp16 from 7.0), and how well they agree
  (largest difference of the foreground probability, share of pixels with the same mask).
  Shipped lite weights are used where they exist (random weights elsewhere).
* ``engine_vs_monai``: the engine's ``predict`` (device ``cuda``, its defaults) against
  MONAI's ``sliding_window_inference`` on the GPU (fp32, tile 256, overlap 0.25, gaussian,
  ``sw_batch_size`` 4), BA-Net lite on a 2048 x 2048 image: seconds (median of 3) and the
  masks' agreement.
* ``oom_fallback``: the out-of-memory recovery triggered for real: the caching allocator is
  capped (``torch.cuda.set_per_process_memory_fraction``) so that a batch of big tiles does
  not fit; the run must halve the batch, then the tile, and finish on the GPU with notices.
* ``memory_vs_plan``: for each lite network on a 2048 x 2048 image, the peak GPU memory of
  the run (``max_memory_allocated`` above what was allocated before) against the plan's
  estimate (model + activations measured by the one-batch probe).

Without CUDA it writes ``{"cuda": false, "status": "no CUDA", ...}`` and exits 0.
``--device cpu --smoke`` runs every step except the allocator cap on the CPU with tiny
variants (random weights) and 256 x 256 images: a check of the script itself, for the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int = 5) -> tuple[float, Any]:
    """Median seconds of ``fn()`` after one warm-up call; returns (seconds, last output)."""
    out = fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Bright blobs on a dim, noisy background (float32)."""
    rng = np.random.default_rng(seed)
    y = np.arange(shape[0], dtype=np.float32)[:, None]
    x = np.arange(shape[1], dtype=np.float32)[None, :]
    blobs = (np.sin(y / 23.0) * np.sin(x / 29.0)) > 0.6
    return (blobs * 200.0 + 20.0 + rng.normal(0, 8, shape)).astype(np.float32)


def _model(name: str, variant: str, device):
    """Shipped lite weights where they exist, else random weights (seeded)."""
    from napari_medseg.engine.checkpoints import list_model_cards, resolve_weights
    from napari_medseg.models import create_model

    if variant == "lite":
        tag = f"{name}_lite_dsb2018"
        if any(c.tag == tag for c in list_model_cards()):
            model, _ = resolve_weights(tag, device="cpu")
            return model.eval().to(device), tag
    model = create_model(name, variant, 1, 2, seed=0)
    return model.eval().to(device), "random"


def check_network(name: str, variant: str, device, batch: int) -> dict:
    """fp32 against the engine's autocast for one batch of tiles."""
    import torch

    from napari_medseg.engine.precision import autocast, resolve_precision
    from napari_medseg.models.spec import HEAD_MASK

    model, weights = _model(name, variant, device)
    spec = model.spec
    tile = (int(spec.preferred_tile),) * spec.spatial_dims
    x = torch.rand((batch, int(spec.in_channels)) + tile, device=device)
    fmt = torch.channels_last if spec.spatial_dims == 2 else torch.channels_last_3d
    model.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    policy = resolve_precision("auto", device)

    def run(half: bool):
        with torch.inference_mode():
            if half:
                with autocast(device, policy):
                    logits = model(x)[HEAD_MASK]
            else:
                logits = model(x)[HEAD_MASK]
            return torch.softmax(logits.float(), dim=1)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s32, p32 = _timed(lambda: run(False), device)
    s16, p16 = _timed(lambda: run(True), device)
    out = {
        "network": name, "variant": variant, "weights": weights, "tile": list(tile),
        "batch": batch, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "autocast": policy.name,
        "fp32_ms_per_tile": round(s32 * 1000 / batch, 2),
        "autocast_ms_per_tile": round(s16 * 1000 / batch, 2),
        "max_abs_prob_diff": round(float((p32 - p16).abs().max()), 5),
        "mask_agreement": round(float((p32.argmax(1) == p16.argmax(1)).float().mean()), 5),
    }
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    model.to("cpu")
    return out


def engine_vs_monai(device, side: int, variant: str = "lite", network: str = "banet") -> dict:
    """The engine's predict against MONAI's sliding window on the same device."""
    import torch
    from monai.inferers import sliding_window_inference

    from napari_medseg.engine.inference.normalization import normalize
    from napari_medseg.engine.inference.pipeline import predict
    from napari_medseg.models.spec import HEAD_MASK

    model, weights = _model(network, variant, device)
    image = _image((side, side))
    if model.spec.in_channels == 3:
        image = np.repeat(image[..., None], 3, axis=-1)
    axes = "YXC" if image.ndim == 3 else "YX"
    dev = str(device)
    engine_s, result = _timed(lambda: predict(image, model, device=dev, axes=axes), device, 3)

    def monai() -> np.ndarray:
        data = normalize(image)
        x = torch.from_numpy(np.ascontiguousarray(
            np.moveaxis(data, -1, 0) if data.ndim == 3 else data[None]))[None].to(device)
        model.to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            logits = sliding_window_inference(x, (256, 256), 4, lambda t: model(t)[HEAD_MASK],
                                              overlap=0.25, mode="gaussian")
        return torch.softmax(logits, 1).argmax(1)[0].to(torch.uint8).cpu().numpy()

    monai_s, monai_mask = _timed(monai, device, 3)
    return {"network": network, "weights": weights, "image": [side, side],
            "engine_s": round(engine_s, 3), "monai_s": round(monai_s, 3),
            "engine_over_monai": round(engine_s / monai_s, 3),
            "engine_precision": result.stats.get("precision"),
            "engine_batch": result.stats.get("batch_size"),
            "mask_agreement": round(float((np.asarray(result["mask"]) == monai_mask).mean()),
                                    5)}


def oom_fallback(device, network: str = "unet_sharp") -> dict:
    """Cap the allocator so a batch of 1024-px tiles cannot fit, then predict with them."""
    import torch

    from napari_medseg.engine.inference.pipeline import predict
    from napari_medseg.engine.inference.planning import plan_prediction

    model, weights = _model(network, "lite", device)
    small = _image((512, 512))
    plan = plan_prediction(small, model, device=str(device), tile=256, batch_size=1,
                           precision="fp32")
    need_256 = plan.activation_bytes + plan.model_bytes  # one 256-px tile, measured
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    cap = base + 3 * need_256  # a 512-px tile (4x a 256 one) cannot fit; 256 px can
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    try:
        image = _image((2048, 2048))
        t0 = time.perf_counter()
        result = predict(image, model, device=str(device), tile=1024, batch_size=4,
                         precision="fp32")
        seconds = time.perf_counter() - t0
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
    notices = [n for n in result.notices if "Out of memory" in n]
    return {"network": network, "weights": weights, "cap_mb": round(cap / 2**20, 1),
            "asked": {"tile": 1024, "batch_size": 4}, "ran": {
                "tile": result.stats["tile"], "batch_size": result.stats["batch_size"],
                "device": result.stats["device"]},
            "notices": notices, "seconds": round(seconds, 2),
            "batch_halved": any("batch size reduced" in n for n in notices),
            "tile_reduced": any("tile reduced" in n for n in notices),
            "stayed_on_gpu": str(result.stats["device"]).startswith("cuda")}


def memory_vs_plan(name: str, device, side: int, variant: str = "lite") -> dict:
    """Peak GPU memory of a predict against the plan's probed estimate."""
    import torch

    from napari_medseg.engine.inference.pipeline import predict
    from napari_medseg.engine.inference.planning import plan_prediction

    model, weights = _model(name, variant, device)
    image = _image((side, side))
    plan = plan_prediction(image, model, device=str(device))
    out = {"network": name, "weights": weights, "image": [side, side],
           "plan_batch": plan.batch_size, "plan_model_mb": round(plan.model_bytes / 2**20, 1),
           "plan_activation_mb": round(plan.activation_bytes / 2**20, 1)}
    estimate = plan.model_bytes + plan.activation_bytes
    if device.type == "cuda":
        model.to("cpu")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = predict(image, model, device=str(device), batch_size=plan.batch_size)
        peak = torch.cuda.max_memory_allocated(device) - base
        out.update(peak_gpu_mb=round(peak / 2**20, 1), estimate_mb=round(estimate / 2**20, 1),
                   peak_over_estimate=round(peak / max(1, estimate), 3),
                   ran_batch=result.stats["batch_size"])
    else:
        predict(image, model, device="cpu", batch_size=plan.batch_size)
        out["estimate_mb"] = round(estimate / 2**20, 1)
    model.to("cpu")
    return out


def _step(report: dict, key: str, fn, *args) -> None:
    t0 = time.perf_counter()
    try:
        value = fn(*args)
    except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others
        value = {"error": f"{type(exc).__name__}: {exc}",
                 "traceback": traceback.format_exc().splitlines()[-6:]}
    if isinstance(value, dict):
        value["check_seconds"] = round(time.perf_counter() - t0, 1)
    if isinstance(report.get(key), list):
        report[key].append(value)
    else:
        report[key] = value
    print(json.dumps({key: value}), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu (smoke)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny variants and small images (checks the script, not the GPU)")
    args = p.parse_args(argv)

    import torch

    report: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cuda": bool(torch.cuda.is_available()),
    }
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        report.update(status="no CUDA",
                      reason="torch.cuda.is_available() is False on this machine "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                             "run this script on a machine with an NVIDIA GPU.")
        return _finish(report, args.out)
    device = torch.device(args.device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        report["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                         "total_gb": round(total / 2**30, 1), "free_gb": round(free / 2**30, 1),
                         "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    t0 = time.perf_counter()
    from napari_medseg.models import list_models

    variants = ("tiny",) if args.smoke else ("lite", "paper")
    report["networks"] = []
    for name in list_models():
        for variant in variants:
            _step(report, "networks", check_network, name, variant, device,
                  2 if args.smoke else 8)
    side = 256 if args.smoke else 2048
    small = "tiny" if args.smoke else "lite"
    _step(report, "engine_vs_monai", engine_vs_monai, device, side, small)
    if device.type == "cuda":
        _step(report, "oom_fallback", oom_fallback, device)
    else:
        report["oom_fallback"] = {"skipped": "the allocator cap needs CUDA"}
    report["memory_vs_plan"] = []
    for name in list_models():
        _step(report, "memory_vs_plan", memory_vs_plan, name, device, side, small)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["status"] = "ok" if not _errors(report) else "errors: " + ", ".join(_errors(report))
    return _finish(report, args.out)


def _errors(report: dict) -> list[str]:
    found = []
    for key, value in report.items():
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict) and "error" in item:
                found.append(key + (f"/{item.get('network', '')}" if "network" in item else ""))
    return found


def _finish(report: dict, out: str | None) -> int:
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main())
