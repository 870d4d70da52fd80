"""What the shipped weights' defaults cost: a whole prediction as a user runs it, against the
same run with flip TTA off, in one process.

Prints one JSON object. For each image (``--images``, files of ``--data-root``'s
``dsb2018_nuclei/images`` by name, or the bundled nuclei sample when the data are absent) and
the weights ``--weights``: ``default_s``, ``predict`` with its defaults (the object-size
estimate, flip TTA where the weights' task records it, ``mask``, ``boundary`` and
``instances``), and ``no_tta_s``, the same with ``tta=False``; each the median of
``--repeats`` runs after one warm-up. ``tta`` says whether the defaults flip-average.

Usage::

    python benchmarks/bench_weights_defaults.py --data-root ../shared/data \\
        --images a0325cb7aa59e9c0 e23e11414ee645b5 c901794d1a421d52
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]

OUTPUTS = ("mask", "boundary", "instances")


def _seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 3)


def _images(data_root: Path, names: list[str]) -> list[tuple[str, Path]]:
    from napari_medseg.io.samples import sample_path

    folder = data_root / "dsb2018_nuclei" / "images"
    found = [(n, folder / f"{n}.tif") for n in names if (folder / f"{n}.tif").is_file()]
    return found or [("nuclei (bundled sample)", Path(sample_path("nuclei")))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="sa2net_lite_dsb2018")
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared"
                                             / "data"))
    p.add_argument("--images", nargs="*", default=[], help="dsb2018_nuclei image names")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from napari_medseg.config import PredictConfig
    from napari_medseg.engine.checkpoints import resolve_weights
    from napari_medseg.engine.inference.pipeline import predict, with_weights_defaults
    from napari_medseg.io import read_image

    model, _ = resolve_weights(args.weights, device="cpu")
    rows = {}
    for name, path in _images(Path(args.data_root), args.images):
        image, meta = read_image(path)
        image = np.asarray(image)
        config = PredictConfig(axes=meta.axes, device="cpu", outputs=OUTPUTS)
        rows[name] = {
            "shape": list(image.shape),
            "tta": bool(with_weights_defaults(config, model).tta),
            "default_s": _seconds(lambda: predict(image, model, config), args.repeats),
            "no_tta_s": _seconds(lambda: predict(image, model, config.replace(tta=False)),
                                 args.repeats),
        }
    print(json.dumps({"weights": args.weights, "repeats": args.repeats, "images": rows},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
