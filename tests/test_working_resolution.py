"""Networks run at a coarser working resolution (models/working_resolution.py): the wrapper's
arithmetic, its checkpoints, prediction at full resolution and training with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_medseg.config import TrainConfig
from napari_medseg.engine.checkpoints import load_checkpoint, save_checkpoint
from napari_medseg.engine.inference.pipeline import predict
from napari_medseg.engine.training.train import train_iter
from napari_medseg.errors import ConfigError
from napari_medseg.models import create_model
from napari_medseg.models.working_resolution import (
    WorkingResolution,
    input_downsample,
    unwrap,
    with_downsample,
)


ROOT = Path(__file__).resolve().parents[1]


def _net(channels: int = 3):
    torch.manual_seed(0)
    return create_model("sa2net", variant="tiny", in_channels=channels, num_classes=2).eval()


def test_wrapper_pools_runs_and_upsamples():
    net = _net()
    model = WorkingResolution(net, 2).eval()
    assert model.spec.divisor == 2 * net.spec.divisor
    assert model.spec.min_size == 2 * net.spec.min_size
    assert model.spec.preferred_tile == 2 * net.spec.preferred_tile
    assert model.spec.extra["input_downsample"] == 2
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        out = model(x)
        ref = net(F.avg_pool2d(x, 2))
    assert out["mask"].shape == (1, 2, 128, 96)
    expected = F.interpolate(ref["mask"], scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["mask"], expected)
    assert unwrap(model) is net and input_downsample(model) == 2 and input_downsample(net) == 1
    assert with_downsample(net, 1) is net


def test_wrapper_takes_a_super_resolution_network_only_at_its_scale_and_not_factor_one():
    sr = create_model("sasrnet", variant="tiny", in_channels=3, num_classes=2)
    with pytest.raises(ConfigError, match="own scale"):
        WorkingResolution(sr, 4)
    on_grid = WorkingResolution(sr, 2)
    assert on_grid.spec.output_scale == 1 and on_grid.upsample == 1
    with pytest.raises(ConfigError, match="2 or more"):
        WorkingResolution(_net(), 1)


def test_checkpoint_keeps_the_factor_and_the_plain_network_tensors(tmp_path):
    model = WorkingResolution(_net(), 3).eval()
    info = save_checkpoint(model, tmp_path / "ws", dtype="float32")
    assert info.input_downsample == 3
    assert json.loads((tmp_path / "ws.json").read_text())["input_downsample"] == 3
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ws.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("net.") for k in keys)
    loaded, linfo = load_checkpoint(tmp_path / "ws")
    assert isinstance(loaded, WorkingResolution) and loaded.factor == 3
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["mask"], model(x)["mask"])
    # A plain network still loads as itself.
    save_checkpoint(_net(), tmp_path / "plain", dtype="float32")
    plain, pinfo = load_checkpoint(tmp_path / "plain")
    assert pinfo.input_downsample == 1 and not isinstance(plain, WorkingResolution)


def test_prediction_comes_back_at_the_image_size():
    model = WorkingResolution(_net(1), 2)
    image = np.random.default_rng(0).random((101, 137), np.float32)
    result = predict(image, model, device="cpu", precision="fp32", tile=128,
                     outputs=("mask", "probabilities"))
    assert result["mask"].shape == (101, 137)
    assert result["probabilities"].shape == (2, 101, 137)


def test_training_at_a_working_resolution_records_it(tmp_path, nuclei_folders):
    images, masks = nuclei_folders
    cfg = TrainConfig.from_mapping({
        "network": "sa2net", "variant": "tiny", "in_channels": 3, "num_classes": 2,
        "input_downsample": 2, "patch": 128, "batch_size": 2, "steps": 2, "val_every": 2,
        "val_fraction": 0.5, "warmup_steps": 1, "device": "cpu", "precision": "fp32"})
    gen = train_iter(images, masks, tmp_path / "ck.safetensors", cfg)
    for _ in gen:
        pass
    model, info = load_checkpoint(tmp_path / "ck")
    assert info.input_downsample == 2 and isinstance(model, WorkingResolution)
    with pytest.raises(ConfigError):
        TrainConfig(input_downsample=0)


def test_fine_tuning_a_downsampled_network_keeps_its_working_resolution(tmp_path):
    from napari_medseg.config import FinetuneConfig
    from napari_medseg.engine.training.finetune import finetune, samples_from_corrections

    rng = np.random.default_rng(0)
    image = rng.normal(0.2, 0.05, (192, 192)).astype(np.float32)
    truth = np.zeros((192, 192), np.uint8)
    truth[40:150, 30:160] = 1
    image[truth > 0] += 0.6
    model = WorkingResolution(_net(1), 2)
    cfg = FinetuneConfig.from_mapping({"device": "cpu", "precision": "fp32", "batch_size": 2,
                                       "patch": 48, "steps": 2, "val_every": 2, "patience": 0,
                                       "val_fraction": 0.5})
    samples = samples_from_corrections(image, truth, num_classes=2, in_channels=1,
                                       prediction=np.zeros_like(truth), config=cfg)
    result = finetune(model, samples, cfg, output=tmp_path / "ft")
    assert isinstance(result.model, WorkingResolution) and result.model.factor == 2
    _, info = load_checkpoint(tmp_path / "ft")
    assert info.input_downsample == 2


def test_the_shipped_lesion_weights_run_at_a_third_of_the_resolution():
    from napari_medseg.engine.checkpoints import list_shipped_weights, resolve_weights

    shipped = {w["tag"]: w for w in list_shipped_weights()}
    if "sa2net_lite_ph2" not in shipped:
        pytest.skip("the PH2 weights are not installed")
    assert shipped["sa2net_lite_ph2"]["input_downsample"] == 3
    assert shipped["sa2net_lite_dsb2018"]["input_downsample"] == 1
    model, info = resolve_weights("sa2net_lite_ph2")
    assert isinstance(model, WorkingResolution) and model.factor == 3
    # On the bundled photograph (a validation image of those weights) at its native size.
    from napari_medseg.engine.metrics import dice
    from napari_medseg.io.samples import load_sample

    image, meta, truth = load_sample("dermoscopy")
    result = predict(image, model, device="cpu", axes=meta.axes)
    assert result["mask"].shape == truth.shape
    assert dice(result["mask"] > 0, truth > 0) > 0.9


def test_a_small_tile_for_a_downsampled_network_gets_a_warning():
    from napari_medseg.engine.inference.pipeline import predict_iter
    from napari_medseg.engine.inference.planning import plan_prediction
    from napari_medseg.engine.progress import NoticeEvent

    model = WorkingResolution(_net(1), 2)
    image = np.random.default_rng(1).random((200, 200), np.float32)

    def notices(data=image, **settings) -> list[str]:
        return [e.message for e in predict_iter(data, model, device="cpu", precision="fp32",
                                                **settings) if isinstance(e, NoticeEvent)]

    assert any("1/2 resolution" in m for m in notices(tile=64))
    assert not any("resolution" in m for m in notices())  # the automatic tile
    # An image a third larger than the automatic tile: balancing shrinks the tile, which is
    # neither the user's small tile nor a tile clamped to a small image.
    side = model.spec.preferred_tile * 4 // 3
    big = np.random.default_rng(2).random((side, side), np.float32)
    plan = plan_prediction(big, model, device="cpu", precision="fp32", probe=False)
    assert max(plan.grid.tile) < model.spec.preferred_tile
    assert not any("resolution" in m or "larger than the image" in m for m in notices(big))


def test_a_recorded_tile_travels_with_the_weights_and_sets_the_default_tile(tmp_path):
    from napari_medseg.engine.checkpoints import CheckpointInfo, with_tile
    from napari_medseg.engine.inference.planning import plan_prediction
    from napari_medseg.errors import CheckpointError

    model = with_tile(WorkingResolution(_net(1), 2), 160)
    info = save_checkpoint(model, tmp_path / "wide", dtype="float32")
    assert info.tile == 160
    loaded, linfo = load_checkpoint(tmp_path / "wide")
    assert loaded.spec.preferred_tile == 160 and linfo.tile == 160
    image = np.zeros((300, 300), np.float32)
    assert plan_prediction(image, loaded, device="cpu").grid.tile == (160, 160)
    assert plan_prediction(image, loaded, device="cpu", tile=96).grid.tile == (96, 96)
    # weights saved from the loaded ones (a fine-tune, a re-save) keep it
    assert save_checkpoint(loaded, tmp_path / "child", dtype="float32").tile == 160
    # without one: the network's preferred tile, and no key in the description
    plain = save_checkpoint(WorkingResolution(_net(1), 2), tmp_path / "plain")
    assert "tile" not in plain.to_dict()
    assert load_checkpoint(tmp_path / "plain")[0].spec.preferred_tile == 512
    # an edited tile is an edited description; a tile that is no side is refused
    described = json.loads((tmp_path / "wide.json").read_text())
    described["tile"] = 320
    (tmp_path / "wide.json").write_text(json.dumps(described))
    with pytest.raises(CheckpointError, match="its 'tile' differs"):
        load_checkpoint(tmp_path / "wide")
    for bad in (8, 100.5, "whole", True, float("inf"), float("nan")):
        with pytest.raises(CheckpointError, match="invalid tile"):
            CheckpointInfo.from_dict({**plain.to_dict(), "tile": bad})


def test_a_larger_cameras_photograph_is_judged_whole_with_the_lesion_weights():
    """The bundled photograph enlarged 1.35x, as a camera with more pixels gives it: the
    lesion weights record a 1536 px tile, so the photograph is predicted in one piece. Cut
    into the network's own 768 px tiles, each part misses the lesion's surroundings."""
    from skimage.transform import rescale

    from napari_medseg.engine.checkpoints import list_shipped_weights, resolve_weights
    from napari_medseg.engine.metrics import dice
    from napari_medseg.io.samples import load_sample

    if "sa2net_lite_ph2" not in {w["tag"] for w in list_shipped_weights()}:
        pytest.skip("the PH2 weights are not installed")
    model, info = resolve_weights("sa2net_lite_ph2")
    assert info.tile == 1536 and model.spec.preferred_tile == 1536
    image, meta, truth = load_sample("dermoscopy")
    big = rescale(image, 1.35, channel_axis=-1, anti_aliasing=True,
                  preserve_range=True).astype(np.uint8)
    ref = rescale(truth.astype(np.float32), 1.35, order=0) > 0.5
    whole = predict(big, model, device="cpu", axes=meta.axes)["mask"] > 0
    cut = predict(big, model, device="cpu", axes=meta.axes, tile=768)["mask"] > 0
    assert dice(whole, ref) > 0.95
    assert dice(cut, ref) < dice(whole, ref) - 0.1


def test_the_tile_reaches_the_wrapped_network_a_widened_start_and_a_card(tmp_path):
    import yaml

    from napari_medseg.engine.cards import ModelCard
    from napari_medseg.engine.checkpoints import with_tile
    from napari_medseg.engine.pixel_size import pixel_size_of, with_pixel_size
    from napari_medseg.engine.training.start import widen_classes
    from napari_medseg.errors import CheckpointError

    model = with_tile(with_pixel_size(WorkingResolution(_net(1), 2), {
        "value": 0.5, "unit": "micrometer"}), 160)
    assert model.net.spec.preferred_tile == 80 and model.net.spec.extra["tile"] == 160
    # a foreground network widened to the instance task's three classes keeps both facts
    wide = widen_classes(model, 3)
    assert wide.spec.num_classes == 3 and wide.spec.preferred_tile == 160
    assert pixel_size_of(wide) is not None and pixel_size_of(wide).value == 0.5
    # a card's tile is checked as the card's, in one sentence
    card = yaml.safe_load(next(ROOT.glob("models/sa2net_lite_ph2.yaml")).read_text())
    card["tile"] = 4
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(card))
    with pytest.raises(CheckpointError, match="model card bad.yaml has an invalid tile"):
        ModelCard.from_file(path).info()
