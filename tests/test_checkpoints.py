"""Self-describing checkpoints, strict loading without pickle, model cards and the resolver."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from analytic_models import registered_analytic
from napari_medseg import resources
from napari_medseg.engine.checkpoints import (
    CARD_FIELDS,
    checkpoint_paths,
    list_model_cards,
    list_shipped_weights,
    load_checkpoint,
    read_checkpoint_info,
    resolve_weights,
    save_checkpoint,
    sha256_file,
)
from napari_medseg.errors import CheckpointError, WeightsNotFoundError
from napari_medseg.models import create_model, list_models

NETWORK = "unet_sharp" if "unet_sharp" in list_models() else list_models()[0]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = create_model(NETWORK, variant="tiny", in_channels=1, num_classes=2).eval()
    # Non-trivial batch-norm statistics, so buffers matter in the round trip.
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
    model._reference = True
    return model


_X = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
_CACHE: dict[int, torch.Tensor] = {}


def _forward(model):
    """The mask logits for a fixed input (the fixture's reference is computed once)."""
    key = id(model)
    if key not in _CACHE or not getattr(model, "_reference", False):
        with torch.inference_mode():
            out = model(_X)["mask"]
        if getattr(model, "_reference", False):
            _CACHE[key] = out
        return out
    return _CACHE[key]


def _save(model, tmp_path, name="net", **kwargs):
    kwargs.setdefault("normalization", {"mode": "percentile", "low": 2.0, "high": 99.0})
    kwargs.setdefault("training_data", {"dataset": "dsb2018_nuclei", "split": {"val": ["a"]}})
    kwargs.setdefault("metrics", {"dice": 0.5, "split": "val"})
    return save_checkpoint(model, tmp_path / name, **kwargs)


def test_fp32_round_trip_is_exact(tiny, tmp_path):
    info = _save(tiny, tmp_path, dtype="float32")
    model, loaded = load_checkpoint(tmp_path / "net.safetensors")
    assert torch.equal(_forward(model), _forward(tiny))
    assert loaded.sha256 == info.sha256 == sha256_file(tmp_path / "net.safetensors")
    assert model.checkpoint_info is loaded and not model.training


def test_fp16_weights_are_half_the_size_and_close(tiny, tmp_path):
    _save(tiny, tmp_path, "half")
    _save(tiny, tmp_path, "full", dtype="float32")
    tensors = load_file(str(tmp_path / "half.safetensors"))
    assert all(t.dtype in (torch.float16, torch.int64) for t in tensors.values())
    half, full = (tmp_path / f"{n}.safetensors" for n in ("half", "full"))
    assert half.stat().st_size < 0.6 * full.stat().st_size
    model, _ = load_checkpoint(tmp_path / "half")
    assert next(model.parameters()).dtype == torch.float32
    assert torch.allclose(_forward(model), _forward(tiny), atol=5e-2, rtol=1e-2)


def test_json_describes_the_checkpoint(tiny, tmp_path):
    info = _save(tiny, tmp_path, parent="ab" * 32, settings={"epochs": 3})
    data = json.loads((tmp_path / "net.json").read_text())
    for key in ("network", "variant", "config", "in_channels", "num_classes", "normalization",
                "training_data", "settings", "metrics", "parent", "plugin_version", "sha256",
                "weights", "dtype", "format", "format_version"):
        assert key in data, key
    assert data["network"] == NETWORK and data["variant"] == "tiny"
    assert data["config"]["in_channels"] == 1 and data["num_classes"] == 2
    assert data["training_data"]["dataset"] == "dsb2018_nuclei"
    assert data["parent"] == "ab" * 32 and data["sha256"] == info.sha256
    assert info.normalization_config().low == 2.0


def test_lone_safetensors_file_describes_itself(tiny, tmp_path):
    _save(tiny, tmp_path, dtype="float32")
    (tmp_path / "net.json").unlink()
    info = read_checkpoint_info(tmp_path / "net.safetensors")
    assert info.network == NETWORK and info.sha256 is None
    model, loaded = load_checkpoint(tmp_path / "net.safetensors")
    assert torch.equal(_forward(model), _forward(tiny))
    assert loaded.sha256 == sha256_file(tmp_path / "net.safetensors")


def test_loading_never_unpickles(tiny, tmp_path, monkeypatch):
    _save(tiny, tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint load must not unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model, _ = load_checkpoint(tmp_path / "net")
    assert model.spec.network == NETWORK


def _rewrite(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["sha256"] = sha256_file(path)
    path.with_suffix(".json").write_text(json.dumps(meta))


@pytest.mark.parametrize("change,match", [
    (lambda t: t.pop(sorted(t)[0]), "missing tensor"),
    (lambda t: t.__setitem__("extra.weight", torch.zeros(3)), "unexpected tensor"),
    (lambda t: t.__setitem__(sorted(k for k in t if t[k].dim() == 4)[0], torch.zeros(1, 1, 1, 1)),
     "has shape"),
])
def test_keys_that_do_not_fit_are_an_error(tiny, tmp_path, change, match):
    _save(tiny, tmp_path)
    _rewrite(tmp_path / "net.safetensors", change)
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(tmp_path / "net")
    assert str(err.value).count(". ") == 0  # one sentence


def test_replaced_weights_fail_the_hash(tiny, tmp_path):
    _save(tiny, tmp_path)
    tensors = load_file(str(tmp_path / "net.safetensors"))
    key = sorted(k for k in tensors if tensors[k].is_floating_point())[0]
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(tmp_path / "net.safetensors"))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path / "net")


def test_foreign_json_and_missing_files(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a napari-medseg checkpoint"):
        read_checkpoint_info(tmp_path / "x.json")
    with pytest.raises(WeightsNotFoundError):
        load_checkpoint(tmp_path / "absent")
    assert checkpoint_paths(tmp_path / "a.json")[0].name == "a.safetensors"


def test_unknown_network_in_a_checkpoint(tiny, tmp_path):
    _save(tiny, tmp_path)
    meta = json.loads((tmp_path / "net.json").read_text())
    meta["network"] = "no_such_net"
    (tmp_path / "net.json").write_text(json.dumps(meta))
    # Unverified: verified, the edited description is refused first (test_faults_numbers).
    with pytest.raises(CheckpointError, match="no_such_net"):
        load_checkpoint(tmp_path / "net", verify=False)


# --- model cards ---------------------------------------------------------------------------


@pytest.fixture()
def card_dirs(tmp_path, monkeypatch, tiny):
    """A fake install: <tmp>/weights (NAPARI_MEDSEG_WEIGHTS) and its sibling <tmp>/models."""
    weights = tmp_path / "weights"
    models = tmp_path / "models"
    weights.mkdir()
    models.mkdir()
    info = save_checkpoint(tiny, weights / "nuclei_tiny", normalization={"mode": "percentile"},
                           metrics={"dice": 0.5})
    card = {
        "tag": "nuclei-test", "network": NETWORK, "variant": "tiny",
        "dataset": "dsb2018_nuclei", "weights": "nuclei_tiny.safetensors",
        "sha256": info.sha256, "config": info.config, "in_channels": 1, "num_classes": 2,
        "normalization": {"mode": "percentile", "low": 1.0, "high": 99.8},
        "metrics": {"dice": 0.5, "split": "val"},
    }
    (models / "nuclei-test.yaml").write_text(yaml.safe_dump(card))
    (models / "not-shipped.yaml").write_text(yaml.safe_dump(
        {**card, "tag": "not-shipped", "weights": "absent.safetensors"}))
    monkeypatch.setenv(resources.ENV_WEIGHTS, str(weights))
    return weights, models, card


def test_shipped_weights_are_listed_from_the_cards(card_dirs):
    _, models, card = card_dirs
    shipped = list_shipped_weights()
    tags = [w["tag"] for w in shipped]
    assert "nuclei-test" in tags and "not-shipped" not in tags
    entry = shipped[tags.index("nuclei-test")]
    for key in ("tag", "network", "variant", "dataset", "weights", "sha256", "path"):
        assert key in entry
    assert entry["dataset"] == "dsb2018_nuclei" and entry["network"] == NETWORK
    assert {c.tag for c in list_model_cards()} >= {"nuclei-test", "not-shipped"}
    assert set(CARD_FIELDS) <= set(card)


def test_resolve_by_tag_and_by_path(card_dirs, tiny):
    weights, _, _ = card_dirs
    model, info = resolve_weights("nuclei-test")
    assert info.tag == "nuclei-test" and model.spec.network == NETWORK
    assert torch.allclose(_forward(model), _forward(tiny), atol=5e-2, rtol=1e-2)
    model2, info2 = resolve_weights(str(weights / "nuclei_tiny.safetensors"))
    assert info2.tag is None and torch.equal(_forward(model2), _forward(model))


def test_unknown_tag_lists_the_valid_ones(card_dirs):
    with pytest.raises(WeightsNotFoundError, match="valid tags: nuclei-test") as err:
        resolve_weights("nuclei-tset")
    assert "not-shipped" not in str(err.value)
    with pytest.raises(WeightsNotFoundError, match="not installed"):
        resolve_weights("not-shipped")


def test_card_with_a_wrong_hash_is_refused(card_dirs):
    _, models, card = card_dirs
    (models / "nuclei-test.yaml").write_text(yaml.safe_dump({**card, "sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="sha256"):
        resolve_weights("nuclei-test")


def test_malformed_cards_are_skipped_with_a_warning(card_dirs):
    _, models, card = card_dirs
    (models / "broken.yaml").write_text(yaml.safe_dump({"tag": "broken"}))
    with pytest.warns(UserWarning, match="lacks the field"):
        cards = list_model_cards()
    assert "broken" not in {c.tag for c in cards}


def test_card_without_a_json_sidecar_is_built_from_the_card(card_dirs, tiny):
    weights, _, _ = card_dirs
    (weights / "nuclei_tiny.json").unlink()
    model, info = resolve_weights("nuclei-test")
    assert info.normalization["high"] == 99.8  # from the card
    assert torch.allclose(_forward(model), _forward(tiny), atol=5e-2, rtol=1e-2)


def test_analytic_registered_network_round_trips(tmp_path):
    with registered_analytic():
        from analytic_models import make_analytic

        model = make_analytic(num_classes=3, scale=2)
        save_checkpoint(model, tmp_path / "a", dtype="float32")
        loaded, info = load_checkpoint(tmp_path / "a")
        # a super-resolution network loads on the image's grid; its own scale stays within
        from napari_medseg.models.working_resolution import super_resolved

        assert loaded.spec.output_scale == 1 and info.num_classes == 3
        assert super_resolved(loaded).spec.output_scale == 2
