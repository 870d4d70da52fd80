"""SASR-Net in one pairing: trained, validated, fine-tuned and predicting with the image
shrunk by its scale in and the image's own grid out; the super-resolved outputs on request."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from napari_medseg.config import TrainConfig
from napari_medseg.engine.checkpoints import load_checkpoint, save_checkpoint
from napari_medseg.engine.inference.pipeline import predict
from napari_medseg.errors import ConfigError
from napari_medseg.io.samples import sample_path
from napari_medseg.models import create_model
from napari_medseg.models.working_resolution import (WorkingResolution, super_resolved,
                                                     with_downsample)


@pytest.fixture()
def sr_model():
    torch.manual_seed(0)
    return with_downsample(create_model("sasrnet", "tiny", 1, 2), 2).eval()


def test_the_mask_is_on_the_image_grid_and_super_resolved_on_request(sr_model):
    image = np.random.default_rng(0).random((96, 128)).astype(np.float32)
    on_grid = predict(image, sr_model, {"outputs": "mask,probabilities", "device": "cpu"})
    assert np.asarray(on_grid["mask"]).shape == (96, 128)
    assert np.asarray(on_grid["probabilities"]).shape == (2, 96, 128)
    big = predict(image, sr_model, {"outputs": "mask", "device": "cpu",
                                    "super_resolved": True})
    assert np.asarray(big["mask"]).shape == (192, 256)
    # the input-grid run is the bare network on the image shrunk by two (the training pairing)
    with torch.no_grad():
        x = torch.from_numpy(image)[None, None]
        lo, hi = x.quantile(0.01), x.quantile(0.998)
        shrunk = torch.nn.functional.avg_pool2d((x - lo) / (hi - lo), 2)
        direct = torch.softmax(super_resolved(sr_model)(shrunk)["mask"].float(), 1)[0, 1]
    got = np.asarray(on_grid["probabilities"], np.float32)[1]
    assert np.abs(got - direct.numpy()).mean() < 0.02
    with pytest.raises(ConfigError, match="not a super-resolution"):
        predict(image, create_model("unet_sharp", "tiny", 1, 2), {"super_resolved": True})


def test_training_saves_a_super_resolution_network_on_the_input_grid(tmp_path):
    from napari_medseg.engine.training.train import train

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    img = tifffile.imread(sample_path("nuclei"))
    ref = tifffile.imread(sample_path("nuclei", mask=True))
    for i in range(2):
        tifffile.imwrite(images / f"n{i}.tif", img[:, i * 64:])
        tifffile.imwrite(masks / f"n{i}.tif", (ref[:, i * 64:] > 0).astype(np.uint8))
    cfg = TrainConfig.from_mapping({"network": "sasrnet", "variant": "tiny", "steps": 2,
                                    "batch_size": 2, "patch": 64, "val_every": 2,
                                    "val_fraction": 0.5, "device": "cpu", "precision": "fp32"})
    result = train(images, masks, tmp_path / "sr.safetensors", cfg)
    model, info = load_checkpoint(result.checkpoint)
    assert info.input_downsample == 2 and isinstance(model, WorkingResolution)
    out = predict(img, model, {"outputs": "mask", "device": "cpu"})
    assert np.asarray(out["mask"]).shape == img.shape


def test_cli_predict_writes_the_image_grid_unless_super_resolved(tmp_path, sr_model):
    from napari_medseg.cli import main

    save_checkpoint(sr_model, tmp_path / "sr", dtype="float32")
    image = (np.random.default_rng(1).random((64, 96)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", image)
    for flag, shape in (([], (64, 96)), (["--super-resolved"], (128, 192))):
        out = tmp_path / f"out{len(flag)}.tif"
        rc = main(["predict", str(tmp_path / "a.tif"), "--weights",
                   str(tmp_path / "sr.safetensors"), "-o", str(out), "--device", "cpu", "-q",
                   *flag])
        assert rc == 0 and tifffile.imread(out).shape == shape
