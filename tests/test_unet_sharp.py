"""UNet#-specific tests: topology, parameter counts, pruning, CGM and the official loss."""

from __future__ import annotations

import pytest
import torch

from napari_medseg.engine.training.losses import (
    compute_loss,
    unet_sharp_bce_dice,
    unet_sharp_cgm_loss,
)
from napari_medseg.errors import ConfigError, InputShapeError
from napari_medseg.models import HEAD_CLASSIFICATION, HEAD_DEEP_SUPERVISION, HEAD_MASK, create_model
from napari_medseg.models.unet_sharp import (
    OFFICIAL_OUTPUT_ORDER,
    REJECTED_LOGIT,
    cgm_gate,
    node_in_channels,
    official_order,
)

PAPER_WIDTHS = (32, 64, 128, 256, 512)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _paper(in_channels: int = 3, num_classes: int = 1, **overrides):
    """The paper variant on the meta device: parameter shapes only, no memory, no init time."""
    with torch.device("meta"):
        return create_model("unet_sharp", "paper", in_channels, num_classes, **overrides)


def _tiny(in_channels: int = 1, num_classes: int = 1, **overrides):
    torch.manual_seed(0)
    return create_model("unet_sharp", "tiny", in_channels, num_classes, **overrides)


def _randomize_batchnorm(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial BN statistics and affine parameters, so eval mode is a real test."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def _force_cgm(model, depth: int, present: bool) -> None:
    """Make the CGM on X^{depth,0} decide ``present`` for every image."""
    conv = model.cgm[f"x{depth}_0"].conv
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([-5.0, 5.0] if present else [5.0, -5.0]))


# ----------------------------------------------------------------------------- topology, size


def test_paper_parameter_counts_match_the_spec():
    # spec 2.3: 10,757,224 with the 8 heads, 10,748,481 with the single head (3 in, K = 1).
    full = _paper(cgm=False)
    assert _n_params(full) == 10_757_224
    single = _paper(cgm=False, deep_supervision=False)
    assert _n_params(single) == 10_748_481
    # Default paper variant adds the two CGMs: 512*2+2 on X40 and 128*2+2 on X20.
    default = _paper()
    assert _n_params(default) == 10_757_224 + 1_026 + 258
    assert abs(_n_params(default) - 10.76e6) / 10.76e6 < 0.03
    assert sum(p.numel() for p in default.cgm["x4_0"].parameters()) == 1_026


def test_node_input_channels_formula_and_table():
    # spec 2.2 node table, 3-channel input.
    table = {
        (0, 0): 3, (1, 0): 32, (2, 0): 64, (3, 0): 128, (4, 0): 256,
        (0, 1): 96, (1, 1): 192, (2, 1): 384, (3, 1): 768,
        (0, 2): 256, (1, 2): 512, (2, 2): 1024,
        (0, 3): 544, (1, 3): 1088,
        (0, 4): 1088,
    }  # fmt: skip
    for (i, j), channels in table.items():
        assert node_in_channels(PAPER_WIDTHS, i, j, 3) == channels, (i, j)
        if j:
            expected = j * PAPER_WIDTHS[i] + sum(PAPER_WIDTHS[i + k] for k in range(1, j + 1))
            assert channels == expected
    model = _tiny(in_channels=5)
    widths = model.config.widths
    for name, node in model.nodes.items():
        i, j = (int(v) for v in name[1:].split("_"))
        assert node.conv1.in_channels == node_in_channels(widths, i, j, 5), name
        assert node.conv1.out_channels == node.conv2.out_channels == widths[i]
    assert len(model.nodes) == 15


def test_node_parameters_match_the_spec_table():
    model = _paper(in_channels=1)
    expected = {"x0_0": 9.7e3, "x1_0": 55.7e3, "x4_0": 3.54e6, "x3_1": 2.36e6, "x0_4": 323e3}
    for name, count in expected.items():
        assert _n_params(model.nodes[name]) == pytest.approx(count, rel=0.01), name


def test_parameters_used_per_pruning_level_match_the_spec():
    model = _paper(cgm=False)
    spec_millions = {1: 0.10, 2: 0.56, 3: 2.53, 4: 10.75}
    for level, millions in spec_millions.items():
        used = sum(
            _n_params(node)
            for name, node in model.nodes.items()
            if sum(int(v) for v in name[1:].split("_")) <= level
        ) + _n_params(model.heads[f"o{level}"])
        assert used / 1e6 == pytest.approx(millions, abs=0.006), level


def test_encoder_prefixes_are_the_first_column():
    model = _tiny()
    enc = sum(p.numel() for p in model.encoder_parameters())
    assert enc == sum(_n_params(model.nodes[f"x{i}_0"]) for i in range(5))
    spec = model.spec
    assert spec.divisor == 16 and spec.preferred_tile == 256
    assert spec.heads == (HEAD_MASK,)
    assert spec.train_outputs == (HEAD_DEEP_SUPERVISION, HEAD_CLASSIFICATION)
    assert spec.loss == "unet_sharp"


# ----------------------------------------------------------------------------- forward shapes


@pytest.mark.parametrize(
    "n, channels, h, w", [(1, 1, 64, 64), (2, 3, 96, 96), (4, 1, 160, 128), (1, 3, 160, 128)]
)
def test_eval_shapes(n, channels, h, w):
    model = _tiny(channels, 2).eval()
    with torch.inference_mode():
        out = model(torch.randn(n, channels, h, w))
    assert set(out) == {HEAD_MASK}
    assert out[HEAD_MASK].shape == (n, 2, h, w)
    assert torch.isfinite(out[HEAD_MASK]).all()


def test_training_has_eight_outputs_in_the_official_order():
    model = _tiny(1, 3).train()
    x = torch.randn(2, 1, 96, 64)
    out = model(x)
    assert len(out[HEAD_DEEP_SUPERVISION]) == 7
    outputs = official_order(out)
    assert len(outputs) == len(OFFICIAL_OUTPUT_ORDER) == 8
    for o in outputs:
        assert o.shape == (2, 3, 96, 64)
    assert out[HEAD_CLASSIFICATION].shape == (2, 2)
    assert [c.shape for c in out["classification_pruned"]] == [(2, 2)]
    # Same computation as official_outputs (BN in training mode uses the batch statistics).
    for a, b in zip(outputs, model.official_outputs(x), strict=True):
        assert torch.equal(a, b)


def test_without_deep_supervision_there_is_one_head():
    model = _tiny(deep_supervision=False, cgm=False).train()
    out = model(torch.randn(1, 1, 64, 64))
    assert set(out) == {HEAD_MASK} and list(model.heads) == ["o4"]
    assert model.spec.train_outputs == ()


def test_bad_inputs_raise_clear_errors():
    model = _tiny().eval()
    with pytest.raises(InputShapeError, match="multiples of 16"):
        model(torch.randn(1, 1, 72, 64))
    with pytest.raises(InputShapeError, match="×H×W batch"):
        model(torch.randn(1, 3, 64, 64))


# ----------------------------------------------------------------------------- pruning


def test_pruned_output_equals_the_full_models_head():
    model = _tiny(1, 2, cgm=False)
    _randomize_batchnorm(model)
    model.eval()
    x = torch.randn(2, 1, 96, 64)
    with torch.inference_mode():
        full = dict(zip(OFFICIAL_OUTPUT_ORDER, model.official_outputs(x), strict=True))
        for level in (1, 2, 3, 4):
            model.prune_level = level
            pruned = model(x)[HEAD_MASK]
            assert torch.equal(pruned, full[f"o{level}"]), level
            if level < 4:
                assert not torch.equal(pruned, full["o4"])


def test_pruning_computes_only_the_needed_nodes():
    model = _tiny(cgm=False).eval()
    ran: list[str] = []
    for name, node in model.nodes.items():
        node.register_forward_hook(lambda *_, name=name: ran.append(name))
    expected = {
        1: {"x0_0", "x1_0", "x0_1"},
        2: {"x0_0", "x1_0", "x0_1", "x2_0", "x1_1", "x0_2"},
        3: {n for n in model.nodes if sum(int(v) for v in n[1:].split("_")) <= 3},
        4: set(model.nodes),
    }
    for level, nodes in expected.items():
        ran.clear()
        model.prune_level = level
        with torch.inference_mode():
            model(torch.randn(1, 1, 64, 64))
        assert set(ran) == nodes and len(ran) == len(nodes), level


def test_prune_level_from_config_and_validation():
    model = _tiny(prune_level=2)
    assert model.prune_level == 2
    with pytest.raises(ConfigError, match="prune level"):
        model.prune_level = 5
    with pytest.raises(ConfigError, match="prune level"):
        _tiny(prune_level=0)
    with pytest.raises(ConfigError, match="deep supervision"):
        _tiny(deep_supervision=False, prune_level=3)
    plain = _tiny(deep_supervision=False)
    with pytest.raises(ConfigError, match="deep supervision"):
        plain.prune_level = 1


def test_training_ignores_pruning():
    model = _tiny(prune_level=1).train()
    out = model(torch.randn(1, 1, 64, 64))
    assert len(official_order(out)) == 8


# ----------------------------------------------------------------------------- CGM


@pytest.mark.parametrize("num_classes", [1, 3])
def test_cgm_zeroes_probabilities_of_rejected_images(num_classes):
    model = _tiny(1, num_classes)
    _randomize_batchnorm(model)
    model.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        ungated = model.official_outputs(x)[-1]
        _force_cgm(model, 4, present=True)
        assert torch.equal(model(x)[HEAD_MASK], ungated)
        _force_cgm(model, 4, present=False)
        logits = model(x)[HEAD_MASK]
    if num_classes == 1:
        prob = torch.sigmoid(logits)
        assert torch.equal(prob, torch.zeros_like(prob))
        assert (logits == REJECTED_LOGIT).all()
    else:
        prob = torch.softmax(logits, dim=1)
        assert torch.equal(prob[:, 1:], torch.zeros_like(prob[:, 1:]))
        assert torch.equal(prob[:, 0], torch.ones_like(prob[:, 0]))
    # bfloat16 keeps the suppression exact too.
    assert (torch.sigmoid(logits.bfloat16()[:, -1:]) == 0).all()


def test_cgm_gate_is_per_image():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 8, 8, generator=gen)
    cls = torch.tensor([[0.0, 1.0], [2.0, -1.0], [-3.0, 3.0]])  # keep, reject, keep
    gated = cgm_gate(logits, cls)
    assert torch.equal(gated[0], logits[0]) and torch.equal(gated[2], logits[2])
    assert torch.equal(torch.softmax(gated[1], 0)[1], torch.zeros(8, 8))
    single = cgm_gate(logits[:, :1], cls)
    assert torch.equal(torch.sigmoid(single[1]), torch.zeros(1, 8, 8))
    assert torch.equal(single[0], logits[0, :1])


def test_cgm_is_not_applied_in_training():
    model = _tiny().train()
    _force_cgm(model, 4, present=False)
    _force_cgm(model, 2, present=False)
    x = torch.randn(2, 1, 64, 64)
    out = model(x)
    assert torch.equal(out[HEAD_MASK], model.official_outputs(x)[-1])
    assert (out[HEAD_CLASSIFICATION].argmax(1) == 0).all()


def test_pruned_models_use_the_shallow_cgm():
    model = _tiny(cgm_depths=(2, 4))
    _randomize_batchnorm(model)
    model.eval()
    assert [model.gating_depth(level) for level in (1, 2, 3, 4)] == [None, 2, 2, 4]
    x = torch.randn(1, 1, 64, 64)
    _force_cgm(model, 4, present=True)
    _force_cgm(model, 2, present=False)
    with torch.inference_mode():
        heads = dict(zip(OFFICIAL_OUTPUT_ORDER, model.official_outputs(x), strict=True))
        model.prune_level = 3
        assert (model(x)[HEAD_MASK] == REJECTED_LOGIT).all()
        model.prune_level = 1  # no CGM at depth <= 1: ungated
        assert torch.equal(model(x)[HEAD_MASK], heads["o1"])
        model.prune_level = 4  # gated by X40's CGM, which accepts
        assert torch.equal(model(x)[HEAD_MASK], heads["o4"])


def test_cgm_can_be_switched_off():
    model = _tiny(cgm=False)
    assert len(model.cgm) == 0
    assert model.spec.train_outputs == (HEAD_DEEP_SUPERVISION,)
    assert HEAD_CLASSIFICATION not in model.train()(torch.randn(1, 1, 64, 64))


# ----------------------------------------------------------------------------- loss


def test_bce_dice_matches_the_official_formula():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 1, 16, 16, generator=gen)
    mask = torch.randint(0, 2, (2, 16, 16), generator=gen)
    y = mask.float()[:, None]
    p = torch.sigmoid(z)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y)
    dice = (2 * (p * y).flatten(1).sum(1) + 1e-5) / (
        (p * p).flatten(1).sum(1) + (y * y).flatten(1).sum(1) + 1e-5
    )
    expected = 0.5 * bce + 1 - dice.mean()
    torch.testing.assert_close(unet_sharp_bce_dice(z, mask), expected)
    # The softmax analogue with logits [0, z] equals the sigmoid form (K = 2 == K = 1).
    two = torch.cat([torch.zeros_like(z), z], dim=1)
    torch.testing.assert_close(unet_sharp_bce_dice(two, mask), expected)


def test_bce_dice_honours_valid():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 16, 16, generator=gen)
    mask = torch.randint(0, 3, (2, 16, 16), generator=gen)
    valid = torch.zeros(2, 16, 16)
    valid[:, :8] = 1
    changed = z.clone()
    changed[:, :, 8:] = torch.randn(2, 3, 8, 16, generator=gen) * 10
    a = unet_sharp_bce_dice(z, mask, valid)
    b = unet_sharp_bce_dice(changed, mask, valid)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(unet_sharp_bce_dice(z, mask), unet_sharp_bce_dice(changed, mask))


def test_cgm_loss_targets():
    logits = torch.tensor([[-4.0, 4.0], [4.0, -4.0], [-4.0, 4.0]])
    mask = torch.zeros(3, 8, 8, dtype=torch.long)
    mask[0, 2, 2] = 1  # image 0 has foreground; images 1 and 2 are empty
    loss = unet_sharp_cgm_loss(logits, mask)
    right = torch.nn.functional.softplus(torch.tensor(-4.0))  # BCE of a confident right answer
    wrong = torch.nn.functional.softplus(torch.tensor(4.0))
    torch.testing.assert_close(loss, (right + right + wrong) / 3)
    # Image 2 is only partly annotated and shows no foreground: its label is unknown.
    valid = torch.ones(3, 8, 8)
    valid[2, :4] = 0
    torch.testing.assert_close(unet_sharp_cgm_loss(logits, mask, valid), right)
    # Foreground outside the valid region does not count as present.
    # and leaves a partly annotated image unknown; images 1 and 2 are known negatives.
    valid = torch.ones(3, 8, 8)
    valid[0, 2, 2] = 0
    torch.testing.assert_close(unet_sharp_cgm_loss(logits, mask, valid), (right + wrong) / 2)
    # No image with a known label: zero, still connected to the graph.
    none = unet_sharp_cgm_loss(logits[:1].requires_grad_(), mask[:1], valid[:1])
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_loss_averages_over_the_eight_outputs_and_adds_the_cgm():
    model = _tiny(1, 1).train()
    x = torch.randn(2, 1, 64, 64)
    out = model(x)
    mask = torch.zeros(2, 64, 64, dtype=torch.long)
    mask[0, 10:20, 10:20] = 1
    total, parts = compute_loss(out, {"mask": mask}, model.spec)
    seg = torch.stack([unet_sharp_bce_dice(o, mask) for o in official_order(out)]).mean()
    cls = (
        unet_sharp_cgm_loss(out[HEAD_CLASSIFICATION], mask)
        + unet_sharp_cgm_loss(out["classification_pruned"][0], mask)
    ) / 2
    torch.testing.assert_close(total, seg + cls)
    assert parts["loss_seg"] == pytest.approx(float(seg))
    assert parts["loss_cls"] == pytest.approx(float(cls))
    total.backward()
    assert all(p.grad is not None for p in model.parameters())
