"""SASR-Net specific checks (spec banet_unetsharp_sasrnet.md §3): x2 output, SDC block, affinity,
gates, the dropout fix, parameter counts of the paper variant (2D and 3D), and the loss."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from napari_medseg.engine.training.losses import (
    affinity_distance,
    compute_loss,
    sasr_dice_loss,
    sasr_reconstruction_loss,
)
from napari_medseg.errors import InputShapeError
from napari_medseg.models import create_model
from napari_medseg.models.sasrnet_blocks import ScaleAwareDilatedConv

TRAIN_KEYS = {"mask", "sr_image", "seg_features", "gates_seg", "gates_sr"}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these tiny graphs run faster so on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(in_channels: int = 1, num_classes: int = 1, **overrides):
    torch.manual_seed(0)
    return create_model("sasrnet", "tiny", in_channels, num_classes, **overrides)


def _randomize_bn(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


# ------------------------------------------------------------------------------ spec / shapes


def test_spec_declares_x2_output_and_contract():
    spec = _tiny().spec
    assert spec.output_scale == 2
    assert spec.divisor == 16 and spec.min_size == 16
    assert spec.heads == ("mask",)
    assert set(spec.train_outputs) == TRAIN_KEYS - {"mask"}
    assert spec.loss == "sasrnet"
    assert spec.encoder_prefixes == ("encoder.",)
    assert spec.preferred_tile in (128, 256)
    assert spec.extra["loss_weights"] == {"sr": 1.0, "fa": 1.0, "sa": 0.0}
    assert spec.extra["affinity_pool"] == 16
    assert create_model("sasrnet", "tiny", 1, 1, affinity_pool=8).spec.divisor == 8


@pytest.mark.parametrize(("h", "w"), [(16, 16), (32, 48), (64, 80)])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("num_classes", [1, 4])
def test_mask_is_exactly_twice_the_input(h, w, in_channels, num_classes):
    model = _tiny(in_channels, num_classes).eval()
    with torch.inference_mode():
        out = model(torch.randn(2, in_channels, h, w))
    assert set(out) == {"mask"}
    assert out["mask"].shape == (2, num_classes, 2 * h, 2 * w)


def test_bad_inputs_raise_a_clear_error():
    model = _tiny(1, 1).eval()
    with pytest.raises(InputShapeError, match="divisible by 8"):
        model(torch.randn(1, 1, 32, 36))
    with pytest.raises(InputShapeError, match="input channel"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(InputShapeError, match="N x C x H x W"):
        model(torch.randn(1, 1, 16, 16, 16))


def test_training_outputs_shapes():
    model = _tiny(3, 2).train()
    out = model(torch.randn(2, 3, 32, 48))
    assert set(out) == TRAIN_KEYS
    assert out["mask"].shape == (2, 2, 64, 96)
    assert out["sr_image"].shape == (2, 3, 64, 96)
    assert out["seg_features"].shape == (2, 3, 64, 96)
    assert out["gates_seg"].shape == (2, 12, 32, 48)
    assert out["gates_sr"].shape == (2, 12, 32, 48)
    assert (out["seg_features"] >= 0).all()  # BN + ReLU projector


def test_mask_is_align_corners_interpolation_of_low_res_logits():
    model = _tiny(1, 2).eval()
    _randomize_bn(model)
    seen = {}
    model.seg_head.register_forward_hook(lambda m, i, o: seen.setdefault("lr", o))
    with torch.inference_mode():
        out = model(torch.randn(1, 1, 32, 32))["mask"]
    lr = seen["lr"]
    assert lr.shape == (1, 2, 32, 32)
    expected = F.interpolate(lr, size=(64, 64), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # align_corners=True keeps the four corner values.
    for i, j in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        assert torch.equal(out[..., i, j], lr[..., i, j])


def test_eval_skips_the_sr_branch():
    model = _tiny().eval()
    calls = []
    for module in (model.sr_decoder, model.sr_tail, model.projector):
        module.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    with torch.inference_mode():
        model(torch.randn(1, 1, 32, 32))
    assert calls == []
    model.train()
    model(torch.randn(1, 1, 32, 32))
    assert len(calls) == 3


# ----------------------------------------------------------------------------- gates / dropout


def test_gates_lie_strictly_between_zero_and_one():
    model = _tiny(1, 1).train()
    out = model(torch.randn(2, 1, 32, 32) * 5)
    for key in ("gates_seg", "gates_sr"):
        g = out[key]
        assert torch.isfinite(g).all()
        assert (g > 0).all() and (g < 1).all(), key


def test_sdc_block_matches_the_spec_formula():
    torch.manual_seed(0)
    block = ScaleAwareDilatedConv(6, 5, spatial_dims=2, dilations=(1, 2, 5)).eval()
    _randomize_bn(block)
    x = torch.randn(2, 6, 20, 24)
    with torch.inference_mode():
        y, gates = block(x)

        def cbr(seq, inp, dilation):
            conv, bn = seq[0], seq[1]
            pad = dilation * (conv.kernel_size[0] - 1) // 2
            z = F.conv2d(inp, conv.weight, conv.bias, padding=pad, dilation=dilation)
            z = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0, bn.eps)
            return torch.relu(z)

        assert [b[0].kernel_size for b in block.branches] == [(1, 1), (3, 3), (3, 3), (3, 3)]
        assert [b[0].dilation for b in block.branches] == [(1, 1), (1, 1), (2, 2), (5, 5)]
        a = torch.sigmoid(F.conv2d(x, block.gate.weight, block.gate.bias, padding=1))
        b = [cbr(br, x, d) for br, d in zip(block.branches, (1, 1, 2, 5))]
        mixed = torch.cat([a[:, k : k + 1] * b[k] for k in range(4)], dim=1)
        expected = cbr(block.fuse, mixed, 1)
    assert gates.shape == (2, 4, 20, 24)
    torch.testing.assert_close(gates, a)
    torch.testing.assert_close(y, expected)
    # Independent sigmoids, not a softmax: gates need not sum to one.
    assert not torch.allclose(gates.sum(1), torch.ones(2, 20, 24))


def test_eval_passes_are_identical_and_dropout_is_live_in_training():
    model = _tiny(1, 1)
    _randomize_bn(model)
    x = torch.randn(2, 1, 32, 32)
    model.eval()
    with torch.inference_mode():
        a, b = model(x)["mask"], model(x)["mask"]
    assert torch.equal(a, b)
    # Dropout (0.5) is a registered module: it acts in training, so it is off only in eval.
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in model.modules()) == 6
    model.train()
    for m in model.modules():  # keep BN on running stats to isolate dropout
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    with torch.no_grad():
        c, d = model(x)["mask"], model(x)["mask"]
    assert not torch.equal(c, d)


# ------------------------------------------------------------------------------------ sizes


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_paper_2d_parameter_count():
    model = create_model("sasrnet", "paper", 1, 1)
    n = _count(model)
    assert abs(n - 4_600_000) / 4_600_000 < 0.03, n
    assert n == 4_592_286  # measured; two identical decoders, one shared encoder
    assert _count(model.seg_decoder) == _count(model.sr_decoder)


def test_paper_3d_parameter_count_matches_the_released_model():
    model = create_model("sasrnet", "paper", 1, 1, spatial_dims=3)
    assert model.spec.spatial_dims == 3
    # Released: 13,250,574 including 18,224 parameters of modules that never run.
    assert _count(model) == 13_250_574 - 18_224
    assert round(_count(model.encoder) / 1e6, 2) == 3.52
    assert round(_count(model.seg_decoder) / 1e6, 2) == 4.83
    assert round(_count(model.sr_tail) / 1e6, 3) == 0.065


@pytest.mark.parametrize(
    ("dims", "shape", "seg_only", "full"),
    [(2, (1, 1, 256, 256), 19.3, 40.7), (3, (1, 1, 48, 48, 48), 52.2, 147.9)],
)
def test_paper_macs_match_the_spec(dims, shape, seg_only, full):
    """Spec 3.5/3.8: GMACs of the eval (seg-only) path and of the training graph, counted on the
    meta device (no arithmetic runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = create_model("sasrnet", "paper", 1, 1, spatial_dims=dims)
        x = torch.empty(shape)
    for training, expected in ((False, seg_only), (True, full)):
        model.train(training)
        with FlopCounterMode(display=False) as counter:
            model(x)
        assert counter.get_total_flops() / 2e9 == pytest.approx(expected, abs=0.05)


def test_tiny_matches_the_minimal_variant_and_is_fast():
    assert abs(_count(_tiny(1, 3)) - 77_000) < 1_000  # spec 3.12: about 77K
    model = _tiny(1, 2).train()
    x = torch.randn(2, 1, 64, 64)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        out = model(x)
        sum(v.float().mean() for v in out.values()).backward()
        best = min(best, time.perf_counter() - t)
    assert best < 1.0, best


def test_encoder_parameters_are_the_shared_encoder():
    model = _tiny()
    enc = {id(p) for p in model.encoder_parameters()}
    assert enc == {id(p) for p in model.encoder.parameters()}


def test_official_output_order():
    model = _tiny(1, 1).eval()
    with torch.inference_mode():
        probs, sr, proj, sr2, g_seg, g_sr = model.official_outputs(torch.randn(1, 1, 32, 32))
        logits = model(torch.randn(1, 1, 32, 32))["mask"]
    assert probs.shape == logits.shape and ((probs >= 0) & (probs <= 1)).all()
    assert sr is sr2 and sr.shape == (1, 1, 64, 64) and proj.shape == (1, 1, 64, 64)
    assert g_seg.shape == g_sr.shape == (1, 12, 32, 32)


# --------------------------------------------------------------------------------------- 3D


def test_3d_variant_shapes_loss_and_gradients():
    model = _tiny(1, 2, spatial_dims=3)
    spec = model.spec
    assert spec.spatial_dims == 3 and spec.preferred_tile == 48 and spec.divisor == 16
    model.eval()
    with torch.inference_mode():
        out = model(torch.randn(1, 1, 16, 32, 16))
    assert set(out) == {"mask"} and out["mask"].shape == (1, 2, 32, 64, 32)
    model.train()
    x = torch.randn(2, 1, 16, 16, 16)
    out = model(x)
    assert out["sr_image"].shape == (2, 1, 32, 32, 32)
    assert out["gates_seg"].shape == (2, 12, 16, 16, 16)
    gen = torch.Generator().manual_seed(0)
    targets = {
        "mask": torch.randint(0, 2, (2, 32, 32, 32), generator=gen),
        "image_hr": torch.rand(2, 1, 32, 32, 32, generator=gen),
        "valid": torch.ones(2, 32, 32, 32),
    }
    loss, parts = compute_loss(out, targets, spec)
    assert torch.isfinite(loss) and set(parts) == {"loss", "dice", "sr", "fa", "sa"}
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------ affinity


def test_affinity_of_a_map_with_itself_is_zero_and_symmetric():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(2, 3, 64, 64, generator=gen)
    v = torch.randn(2, 3, 64, 64, generator=gen)
    assert affinity_distance(u, u).item() == 0.0
    assert affinity_distance(u, v).item() > 0
    torch.testing.assert_close(affinity_distance(u, v), affinity_distance(v, u))
    u3 = torch.randn(1, 2, 32, 32, 32, generator=gen)
    assert affinity_distance(u3, u3).item() == 0.0


def test_affinity_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(2, 2, 32, 48, generator=gen, requires_grad=True)
    v = torch.rand(2, 2, 32, 48, generator=gen, requires_grad=True)
    value = affinity_distance(u, v, pool=16)
    # 2 x 3 pooled positions, P = 6; explicit loops over batch and position pairs.
    up = u.detach().reshape(2, 2, 2, 16, 3, 16).mean(dim=(3, 5)).reshape(2, 2, 6)
    vp = v.detach().reshape(2, 2, 2, 16, 3, 16).mean(dim=(3, 5)).reshape(2, 2, 6)
    total = 0.0
    for b in range(2):
        for i in range(6):
            for j in range(6):
                total += abs(float(vp[b, :, i] @ vp[b, :, j]) - float(up[b, :, i] @ up[b, :, j]))
    assert value.item() == pytest.approx(total / 36, rel=1e-5)
    value.backward()  # no stop-gradient on either side
    assert u.grad.abs().sum() > 0 and v.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------- loss


def test_dice_is_the_released_formula():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    mask = torch.tensor([[[0, 1], [0, 1]]])
    p = torch.sigmoid(logits)[0, 0]
    y = mask[0].float()
    expected = 1 - 2 * ((p * y).sum() + 1) / (p.sum() + y.sum() + 1)
    torch.testing.assert_close(sasr_dice_loss(logits, mask), expected)
    # Two-class softmax logits (0, z) give the same Dice as the one sigmoid logit z.
    two = torch.cat([torch.zeros_like(logits), logits], dim=1)
    torch.testing.assert_close(sasr_dice_loss(two, mask), expected)


def test_reconstruction_weights_lesion_pixels_five_times_more():
    sr = torch.zeros(1, 1, 2, 2)
    hr = torch.ones(1, 1, 2, 2)
    mask = torch.tensor([[[1, 0], [0, 0]]])
    torch.testing.assert_close(sasr_reconstruction_loss(sr, hr, mask), torch.tensor((1 + 3 * 0.2) / 4))
    valid = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(sasr_reconstruction_loss(sr, hr, mask, valid), torch.tensor(1.0))


def _loss_inputs(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 1, 32, 32, generator=gen)
    targets = {
        "mask": torch.randint(0, 2, (2, 64, 64), generator=gen),
        "image": x,
        "image_hr": torch.rand(2, 1, 64, 64, generator=gen),
    }
    return x, targets


def test_loss_is_the_weighted_sum_and_sa_weight_is_exposed():
    torch.manual_seed(0)
    default = create_model("sasrnet", "tiny", 1, 1).train()
    torch.manual_seed(0)
    with_sa = create_model("sasrnet", "tiny", 1, 1, sa_weight=1.0, fa_weight=0.5).train()
    x, targets = _loss_inputs(default)
    torch.manual_seed(5)
    loss_a, parts_a = compute_loss(default(x), targets, default.spec)
    torch.manual_seed(5)
    loss_b, parts_b = compute_loss(with_sa(x), targets, with_sa.spec)
    assert parts_a["sa"] > 0
    assert loss_a.item() == pytest.approx(parts_a["dice"] + parts_a["sr"] + parts_a["fa"], rel=1e-5)
    assert parts_b["sa"] == pytest.approx(parts_a["sa"], rel=1e-5)
    assert loss_b.item() == pytest.approx(
        parts_b["dice"] + parts_b["sr"] + 0.5 * parts_b["fa"] + parts_b["sa"], rel=1e-5
    )


def test_loss_requires_the_high_resolution_image_and_sizes():
    model = _tiny().train()
    x, targets = _loss_inputs(model)
    out = model(x)
    with pytest.raises(InputShapeError, match="image_hr"):
        compute_loss(out, {k: v for k, v in targets.items() if k != "image_hr"}, model.spec)
    with pytest.raises(InputShapeError, match="twice"):
        compute_loss(out, {**targets, "image_hr": x}, model.spec)
    with pytest.raises(InputShapeError, match="full-resolution mask"):
        compute_loss(out, {**targets, "mask": targets["mask"][:, ::2, ::2]}, model.spec)
    with pytest.raises(InputShapeError, match="train mode"):
        compute_loss({"mask": out["mask"]}, targets, model.spec)


def test_loss_ignores_invalid_pixels():
    model = _tiny().train()
    x, targets = _loss_inputs(model)
    out = {k: v.detach() for k, v in model(x).items()}
    valid = torch.zeros(2, 64, 64)
    valid[:, :32, :32] = 1.0  # a padded tile: only the top-left quarter counts
    targets["valid"] = valid
    base, _ = compute_loss(out, targets, model.spec)
    changed = dict(out)
    for key in ("mask", "sr_image", "seg_features"):
        t = out[key].clone()
        t[..., 32:, :] = 7.0
        t[..., :, 32:] = -7.0
        changed[key] = t
    for key in ("gates_seg", "gates_sr"):
        t = out[key].clone()
        t[..., 16:, :] = 0.9
        changed[key] = t
    other_targets = dict(targets)
    other_targets["mask"] = targets["mask"].clone()
    other_targets["mask"][:, 40:, 40:] = 1 - other_targets["mask"][:, 40:, 40:]
    other, _ = compute_loss(changed, other_targets, model.spec)
    torch.testing.assert_close(base, other)


def test_training_step_reduces_the_loss():
    torch.manual_seed(0)
    model = create_model("sasrnet", "tiny", 1, 1, dropout=0.0).train()
    x, targets = _loss_inputs(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss, _ = compute_loss(model(x), targets, model.spec)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
