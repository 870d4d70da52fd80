"""A loaded network as the frozen graphs other tools run: ONNX and TorchScript.

:class:`HeadLogits` turns a network (a :class:`~napari_medseg.models.working_resolution.
WorkingResolution` wrapper included) into a module whose ``forward`` takes one N x C x H x W
float32 tensor and returns the eval heads' logits as a tuple, in ``spec.heads`` order: the
form ONNX, TorchScript and bioimage.io's ``pytorch_state_dict`` weights need. The activation
(sigmoid or softmax) is left to the consumer's post-processing, as bioimage.io describes it.
:func:`package_network` rebuilds that module from plain keyword arguments, the callable a
bioimage.io package names for its ``pytorch_state_dict`` weights.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["HeadLogits", "package_network", "export_onnx", "export_torchscript",
           "ONNX_OPSET"]

#: The ONNX operator set the graphs are written with (onnxruntime >= 1.13 runs it).
ONNX_OPSET = 17


class HeadLogits(nn.Module):
    """``model`` in float32 whose ``forward(x)`` returns its eval heads' logits as a tuple.

    Attributes:
        model: the wrapped network (``state_dict`` keys gain the prefix ``model.``).
        heads: the head names, in output order.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.heads = tuple(model.spec.heads)
        self.spec = model.spec

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """x: N x C x H x W -> one N x K x H' x W' float32 tensor of logits per head."""
        out = self.model(x)
        # A head with more channels than it means (the boundary) keeps its first one, as
        # the engine's predictor does.
        return tuple((out[key][:, :1] if key == "boundary" else out[key]).float()
                     for key in self.heads)


def package_network(network: str, variant: str, in_channels: int, num_classes: int,
                    config: dict, input_downsample: int = 1) -> HeadLogits:
    """The untrained :class:`HeadLogits` of a network described by a checkpoint's fields
    (what bioimage.io's ``pytorch_state_dict`` architecture calls; no file is read)."""
    from ...models import get_entry, make_config
    from ...models.working_resolution import with_downsample

    overrides = {k: v for k, v in dict(config).items()
                 if k not in ("variant", "in_channels", "num_classes")}
    built = get_entry(network).build(
        make_config(network, variant, int(in_channels), int(num_classes), **overrides))
    return HeadLogits(with_downsample(built, int(input_downsample))).float().eval()


def export_onnx(module: HeadLogits, example: Tensor, path: str | Path) -> Path:
    """Write ``module`` traced at ``example`` (N x C x H x W) as ONNX, with dynamic batch,
    height and width; inputs named ``input``, outputs named after the heads."""
    axes = {"input": {0: "batch", 2: "height", 3: "width"}}
    axes.update({h: {0: "batch", 2: f"{h}_height", 3: f"{h}_width"} for h in module.heads})
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), buffer, dynamo=False,
                          input_names=["input"], output_names=list(module.heads),
                          dynamic_axes=axes, opset_version=ONNX_OPSET)
    path = Path(path)
    path.write_bytes(buffer.getvalue())
    return path


def export_torchscript(module: HeadLogits, example: Tensor, path: str | Path) -> Path:
    """Write ``module`` traced at ``example`` (N x C x H x W) as TorchScript."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module.eval(), example, strict=False, check_trace=False)
    path = Path(path)
    traced.save(str(path))
    return path
