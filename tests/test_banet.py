"""BA-Net: numerical checks of its named modules, parameter counts, outputs and loss (spec 1)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from napari_medseg.engine.boundaries import boundary_target
from napari_medseg.engine.training.losses import (
    banet_boundary_target,
    banet_dice_loss,
    compute_loss,
    cross_entropy,
)
from napari_medseg.errors import InputShapeError
from napari_medseg.models import create_model
from napari_medseg.models.banet import EDGE_SIDES
from napari_medseg.models.banet_blocks import (
    CrossFeatureFusion,
    InteractiveAttention,
    PyramidEdgeExtraction,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the CPU is shared, and tiny maps gain nothing from more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(in_channels: int = 1, num_classes: int = 2, **overrides):
    torch.manual_seed(0)
    return create_model("banet", "tiny", in_channels, num_classes, **overrides)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _zero_gate(module: torch.nn.Module) -> None:
    """Zero a learned gate so that it outputs 0 (its last conv's weights)."""
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    torch.nn.init.zeros_(convs[-1].weight)


# --------------------------------------------------------------------------- sizes


def test_paper_parameter_counts_match_spec():
    with torch.device("meta"):
        model = create_model("banet", "paper", in_channels=3, num_classes=2)
    total = _count(model)
    # spec 1.10: 42.81M with the dead up_conv4 (35,584 parameters), which is not built here
    assert abs(total - 42.81e6) / 42.81e6 < 0.03
    assert round((total + 35_584) / 1e4) == 4281
    assert round(_count(model.encoder) / 1e4) == 2351  # ResNet-50 without fc
    assert round(_count(model.aspp) / 1e4) == 1554
    assert [round(_count(s) / 1e3) for s in model.stages] == [175, 208, 274, 405]
    assert [round(_count(c) / 1e3) for c in model.cff] == [590] * 4
    assert round(_count(model.decode4) / 1e3) == 53  # aspp_combine
    assert [_count(d) for d in (model.decode3, model.decode2, model.decode1)] == [35_584] * 3
    assert round(_count(model.classifier) / 1e3) == 148


def test_paper_encoder_is_dilated_resnet50_at_output_stride_8():
    with torch.device("meta"):
        enc = create_model("banet", "paper", 3, 2).encoder
    assert [len(layer) for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4)] == [
        3,
        4,
        6,
        3,
    ]
    assert [b.conv2.dilation[0] for b in enc.layer3] == [1, 2, 2, 2, 2, 2]
    assert [b.conv2.dilation[0] for b in enc.layer4] == [4, 4, 4]
    assert all(b.conv2.padding == b.conv2.dilation for b in enc.layer4)
    assert enc.layer2[0].conv2.stride == (2, 2)
    assert all(b.conv2.stride == (1, 1) for b in [*enc.layer3, *enc.layer4])
    assert enc.out_channels == [256, 512, 1024, 2048]
    assert not hasattr(enc, "fc")


def test_feature_strides():
    model = _tiny().eval()
    with torch.inference_mode():
        feats = model.encoder(torch.randn(1, 1, 72, 88))
    assert [tuple(f.shape[-2:]) for f in feats] == [(18, 22), (9, 11), (9, 11), (9, 11)]


def test_tiny_is_small_and_fast():
    model = _tiny().train()
    assert _count(model) < 500_000
    x = torch.randn(2, 1, 64, 64)
    best = float("inf")
    for _ in range(3):  # one thread (fixture above), best of three
        model.zero_grad()
        start = time.perf_counter()
        out = model(x)
        loss = compute_loss(out, {"mask": (x[:, 0] > 0).long()}, model.spec)[0]
        loss.backward()
        best = min(best, time.perf_counter() - start)
    assert best < 1.0, best


# --------------------------------------------------------------------------- named modules


def test_interactive_attention_with_zero_gates_adds_half_of_the_other_branch():
    torch.manual_seed(0)
    ia = InteractiveAttention(8, "learned").eval()
    _zero_gate(ia.gate_edge)
    _zero_gate(ia.gate_seg)
    e, s = torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6)
    e2, s2 = ia(e, s)
    torch.testing.assert_close(e2, e + 0.5 * s)
    torch.testing.assert_close(s2, s + 0.5 * e)


def test_interactive_attention_learned_and_identity_gates():
    torch.manual_seed(0)
    ia = InteractiveAttention(4, "learned").eval()
    e, s = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    e2, s2 = ia(e, s)
    # both updates use the pre-IA features
    torch.testing.assert_close(e2, e + (1 - torch.sigmoid(ia.gate_edge(e))) * s)
    torch.testing.assert_close(s2, s + (1 - torch.sigmoid(ia.gate_seg(s))) * e)
    ident = InteractiveAttention(4, "identity")
    assert _count(ident) == 0
    e3, s3 = ident(e, s)
    torch.testing.assert_close(e3, e + (1 - torch.sigmoid(e)) * s)
    torch.testing.assert_close(s3, s + (1 - torch.sigmoid(s)) * e)


def test_cff_with_zero_gates_adds_a_quarter_of_the_others():
    torch.manual_seed(0)
    cff = CrossFeatureFusion(8, 4, "learned")
    for gate in cff.gates:
        torch.nn.init.zeros_(gate.weight)
    anchor = torch.randn(2, 8, 12, 14)
    others = [torch.randn(2, 8, 12, 14), torch.randn(2, 8, 6, 7), torch.randn(2, 8, 6, 7)]
    out = cff(anchor, others)
    up = [F.interpolate(m, size=(12, 14), mode="bilinear", align_corners=True) for m in others]
    torch.testing.assert_close(out, anchor + 0.25 * sum(up))


def test_cff_learned_gates_formula():
    torch.manual_seed(0)
    cff = CrossFeatureFusion(4, 4, "learned")
    m = [torch.randn(1, 4, 8, 8) for _ in range(4)]
    out = cff(m[0], m[1:])
    t = cff.gates
    expected = m[0] + (1 - torch.sigmoid(t[0](m[0]))) * sum(
        torch.sigmoid(t[j](m[j])) * m[j] for j in (1, 2, 3)
    )
    torch.testing.assert_close(out, expected)


def test_pee_difference_form_is_a_reparametrisation_of_the_code_form():
    torch.manual_seed(0)
    code = PyramidEdgeExtraction(4, (3, 5), explicit_diff=False).eval()
    paper = PyramidEdgeExtraction(4, (3, 5), explicit_diff=True).eval()
    paper.load_state_dict(code.state_dict())
    w = code.fuse[0].weight.detach()  # 4 x 12 x 1 x 1: [F', A_3, A_5]
    w0, w1, w2 = w[:, :4], w[:, 4:8], w[:, 8:]
    with torch.no_grad():
        # code: W0 F + W1 A1 + W2 A2 == paper: (W0 + W1 + W2) F - W1 (F - A1) - W2 (F - A2)
        paper.fuse[0].weight.copy_(torch.cat([w0 + w1 + w2, -w1, -w2], dim=1))
    x = torch.randn(2, 4, 9, 10)
    torch.testing.assert_close(paper(x), code(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- boundary target


def test_boundary_target_square_example():
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:6, 2:6] = 1
    expected = torch.zeros(8, 8)
    expected[1:7, 1:7] = 1
    expected[3:5, 3:5] = 0
    for border in ("zeros", "replicate"):
        assert torch.equal(boundary_target(mask, border=border)[0], expected), border


def test_boundary_target_border_example():
    mask = torch.zeros(1, 6, 6)
    mask[0, :, 0:3] = 1
    official = torch.zeros(6, 6)
    official[:, 0] = 1
    official[:, 2:4] = 1
    official[0, 1] = official[5, 1] = 1
    assert torch.equal(boundary_target(mask, border="zeros")[0], official)
    # on tiles the image edge is not a contour: only the real contour (columns 2..3) is marked
    tile = torch.zeros(6, 6)
    tile[:, 2:4] = 1
    assert torch.equal(boundary_target(mask, border="replicate")[0], tile)


def test_multiclass_boundary_target():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :, 4:] = 2
    labels[0, 2:6, 1:4] = 1  # class 1 touching class 2
    b = banet_boundary_target(labels, num_classes=3)
    assert b[0, 3, 3] == 1 and b[0, 3, 4] == 1  # the 1|2 interface, which mask > 0 would miss
    assert b[0, 0, 7] == 0  # the image edge is not a boundary
    binary = (labels > 0).long()
    torch.testing.assert_close(
        banet_boundary_target(binary, num_classes=3), boundary_target(binary)
    )


def test_boundary_target_ignores_invalid_pixels():
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[0, 2:6, 0:6] = 1
    valid = torch.ones(1, 8, 8)
    valid[0, :, 6:] = 0  # e.g. padding, zero-filled in the mask
    assert boundary_target(mask)[0, 3, 5] == 1  # without valid: a false contour at the padding
    b = banet_boundary_target(mask, num_classes=2, valid=valid)
    assert b[0, 3, 5] == 0 and b[0, 3, 6] == 0
    assert b[0, 1, 2] == 1 and b[0, 2, 2] == 1 and b[0, 6, 3] == 1  # the real contour
    ones = torch.ones(1, 8, 8)
    for border in ("zeros", "replicate"):
        torch.testing.assert_close(
            banet_boundary_target(mask, 2, border, valid=ones), boundary_target(mask, border)
        )


# --------------------------------------------------------------------------- forward contract


@pytest.mark.parametrize(
    ("in_channels", "num_classes", "size"),
    [(1, 2, (64, 64)), (3, 1, (72, 88)), (4, 4, (40, 56))],
)
def test_output_shapes(in_channels, num_classes, size):
    model = _tiny(in_channels, num_classes)
    x = torch.randn(2, in_channels, *size)
    model.eval()
    with torch.inference_mode():
        out = model(x)
    assert set(out) == {"mask", "boundary"}
    assert out["mask"].shape == (2, num_classes, *size)
    assert out["boundary"].shape == (2, 1, *size)
    model.train()
    out = model(x)
    assert set(out) == {"mask", "boundary", "deep_supervision", EDGE_SIDES}
    edge_classes = 1 if num_classes == 1 else 2
    assert [tuple(s.shape) for s in out["deep_supervision"]] == [(2, num_classes, *size)] * 4
    assert [tuple(e.shape) for e in out[EDGE_SIDES]] == [(2, edge_classes, *size)] * 4


def test_all_nine_official_outputs_in_train_mode_and_eval_heads_agree():
    model = _tiny().train()
    x = torch.randn(2, 1, 64, 80)
    out = model(x)
    assert len(out["deep_supervision"]) == 4 and len(out[EDGE_SIDES]) == 4
    model.eval()
    with torch.inference_mode():
        official = model.official_outputs(x)
        heads = model(x)
    assert len(official) == 9
    assert all(o.shape == (2, 2, 64, 80) for o in official)
    torch.testing.assert_close(heads["mask"], official[0])
    edge1 = official[2]
    torch.testing.assert_close(heads["boundary"], edge1[:, 1:2] - edge1[:, 0:1])


def test_boundary_source_mean():
    model = _tiny(boundary_source="mean").eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.inference_mode():
        official = model.official_outputs(x)
        heads = model(x)
    edges = official[2::2]
    expected = torch.stack([e[:, 1:2] - e[:, 0:1] for e in edges]).mean(0)
    torch.testing.assert_close(heads["boundary"], expected)


def test_paper_gate_variants_build_and_run():
    model = _tiny(ia_gate="identity", cff_gate="identity", pee_explicit_diff=True).eval()
    with torch.inference_mode():
        out = model(torch.randn(1, 1, 32, 48))
    assert torch.isfinite(out["mask"]).all()
    assert _count(model) < _count(_tiny())


def test_single_image_training_batch_and_per_image_eval():
    model = _tiny().train()
    out = model(torch.randn(1, 1, 64, 64))  # ASPP's pooled BN must not fail on one image
    assert torch.isfinite(out["mask"]).all()
    model.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        both, first = model(x), model(x[:1])
    torch.testing.assert_close(both["mask"][:1], first["mask"], rtol=1e-4, atol=1e-5)


def test_encoder_prefixes_cover_exactly_the_encoder():
    model = _tiny()
    assert model.spec.encoder_prefixes == ("encoder.",)
    assert sum(p.numel() for p in model.encoder_parameters()) == _count(model.encoder)
    assert model.spec.divisor == 8 and model.spec.preferred_tile == 256
    assert model.spec.loss == "banet"


def test_bad_inputs_raise_clear_errors():
    model = _tiny(in_channels=3).eval()
    with pytest.raises(InputShapeError, match="N×3×H×W"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(InputShapeError, match="at least 32"):
        model(torch.randn(1, 3, 16, 64))


# --------------------------------------------------------------------------- loss


def _train_out(num_classes: int = 2, size=(32, 40)):
    model = _tiny(num_classes=num_classes).train()
    return model, model(torch.randn(2, 1, *size))


def test_loss_is_the_sum_of_the_official_terms():
    model, out = _train_out()
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 32, 40, dtype=torch.long)
    mask[:, 8:20, 10:30] = 1
    total, parts = compute_loss(out, {"mask": mask}, model.spec)
    b = boundary_target(mask, border="replicate").long()
    expected = (
        F.cross_entropy(out["mask"], mask)
        + banet_dice_loss(out["mask"], mask)
        + sum(F.cross_entropy(s, mask) for s in out["deep_supervision"])
        + sum(F.cross_entropy(e, b) for e in out[EDGE_SIDES])
    )
    torch.testing.assert_close(total, expected)
    assert set(parts) >= {"loss", "ce", "dice", "seg_sides", "edge_sides"}
    # a given boundary target replaces the derived one
    given = torch.randint(0, 2, (2, 32, 40), generator=gen).float()
    total2, parts2 = compute_loss(out, {"mask": mask, "boundary": given}, model.spec)
    edge = sum(F.cross_entropy(e, given.long()) for e in out[EDGE_SIDES])
    assert parts2["edge_sides"] == pytest.approx(float(edge.detach()), rel=1e-5)
    assert parts2["ce"] == pytest.approx(parts["ce"])


def test_loss_honours_valid_pixels():
    model, out = _train_out()
    mask = torch.zeros(2, 32, 40, dtype=torch.long)
    mask[:, 4:12, 4:12] = 1
    valid = torch.ones(2, 32, 40)
    valid[:, :, 20:] = 0
    boundary = boundary_target(mask)
    a = compute_loss(out, {"mask": mask, "valid": valid, "boundary": boundary}, model.spec)[0]
    mask2, boundary2 = mask.clone(), boundary.clone()
    mask2[:, :, 24:] = 1  # changes only where valid == 0
    boundary2[:, :, 22:30] = 1
    b = compute_loss(out, {"mask": mask2, "valid": valid, "boundary": boundary2}, model.spec)[0]
    torch.testing.assert_close(a, b)
    c = compute_loss(out, {"mask": mask2, "boundary": boundary2}, model.spec)[0]
    assert not torch.allclose(a, c)
    # the derived boundary target looks only at valid pixels too
    d = compute_loss(out, {"mask": mask, "valid": valid}, model.spec)[0]
    e = compute_loss(out, {"mask": mask2, "valid": valid}, model.spec)[0]
    torch.testing.assert_close(d, e)


def test_loss_single_logit_and_multiclass():
    model, out = _train_out(num_classes=1)
    mask = torch.zeros(2, 32, 40, dtype=torch.long)
    mask[0, 5:15, 5:15] = 1
    total, _ = compute_loss(out, {"mask": mask}, model.spec)
    b = boundary_target(mask)
    edge = sum(F.binary_cross_entropy_with_logits(e[:, 0], b) for e in out[EDGE_SIDES])
    seg = sum(cross_entropy(s, mask) for s in out["deep_supervision"])
    expected = cross_entropy(out["mask"], mask) + banet_dice_loss(out["mask"], mask) + seg + edge
    torch.testing.assert_close(total, expected)
    model, out = _train_out(num_classes=4)
    labels = torch.randint(0, 4, (2, 32, 40), generator=torch.Generator().manual_seed(1))
    total, _ = compute_loss(out, {"mask": labels}, model.spec)
    assert torch.isfinite(total)
    total.backward()


def test_dice_term_follows_the_official_smoothing():
    logits = torch.full((1, 2, 4, 4), -30.0)
    logits[:, 0] = 30.0  # predicts background everywhere
    empty = torch.zeros(1, 4, 4, dtype=torch.long)
    # 2 (0 + 1) / (0 + 0 + 1) = 2 -> loss -1 (the code's smoothing inside the factor 2)
    assert float(banet_dice_loss(logits, empty)) == pytest.approx(-1.0, abs=1e-6)
    full = torch.ones(1, 4, 4, dtype=torch.long)
    perfect = -logits
    assert float(banet_dice_loss(perfect, full)) == pytest.approx(1 - 2 * 17 / 33, abs=1e-5)

