"""Batch runs over a folder: failures reported, re-runs skip, cancel and crashes leave nothing
half-written, threads and a Dask LocalCluster give the same outputs as a local run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_medseg.config import BatchConfig
from napari_medseg.engine.batch.run import (
    MANIFEST_NAME,
    PARTIAL_PREFIX,
    BatchSummary,
    FileEvent,
    find_images,
    run_folder,
    run_folder_iter,
)
from napari_medseg.engine.checkpoints import save_checkpoint
from napari_medseg.engine.inference.pipeline import predict
from napari_medseg.engine.progress import (
    CancelledEvent,
    CancelToken,
    FinishedEvent,
    NoticeEvent,
    TilesEvent,
)
from napari_medseg.errors import ConfigError, ImageReadError, ImageWriteError
from napari_medseg.io import ImageMeta, read_image, write_image

#: Fast, deterministic settings for every run here.
FAST = {"device": "cpu", "precision": "fp32", "tile": 64}
GOOD = ("a.tif", "b.png", "c.tif")
BAD = ("corrupt.tif", "fake.tif")


def _blobs(shape, seed) -> np.ndarray:
    """Bright discs on a dark background (uint8), something a network can see."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = rng.normal(30, 5, shape)
    for _ in range(6):
        cy, cx, r = rng.uniform(8, shape[0] - 8), rng.uniform(8, shape[1] - 8), rng.uniform(4, 9)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 150
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, str]:
    """A tiny 2-class msa2net checkpoint whose masks are not all one class on the blobs.

    Random weights can give a constant mask; a few seeds are tried so the equality tests
    below compare real masks.
    """
    from napari_medseg.models import create_model

    folder = tmp_path_factory.mktemp("ckpt")
    probe = _blobs((64, 64), 0)
    for seed in range(8):
        torch.manual_seed(seed)
        model = create_model("msa2net", "tiny", 1, 2)
        mask = predict(probe, model, **FAST)["mask"]
        if 0.05 < mask.mean() < 0.95:
            break
    else:  # pragma: no cover - depends on the network's initialisation
        pytest.skip("no seed gave a non-constant mask")
    info = save_checkpoint(model, folder / "tiny", dtype="float32")
    return folder / "tiny.safetensors", str(info.sha256)


def _good_images(src: Path, origin: tuple[float, float] = (0.0, 0.0)) -> Path:
    """Three good images in a new folder: a TIFF with spacing (and ``origin``), a PNG, an
    RGB TIFF."""
    src.mkdir(parents=True)
    meta = ImageMeta(axes="YX", spacing=(0.5, 0.25), origin=origin,
                     units=("micrometer", "micrometer"))
    write_image(src / "a.tif", _blobs((64, 64), 1), meta)
    write_image(src / "b.png", _blobs((64, 64), 2))
    rgb = np.stack([_blobs((64, 80), 3)] * 3, axis=-1)
    write_image(src / "c.tif", rgb, ImageMeta(axes="YXC", rgb=True))
    return src


def _make_folder(src: Path) -> Path:
    """The three :func:`_good_images`, a truncated TIFF, text named .tif, a notes.txt and a
    hidden file."""
    _good_images(src)
    whole = (src / "a.tif").read_bytes()
    (src / "corrupt.tif").write_bytes(whole[: len(whole) // 3])
    (src / "fake.tif").write_text("this is not an image\n")
    (src / "notes.txt").write_text("acquired on Tuesday\n")
    (src / ".DS_Store").write_bytes(b"\x00\x01")
    return src


@pytest.fixture
def folder(tmp_path) -> Path:
    """A folder of this test's own (see :func:`_make_folder`)."""
    return _make_folder(tmp_path / "in")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, checkpoint):
    """One local run over a shared folder: ``(folder, out, events, summary)``; read only."""
    root = tmp_path_factory.mktemp("shared")
    src = _make_folder(root / "in")
    events, summary = _drain(run_folder_iter(src, root / "out", weights=str(checkpoint[0]),
                                             **FAST))
    return src, root / "out", events, summary


def _drain(gen):
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value


def _masks(out: Path, names=GOOD, suffix="_mask.tif") -> dict[str, np.ndarray]:
    found = {}
    for name in names:
        stem = name.rsplit(".", 1)[0]
        data, _ = read_image(out / f"{stem}{suffix}")
        found[name] = np.asarray(data)
    return found


def _partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(PARTIAL_PREFIX)]


# --- scanning ---------------------------------------------------------------------------------


def test_find_images_names_outputs_and_ignores_what_it_cannot_read(folder, tmp_path):
    (folder / "a.png").write_bytes((folder / "b.png").read_bytes())  # same stem as a.tif
    sub = folder / "sub"
    sub.mkdir()
    write_image(sub / "d.tif", _blobs((64, 64), 4))
    out = folder / "results"  # an output folder inside the input folder is left out
    out.mkdir()
    write_image(out / "a_mask.tif", _blobs((64, 64), 5))

    items = {it.name: it for it in find_images(folder, out_dir=out)}
    assert set(items) == {"a.png", "a.tif", "b.png", "c.tif", "corrupt.tif", "fake.tif",
                          "notes.txt"}
    assert items["a.tif"].output == "a.tif_mask.tif"  # stems clash: the full name is kept
    assert items["a.png"].output == "a.png_mask.tif"
    assert items["b.png"].output == "b_mask.tif"
    assert items["notes.txt"].reason is not None and items["notes.txt"].output is None
    assert items["corrupt.tif"].reason is None  # claims to be an image: tried, then fails

    deep = {it.name: it for it in find_images(folder, "*.tif", recursive=True, out_dir=out,
                                              format="nii")}
    assert set(deep) == {"a.tif", "c.tif", "corrupt.tif", "fake.tif", "sub/d.tif"}
    assert deep["sub/d.tif"].output == "sub/d_mask.nii.gz"
    assert deep["c.tif"].output == "c_mask.nii.gz"
    with pytest.raises(ImageReadError, match="does not exist"):
        find_images(tmp_path / "missing")


# --- a local run ---------------------------------------------------------------------------


def test_run_reports_bad_files_and_predicts_the_rest(local_run, checkpoint):
    ckpt, sha = checkpoint
    folder, out, events, summary = local_run

    assert isinstance(summary, BatchSummary)
    assert (summary.total, summary.done, summary.failed, summary.ignored, summary.skipped) == \
        (5, 3, 2, 1, 0)
    assert not summary.ok
    assert set(summary.failures) == set(BAD)
    assert "truncated" in summary.failures["corrupt.tif"]
    assert "text" in summary.failures["fake.tif"]
    assert isinstance(events[-1], FinishedEvent) and events[-1].result is summary
    assert any(isinstance(e, TilesEvent) for e in events)
    finals = {e.name: e.status for e in events if isinstance(e, FileEvent)}
    assert finals == {"a.tif": "done", "b.png": "done", "c.tif": "done", "corrupt.tif": "failed",
                      "fake.tif": "failed", "notes.txt": "ignored"}
    # The RGB image was converted for the one-channel network, and the notice says which file.
    assert any(isinstance(e, NoticeEvent) and e.message.startswith("c.tif:") for e in events)

    # One labels file per good input, on the input's grid and geometry.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["a_mask.tif", "b_mask.tif", "c_mask.tif", MANIFEST_NAME])
    data, meta = read_image(out / "a_mask.tif")
    assert data.shape == (64, 64) and meta.spacing == (0.5, 0.25)
    assert meta.units == ("micrometer", "micrometer") and meta.extra.get("labels")
    assert read_image(out / "c_mask.tif")[0].shape == (64, 80)
    # ... equal to predicting the file directly.
    from napari_medseg.engine.checkpoints import resolve_weights

    model, _ = resolve_weights(ckpt)
    image, imeta = read_image(folder / "a.tif")
    direct = predict(image, model, meta=imeta, **FAST)["mask"]
    np.testing.assert_array_equal(np.asarray(data), direct)

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["format"] == "napari-medseg-batch-run"
    assert manifest["state"] == "finished"
    assert manifest["weights"]["sha256"] == sha and manifest["weights"]["random"] is False
    assert manifest["settings"]["format"] == "tif"
    assert manifest["settings"]["predict"]["tiling"]["tile"] == 64
    assert "device" not in manifest["settings"]["predict"]  # how fast, not what it gives
    assert manifest["summary"] == {"total": 5, "done": 3, "skipped": 0, "failed": 2,
                                   "ignored": 1, "pending": 0, "cancelled": 0}
    entry = manifest["files"]["a.tif"]
    assert entry["status"] == "done" and entry["output"] == "a_mask.tif"
    assert entry["weights_sha256"] == sha and entry["seconds"] > 0
    assert manifest["files"]["corrupt.tif"]["error"] == summary.failures["corrupt.tif"]
    assert manifest["files"]["notes.txt"]["status"] == "ignored"
    assert ".DS_Store" not in manifest["files"]
    assert manifest["model_loads"] == 1 and len(manifest["runs"]) == 1


def test_rerun_skips_finished_files_and_redoes_changed_ones(folder, tmp_path, checkpoint):
    ckpt, _ = checkpoint
    out = tmp_path / "out"
    some = {"weights": str(ckpt), "pattern": "[abf]*", **FAST}  # a.tif, b.png, fake.tif
    run_folder(folder, out, **some)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*_mask.tif")}
    assert len(first) == 2

    events, again = _drain(run_folder_iter(folder, out, **some))
    assert (again.done, again.skipped, again.failed) == (0, 2, 1)  # the bad file is retried
    assert any(isinstance(e, NoticeEvent) and "Skipped 2 file(s)" in e.message for e in events)
    assert {e.name for e in events if isinstance(e, FileEvent) and e.status == "skipped"} == \
        {"a.tif", "b.png"}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_mask.tif")} == first
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["skipped"] == 2 and manifest["summary"]["skipped"] == 2
    assert [r["skipped"] for r in manifest["runs"]] == [0, 2]

    # A changed input is predicted again; so is everything after a change of settings.
    os.utime(folder / "b.png", ns=(1, 1))
    assert run_folder(folder, out, **some).done == 1
    assert run_folder(folder, out, **{**some, "overlap": 0.5}).done == 2
    # A missing output is predicted again; force predicts what is finished.
    (out / "a_mask.tif").unlink()
    redo = run_folder(folder, out, **{**some, "overlap": 0.5})
    assert (redo.done, redo.skipped) == (1, 1)
    forced = run_folder(folder, out, **{**some, "overlap": 0.5, "pattern": "b*", "force": True})
    assert (forced.done, forced.skipped) == (1, 0)


def test_cancel_stops_cleanly_and_leaves_no_half_written_output(tmp_path, checkpoint):
    ckpt, _ = checkpoint
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):  # two 64x64 tiles each
        write_image(src / f"img{i}.tif", _blobs((64, 112), 10 + i))
    out = tmp_path / "out"
    token = CancelToken()
    events = []
    gen = run_folder_iter(src, out, weights=str(ckpt), batch_size=1, cancel=token, **FAST)
    seen_running = []
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            summary = stop.value
            break
        events.append(event)
        if isinstance(event, FileEvent) and event.status == "running":
            seen_running.append(event.name)
        if isinstance(event, TilesEvent) and seen_running == ["img0.tif", "img1.tif"]:
            token.cancel()  # in the middle of the second file (several batches of tiles)

    assert summary.was_cancelled and (summary.done, summary.cancelled) == (1, 2)
    assert isinstance(events[-2], CancelledEvent)
    assert sorted(p.name for p in out.iterdir()) == ["img0_mask.tif", MANIFEST_NAME]
    assert _partials(out) == []
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["state"] == "cancelled"
    assert {n: f["status"] for n, f in manifest["files"].items()} == {
        "img0.tif": "done", "img1.tif": "cancelled", "img2.tif": "cancelled"}

    rest = run_folder(src, out, weights=str(ckpt), batch_size=1, **FAST)
    assert (rest.done, rest.skipped, rest.failed) == (2, 1, 0) and rest.ok


def test_a_failed_write_leaves_nothing_that_looks_finished(folder, tmp_path, checkpoint,
                                                           monkeypatch):
    import napari_medseg.io as io

    ckpt, _ = checkpoint

    real = io.write_labels

    def crash_half_way(path, labels, meta=None, format=None, **kwargs):
        if "b_mask" in str(path):
            Path(path).write_bytes(b"II*\x00 half")
            raise ImageWriteError(f"Cannot write {path}: disk full.")
        return real(path, labels, meta, format, **kwargs)

    monkeypatch.setattr(io, "write_labels", crash_half_way)
    out = tmp_path / "out"
    summary = run_folder(folder, out, weights=str(ckpt), pattern="[ab]*", **FAST)
    assert (summary.done, summary.failed) == (1, 1)
    assert "disk full" in summary.failures["b.png"]
    assert not (out / "b_mask.tif").exists() and _partials(out) == []
    # Stale temporary files of an interrupted run are removed and never count as outputs.
    stale = out / f"{PARTIAL_PREFIX}dead-b_mask.tif"
    stale.write_bytes(b"junk")
    monkeypatch.setattr(io, "write_labels", real)
    again = run_folder(folder, out, weights=str(ckpt), pattern="[ab]*", **FAST)
    assert (again.done, again.skipped, again.failed) == (1, 1, 0)
    assert not stale.exists() and (out / "b_mask.tif").is_file()


def test_formats_zarr_and_nifti_keep_geometry(folder, tmp_path, checkpoint):
    ckpt, _ = checkpoint
    for fmt, suffix in (("zarr", "_mask.zarr"), ("nii", "_mask.nii.gz")):
        out = tmp_path / fmt
        summary = run_folder(folder, out, weights=str(ckpt), format=fmt, pattern="a.tif",
                             **FAST)
        assert summary.ok and summary.done == 1
        data, meta = read_image(out / f"a{suffix}")
        assert data.shape == (64, 64) and meta.spacing == pytest.approx((0.5, 0.25))
        assert _partials(out) == []


def test_random_weights_warn_loudly_and_recursive_keeps_sub_folders(folder, tmp_path):
    sub = folder / "sub"
    sub.mkdir()
    write_image(sub / "d.tif", _blobs((64, 64), 4))
    out = tmp_path / "out"
    some = {"model": "msa2net", "variant": "tiny", "pattern": "[ad].tif", "recursive": True,
            **FAST}
    events, summary = _drain(run_folder_iter(folder, out, **some))
    warnings = [e for e in events if isinstance(e, NoticeEvent) and e.level == "warning"]
    assert any("RANDOM" in e.message for e in warnings)
    assert summary.done == 2 and (out / "sub" / "d_mask.tif").is_file()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["weights"]["random"] is True and manifest["weights"]["network"] == "msa2net"
    assert set(manifest["files"]) == {"a.tif", "sub/d.tif"}
    # Seeded: a second run builds the same weights (same sha256), so it skips.
    assert run_folder(folder, out, **some).skipped == 2


def test_bad_settings_are_one_sentence(folder, tmp_path, checkpoint):
    ckpt, _ = checkpoint
    with pytest.raises(ConfigError, match="not both"):
        BatchConfig(weights=str(ckpt), model="msa2net")
    with pytest.raises(ConfigError, match="not both"):
        BatchConfig(scheduler="tcp://127.0.0.1:8786", dask_local=2)
    with pytest.raises(ConfigError, match="tcp://HOST:PORT"):
        BatchConfig(scheduler="127.0.0.1:8786")
    with pytest.raises(ConfigError, match="tif, zarr, nii"):
        BatchConfig.from_mapping({"format": "jpeg"})
    with pytest.raises(ConfigError, match="Unknown setting"):
        BatchConfig.from_mapping({"tilesize": 3})
    with pytest.raises(ConfigError, match="weights"):
        run_folder(folder, tmp_path / "out", **FAST)
    with pytest.raises(ConfigError, match="differ"):
        run_folder(folder, folder, weights=str(ckpt), **FAST)
    with pytest.raises(ImageReadError, match="does not exist"):
        run_folder(tmp_path / "nope", tmp_path / "out", weights=str(ckpt), **FAST)
    cfg = BatchConfig.from_mapping({"weights": "x", "tile": "128", "tta": "yes",
                                    "dask-local": "2", "format": "NII"})
    assert (cfg.predict.tiling.tile, cfg.predict.tta, cfg.dask_local, cfg.format) == \
        (128, True, 2, "nii")


def test_threads_give_the_same_outputs_with_one_model_per_worker(local_run, tmp_path,
                                                                checkpoint):
    ckpt, _ = checkpoint
    folder, local_out, _, local = local_run
    threads = run_folder(folder, tmp_path / "threads", weights=str(ckpt), workers=2, **FAST)
    assert threads.executor["kind"] == "threads"
    assert (threads.done, threads.failed, threads.ignored) == (local.done, local.failed,
                                                               local.ignored)
    a, b = _masks(local_out), _masks(tmp_path / "threads")
    for name in GOOD:
        np.testing.assert_array_equal(a[name], b[name])
    workers = {f["worker"] for f in threads.files.values() if f.get("worker")}
    assert 1 <= threads.model_loads <= min(2, len(workers))


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_outputs_as_a_local_run(local_run, tmp_path,
                                                                   checkpoint):
    ckpt, sha = checkpoint
    folder, local_out, _, local = local_run
    events, dask = _drain(run_folder_iter(folder, tmp_path / "dask", weights=str(ckpt),
                                          dask_local=2, **FAST))
    assert dask.executor["kind"] == "dask-local"
    assert dask.executor["scheduler"].startswith("tcp://127.0.0.1:")  # loopback only
    assert (dask.done, dask.failed, dask.ignored, dask.total) == (3, 2, 1, 5)
    assert set(dask.failures) == set(local.failures)
    a, b = _masks(local_out), _masks(tmp_path / "dask")
    for name in GOOD:
        np.testing.assert_array_equal(a[name], b[name])
    assert any(0 < m.mean() < 1 for m in a.values())  # real masks, not all one class
    # Every worker process loaded the model at most once, and ran in another process.
    pids = {f["worker"].split(":")[1] for f in dask.files.values() if f.get("worker")}
    assert str(os.getpid()) not in pids and 1 <= len(pids) <= 2
    assert 1 <= dask.model_loads <= len(pids)
    manifest = json.loads((tmp_path / "dask" / MANIFEST_NAME).read_text())
    assert manifest["executor"]["kind"] == "dask-local"
    assert manifest["weights"]["sha256"] == sha and manifest["state"] == "finished"
    assert _partials(tmp_path / "dask") == []


# --- the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sr_checkpoint(tmp_path_factory) -> Path:
    """A tiny 2-class SASR-Net checkpoint: its masks are twice the input's side."""
    from napari_medseg.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sr") / "sr"
    save_checkpoint(create_model("sasrnet", "tiny", 1, 2), path, dtype="float32")
    return path.with_suffix(".safetensors")


@pytest.mark.parametrize("network,fmt,suffix", [("msa2net", "tif", ".tif"),
                                                ("sasrnet", "tif", ".tif"),
                                                ("sasrnet", "nii", ".nii.gz")])
def test_cli_predict_of_several_files_writes_what_batch_writes(tmp_path, checkpoint,
                                                                sr_checkpoint, capsys, network,
                                                                fmt, suffix):
    from napari_medseg.cli import main

    ckpt = checkpoint[0] if network == "msa2net" else sr_checkpoint
    src = _good_images(tmp_path / "in", origin=(3.0, -2.0))
    # SASR-Net's outputs are on the image's grid unless asked at its scale
    sr = ["--super-resolved"] if network == "sasrnet" else []
    rc = main(["predict", str(src), "-o", str(tmp_path / "cli"), "--weights", str(ckpt),
               "--format", fmt, "--device", "cpu", "--precision", "fp32", "--tile", "64", "-q",
               *sr])
    assert rc == 0, capsys.readouterr().err
    summary = run_folder(src, tmp_path / "batch", weights=str(ckpt), format=fmt,
                         super_resolved=bool(sr), **FAST)
    assert summary.ok and summary.done == 3
    scale = 2 if network == "sasrnet" else 1
    for stem, shape in (("a", (64, 64)), ("b", (64, 64)), ("c", (64, 80))):
        cli, cli_meta = read_image(tmp_path / "cli" / f"{stem}_mask{suffix}")
        batch, batch_meta = read_image(tmp_path / "batch" / f"{stem}_mask{suffix}")
        np.testing.assert_array_equal(np.asarray(cli), np.asarray(batch))
        assert cli.shape == tuple(n * scale for n in shape)
        assert (cli_meta.axes, cli_meta.spacing, cli_meta.origin, cli_meta.units) == \
            (batch_meta.axes, batch_meta.spacing, batch_meta.origin, batch_meta.units)
        if cli_meta.affine is not None or batch_meta.affine is not None:
            np.testing.assert_allclose(cli_meta.affine, batch_meta.affine)
    _, a_meta = read_image(tmp_path / "batch" / f"a_mask{suffix}")
    # a finer grid: the spacing divided by the scale, the first pixel a quarter input pixel
    # back for x2 (upsampled_geometry)
    assert a_meta.spacing == pytest.approx((0.5 / scale, 0.25 / scale))
    shift = 0.25 if scale == 2 else 0.0
    assert a_meta.origin == pytest.approx((3.0 - shift * 0.5, -2.0 - shift * 0.25))
    assert _partials(tmp_path / "cli") == [] and _partials(tmp_path / "batch") == []



def test_cli_batch_exit_status_progress_and_skips(local_run, tmp_path, checkpoint, capsys):
    from napari_medseg.cli import main

    ckpt, _ = checkpoint
    folder, local_out, _, _ = local_run
    out = tmp_path / "out"
    shutil.copytree(local_out, out)  # as if this command had run before
    argv = ["batch", str(folder), str(out), "--weights", str(ckpt), "--device", "cpu",
            "--precision", "fp32", "--tile", "64"]
    assert main(argv) == 1  # the two bad files fail again
    captured = capsys.readouterr()
    assert "Skipped 3 file(s)" in captured.err
    assert "error: corrupt.tif:" in captured.err and "error: fake.tif:" in captured.err
    assert "ignoring notes.txt" in captured.err
    assert "0 predicted, 3 skipped (finished earlier), 2 failed" in captured.out
    assert json.loads((out / MANIFEST_NAME).read_text())["skipped"] == 3

    assert main(argv + ["--pattern", "[ab]*", "-q"]) == 0  # only good files: success
    assert main(["batch", str(folder), str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "Give the weights" in capsys.readouterr().err


def test_cli_batch_random_weights_warn(local_run, tmp_path, capsys):
    from napari_medseg.cli import main

    folder = local_run[0]
    code = main(["batch", str(folder), str(tmp_path / "out"), "--model", "msa2net",
                 "--variant", "tiny", "--pattern", "a.tif", "--format", "nii", "-q",
                 "--device", "cpu", "--tile", "64"])
    assert code == 0
    err = capsys.readouterr().err
    assert "WARNING: No trained weights: msa2net/tiny has RANDOM weights" in err
    assert (tmp_path / "out" / "a_mask.nii.gz").is_file()


def test_scheduler_address_submits_to_an_existing_cluster(local_run, tmp_path, checkpoint):
    distributed = pytest.importorskip("distributed")

    ckpt, _ = checkpoint
    folder, local_out, _, _ = local_run
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  protocol="tcp://", host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        summary = run_folder(folder, tmp_path / "out", weights=str(ckpt),
                             scheduler=cluster.scheduler_address, **FAST)
    assert summary.executor == {"kind": "dask", "scheduler": cluster.scheduler_address,
                                "workers": 1}
    assert (summary.done, summary.failed) == (3, 2)
    a, b = _masks(local_out), _masks(tmp_path / "out")
    for name in GOOD:
        np.testing.assert_array_equal(a[name], b[name])
    # Two worker threads, one model each at most.
    assert 1 <= summary.model_loads <= 2


def test_weights_tuned_with_tta_run_with_it_and_the_manifest_says_so(tmp_path):
    from napari_medseg.engine.seg_task import SegTask, with_task
    from napari_medseg.models import create_model

    torch.manual_seed(0)
    model = with_task(create_model("unet_sharp", "tiny", 1, 3), SegTask("instances", tta=True))
    save_checkpoint(model, tmp_path / "ck" / "tta", dtype="float32",
                    classes=("background", "interior", "boundary"))
    ckpt = str(tmp_path / "ck" / "tta.safetensors")
    src = _good_images(tmp_path / "in")
    out = tmp_path / "out"
    first = run_folder(src, out, weights=ckpt, **FAST)
    assert first.done == 3
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["settings"]["predict"]["tta"] is True  # decided by the weights, recorded
    assert run_folder(src, out, weights=ckpt, **FAST).skipped == 3  # the same run again
    # asking for what the weights decide anyway is the same run too
    assert run_folder(src, out, weights=ckpt, tta=True, **FAST).skipped == 3
    # flip TTA turned off is another run: nothing is taken from the flip-averaged one
    off = run_folder(src, out, weights=ckpt, tta=False, **FAST)
    assert off.skipped == 0 and off.done == 3
    assert json.loads((out / MANIFEST_NAME).read_text())["settings"]["predict"]["tta"] is False
