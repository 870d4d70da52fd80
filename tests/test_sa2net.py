"""SA²-Net specific checks (spec msa2net_sa2net.md, sections 2 and 3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_medseg.engine.training.losses import (
    compute_loss,
    sa2net_dice_ce,
    sa2net_weighted_dice_bce,
)
from napari_medseg.errors import InputShapeError
from napari_medseg.models import create_model
from napari_medseg.models.layers import ChannelLayerNorm
from napari_medseg.models.sa2net import (
    AdaptiveUpAttention,
    SA2Module,
    UpStage,
    resize_to,
)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tiny(in_channels: int = 1, num_classes: int = 2, **overrides):
    torch.manual_seed(0)
    return create_model("sa2net", "tiny", in_channels, num_classes, **overrides)


# --------------------------------------------------------------------------- sizes


def test_paper_parameter_count_is_exact():
    with torch.device("meta"):
        model = create_model("sa2net", "paper", in_channels=3, num_classes=1)
    assert _count(model) == 19_296_596
    assert _count(model.sa2) == 1_017_476  # 1,053,316 minus the 35,840 dead DW params


@pytest.mark.parametrize(("variant", "expected"), [("tiny", 325_300), ("lite", 1_246_796)])
def test_small_variant_counts_match_spec(variant, expected):
    with torch.device("meta"):
        model = create_model("sa2net", variant, in_channels=1, num_classes=3)
    assert _count(model) == expected


def test_shapes_at_224_match_spec_table():
    """Table 2.2 for 1x3x224x224 at base width 64 (meta tensors: shapes only, no compute)."""
    with torch.device("meta"):
        model = create_model("sa2net", "paper", in_channels=3, num_classes=1).train()
        shapes: dict[str, tuple[int, ...]] = {}

        def keep(name):
            def hook(_module, _inputs, output):
                shapes[name] = output if isinstance(output, list) else tuple(output.shape)

            return hook

        for name in ["inc", "down1", "down2", "down3", "down4", "side2", "side3", "side4",
                     "side5", "up4", "up3", "up2", "up1"]:
            getattr(model, name).register_forward_hook(keep(name))
        model.sa2.register_forward_hook(keep("sa2"))
        model.sa2.fuse.register_forward_hook(keep("z"))
        out = model(torch.empty(1, 3, 224, 224))
    expected = {
        "inc": (64, 224), "down1": (128, 112), "down2": (256, 56), "down3": (512, 28),
        "down4": (512, 14), "side2": (64, 112), "side3": (64, 56), "side4": (64, 28),
        "side5": (512, 14), "z": (68, 56), "up4": (256, 28), "up3": (128, 56),
        "up2": (64, 112), "up1": (64, 224),
    }
    for name, (c, s) in expected.items():
        assert shapes[name] == (1, c, s, s), name
    assert [tuple(t.shape) for t in shapes["sa2"]] == [
        (1, 64, 224, 224), (1, 128, 112, 112), (1, 256, 56, 56), (1, 512, 28, 28)
    ]
    assert tuple(out["mask"].shape) == (1, 1, 224, 224)
    assert [tuple(t.shape) for t in out["deep_supervision"]] == [(1, 1, 224, 224)] * 3


# --------------------------------------------------------------------------- contract


def test_four_outputs_in_training_one_in_eval():
    model = _tiny(1, 3).train()
    x = torch.randn(2, 1, 64, 64)
    out = model(x)
    assert set(out) == {"mask", "deep_supervision"}
    assert len(out["deep_supervision"]) == 3
    for t in [out["mask"], *out["deep_supervision"]]:
        assert t.shape == (2, 3, 64, 64)
    model.eval()
    with torch.inference_mode():
        out = model(x)
    assert set(out) == {"mask"} and out["mask"].shape == (2, 3, 64, 64)


@pytest.mark.parametrize("size", [(96, 160), (16, 16), (48, 32)])
def test_non_square_and_minimal_sizes(size):
    model = _tiny(3, 2).eval()
    with torch.inference_mode():
        out = model(torch.randn(1, 3, *size))
    assert out["mask"].shape == (1, 2, *size)
    assert torch.isfinite(out["mask"]).all()
    assert model.spec.valid_size(size[0]) == size[0]


def test_bad_inputs_raise_readable_errors():
    model = _tiny(1, 2).eval()
    with pytest.raises(InputShapeError, match="multiples of 16"):
        model(torch.randn(1, 1, 72, 64))
    with pytest.raises(InputShapeError, match="N×1×H×W"):
        model(torch.randn(1, 3, 64, 64))


def test_spec_declares_contract():
    model = _tiny(4, 5)
    spec = model.spec
    assert (spec.divisor, spec.min_size, spec.preferred_tile, spec.loss) == (16, 16, 256, "sa2net")
    assert spec.heads == ("mask",) and spec.train_outputs == ("deep_supervision",)
    encoder = {id(p) for p in model.encoder_parameters()}
    expected = {
        id(p) for name in ["inc", "down1", "down2", "down3", "down4"]
        for p in getattr(model, name).parameters()
    }
    assert encoder == expected
    assert not any(n.startswith("sa2.") or n.startswith("up") for n in _names(model, encoder))


def _names(model, ids):
    return [n for n, p in model.named_parameters() if id(p) in ids]


# --------------------------------------------------------------------------- SA² module


def _features(c: int, h: int, w: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, h // 2**i, w // 2**i, generator=gen) for i in range(4)]


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_layer_norm_is_the_spec_formula(channels_last, eps):
    torch.manual_seed(1)
    norm = ChannelLayerNorm(6, eps=eps)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean = x.mean(dim=1, keepdim=True)
    var = (x - mean).pow(2).mean(dim=1, keepdim=True)  # biased, eps inside the root
    expected = (x - mean) / torch.sqrt(var + eps) * norm.weight[:, None, None] \
        + norm.bias[:, None, None]
    out = norm(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert set(dict(norm.named_parameters())) == {"weight", "bias"}


@pytest.mark.parametrize(("network", "eps"), [("sa2net", 1e-6), ("msa2net", 1e-5)])
def test_each_network_keeps_its_channel_layer_norm_eps(network, eps):
    """The shared layer norm serves SA²-Net (spec eps 1e-6) and MSA²-Net (LayerNorm's 1e-5)."""
    from napari_medseg.models import create_model

    norms = [m for m in create_model(network, "tiny", 1, 2).modules()
             if isinstance(m, ChannelLayerNorm)]
    assert norms and {m.eps for m in norms} == {eps}


def test_channel_layer_norm_stays_in_bf16_under_autocast():
    norm = ChannelLayerNorm(4, eps=1e-6)
    x = torch.randn(1, 4, 8, 8).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), norm(x.float()), rtol=0.02, atol=0.02)


def test_identity_sized_resample_is_a_noop():
    x = torch.randn(2, 8, 16, 24)
    assert resize_to(x, (16, 24)) is x
    # and bilinear interpolation to the same size would not change it either
    same = F.interpolate(x, size=(16, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(same, x, rtol=0, atol=1e-6)
    assert resize_to(x, (32, 48)).shape == (2, 8, 32, 48)


def test_sa2_outputs_have_native_sizes():
    torch.manual_seed(0)
    sa2 = SA2Module(8).eval()
    feats = _features(8, 64, 96)
    with torch.no_grad():
        out = sa2(feats)
    assert [tuple(t.shape) for t in out] == [
        (2, 8, 64, 96), (2, 16, 32, 48), (2, 32, 16, 24), (2, 64, 8, 12)
    ]


def test_sa2_residual_path_when_attention_is_silenced():
    """With the local out-convs and refine fc2 zeroed, O_i = project_i(F_i) exactly."""
    torch.manual_seed(0)
    sa2 = SA2Module(8).eval()
    with torch.no_grad():
        for branch in sa2.local:
            branch.reduce.weight.zero_()
            branch.reduce.bias.zero_()
        for refine in sa2.refine:
            refine.fc2.weight.zero_()
            refine.fc2.bias.zero_()
        feats = _features(8, 32, 48)
        out = sa2(feats)
        for i, (f, o) in enumerate(zip(feats, out, strict=True)):
            torch.testing.assert_close(o, sa2.project[i](f))


def test_sa2_gate_channel_i_only_controls_scale_i():
    """Z's channel c+i is scale i's gate: zeroing it gives γ_i = GELU(0) = 0, so Y_i = 0."""
    torch.manual_seed(0)
    c = 8
    sa2 = SA2Module(c).eval()
    feats = _features(c, 32, 32)
    with torch.no_grad():
        sa2.fuse.weight[c + 1].zero_()
        sa2.fuse.bias[c + 1].zero_()
        out = sa2(feats)
        plain = [sa2.project[i](sa2.refine[i](f)) for i, f in enumerate(feats)]
    torch.testing.assert_close(out[1], plain[1])
    for i in (0, 2, 3):
        assert not torch.allclose(out[i], plain[i], atol=1e-4), i


# --------------------------------------------------------------------------- AuA


def test_aua_psi_is_one_channel_map():
    torch.manual_seed(0)
    aua = AdaptiveUpAttention(8).eval()
    g = torch.randn(2, 8, 32, 40)
    x_hat = torch.randn(2, 8, 32, 40)
    with torch.no_grad():
        psi = aua.gate(g, x_hat)
    assert psi.shape == (2, 1, 32, 40)
    assert bool(((psi > 0) & (psi < 1)).all())


def test_aua_has_no_content_path_from_the_decoder():
    torch.manual_seed(0)
    stage = UpStage(8, 4).eval()
    x = torch.randn(2, 8, 32, 32)
    d1, d2 = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(stage(d1, x), stage(d2, x))  # D matters through ψ
        stage.aua.gate = lambda g, x_hat: torch.full_like(x_hat[:, :1], 0.7)
        torch.testing.assert_close(stage(d1, x), stage(d2, x), rtol=0, atol=0)


def test_aua_upsamples_nearest():
    """The decoder feature enters ψ through a nearest ×2 upsample (blocks of 2x2 equal)."""
    torch.manual_seed(0)
    aua = AdaptiveUpAttention(4).eval()
    seen = {}
    original = aua.gate

    def spy(g, x_hat):
        seen["g"] = g
        return original(g, x_hat)

    aua.gate = spy
    d = torch.randn(1, 4, 8, 12)
    with torch.no_grad():
        aua(d, torch.randn(1, 4, 16, 24))
    torch.testing.assert_close(seen["g"], d.repeat_interleave(2, 2).repeat_interleave(2, 3))


# --------------------------------------------------------------------------- heads


def test_head_then_upsample_equals_official_upsample_then_head():
    torch.manual_seed(0)
    head = torch.nn.Conv2d(16, 3, 1)
    u = torch.randn(2, 16, 8, 12)
    with torch.no_grad():
        official = head(F.interpolate(u, size=(64, 96), mode="bilinear", align_corners=False))
        ours = resize_to(head(u), (64, 96))
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-5)


def test_output_sigmoid_option_reproduces_official_probabilities():
    logits_model = _tiny(1, 1).train()
    prob_model = _tiny(1, 1, output_sigmoid=True).train()
    prob_model.load_state_dict(logits_model.state_dict())
    assert prob_model.spec.extra["mask_is_probability"] is True
    assert logits_model.spec.extra["mask_is_probability"] is False
    x = torch.randn(2, 1, 32, 32)
    a, b = logits_model(x), prob_model(x)
    for la, pb in zip([a["mask"], *a["deep_supervision"]], [b["mask"], *b["deep_supervision"]],
                      strict=True):
        torch.testing.assert_close(torch.sigmoid(la), pb)
    mask = torch.randint(0, 2, (2, 32, 32), generator=torch.Generator().manual_seed(1))
    loss_a, _ = compute_loss(a, {"mask": mask}, logits_model.spec)
    loss_b, _ = compute_loss(b, {"mask": mask}, prob_model.spec)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-4, atol=1e-5)
    # with K >= 2 the option changes nothing (the official code only squashes K == 1)
    multi = _tiny(1, 3, output_sigmoid=True).eval()
    with torch.inference_mode():
        assert multi(torch.randn(1, 1, 32, 32))["mask"].min() < 0


# --------------------------------------------------------------------------- loss


def _reference_wdice_bce(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Spec 2.7 in plain loops, on probabilities (the official setting)."""
    p, t = prob[:, 0].double(), target.double()
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    wbce = 0.5 * bce[t > 0.5].sum() / (t > 0.5).sum() + 0.5 * bce[t < 0.5].sum() / (t < 0.5).sum()
    dices = []
    for n in range(p.shape[0]):
        pn, tn = 0.5 * p[n], 0.5 * t[n]
        dices.append(1 - (2 * (pn * tn).sum() + 1e-5) / ((pn**2).sum() + (tn**2).sum() + 1e-5))
    return 0.5 * torch.stack(dices).mean() + 0.5 * wbce


def test_weighted_dice_bce_matches_spec_formula():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 16, 16, generator=gen) * 2
    mask = torch.randint(0, 2, (3, 16, 16), generator=gen)
    ours = sa2net_weighted_dice_bce(logits, mask)
    ref = _reference_wdice_bce(torch.sigmoid(logits), mask)
    assert abs(float(ours) - float(ref)) < 1e-5


def test_weighted_dice_bce_is_stable_for_huge_logits():
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[:, :4] = 1
    wrong = torch.where(mask[:, None] > 0, -300.0, 300.0)
    loss = sa2net_weighted_dice_bce(wrong, mask)
    assert torch.isfinite(loss) and float(loss) > 100  # the logit BCE is not clamped at 100
    right = sa2net_weighted_dice_bce(-wrong, mask)
    assert float(right) < 1e-3


def _reference_dice_ce(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    k = logits.shape[1]
    p = torch.softmax(logits.double(), 1)
    dice = []
    for c in range(k):
        t = (mask == c).double()
        dice.append(2 * (p[:, c] * t).sum() / (p[:, c].sum() + t.sum() + 1e-6))
    ce = F.cross_entropy(logits.double(), mask)
    return 0.5 * (1 - torch.stack(dice).mean()) + 0.5 * ce


def test_dice_ce_matches_spec_formula():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, generator=gen)
    mask = torch.randint(0, 3, (2, 16, 16), generator=gen)
    assert abs(float(sa2net_dice_ce(logits, mask)) - float(_reference_dice_ce(logits, mask))) < 1e-5


@pytest.mark.parametrize("num_classes", [1, 2, 3])
def test_loss_sums_four_outputs_with_weight_one(num_classes):
    spec = _tiny(1, num_classes).spec
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, num_classes, 16, 16, generator=gen)
    mask = torch.randint(0, max(num_classes, 2), (2, 16, 16), generator=gen)
    single, _ = compute_loss({"mask": logits}, {"mask": mask}, spec)
    total, parts = compute_loss(
        {"mask": logits, "deep_supervision": [logits.clone() for _ in range(3)]},
        {"mask": mask},
        spec,
    )
    torch.testing.assert_close(total, 4 * single)
    assert set(parts) == {"loss", "loss_main", "loss_ds1", "loss_ds2", "loss_ds3"}


@pytest.mark.parametrize("num_classes", [1, 3])
def test_loss_ignores_pixels_outside_valid(num_classes):
    spec = _tiny(1, num_classes).spec
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, num_classes, 16, 16, generator=gen)
    mask = torch.randint(0, max(num_classes, 2), (2, 16, 16), generator=gen)
    valid = torch.ones(2, 16, 16)
    valid[:, :, 8:] = 0
    other = logits.clone()
    other[..., 8:] = torch.randn(2, num_classes, 16, 8, generator=gen) * 10
    targets = {"mask": mask, "valid": valid}
    a, _ = compute_loss({"mask": logits}, targets, spec)
    b, _ = compute_loss({"mask": other}, targets, spec)
    torch.testing.assert_close(a, b)
    c, _ = compute_loss({"mask": other}, {"mask": mask}, spec)
    assert not torch.allclose(a, c)


def test_single_class_training_reaches_every_parameter():
    model = _tiny(1, 1).train()
    x = torch.randn(2, 1, 32, 32)
    mask = torch.randint(0, 2, (2, 32, 32), generator=torch.Generator().manual_seed(0))
    loss, _ = compute_loss(model(x), {"mask": mask}, model.spec)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]
