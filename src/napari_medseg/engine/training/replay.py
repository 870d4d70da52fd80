"""Replay against forgetting: earlier corrections kept per model line and mixed into the batches.

:class:`ReplayStore` keeps the samples of every fine-tuning round (npz files in the user data
folder, per lineage root); :class:`RegionSampler` draws the training patches, centred on the
pixels that count, with ``replay_fraction`` of them from the earlier samples.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputShapeError
from ..boundaries import boundary_from_labels
from .corrections import RegionSample, samples_hash
from .datasets import Sample

__all__ = ["RegionSampler", "ReplayStore"]


class RegionSampler:
    """Patches centred on the pixels that count, with replay of earlier samples.

    A patch of a correction sample is centred on a random valid pixel (so the changed area is
    always in view) and its ``valid`` map is the sample's; a replayed sample is an earlier
    correction (same rule) or a whole image (centred on foreground half of the time). Crops
    smaller than the patch are padded (reflect for the image, 0 = not valid for the targets).
    Same contract as :class:`~.datasets.PatchSampler` (``draw(n)``), so
    :func:`~.loop.make_batch` takes it.

    Args:
        samples: the training samples (:class:`RegionSample` or :class:`~.datasets.Sample`).
        patch: the patch side (target resolution).
        replay: earlier samples to mix in.
        replay_fraction: probability that a patch comes from ``replay`` (when it is not empty).
        seed: random seed.
    """

    def __init__(self, samples: Sequence[Sample], patch: int, replay: Sequence[Sample] = (),
                 replay_fraction: float = 0.0, seed: int = 0):
        if not samples:
            raise InputShapeError("There are no training samples.")
        self.patch = int(patch)
        self.rng = np.random.default_rng(seed)
        self.replay_fraction = float(replay_fraction) if replay else 0.0
        self.pools = [[self._prepare(s) for s in samples], [self._prepare(s) for s in replay]]
        self.any_boundary = any(p["boundary"] is not None for pool in self.pools for p in pool)

    def _prepare(self, s: Sample) -> dict[str, Any]:
        h, w = s.mask.shape
        valid = getattr(s, "valid", None)
        valid = np.ones((h, w), np.float32) if valid is None else valid.astype(np.float32)
        ph, pw = max(0, self.patch - h), max(0, self.patch - w)
        pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        image, mask, bnd = s.image, s.mask, s.boundary
        if ph or pw:
            mode = "reflect" if min(h, w) > 1 else "edge"
            image = np.pad(image, ((0, 0), *pads), mode=mode)
            mask = np.pad(mask, pads)
            valid = np.pad(valid, pads)
            bnd = None if bnd is None else np.pad(bnd, pads)
        scored = getattr(s, "valid", None) is not None
        centres = np.argwhere(valid > 0) if scored else np.argwhere((mask > 0) & (valid > 0))
        return {"image": image, "mask": mask, "boundary": bnd, "valid": valid,
                "centres": centres, "scored": scored}

    def draw(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """``n`` patches: images N x C x P x P, masks N x P x P, boundaries (or None), valid."""
        imgs, masks, bnds, valids = [], [], [], []
        p = self.patch
        for _ in range(n):
            use_replay = self.replay_fraction > 0 and self.rng.random() < self.replay_fraction
            pool = self.pools[1] if use_replay else self.pools[0]
            item = pool[int(self.rng.integers(len(pool)))]
            h, w = item["mask"].shape
            centres = item["centres"]
            if len(centres) and (item["scored"] or self.rng.random() < 0.5):
                cy, cx = centres[int(self.rng.integers(len(centres)))]
                jitter = self.rng.integers(-p // 4, p // 4 + 1, size=2)
                y0 = int(np.clip(cy + jitter[0] - p // 2, 0, h - p))
                x0 = int(np.clip(cx + jitter[1] - p // 2, 0, w - p))
            else:
                y0 = int(self.rng.integers(0, h - p + 1))
                x0 = int(self.rng.integers(0, w - p + 1))
            sl = (slice(y0, y0 + p), slice(x0, x0 + p))
            imgs.append(item["image"][(slice(None), *sl)])
            masks.append(item["mask"][sl])
            valids.append(item["valid"][sl])
            if self.any_boundary:
                bnd = item["boundary"]
                bnds.append(bnd[sl] if bnd is not None else boundary_from_labels(item["mask"][sl]))
        return (np.stack(imgs).astype(np.float32), np.stack(masks).astype(np.int64),
                np.stack(bnds).astype(np.uint8) if self.any_boundary else None,
                np.stack(valids).astype(np.float32))


class ReplayStore:
    """Samples of earlier fine-tuning rounds, kept per model line for replay.

    Each sample is one ``.npz`` file (arrays only, loaded without pickles) under
    ``<folder>/<root[:16]>/``; the newest are replayed first.

    Args:
        folder: where to keep them; None uses ``<user data folder>/replay``.
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        if folder is None:
            from ...resources import user_data_dir

            folder = user_data_dir() / "replay"
        self.folder = Path(folder)

    def _line(self, root: str) -> Path:
        return self.folder / str(root)[:16]

    def add(self, samples: Iterable[Sample], root: str) -> int:
        """Keep ``samples`` for the model line ``root``; returns how many were new."""
        import os
        import tempfile

        line = self._line(root)
        line.mkdir(parents=True, exist_ok=True)
        added = 0
        for s in samples:
            digest = samples_hash([s])
            target = line / f"{digest}.npz"
            if target.exists():
                continue
            arrays = {"image": s.image, "mask": s.mask,
                      "name": np.array(s.name), "group": np.array(s.group)}
            if s.boundary is not None:
                arrays["boundary"] = s.boundary
            valid = getattr(s, "valid", None)
            if valid is not None:
                arrays["valid"] = valid
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".npz", dir=line)
            os.close(fd)
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, target)
            added += 1
        return added

    def load(self, root: str | None, in_channels: int, limit: int = 64,
             exclude: Iterable[str] = ()) -> list[RegionSample]:
        """Up to ``limit`` samples of the line ``root`` with ``in_channels`` channels, newest
        first, leaving out names in ``exclude`` (this round's own samples)."""
        if not root or limit <= 0:
            return []
        line = self._line(root)
        if not line.is_dir():
            return []
        skip = set(exclude)
        files = sorted((p for p in line.glob("*.npz") if not p.name.startswith(".")),
                       key=lambda p: p.stat().st_mtime, reverse=True)  # "." : being written
        out: list[RegionSample] = []
        for path in files:
            if len(out) >= limit:
                break
            try:
                with np.load(path, allow_pickle=False) as data:
                    name = str(data["name"])
                    if name in skip or data["image"].shape[0] != in_channels:
                        continue
                    out.append(RegionSample(
                        image=data["image"].astype(np.float32), mask=data["mask"].astype(np.int64),
                        boundary=data["boundary"] if "boundary" in data else None,
                        name=name, group=f"replay:{data['group']}",
                        valid=data["valid"] if "valid" in data else None))
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                continue  # a damaged file is skipped
        return out
