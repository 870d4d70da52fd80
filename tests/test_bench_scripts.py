"""Issue #23: the benchmark scripts run and print JSON (the figures are theirs, not the tests').

``gpu_check.py`` on a machine without CUDA exits cleanly with a JSON saying so; its steps run
on the CPU in ``--smoke`` mode; ``bench_memory.py`` measures the CLI's peak memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = dict(os.environ, **(env or {}))
    environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src")] + [p for p in [environ.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *argv],
                          capture_output=True, text=True, env=environ, check=False,
                          timeout=900)


def test_gpu_check_without_cuda_exits_cleanly_with_a_json_saying_so(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _script("gpu_check.py", "--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout)
    assert printed["cuda"] is False and printed["status"] == "no CUDA"
    assert "torch.cuda.is_available() is False" in printed["reason"]
    assert json.loads(out.read_text()) == printed
    assert "networks" not in printed and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_gpu_check_steps_run_on_the_cpu_in_smoke_mode(tmp_path):
    proc = _script("gpu_check.py", "--device", "cpu", "--smoke")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["status"] == "ok", report
    from napari_medseg.models import list_models

    assert sorted(n["network"] for n in report["networks"]) == sorted(list_models())
    assert all(n["mask_agreement"] > 0.9 and n["fp32_ms_per_tile"] > 0
               for n in report["networks"])
    assert report["engine_vs_monai"]["mask_agreement"] > 0.9
    assert len(report["memory_vs_plan"]) == len(list_models())
    assert report["oom_fallback"] == {"skipped": "the allocator cap needs CUDA"}


@pytest.mark.slow
def test_bench_memory_measures_each_format(tmp_path):
    out = tmp_path / "memory.json"
    proc = _script("bench_memory.py", "--volumes", "", "--planes", "256", "--formats",
                   "zarr,tif", "--weights", "", "--extra", "--model banet --variant tiny",
                   "--work", str(tmp_path / "work"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    cases = {c["format"]: c for c in report["cases"]}
    assert set(cases) == {"zarr", "tif"}
    assert all(c["rc"] == 0 and c["peak_rss_mb"] > 100 and c["shape"] == [256, 256]
               for c in cases.values())
