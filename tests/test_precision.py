"""The dtype policy, and bf16 autocast agreeing with fp32 for every registered network.

The agreement test runs each network's tiny variant with random weights (no trained weights
ship yet) on a real image, the bundled DSB2018 nuclei sample. Random weights make mask
agreement a weak check: their probabilities hover near 0.5 and some heads are nearly constant.
So it checks the mask logits themselves (relative RMS error against their spread; measured
at most 0.016 on this CPU, msa2net the largest) as well as the probabilities and argmax
the engine produces (measured: mean |dp| <= 0.003, >= 99.6 % argmax agreement).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medseg import resources
from napari_medseg.engine import precision
from napari_medseg.engine.inference.pipeline import predict
from napari_medseg.engine.inference.normalization import normalize
from napari_medseg.engine.precision import autocast, resolve_precision
from napari_medseg.errors import ConfigError
from napari_medseg.models import create_model, list_models

CPU = torch.device("cpu")


def test_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", CPU).name == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", CPU).name == "fp32"
    emulated = resolve_precision("bf16", CPU)
    assert emulated.name == "bf16" and "emulated" in emulated.notice


@pytest.mark.parametrize("capability,expected", [((9, 0), "bf16"), ((8, 0), "bf16"),
                                                 ((7, 5), "fp16"), ((6, 1), "fp32")])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(precision, "cuda_capability", lambda device: capability)
    assert resolve_precision("auto", torch.device("cuda", 0)).name == expected


def test_mps_and_explicit_choices():
    assert resolve_precision("auto", torch.device("mps")).name == "fp32"
    assert resolve_precision("fp32", CPU).dtype is None
    assert resolve_precision("fp16", CPU).notice  # honoured, with a warning
    assert resolve_precision("BF16", CPU).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="Precision 'int8'"):
        resolve_precision("int8", CPU)


def test_this_cpu_flag_reader_matches_proc_cpuinfo():
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo")
    precision.cpu_has_native_bf16.cache_clear()
    expected = "avx512_bf16" in info.read_text() or "amx_bf16" in info.read_text()
    assert precision.cpu_has_native_bf16() == expected


@pytest.fixture(scope="module")
def nuclei():
    from napari_medseg.io import read_image

    path = resources.samples_dir() / "nuclei.tif"
    if not path.is_file():
        pytest.skip("the bundled nuclei sample is not there yet")
    image = np.asarray(read_image(path)[0])
    return image[:128, :128] if image.ndim == 2 else image[:128, :128, 0]


@pytest.mark.parametrize("name", list_models())
def test_bf16_autocast_agrees_with_fp32(name, nuclei):
    torch.manual_seed(0)
    model = create_model(name, variant="tiny", in_channels=1, num_classes=2).eval()
    # 1. The mask logits, relative to their spread over the image.
    x = torch.from_numpy(normalize(nuclei))[None, None]
    with torch.inference_mode():
        ref = model(x)["mask"].float()
        with autocast(CPU, resolve_precision("bf16", CPU)):
            low = model(x)["mask"].float()
    spread = float(ref.std())
    rel = float((ref - low).pow(2).mean().sqrt()) / max(spread, 1e-6)
    assert rel < 0.05, f"{name}: relative RMS logit error {rel:.4f} (spread {spread:.3g})"
    # 2. What the engine outputs in bf16 against fp32 probabilities of the same input (one
    # 128 x 128 tile covers the crop exactly, so the fp32 reference is the softmax of `ref`).
    b = predict(nuclei, model, precision="bf16", outputs="probabilities,mask")
    assert b.stats["precision"] == "bf16" and b.plan.tiles == 1
    probs = torch.softmax(ref, dim=1)[0].numpy()
    dp = np.abs(probs - b["probabilities"].astype(np.float32))
    assert dp.mean() < 0.01 and np.percentile(dp, 99) < 0.05, (name, dp.mean(), dp.max())
    assert (probs.argmax(0) == b["mask"]).mean() > 0.99


#: The bundled sample of each data set the shipped weights were trained on.
_SAMPLE_OF = {"dsb2018_nuclei": "nuclei", "isbi2012_em": "em_stack",
              "ph2_dermoscopy": "dermoscopy", "msd_lung_patches": "ct_patches"}


def _shipped():
    from napari_medseg.engine.checkpoints import list_shipped_weights

    return [pytest.param(w, id=w["tag"]) for w in list_shipped_weights()
            if w["dataset"] in _SAMPLE_OF]


@pytest.mark.parametrize("weights", _shipped())
def test_bf16_masks_agree_with_fp32_for_shipped_weights(weights):
    """Trained weights on the real sample of their own data: the policy's bf16 gives the
    fp32 mask (the figure ../shared/ENVIRONMENT.md gives for a trained U-Net: 99.98 %)."""
    from napari_medseg.engine.checkpoints import resolve_weights
    from napari_medseg.io import read_image
    from napari_medseg.io.samples import sample_path

    model, info = resolve_weights(weights["tag"])
    image, meta = read_image(sample_path(_SAMPLE_OF[weights["dataset"]]))
    image = np.asarray(image)
    if image.ndim == 3 and "C" not in meta.axes:  # a stack: two slices are enough
        image = image[:2]
    axes = meta.axes if image.ndim == len(meta.axes) else None
    fp32 = predict(image, model, axes=axes, precision="fp32", outputs="mask")
    bf16 = predict(image, model, axes=axes, precision="bf16", outputs="mask")
    assert bf16.stats["precision"] == "bf16"
    m32, m16 = np.asarray(fp32["mask"]), np.asarray(bf16["mask"])
    agree = float((m32 == m16).mean())
    fg32, fg16 = m32 > 0, m16 > 0
    dice = 2 * (fg32 & fg16).sum() / max(1, fg32.sum() + fg16.sum())
    assert agree > 0.995 and dice > 0.99, (weights["tag"], agree, dice)
