"""A checkpoint as a bioimage.io model package (model description format 0.5), built with the
format's own library, ``bioimageio.spec`` (the optional extra ``[bioimageio]``).

The package holds the network three ways: ONNX and TorchScript graphs and a
``pytorch_state_dict`` whose architecture is :func:`~.graphs.package_network` (it needs
napari-medseg installed). All three return the heads' logits; the description states the
checkpoint's normalisation as pre-processing and sigmoid / softmax as post-processing, the
spatial sizes as ``min + n * step`` (``step`` = the network's divisor, its working-resolution
factor included), test tensors from a shipped sample (:mod:`.example`), a cover, a README made
from the model card, authors, licence and citations (:mod:`.references`), and the lineage in
``config.napari_medseg``. The checkpoint itself (safetensors + JSON description) travels as
attachments, which :mod:`napari_medseg.engine.packages` reads back.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import CheckpointError, ConfigError
from . import references
from .card import documentation
from .example import cover_image, make_example
from .files import checkpoint_files, check_package_output

__all__ = ["BIOIMAGEIO_FORMAT", "PACKAGE_CONFIG_KEY", "ExportResult", "export_bioimageio"]

#: The ``--format`` name of a bioimage.io model package.
BIOIMAGEIO_FORMAT = "bioimageio"
#: The key of napari-medseg's own section in the package's ``config``.
PACKAGE_CONFIG_KEY = "napari_medseg"

_CHANNEL_NAMES = {1: ["grey"], 3: ["red", "green", "blue"]}


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_bioimageio` wrote.

    Attributes:
        path: the package (a zip file).
        name: the package's name.
        sample: the shipped sample its test tensors were cut from.
        weight_formats: the weight formats it holds.
    """

    path: Path
    name: str
    sample: str
    weight_formats: tuple[str, ...]


def _require_spec():
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise ConfigError("Exporting a bioimage.io package needs bioimageio.spec: "
                          "pip install 'napari-medseg[bioimageio]'.") from None
    from .spec_compat import mend_spec

    mend_spec()


def _preprocessing(normalization) -> list:
    """The checkpoint's normalisation as bioimage.io pre-processing steps."""
    from bioimageio.spec.model import v0_5 as bio

    from ..inference.normalization import DEFAULT_NORMALIZATION

    n = normalization or DEFAULT_NORMALIZATION
    axes = [bio.AxisId("y"), bio.AxisId("x")]
    if not n.per_channel:
        axes.insert(0, bio.AxisId("channel"))
    steps: list = [bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32"))]
    if n.mode in ("percentile", "minmax"):
        low, high = (n.low, n.high) if n.mode == "percentile" else (0.0, 100.0)
        steps.append(bio.ScaleRangeDescr(kwargs=bio.ScaleRangeKwargs(
            axes=axes, min_percentile=low, max_percentile=high)))
    elif n.mode == "window":
        span = float(n.high - n.low)
        steps.append(bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(
            gain=1.0 / span, offset=-float(n.low) / span)))
    elif n.mode == "zscore":
        steps.append(bio.ZeroMeanUnitVarianceDescr(
            kwargs=bio.ZeroMeanUnitVarianceKwargs(axes=axes)))
    elif n.mode == "meanstd":
        steps.append(bio.FixedZeroMeanUnitVarianceDescr(
            kwargs=bio.FixedZeroMeanUnitVarianceAlongAxisKwargs(
                mean=list(n.mean), std=list(n.std), axis=bio.AxisId("channel"))))
    if n.clip and n.mode in ("percentile", "minmax", "window"):
        steps.append(bio.ClipDescr(kwargs=bio.ClipKwargs(min=0.0, max=1.0)))
    return steps


def _postprocessing(head: str, channels: int) -> list:
    from bioimageio.spec.model import v0_5 as bio

    if head == "mask" and channels > 1:
        return [bio.SoftmaxDescr(kwargs=bio.SoftmaxKwargs(axis=bio.AxisId("channel")))]
    return [bio.SigmoidDescr()]


def _tensors(spec, info, folder: Path, example) -> tuple[list, list]:
    """The input and output tensor descriptions, with their test tensors written to
    ``folder``."""
    from bioimageio.spec.model import v0_5 as bio

    import tifffile

    size = bio.ParameterizedSize(min=spec.min_size, step=spec.divisor)
    # the pixel size the weights were trained at (images at another are resampled to it)
    pixel = info.pixel_size or {}
    space = {"scale": float(pixel["value"]), "unit": pixel["unit"]} if pixel else {}
    np.save(folder / "test_input.npy", example.raw)
    # Sample tensors (for people and viewers): the same arrays as TIFF, singletons dropped.
    tifffile.imwrite(folder / "sample_input.tif", example.raw[0].squeeze())
    names = _CHANNEL_NAMES.get(spec.in_channels,
                               [f"channel{i}" for i in range(spec.in_channels)])
    inputs = [bio.InputTensorDescr(
        id=bio.TensorId("input"),
        description=f"{spec.in_channels}-channel image, any intensity range (normalised by "
                    "the pre-processing)",
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier(c) for c in names]),
              bio.SpaceInputAxis(id=bio.AxisId("y"), size=size, **space),
              bio.SpaceInputAxis(id=bio.AxisId("x"), size=size, **space)],
        test_tensor=bio.FileDescr(source=folder / "test_input.npy"),
        sample_tensor=bio.FileDescr(source=folder / "sample_input.tif"),
        preprocessing=_preprocessing(info.normalization_config()))]
    outputs = []
    for head, probs in example.outputs.items():
        np.save(folder / f"test_output_{head}.npy", probs)
        tifffile.imwrite(folder / f"sample_output_{head}.tif", probs[0].squeeze())
        channels = int(probs.shape[1])
        classes = list(info.classes) if head == "mask" and len(info.classes) == channels else []
        names = classes or ([head] if channels == 1 else [f"class{i}" for i in range(channels)])
        ref = [bio.SizeReference(tensor_id=bio.TensorId("input"), axis_id=bio.AxisId(a))
               for a in ("y", "x")]
        out_space = {"scale": space.get("scale", 1.0) / spec.output_scale,
                     **({"unit": space["unit"]} if space else {})}
        what = ("class probabilities (softmax over the channel axis)" if channels > 1
                else f"{head} probability (sigmoid)")
        outputs.append(bio.OutputTensorDescr(
            id=bio.TensorId(head), description=what,
            axes=[bio.BatchAxis(),
                  bio.ChannelAxis(channel_names=[bio.Identifier(_identifier(c)) for c in names]),
                  bio.SpaceOutputAxis(id=bio.AxisId("y"), size=ref[0], **out_space),
                  bio.SpaceOutputAxis(id=bio.AxisId("x"), size=ref[1], **out_space)],
            test_tensor=bio.FileDescr(source=folder / f"test_output_{head}.npy"),
            sample_tensor=bio.FileDescr(source=folder / f"sample_output_{head}.tif"),
            postprocessing=_postprocessing(head, channels)))
    return inputs, outputs


def _identifier(text: str) -> str:
    out = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in str(text))
    return out if out and not out[0].isdigit() else f"c_{out}"


def _weights(module, example, info, folder: Path):
    """ONNX, TorchScript and pytorch_state_dict weight descriptions (files in ``folder``)."""
    import torch
    from bioimageio.spec.model import v0_5 as bio

    from .graphs import ONNX_OPSET, export_onnx, export_torchscript

    x = torch.from_numpy(example.normalised)
    onnx = export_onnx(module, x, folder / "weights.onnx")
    script = export_torchscript(module, x, folder / "weights_torchscript.pt")
    state = folder / "weights_state_dict.pt"
    torch.save({k: v.detach().float().contiguous() for k, v in module.state_dict().items()},
               state)
    version = bio.Version(torch.__version__.split("+")[0])
    architecture = bio.ArchitectureFromLibraryDescr(
        import_from="napari_medseg.engine.export.graphs", callable=bio.Identifier(
            "package_network"),
        kwargs={"network": info.network, "variant": info.variant,
                "in_channels": info.in_channels, "num_classes": info.num_classes,
                "config": json.loads(json.dumps(info.config)),
                "input_downsample": info.input_downsample})
    return bio.WeightsDescr(
        onnx=bio.OnnxWeightsDescr(source=onnx, opset_version=ONNX_OPSET,
                                  parent="pytorch_state_dict"),
        torchscript=bio.TorchscriptWeightsDescr(source=script, pytorch_version=version,
                                                parent="pytorch_state_dict"),
        pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
            source=state, architecture=architecture, pytorch_version=version))


def _lineage(info) -> dict:
    """What the package's ``config.napari_medseg`` says of where the weights come from."""
    data = info.training_data or {}
    return {
        "network": info.network, "variant": info.variant, "tag": info.tag,
        "weights_sha256": info.sha256, "parent": info.parent,
        "data_hash": data.get("data_hash"), "dataset": data.get("dataset"),
        "input_downsample": info.input_downsample,
        **({"tile": info.tile} if info.tile else {}),
        "plugin_version": info.plugin_version, "created": info.created,
    }


def export_bioimageio(weights: str, output: str | Path, *, overwrite: bool = False,
                      sample: str | None = None, authors: tuple[str, ...] = (),
                      licence: str | None = None) -> ExportResult:
    """Write the bioimage.io model package of shipped weights or a checkpoint.

    Args:
        weights: a shipped tag, a checkpoint path, or a package napari-medseg wrote.
        output: the ``.zip`` to write.
        overwrite: replace an existing file (never one of the weights' own files).
        sample: the shipped sample the test tensors come from (default: the one of the
            training data, else the first whose channels fit).
        authors: the package's authors (default: the napari-medseg developers).
        licence: an SPDX licence for the package (default: :mod:`.references`' choice for the
            training data).

    Raises:
        ConfigError: bioimageio.spec is missing, or the output is refused.
        WeightsNotFoundError, CheckpointError: the weights cannot be loaded or described.
    """
    _require_spec()
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as bio

    from ..checkpoints import resolve_weights
    from .graphs import HeadLogits

    output = Path(output).expanduser()
    check_package_output(weights, output, overwrite)
    model, info = resolve_weights(weights)
    module = HeadLogits(model).float().eval()
    source = references.data_source(info.training_data.get("dataset"))
    sample = sample or (source.sample if source else _fitting_sample(info.in_channels))
    example = make_example(module, sample, info.normalization_config())
    name = _package_name(weights, info)
    with tempfile.TemporaryDirectory(prefix="medseg-export-") as tmp:
        folder = Path(tmp)
        inputs, outputs = _tensors(module.spec, info, folder, example)
        from PIL import Image

        Image.fromarray(cover_image(example)).save(folder / "cover.png")
        files = checkpoint_files(weights, info, folder, name)
        (folder / "README.md").write_text(documentation(info, name, sample, source),
                                          encoding="utf-8")
        cite = [references.NETWORK_PAPERS[info.network]] if info.network in \
            references.NETWORK_PAPERS else []
        cite += list(source.cite) if source else []
        if not cite:
            raise CheckpointError(f"No paper is known for network {info.network!r}.")
        descr = bio.ModelDescr(
            name=name,
            description=_description(info, source),
            authors=[bio.Author(name=a) for a in (authors or ("napari-medseg developers",))],
            cite=[bio.CiteEntry(text=c.text, doi=bio.Doi(c.doi)) for c in cite],
            license=bio.LicenseId(licence or (source.licence if source
                                              else references.DEFAULT_LICENCE)),
            documentation=bio.FileDescr(source=folder / "README.md"),
            covers=[bio.FileDescr(source=folder / "cover.png")],
            tags=["napari-medseg", info.network, "segmentation", "2d"],
            attachments=[bio.FileDescr(source=p) for p in files],
            inputs=inputs, outputs=outputs,
            weights=_weights(module, example, info, folder),
            config=bio.Config(**{PACKAGE_CONFIG_KEY: {
                **_lineage(info), "checkpoint": {"weights": files[0].name,
                                                 "description": files[1].name},
                "sample": sample}}),
        )
        if not isinstance(descr, bio.ModelDescr):  # pragma: no cover - validation failed
            raise CheckpointError(f"The package description is invalid: {descr}")
        written = save_bioimageio_package(descr, output_path=folder / "package.zip")
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(written), str(output))
    return ExportResult(output, name, sample, ("onnx", "torchscript", "pytorch_state_dict"))


def _fitting_sample(in_channels: int) -> str:
    return "nuclei_he" if in_channels == 3 else "nuclei"


def _package_name(weights: str, info) -> str:
    stem = info.tag or Path(str(weights)).name.split(".")[0]
    return f"napari-medseg {stem}"


def _description(info, source) -> str:
    data = source.name if source else (info.training_data.get("dataset") or "the user's data")
    kind = "fine-tuned " if info.parent else ""
    return (f"{info.network} ({info.variant}) segmentation network, {kind}weights trained on "
            f"{data} with napari-medseg")
