"""ONNX export of every registered network's tiny variant, checked against torch in onnxruntime.

Each network is exported in eval mode through a wrapper returning its eval heads as a tuple
(``"mask"``, plus ``"boundary"`` where the spec has it), with dynamic batch, height and width.
onnxruntime must match torch within 1e-4 (absolute, on logits) at the export size and at another
valid size with a different height and width.

The fast test uses the TorchScript exporter (``dynamo=False``): about 1 s per tiny network here,
where the torch.export-based exporter takes 25-40 s per network on the shared 2-core machine. If
the TorchScript export fails or does not reproduce torch, the dynamo exporter is tried before the
test fails. ``test_dynamo_export`` checks the dynamo exporter alone; it is marked ``slow`` and only
runs when slow tests are asked for (``pytest -m slow tests/test_onnx_export.py``).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from napari_medseg.models import create_model, list_models

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

NETWORKS = list_models()
ATOL = 1e-4


class HeadsAsTuple(nn.Module):
    """Wraps a network so that ``forward(x)`` returns its eval heads as a tuple of tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.heads = tuple(model.spec.heads)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """x: N x C x H x W -> one N x K x H' x W' tensor per head, in ``spec.heads`` order."""
        out = self.model(x)
        return tuple(out[key] for key in self.heads)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_eval(name: str) -> HeadsAsTuple:
    torch.manual_seed(0)
    model = create_model(name, variant="tiny", in_channels=1, num_classes=2).eval()
    return HeadsAsTuple(model).eval()


def _sizes(spec) -> list[tuple[int, int, int]]:
    """(batch, H, W) at the export size and at a second valid size with H != W."""
    base = spec.valid_size(max(spec.min_size, 64))
    d = spec.divisor
    return [(2, base, base), (1, base + d, base + 2 * d)]


def _export(wrapper: HeadsAsTuple, x: Tensor, exporter: str) -> bytes:
    """The ONNX model bytes of ``wrapper`` traced at ``x``, with dynamic N, H and W."""
    inputs, outputs = ["image"], list(wrapper.heads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            buffer = io.BytesIO()
            axes = {"image": {0: "batch", 2: "height", 3: "width"}}
            axes.update({k: {0: "batch", 2: "out_height", 3: "out_width"} for k in outputs})
            torch.onnx.export(
                wrapper,
                (x,),
                buffer,
                dynamo=False,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=17,
            )
            return buffer.getvalue()
        dynamic = torch.export.Dim.DYNAMIC
        program = torch.onnx.export(
            wrapper,
            (x,),
            dynamo=True,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},),
        )
        return program.model_proto.SerializeToString()


def _check_runtime(wrapper: HeadsAsTuple, onnx_bytes: bytes, sizes) -> None:
    """onnxruntime reproduces the torch heads within ``ATOL`` at every (N, H, W) in ``sizes``."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True], "N, H, W not dynamic"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(wrapper.heads)
    spec = wrapper.model.spec
    gen = torch.Generator().manual_seed(1)
    for n, h, w in sizes:
        x = torch.randn(n, spec.in_channels, h, w, generator=gen)
        with torch.inference_mode():
            expected = wrapper(x)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert len(got) == len(expected)
        s = spec.output_scale
        for key, ref, value in zip(wrapper.heads, expected, got):
            assert value.shape == tuple(ref.shape) == (n, ref.shape[1], h * s, w * s), key
            err = float(np.abs(value - ref.numpy()).max())
            assert err <= ATOL, f"{key} at {h}x{w}: max |onnx - torch| = {err:.2e}"


@pytest.mark.parametrize("name", NETWORKS)
def test_tiny_exports_to_onnx_and_matches_torch(name):
    wrapper = _tiny_eval(name)
    sizes = _sizes(wrapper.model.spec)
    n, h, w = sizes[0]
    x = torch.randn(n, wrapper.model.spec.in_channels, h, w)
    errors = []
    for exporter in ("torchscript", "dynamo"):
        try:
            _check_runtime(wrapper, _export(wrapper, x, exporter), sizes)
            return
        except Exception as exc:  # noqa: BLE001 - collect and try the other exporter
            message = str(exc)
            if len(message) > 1500:  # keep the head and the (usually most telling) tail
                message = message[:500] + " [...] " + message[-1000:]
            errors.append(f"{exporter}: {type(exc).__name__}: {message}")
    pytest.fail(f"{name} did not export to ONNX with either exporter:\n" + "\n".join(errors))


@pytest.mark.slow
@pytest.mark.parametrize("name", NETWORKS)
def test_dynamo_export(name, request):
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("the dynamo exporter takes 25-40 s per network here: run with -m slow")
    wrapper = _tiny_eval(name)
    sizes = _sizes(wrapper.model.spec)
    n, h, w = sizes[0]
    x = torch.randn(n, wrapper.model.spec.in_channels, h, w)
    _check_runtime(wrapper, _export(wrapper, x, "dynamo"), sizes)
