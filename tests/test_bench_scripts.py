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

import numpy as np
import pytest

from napari_medseg.config import FinetuneConfig

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


def test_bench_weights_defaults_times_the_default_run_against_no_flips(tmp_path):
    proc = _script("bench_weights_defaults.py", "--data-root", str(tmp_path), "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    (row,) = report["images"].values()  # no data under tmp_path: the bundled sample
    assert report["weights"] == "sa2net_lite_dsb2018" and row["shape"] == [256, 256]
    assert row["tta"] is True and row["default_s"] > 0 and row["no_tta_s"] > 0


def _fake_data_root(root: Path) -> None:
    """Three H&E crops and one fluorescence image as ``<root>/dsb2018_nuclei``."""
    import tifffile

    from napari_medseg.io.samples import load_sample

    images, masks = root / "dsb2018_nuclei" / "images", root / "dsb2018_nuclei" / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    he, meta, he_labels = load_sample("nuclei_he")
    assert meta.axes == "YXC"
    he, he_labels = np.asarray(he), np.asarray(he_labels)
    for i, (y, x) in enumerate([(0, 0), (0, 192), (128, 96)]):
        tifffile.imwrite(images / f"he{i}.tif", he[y:y + 128, x:x + 128], photometric="rgb")
        tifffile.imwrite(masks / f"he{i}.tif", he_labels[y:y + 128, x:x + 128])
    fluo, _, fluo_labels = load_sample("nuclei")
    tifffile.imwrite(images / "fluo.tif", np.asarray(fluo))
    tifffile.imwrite(masks / "fluo.tif", np.asarray(fluo_labels))


@pytest.mark.slow
def test_bench_finetune_scores_an_unseen_type_before_and_after_and_skips_an_absent_one(
        tmp_path):
    from napari_medseg.engine.checkpoints import list_model_cards

    _fake_data_root(tmp_path / "data")
    cards = {c.tag: c for c in list_model_cards()}
    checkpoint = cards["sa2net_lite_dsb2018"].weights_path()
    if checkpoint is None or not Path(checkpoint).is_file():
        pytest.skip("the shipped sa2net_lite_dsb2018 weights are not installed")
    out = tmp_path / "finetune.json"
    proc = _script(
        "bench_finetune.py", "--data-root", str(tmp_path / "data"),
        "--cases", "nuclei_no_he,nuclei_no_bf", "--base-no-he", str(checkpoint),
        "--base-no-bf", "sa2net_lite_dsb2018", "--n-train", "2", "--set", "steps=2",
        "--set", "val_every=1", "--set", "batch_size=2", "--set", "patch=64",
        "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    assert report["recipe"] == {"steps": 2, "val_every": 1, "batch_size": 2, "patch": 64}
    assert report["config"]["steps"] == 2 and report["config"]["lr"] == FinetuneConfig().lr
    assert report["n_train"] == 2 and report["seed"] == 0
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch"]
    he = report["cases"]["nuclei_no_he"]
    assert he["type"] == "H&E" and he["base"] == str(checkpoint)
    assert len(he["trained_on"]) == 2 and set(he["trained_on"]) < {"he0", "he1", "he2"}
    assert he["scored"] == 1
    for when in ("before", "after"):
        assert set(he[when]) == {"dice", "ap_iou50"}
        assert all(0.0 <= v <= 1.0 for v in he[when].values()), he
    assert he["gain"]["dice"] == pytest.approx(he["after"]["dice"] - he["before"]["dice"],
                                               abs=1e-3)
    assert he["steps_done"] <= 2 and he["stopped"] in ("finished", "early_stop")
    assert he["minutes"] > 0
    bf = report["cases"]["nuclei_no_bf"]
    assert list(bf) == ["skipped"] and "bright-field" in bf["skipped"], bf
