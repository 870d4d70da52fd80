"""Inference speed and memory: our engine against MONAI and against the raw forward pass.

Prints one JSON object. For the lite variant of each network (random weights: speed does not
depend on them), on a 2048 x 2048 image and a 32 x 512 x 512 volume (slice-wise), measured in
one process, each the median of ``--repeats`` runs:

* ``engine_s``: ``napari_medseg.engine.inference.pipeline.predict`` with its defaults (the network's
  tile, overlap 0.125, balanced tiles, gaussian blending, the auto precision: bf16 on CPUs
  with AVX512-BF16, channels-last, the network's CPU batch: 4 or 2), producing the mask;
* ``monai_s``: MONAI's ``sliding_window_inference`` as a user would script it: fp32, the same
  model as ``create_model`` returns it (contiguous memory format: the engine converts the
  shared model to channels-last, so it is converted back before every MONAI run), tile 256,
  overlap 0.25, gaussian blending, ``sw_batch_size=4`` (MONAI's tutorials),
  percentile normalisation first and softmax/argmax after, the float output kept (for volumes
  one slice at a time, collected into a float32 array);
* ``raw_forward_s``: the floor: only the batched forward passes over exactly the tiles, batch
  size, precision and memory format our engine used, measured right before and right after
  each engine run and averaged (``raw_forward_before_s`` / ``raw_forward_after_s``);
* ``monai_channels_last_once_s``: MONAI's script once more, after the rounds, with the model's
  weights converted to channels-last (the engine's memory format; one run, not a median);
* ``engine_fp32_s``: our engine forced to fp32 with tile 256 / overlap 0.25 and the tiles
  kept at 256 (like for like with MONAI: the tiling overhead);
* ``peak_rss_mb`` / ``monai_peak_rss_mb``: the process's peak resident memory during the
  engine's default run / MONAI's run (the kernel's peak mark, reset before each run; a thread
  sampling every 2 ms where that is not possible: ``peak_rss_method``); the ``*_growth_mb``
  keys give the peak's growth over the resident memory at the start of the run (the baseline
  of torch, the networks and MONAI is the same for both and hides the difference).

``--quick`` runs one lite network (BA-Net) on the 2D case, once. ``--memory`` measures instead
the peak memory of a slice-wise run over a float32 zarr volume of ``--size-gib`` GiB (default
2; tiny variant, tile 512), streamed into a zarr store: the input is never loaded whole, so the
peak must stay far below its size.

Usage::

    python benchmarks/bench_inference.py --quick
    python benchmarks/bench_inference.py                      # all networks, ~65 min on 2 cores
    python benchmarks/bench_inference.py --memory --size-gib 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["main"]

#: The network of ``--quick`` and ``--memory``: BA-Net lite was the fastest lite network in
#: bf16 on the reference CPU, and it has a boundary head.
QUICK_NETWORK = "banet"


def _vm_hwm() -> int | None:
    """The kernel's peak resident set (VmHWM) of this process in bytes, or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_vm_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: ``5`` into ``clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _vm_hwm() is not None


class PeakRss:
    """Peak resident memory (MiB) of this process while the block runs.

    On Linux the kernel's own peak mark is reset before the block and read after it: exact,
    and no thread competes with the measured code for the cores or the GIL. Elsewhere a
    thread samples the resident memory every 2 ms (it slowed a 2-core run by about 10 %,
    so figures taken that way are not comparable with unsampled ones such as the floor).
    """

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self._proc = psutil.Process(os.getpid())
        self.interval = interval
        self.peak = 0
        self.method = "VmHWM"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.start = self.peak = self._proc.memory_info().rss
        if not _reset_vm_hwm():
            self.method = "sampled every 2 ms"
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = max(self.peak, _vm_hwm() or 0)
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def delta_mb(self) -> float:
        """Peak growth over the resident memory at the start of the block."""
        return (self.peak - self.start) / 2**20


def measure(fn: Callable[[], object]) -> tuple[dict, object]:
    """One call: wall and CPU seconds, peak RSS and its growth (MiB), and the result.

    CPU seconds (all threads of this process) are much less disturbed than wall seconds
    when other processes share the cores.
    """
    import gc

    gc.collect()
    with PeakRss() as rss:
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"wall": wall, "cpu": cpu, "peak": rss.peak_mb, "growth": rss.delta_mb}, result


def _median(rounds: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def machine() -> dict:
    """The machine the figures were taken on."""
    import torch

    from napari_medseg.engine.precision import cpu_has_native_bf16

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "avx512_bf16": cpu_has_native_bf16(), "torch": torch.__version__,
        "python": platform.python_version(), "load_average": list(os.getloadavg()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def synthetic_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Nuclei-like test data: bright blobs on a dark noisy background (uint16)."""
    rng = np.random.default_rng(seed)
    h, w = shape[-2:]
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    plane = np.full((h, w), 200.0, np.float32)
    for _ in range(max(1, h * w // 4000)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, 14)
        plane += 2000.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    if len(shape) == 2:
        return (plane + rng.normal(0, 30, (h, w))).astype(np.uint16)
    out = np.empty(shape, np.uint16)
    for z in range(shape[0]):
        shift = np.roll(plane, z, axis=1)
        out[z] = np.clip(shift + rng.normal(0, 30, (h, w)), 0, 65535).astype(np.uint16)
    return out


def engine_run(image: np.ndarray, axes: str, model, **settings):
    from napari_medseg.engine.inference.pipeline import predict

    return predict(image, model, axes=axes, **settings)


def monai_run(image: np.ndarray, axes: str, model, tile: int = 256,
              channels_last: bool = False) -> np.ndarray:
    """A user's MONAI script: normalise, sliding_window_inference (fp32, gaussian), argmax.

    ``channels_last`` converts the model's weights to channels-last first (not what a user's
    script does; it shows how much of the engine's fp32 lead is the memory format).
    """
    import torch
    from monai.inferers import sliding_window_inference

    from napari_medseg.engine.inference.normalization import normalize

    def predictor(x):
        return model(x)["mask"]

    data = normalize(image)
    planes = data[None] if axes == "YX" else data
    scale = model.spec.output_scale
    k = model.spec.num_classes
    probs = np.empty((k, planes.shape[0], planes.shape[1] * scale, planes.shape[2] * scale),
                     np.float32)
    model.eval()
    # The user's model as created: the engine's runs leave the shared model channels-last.
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    with torch.no_grad():
        for z, plane in enumerate(planes):
            x = torch.from_numpy(plane)[None, None]
            logits = sliding_window_inference(x, (tile, tile), 4, predictor, overlap=0.25,
                                              mode="gaussian")
            probs[:, z] = torch.softmax(logits, dim=1)[0].numpy()
    mask = probs.argmax(0).astype(np.uint8)
    return mask[0] if axes == "YX" else mask


def raw_forward_run(model, plan) -> dict:
    """Wall and CPU seconds of only the forward passes the engine ran (same tiles, batch,
    precision, memory format)."""
    import torch

    from napari_medseg.engine.precision import autocast, resolve_precision

    device = torch.device("cpu")
    policy = resolve_precision(plan.precision, device)
    c = model.spec.in_channels
    per_plane = plan.tiles_per_plane
    sizes = []
    for _ in range(plan.planes_todo * plan.passes):
        full, rest = divmod(per_plane, plan.batch_size)
        sizes += [plan.batch_size] * full + ([rest] if rest else [])
    x_full = torch.randn((plan.batch_size, c) + tuple(plan.grid.tile))
    if plan.channels_last:
        model.to(memory_format=torch.channels_last)
    wall = cpu = 0.0
    with torch.inference_mode(), autocast(device, policy):
        for n in sizes:
            x = x_full[:n]
            if plan.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            w0, c0 = time.perf_counter(), time.process_time()
            out = model(x)
            out["mask"].float()
            wall += time.perf_counter() - w0
            cpu += time.process_time() - c0
    return {"wall": wall, "cpu": cpu}


def bench_case(name: str, image: np.ndarray, axes: str, repeats: int) -> dict:
    import torch

    from napari_medseg.models import create_model

    torch.manual_seed(0)
    model = create_model(name, variant="lite", in_channels=1, num_classes=2).eval()
    # Warm-up (kernel creation for the batch sizes each method uses: a crop of several
    # tiles, so the engine's probe batch of 1 and its full batches both run), both
    # precisions, and MONAI's import.
    crop = image[..., :512, :512] if axes == "YX" else image[:1, :512, :512]
    engine_run(crop, axes, model)
    engine_run(crop, axes, model, precision="fp32")
    monai_run(crop, axes, model)
    # The four methods run in interleaved rounds, so a change of the machine's load
    # during the benchmark hits them alike; each figure is the median over the rounds.
    runs: dict[str, list[dict]] = {"engine": [], "monai": [], "raw": [], "fp32": [],
                                   "raw_before": [], "raw_after": []}
    result = monai_mask = fp32_result = None
    from napari_medseg.engine.inference.planning import plan_prediction

    default_plan = plan_prediction(image, model, axes=axes, probe=False)
    for _ in range(repeats):
        # The floor on both sides of the engine's run, averaged: the run right after another
        # one finds warm kernels and a warm allocator, so neither side gets that advantage.
        before = raw_forward_run(model, default_plan)
        m, result = measure(lambda: engine_run(image, axes, model))
        m["forward"] = result.stats["forward_seconds"]
        runs["engine"].append(m)
        after = raw_forward_run(model, result.plan)
        runs["raw_before"].append(before)
        runs["raw_after"].append(after)
        runs["raw"].append({k: (before[k] + after[k]) / 2 for k in ("wall", "cpu")})
        m, monai_mask = measure(lambda: monai_run(image, axes, model))
        runs["monai"].append(m)
        m, fp32_result = measure(
            lambda: engine_run(image, axes, model, precision="fp32", tile=256, overlap=0.25,
                               balance=False))
        runs["fp32"].append(m)
    # Once, after the rounds: MONAI with the engine's memory format (weights channels-last).
    m, _ = measure(lambda: monai_run(image, axes, model, channels_last=True))
    monai_cl_s = m["wall"]
    plan = result.plan
    agree = float((np.asarray(fp32_result["mask"]) == monai_mask).mean())
    wall = {k: _median(v, "wall") for k, v in runs.items()}
    cpu = {k: _median(v, "cpu") for k, v in runs.items()}
    return {
        "network": name, "variant": "lite", "shape": list(image.shape), "axes": axes,
        "engine_s": round(wall["engine"], 3), "monai_s": round(wall["monai"], 3),
        "monai_channels_last_once_s": round(monai_cl_s, 3),
        "raw_forward_s": round(wall["raw"], 3), "engine_fp32_s": round(wall["fp32"], 3),
        "peak_rss_mb": round(_median(runs["engine"], "peak"), 1),
        "monai_peak_rss_mb": round(_median(runs["monai"], "peak"), 1),
        "engine_fp32_peak_rss_mb": round(_median(runs["fp32"], "peak"), 1),
        "peak_rss_growth_mb": round(_median(runs["engine"], "growth"), 1),
        "monai_peak_rss_growth_mb": round(_median(runs["monai"], "growth"), 1),
        "engine_fp32_peak_rss_growth_mb": round(_median(runs["fp32"], "growth"), 1),
        # The engine's own time inside the forward passes: engine_s minus this is its
        # overhead (tiling, blending, normalisation, post-processing).
        "engine_forward_s": round(_median(runs["engine"], "forward"), 3),
        "raw_forward_before_s": round(wall["raw_before"], 3),
        "raw_forward_after_s": round(wall["raw_after"], 3),
        "engine_cpu_s": round(cpu["engine"], 3), "monai_cpu_s": round(cpu["monai"], 3),
        "raw_forward_cpu_s": round(cpu["raw"], 3), "engine_fp32_cpu_s": round(cpu["fp32"], 3),
        "engine_over_monai": round(wall["engine"] / wall["monai"], 3),
        "engine_over_raw_forward": round(wall["engine"] / wall["raw"], 3),
        "engine_fp32_over_monai": round(wall["fp32"] / wall["monai"], 3),
        "cpu_time_ratios": {
            "engine_over_monai": round(cpu["engine"] / cpu["monai"], 3),
            "engine_over_raw_forward": round(cpu["engine"] / cpu["raw"], 3),
            "engine_fp32_over_monai": round(cpu["fp32"] / cpu["monai"], 3),
        },
        # Pixels the network computed per plane: the default grid against MONAI's (the
        # like-for-like fp32 run uses MONAI's tile 256 / overlap 0.25 grid).
        "engine_computed_pixels": plan.grid.computed_pixels,
        "monai_grid_computed_pixels": fp32_result.plan.grid.computed_pixels,
        "engine_plan": {"tile": list(plan.grid.tile), "tiles": plan.tiles,
                        "batch_size": plan.batch_size, "precision": plan.precision,
                        "channels_last": plan.channels_last},
        "fp32_mask_agreement_with_monai": round(agree, 5),
    }


def memory_mode(name: str, size_gib: float, variant: str, tile: int) -> dict:
    """Peak RSS of a slice-wise run over a zarr volume of ``size_gib`` streamed to zarr."""
    import torch
    import zarr

    from napari_medseg.engine.inference.pipeline import predict
    from napari_medseg.models import create_model

    side = 1024
    depth = max(2, int(round(size_gib * 2**30 / (side * side * 4))))
    work = Path(tempfile.mkdtemp(prefix="medseg-bench-"))
    src = zarr.open_array(str(work / "in.zarr"), mode="w", shape=(depth, side, side),
                          dtype=np.float32, chunks=(1, side, side))
    plane = synthetic_image((side, side)).astype(np.float32)
    t0 = time.perf_counter()
    for z in range(depth):
        src[z] = np.roll(plane, z, axis=0)
    write_s = time.perf_counter() - t0
    torch.manual_seed(0)
    model = create_model(name, variant=variant, in_channels=1, num_classes=2).eval()
    import gc

    gc.collect()
    with PeakRss() as rss:
        t0 = time.perf_counter()
        result = predict(src, model, axes="ZYX", tile=tile, outputs=("mask", "probabilities"),
                         store=str(work / "out.zarr"), overwrite=True)
        seconds = time.perf_counter() - t0
    store_mb = sum(f.stat().st_size for f in (work / "out.zarr").rglob("*") if f.is_file())
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return {
        "network": name, "variant": variant, "tile": tile,
        "input_shape": [depth, side, side], "input_dtype": "float32",
        "input_gib": round(depth * side * side * 4 / 2**30, 3),
        "input_write_s": round(write_s, 1), "seconds": round(seconds, 1),
        "peak_rss_mb": round(rss.peak_mb, 1), "rss_before_mb": round(rss.start / 2**20, 1),
        "z_consistency": result.stats["z_consistency"],
        "output_store_mb": round(store_mb / 2**20, 1),
        "precision": result.stats["precision"], "tiles": result.plan.tiles,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one lite network, the 2D case, one run")
    parser.add_argument("--networks", help="comma-separated networks (default: all)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds per case (default 3; 1 with --quick)")
    parser.add_argument("--memory", action="store_true", help="the big-zarr memory mode")
    parser.add_argument("--size-gib", type=float, default=2.0, help="volume size (--memory)")
    parser.add_argument("--variant", default="tiny", help="variant for --memory")
    parser.add_argument("--tile", type=int, default=512, help="tile for --memory")
    parser.add_argument("--size", type=int, default=2048, help="side of the 2D image")
    args = parser.parse_args(argv)

    from napari_medseg.models import list_models

    networks = args.networks.split(",") if args.networks else list_models()
    report: dict = {"benchmark": "bench_inference", "machine": machine(),
                    "monai_settings": {"roi_size": 256, "overlap": 0.25, "mode": "gaussian",
                                       "sw_batch_size": 4, "precision": "fp32",
                                       "memory_format": "contiguous"},
                    "peak_rss_method": "VmHWM" if _reset_vm_hwm() else "sampled every 2 ms"}
    default = QUICK_NETWORK if QUICK_NETWORK in networks else networks[0]
    if args.memory:
        name = networks[0] if args.networks else default
        report["memory"] = memory_mode(name, args.size_gib, args.variant, args.tile)
        print(json.dumps(report, indent=2))
        return 0
    if args.quick:
        networks = networks[:1] if args.networks else [default]
        args.repeats = args.repeats or 1
    args.repeats = args.repeats or 3
    image2d = synthetic_image((args.size, args.size))
    volume = None if args.quick else synthetic_image((32, 512, 512), seed=1)
    cases: dict = {}
    for name in networks:
        cases[name] = {f"2d_{args.size}x{args.size}": bench_case(name, image2d, "YX",
                                                                 args.repeats)}
        if volume is not None:
            cases[name]["3d_32x512x512_slicewise"] = bench_case(name, volume, "ZYX",
                                                                args.repeats)
    report["repeats"] = args.repeats
    report["cases"] = cases
    goals = []
    for per_net in cases.values():
        for case in per_net.values():
            goals.append({
                "case": f"{case['network']} {case['shape']}",
                "engine<=0.5xMONAI": case["engine_over_monai"] <= 0.5,
                "engine<=1.1xraw": case["engine_over_raw_forward"] <= 1.1,
                "engine_fp32<=MONAI": case["engine_fp32_over_monai"] <= 1.0,
                "less_memory_than_MONAI": case["peak_rss_mb"] < case["monai_peak_rss_mb"],
                "less_memory_growth_than_MONAI": (case["peak_rss_growth_mb"]
                                                  < case["monai_peak_rss_growth_mb"]),
            })
    report["goals"] = goals
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
