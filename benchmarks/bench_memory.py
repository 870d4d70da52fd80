"""Peak memory of the default ``napari-medseg predict`` call against the image's size.

For each volume (0.25, 0.5, 1 and 2 GiB of float32: 4, 8, 16 and 32 slices of 4096 x 4096)
and each plane (4096^2, 16384^2, 32768^2 float32) a zarr input is made once (a smooth
pattern with noise, written chunk by chunk), then for each output format the default call

    napari-medseg predict IN.zarr -o OUT.<zarr|tif|nii.gz> --weights W -q

runs in its own process; its peak resident memory (``ru_maxrss`` of the child, read by a
wrapper process that runs nothing else) and wall time are recorded. The issue's case,
``--outputs mask,probabilities`` on the 1 GiB volume into zarr, is run too, and killed midway
then re-run to show it resumes (``--resume-check``).

Prints JSON and writes it to ``--out`` after every case, so a long run keeps what it measured.

    .venv/bin/python benchmarks/bench_memory.py                       # everything (hours on 2 cores)
    .venv/bin/python benchmarks/bench_memory.py --volumes 1 --planes "" --formats zarr \
        --outputs mask,probabilities                                  # the issue's case only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIDE = 4096
SUFFIX = {"zarr": ".zarr", "tif": ".tif", "nii": ".nii.gz"}

#: Runs a command and prints the child's peak RSS (kB) and wall time as JSON on stdout.
WRAPPER = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
err = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
resumed = [ln.strip() for ln in proc.stderr.splitlines() if "Resuming" in ln]
print(json.dumps({"rc": proc.returncode, "peak_rss_kb": peak, "wall_s": round(wall, 1),
                  "error": err[-1] if err else None, "resumed": resumed[0] if resumed else None}))
"""


def make_input(path: Path, shape: tuple[int, ...], seed: int = 0) -> Path:
    """A float32 zarr of ``shape`` (chunks of one slice x 1024 x 1024), written band by band:
    bright blobs on a dim background with noise, so the mask is neither empty nor full."""
    import zarr

    if (path / "zarr.json").is_file():
        return path
    chunks = (1,) * (len(shape) - 2) + (1024, 1024)
    arr = zarr.create_array(str(path), shape=shape, chunks=chunks, dtype="float32",
                            overwrite=True)
    rng = np.random.default_rng(seed)
    height, width = shape[-2:]
    x = np.arange(width, dtype=np.float32)
    for index in np.ndindex(*shape[:-2]) if len(shape) > 2 else [()]:
        for y0 in range(0, height, 1024):
            y = np.arange(y0, min(y0 + 1024, height), dtype=np.float32)[:, None]
            blobs = (np.sin(y / 23.0 + sum(index)) * np.sin(x / 29.0)) > 0.6
            band = blobs * 200.0 + 20.0 + rng.normal(0, 8, blobs.shape).astype(np.float32)
            arr[index + (slice(y0, y0 + band.shape[0]), slice(None))] = band.astype(np.float32)
    return path


def measure(argv: list[str], env: dict) -> dict:
    """Run ``napari-medseg argv`` under the wrapper; returns rc, peak RSS (MB), wall time."""
    cmd = [sys.executable, "-c", WRAPPER, sys.executable, "-m", "napari_medseg.cli", *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    data["peak_rss_mb"] = round(data.pop("peak_rss_kb") / 1024, 1)
    return data


def resume_check(src: Path, out: Path, base: list[str], env: dict, kill_after: float) -> dict:
    """Kill a run (SIGKILL) once the store records a finished slice, run it again, and
    report what the second run found and how long each took."""
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "napari_medseg.cli", "predict", str(src), "-o", str(out),
            *base]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finished: list = []
    while proc.poll() is None and time.perf_counter() - t0 < kill_after:
        try:
            attrs = json.loads((out / "zarr.json").read_text())["attributes"]["napari_medseg"]
            finished = attrs.get("finished", [])
        except (OSError, ValueError, KeyError):
            finished = []
        if len(finished) >= 2:
            break
        time.sleep(1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = round(time.perf_counter() - t0, 1)
    second = measure(["predict", str(src), "-o", str(out), *base], env)
    return {"killed_after_s": killed_at, "slices_finished_when_killed": len(finished),
            "rerun": second}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/medseg-bench-memory", help="inputs and outputs")
    p.add_argument("--weights", default="banet_lite_dsb2018",
                   help='weights tag or checkpoint; "" with --extra "--model banet --variant '
                        'tiny" sweeps the sizes faster (random weights: memory, not masks)')
    p.add_argument("--volumes", default="0.25,0.5,1,2", help="GiB, comma-separated")
    p.add_argument("--planes", default="4096,16384,32768",
                   help="sides, comma-separated; ROWSxCOLS for a strip")
    p.add_argument("--formats", default="zarr,tif,nii")
    p.add_argument("--outputs", default=None, help="extra --outputs (default: the default)")
    p.add_argument("--issue-case", action="store_true",
                   help="also the 1 GiB volume with --outputs mask,probabilities into zarr")
    p.add_argument("--resume-check", action="store_true",
                   help="kill the issue's case midway and run it again")
    p.add_argument("--extra", default="", help="more predict flags, space-separated")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "memory.json"))
    args = p.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get(
        "PYTHONPATH", ""))
    base = (["--weights", args.weights] if args.weights else []) + ["-q", *args.extra.split()]
    if args.outputs:
        base += ["--outputs", args.outputs]
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf(
                        "SC_PHYS_PAGES") / 2**30, 1)},
        "weights": args.weights, "flags": base, "cases": [],
    }

    def save() -> None:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    inputs = []
    for gib in filter(None, args.volumes.split(",")):
        slices = max(1, round(float(gib) * 2**30 / (SIDE * SIDE * 4)))
        inputs.append((f"volume {gib} GiB", (slices, SIDE, SIDE)))
    for side in filter(None, args.planes.split(",")):
        if "x" in side:  # ROWSxCOLS: a strip as wide as a big plane (the peak follows width)
            rows, cols = (int(n) for n in side.split("x"))
            inputs.append((f"strip {rows} x {cols}", (rows, cols)))
        else:
            inputs.append((f"plane {side}^2", (int(side), int(side))))
    for label, shape in inputs:
        src = make_input(work / f"in_{'x'.join(map(str, shape))}.zarr", shape)
        for fmt in filter(None, args.formats.split(",")):
            out = work / f"out_{'x'.join(map(str, shape))}{SUFFIX[fmt]}"
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(
                missing_ok=True)
            case = {"input": label, "shape": list(shape),
                    "input_gib": round(float(np.prod(shape)) * 4 / 2**30, 3), "format": fmt,
                    **measure(["predict", str(src), "-o", str(out), *base], env)}
            report["cases"].append(case)
            print(json.dumps(case), flush=True)
            save()
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(
                missing_ok=True)
    if args.issue_case or args.resume_check:
        shape = (16, SIDE, SIDE)
        src = make_input(work / f"in_{'x'.join(map(str, shape))}.zarr", shape)
        out = work / "big_out.zarr"
        issue = base + ["--outputs", "mask,probabilities"]
        shutil.rmtree(out, ignore_errors=True)
        if args.issue_case:
            case = {"input": "issue case: volume 1 GiB, --outputs mask,probabilities",
                    "shape": list(shape), "format": "zarr",
                    **measure(["predict", str(src), "-o", str(out), *issue], env)}
            report["issue_case"] = case
            print(json.dumps(case), flush=True)
            save()
        if args.resume_check:
            report["resume"] = resume_check(src, out, issue, env, kill_after=3600)
            print(json.dumps(report["resume"]), flush=True)
            save()
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(report, indent=1))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
