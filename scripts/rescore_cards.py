"""Re-score the shipped weights on their model cards' held-out split and update the cards' metrics.

    python scripts/rescore_cards.py [--data-root ../shared/data] [--only TAG ...]
                                    [--keys hd95 aji] [--dry-run]

For each ``models/<tag>.yaml``: loads the shipped weights, copies the card's held-out images
(``training_data.val_files``, and ``val_planes`` for a stack split by slices) exactly as
``scripts/train_shipped.py`` does, scores them with ``napari-medseg eval``'s engine
(:func:`napari_medseg.engine.training.evaluate.evaluate`), and writes the re-measured values
of ``--keys`` into the card's ``metrics``; nothing else in the card changes. The default keys are
the two metrics whose definitions changed: ``hd95`` (the larger directed 95th percentile, not
the percentile of both directions pooled) and ``aji`` (a missed object is no longer charged the
area of an arbitrary prediction). Prints old -> new for every metric, so a drift in the ones not
written shows. Then run ``python scripts/results_table.py`` to refresh the README's table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_shipped import DATASETS, ROOT, held_out_folders  # noqa: E402


def rescore(card_path: Path, data_root: Path, keys: list[str], dry_run: bool,
            tta: bool | None = None) -> dict:
    """Re-score one card; returns ``{metric: (old, new)}`` and writes ``keys`` unless dry."""
    from napari_medseg.config import PredictConfig
    from napari_medseg.engine.checkpoints import resolve_weights
    from napari_medseg.engine.training.evaluate import evaluate

    card = yaml.safe_load(card_path.read_text())
    data = card["training_data"]
    model, _info = resolve_weights(card["tag"], device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        vi, vm = held_out_folders(data_root / data["dataset"], data["val_files"],
                                  data.get("val_planes") or [], Path(tmp))
        result = evaluate(model, vi, vm, PredictConfig(tta=tta),
                          instances=DATASETS[data["dataset"]]["task"] == "instances")
    if result.failed:
        raise SystemExit(f"{card['tag']}: {result.failed} held-out images could not be scored")
    new = {k: (round(v, 4) if v == v else None) for k, v in result.mean.items()}
    old = card.setdefault("metrics", {})
    changes = {k: (old.get(k), new.get(k)) for k in sorted(set(new) | set(old))
               if k not in ("split", "n_images")}
    if not dry_run:
        for k in keys:
            if k in new:
                card["metrics"][k] = new[k]
        card_path.write_text(yaml.safe_dump(card, sort_keys=False))
    return changes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--only", nargs="*", help="card tags (default: every card)")
    p.add_argument("--keys", nargs="*", default=["hd95", "aji"],
                   help="metrics to write (default: the two whose definitions changed)")
    p.add_argument("--dry-run", action="store_true", help="print, do not write")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="score with (or without) flip test-time augmentation; default: as the "
                        "weights say, which is how their cards state the figures (measure "
                        "the other with --dry-run)")
    args = p.parse_args(argv)
    if args.tta is not None and not args.dry_run:
        p.error("--tta/--no-tta measure only (with --dry-run): the cards state the figures "
                "as the weights predict by default")
    for path in sorted((ROOT / "models").glob("*.yaml")):
        if args.only and path.stem not in args.only:
            continue
        t0 = time.perf_counter()
        changes = rescore(path, Path(args.data_root), args.keys, args.dry_run, args.tta)
        shown = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())
        print(f"{path.stem} ({time.perf_counter() - t0:.0f} s): {shown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
