"""Issue #20, cases 2b, 3 and 4: numbers checked where they are used, descriptions verified,
checkpoints written with the user's permissions."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from analytic_models import make_analytic
from napari_medseg import resources
from napari_medseg.config import NormalizationConfig
from napari_medseg.engine.checkpoints import (
    load_checkpoint,
    resolve_weights,
    save_checkpoint,
    sha256_file,
)
from napari_medseg.engine.descriptions import HEADER_HASH_KEY, HEADER_KEY, description_sha256
from napari_medseg.engine.inference.normalization import fit_normalization, normalize
from napari_medseg.engine.inference.pipeline import predict
from napari_medseg.engine.inference.predictor import TilePredictor
from napari_medseg.engine.precision import resolve_precision
from napari_medseg.engine.training.lineage import save_checkpoint_atomic
from napari_medseg.errors import CheckpointError, InputShapeError, MedsegError
from napari_medseg.models import create_model, list_models

NETWORK = "unet_sharp" if "unet_sharp" in list_models() else list_models()[0]
FP32 = {"precision": "fp32", "device": "cpu"}


def _one_sentence(err) -> None:
    text = str(err.value)
    assert text.endswith(".") and text.count(". ") == 0, text


@pytest.fixture(scope="module")
def tiny():
    return create_model(NETWORK, variant="tiny", in_channels=1, num_classes=2, seed=0).eval()


def _image(scale: float = 1.0, dtype=np.float64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((48, 48)) * scale).astype(dtype)


# --- 3: numbers beyond float32 -------------------------------------------------------------


def test_float64_image_beyond_float32_range_is_refused_before_any_work():
    image = _image(1e40)  # was: an all-zero mask, exit 0
    with pytest.raises(InputShapeError, match="float32") as err:
        predict(image, make_analytic(), **FP32)
    _one_sentence(err)


def test_lazy_float64_image_beyond_float32_range_is_refused(tmp_path):
    zarr = pytest.importorskip("zarr")
    image = _image(1e40)
    z = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=image.shape,
                        chunks=(16, 16), dtype="f8")
    z[:] = image
    with pytest.raises(InputShapeError, match="float32"):
        predict(z, make_analytic(), **FP32)


def test_float64_image_below_float32_range_is_refused():
    with pytest.raises(InputShapeError, match="float32") as err:
        predict(_image(1e-300), make_analytic(), **FP32)  # was: zeros in float32, no mask
    _one_sentence(err)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_image_of_small_values_is_scaled_by_its_own_range(dtype):
    # Percentiles 1e-30 apart were floored to a 1e-6 scale: flat, an all-background mask.
    image = _image()
    settings = {"outputs": ("probabilities",), **FP32}
    expected = predict(image.astype(dtype), make_analytic(), **settings)["probabilities"]
    small = predict((image * 1e-30).astype(dtype), make_analytic(), **settings)["probabilities"]
    np.testing.assert_allclose(small, expected, atol=1e-4)


def test_float64_image_within_float32_range_still_predicts():
    result = predict(_image(1e30), make_analytic(), **FP32)
    assert result["mask"].any() and not result["mask"].all()


def test_statistics_that_overflow_float32_are_refused():
    # Both values fit float32, their difference (the minmax scale) does not.
    samples = np.array([[-3e38, 3e38, 0.0, 1.0]])
    with pytest.raises(InputShapeError, match="float32") as err:
        fit_normalization(samples, NormalizationConfig(mode="minmax"))
    _one_sentence(err)


def test_training_normalize_refuses_an_overflowing_image():
    with pytest.raises(InputShapeError, match="float32"):
        normalize(_image(1e40))


def test_non_finite_tiles_fed_to_the_network_are_refused():
    predictor = TilePredictor(make_analytic(), torch.device("cpu"), resolve_precision("fp32",
                              torch.device("cpu")), channels_last=False, batch_size=2)
    batch = np.zeros((2, 1, 32, 32), np.float32)
    predictor(batch)  # the probe
    batch[1, 0, 3, 3] = np.inf
    with pytest.raises(InputShapeError, match="NaN or infinite"):
        predictor(batch)


def test_a_network_returning_nan_is_an_error_not_an_empty_mask():
    broken = make_analytic()
    with torch.no_grad():
        broken.gain.fill_(float("nan"))  # was: NaN probabilities, an all-background mask
    with pytest.raises(MedsegError, match="NaN or infinite values in fp32") as err:
        predict(_image(), broken, **FP32)
    _one_sentence(err)



class _OverflowsInHalf(torch.nn.Module):
    """An analytic network whose outputs are NaN whenever it runs under bf16/fp16 autocast
    (as a CPU kernel that overflows in bf16 did on one CI machine)."""

    def __init__(self):
        super().__init__()
        self.inner = make_analytic(boundary=True)
        self.spec = self.inner.spec
        self.half_calls = 0

    def forward(self, x):
        out = self.inner(x)
        if torch.is_autocast_enabled(x.device.type):
            self.half_calls += 1
            out = {k: v * float("nan") for k, v in out.items()}
        return out


def test_nan_in_bf16_runs_again_in_fp32_with_a_warning_and_the_fp32_result():
    image = _image()
    expected = predict(image, make_analytic(boundary=True), outputs="mask,boundary", **FP32)
    net = _OverflowsInHalf().eval()
    result = predict(image, net, outputs="mask,boundary", precision="bf16", device="cpu")
    assert net.half_calls == 1  # one batch in bf16, then fp32 for the rest of the run
    np.testing.assert_array_equal(result["mask"], expected["mask"])
    np.testing.assert_allclose(result["boundary"], expected["boundary"], atol=1e-6)
    assert result.stats["precision"] == "fp32"
    assert any("NaN or infinite values in bf16" in n and "continues in fp32" in n
               for n in result.notices), result.notices

# --- 4: the description is verified ----------------------------------------------------------


def _edit(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def test_hash_of_the_description_is_in_the_json_and_the_header(tiny, tmp_path):
    info = save_checkpoint(tiny, tmp_path / "net", normalization={"mode": "percentile"})
    data = json.loads((tmp_path / "net.json").read_text())
    with safe_open(str(tmp_path / "net.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert data["description_sha256"] == meta[HEADER_HASH_KEY] == info.description_sha256
    assert description_sha256(data) == data["description_sha256"]
    assert json.loads(meta[HEADER_KEY])["description_sha256"] == data["description_sha256"]


@pytest.mark.parametrize("change", [
    lambda d: d["normalization"].update(low=30.0),  # the issue: 19.6 % -> 62 % foreground
    lambda d: d.update(input_downsample=2),
    lambda d: d["metrics"].update(dice=0.99),  # not read by inference, still part of it
])
def test_an_edited_description_is_refused(tiny, tmp_path, change):
    save_checkpoint(tiny, tmp_path / "net", normalization={"mode": "percentile"})
    _edit(tmp_path / "net.json", change)
    with pytest.raises(CheckpointError, match="changed after it was saved") as err:
        load_checkpoint(tmp_path / "net")
    _one_sentence(err)


def test_an_edited_description_without_its_hash_is_refused(tiny, tmp_path):
    save_checkpoint(tiny, tmp_path / "net", normalization={"mode": "percentile"})

    def change(data):
        data.pop("description_sha256")
        data["normalization"]["mode"] = "minmax"

    _edit(tmp_path / "net.json", change)
    with pytest.raises(CheckpointError, match="'normalization' differs"):
        load_checkpoint(tmp_path / "net")


def test_old_checkpoint_without_hashes_loads_as_before(tiny, tmp_path):
    # Compatibility guard (passes before the change too): nothing recorded, nothing refused.
    save_checkpoint(tiny, tmp_path / "net", normalization={"mode": "percentile"})
    weights = tmp_path / "net.safetensors"
    with safe_open(str(weights), framework="pt") as fh:
        header = json.loads(fh.metadata()[HEADER_KEY])
    header.pop("description_sha256", None)
    save_file(load_file(str(weights)), str(weights), metadata={HEADER_KEY: json.dumps(header)})

    def change(data):
        data.pop("description_sha256", None)
        data["sha256"] = sha256_file(weights)
        data["metrics"] = {"dice": 0.5}

    _edit(tmp_path / "net.json", change)
    _, info = load_checkpoint(tmp_path / "net")
    assert info.metrics == {"dice": 0.5}


def test_an_edited_model_card_is_refused(tiny, tmp_path, monkeypatch):
    weights, models = tmp_path / "weights", tmp_path / "models"
    models.mkdir()
    info = save_checkpoint(tiny, weights / "nuclei_tiny", normalization={"mode": "percentile"})
    (weights / "nuclei_tiny.json").unlink()  # the card alone describes it
    card = {"tag": "nuclei-test", "network": NETWORK, "variant": "tiny",
            "dataset": "dsb2018_nuclei", "weights": "nuclei_tiny.safetensors",
            "sha256": info.sha256, "config": info.config, "in_channels": 1, "num_classes": 2,
            "normalization": {"mode": "percentile", "low": 1.0, "high": 99.8},
            "metrics": {"dice": 0.5}}
    monkeypatch.setenv(resources.ENV_WEIGHTS, str(weights))
    (models / "nuclei-test.yaml").write_text(yaml.safe_dump(card))
    resolve_weights("nuclei-test")  # the card as written agrees with the weights
    card["normalization"]["low"] = 30.0
    (models / "nuclei-test.yaml").write_text(yaml.safe_dump(card))
    with pytest.raises(CheckpointError, match="'normalization' differs"):
        resolve_weights("nuclei-test")


# --- 2b: permissions -------------------------------------------------------------------------


@pytest.mark.parametrize("saver", [save_checkpoint, save_checkpoint_atomic])
def test_checkpoint_files_get_the_users_permissions(tiny, tmp_path, saver):
    old = os.umask(0o022)
    try:
        saver(tiny, tmp_path / "net")
    finally:
        os.umask(old)
    modes = {p.suffix: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.glob("net.*")}
    assert modes == {".safetensors": 0o644, ".json": 0o644}
