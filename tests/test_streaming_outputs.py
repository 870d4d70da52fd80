"""Issue #23: larger than memory by default.

The output format follows ``-o`` (``x.zarr`` streams into a store); TIFF outputs of volumes
and of large images are staged in a temporary store and written band by band, resumable
after a kill; NIfTI over the memory budget is refused; peak memory does not hold the outputs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from analytic_models import registered_analytic
from napari_medseg.cli import main
from napari_medseg.config import PredictConfig
from napari_medseg.engine.batch import staging
from napari_medseg.engine.batch.task import FileTask, predict_file_iter
from napari_medseg.engine.progress import CancelToken, PlaneEvent
from napari_medseg.errors import ConfigError
from napari_medseg.io import ImageMeta, read_image, write_image
from test_batch import _blobs, checkpoint  # noqa: F401 - the tiny checkpoint fixture
from test_faults_kill import FAST, _json, _run, _signal, _start, _stderr, _wait_for

ANALYTIC = ("--model", "analytic", "--variant", "tiny", "--tile", "16", "--precision", "fp32",
            "--device", "cpu", "-q")


@pytest.fixture()
def analytic():
    with registered_analytic():
        yield


def _volume(path: Path, slices: int = 5, side: int = 48) -> Path:
    rng = np.random.default_rng(3)
    write_image(path, rng.integers(0, 255, (slices, side, side)).astype(np.uint8),
                ImageMeta("ZYX", spacing=(2.0, 0.5, 0.5), units=(None, "micrometer",
                                                                  "micrometer")))
    return path


# --- the format follows the output path ---------------------------------------------------


def test_an_output_named_zarr_is_a_streamed_resumable_store(analytic, tmp_path, capsys):
    src = _volume(tmp_path / "v.tif")
    out = tmp_path / "res" / "v_out.zarr"
    assert main(["predict", str(src), "-o", str(out), "--outputs", "mask,probabilities",
                 *ANALYTIC]) == 0
    attrs = _json(out / "zarr.json")["attributes"]["napari_medseg"]
    assert attrs["complete"] is True and attrs["finished"] == [0, 1, 2, 3, 4]
    mask, meta = read_image(out)
    assert mask.shape == (5, 48, 48) and meta.spacing == (2.0, 0.5, 0.5)
    assert read_image(out / "probabilities")[0].shape == (2, 5, 48, 48)
    assert sorted(p.name for p in out.parent.iterdir()) == ["v_out.zarr"]  # nothing beside
    capsys.readouterr()
    assert main(["predict", str(src), "-o", str(out), "--outputs", "mask,probabilities",
                 *ANALYTIC[:-1]]) == 0
    assert "Resuming: 5 of 5 slice(s)" in capsys.readouterr().err


def test_a_format_flag_against_the_output_name_is_one_sentence(analytic, tmp_path, capsys):
    src = _volume(tmp_path / "v.tif")
    rc = main(["predict", str(src), "-o", str(tmp_path / "v.zarr"), "--format", "tif",
               *ANALYTIC])
    err = capsys.readouterr().err
    assert rc == 2 and "is a zarr name but --format says tif" in err
    assert "Traceback" not in err and not (tmp_path / "v.zarr").exists()
    # a name that cannot hold the format asked (a zarr store named .png) is refused too
    rc = main(["predict", str(src), "-o", str(tmp_path / "v.png"), "--format", "zarr",
               *ANALYTIC])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot hold --format zarr" in err
    assert not (tmp_path / "v.png").exists()


def test_a_batch_start_keeps_the_staging_store_of_a_stopped_file(tmp_path):
    """Clearing an interrupted run's temporary files keeps a file's staging store: running
    the file again resumes it instead of starting over."""
    from napari_medseg.engine.batch.manifest import clean_partials
    from napari_medseg.engine.batch.run import PARTIAL_PREFIX

    stage = tmp_path / f"{PARTIAL_PREFIX}stage-a_mask.tif.zarr"
    stage.mkdir()
    stale = tmp_path / f"{PARTIAL_PREFIX}dead-a_mask.tif"
    stale.write_bytes(b"half")
    assert clean_partials(tmp_path) == 1
    assert stage.is_dir() and not stale.exists()


def test_a_folder_output_names_the_mask_stem_mask(analytic, tmp_path):
    src = _volume(tmp_path / "in" / "v.ome.tif")
    assert main(["predict", str(src), "-o", str(tmp_path / "o"), "--outputs", "mask,boundary",
                 "--format", "zarr", *ANALYTIC]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["v_mask.zarr"]
    assert read_image(tmp_path / "o" / "v_mask.zarr" / "boundary")[0].shape == (5, 48, 48)


# --- TIFF of a volume: staged, written band by band ---------------------------------------


def _task(tmp_path: Path, src: Path, outputs=("mask", "probabilities"), suffix=".tif"):
    names = {"mask": tmp_path / "o" / f"v_mask{suffix}"}
    names.update({o: tmp_path / "o" / f"v_{o}{suffix}" for o in outputs if o != "mask"})
    cfg = PredictConfig.from_mapping({"outputs": list(outputs), "device": "cpu",
                                      "precision": "fp32", "tile": 16})
    return FileTask(name=src.name, input_path=str(src), predict=cfg,
                    outputs=tuple((n, str(p)) for n, p in names.items()))


def test_a_volume_to_tiff_streams_slice_by_slice_through_a_staging_store(analytic, tmp_path):
    from analytic_models import make_analytic
    from napari_medseg.engine.inference.pipeline import predict

    src = _volume(tmp_path / "v.tif")
    image, meta = read_image(src)
    task = _task(tmp_path, src)
    stage = staging.staging_path(task)
    model = make_analytic(num_classes=2)
    seen = []
    gen = predict_file_iter(task, model, image, meta, CancelToken())
    try:
        while True:
            event = next(gen)
            if isinstance(event, PlaneEvent):  # each finished slice is already on disk
                attrs = _json(stage / "zarr.json")["attributes"]["napari_medseg"]
                seen.append(list(attrs["finished"]))
                assert not (tmp_path / "o" / "v_mask.tif").exists()
    except StopIteration as stop:
        result = stop.value
    assert seen == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4]]
    assert not stage.exists()  # converted, then removed
    assert sorted(result.outputs) == ["mask", "probabilities"] and result.store is None
    ref = predict(np.asarray(image), model, meta=meta, precision="fp32", tile=16,
                  outputs=("mask", "probabilities"))
    mask, mmeta = read_image(tmp_path / "o" / "v_mask.tif")
    assert np.array_equal(np.asarray(mask), ref["mask"]) and mmeta.spacing == (2.0, 0.5, 0.5)
    probs, pmeta = read_image(tmp_path / "o" / "v_probabilities.tif")
    assert pmeta.axes == "CZYX" and probs.dtype == np.float32
    assert np.allclose(np.asarray(probs), ref["probabilities"].astype(np.float32))


def test_the_route_is_chosen_by_the_plan(analytic, tmp_path, monkeypatch):
    from analytic_models import make_analytic

    model = make_analytic(num_classes=2)
    plane = tmp_path / "p.tif"
    write_image(plane, np.zeros((64, 64), np.uint8))
    image, meta = read_image(plane)
    small = _task(tmp_path, plane, outputs=("mask",))
    assert staging.choose_route(small, model, image, meta) == "memory"  # small 2D: whole
    monkeypatch.setattr(staging, "STREAM_ABOVE_BYTES", 1000)
    assert staging.choose_route(small, model, image, meta) == "staged"
    nii = _task(tmp_path, plane, outputs=("mask",), suffix=".nii.gz")
    assert staging.choose_route(nii, model, image, meta) == "memory"  # cannot stream
    monkeypatch.setattr("napari_medseg.engine.inference.plan.available_memory", lambda: 4000)
    with pytest.raises(ConfigError, match=r"over the memory budget of 2.0 KiB, and "
                                          r"v_mask\.nii\.gz cannot be written slice by slice"):
        staging.choose_route(nii, model, image, meta)
    vol_image, vol_meta = read_image(_volume(tmp_path / "v.tif"))
    monkeypatch.undo()
    assert staging.choose_route(_task(tmp_path, plane), model, vol_image, vol_meta) == "staged"
    with pytest.raises(ConfigError, match="memory_fraction"):
        PredictConfig(memory_fraction=0)


def test_a_lazy_array_is_written_to_tiff_band_by_band_and_bigtiff_when_large(tmp_path,
                                                                            monkeypatch):
    import tifffile
    import zarr

    from napari_medseg.io import tiff

    src = zarr.create_array(str(tmp_path / "s.zarr"), shape=(2, 700, 1100), chunks=(1, 256, 256),
                            dtype="uint16")
    values = np.random.default_rng(0).integers(0, 9, (2, 700, 1100)).astype(np.uint16)
    src[...] = values
    reads = []
    original = zarr.Array.__getitem__

    def counting(self, key):
        out = original(self, key)
        reads.append(out.nbytes)
        return out

    monkeypatch.setattr(zarr.Array, "__getitem__", counting)
    monkeypatch.setattr(tiff, "BIGTIFF_BYTES", 1000)
    tiff.write_tiff(tmp_path / "o.tif", src, ImageMeta("ZYX"))
    monkeypatch.undo()
    assert reads and max(reads) <= tiff.STREAM_TILE * 1100 * 2  # one band of rows at a time
    with tifffile.TiffFile(tmp_path / "o.tif") as tif:
        assert tif.is_bigtiff
    back, meta = read_image(tmp_path / "o.tif")
    assert meta.axes == "ZYX" and np.array_equal(np.asarray(back), values)


# --- peak memory: the outputs are never held whole ------------------------------------------


_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from analytic_models import make_analytic, registered_analytic
    from napari_medseg.config import PredictConfig
    from napari_medseg.engine.batch.task import FileTask, predict_file_iter
    from napari_medseg.engine.progress import CancelToken, PlaneEvent
    from napari_medseg.io import read_image

    def rss(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    import os
    cfg = PredictConfig.from_mapping({"outputs": ["mask", "probabilities"], "device": "cpu",
                                      "precision": "fp32", "tile": 256})

    def run(src, out):
        task = FileTask(name="v", input_path=src, predict=cfg,
                        outputs=(("mask", out + "/v_mask.tif"),
                                 ("probabilities", out + "/v_probabilities.tif")))
        image, meta = read_image(src)
        stage, on_disk = out + "/.~partial-stage-v_mask.tif.zarr", []
        for event in predict_file_iter(task, model, image, meta, CancelToken()):
            if isinstance(event, PlaneEvent):
                on_disk.append(os.path.isdir(stage))
        return on_disk

    with registered_analytic():
        model = make_analytic(num_classes=2)
        run(sys.argv[2], sys.argv[3] + "-warm")  # the same run on the small volume: every
        before = rss("VmHWM:")                   # import and pool made, its peak reached
        on_disk = run(sys.argv[4], sys.argv[3])
    print(json.dumps({"before": before, "peak": rss("VmHWM:"), "on_disk": on_disk}))
""")


def test_peak_memory_of_a_volume_to_tiff_is_flat_in_the_number_of_slices(tmp_path):
    """After a 4 x 1024 x 1024 run, a 24 x 1024 x 1024 run (outputs of 120 MiB: mask and
    float16 probabilities, and 192 MiB more to write the probabilities as float32 TIFF)
    raises the peak by far less than one output."""
    import zarr

    for name, slices, side in (("small.zarr", 4, 1024), ("v.zarr", 24, 1024)):
        src = zarr.create_array(str(tmp_path / name), shape=(slices, side, side),
                                chunks=(1, 1024, 1024), dtype="uint8")
        for z in range(slices):
            src[z] = _blobs((side, side), z)
    tests = str(Path(__file__).resolve().parent)
    proc = subprocess.run([sys.executable, "-c", _CHILD, tests, str(tmp_path / "small.zarr"),
                           str(tmp_path / "o"), str(tmp_path / "v.zarr")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["on_disk"] == [True] * 24  # the slices stream into the store as they finish
    grown = (data["peak"] - data["before"]) / 2**20  # the small run's peak to the large one's
    assert grown < 32, f"the run grew by {grown:.0f} MiB"
    assert np.asarray(read_image(tmp_path / "o" / "v_mask.tif")[0]).shape == (24, 1024, 1024)


# --- a TIFF run killed midway resumes -------------------------------------------------------


def test_a_volume_to_tiff_killed_midway_resumes_from_its_staging_store(tmp_path,
                                                                       checkpoint):  # noqa: F811
    vol = tmp_path / "vol.tif"
    write_image(vol, np.stack([_blobs((128, 128), 50 + i) for i in range(30)]),
                ImageMeta("ZYX"))
    argv = ("predict", vol, "--weights", checkpoint[0], "--axis", "Z", "--batch-size", "1",
            *FAST)
    rc, err = _run(tmp_path, *argv, "-o", tmp_path / "ref")
    assert rc == 0, err
    reference = np.asarray(read_image(tmp_path / "ref" / "vol_mask.tif")[0])

    out = tmp_path / "out"
    stage = out / ".~partial-stage-vol_mask.tif.zarr"

    def finished() -> list:
        return ((_json(stage / "zarr.json") or {}).get("attributes", {})
                .get("napari_medseg", {}).get("finished", []))

    proc = _start(tmp_path, *argv, "-o", out)
    _wait_for(proc, lambda: len(finished()) >= 2, "two slices in the staging store")
    assert _signal(proc, signal.SIGKILL) == -signal.SIGKILL
    done_before = len(finished())
    assert 2 <= done_before < 30 and not (out / "vol_mask.tif").exists()

    rc, err = _run(tmp_path, *argv, "-o", out)  # the same command again: no --overwrite
    assert rc == 0, err
    assert f"Resuming: {done_before} of 30 slice(s)" in err
    assert sorted(p.name for p in out.iterdir()) == ["vol_mask.tif"]  # the store is gone
    assert np.array_equal(np.asarray(read_image(out / "vol_mask.tif")[0]), reference)


def test_a_cancelled_tiff_run_says_where_its_slices_are(tmp_path, checkpoint):  # noqa: F811
    vol = tmp_path / "vol.tif"
    write_image(vol, np.stack([_blobs((128, 128), 50 + i) for i in range(30)]),
                ImageMeta("ZYX"))
    out = tmp_path / "out"
    stage = out / ".~partial-stage-vol_mask.tif.zarr"
    proc = _start(tmp_path, "predict", vol, "--weights", checkpoint[0], "--batch-size", "1",
                  *FAST, "-o", out)
    _wait_for(proc, lambda: bool((_json(stage / "zarr.json") or {}).get("attributes", {})
                                 .get("napari_medseg", {}).get("finished")),
              "a slice in the staging store")
    assert _signal(proc, signal.SIGINT) == 130
    assert "the same command resumes there and writes the outputs" in _stderr(proc)


def test_a_store_does_not_hide_the_orthogonal_sums_from_the_budget(analytic, tmp_path,
                                                                   monkeypatch):
    from analytic_models import make_analytic
    from napari_medseg.engine.inference.pipeline import predict
    from napari_medseg.engine.inference.planning import plan_prediction
    from napari_medseg.engine.inference.predictor import OutOfMemory

    vol = np.random.default_rng(0).random((6, 40, 40)).astype(np.float32)
    model = make_analytic(num_classes=2)
    settings = {"device": "cpu", "precision": "fp32", "tile": 16, "axes": "ZYX"}
    monkeypatch.setattr("napari_medseg.engine.inference.plan.available_memory", lambda: 20000)
    store = str(tmp_path / "o.zarr")
    assert predict(vol, model, store=store, **settings)["mask"].shape == (6, 40, 40)
    plan = plan_prediction(vol, model, store=store, volume_mode="orthogonal", probe=False,
                           **settings)
    assert plan.output_bytes == 6 * 40 * 40 * 7 and "over the memory budget" in plan.describe()
    with pytest.raises(OutOfMemory, match="over the memory budget of 9.8 KiB"):
        predict(vol, model, store=str(tmp_path / "p.zarr"), volume_mode="orthogonal",
                **settings)


def test_the_memory_budget_is_a_flag_too(analytic, tmp_path, capsys, monkeypatch):
    src = tmp_path / "p.tif"
    write_image(src, np.zeros((64, 64), np.uint8))
    monkeypatch.setattr("napari_medseg.engine.inference.plan.available_memory", lambda: 40000)
    out = str(tmp_path / "o" / "p.nii.gz")
    assert main(["predict", str(src), "-o", out, "--memory-fraction", "0.5", *ANALYTIC]) == 0
    rc = main(["predict", str(src), "-o", out, "--overwrite", "--memory-fraction", "0.05",
               *ANALYTIC])
    err = capsys.readouterr().err
    assert rc == 2 and "over the memory budget of 2.0 KiB" in err


def test_a_run_stopped_between_two_outputs_is_finished_by_the_same_command(analytic, tmp_path,
                                                                          monkeypatch):
    from napari_medseg.engine.batch import task as task_module

    src = _volume(tmp_path / "v.tif")
    argv = ["predict", str(src), "-o", str(tmp_path / "o"), "--outputs",
            "mask,probabilities", *ANALYTIC]
    real = task_module.write_atomic
    written = []

    def dies_after_the_first(final, data, meta, labels=True):
        if written:
            raise KeyboardInterrupt  # as if killed while writing the second output
        written.append(real(final, data, meta, labels))
        return written[-1]

    monkeypatch.setattr(task_module, "write_atomic", dies_after_the_first)
    assert main(argv) == 130  # a second Ctrl-C (an interrupt the run does not catch)
    monkeypatch.undo()
    stage = tmp_path / "o" / ".~partial-stage-v_mask.tif.zarr"
    assert stage.is_dir() and (tmp_path / "o" / "v_mask.tif").is_file()
    assert main(argv) == 0  # no --overwrite needed: the staging store says it is this run's
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "v_mask.tif", "v_probabilities.tif"]
    assert main(argv) == 2  # a finished output is never replaced unasked
