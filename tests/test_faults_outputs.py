"""Issue #20, outputs: an output never replaces an input or an unasked-for file, and a
folder that cannot take the outputs is refused before anything runs (predict, batch,
finetune); Ctrl-C of finetune exits 130 like predict and batch."""

from __future__ import annotations

import os
import shutil
import signal
from collections import namedtuple

import numpy as np
import pytest
import torch

from analytic_models import registered_analytic
from napari_medseg.cli import main
from napari_medseg.io import ImageMeta, write_image

PREDICT = ("--model", "analytic", "--variant", "tiny", "--tile", "16", "--precision", "fp32",
           "--device", "cpu")


@pytest.fixture(autouse=True)
def analytic():
    with registered_analytic():
        yield


@pytest.fixture()
def folder(tmp_path):
    """in/a.tif and in/b.tif (grey uint8)."""
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.tif", "b.tif"):
        write_image(src / name, rng.integers(0, 255, (24, 32)).astype(np.uint8),
                    ImageMeta("YX"))
    return src


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _refused(capsys, *argv) -> str:
    """Run ``argv``: exit 2 with one error sentence and no prediction; returns the error."""
    rc, _, err = _run(capsys, *argv)
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("napari-medseg: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "napari-medseg: model" not in err  # refused before the network was even built
    return lines[0]


def _deny_writes(monkeypatch, folder) -> None:
    """``os.access`` says ``folder`` is not writable (as for a user without the right)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if (
        mode & os.W_OK and os.path.abspath(p) == str(folder)) else real(p, mode, *a, **k))


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


# --- predict: never over an input --------------------------------------------------------


@pytest.mark.parametrize("where", ["folder", "file", "folder_into_itself"])
def test_predict_into_its_own_input_is_refused_and_the_image_kept(folder, capsys, where):
    shutil.copy(folder / "b.tif", folder / "a_mask.tif")  # an input named like a's mask
    before = _snapshot(folder)
    args = {"folder": (folder / "a.tif", folder / "a_mask.tif", "-o", folder),
            "file": (folder / "a.tif", "-o", folder / "a.tif"),
            "folder_into_itself": (folder, "-o", folder)}[where]
    line = _refused(capsys, "predict", *args, *PREDICT)
    assert "is the input" in line
    assert _snapshot(folder) == before


def test_predict_into_its_own_folder_writes_beside_the_image(folder, capsys):
    before = _snapshot(folder)
    rc, _, err = _run(capsys, "predict", folder / "a.tif", "-o", folder, "-q", *PREDICT)
    assert rc == 0, err
    after = _snapshot(folder)
    assert after.pop("a_mask.tif") and after == before  # <stem>_mask, the input untouched


def test_predict_with_overwrite_still_never_replaces_an_input(folder, capsys):
    shutil.copy(folder / "b.tif", folder / "a_mask.tif")
    before = _snapshot(folder)
    line = _refused(capsys, "predict", folder / "a.tif", folder / "a_mask.tif", "-o", folder,
                    "--overwrite", *PREDICT)
    assert "is the input" in line and _snapshot(folder) == before


def test_predict_through_a_link_to_the_output_folder_is_refused(folder, tmp_path, capsys):
    links = tmp_path / "links"
    links.mkdir()
    (links / "a_mask.tif").symlink_to(folder / "a.tif")
    os.link(folder / "b.tif", links / "b_mask.tif")  # a hard link: the same file too
    before = _snapshot(folder)
    for name in ("a.tif", "b.tif"):
        assert "is the input" in _refused(capsys, "predict", folder / name, "-o", links,
                                          "--overwrite", *PREDICT)
    assert _snapshot(folder) == before


def test_predict_into_an_input_zarr_store_is_refused(tmp_path, capsys):
    import zarr  # noqa: F401 - the zarr writer needs it

    store = tmp_path / "scan.zarr"
    write_image(store, np.arange(24 * 32, dtype=np.uint8).reshape(24, 32), ImageMeta("YX"))
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    line = _refused(capsys, "predict", store, "-o", store / "masks", *PREDICT)
    assert "inside the input" in line
    for argv in (("-o", store), ("-o", store, "--format", "zarr")):
        assert "is the input" in _refused(capsys, "predict", store, *argv, *PREDICT)
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


def test_two_outputs_on_one_path_are_refused(folder, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(folder / "b.tif", other / "a.tif")
    out = tmp_path / "out"
    line = _refused(capsys, "predict", folder / "a.tif", other / "a.tif", "-o",
                    out, "--outputs", "mask,probabilities", *PREDICT)
    assert "same name stem" in line and not out.exists()


# --- predict: existing outputs -------------------------------------------------------------


def test_an_existing_output_needs_overwrite(folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_mask.tif").write_bytes(b"someone's mask")
    line = _refused(capsys, "predict", folder / "a.tif", "-o", out, *PREDICT)
    assert "already exists" in line and "--overwrite" in line
    assert (out / "a_mask.tif").read_bytes() == b"someone's mask"
    rc, _, err = _run(capsys, "predict", folder / "a.tif", "-o", out, "--overwrite", "-q",
                      *PREDICT)
    assert rc == 0, err
    assert (out / "a_mask.tif").read_bytes() != b"someone's mask"


# --- predict: the output folder ------------------------------------------------------------


def test_a_folder_is_never_replaced_by_an_output_file(folder, tmp_path, capsys):
    mine = tmp_path / "result.tif"  # a folder that happens to have an image's name
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    line = _refused(capsys, "predict", folder / "a.tif", "-o", mine, "--overwrite", *PREDICT)
    assert "existing folder" in line and (mine / "notes.txt").read_text() == "mine"


def test_an_output_folder_that_is_a_file_is_refused(folder, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    line = _refused(capsys, "predict", folder, "-o", notes, *PREDICT)
    assert "is a file" in line and notes.read_text() == "mine"


def test_an_unwritable_output_folder_is_refused_before_predicting(folder, tmp_path, capsys,
                                                                  monkeypatch):
    out = tmp_path / "locked"
    out.mkdir()
    _deny_writes(monkeypatch, out)
    line = _refused(capsys, "predict", folder, "-o", out / "masks", *PREDICT)
    assert "not writable" in line and not list(out.iterdir())


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused(folder, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert "not writable" in _refused(capsys, "predict", folder, "-o", out, *PREDICT)
    finally:
        out.chmod(0o755)


def test_a_full_disk_is_refused_before_predicting(folder, tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 100, 100))
    out = tmp_path / "out"
    line = _refused(capsys, "predict", folder, "-o", out, *PREDICT)
    assert "free" in line and not out.exists()


# --- batch ---------------------------------------------------------------------------------


BATCH = ("--model", "analytic", "--variant", "tiny", "--tile", "16", "--precision", "fp32",
         "--device", "cpu", "-q")


def test_batch_never_replaces_a_file_its_manifest_does_not_know(folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_mask.tif").write_bytes(b"ground truth")  # e.g. the masks folder
    rc, _, err = _run(capsys, "batch", folder, out, *BATCH)
    assert rc == 2 and "no earlier run recorded" in err and "Traceback" not in err, err
    assert (out / "a_mask.tif").read_bytes() == b"ground truth"
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.tif"]  # nothing written
    # its own outputs are still skipped (resume) or, with --force, replaced
    (out / "a_mask.tif").unlink()
    assert _run(capsys, "batch", folder, out, *BATCH)[0] == 0
    rc, stdout, _ = _run(capsys, "batch", folder, out, *BATCH)
    assert rc == 0 and "2 skipped" in stdout
    rc, stdout, _ = _run(capsys, "batch", folder, out, "--force", *BATCH)
    assert rc == 0 and "2 predicted" in stdout


def test_batch_into_an_input_zarr_store_is_refused(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    store = src / "scan.zarr"
    write_image(store, np.arange(24 * 32, dtype=np.uint8).reshape(24, 32), ImageMeta("YX"))
    write_image(src / "a.tif", np.zeros((24, 32), np.uint8), ImageMeta("YX"))
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    for out in (store, store / "masks"):
        rc, _, err = _run(capsys, "batch", src, out, *BATCH)
        assert rc == 2 and "Traceback" not in err, err
        assert "is an image" in err or "inside the input" in err, err
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


def test_batch_unwritable_output_folder_is_one_sentence(folder, tmp_path, capsys,
                                                        monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    _deny_writes(monkeypatch, parent)
    monkeypatch.setattr(os, "mkdir", lambda *a, **k: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")))  # what a read-only folder does
    rc, _, err = _run(capsys, "batch", folder, parent / "out", *BATCH)
    assert rc == 2 and "not writable" in err and "Traceback" not in err, err


# --- finetune ------------------------------------------------------------------------------


@pytest.fixture()
def base(tmp_path):
    from napari_medseg.engine.checkpoints import save_checkpoint
    from napari_medseg.models import create_model

    torch.manual_seed(0)
    save_checkpoint(create_model("unet_sharp", "tiny", 1, 2), tmp_path / "base",
                    dtype="float32", normalization={"mode": "percentile", "low": 1.0,
                                                    "high": 99.8})
    return tmp_path / "base.safetensors"


def _finetune(capsys, base, nuclei_folders, output, *extra):
    images, masks = nuclei_folders
    return _run(capsys, "finetune", "--weights", base, "--images", images, "--masks", masks,
                "-o", output, "--steps", "3", "--batch-size", "2", "--patch", "64",
                "--device", "cpu", "--precision", "fp32", "--freeze-encoder", "-q", *extra)


@pytest.mark.parametrize("name", ["base.safetensors", "base.json", "base"])
def test_finetune_never_replaces_its_base(base, nuclei_folders, capsys, name):
    before = {p.name: p.read_bytes() for p in base.parent.glob("base.*")}
    rc, _, err = _finetune(capsys, base, nuclei_folders, base.parent / name, "--overwrite")
    assert rc == 2 and "is the input" in err and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in base.parent.glob("base.*")} == before


@pytest.mark.parametrize("name", ["base.safetensors", "base"])
def test_train_never_replaces_the_checkpoint_it_starts_from(base, nuclei_folders, capsys,
                                                            name):
    images, masks = nuclei_folders
    before = {p.name: p.read_bytes() for p in base.parent.glob("base.*")}
    rc, _, err = _run(capsys, "train", "--weights", base, "--model", "unet_sharp", "--variant",
                      "tiny", "--images", images, "--masks", masks, "-o", base.parent / name,
                      "--steps", "2", "--batch-size", "2", "--patch", "64", "--device", "cpu",
                      "--precision", "fp32", "-q")
    assert rc == 2 and "is the input" in err and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in base.parent.glob("base.*")} == before


def test_a_shipped_tags_installed_weights_are_never_written_over(tmp_path, monkeypatch,
                                                                 nuclei_folders, capsys):
    """``--weights TAG`` protects the files the tag loads (the model card's installed weights
    and their sidecar), not only a path spelled like the tag."""
    import shutil

    from napari_medseg import resources

    tag = "banet_lite_dsb2018"
    shipped = next((d / f"{tag}.safetensors" for d in resources.weights_dirs()
                    if (d / f"{tag}.safetensors").is_file()), None)
    if shipped is None:
        pytest.skip("the shipped weights are not installed")
    folder = tmp_path / "weights"
    folder.mkdir()
    for src in (shipped, shipped.with_suffix(".json")):
        shutil.copy(src, folder / src.name)
    monkeypatch.setenv("NAPARI_MEDSEG_WEIGHTS", str(folder))
    before = (folder / shipped.name).read_bytes()
    images, masks = nuclei_folders
    for name in (f"{tag}.safetensors", f"{tag}.json"):
        rc, _, err = _run(capsys, "finetune", "--weights", tag, "--images", images, "--masks",
                          masks, "-o", folder / name, "--overwrite", "--steps", "1", "-q")
        assert rc == 2 and "is the input" in err and "Traceback" not in err, err
    assert (folder / shipped.name).read_bytes() == before


def test_finetune_existing_output_needs_overwrite(base, nuclei_folders, tmp_path, capsys):
    out = tmp_path / "tuned.safetensors"
    out.write_bytes(b"last week's model")
    rc, _, err = _finetune(capsys, base, nuclei_folders, out)
    assert rc == 2 and "already exists" in err and "--overwrite" in err, err
    assert out.read_bytes() == b"last week's model"


def test_finetune_ctrl_c_exits_130_and_keeps_the_best(base, nuclei_folders, tmp_path, capsys,
                                                     monkeypatch):
    from napari_medseg.engine.training import workflow
    from napari_medseg.engine.training.loop import StepEvent

    real = workflow.finetune_samples_iter

    def interrupted(*args, **kwargs):  # Ctrl-C after the first step, as a person would
        sent = False
        for event in real(*args, **kwargs):
            if isinstance(event, StepEvent) and not sent:
                sent = True
                os.kill(os.getpid(), signal.SIGINT)
            yield event

    monkeypatch.setattr(workflow, "finetune_samples_iter", interrupted)
    out = tmp_path / "tuned.safetensors"
    rc, _, err = _finetune(capsys, base, nuclei_folders, out, "--steps", "50")
    assert rc == 130, err
    assert out.is_file() and out.with_suffix(".json").is_file()


def test_a_write_that_fails_after_predicting_is_one_sentence(folder, tmp_path, capsys,
                                                             monkeypatch):
    """A folder the checks passed but the write is refused (made read-only meanwhile, an
    ACL os.access does not see): one sentence, nothing half-written."""
    from pathlib import Path

    out = tmp_path / "out"
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == out:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    rc, _, err = _run(capsys, "predict", folder / "a.tif", "-o", out, *PREDICT)
    assert rc == 2 and "Traceback" not in err, err
    assert "Could not write" in err and "Permission denied" in err
    assert not out.exists()


def test_a_zarr_output_being_replaced_survives_a_failed_rename(tmp_path, monkeypatch):
    from napari_medseg.engine.batch.task import PARTIAL_PREFIX, write_atomic
    from napari_medseg.errors import ImageWriteError
    from napari_medseg.io import read_image

    final = tmp_path / "a_mask.zarr"
    write_atomic(final, np.ones((8, 8), np.uint8), ImageMeta("YX"))
    real = os.replace

    def replace(src, dst):  # moving the new store into place fails (the disk filled up)
        name = os.path.basename(src)
        if name.startswith(PARTIAL_PREFIX) and "-old-" not in name:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ImageWriteError, match="No space left"):
        write_atomic(final, np.zeros((8, 8), np.uint8), ImageMeta("YX"))
    assert np.asarray(read_image(final)[0]).min() == 1  # the earlier output is still there
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(PARTIAL_PREFIX)]
