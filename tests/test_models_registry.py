"""Contract tests run for every registered network (tiny variants, CPU)."""

from __future__ import annotations



import pytest
import torch

from napari_medseg.models import (
    HEAD_MASK,
    create_model,
    list_models,
    list_variants,
)

NETWORKS = list_models()


def _tiny(name: str, in_channels: int = 1, num_classes: int = 2):
    torch.manual_seed(0)
    return create_model(name, variant="tiny", in_channels=in_channels, num_classes=num_classes)


def _sizes(model) -> list[tuple[int, int]]:
    spec = model.spec
    base = max(spec.min_size, spec.preferred_tile // 4, 64)
    base = spec.valid_size(base)
    d = spec.divisor
    return [(base, base), (base + d, base + 2 * d)]


def test_registry_has_networks():
    assert NETWORKS, "no network registered"
    for name in NETWORKS:
        assert {"tiny", "lite", "paper"} <= set(list_variants(name))


def test_unknown_network_lists_valid_names():
    from napari_medseg.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="choose one of"):
        create_model("no_such_net")


@pytest.mark.parametrize("name", NETWORKS)
def test_tiny_is_small(name):
    model = _tiny(name)
    n = sum(p.numel() for p in model.parameters())
    assert n < 500_000, f"{name} tiny has {n} parameters"


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("num_classes", [1, 2, 3])
def test_eval_output_shapes(name, in_channels, num_classes):
    model = _tiny(name, in_channels, num_classes).eval()
    spec = model.spec
    assert spec.network == name and spec.in_channels == in_channels
    for h, w in _sizes(model)[: 1 if num_classes != 2 else 2]:
        x = torch.randn(2, in_channels, h, w)
        with torch.inference_mode():
            out = model(x)
        assert set(out) == set(spec.heads), (set(out), spec.heads)
        s = spec.output_scale
        assert out[HEAD_MASK].shape == (2, num_classes, h * s, w * s)
        for key in spec.heads:
            assert torch.isfinite(out[key]).all(), key
            assert out[key].shape[-2:] == (h * s, w * s)


@pytest.mark.parametrize("name", NETWORKS)
def test_training_outputs_and_every_parameter_gets_gradient(name):
    from napari_medseg.engine.training.losses import compute_loss

    model = _tiny(name, 1, 2).train()
    spec = model.spec
    h, w = _sizes(model)[0]
    x = torch.randn(2, 1, h, w)
    out = model(x)
    assert set(spec.heads) | set(spec.train_outputs) <= set(out)
    s = spec.output_scale
    gen = torch.Generator().manual_seed(0)
    targets = {
        "mask": torch.randint(0, 2, (2, h * s, w * s), generator=gen),
        "image": x,
        "image_hr": torch.randn(2, 1, h * s, w * s, generator=gen),
    }
    loss, parts = compute_loss(out, targets, spec)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert isinstance(parts, dict)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


@pytest.mark.parametrize("name", NETWORKS)
def test_state_dict_roundtrip_safetensors(name, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _tiny(name).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    other = _tiny(name)
    torch.manual_seed(123)
    for p in other.parameters():
        torch.nn.init.normal_(p)
    other.load_state_dict(load_file(str(path)), strict=True)
    other.eval()
    x = torch.randn(1, 1, *_sizes(model)[0])
    with torch.inference_mode():
        a, b = model(x), other(x)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


@pytest.mark.parametrize("name", NETWORKS)
def test_eval_is_deterministic(name):
    model = _tiny(name).eval()
    x = torch.randn(1, 1, *_sizes(model)[0])
    with torch.inference_mode():
        a, b = model(x), model(x)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_seeded_network_is_the_same_every_time_and_leaves_the_random_state_alone():
    import torch

    from napari_medseg.models import create_model, state_sha256

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = create_model("unet_sharp", "tiny", 1, 1, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = create_model("unet_sharp", "tiny", 1, 1, seed=5)
    c = create_model("unet_sharp", "tiny", 1, 1, seed=6)
    assert state_sha256(a) == state_sha256(b) != state_sha256(c)
