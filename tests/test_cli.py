"""``napari-medseg predict`` and ``models``: outputs, names, notices, and one-sentence errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from analytic_models import make_analytic, registered_analytic
from napari_medseg import resources
from napari_medseg.cli import main
from napari_medseg.engine.checkpoints import save_checkpoint
from napari_medseg.io import ImageMeta, read_image, write_image


@pytest.fixture(autouse=True)
def analytic():
    with registered_analytic():
        yield


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_image(folder / "a.tif", rng.integers(0, 255, (40, 56)).astype(np.uint8),
                ImageMeta("YX", spacing=(0.5, 0.5), units=("micrometer", "micrometer")))
    write_image(folder / "b.ome.tif", rng.integers(0, 255, (30, 30)).astype(np.uint8))
    (folder / "notes.txt").write_text("not an image")
    return folder


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("napari-medseg: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_predict_one_image_writes_mask_and_suffixed_outputs(images, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "predict", images / "a.tif", "-o", out, "--model", "analytic",
                      "--variant", "tiny", "--outputs", "mask,boundary,probabilities,instances",
                      "--tile", "16", "--precision", "fp32")
    assert rc == 0, err
    assert "WARNING" in err and "RANDOMLY INITIALISED" in err
    assert "tiles of 16x16" in err  # the plan is shown before running
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a_boundary.tif", "a_instances.tif", "a_mask.tif", "a_probabilities.tif"]
    mask, meta = read_image(out / "a_mask.tif")
    assert mask.shape == (40, 56) and meta.spacing == (0.5, 0.5)
    probs, pmeta = read_image(out / "a_probabilities.tif")
    assert probs.shape == (2, 40, 56) and pmeta.axes == "CYX"
    expected = np.asarray(read_image(images / "a.tif")[0])
    from napari_medseg.engine.inference.pipeline import predict

    ref = predict(expected, make_analytic(num_classes=2), precision="fp32", tile=16)
    assert np.array_equal(np.asarray(mask), ref["mask"])


def test_predict_a_folder_skips_non_images(images, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "predict", images, "-o", out, "--model", "analytic", "-q")
    assert rc == 0, err
    assert "skipping notes.txt" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.tif", "b_mask.tif"]


def test_an_unreadable_file_in_a_folder_is_reported_and_the_rest_done(images, tmp_path,
                                                                      capsys):
    (images / "0_broken.tif").write_bytes(b"II*\x00 this is not a TIFF")
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "predict", images, "-o", out, "--model", "analytic", "-q")
    assert rc == 2
    assert "0_broken.tif" in _one_error_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.tif", "b_mask.tif"]


def test_single_output_file_name(images, tmp_path, capsys):
    target = tmp_path / "res" / "seg.tif"
    rc, _, err = _run(capsys, "predict", images / "a.tif", "-o", target, "--model", "analytic",
                      "--outputs", "mask,boundary", "-q")
    assert rc == 0, err
    assert sorted(p.name for p in target.parent.iterdir()) == ["seg.tif", "seg_boundary.tif"]


def test_zarr_format_streams_into_a_readable_store(images, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "predict", images / "a.tif", "-o", out, "--model", "analytic",
                      "--format", "zarr", "--outputs", "mask,probabilities", "-q")
    assert rc == 0, err
    mask, meta = read_image(out / "a_mask.zarr")
    assert mask.shape == (40, 56) and meta.axes == "YX" and meta.spacing == (0.5, 0.5)
    probs, _ = read_image(out / "a_mask.zarr" / "probabilities")
    assert probs.shape == (2, 40, 56)
    # A second run finds the finished store and resumes (nothing left to do).
    rc, _, err = _run(capsys, "predict", images / "a.tif", "-o", out, "--model", "analytic",
                      "--format", "zarr", "--outputs", "mask,probabilities")
    assert rc == 0 and "Resuming" in err


def test_volume_to_nifti_slice_wise(tmp_path, capsys):
    vol = np.random.default_rng(1).normal(size=(4, 24, 24)).astype(np.float32)
    write_image(tmp_path / "v.tif", vol, ImageMeta("ZYX", spacing=(3.0, 1.0, 1.0)))
    rc, _, err = _run(capsys, "predict", tmp_path / "v.tif", "-o", tmp_path / "o", "--model",
                      "analytic", "--format", "nii", "--axis", "Z", "-q")
    assert rc == 0, err
    mask, meta = read_image(tmp_path / "o" / "v_mask.nii.gz")
    assert mask.shape == (4, 24, 24) and meta.spacing == (3.0, 1.0, 1.0)


def test_checkpoint_path_as_weights_is_not_random(images, tmp_path, capsys):
    save_checkpoint(make_analytic(num_classes=2), tmp_path / "ck" / "net", dtype="float32",
                    normalization={"mode": "none"})
    rc, _, err = _run(capsys, "predict", images / "a.tif", "-o", tmp_path / "o", "--weights",
                      tmp_path / "ck" / "net.safetensors", "-q")
    assert rc == 0, err
    assert "RANDOMLY" not in err


def test_plan_only_prints_the_plan(images, tmp_path, capsys):
    rc, out, err = _run(capsys, "predict", images / "a.tif", "-o", tmp_path / "o", "--model",
                        "analytic", "--tile", "16", "--plan-only", "--tta")
    assert rc == 0, err
    assert "12 tiles of 16x16" in out and "x4 TTA" in out and "ms per tile pass" in out
    assert not (tmp_path / "o").exists()


def test_tta_follows_the_weights_unless_the_user_says_otherwise(images, tmp_path, capsys):
    from napari_medseg.engine.seg_task import SegTask, with_task
    from napari_medseg.models import create_model

    model = with_task(create_model("unet_sharp", "tiny", 1, 3), SegTask("instances", tta=True))
    save_checkpoint(model, tmp_path / "ck" / "tta", classes=("background", "interior",
                                                              "boundary"))
    base = ("predict", images / "a.tif", "-o", tmp_path / "o", "--weights",
            tmp_path / "ck" / "tta.safetensors", "--tile", "16", "--plan-only")
    rc, out, err = _run(capsys, *base)
    assert rc == 0 and "x4 TTA" in out, err  # tuned with flip TTA: on by default
    rc, out, err = _run(capsys, *base, "--no-tta")
    assert rc == 0 and "TTA" not in out, err


def test_tile_larger_than_the_image_is_clamped(images, tmp_path, capsys):
    rc, _, err = _run(capsys, "predict", images / "a.tif", "-o", tmp_path / "o", "--model",
                      "analytic", "--tile", "4096")
    assert rc == 0 and "larger than the image" in err


@pytest.mark.parametrize("argv,match", [
    (["--model", "no_such_net"], "choose one of: analytic, "),
    (["--weights", "no-such-tag"], "Unknown weights 'no-such-tag'"),
    (["--model", "analytic", "--overlap", "1.5"], "Overlap must be"),
    (["--model", "analytic", "--device", "cuda:7"], "not available"),
    (["--model", "analytic", "--outputs", "mask,edges"], "Unknown output 'edges'"),
])
def test_bad_names_and_settings_are_one_sentence(images, tmp_path, capsys, argv, match):
    rc, _, err = _run(capsys, "predict", images / "a.tif", "-o", tmp_path / "o", *argv)
    assert rc == 2
    assert match in _one_error_line(err)


def test_nan_pixels_are_one_sentence(tmp_path, capsys):
    image = np.ones((20, 20), np.float32)
    image[2, 2] = np.nan
    write_image(tmp_path / "nan.tif", image)
    rc, _, err = _run(capsys, "predict", tmp_path / "nan.tif", "-o", tmp_path / "o",
                      "--model", "analytic")
    assert rc == 2 and "NaN" in _one_error_line(err)


def test_wrong_channel_count_is_one_sentence(tmp_path, capsys):
    save_checkpoint(make_analytic(num_classes=2, in_channels=1), tmp_path / "grey",
                    dtype="float32")
    write_image(tmp_path / "two.tif", np.ones((2, 20, 20), np.float32), ImageMeta("CYX"))
    rc, _, err = _run(capsys, "predict", tmp_path / "two.tif", "-o", tmp_path / "o",
                      "--weights", tmp_path / "grey.safetensors")
    assert rc == 2 and "expects 1" in _one_error_line(err)


def test_rgb_image_on_a_grey_network_is_converted_with_a_notice(tmp_path, capsys):
    save_checkpoint(make_analytic(num_classes=2, in_channels=1), tmp_path / "grey",
                    dtype="float32")
    rgb = np.random.default_rng(0).integers(0, 255, (20, 24, 3)).astype(np.uint8)
    write_image(tmp_path / "rgb.tif", rgb, ImageMeta("YXC", rgb=True))
    rc, _, err = _run(capsys, "predict", tmp_path / "rgb.tif", "-o", tmp_path / "o",
                      "--weights", tmp_path / "grey.safetensors")
    assert rc == 0, err
    assert "RGB to grey" in err


def test_missing_input_is_one_sentence(tmp_path, capsys):
    rc, _, err = _run(capsys, "predict", tmp_path / "nope.tif", "-o", tmp_path / "o",
                      "--model", "analytic")
    assert rc == 2 and "does not exist" in _one_error_line(err)


def test_models_json_lists_networks_and_weights(tmp_path, monkeypatch, capsys):
    weights = tmp_path / "weights"
    (tmp_path / "models").mkdir()
    info = save_checkpoint(make_analytic(num_classes=2), weights / "w", dtype="float32")
    (tmp_path / "models" / "w.yaml").write_text(yaml.safe_dump({
        "tag": "analytic-demo", "network": "analytic", "variant": "tiny",
        "dataset": "dsb2018_nuclei", "weights": "w.safetensors", "sha256": info.sha256,
        "config": info.config, "normalization": None, "metrics": {}}))
    monkeypatch.setenv(resources.ENV_WEIGHTS, str(weights))
    rc, out, _ = _run(capsys, "models", "--json")
    assert rc == 0
    data = json.loads(out)
    assert "analytic" in {n["network"] for n in data["networks"]}
    entry = next(w for w in data["weights"] if w["tag"] == "analytic-demo")
    assert {entry["network"], entry["variant"], entry["dataset"]} == {
        "analytic", "tiny", "dsb2018_nuclei"}
    rc, out, _ = _run(capsys, "models")
    assert "analytic-demo" in out
    # The tag works for predict too.
    write_image(tmp_path / "img.tif", np.zeros((16, 16), np.uint8))
    rc, _, err = _run(capsys, "predict", tmp_path / "img.tif", "-o", tmp_path / "x",
                      "--weights", "analytic-demo", "-q")
    assert rc == 0 and "RANDOMLY" not in err, err


def test_models_says_which_weights_give_objects_and_flip_average(capsys):
    from napari_medseg.engine.checkpoints import list_shipped_weights

    rc, out, _ = _run(capsys, "models")
    assert rc == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    for w in list_shipped_weights():
        task = w["task"] or {}
        assert ("flip TTA by default" in lines[w["tag"]]) == bool(task.get("tta")), w["tag"]
        assert ("objects" in lines[w["tag"]]) == (task.get("kind") == "instances"), w["tag"]


def test_a_real_network_on_the_bundled_sample(tmp_path, capsys):
    from napari_medseg.models import list_models

    sample = resources.samples_dir() / "nuclei.tif"
    if not sample.is_file():
        pytest.skip("the bundled nuclei sample is not there yet")
    name = "unet_sharp" if "unet_sharp" in list_models() else list_models()[0]
    torch.manual_seed(0)
    rc, _, err = _run(capsys, "predict", sample, "-o", tmp_path / "o", "--model", name,
                      "--variant", "tiny", "--outputs", "mask,boundary", "-q")
    assert rc == 0, err
    mask, _ = read_image(tmp_path / "o" / "nuclei_mask.tif")
    assert mask.shape == np.asarray(read_image(sample)[0]).shape[:2]
