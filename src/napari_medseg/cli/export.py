"""``napari-medseg export``: shipped weights or a checkpoint as a package other tools open."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_export", "cmd_export"]

_DESCRIPTION = (
    "Write shipped weights or a checkpoint as a bioimage.io model package (a .zip that "
    "micro-sam, deepImageJ, ilastik, the bioimageio tools and napari-medseg itself open): ONNX, "
    "TorchScript and PyTorch weights, the normalisation as pre-processing, sigmoid / softmax as "
    "post-processing, test tensors from a shipped sample, a cover, the model card, licence, "
    "citations and lineage; the checkpoint itself travels inside, so `predict --weights "
    "model.zip` loads it. Needs the extra: pip install 'napari-medseg[bioimageio]'. Check a "
    "package with `python -m napari_medseg.engine.export.check test model.zip` (the "
    "`bioimageio test` command).")


def add_export(sub) -> None:
    """The ``export`` sub-command."""
    p = sub.add_parser("export", help="write weights as a bioimage.io model package",
                       description=_DESCRIPTION)
    p.add_argument("--weights", required=True, metavar="TAG_OR_CHECKPOINT",
                   help="a shipped tag (see `napari-medseg models`), a checkpoint, or a package")
    p.add_argument("--format", default="bioimageio", choices=["bioimageio"],
                   help="the package format (default: bioimageio)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.zip",
                   help="the package to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing MODEL.zip")
    p.add_argument("--sample", default=None,
                   help="shipped sample for the test tensors (default: the training data's)")
    p.add_argument("--author", action="append", default=None, metavar="NAME",
                   help="an author of the package (repeat for several; default: the "
                        "napari-medseg developers)")
    p.add_argument("--licence", "--license", dest="licence", default=None, metavar="SPDX",
                   help="the package's SPDX licence (default: from the training data's terms)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``napari-medseg export``."""
    from ..engine.export.bioimageio import export_bioimageio

    print(f"napari-medseg: exporting {args.weights} (tracing ONNX and TorchScript) ...",
          file=sys.stderr)
    result = export_bioimageio(args.weights, args.output, overwrite=args.overwrite,
                               sample=args.sample, authors=tuple(args.author or ()),
                               licence=args.licence)
    summary = {"package": str(result.path), "name": result.name, "sample": result.sample,
               "weight_formats": list(result.weight_formats)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"napari-medseg: wrote {result.path} ({', '.join(result.weight_formats)}; "
              f"test tensors from the {result.sample} sample)", file=sys.stderr)
    return 0
