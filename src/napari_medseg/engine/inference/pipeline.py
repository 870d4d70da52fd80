"""Tiled inference: ``predict_iter`` (a generator of progress events) and ``predict``.

``predict_iter(image, model, config)`` yields typed events (:mod:`.progress`) and *returns*
a :class:`PredictionResult`; its last event, :class:`~.progress.FinishedEvent`, carries the
same result, so both ``result = yield from predict_iter(...)`` and a plain ``for`` loop work.
``predict()`` drains it. The napari widget runs the same generator in a thread worker, the
CLI prints its events with a progress bar.

What happens, in order:

1. **Layout**: the image's axes (from the config, the reader's metadata, or a guess with a
   notice) decide what one network input is: a YX plane (2D network; a volume is sliced along
   ``config.axis``; ``T``/``I`` axes are iterated), or a ZYX block (3D network). The channels
   are converted grey <-> RGB when the network needs it (with a notice), else a wrong channel
   count is an :class:`~napari_medseg.errors.InputShapeError`.
2. **Normalization** fitted once on the whole image (percentile 1-99.8 unless the config or
   the checkpoint's model card says otherwise) and applied tile by tile.
3. **Device and precision**: ``auto`` is cuda > mps > cpu; autocast bf16 on CPUs with native
   bf16 and on bf16-capable GPUs, fp16 on older CUDA, fp32 elsewhere (:mod:`.precision`);
   ``torch.inference_mode``; channels-last on CPU and CUDA.
4. **Plan**: a :class:`~.plan.TilePlan` (tiles, memory, and after the first batch the measured
   time per tile) is sent before the work starts.
5. **Tiles** are read lazily, batched, run (with flip TTA if asked: 4 passes in 2D, 8 in 3D,
   giving also a ``variance`` output), turned into probabilities (sigmoid for one class,
   softmax otherwise, in fp32) and merged by a band-streaming :class:`~.tiling.Stitcher`
   (gaussian for probabilities, ``crop`` for the boundary head by default). Finished rows
   go straight into the outputs, a numpy array or a zarr store (:mod:`.sinks`), so peak
   memory is one band, not the volume; each finished slice is recorded in the store, and a
   re-run resumes after it.
6. **Post-processing** once all planes are written: a boundary map derived from the mask
   (networks without a boundary head), instance labels (watershed seeded by mask minus
   boundary), and for slice-wise volumes a z-consistency score.

A cancel token is checked between batches: a cancelled run returns what it finished (whole
slices, and for a single plane the rows already merged). On GPU out-of-memory the batch is
halved, then the tile, then the run moves to the CPU, each with a visible notice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
import weakref
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...config import PredictConfig
from ...errors import ConfigError, InputShapeError, MedsegError
from ...io.metadata import ImageMeta, output_meta
from ...models.spec import HEAD_BOUNDARY, HEAD_MASK
from . import postprocess
from ..device import free_memory, resolve_device
from ..layout import Layout, convert_channels, guess_axes
from .normalization import DEFAULT_NORMALIZATION, fit_normalization, sample_values
from .plan import ACTIVATION_BYTES_PER_PIXEL, TilePlan
from ..precision import autocast, resolve_precision
from ..progress import (
    drain,
    CancelledEvent,
    CancelToken,
    FinishedEvent,
    NoticeEvent,
    PlaneEvent,
    PlanEvent,
    ProgressEvent,
    StageEvent,
    TilesEvent,
)
from .sinks import MemorySink, OutputSink, ZarrSink
from .tiling import Stitcher, Tile, TileGrid, read_tile

__all__ = [
    "PredictionResult",
    "OutOfMemory",
    "predict_iter",
    "predict",
    "plan_prediction",
    "tta_flips",
]

#: Largest number of tiles a GPU batch gets when the batch size is chosen automatically.
MAX_AUTO_BATCH = 32
#: Fraction of a GPU's free memory the automatic batch size may fill.
GPU_MEMORY_FRACTION = 0.6
#: Out-of-memory recovery halves the tile while it stays at least this big.
MIN_OOM_TILE = 32


class OutOfMemory(MedsegError, MemoryError):
    """Not even one tile of the smallest size fits on the device."""


@dataclass
class PredictionResult:
    """What a prediction produced.

    Attributes:
        outputs: output name -> array (numpy, or a zarr array when streamed to a store):
            ``mask`` (labels; the image's axes without C, in-plane axes x output scale),
            ``probabilities`` (C x mask axes; C = K classes, K == 1 the foreground),
            ``boundary`` (uint8, 1 = boundary), ``instances`` (int32), ``variance`` (float16,
            TTA disagreement).
        axes: output name -> axes string (``"YX"``, ``"CZYX"`` ...).
        plan: the tile plan that ran (probed).
        stats: numbers about the run: ``seconds``, ``forward_passes``, ``device``,
            ``precision``, ``batch_size``, ``tile``, ``z_consistency`` (slice-wise volumes),
            ``plane_agreement`` (orthogonal consensus), ``normalization`` ...
        cancelled: True when stopped early; ``planes_done`` says what is complete.
        planes_done: indices of the finished planes.
        notices: the notices sent during the run.
        store: the zarr store path, when streamed.
        scale: output side / input side.
        meta: the label outputs' geometry (:class:`~napari_medseg.io.ImageMeta` on their
            grid: the input's spacing, origin and affine, made finer in-plane for a
            super-resolving network); probabilities add a leading ``C``.
    """

    outputs: dict[str, Any]
    axes: dict[str, str]
    plan: TilePlan | None
    stats: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False
    planes_done: tuple[int, ...] = ()
    notices: tuple[str, ...] = ()
    store: str | None = None
    scale: int = 1
    meta: Any = None

    def __getitem__(self, name: str) -> Any:
        return self.outputs[name]

    def __contains__(self, name: str) -> bool:
        return name in self.outputs


def tta_flips(spatial_dims: int) -> list[tuple[int, ...]]:
    """Flip TTA: every subset of the spatial axes (4 passes in 2D, 8 in 3D)."""
    axes = tuple(range(-spatial_dims, 0))
    flips: list[tuple[int, ...]] = [()]
    for r in range(1, spatial_dims + 1):
        from itertools import combinations

        flips.extend(combinations(axes, r))
    return flips


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text.lower() or "can't allocate memory" in text)


class _BatchTooBig(Exception):
    """One tile does not fit on the device."""


class _ActivationMeter:
    """Peak bytes of live module outputs during a forward pass, from hooks.

    Each module output tensor is counted once per storage while any tensor using that storage
    is alive (weak references tell when it is freed). It misses temporaries made inside a
    module's forward that are not any module's output, so it is an estimate.
    """

    def __init__(self, model) -> None:
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}
        self._handles = [m.register_forward_hook(self._hook) for m in model.modules()]

    def _release(self, ptr: int) -> None:
        entry = self._storages.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.live -= entry[0]
            del self._storages[ptr]

    def _track(self, t) -> None:
        import torch

        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        entry = self._storages.get(ptr)
        if entry is None:
            entry = [storage.nbytes(), 0]
            self._storages[ptr] = entry
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)

    def _hook(self, module, inputs, output) -> None:
        if isinstance(output, dict):
            output = list(output.values())
        if isinstance(output, (list, tuple)):
            for o in output:
                if isinstance(o, (list, tuple)):
                    for p in o:
                        self._track(p)
                else:
                    self._track(o)
        else:
            self._track(output)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _model_bytes(model) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def _weights_id(model) -> str:
    info = getattr(model, "checkpoint_info", None)
    if info is not None and getattr(info, "sha256", None):
        return str(info.sha256)
    import torch

    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        raw = value.detach().to("cpu").contiguous().reshape(-1)
        if raw.dtype != torch.bool:
            raw = raw.view(torch.uint8)
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


class _Run:
    """One prediction: the state shared by the setup, the probe and the tile loop."""

    def __init__(self, image, model, config: PredictConfig, meta: Any, cancel: CancelToken):
        self.image = image
        self.model = model
        self.config = config
        self.meta = meta
        self.cancel = cancel
        self.notices: list[str] = []
        self.spec = getattr(model, "spec", None)
        if self.spec is None:
            raise ConfigError("The model has no spec; build it with create_model() or "
                              "load it with resolve_weights().")
        self.scale = int(self.spec.output_scale)
        self.K = int(self.spec.num_classes)
        self.has_boundary = HEAD_BOUNDARY in self.spec.heads
        # The boundary head is read (and stitched) only for the outputs that use it.
        self.use_boundary = self.has_boundary and bool(
            set(config.outputs) & {"boundary", "instances"})
        # Two classes: only the foreground probability is stitched. Blending is linear and
        # the weights sum to one, so the background is exactly 1 - foreground after the stitch
        # too; this halves the stitch and the copies. softmax(l)[1] == sigmoid(l1 - l0).
        self.binary = self.K == 2
        self.stitched = 1 if self.binary else self.K
        self.flips = tta_flips(self.spec.spatial_dims) if config.tta else [()]
        self.passes_done = 0
        self.t_start = time.perf_counter()
        self.sink: OutputSink | None = None
        self.plan: TilePlan | None = None
        self.probed = False
        self.current_grid: TileGrid | None = None
        self._forward_seconds = 0.0
        self._probe_passes = 0
        self.total_passes = 0
        self._was_training = bool(model.training)

    # -- notices ------------------------------------------------------------------------
    def notice(self, message: str, level: str = "info") -> NoticeEvent:
        self.notices.append(message)
        return NoticeEvent(message=message, level=level)

    # -- setup --------------------------------------------------------------------------
    def setup(self) -> Generator[ProgressEvent, None, None]:
        cfg, spec = self.config, self.spec
        shape = tuple(int(s) for s in self.image.shape)
        if any(s == 0 for s in shape):
            raise InputShapeError(
                f"The image has a zero-length axis (shape {shape}); it holds no pixels.")
        axes = cfg.axes or getattr(self.meta, "axes", None)
        if axes is None:
            axes = guess_axes(shape, spec.in_channels)
            if len(shape) > 2:
                yield self.notice(f"Reading the array of shape {shape} as {axes}; give the "
                                  "axes if that is wrong.")
        if "C" not in axes and len(axes) == len(shape) - 1 and shape[-1] in (3, 4):
            axes = axes + "C"  # metadata without the colour samples
        if cfg.volume_mode == "orthogonal":
            if spec.spatial_dims != 2 or "Z" not in axes:
                raise ConfigError("Orthogonal-plane consensus needs a 2D network and a volume "
                                  "with Z, Y and X axes.")
            if self.scale != 1:
                raise ConfigError("Orthogonal-plane consensus needs a network whose output has "
                                  "the input's size (this one upsamples).")
            self.layouts = [Layout.build(shape, axes, 2, spec.in_channels, a, cfg.channels)
                            for a in ("Z", "Y", "X")]
        else:
            self.layouts = [Layout.build(shape, axes, spec.spatial_dims, spec.in_channels,
                                         cfg.axis, cfg.channels)]
        self.layout = self.layouts[0]
        conv = self.layout.conversion
        if conv is not None:
            words = {"rgb2grey": "RGB to grey", "rgba2grey": "RGBA to grey",
                     "grey2rgb": "grey to RGB", "rgba2rgb": "RGBA to RGB (alpha dropped)"}
            yield self.notice(f"The network takes {spec.in_channels} channel(s); converting the "
                              f"image from {words[conv]}.")
        if "variance" in cfg.outputs and not cfg.tta:
            raise ConfigError("The variance output comes from TTA; turn TTA on to get it.")
        # NaN/inf: checked here for in-memory images, per tile for lazy ones.
        self.float_input = np.issubdtype(np.dtype(self.image.dtype), np.floating)
        if self.float_input and isinstance(self.image, np.ndarray) and not np.isfinite(
                self.image).all():
            raise InputShapeError(
                "The image contains NaN or infinite pixels; replace them (e.g. with 0) first.")
        # Normalization fitted once on the whole image.
        norm = cfg.normalization
        if norm is None:
            info = getattr(self.model, "checkpoint_info", None)
            norm = info.normalization_config() if info is not None else None
        self.norm_config = norm or DEFAULT_NORMALIZATION
        yield StageEvent(message="Fitting the intensity normalization.", stage="normalizing")
        samples = sample_values(self.image, self.layout.channel_axis)
        samples = convert_channels(samples, conv)
        self.stats = fit_normalization(samples, self.norm_config)
        # The image's identity for resuming: a hash of the same regular subsample.
        self.content_id = hashlib.sha256(np.ascontiguousarray(samples).tobytes()).hexdigest()
        # Device and precision.
        self.device = resolve_device(cfg.device)
        self.policy = resolve_precision(cfg.precision, self.device)
        if self.policy.notice:
            yield self.notice(self.policy.notice, "warning")
        self.channels_last = (cfg.channels_last if cfg.channels_last is not None
                              else self.device.type in ("cpu", "cuda"))
        self.model.eval()
        self._prepare_model()
        # Tile grid.
        requested = cfg.tiling.tile if cfg.tiling.tile is not None else spec.preferred_tile
        self.tile_request = requested
        self.grid = self._grid(requested, self.layout)
        self.current_grid = self.grid
        asked = (requested,) * len(self.grid.tile) if isinstance(requested, int) else tuple(
            requested)
        if len(asked) == 1:
            asked = asked * len(self.grid.tile)
        # Only a side clamped to a smaller image is news; balanced tiles shrink by design.
        if any(t < a and p < a
               for t, a, p in zip(self.grid.tile, asked, self.layout.plane_shape)):
            yield self.notice(
                f"The tile {'x'.join(map(str, asked))} is larger than the image "
                f"({'x'.join(map(str, self.layout.plane_shape))}); using "
                f"{'x'.join(map(str, self.grid.tile))}.")
        factor = spec.input_downsample
        # The user's tile, not the balanced one: the automatic tile must not warn.
        if factor > 1 and min(asked) < min(spec.preferred_tile, *self.layout.plane_shape):
            yield self.notice(
                f"These weights work at 1/{factor} resolution, so a "
                f"{'x'.join(map(str, self.grid.tile))} tile gives the network only "
                f"{min(self.grid.tile) // factor} pixels of context; the automatic tile "
                f"({spec.preferred_tile}) segments large objects much better.", "warning")
        if cfg.tta:
            yield self.notice(f"TTA is on: {len(self.flips)} forward passes per tile "
                              f"({len(self.flips)}x the time).")
        if self.device.type == "cuda" and cfg.batch_size is None:
            self.batch_size = 1  # the probe measures; the real batch follows from it
            self.auto_gpu_batch = True
        else:
            self.batch_size = int(cfg.batch_size or spec.cpu_batch_size)
            self.auto_gpu_batch = False
        # Outputs.
        self._open_sink()
        if getattr(self.sink, "resumed", False):
            yield self.notice(f"Resuming: {len(self.sink.finished)} of {self.layout.n_planes} "
                              "slice(s) are already in the store.")
        self.plan = self._make_plan()

    def _prepare_model(self) -> None:
        import torch

        self.model.to(self.device)
        if self.channels_last:
            fmt = torch.channels_last if self.spec.spatial_dims == 2 else torch.channels_last_3d
            self.model.to(memory_format=fmt)

    def _grid(self, tile, layout: Layout) -> TileGrid:
        t = self.config.tiling
        return TileGrid.build(layout.plane_shape, tile, t.overlap, self.spec.divisor,
                              self.spec.min_size, self.scale, balance=t.balance)

    def _fingerprint(self) -> str:
        cfg = self.config.to_dict()
        for key in ("device", "precision", "batch_size", "channels_last", "store", "resume",
                    "overwrite", "oom_fallback"):
            cfg.pop(key, None)
        data = {
            "shape": list(self.image.shape), "dtype": str(np.dtype(self.image.dtype)),
            "axes": self.layout.axes, "plane_axes": self.layout.plane_axes,
            "content": self.content_id,
            "network": self.spec.network, "variant": self.spec.variant,
            "weights": _weights_id(self.model), "config": cfg,
            "normalization": self.stats.to_dict(),
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]

    def _open_sink(self) -> None:
        cfg = self.config
        if cfg.store:
            self.sink = ZarrSink(cfg.store, self._fingerprint(),
                                 resume=cfg.resume and cfg.volume_mode == "slices",
                                 overwrite=cfg.overwrite)
        else:
            self.sink = MemorySink()
        lay = self.layout
        out_shape = lay.out_shape(self.scale)
        out_axes = lay.out_axes
        chunks = tuple(1 if a in lay.stack_axes else min(n, 1024)
                       for a, n in zip(out_axes, out_shape))
        self.arrays: dict[str, Any] = {}
        self.axes_of: dict[str, str] = {}
        wanted = set(cfg.outputs)
        self.arrays["mask"] = self.sink.create("mask", out_shape,
                                               postprocess.mask_dtype(self.K), chunks, out_axes)
        self.axes_of["mask"] = out_axes
        if isinstance(self.sink, ZarrSink):
            self.sink.describe_image("mask", out_axes, *self._out_geometry(lay))
        if "probabilities" in wanted:
            dtype = np.float16 if cfg.probabilities_dtype == "float16" else np.uint8
            self.arrays["probabilities"] = self.sink.create(
                "probabilities", (self.K,) + out_shape, dtype, (1,) + chunks, "C" + out_axes)
            self.axes_of["probabilities"] = "C" + out_axes
        if self.use_boundary:
            self.arrays["boundary"] = self.sink.create("boundary", out_shape, np.uint8, chunks,
                                                       out_axes)
            self.axes_of["boundary"] = out_axes
        if "variance" in wanted:
            self.arrays["variance"] = self.sink.create("variance", out_shape, np.float16,
                                                       chunks, out_axes)
            self.axes_of["variance"] = out_axes

    def _out_geometry(self, lay: Layout) -> tuple[tuple[float, ...] | None, tuple | None]:
        """Spacing and units per label-output axis, from the reader's metadata if any."""
        meta_spacing = getattr(self.meta, "spacing", None)
        meta_axes = getattr(self.meta, "spatial_axes", None)
        if not meta_spacing or not meta_axes:
            return None, None
        lookup = dict(zip(meta_axes, meta_spacing))
        units = dict(zip(meta_axes, getattr(self.meta, "units", ()) or ()))
        spacing = tuple(
            float(lookup.get(a, 1.0)) / (self.scale if a in lay.plane_axes else 1)
            for a in lay.out_axes)
        return spacing, tuple(units.get(a) for a in lay.out_axes)

    def _band_bytes(self, grid: TileGrid) -> int:
        row = grid.out_tile[0] * math.prod(p * grid.scale for p in grid.padded[1:])
        channels = (self.stitched + 1 + (1 if self.config.tta else 0))
        if self.use_boundary:
            channels += 2
        return row * channels * 4  # float32 accumulators

    def _make_plan(self) -> TilePlan:
        lay = self.layout
        todo = lay.n_planes - len(self.sink.finished)
        output_bytes = 0
        if isinstance(self.sink, MemorySink):
            output_bytes = sum(int(a.nbytes) for a in self.sink.arrays.values())
            if "instances" in self.config.outputs:
                output_bytes += int(self.arrays["mask"].size) * 4
        if len(self.layouts) > 1:
            output_bytes += math.prod(lay.out_shape()) * (self.stitched * 4 + 3)
        half = self.policy.name in ("bf16", "fp16")
        guess = self.batch_size * math.prod(self.grid.tile) * ACTIVATION_BYTES_PER_PIXEL
        notes = []
        if len(self.layouts) > 1:
            notes.append("Orthogonal consensus: three passes (YX, ZX, ZY) averaged.")
        return TilePlan(
            image_shape=tuple(int(s) for s in self.image.shape), axes=lay.axes,
            plane_axes=lay.plane_axes, stack_axes=lay.stack_axes, grid=self.grid,
            planes=lay.n_planes, planes_todo=todo, passes=len(self.layouts),
            tta_flips=len(self.flips), batch_size=self.batch_size, device=str(self.device),
            precision=self.policy.name, channels_last=self.channels_last,
            model_bytes=_model_bytes(self.model), band_bytes=self._band_bytes(self.grid),
            output_bytes=output_bytes, activation_bytes=guess // (2 if half else 1),
            notes=tuple(notes + self.notices),
        )

    # -- the forward pass -----------------------------------------------------------------
    def _read_batch(self, view, grid: TileGrid, tiles: list[Tile]) -> np.ndarray:
        blocks = []
        for tile in tiles:
            block = read_tile(view, grid, tile, self.config.tiling.padding, lead=1)
            if self.float_input and not isinstance(self.image, np.ndarray) and not np.isfinite(
                    block).all():
                raise InputShapeError(
                    "The image contains NaN or infinite pixels; replace them (e.g. with 0) "
                    "first.")
            blocks.append(self.stats.apply(block, 0))
        return np.stack(blocks)

    def _forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities (N x K(+1 variance) x out) and boundary probabilities (N x 1 x out)."""
        import torch

        x = torch.from_numpy(batch).to(self.device)
        if self.channels_last:
            fmt = torch.channels_last if self.spec.spatial_dims == 2 else torch.channels_last_3d
            x = x.contiguous(memory_format=fmt)
        n = x.shape[0]
        out_tile = tuple(self.current_grid.out_tile)
        prob_sum = prob_sq = bnd_sum = None
        try:
            with torch.inference_mode(), autocast(self.device, self.policy):
                for flip in self.flips:
                    xi = torch.flip(x, flip) if flip else x
                    out = self.model(xi)
                    logits = out[HEAD_MASK]
                    if tuple(logits.shape) != (n, self.K) + out_tile:
                        raise RuntimeError(
                            f"The network returned a mask of shape {tuple(logits.shape)}, "
                            f"expected {(n, self.K) + out_tile}.")
                    logits = logits.float()
                    if flip:
                        logits = torch.flip(logits, flip)
                    if self.binary:
                        p = torch.sigmoid(logits[:, 1:2] - logits[:, 0:1])
                    elif self.K == 1:
                        p = torch.sigmoid(logits)
                    else:
                        p = torch.softmax(logits, dim=1)
                    prob_sum = p if prob_sum is None else prob_sum + p
                    if len(self.flips) > 1:
                        prob_sq = p * p if prob_sq is None else prob_sq + p * p
                    if self.use_boundary:
                        b = out[HEAD_BOUNDARY].float()
                        if flip:
                            b = torch.flip(b, flip)
                        b = torch.sigmoid(b[:, :1])
                        bnd_sum = b if bnd_sum is None else bnd_sum + b
        except Exception as exc:
            if _is_oom(exc):
                raise _BatchTooBig() from exc
            raise
        m = float(len(self.flips))
        probs = prob_sum / m
        if prob_sq is not None:
            var = (prob_sq / m - probs * probs).clamp_min(0.0).mean(dim=1, keepdim=True)
            probs = torch.cat([probs, var], dim=1)
        bnd = None if bnd_sum is None else (bnd_sum / m).cpu().numpy()
        return probs.cpu().numpy(), bnd

    def _forward_split(self, batch: np.ndarray) -> Generator[ProgressEvent, None, tuple]:
        """Forward a batch; on out-of-memory split it in halves (and shrink future batches)."""
        try:
            return self._forward(batch)
        except _BatchTooBig:
            if len(batch) == 1:
                raise
            self._empty_cache()
            half = len(batch) // 2
            if self.batch_size > half:
                self.batch_size = max(1, half)
                yield self.notice(f"Out of memory on {self.device}: batch size reduced to "
                                  f"{self.batch_size}.", "warning")
            a = yield from self._forward_split(batch[:half])
            b = yield from self._forward_split(batch[half:])
            probs = np.concatenate([a[0], b[0]])
            bnd = None if a[1] is None else np.concatenate([a[1], b[1]])
            return probs, bnd

    def _empty_cache(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- one plane ----------------------------------------------------------------------
    def _plane_writers(self, layout: Layout, stack_index: tuple[int, ...],
                       consensus: dict | None):
        """Emit callbacks of the probability and boundary stitchers for one plane."""
        cfg = self.config
        K = self.stitched
        arrays = self.arrays

        def key(a: int, b: int) -> tuple:
            return layout.out_index(stack_index, (slice(a, b),) + (slice(None),) * (
                len(layout.plane_axes) - 1))

        def emit_probs(a: int, b: int, values: np.ndarray) -> None:
            k = key(a, b)
            probs = values[:K]
            if consensus is not None:
                consensus["probs"][(slice(None),) + k] += probs
                consensus["votes"][consensus["pass"]][k] = self._mask(probs)
                if values.shape[0] > K:
                    consensus["variance"][k] += values[K]
                return
            arrays["mask"][k] = self._mask(probs)
            if "probabilities" in arrays:
                arrays["probabilities"][(slice(None),) + k] = postprocess.quantize_probabilities(
                    self._class_probs(probs), cfg.probabilities_dtype)
            if "variance" in arrays:
                arrays["variance"][k] = values[K].astype(np.float16)

        def emit_boundary(a: int, b: int, values: np.ndarray) -> None:
            k = key(a, b)
            if consensus is not None:
                consensus["boundary"][k] += values[0]
                return
            if "boundary" in arrays:
                arrays["boundary"][k] = postprocess.boundary_from_probability(
                    values[0], cfg.boundary_threshold)

        return emit_probs, emit_boundary

    def _mask(self, probs: np.ndarray) -> np.ndarray:
        """Labels from the stitched probabilities (the foreground alone for two classes)."""
        # Two classes: argmax of [1 - p, p] is p > 0.5 (ties to the background), whatever
        # threshold a one-class network would use.
        threshold = 0.5 if self.binary else self.config.threshold
        return postprocess.mask_from_probabilities(probs, threshold)

    def _class_probs(self, probs: np.ndarray) -> np.ndarray:
        """The probabilities output (K x ...) from the stitched channels."""
        return postprocess.two_class(probs[0]) if self.binary else probs

    def _run_plane(self, layout: Layout, plane: int, stack_index: tuple[int, ...],
                   consensus: dict | None) -> Generator[ProgressEvent, None, bool]:
        """Predict one plane; returns False when cancelled before it finished."""
        while True:
            try:
                return (yield from self._run_plane_once(layout, plane, stack_index, consensus))
            except _BatchTooBig:
                yield from self._recover_from_oom()

    def _recover_from_oom(self) -> Generator[ProgressEvent, None, None]:
        """Batch of one did not fit: a smaller tile, else the CPU, else give up."""
        import torch

        self._empty_cache()
        cfg = self.config
        tile = self.grid.tile
        smaller = tuple(max(self.spec.min_size, t // 2) for t in tile)
        smaller = tuple(self.spec.valid_size(s) if s % self.spec.divisor else s for s in smaller)
        floor = max(self.spec.min_size, MIN_OOM_TILE)
        if cfg.oom_fallback and smaller != tile and min(smaller) >= floor:
            self.tile_request = smaller
            self.grid = self._grid(smaller, self.layout)
            self.current_grid = self.grid
            yield self.notice(f"Out of memory on {self.device} with one tile: tile reduced to "
                              f"{'x'.join(map(str, self.grid.tile))}.", "warning")
            return
        if cfg.oom_fallback and self.device.type != "cpu":
            old = self.device
            self.device = torch.device("cpu")
            self.policy = resolve_precision("auto", self.device)
            self.channels_last = True
            self._prepare_model()
            self._empty_cache_device(old)
            yield self.notice(f"Out of memory on {old} even with one small tile; continuing on "
                              f"the CPU ({self.policy.name}).", "warning")
            return
        raise OutOfMemory(
            f"Out of memory on {self.device} even with one tile of "
            f"{'x'.join(map(str, tile))}; free memory or choose a smaller tile.")

    def _empty_cache_device(self, device) -> None:
        import torch

        if device.type == "cuda":
            torch.cuda.empty_cache()

    def _run_plane_once(self, layout: Layout, plane: int, stack_index: tuple[int, ...],
                        consensus: dict | None) -> Generator[ProgressEvent, None, bool]:
        cfg = self.config
        grid = self.grid if layout is self.layout else self._grid(self.tile_request, layout)
        self.current_grid = grid
        view = layout.view(self.image, stack_index)
        emit_probs, emit_boundary = self._plane_writers(layout, stack_index, consensus)
        t = cfg.tiling
        # float32 accumulators: a 2048 x 2048 SASR-Net stitch (4096 x 4096 out) took 0.07 s
        # against 0.17-0.32 s in float64, and the probabilities differ by float32 rounding
        # (about 1e-7); the 3D band of a volume network is halved too.
        acc = np.float32
        channels = self.stitched + (1 if len(self.flips) > 1 else 0)
        stitch_p = Stitcher(grid, channels, emit_probs, t.blend, t.sigma_scale, t.min_weight, acc)
        stitch_b = Stitcher(grid, 1, emit_boundary, t.boundary_blend, t.sigma_scale,
                            t.min_weight, acc) if self.use_boundary else None
        tiles = list(grid)
        i = 0
        while i < len(tiles):
            chunk = tiles[i: i + self.batch_size]
            batch = self._read_batch(view, grid, chunk)
            if not self.probed:
                # The first batch is the probe: measured, and its output used.
                probs, bnd = yield from self._probe(batch)
                self._probe_passes = len(chunk) * len(self.flips)
            else:
                t0 = time.perf_counter()
                probs, bnd = yield from self._forward_split(batch)
                self._forward_seconds += time.perf_counter() - t0
            for j, tile in enumerate(chunk):
                stitch_p.add(tile, probs[j])
                if stitch_b is not None:
                    stitch_b.add(tile, bnd[j])
            i += len(chunk)
            self.passes_done += len(chunk) * len(self.flips)
            elapsed = time.perf_counter() - self.t_start
            total = self.total_passes
            rate = self._forward_seconds / max(1, self.passes_done - self._probe_passes) if (
                self.passes_done > self._probe_passes) else self.plan.seconds_per_pass
            eta = None if rate is None else rate * max(0, total - self.passes_done)
            yield TilesEvent(done=self.passes_done, total=total, plane=plane,
                             planes=layout.n_planes, elapsed_s=elapsed, eta_s=eta)
            if self.cancel.cancelled and i < len(tiles):
                return False
        stitch_p.finish()
        if stitch_b is not None:
            stitch_b.finish()
        return True

    def _probe(self, batch: np.ndarray) -> Generator[ProgressEvent, None, tuple]:
        """Run one batch measuring memory (hooks or CUDA stats) and time; fix the GPU batch.

        Returns the batch's output like :meth:`_forward`.
        """
        import torch

        meter = _ActivationMeter(self.model)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        t0 = time.perf_counter()
        try:
            output = yield from self._forward_split(batch)
        finally:
            meter.remove()
        seconds = time.perf_counter() - t0
        if cuda:
            torch.cuda.synchronize(self.device)
            act = torch.cuda.max_memory_allocated(self.device) - base
        else:
            act = int(meter.peak * 1.25) + batch.nbytes
        n = len(batch)
        per_sample = max(1, act // n)
        if self.auto_gpu_batch:
            free = free_memory(self.device) or 0
            fit = int(free * GPU_MEMORY_FRACTION // per_sample)
            self.batch_size = max(1, min(MAX_AUTO_BATCH, fit, len(self.grid)))
            yield self.notice(f"Batch size {self.batch_size} fits the free memory of "
                              f"{self.device}.")
        self.probed = True
        self.plan = self.plan.replace(
            activation_bytes=per_sample * self.batch_size,
            seconds_per_pass=seconds / (n * len(self.flips)), probed=True,
            batch_size=self.batch_size, device=str(self.device), precision=self.policy.name,
            notes=tuple(self.plan.notes) + tuple(
                m for m in self.notices if m not in self.plan.notes))
        yield PlanEvent(message=self.plan.describe(), plan=self.plan, probed=True)
        return output

    # -- the whole run --------------------------------------------------------------------
    def run(self) -> Generator[ProgressEvent, None, PredictionResult]:
        yield from self.setup()
        yield PlanEvent(message=self.plan.describe(), plan=self.plan, probed=False)
        self.total_passes = self.plan.forward_passes
        self.t_start = time.perf_counter()
        yield StageEvent(message="Predicting.", stage="predicting")
        cancelled = False
        done: list[int] = sorted(self.sink.finished)
        consensus = None
        if len(self.layouts) > 1:
            shape = self.layout.out_shape()
            consensus = {
                "probs": np.zeros((self.stitched,) + shape, np.float32),
                "votes": [np.zeros(shape, postprocess.mask_dtype(self.K)) for _ in self.layouts],
                "boundary": np.zeros(shape, np.float32) if self.use_boundary else None,
                "variance": np.zeros(shape, np.float32) if len(self.flips) > 1 else None,
                "pass": 0,
            }
        for p, layout in enumerate(self.layouts):
            if consensus is not None:
                consensus["pass"] = p
            for plane, stack_index in enumerate(layout.plane_indices()):
                if consensus is None and plane in self.sink.finished:
                    yield PlaneEvent(plane=plane, planes=layout.n_planes, skipped=True)
                    continue
                finished = yield from self._run_plane(layout, plane, stack_index, consensus)
                if not finished:
                    cancelled = True
                    break
                if consensus is None:
                    self.sink.mark_finished(plane)
                    done.append(plane)
                yield PlaneEvent(plane=plane, planes=layout.n_planes)
                if self.cancel.cancelled:
                    cancelled = plane != layout.n_planes - 1 or p != len(self.layouts) - 1
                    break
            if cancelled:
                break
        stats: dict[str, Any] = {}
        if consensus is not None and not cancelled:
            yield StageEvent(message="Averaging the three planes.", stage="consensus")
            stats["plane_agreement"] = self._finish_consensus(consensus)
            done = list(range(self.layout.n_planes))
            for plane in done:
                self.sink.mark_finished(plane)
        if cancelled:
            yield self.notice(f"Cancelled; {len(done)} of {self.layout.n_planes} slice(s) "
                              "finished are kept.", "warning")
        else:
            yield from self._postprocess(stats)
        seconds = time.perf_counter() - self.t_start
        stats.update({
            "seconds": round(seconds, 4), "forward_seconds": round(self._forward_seconds, 4),
            "forward_passes": self.passes_done, "device": str(self.device),
            "precision": self.policy.name, "batch_size": self.batch_size,
            "tile": list(self.grid.tile), "tta_flips": len(self.flips),
            "normalization": {"config": self.norm_config.to_dict(),
                              "fitted": self.stats.to_dict()},
        })
        wanted = [o for o in self.config.outputs if o in self.arrays]
        result = PredictionResult(
            outputs={o: self.arrays[o] for o in wanted},
            axes={o: self.axes_of[o] for o in wanted}, plan=self.plan, stats=stats,
            cancelled=cancelled, planes_done=tuple(sorted(done)), notices=tuple(self.notices),
            store=str(self.config.store) if self.config.store else None, scale=self.scale,
            meta=output_meta(self.meta if isinstance(self.meta, ImageMeta) else None,
                             self.layout.axes, self.layout.shape, self.layout.out_axes,
                             self.layout.out_shape(self.scale)),
        )
        self.sink.close(complete=not cancelled, info={"stats": stats})
        if cancelled:
            yield CancelledEvent(message="Prediction cancelled.", planes_done=result.planes_done)
        return result

    def _finish_consensus(self, consensus: dict) -> float:
        cfg = self.config
        n = float(len(self.layouts))
        probs = consensus["probs"] / n
        mask = self._mask(probs)
        agree = np.ones(mask.shape, bool)
        for vote in consensus["votes"]:
            agree &= vote == mask
        self.arrays["mask"][...] = mask
        if "probabilities" in self.arrays:
            self.arrays["probabilities"][...] = postprocess.quantize_probabilities(
                self._class_probs(probs), cfg.probabilities_dtype)
        if "boundary" in self.arrays and consensus["boundary"] is not None:
            self.arrays["boundary"][...] = postprocess.boundary_from_probability(
                consensus["boundary"] / n, cfg.boundary_threshold)
        if "variance" in self.arrays and consensus["variance"] is not None:
            self.arrays["variance"][...] = (consensus["variance"] / n).astype(np.float16)
        return float(agree.mean())

    def _postprocess(self, stats: dict) -> Generator[ProgressEvent, None, None]:
        cfg = self.config
        wanted = set(cfg.outputs)
        lay = self.layout
        out_shape = lay.out_shape(self.scale)
        chunks = tuple(1 if a in lay.stack_axes else min(n, 1024)
                       for a, n in zip(lay.out_axes, out_shape))
        if "instances" in wanted:
            yield StageEvent(message="Splitting instances (watershed).", stage="instances")
            inst = self.sink.create("instances", out_shape, np.int32, chunks, lay.out_axes)
            postprocess.instances_per_block(self.arrays["mask"], self.arrays.get("boundary"),
                                            lay.out_axes, cfg.instance_min_size, out=inst)
            self.arrays["instances"] = inst
            self.axes_of["instances"] = lay.out_axes
        if "boundary" in wanted and not self.has_boundary:
            yield StageEvent(message="Deriving the boundary from the mask.", stage="boundary")
            out = self.sink.create("boundary", out_shape, np.uint8, chunks, lay.out_axes)
            postprocess.boundary_per_block(self.arrays.get("instances", self.arrays["mask"]),
                                           lay.out_axes, out=out)
            self.arrays["boundary"] = out
            self.axes_of["boundary"] = lay.out_axes
        slice_axis = next((a for a in lay.stack_axes if a in "ZYX"), None)
        if slice_axis is not None:
            stats["z_consistency"] = postprocess.z_consistency(
                self.arrays["mask"], lay.out_axes.index(slice_axis))
        elif len(self.layouts) > 1:
            stats["z_consistency"] = postprocess.z_consistency(
                self.arrays["mask"], lay.out_axes.index("Z"))

    def restore(self) -> None:
        """Put the model back in the mode it came in (training or eval)."""
        self.model.train(self._was_training)


def _config(config: PredictConfig | dict | None, settings: dict) -> PredictConfig:
    if config is None:
        config = PredictConfig()
    elif not isinstance(config, PredictConfig):
        config = PredictConfig.from_mapping(config)
    if settings:
        config = config.replace(**settings)
    return config


def predict_iter(
    image,
    model,
    config: PredictConfig | dict | None = None,
    *,
    meta: Any = None,
    cancel: CancelToken | None = None,
    **settings: Any,
) -> Generator[ProgressEvent, None, PredictionResult]:
    """Predict ``image`` with ``model`` tile by tile, yielding progress events.

    Args:
        image: numpy, zarr or dask array; axes from ``config.axes``, else ``meta.axes``,
            else guessed (see :func:`~napari_medseg.engine.layout.guess_axes`).
        model: a registered network (``create_model`` / ``resolve_weights``); it is moved to
            the chosen device and put in eval mode (its previous mode is restored after).
        config: settings (a :class:`~napari_medseg.config.PredictConfig` or a mapping).
        meta: the reader's :class:`~napari_medseg.io.ImageMeta` (for its axes).
        cancel: checked between batches; a cancelled run returns what it finished.
        **settings: overrides of ``config`` fields (``tile=128``, ``tta=True`` ...).

    Yields:
        :mod:`~napari_medseg.engine.progress` events; the last is a ``FinishedEvent``.

    Returns:
        The :class:`PredictionResult` (also carried by the ``FinishedEvent``).

    Raises:
        InputShapeError: wrong channels, NaN/inf pixels, a zero-length axis, unknown axes.
        ConfigError: invalid settings.
        OutOfMemory: not even one small tile fits (after the CPU fallback, if allowed).
    """
    config = _config(config, settings)
    run = _Run(image, model, config, meta, cancel if cancel is not None else CancelToken())
    try:
        result = yield from run.run()
    finally:
        run.restore()
    yield FinishedEvent(message="Prediction finished." if not result.cancelled else
                        "Prediction cancelled.", result=result)
    return result


def predict(
    image,
    model,
    config: PredictConfig | dict | None = None,
    *,
    meta: Any = None,
    cancel: CancelToken | None = None,
    **settings: Any,
) -> PredictionResult:
    """Run :func:`predict_iter` to the end and return its result (same arguments)."""
    return drain(predict_iter(image, model, config, meta=meta, cancel=cancel, **settings))


def plan_prediction(
    image,
    model,
    config: PredictConfig | dict | None = None,
    *,
    meta: Any = None,
    probe: bool = True,
    **settings: Any,
) -> TilePlan:
    """The tile plan of a prediction without running it (for a widget to show first).

    With ``probe`` one batch of real tiles is run twice (the first warms the kernels up) to
    measure the time per tile pass and the activation memory. Nothing is written (a store in
    the config is ignored).
    """
    config = _config(config, settings)
    if config.store:
        config = config.replace(store=None)
    run = _Run(image, model, config, meta, CancelToken())
    try:
        for _ in run.setup():
            pass
        if not probe:
            return run.plan
        tiles = list(run.grid)[: run.batch_size]
        view = run.layout.view(image, next(iter(run.layout.plane_indices())))
        batch = run._read_batch(view, run.grid, tiles)
        with contextlib.suppress(_BatchTooBig):
            for _ in run._forward_split(batch):
                pass
        for _ in run._probe(batch):
            pass
        return run.plan
    finally:
        run.restore()
