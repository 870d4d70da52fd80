"""The output writer: where stitched probabilities become the prediction's outputs.

:class:`OutputWriter` opens the outputs in a sink (numpy arrays in memory, or a zarr store,
:mod:`.sinks`), gives each plane the ``emit`` callbacks its stitchers hand finished rows to
(:meth:`OutputWriter.plane_writers`: the mask, the probabilities output rebuilt from the
stitched channels, the thresholded boundary, the TTA variance), and post-processes once all
planes are written (instances, a boundary derived from the mask, the z-consistency score).

With orthogonal-plane consensus the rows of each pass are summed into a :class:`Consensus`
instead, and :meth:`OutputWriter.finish_consensus` writes their average.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...config import PredictConfig
from ...config.inference import drop_unset_switches
from ...io.metadata import upsampled_geometry
from ...models.registry import state_sha256
from ..layout import Layout
from ..progress import ProgressEvent, StageEvent
from . import postprocess
from ..seg_task import SegTask
from .sinks import MemorySink, OutputSink, ZarrSink
from .stitching import EmitFn

__all__ = ["Consensus", "OutputWriter", "INSTANCE_HELPERS", "store_fingerprint", "weights_id"]

#: The instance task's helper arrays (uint8 probabilities of interior and boundary).
INSTANCE_HELPERS = ("interior_probability", "boundary_probability")


def weights_id(model) -> str:
    """The identity of a model's weights: its checkpoint's sha256, else a hash of them."""
    info = getattr(model, "checkpoint_info", None)
    if info is not None and getattr(info, "sha256", None):
        return str(info.sha256)
    return state_sha256(model)


def store_fingerprint(image, layout: Layout, content_id: str, model, config: PredictConfig,
                      normalization: dict) -> str:
    """What a store's outputs depend on: a stored run is resumed only when this matches.

    Args:
        image: the source array (its shape and dtype).
        layout: the run's layout (axes and plane axes).
        content_id: a hash of the image's pixels (a regular subsample).
        model: the network (its spec and weights).
        config: the settings (those that do not change the result are left out).
        normalization: the fitted normalization (``to_dict()``).
    """
    cfg = config.to_dict()
    for key in ("device", "precision", "batch_size", "channels_last", "store", "resume",
                "overwrite", "oom_fallback", "memory_fraction"):
        cfg.pop(key, None)
    drop_unset_switches(cfg)  # stores and runs of earlier versions stay resumable
    spec = model.spec
    data = {
        "shape": list(image.shape), "dtype": str(np.dtype(image.dtype)),
        "axes": layout.axes, "plane_axes": layout.plane_axes, "content": content_id,
        "network": spec.network, "variant": spec.variant, "weights": weights_id(model),
        "config": cfg, "normalization": normalization,
    }
    if spec.extra.get("resampled"):  # planes resampled to the weights' pixel size
        data["resampled"] = [round(float(z), 6) for z in spec.extra["resampled"]]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Consensus:
    """Sums of the orthogonal passes (YX, ZX, ZY) of a volume, averaged at the end.

    Attributes:
        probs: summed stitched probabilities, channels x volume (float32).
        votes: each pass's own mask, for the agreement score.
        boundary: summed boundary probabilities, or None.
        variance: summed TTA variance, or None.
        index: the pass being written.
    """

    probs: np.ndarray
    votes: list[np.ndarray]
    boundary: np.ndarray | None
    variance: np.ndarray | None
    index: int = 0

    @classmethod
    def zeros(cls, shape: tuple[int, ...], channels: int, passes: int, mask_dtype,
              boundary: bool, variance: bool) -> Consensus:
        """Empty sums for ``passes`` passes over a volume of ``shape``."""
        return cls(
            probs=np.zeros((channels,) + shape, np.float32),
            votes=[np.zeros(shape, mask_dtype) for _ in range(passes)],
            boundary=np.zeros(shape, np.float32) if boundary else None,
            variance=np.zeros(shape, np.float32) if variance else None,
        )


class OutputWriter:
    """The outputs of one run, opened in a sink and written band by band.

    Args:
        config: the settings (outputs, thresholds, store).
        layout: the run's (first) layout: the outputs' axes and shape.
        num_classes: the network's classes K (two classes stitch the foreground alone).
        scale: output side / input side in-plane.
        use_boundary: the boundary head is stitched.
        fingerprint: the run's identity (:func:`store_fingerprint`), for a store; called
            only when ``config.store`` is set.
        meta: the reader's metadata (spacing and units for a store's image).
        consensus: the orthogonal passes' sums (None: each plane written directly).
        sink: where the outputs go instead of the config's (a sizing sink for a plan).
        task: the network's task; with ``instances`` the mask is the foreground of the three
            classes, the boundary the boundary class, and the instances a seeded watershed
            of the interior and boundary probabilities (kept, quantised to uint8, in two
            helper arrays that are not outputs: ``interior_probability`` and
            ``boundary_probability``).
    """

    def __init__(self, config: PredictConfig, layout: Layout, num_classes: int, scale: int,
                 use_boundary: bool, fingerprint: Callable[[], str], meta: Any = None,
                 consensus: Consensus | None = None, sink: OutputSink | None = None,
                 task: SegTask | None = None) -> None:
        self.config = config
        self.task = task or SegTask()
        self.layout = layout
        self.K = int(num_classes)
        self.binary = self.K == 2
        self.stitched = 1 if self.binary else self.K
        self.scale = int(scale)
        self.meta = meta
        self.consensus = consensus
        if sink is not None:
            self.sink: OutputSink = sink
        elif config.store:
            self.sink = ZarrSink(
                config.store, fingerprint(),
                resume=config.resume and config.volume_mode == "slices",
                overwrite=config.overwrite)
        else:
            self.sink = MemorySink()
        self.arrays: dict[str, Any] = {}
        self.axes_of: dict[str, str] = {}
        wanted = set(config.outputs)
        self._create("mask", postprocess.mask_dtype(self.K))
        if isinstance(self.sink, ZarrSink):
            self.sink.describe_image("mask", layout.out_axes, *self._out_geometry())
        if "probabilities" in wanted:
            dtype = np.float16 if config.probabilities_dtype == "float16" else np.uint8
            self._create("probabilities", dtype, channels=self.K)
        if use_boundary or (self.task.instances and "boundary" in wanted):
            self._create("boundary", np.uint8)
        if self.task.instances and "instances" in wanted:
            for helper in INSTANCE_HELPERS:
                self._create(helper, np.uint8)
        if "variance" in wanted:
            self._create("variance", np.float16)

    @property
    def chunks(self) -> tuple[int, ...]:
        """Chunks of a label output: one plane of each stack axis, in-plane up to 1024."""
        lay = self.layout
        return tuple(1 if a in lay.stack_axes else min(n, 1024)
                     for a, n in zip(lay.out_axes, lay.out_shape(self.scale)))

    def _create(self, name: str, dtype, channels: int | None = None) -> Any:
        lay = self.layout
        shape, chunks, axes = lay.out_shape(self.scale), self.chunks, lay.out_axes
        if channels is not None:
            shape, chunks, axes = (channels,) + shape, (1,) + chunks, "C" + axes
        self.arrays[name] = self.sink.create(name, shape, dtype, chunks, axes)
        self.axes_of[name] = axes
        return self.arrays[name]

    def _out_geometry(self) -> tuple[tuple[float, ...] | None, tuple | None]:
        """Spacing and units per label-output axis, from the reader's metadata if any."""
        meta_spacing = getattr(self.meta, "spacing", None)
        meta_axes = getattr(self.meta, "spatial_axes", None)
        if not meta_spacing or not meta_axes:
            return None, None
        lay = self.layout
        lookup = dict(zip(meta_axes, meta_spacing))
        units = dict(zip(meta_axes, getattr(self.meta, "units", ()) or ()))
        spacing = tuple(float(lookup.get(a, 1.0)) for a in lay.out_axes)
        factors = tuple(self.scale if a in lay.plane_axes else 1 for a in lay.out_axes)
        spacing, _ = upsampled_geometry(spacing, (0.0,) * len(spacing), factors)
        return spacing, tuple(units.get(a) for a in lay.out_axes)

    @property
    def finished(self) -> set[int]:
        """Planes already in the store (resume) or written by this run."""
        return self.sink.finished

    @property
    def resumed(self) -> bool:
        """Whether a store's earlier run is being resumed."""
        return bool(getattr(self.sink, "resumed", False))

    def memory_bytes(self) -> int:
        """Bytes the outputs hold in memory (0 for a store), instances included."""
        if not isinstance(self.sink, MemorySink):
            return 0
        total = sum(int(a.nbytes) for a in self.sink.arrays.values())
        if "instances" in self.config.outputs:
            total += int(self.arrays["mask"].size) * 4
        return total

    def mask(self, probs: np.ndarray) -> np.ndarray:
        """Labels from the stitched probabilities (the foreground alone for two classes)."""
        # Two classes: argmax of [1 - p, p] is p > 0.5 (ties to the background), whatever
        # threshold a one-class network would use.
        if self.task.instances:
            return postprocess.foreground_of_classes(probs, self.task.foreground_threshold)
        threshold = 0.5 if self.binary else self.config.threshold
        return postprocess.mask_from_probabilities(probs, threshold)

    def _instance_channels(self, key: tuple, probs: np.ndarray) -> None:
        """The boundary output and the watershed's helper arrays of the instance task."""
        if not self.task.instances:
            return
        if "boundary" in self.arrays:
            self.arrays["boundary"][key] = postprocess.boundary_from_probability(
                probs[2], self.config.boundary_threshold)
        if INSTANCE_HELPERS[0] in self.arrays:
            for helper, channel in zip(INSTANCE_HELPERS, (1, 2)):
                self.arrays[helper][key] = postprocess.quantize_probabilities(
                    probs[channel], "uint8")

    def class_probs(self, probs: np.ndarray) -> np.ndarray:
        """The probabilities output (K x ...) from the stitched channels."""
        return postprocess.two_class(probs[0]) if self.binary else probs

    def rows_done(self, plane: int) -> int:
        """Output rows of ``plane`` already in the store (a plane left half done), else 0."""
        return 0 if self.consensus is not None else int(self.sink.rows.get(int(plane), 0))

    def plane_writers(self, layout: Layout, stack_index: tuple[int, ...],
                      plane: int | None = None,
                      use_boundary: bool = False) -> tuple[EmitFn, EmitFn]:
        """The ``emit`` callbacks of the probability and boundary stitchers of one plane.

        With ``plane`` given, the rows every stitcher has emitted (the probabilities', and
        the boundary's when ``use_boundary``) are recorded in the sink after each band, so a
        store resumes a half-done plane after them.
        """
        cfg, K, arrays, consensus = self.config, self.stitched, self.arrays, self.consensus
        emitted = {"p": 0, "b": 0 if use_boundary else None}

        def record(which: str, b: int) -> None:
            if plane is None or consensus is not None:
                return
            emitted[which] = b
            self.sink.mark_rows(plane, min(v for v in emitted.values() if v is not None))

        def key(a: int, b: int) -> tuple:
            return layout.out_index(stack_index, (slice(a, b),) + (slice(None),) * (
                len(layout.plane_axes) - 1))

        def emit_probs(a: int, b: int, values: np.ndarray) -> None:
            k = key(a, b)
            probs = values[:K]
            if consensus is not None:
                consensus.probs[(slice(None),) + k] += probs
                consensus.votes[consensus.index][k] = self.mask(probs)
                if values.shape[0] > K:
                    consensus.variance[k] += values[K]
                return
            arrays["mask"][k] = self.mask(probs)
            self._instance_channels(k, probs)
            if "probabilities" in arrays:
                arrays["probabilities"][(slice(None),) + k] = postprocess.quantize_probabilities(
                    self.class_probs(probs), cfg.probabilities_dtype)
            if "variance" in arrays:
                arrays["variance"][k] = values[K].astype(np.float16)
            record("p", b)

        def emit_boundary(a: int, b: int, values: np.ndarray) -> None:
            k = key(a, b)
            if consensus is not None:
                consensus.boundary[k] += values[0]
                return
            if "boundary" in arrays:
                arrays["boundary"][k] = postprocess.boundary_from_probability(
                    values[0], cfg.boundary_threshold)
            record("b", b)

        return emit_probs, emit_boundary

    def finish_consensus(self) -> float:
        """Write the average of the orthogonal passes; returns the planes' agreement."""
        cfg, consensus, arrays = self.config, self.consensus, self.arrays
        n = float(len(consensus.votes))
        probs = consensus.probs / n
        mask = self.mask(probs)
        agree = np.ones(mask.shape, bool)
        for vote in consensus.votes:
            agree &= vote == mask
        arrays["mask"][...] = mask
        self._instance_channels((Ellipsis,), probs)
        if "probabilities" in arrays:
            arrays["probabilities"][...] = postprocess.quantize_probabilities(
                self.class_probs(probs), cfg.probabilities_dtype)
        if "boundary" in arrays and consensus.boundary is not None:
            arrays["boundary"][...] = postprocess.boundary_from_probability(
                consensus.boundary / n, cfg.boundary_threshold)
        if "variance" in arrays and consensus.variance is not None:
            arrays["variance"][...] = (consensus.variance / n).astype(np.float16)
        for plane in range(self.layout.n_planes):
            self.sink.mark_finished(plane)
        return float(agree.mean())

    def postprocess(self, stats: dict, has_boundary: bool
                    ) -> Generator[ProgressEvent, None, None]:
        """Instances, a boundary derived from the mask (no boundary head), z-consistency.

        Args:
            stats: the run's numbers; ``z_consistency`` is added for slice-wise volumes.
            has_boundary: the network has a boundary head (else it is derived if asked).
        """
        cfg = self.config
        wanted = set(cfg.outputs)
        lay = self.layout
        if "instances" in wanted:
            yield StageEvent(message="Splitting instances (watershed).", stage="instances")
            inst = self._create("instances", np.int32)
            if self.task.instances:
                postprocess.seeded_instances_per_block(
                    self.arrays["mask"], *(self.arrays[h] for h in INSTANCE_HELPERS),
                    lay.out_axes, self.task, cfg.instance_min_size, out=inst)
            else:
                postprocess.instances_per_block(self.arrays["mask"], self.arrays.get("boundary"),
                                                lay.out_axes, cfg.instance_min_size, out=inst)
        if "boundary" in wanted and not (has_boundary or self.task.instances):
            yield StageEvent(message="Deriving the boundary from the mask.", stage="boundary")
            labels = self.arrays.get("instances", self.arrays["mask"])
            out = self._create("boundary", np.uint8)
            postprocess.boundary_per_block(labels, lay.out_axes, out=out)
        slice_axis = next((a for a in lay.stack_axes if a in "ZYX"), None)
        if slice_axis is None and self.consensus is not None:
            slice_axis = "Z"
        if slice_axis is not None:
            stats["z_consistency"] = postprocess.z_consistency(
                self.arrays["mask"], lay.out_axes.index(slice_axis))

    def outputs(self) -> tuple[dict[str, Any], dict[str, str]]:
        """The asked outputs and their axes, in the config's order."""
        wanted = [o for o in self.config.outputs if o in self.arrays]
        return {o: self.arrays[o] for o in wanted}, {o: self.axes_of[o] for o in wanted}

    def close(self, complete: bool, stats: dict) -> None:
        """Record the run in the sink (a store's attributes)."""
        self.sink.close(complete=complete, info={"stats": stats})
