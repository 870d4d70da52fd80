"""MSA²Net-specific tests: MASAG equations and invariants, parameter counts from the spec,
MaxViT partition attention with masked padding, tile-size independence, decoder locality
(spec section 3) and the Boundary DoU loss."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_medseg.engine.training.losses import boundary_dou_loss, compute_loss, dice_ce_loss
from napari_medseg.errors import InputShapeError
from napari_medseg.models import create_model
from napari_medseg.models.masag import MASAG
from napari_medseg.models.msa2net import DecoderStage
from napari_medseg.models.msa2net_blocks import (
    DualTransformerBlock,
    _partition_attention,
    maxvit_config,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the shared 2-core test machine is faster without oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _randomize_norm_stats(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.2)


def _tiny(in_channels: int = 1, num_classes: int = 3, **overrides):
    torch.manual_seed(0)
    return create_model("msa2net", "tiny", in_channels, num_classes, **overrides)


# --------------------------------------------------------------------------- MASAG


@pytest.mark.parametrize(
    ("channels", "expected"), [(96, 113_287), (192, 447_751), (384, 1_780_231)]
)
def test_masag_parameter_counts(channels, expected):
    assert _count(MASAG(channels)) == expected


def test_dual_transformer_block_parameter_count():
    assert _count(DualTransformerBlock(384, heads=8)) == 3_578_504


def test_masag_invariants():
    torch.manual_seed(0)
    masag = MASAG(16)
    _randomize_norm_stats(masag)
    masag.eval()
    x = torch.randn(2, 16, 12, 10)
    g = torch.randn(2, 16, 12, 10)
    with torch.no_grad():
        y = masag(x, g)
        a, b = masag.selection(x, g)
    assert y.shape == x.shape
    assert a.shape == b.shape == (2, 1, 12, 10)
    torch.testing.assert_close(a + b, torch.ones_like(a))
    assert bool(((a > 0) & (a < 1)).all())

    # x = 0: the output is the constant map BN(bias of the output conv), whatever g is.
    zero = torch.zeros_like(x)
    with torch.no_grad():
        y1 = masag(zero, g)
        y2 = masag(zero, 5 * torch.randn_like(g))
    bn = masag.out_norm
    const = (masag.out_conv.bias - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    const = const * bn.weight + bn.bias
    torch.testing.assert_close(y1, const.detach()[None, :, None, None].expand_as(y1))
    torch.testing.assert_close(y1, y2)


def test_masag_matches_spec_equations():
    """Recompute MASAG from the spec's plain-math form (section 1.6) with the module's weights."""
    torch.manual_seed(1)
    m = MASAG(8)
    _randomize_norm_stats(m, seed=3)
    for p in m.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    m.eval()
    x = torch.randn(2, 8, 9, 11)
    g = torch.randn(2, 8, 9, 11)

    def bn(layer, t):
        return F.batch_norm(
            t, layer.running_mean, layer.running_var, layer.weight, layer.bias,
            False, 0.0, layer.eps,
        )

    with torch.no_grad():
        dw = F.conv2d(x, m.local_dw.weight, m.local_dw.bias, padding=1, groups=8)
        d2 = F.conv2d(F.relu(bn(m.local_dw_norm, dw)), m.local_dilated.weight,
                      m.local_dilated.bias, padding=2, dilation=2)
        local = bn(m.local_pw_norm, F.conv2d(F.relu(bn(m.local_dilated_norm, d2)),
                                             m.local_pw.weight, m.local_pw.bias))
        stats = torch.cat([g.mean(1, keepdim=True), g.max(1, keepdim=True).values], 1)
        gamma = bn(m.global_norm, F.conv2d(stats, m.global_conv.weight, m.global_conv.bias))
        ab = torch.softmax(F.conv2d(bn(m.fuse_norm, local + gamma), m.select.weight,
                                    m.select.bias), 1)
        xp = (1 + ab[:, :1]) * x
        gp = (1 + ab[:, 1:]) * g
        inter = torch.sigmoid(gp) * torch.sigmoid(xp) * xp * gp
        recal = torch.sigmoid(bn(m.recal_norm, F.conv2d(inter, m.recal_conv.weight,
                                                         m.recal_conv.bias)))
        expected = bn(m.out_norm, F.conv2d(recal * x, m.out_conv.weight, m.out_conv.bias))
        torch.testing.assert_close(m(x, g), expected, rtol=1e-5, atol=1e-5)
    # the dilated conv is dense (C x C x 3 x 3), not depthwise
    assert m.local_dilated.weight.shape == (8, 8, 3, 3)


# --------------------------------------------------------------------------- MaxViT encoder


def _reference_partition_attention(layer, x: torch.Tensor, size: int) -> torch.Tensor:
    """Brute force: attention inside each window / grid group over its real tokens only."""
    _, h, w, c = x.shape
    attn = layer.attn
    heads, dh = attn.num_heads, attn.dim_head
    bias = attn.rel_pos.get_bias()[0]  # heads x P^2 x P^2
    hp, wp = math.ceil(h / size) * size, math.ceil(w / size) * size
    groups = []
    if layer.partition_block:
        for bi in range(hp // size):
            for bj in range(wp // size):
                groups.append([(bi * size + a, bj * size + b, a * size + b)
                               for a in range(size) for b in range(size)])
    else:
        sh, sw = hp // size, wp // size
        for i in range(sh):
            for j in range(sw):
                groups.append([(i + sh * a, j + sw * b, a * size + b)
                               for a in range(size) for b in range(size)])
    out = torch.zeros_like(x)
    for members in groups:
        members = [(r, q, k) for r, q, k in members if r < h and q < w]
        rows = [r for r, _, _ in members]
        cols = [q for _, q, _ in members]
        idx = torch.tensor([k for _, _, k in members])
        tok = x[0, rows, cols]  # M x C
        qkv = attn.qkv(tok).view(len(members), heads, dh * 3).transpose(0, 1)
        q, k, v = qkv.chunk(3, dim=-1)
        logits = (q * dh**-0.5) @ k.transpose(-2, -1) + bias[:, idx][:, :, idx]
        o = (logits.softmax(-1) @ v).transpose(0, 1).reshape(len(members), heads * dh)
        out[0, rows, cols] = attn.proj(o)
    return out


@pytest.mark.parametrize("kind", ["attn_block", "attn_grid"])
def test_padded_partition_attention_matches_brute_force(kind):
    model = _tiny().eval()
    layer = getattr(model.encoder.stages[1].blocks[0], kind)  # 16 channels, 2 heads
    x = torch.randn(1, 12, 20, 16)  # pads to 16 x 24 with P = 8
    with torch.no_grad():
        got = _partition_attention(layer, x, 8)
        ref = _reference_partition_attention(layer, x, 8)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["attn_block", "attn_grid"])
def test_export_path_equals_eager_path(kind, monkeypatch):
    """Under tracing the pad-and-mask path is always taken (the graph must hold at every
    size); it must give exactly the eager result, with and without padding to do, and a
    whole-network forward must not change either."""
    import napari_medseg.models.msa2net_blocks as blocks

    model = _tiny().eval()
    layer = getattr(model.encoder.stages[1].blocks[0], kind)
    inputs = [torch.randn(2, 16, 24, 16), torch.randn(2, 12, 20, 16)]  # no padding / padding
    image = torch.randn(2, 1, 96, 64)
    with torch.no_grad():
        eager = [_partition_attention(layer, x, 8) for x in inputs]
        eager_net = model(image)["mask"]
        monkeypatch.setattr(blocks, "_tracing", lambda: True)
        traced = [_partition_attention(layer, x, 8) for x in inputs]
        traced_net = model(image)["mask"]
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)
    assert torch.equal(eager_net, traced_net)


def test_trace_at_one_size_runs_at_another():
    """A TorchScript trace at 64×64 (the ONNX exporter's tracer) reproduces eager at 96×128,
    where the maps of two stages need padding that they did not need at 64×64 and back."""
    model = _tiny().eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.randn(2, 1, 64, 64), strict=False)
        x = torch.randn(1, 1, 96, 128)
        torch.testing.assert_close(traced(x)["mask"], model(x)["mask"], rtol=0, atol=1e-5)


def _native_stage_features(encoder, x, partition: int):
    """timm's own stage forward with partition size min(P, map side) per stage."""
    y = encoder.stem(x)
    feats = []
    for stage in encoder.stages:
        side = min(y.shape[-2] // 2, y.shape[-1] // 2, partition)
        for blk in stage.blocks:
            blk.attn_block.set_partition_size((side, side))
            blk.attn_grid.set_partition_size((side, side))
        y = stage(y)
        feats.append(y)
        for blk in stage.blocks:
            blk.attn_block.set_partition_size((partition, partition))
            blk.attn_grid.set_partition_size((partition, partition))
    return feats


@pytest.mark.parametrize("size", [256, 64])
def test_encoder_matches_timm_maxvit(size):
    """No padding needed (256) or maps smaller than P (64): equal to timm's own MaxViT; the
    final LayerNorm2d is applied to E3 only."""
    model = _tiny().eval()
    enc = model.encoder
    x = torch.randn(1, 1, size, size)
    with torch.no_grad():
        ours = enc(x)
        native = _native_stage_features(enc, x, 8)
    for i in range(3):
        torch.testing.assert_close(ours[i], native[i], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[3], enc.norm(native[3]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours[3], native[3], atol=1e-3)
    assert [f.shape[-1] for f in ours] == [size // 4, size // 8, size // 16, size // 32]


def test_paper_encoder_config_is_maxvit_rmlp_small():
    from timm.models.maxxvit import model_cfgs

    ours = maxvit_config((96, 192, 384, 768), (2, 2, 5, 2), (32, 64), 32, 7, 512)
    ref = model_cfgs["maxvit_rmlp_small_rw"]
    assert (ours.embed_dim, ours.depths, ours.block_type, ours.stem_width) == (
        ref.embed_dim, ref.depths, ref.block_type, ref.stem_width
    )
    assert ours.conv_cfg == ref.conv_cfg
    t_ours = {k: v for k, v in vars(ours.transformer_cfg).items()
              if k not in ("window_size", "grid_size")}
    t_ref = {k: v for k, v in vars(ref.transformer_cfg).items()
             if k not in ("window_size", "grid_size")}
    assert t_ours == t_ref
    assert ours.transformer_cfg.window_size == ours.transformer_cfg.grid_size == (7, 7)


# --------------------------------------------------------------------------- whole network


def test_shapes_at_224_follow_spec_topology():
    model = _tiny(3, 9).eval()
    seen = {}

    def hook(name):
        def fn(_module, _inputs, output):
            seen[name] = output if isinstance(output, list) else output.shape
        return fn

    for name in ("encoder", "expand3", "stage2", "stage1", "stage0"):
        getattr(model, name).register_forward_hook(hook(name))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))["mask"]
    dims = model.config.embed_dims
    assert [tuple(f.shape) for f in seen["encoder"]] == [
        (1, dims[0], 56, 56), (1, dims[1], 28, 28), (1, dims[2], 14, 14), (1, dims[3], 7, 7)
    ]
    assert seen["expand3"] == (1, 14, 14, dims[2])
    assert seen["stage2"] == (1, 28, 28, dims[1])
    assert seen["stage1"] == (1, 56, 56, dims[0])
    assert seen["stage0"] == (1, 224, 224, dims[0])
    assert out.shape == (1, 9, 224, 224)


def test_same_weights_on_tiles_224_256_320_and_non_square():
    model = _tiny(1, 2).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x224 = torch.randn(1, 1, 224, 224)
    with torch.inference_mode():
        first = model(x224)["mask"]
        for h, w in [(224, 224), (256, 256), (320, 320), (96, 160)]:
            out = model(torch.randn(1, 1, h, w))["mask"]
            assert out.shape == (1, 2, h, w)
            assert torch.isfinite(out).all()
        again = model(x224)["mask"]
    # nothing size-dependent is cached: same weights, same result
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_decoder_locality_with_spatial_layout():
    """Spec section 3: last stage alone, C=16, 64x64 token grid, perturb the skip at token
    (60, 60): no logit moves outside +-27 tokens (MASAG +-3, two LKA blocks +-12 each)."""
    torch.manual_seed(0)
    stage = DecoderStage(16, "lka", depth=2, final=True)
    head = torch.nn.Conv2d(16, 3, 1)
    _randomize_norm_stats(stage)
    for blk in stage.blocks:  # make the LKA paths matter
        blk.gamma1.data.fill_(1.0)
        blk.gamma2.data.fill_(1.0)
    stage.eval()
    d = torch.randn(1, 64, 64, 16)
    skip = torch.randn(1, 16, 64, 64)
    bumped = skip.clone()
    bumped[0, :, 60, 60] += 3.0
    with torch.no_grad():
        y0 = head(stage(d, skip).permute(0, 3, 1, 2))
        y1 = head(stage(d, bumped).permute(0, 3, 1, 2))
    assert y0.shape == (1, 3, 256, 256)
    change = (y1 - y0).abs().amax(1)[0].view(64, 4, 64, 4).amax(dim=(1, 3))  # per token
    rows, cols = torch.nonzero(change > 1e-6, as_tuple=True)
    assert change[60, 60] > 1e-3
    assert rows.min() >= 60 - 27 and cols.min() >= 60 - 27
    assert rows.min() < 60 - 3  # the LKA blocks do reach beyond MASAG's +-3


def test_paper_variant_parameter_count_and_small_forward():
    torch.manual_seed(0)
    model = create_model("msa2net", "paper", in_channels=3, num_classes=9)
    total = _count(model)
    assert abs(total - 76_606_666) <= 0.03 * 76_606_666
    assert total == 76_606_666  # the spec's executed count, exactly
    assert _count(model.stage2.masag) == 1_780_231
    assert _count(model.stage1.masag) == 447_751
    assert _count(model.stage0.masag) == 113_287
    assert all(_count(b) == 3_578_504 for b in model.stage2.blocks)
    assert len(model.stage2.blocks) == 2 and len(model.stage1.blocks) == 2
    assert model.spec.preferred_tile == 224 and model.spec.divisor == 32

    # encoder parameters are exactly timm's maxvit_rmlp_small_rw_224 stem + stages
    import timm

    ref = timm.create_model("maxvit_rmlp_small_rw_224", pretrained=False, device="meta")
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()
                  if k.startswith(("stem.", "stages."))}
    ours = {k[len("encoder."):]: tuple(v.shape) for k, v in model.state_dict().items()
            if k.startswith(("encoder.stem.", "encoder.stages."))}
    assert ours == ref_shapes

    model.eval()
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 64, 64))["mask"]
    assert out.shape == (1, 9, 64, 64) and torch.isfinite(out).all()


def test_variant_sizes_and_tiny_speed():
    tiny = _tiny(1, 2)
    assert _count(tiny) < 500_000
    torch.manual_seed(0)
    lite = create_model("msa2net", "lite", 1, 2)
    assert 3_000_000 <= _count(lite) <= 8_000_000
    assert lite.spec.preferred_tile == 256

    tiny.train()
    x = torch.randn(2, 1, 64, 64)
    best = float("inf")
    for _ in range(3):  # one thread (module fixture), best of 3
        t0 = time.perf_counter()
        tiny(x)["mask"].float().mean().backward()
        best = min(best, time.perf_counter() - t0)
    assert best < 1.0, f"tiny forward+backward took {best:.2f} s"


@pytest.mark.parametrize("in_channels", [1, 3, 5])
def test_stem_takes_any_channel_count(in_channels):
    model = _tiny(in_channels, 2).eval()
    assert model.encoder.stem.conv1.in_channels == in_channels
    with torch.inference_mode():
        assert model(torch.randn(1, in_channels, 64, 64))["mask"].shape == (1, 2, 64, 64)


def test_bad_inputs_and_settings_raise_clear_errors():
    model = _tiny(1, 2).eval()
    with pytest.raises(InputShapeError, match="multiples of 32"):
        model(torch.randn(1, 1, 80, 64))
    with pytest.raises(InputShapeError, match=r"N×1×H×W"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(InputShapeError, match="double"):
        create_model("msa2net", "tiny", 1, 2, embed_dims=(8, 16, 24, 64))
    with pytest.raises(InputShapeError, match="loss"):
        create_model("msa2net", "tiny", 1, 2, loss="focal")


# --------------------------------------------------------------------------- loss


def _reference_boundary_dou(probs: np.ndarray, mask: np.ndarray, k: int) -> float:
    """The official Boundary DoU written out with loops (spec 1.12)."""
    eps = 1e-5
    losses = []
    n, h, w = mask.shape
    for c in range(k):
        t = (mask == c).astype(np.float64)
        p = probs[:, c].astype(np.float64)
        boundary = 0
        for b in range(n):
            padded = np.pad(t[b], 1)
            for i in range(h):
                for j in range(w):
                    if t[b, i, j]:
                        s = (padded[i + 1, j + 1] + padded[i, j + 1] + padded[i + 2, j + 1]
                             + padded[i + 1, j] + padded[i + 1, j + 2])
                        boundary += int(s != 5)
        alpha = min(2 * (1 - (boundary + eps) / (t.sum() + eps)) - 1, 0.8)
        inter, zz, yy = (p * t).sum(), (p * p).sum(), (t * t).sum()
        losses.append((zz + yy - 2 * inter + eps) / (zz + yy - (1 + alpha) * inter + eps))
    return float(np.mean(losses))


def test_boundary_dou_matches_official_formula():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 12, 10, generator=gen)
    mask = torch.zeros(2, 12, 10, dtype=torch.long)
    mask[0, 2:8, 3:9] = 1
    mask[1, 5:12, 0:4] = 2
    mask[1, 0:3, 6:10] = 1
    got = boundary_dou_loss(logits, mask)
    probs = torch.softmax(logits, 1).numpy()
    assert got.item() == pytest.approx(_reference_boundary_dou(probs, mask.numpy(), 3), rel=1e-5)


def test_boundary_dou_perfect_prediction_and_valid_mask():
    mask = torch.zeros(1, 16, 16, dtype=torch.long)
    mask[0, 4:12, 4:12] = 1
    perfect = F.one_hot(mask, 2).permute(0, 3, 1, 2).float() * 40 - 20
    assert boundary_dou_loss(perfect, mask).item() < 1e-3
    # K == 1: one sigmoid logit
    assert boundary_dou_loss(perfect[:, 1:] - perfect[:, :1], mask).item() < 1e-3

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 2, 16, 16, generator=gen, requires_grad=True)
    ones = torch.ones(1, 16, 16)
    torch.testing.assert_close(
        boundary_dou_loss(logits, mask, ones), boundary_dou_loss(logits, mask)
    )
    valid = ones.clone()
    valid[0, :, 10:] = 0
    base = boundary_dou_loss(logits, mask, valid)
    changed = logits.detach().clone()
    changed[..., 10:] = torch.randn(1, 2, 16, 6, generator=gen) * 10
    torch.testing.assert_close(boundary_dou_loss(changed, mask, valid), base)
    base.backward()
    assert logits.grad[..., 10:].abs().max() == 0 and logits.grad[..., :10].abs().max() > 0


def test_loss_selection_by_config():
    model = _tiny(1, 2)
    assert model.spec.loss == "msa2net"
    dice_model = _tiny(1, 2, loss="dice_ce")
    assert dice_model.spec.loss == "dice_ce"
    gen = torch.Generator().manual_seed(0)
    out = {"mask": torch.randn(2, 2, 64, 64, generator=gen)}
    targets = {"mask": torch.randint(0, 2, (2, 64, 64), generator=gen)}
    loss, parts = compute_loss(out, targets, model.spec)
    assert loss.item() == pytest.approx(boundary_dou_loss(out["mask"], targets["mask"]).item())
    assert "boundary_dou" in parts
    loss2, _ = compute_loss(out, targets, dice_model.spec)
    assert loss2.item() == pytest.approx(dice_ce_loss(out, targets, dice_model.spec)[0].item())
