"""bioimage.io model packages: out with ``napari-medseg export``, in with ``--weights model.zip``.

A fine-tuned checkpoint (the shipped EM weights with one changed tensor, a parent and a data
hash) is exported once; bioimage.io's own check (the ``bioimageio test`` command, through
``napari_medseg.engine.export.check``) runs its test tensors through the ONNX, TorchScript and
pytorch_state_dict weights; ``predict --weights model.zip`` gives the checkpoint's mask; the
description states sizes, normalisation, activation, citations and lineage; bad packages and
outputs are refused in one sentence. The slow test checks the package of every shipped weight.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("bioimageio.spec")
pytest.importorskip("bioimageio.core")
pytest.importorskip("onnxruntime")

from napari_medseg.cli import main  # noqa: E402
from napari_medseg.engine.checkpoints import (  # noqa: E402
    list_shipped_weights, read_checkpoint_info, resolve_weights, save_checkpoint)
from napari_medseg.errors import CheckpointError  # noqa: E402

BASE = "sa2net_lite_isbi2012"  # one input channel: the smallest test tensors
DATA_HASH = "0123456789abcdef"


def _shipped(tag: str) -> bool:
    return any(w["tag"] == tag for w in list_shipped_weights())


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """``(checkpoint json, package zip)``: a checkpoint fine-tuned from the shipped EM weights
    (one bias changed), and its package written by ``napari-medseg export``."""
    import torch

    if not _shipped(BASE):
        pytest.skip(f"the shipped weights {BASE} are not installed")
    folder = tmp_path_factory.mktemp("bioimageio")
    model, info = resolve_weights(BASE)
    with torch.no_grad():
        bias = next(p for name, p in model.named_parameters() if name.endswith("bias"))
        bias.add_(0.01)
    saved = save_checkpoint(
        model, folder / "mine", normalization=info.normalization, classes=info.classes,
        training_data={"dataset": "isbi2012_em", "data_hash": DATA_HASH},
        metrics={"val_dice": 0.8}, parent=info.sha256, dtype="float32")
    package = folder / "mine.zip"
    assert main(["export", "--weights", str(folder / "mine.json"), "--format", "bioimageio",
                 "-o", str(package)]) == 0
    return folder / "mine.json", package, saved


def _rdf(package: Path) -> dict:
    with zipfile.ZipFile(package) as archive:
        return yaml.safe_load(archive.read("rdf.yaml"))


def test_package_passes_bioimageio_test(finetuned, tmp_path):
    """`bioimageio test model.zip` passes: every weight format reproduces the test tensors
    and runs at the parameterised sizes."""
    _, package, _ = finetuned
    summary = tmp_path / "summary.json"
    run = subprocess.run(
        [sys.executable, "-m", "napari_medseg.engine.export.check", "test", str(package),
         "--summary", str(summary)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    result = json.loads(summary.read_text())
    assert result["status"] == "passed"
    passed = {d["name"] for d in result["details"] if d["status"] == "passed"}
    for fmt in ("onnx", "torchscript", "pytorch_state_dict"):
        assert f"Reproduce test outputs from test inputs ({fmt})" in passed
        assert f"Run {fmt} inference for inputs with batch_size: 2 and size parameter n: 2" \
            in passed
    assert not [d for d in result["details"] if d["status"] == "failed"]


def test_package_predicts_the_checkpoints_mask(finetuned, tmp_path):
    """`predict --weights model.zip` writes the very mask the checkpoint gives."""
    import tifffile

    from napari_medseg.io.samples import sample_path

    checkpoint, package, _ = finetuned
    image = tmp_path / "em.tif"
    tifffile.imwrite(image, tifffile.imread(sample_path("em_stack"))[0])
    for name, weights in (("a", package), ("b", checkpoint)):
        assert main(["predict", str(image), "-o", str(tmp_path / name),
                     "--weights", str(weights), "--device", "cpu"]) == 0
    from_package = tifffile.imread(tmp_path / "a" / "em_mask.tif")
    from_checkpoint = tifffile.imread(tmp_path / "b" / "em_mask.tif")
    assert from_package.shape == (256, 256) and from_package.any()
    np.testing.assert_array_equal(from_package, from_checkpoint)


def test_package_describes_the_network_and_its_lineage(finetuned):
    checkpoint, package, saved = finetuned
    rdf = _rdf(package)
    model, _ = resolve_weights(str(checkpoint))
    spec = model.spec
    (tensor,) = rdf["inputs"]
    sizes = {a.get("id", a["type"]): a.get("size") for a in tensor["axes"]}
    assert sizes["y"] == sizes["x"] == {"min": spec.min_size, "step": spec.divisor}
    pre = [p["id"] for p in tensor["preprocessing"]]
    assert "scale_range" in pre
    scale = next(p for p in tensor["preprocessing"] if p["id"] == "scale_range")["kwargs"]
    assert (scale["min_percentile"], scale["max_percentile"]) == (1.0, 99.8)
    (mask,) = rdf["outputs"]
    assert [p["id"] for p in mask["postprocessing"]][0] == "softmax"
    assert set(rdf["weights"]) == {"onnx", "torchscript", "pytorch_state_dict"}
    dois = {c.get("doi") for c in rdf["cite"]}
    assert "10.48550/arXiv.2309.16661" in dois  # the network's paper
    assert "10.3389/fnana.2015.00142" in dois  # the training data's
    assert rdf["license"] and rdf["documentation"] and rdf["covers"]
    lineage = rdf["config"]["napari_medseg"]
    assert lineage["parent"] == saved.parent and lineage["data_hash"] == DATA_HASH
    assert lineage["weights_sha256"] == saved.sha256
    # What a package-aware reader gets back is the checkpoint, verified.
    assert read_checkpoint_info(package).sha256 == saved.sha256


def test_export_refuses_its_inputs_and_existing_files(finetuned, tmp_path, capsys):
    checkpoint, package, _ = finetuned
    before = hashlib.sha256(package.read_bytes()).hexdigest()
    # Re-exporting a package onto itself, even with --overwrite.
    assert main(["export", "--weights", str(package), "-o", str(package), "--overwrite"]) == 2
    assert "napari-medseg: error:" in capsys.readouterr().err
    # An existing file without --overwrite.
    other = tmp_path / "other.zip"
    other.write_bytes(b"keep me")
    assert main(["export", "--weights", str(checkpoint), "-o", str(other)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert other.read_bytes() == b"keep me"
    # Not a zip.
    assert main(["export", "--weights", str(checkpoint), "-o", str(tmp_path / "m.onnx")]) == 2
    assert ".zip" in capsys.readouterr().err
    assert hashlib.sha256(package.read_bytes()).hexdigest() == before


def test_a_zip_that_is_not_our_package_is_refused(tmp_path, capsys):
    """A foreign zip (no napari-medseg checkpoint in its description) gets one sentence."""
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("rdf.yaml", yaml.safe_dump({"type": "model", "name": "other",
                                                      "config": {}}))
        archive.writestr("weights.onnx", b"\x00")
    image = tmp_path / "img.tif"
    import tifffile

    tifffile.imwrite(image, np.zeros((32, 32), np.uint8))
    assert main(["predict", str(image), "-o", str(tmp_path / "out"),
                 "--weights", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "is not a napari-medseg model package" in err and "Traceback" not in err
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable zip"):
        resolve_weights(str(junk))


def test_a_changed_checkpoint_inside_a_package_is_refused(finetuned, tmp_path):
    """The attachment is checked against the sha256 the package lists, and the checkpoint
    against its own description: a changed weights file never loads."""
    _, package, _ = finetuned
    rdf = _rdf(package)
    weights_name = rdf["config"]["napari_medseg"]["checkpoint"]["weights"]
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == weights_name:
                data = data[:-4] + b"\x00\x00\x80\x3f"
            dst.writestr(item, data)
    with pytest.raises(CheckpointError, match="sha256"):
        resolve_weights(str(tampered))
    # Dropping the listed sha256 still leaves the checkpoint's own check.
    relisted = tmp_path / "relisted.zip"
    for entry in rdf["attachments"]:
        entry.pop("sha256", None)
    with zipfile.ZipFile(tampered) as src, zipfile.ZipFile(relisted, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "rdf.yaml":
                data = yaml.safe_dump(rdf).encode()
            dst.writestr(item, data)
    with pytest.raises(CheckpointError, match="no sha256 listed"):
        resolve_weights(str(relisted))


def test_a_description_naming_other_weights_is_refused(finetuned, tmp_path):
    """Loading follows the weights file the description names: a package whose description
    points elsewhere (``../x``) would load a file its hashes never covered."""
    import hashlib
    import json

    _, package, _ = finetuned
    rdf = _rdf(package)
    described = rdf["config"]["napari_medseg"]["checkpoint"]["description"]
    with zipfile.ZipFile(package) as src:
        description = json.loads(src.read(described))
    description["weights"] = "../outside.safetensors"
    content = json.dumps(description).encode()
    for entry in rdf["attachments"]:
        if str(entry.get("source", "")).endswith(described):
            entry["sha256"] = hashlib.sha256(content).hexdigest()
    redirected = tmp_path / "redirected.zip"
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(redirected, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == described:
                data = content
            elif item.filename == "rdf.yaml":
                data = yaml.safe_dump(rdf).encode()
            dst.writestr(item, data)
    with pytest.raises(CheckpointError, match="names the weights"):
        resolve_weights(str(redirected))


@pytest.mark.slow
@pytest.mark.parametrize("tag", [w["tag"] for w in list_shipped_weights()])
def test_every_shipped_weight_exports_and_passes_bioimageio_test(tag, tmp_path):
    """Each shipped weight's package passes bioimage.io's test (MSA2Net's attention at the
    parameterised sizes, SASR-Net's x2 output, the PH2 weights' working resolution)."""
    from napari_medseg.engine.export.bioimageio import export_bioimageio
    from napari_medseg.engine.export.check import test_package

    package = export_bioimageio(tag, tmp_path / f"{tag}.zip").path
    summary = test_package(package)
    failed = [(d.name, [e.msg for e in d.errors]) for d in summary.details
              if d.status == "failed"]
    assert summary.status == "passed", json.dumps(failed)[:3000]
    model, info = resolve_weights(tag)
    assert resolve_weights(str(package))[1].sha256 == info.sha256
    with zipfile.ZipFile(package) as z:  # the pixel size the weights were trained at
        rdf = yaml.safe_load(z.read("rdf.yaml"))
    value, unit = ((info.pixel_size["value"], info.pixel_size["unit"]) if info.pixel_size
                   else (1.0, None))
    for tensor, per in [(rdf["inputs"][0], 1.0)] + [
            (t, model.spec.output_scale) for t in rdf["outputs"]]:
        space = [a for a in tensor["axes"] if a.get("id") in ("y", "x")]
        assert len(space) == 2
        for axis in space:
            assert (axis.get("scale", 1.0), axis.get("unit")) == (value / per, unit), axis
    # the prediction tile the weights record reaches other tools in words and in the config
    lineage = rdf["config"]["napari_medseg"]
    if info.tile:
        assert lineage["tile"] == info.tile
        with zipfile.ZipFile(package) as z:
            assert f"prediction tile: {info.tile} px" in z.read("README.md").decode()
    else:
        assert "tile" not in lineage
