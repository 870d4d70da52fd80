"""Issue #20, points 6, 7 and 9a: one batch run per output folder (a lock a dead run does not
leave stuck, ``run.json`` merged, never lost); a plan reads no pixels and in-memory outputs
larger than the memory available are refused before any work; ``--series`` for a DICOM
folder of several series."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import napari_medseg
from napari_medseg.cli import main
from napari_medseg.engine.batch.run import MANIFEST_NAME, run_folder, run_folder_iter
from napari_medseg.engine.progress import NoticeEvent
from napari_medseg.errors import ConfigError, ImageReadError
from napari_medseg.io import write_image
from napari_medseg.io.synthetic import write_dicom_series
from napari_medseg.models import create_model

FAST = {"device": "cpu", "precision": "fp32", "tile": 64}
RANDOM = {"model": "msa2net", "variant": "tiny", **FAST}
LOCK_NAME = ".medseg-batch.lock"  # engine.batch.lock.LOCK_NAME
SRC = str(Path(napari_medseg.__file__).resolve().parents[1])  # the package under test


def _images(folder: Path, names=("a.tif", "b.tif", "c.tif", "d.tif")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        write_image(folder / name, rng.integers(0, 255, (64, 64), dtype=np.uint8))
    return folder


def _batch_cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "napari_medseg.cli", "batch", str(src), str(out), "--model",
            "msa2net", "--variant", "tiny", "--device", "cpu", "--precision", "fp32",
            "--tile", "64", "-q"]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "PYTHONPATH": SRC, "NAPARI_MEDSEG_HOME": str(tmp_path / "home")}


# -- 6. races --------------------------------------------------------------------------------
def test_a_second_batch_run_into_the_same_folder_is_refused(tmp_path):
    src, out = _images(tmp_path / "in"), tmp_path / "out"
    first = subprocess.Popen(_batch_cmd(src, out), env=_env(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / MANIFEST_NAME).exists():  # the first run holds the folder now
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)  # keep it mid-run while the second one starts
        second = subprocess.run(_batch_cmd(src, out), env=_env(tmp_path), capture_output=True,
                                text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out1, err1 = first.communicate(timeout=300)
    assert second.returncode == 2, second.stderr
    err = second.stderr.strip().splitlines()
    assert err[-1].startswith("napari-medseg: error: Another batch run") and \
        f"pid {first.pid}" in err[-1] and "Traceback" not in second.stderr
    assert first.returncode == 0, err1
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert sorted(manifest["files"]) == ["a.tif", "b.tif", "c.tif", "d.tif"]
    assert {f["status"] for f in manifest["files"].values()} == {"done"}
    assert len(manifest["runs"]) == 1 and not (out / LOCK_NAME).exists()


def test_a_lock_of_a_live_run_refuses_in_process(tmp_path):
    src, out = _images(tmp_path / "in", ("a.tif",)), tmp_path / "out"
    out.mkdir()
    lock = {"pid": os.getppid(), "host": socket.gethostname(), "started": "earlier",
            "token": "x"}
    (out / LOCK_NAME).write_text(json.dumps(lock))
    with pytest.raises(ConfigError, match=f"pid {os.getppid()} on"):
        run_folder(src, out, **RANDOM)
    assert json.loads((out / LOCK_NAME).read_text()) == lock  # not taken from a live run
    assert not (out / MANIFEST_NAME).exists()


def test_a_lock_a_killed_run_left_is_taken_over_with_a_notice(tmp_path):
    src, out = _images(tmp_path / "in", ("a.tif", "b.tif")), tmp_path / "out"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(),
                                             "started": "yesterday", "token": "old"}))
    events = list(run_folder_iter(src, out, **RANDOM))
    notes = [e.message for e in events if isinstance(e, NoticeEvent)]
    assert any(f"Took over the lock of an earlier run (pid {gone.pid}" in n for n in notes)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert {f["status"] for f in manifest["files"].values()} == {"done"}
    assert not (out / LOCK_NAME).exists()


def test_a_lock_whose_pid_now_belongs_to_a_newer_process_is_taken_over(tmp_path):
    src, out = _images(tmp_path / "in", ("a.tif",)), tmp_path / "out"
    out.mkdir()
    newer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({
            "pid": newer.pid, "host": socket.gethostname(), "started": "an hour ago",
            "epoch": time.time() - 3600, "token": "old"}))
        events = list(run_folder_iter(src, out, **RANDOM))
    finally:
        newer.kill()
        newer.wait()
    assert any(isinstance(e, NoticeEvent) and "Took over the lock" in e.message for e in events)
    assert not (out / LOCK_NAME).exists()


def test_run_json_is_merged_with_what_is_on_disk(tmp_path):
    src, out = _images(tmp_path / "in"), tmp_path / "out"
    run_folder(src, out, pattern="[ab]*", **RANDOM)
    run_folder(src, out, pattern="[cd]*", **RANDOM)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert sorted(manifest["files"]) == ["a.tif", "b.tif", "c.tif", "d.tif"]
    assert {f["status"] for f in manifest["files"].values()} == {"done"}
    assert len(manifest["runs"]) == 2 and manifest["runs"][0]["done"] == 2
    # a rerun of the first pattern skips its files and keeps the others' entries
    summary = run_folder(src, out, pattern="[ab]*", **RANDOM)
    assert summary.skipped == 2
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert sorted(manifest["files"]) == ["a.tif", "b.tif", "c.tif", "d.tif"]
    assert len(manifest["runs"]) == 3


# -- 7. plans read no pixels; outputs that cannot fit are refused first ----------------------
class _NoReads:
    """A huge lazy array whose pixels must not be read."""

    shape, dtype, ndim = (100_000, 100_000), np.dtype(np.uint8), 2

    def __getitem__(self, key):
        raise AssertionError(f"a plan read pixels: {key}")


def test_a_plan_reads_no_pixels_of_a_huge_lazy_array():
    from napari_medseg.engine.inference.planning import plan_prediction

    model = create_model("msa2net", "tiny", 1, 2)
    t0 = time.perf_counter()
    plan = plan_prediction(_NoReads(), model, **FAST)
    assert time.perf_counter() - t0 < 60 and plan.probed
    assert plan.tiles_per_plane > 1_000_000 and plan.output_bytes >= 100_000 ** 2


def test_cli_plan_only_of_an_empty_100000_square_zarr(tmp_path, monkeypatch, capsys):
    import zarr

    path = tmp_path / "huge.zarr"
    zarr.create_array(str(path), shape=(100_000, 100_000), chunks=(1024, 1024), dtype="uint8")
    reads, original = [], zarr.Array.__getitem__

    def counting(self, key):
        if all(isinstance(k, slice) and k.start == k.stop for k in key):
            return original(self, key)  # an empty selection (the reader's probe)
        reads.append(key)
        raise AssertionError("a pixel read")

    monkeypatch.setattr(zarr.Array, "__getitem__", counting)
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("napari_medseg.engine.inference.plan.available_memory", lambda: 2 ** 30,
                        raising=False)
    argv = ["predict", str(path), "-o", str(tmp_path / "out"), "--model", "msa2net",
            "--variant", "tiny", "--device", "cpu", "--plan-only", "-q"]
    rc = main(argv + ["--format", "nii"])  # NIfTI is written whole: the plan says so
    out = capsys.readouterr().out
    assert rc == 0 and reads == []
    assert "over the memory budget of 512.0 MiB (50% of the 1.0 GiB available); write them " \
        "to a zarr store instead" in out
    assert main(argv) == 0  # TIFF streams through a store: nothing held, nothing to say
    out = capsys.readouterr().out
    assert "memory budget" not in out and "outputs 0 B" in out and reads == []
    assert "The image holds no data: none of its 9604 chunks is written" in out


def test_a_store_with_nothing_written_is_refused_before_a_long_job(tmp_path, monkeypatch,
                                                                   capsys):
    import zarr

    path = tmp_path / "empty.zarr"
    zarr.create_array(str(path), shape=(512, 512), chunks=(256, 256), dtype="uint8")
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    rc = main(["predict", str(path), "-o", str(tmp_path / "out"), "--model", "msa2net",
               "--variant", "tiny", "--device", "cpu", "--format", "zarr", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: The image holds no data: none of its 4 chunks is written, so " \
        "every pixel is the store's fill value; write the image first" in err
    assert "Traceback" not in err and not (tmp_path / "out" / "empty.zarr").exists()
    from napari_medseg.engine.inference.pipeline import predict
    from napari_medseg.errors import InputShapeError

    with pytest.raises(InputShapeError, match="none of its 4 chunks is written"):
        predict(zarr.open_array(str(path), mode="r"), create_model("msa2net", "tiny", 1, 2),
                **FAST)
    zarr.open_array(str(path), mode="r+")[:1, :1] = 7  # one chunk written: it runs
    assert main(["predict", str(path), "-o", str(tmp_path / "out"), "--model", "msa2net",
                 "--variant", "tiny", "--device", "cpu", "--format", "zarr", "-q"]) == 0


def test_outputs_larger_than_the_memory_available_are_refused_before_any_work(
        tmp_path, monkeypatch, capsys):
    from napari_medseg.engine.inference import pipeline
    from napari_medseg.engine.inference.predictor import OutOfMemory

    monkeypatch.setattr("napari_medseg.engine.inference.plan.available_memory", lambda: 1000,
                        raising=False)
    model = create_model("msa2net", "tiny", 1, 2)
    image = np.zeros((128, 128), np.uint8)
    events = []
    with pytest.raises(OutOfMemory, match=r"outputs would hold 16\.0 KiB in memory, over the "
                                          r"memory budget of 500 B \(50% of the 1000 B "
                                          r"available\); write them to a zarr store"):
        for event in pipeline.predict_iter(image, model, **FAST):
            events.append(event)
    assert not any(type(e).__name__ in ("PlanEvent", "TilesEvent") for e in events)
    streamed = pipeline.predict(image, model, store=str(tmp_path / "o.zarr"), **FAST)
    assert streamed["mask"].shape == (128, 128)  # a store holds nothing in memory
    write_image(tmp_path / "img.tif", image)
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    argv = ["predict", str(tmp_path / "img.tif"), "--model", "msa2net", "--variant", "tiny",
            "--device", "cpu", "-q"]
    rc = main(argv + ["-o", str(tmp_path / "out" / "img.nii.gz")])  # NIfTI cannot stream
    err = capsys.readouterr().err
    assert rc == 2 and "over the memory budget of 500 B, and img.nii.gz cannot be written " \
        "slice by slice; write zarr instead" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert main(argv + ["-o", str(tmp_path / "out")]) == 0  # TIFF streams through a store
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img_mask.tif"]


# -- 9a. a DICOM folder of two series ----------------------------------------------------------
def test_dicom_folder_of_two_series_lists_them_and_series_picks_one(tmp_path, ct_volume,
                                                                    monkeypatch, capsys):
    folder = tmp_path / "two"
    write_dicom_series(folder, ct_volume[0][:3], series_uid="1.2.826.0.1.1",
                       description="first")
    write_dicom_series(folder / "b", ct_volume[0][:4], series_uid="1.2.826.0.1.2",
                       description="second")
    for f in (folder / "b").iterdir():
        f.rename(folder / f"b_{f.name}")
    (folder / "b").rmdir()
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    argv = ["predict", str(folder), "-o", str(tmp_path / "out.tif"), "--model", "msa2net",
            "--variant", "tiny", "--device", "cpu", "--tile", "64", "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "1.2.826.0.1.1" in err and "1.2.826.0.1.2" in err and "'second', 4 files" in err
    assert "--series UID" in err
    assert main(argv + ["--series", "1.2.826.0.1.2"]) == 0
    from napari_medseg.io import read_image

    mask, _ = read_image(tmp_path / "out.tif")
    assert mask.shape[0] == 4
    with pytest.raises(ImageReadError, match="holds no DICOM series 9.9"):
        read_image(folder, series="9.9")
