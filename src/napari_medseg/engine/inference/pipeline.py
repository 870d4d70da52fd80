"""Tiled inference: ``predict_iter`` (a generator of progress events) and ``predict``.

``predict_iter(image, model, config)`` yields typed events (:mod:`..progress`) and *returns*
a :class:`PredictionResult`; its last event, :class:`~..progress.FinishedEvent`, carries the
same result, so both ``result = yield from predict_iter(...)`` and a plain ``for`` loop work.
``predict()`` drains it. The napari widget runs the same generator in a thread worker, the
CLI prints its events with a progress bar.

What happens, in order:

1. **Layout**: the image's axes (from the config, the reader's metadata, or a guess with a
   notice) decide what one network input is: a YX plane (2D network; a volume is sliced along
   ``config.axis``; ``T``/``I`` axes are iterated), or a ZYX block (3D network). The channels
   are converted grey <-> RGB when the network needs it (with a notice), else a wrong channel
   count is an :class:`~napari_medseg.errors.InputShapeError`.
   When the weights declare a pixel size and the image's metadata give another, each plane
   is resampled to it and the outputs come back on the image's grid (:mod:`..pixel_size`,
   with a notice; ``native_pixels`` turns it off).
2. **Input checks**: NaN, infinite pixels or values float32 cannot hold are refused (whole
   in-memory images here, lazy ones per tile); so is a zarr store with no chunk written.
3. **Device and precision**: ``auto`` is cuda > mps > cpu; autocast bf16 on CPUs with native
   bf16 and on bf16-capable GPUs, fp16 on older CUDA, fp32 elsewhere (:mod:`..precision`);
   ``torch.inference_mode``; channels-last on CPU and CUDA.
4. **Plan**: the outputs are sized without allocating them; in-memory outputs larger than
   the memory available are refused (use a zarr store). Then the normalization is fitted once
   on the whole image (percentile 1-99.8 unless the config or the checkpoint's model card
   says otherwise), the outputs are opened and a :class:`~.plan.TilePlan` (tiles, memory,
   and after the first batch the measured time per tile) is sent before the work starts.
   :func:`~.planning.plan_prediction` stops before the normalization: it reads no pixel.
5. **Tiles**: every plane runs the tile loop :func:`~.tiling.sliding_window_iter` (the loop
   the tests prove exact with analytic predictors): tiles are read lazily and batched, the
   :class:`~.predictor.TilePredictor` runs them (flip TTA if asked: 4 passes in 2D, 8 in 3D,
   giving also a ``variance`` output; sigmoid for one class, softmax otherwise, in fp32) and
   band-streaming :class:`~.stitching.Stitcher` s merge them (gaussian for probabilities,
   ``crop`` for the boundary head by default). The :class:`~.writer.OutputWriter` puts the
   finished rows straight into the outputs, a numpy array or a zarr store (:mod:`.sinks`),
   so peak memory is one band, not the volume; each finished slice is recorded in the store,
   and within a slice the rows written so far (after each band): a re-run resumes after
   them.
6. **Post-processing** once all planes are written (:meth:`~.writer.OutputWriter.postprocess`):
   a boundary map derived from the mask (networks without a boundary head), instance labels
   (watershed seeded by mask minus boundary), and for slice-wise volumes a z-consistency
   score; orthogonal consensus first averages its three passes.

A cancel token is checked between batches: a cancelled run returns what it finished (whole
slices, and for a single plane the rows already merged). On GPU out-of-memory the batch is
halved (by the predictor), then the tile, then the run moves to the CPU, with notices.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Generator
from typing import Any

import numpy as np

from ...config import PredictConfig
from ...errors import ConfigError, InputShapeError
from ...io.axes import guess_axes
from ...io.metadata import ImageMeta, output_meta
from ...models.spec import HEAD_BOUNDARY
from ..device import resolve_device
from ..layout import CONVERSION_WORDS, Layout, convert_channels, run_layouts
from ..precision import resolve_precision
from ..progress import (CancelledEvent, CancelToken, FinishedEvent, NoticeEvent, PlaneEvent,
                        PlanEvent, ProgressEvent, StageEvent, TilesEvent, drain)
from . import postprocess
from .object_size import resample_to_diameter
from .normalization import (DEFAULT_NORMALIZATION, check_pixels, fit_normalization,
                            sample_values, window_mismatch)
from .plan import (ACTIVATION_BYTES_PER_PIXEL, TilePlan, band_bytes, memory_shortfall,
                   unwritten_message)
from .result import PredictionResult
from .predictor import OutOfMemory, TilePredictor, TileTooBig, model_bytes, tta_flips
from .sinks import SizingSink
from .stitching import Stitcher
from .tiling import TileGrid, sliding_window_iter
from ..pixel_size import resample_to_weights
from ..seg_task import task_of
from .writer import Consensus, OutputWriter, store_fingerprint

__all__ = ["PredictionResult", "OutOfMemory", "predict_iter", "predict", "tta_flips",
           "with_weights_defaults"]

#: Out-of-memory recovery halves the tile while it stays at least this big.
MIN_OOM_TILE = 32


def with_weights_defaults(config: PredictConfig, model) -> PredictConfig:
    """``config`` with the settings it leaves to the weights decided by ``model``: flip TTA
    (None) on where the weights' task was tuned with it (:class:`~..seg_task.SegTask`)."""
    if config.tta is None:
        config = config.replace(tta=task_of(model).tta)
    return config


class _Run:
    """One prediction: setup, plan, the plane loop over the tile loop, and the result."""

    def __init__(self, image, model, config: PredictConfig, meta: Any, cancel: CancelToken):
        if config.super_resolved:
            from ...models.working_resolution import super_resolved

            model = super_resolved(model)
        self.image = image
        self.model = model
        self.config = config = with_weights_defaults(config, model)
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
        # The boundary head is read (and stitched) only for the outputs that use it; with the
        # instance task the boundary is the boundary class (BA-Net's edge head only helped
        # it learn).
        self.use_boundary = self.has_boundary and bool(
            set(config.outputs) & {"boundary", "instances"}) and not task_of(model).instances
        # Two classes: only the foreground probability is stitched. Blending is linear and
        # the weights sum to one, so the background is exactly 1 - foreground after the stitch
        # too; this halves the stitch and the copies. softmax(l)[1] == sigmoid(l1 - l0).
        self.stitched = 1 if self.K == 2 else self.K
        self.n_flips = len(tta_flips(self.spec.spatial_dims)) if config.tta else 1
        self.passes_done = 0
        #: the plan's time per pass is from batches after the probe (no warm-up in it).
        self.steady_timing = False
        self.t_start = time.perf_counter()
        self.plan: TilePlan | None = None
        self.predictor: TilePredictor | None = None
        self.writer: OutputWriter | None = None
        self._was_training = bool(model.training)

    def notice(self, message: str, level: str = "info") -> NoticeEvent:
        """Record a notice for the result and make its event."""
        self.notices.append(message)
        return NoticeEvent(message=message, level=level)

    def predictor_notices(self) -> Generator[ProgressEvent, None, None]:
        """Send on the notices the tile predictor collected."""
        pending, self.predictor.notices = self.predictor.notices, []
        for message, level in pending:
            yield self.notice(message, level)

    # -- setup --------------------------------------------------------------------------
    def setup(self, plan_only: bool = False) -> Generator[ProgressEvent, None, None]:
        """Layout, input checks, device, tile grid and the outputs' size (a plan); unless
        ``plan_only`` (no pixel read), then normalization, the outputs and the plan.

        Raises:
            OutOfMemory: in-memory outputs over the memory budget (``memory_fraction`` of
                the memory available now).
            InputShapeError: a store array none of whose chunks is written.
        """
        yield from self._layouts()
        self._check_input(read_pixels=not plan_only)
        if not plan_only and (empty := unwritten_message(self.image, self.meta)):
            raise InputShapeError(empty)
        yield from self._object_size(read_pixels=not plan_only)
        yield from self._device()
        yield from self._tiling()
        self._open_writer(SizingSink())  # sized before any work; nothing allocated
        self.plan = self._make_plan()
        if plan_only:
            return
        shortfall = memory_shortfall(self.held_bytes(bool(self.config.store)),
                                     self.config.memory_fraction)
        if shortfall is not None:
            raise OutOfMemory(shortfall)
        yield from self._normalization()
        self._open_writer()
        if self.writer.resumed:
            rows = self.writer.sink.rows
            part = "".join(f", and {n} rows of slice {p + 1}" for p, n in sorted(rows.items()))
            yield self.notice(f"Resuming: {len(self.writer.finished)} of "
                              f"{self.layout.n_planes} slice(s) are already in the store{part}.")
        self.plan = self._make_plan()

    def _layouts(self) -> Generator[ProgressEvent, None, None]:
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
        self.layouts = run_layouts(shape, axes, spec.spatial_dims, spec.in_channels, cfg.axis,
                                   cfg.channels, cfg.volume_mode, self.scale)
        self.layout = self.layouts[0]
        conv = self.layout.conversion
        if conv is not None:
            yield self.notice(f"The network takes {spec.in_channels} channel(s); converting the "
                              f"image from {CONVERSION_WORDS[conv]}.")
        self.axes = axes
        yield from self._resampling(axes)

    def _resampling(self, axes: str) -> Generator[ProgressEvent, None, None]:
        """Each plane at the weights' pixel size, when the weights declare one and the
        image's metadata give another (:func:`..pixel_size.resample_to_weights`)."""
        self.zooms = None
        if self.config.native_pixels or self.scale != 1:
            return
        model, self.zooms, message = resample_to_weights(
            self.model, self.meta, axes, [lay.plane_axes for lay in self.layouts])
        if message:
            self.model, self.spec = model, model.spec
            yield self.notice(message)

    def _object_size(self, read_pixels: bool) -> Generator[ProgressEvent, None, None]:
        """Each plane resampled so the objects reach the network at the size its weights
        learnt, when they record one and no pixel size resampled it already
        (:func:`.object_size.resample_to_diameter`)."""
        trained = task_of(self.model).object_diameter
        if (not trained or self.zooms or self.config.native_pixels or self.scale != 1
                or self.spec.spatial_dims != 2):
            return
        model, zoom, message = resample_to_diameter(
            self.model, self.image, self.axes, self.layout.plane_axes, self.config, trained,
            read_pixels=read_pixels)
        if zoom is not None:
            self.model, self.spec = model, model.spec
        if message:
            yield self.notice(message)

    def _check_input(self, read_pixels: bool = True) -> None:
        if "variance" in self.config.outputs and not self.config.tta:
            raise ConfigError("The variance output comes from TTA; turn TTA on to get it.")
        # NaN/inf: checked here for in-memory images, per tile for lazy ones.
        self.float_input = np.issubdtype(np.dtype(self.image.dtype), np.floating)
        self.check_tiles = self.float_input and not isinstance(self.image, np.ndarray)
        if read_pixels and self.float_input and not self.check_tiles:
            check_pixels(self.image)  # NaN, inf, or beyond float32's range (integers fit)

    def _normalization(self) -> Generator[ProgressEvent, None, None]:
        """Fitted once on the whole image (a regular subsample of it)."""
        norm = self.config.normalization
        if norm is None:
            info = getattr(self.model, "checkpoint_info", None)
            norm = info.normalization_config() if info is not None else None
        self.norm_config = norm or DEFAULT_NORMALIZATION
        yield StageEvent(message="Fitting the intensity normalization.", stage="normalizing")
        samples = sample_values(self.image, self.layout.channel_axis)
        samples = convert_channels(samples, self.layout.conversion)
        self.stats = fit_normalization(samples, self.norm_config)
        if (mismatch := window_mismatch(samples, self.norm_config)) is not None:
            yield self.notice(mismatch, "warning")
        # The image's identity for resuming: a hash of the same regular subsample.
        self.content_id = hashlib.sha256(np.ascontiguousarray(samples).tobytes()).hexdigest()

    def _device(self) -> Generator[ProgressEvent, None, None]:
        """Device, precision, memory format, batch size: the tile predictor."""
        cfg = self.config
        device = resolve_device(cfg.device)
        policy = resolve_precision(cfg.precision, device)
        if policy.notice:
            yield self.notice(policy.notice, "warning")
        channels_last = (cfg.channels_last if cfg.channels_last is not None
                         else device.type in ("cpu", "cuda"))
        auto = device.type == "cuda" and cfg.batch_size is None
        # On a GPU without a batch size the probe measures; the real batch follows from it.
        batch_size = 1 if auto else int(cfg.batch_size or self.spec.cpu_batch_size)
        self.model.eval()
        self.predictor = TilePredictor(
            self.model, device, policy, channels_last=channels_last, batch_size=batch_size,
            auto_batch=auto, tta=cfg.tta, use_boundary=self.use_boundary)

    def grid_for(self, tile, layout: Layout) -> TileGrid:
        """The tile grid of one plane of ``layout`` for a requested tile."""
        t = self.config.tiling
        return TileGrid.build(layout.plane_shape, tile, t.overlap, self.spec.divisor,
                              self.spec.min_size, self.scale, balance=t.balance)

    def _set_grid(self, tile) -> None:
        self.tile_request = tile
        self.grid = self.grid_for(tile, self.layout)
        self.predictor.batch_limit = len(self.grid)

    def _tiling(self) -> Generator[ProgressEvent, None, None]:
        cfg, spec = self.config, self.spec
        requested = cfg.tiling.tile if cfg.tiling.tile is not None else spec.preferred_tile
        self._set_grid(requested)
        asked = (requested,) * len(self.grid.tile) if isinstance(requested, int) else tuple(
            requested)
        if len(asked) == 1:
            asked = asked * len(self.grid.tile)
        # Only the user's tile clamped to a smaller image is news; balanced tiles and the
        # automatic one (a resampled network's grows by the zoom) shrink by design.
        if cfg.tiling.tile is not None and any(
                t < a and p < a for t, a, p in zip(self.grid.tile, asked, self.layout.plane_shape)):
            yield self.notice(
                f"The tile {'x'.join(map(str, asked))} is larger than the image "
                f"({'x'.join(map(str, self.layout.plane_shape))}); using "
                f"{'x'.join(map(str, self.grid.tile))}.")
        factor = spec.input_downsample // int(spec.extra.get("super_resolution", 1))
        # The user's tile, not the balanced one: the automatic tile must not warn.
        if factor > 1 and min(asked) < min(spec.preferred_tile, *self.layout.plane_shape):
            yield self.notice(
                f"These weights work at 1/{factor} resolution, so a "
                f"{'x'.join(map(str, self.grid.tile))} tile gives the network only "
                f"{min(self.grid.tile) // factor} pixels of context; the automatic tile "
                f"({spec.preferred_tile}) segments large objects much better.", "warning")
        if cfg.tta:
            yield self.notice(f"TTA is on: {self.n_flips} forward passes per tile "
                              f"({self.n_flips}x the time).")

    def _open_writer(self, sink: SizingSink | None = None) -> None:
        consensus = None
        if len(self.layouts) > 1 and sink is None:
            consensus = Consensus.zeros(
                self.layout.out_shape(), self.stitched, len(self.layouts),
                postprocess.mask_dtype(self.K), self.use_boundary, self.config.tta)
        self.writer = OutputWriter(
            self.config, self.layout, self.K, self.scale, self.use_boundary,
            lambda: store_fingerprint(self.image, self.layout, self.content_id, self.model,
                                      self.config, self.stats.to_dict()),
            self.meta, consensus, sink, task_of(self.model))

    def consensus_bytes(self) -> int:
        """Memory of the orthogonal passes' sums (held even when streaming to a store)."""
        if len(self.layouts) == 1:
            return 0
        return math.prod(self.layout.out_shape()) * (self.stitched * 4 + 3)

    def held_bytes(self, streamed: bool) -> int:
        """What the run holds in memory besides one band: the outputs (unless streamed to a
        store) and the orthogonal consensus sums; the plan must be made."""
        return self.consensus_bytes() if streamed else self.plan.output_bytes

    def _make_plan(self) -> TilePlan:
        lay, pred = self.layout, self.predictor
        output_bytes = self.writer.memory_bytes() + self.consensus_bytes()
        half = pred.policy.name in ("bf16", "fp16")
        guess = pred.batch_size * math.prod(self.grid.tile) * ACTIVATION_BYTES_PER_PIXEL
        notes = []
        if len(self.layouts) > 1:
            notes.append("Orthogonal consensus: three passes (YX, ZX, ZY) averaged.")
        return TilePlan(
            image_shape=tuple(int(s) for s in self.image.shape), axes=lay.axes,
            plane_axes=lay.plane_axes, stack_axes=lay.stack_axes, grid=self.grid,
            planes=lay.n_planes, planes_todo=lay.n_planes - len(self.writer.finished),
            passes=len(self.layouts), tta_flips=self.n_flips, batch_size=pred.batch_size,
            device=str(pred.device), precision=pred.policy.name,
            channels_last=pred.channels_last, model_bytes=model_bytes(self.model),
            band_bytes=band_bytes(self.grid, self.stitched + (1 if self.config.tta else 0),
                                  self.use_boundary), output_bytes=output_bytes,
            activation_bytes=guess // (2 if half else 1), notes=tuple(notes + self.notices),
        )

    def measured_plan(self) -> PlanEvent:
        """Put the probe's measurement (and the notices so far) in the plan."""
        pred = self.predictor
        steady = self.passes_done - pred.probe_passes
        self.steady_timing = steady > 0 and pred.forward_seconds > 0
        seconds = (pred.forward_seconds / steady if self.steady_timing
                   else pred.measured.seconds_per_pass)
        self.plan = self.plan.replace(
            activation_bytes=pred.measured.bytes_per_sample * pred.batch_size,
            seconds_per_pass=seconds, probed=True,
            batch_size=pred.batch_size, device=str(pred.device), precision=pred.policy.name,
            notes=tuple(self.plan.notes) + tuple(
                m for m in self.notices if m not in self.plan.notes))
        return PlanEvent(message=self.plan.describe(), plan=self.plan, probed=True)

    # -- tiles --------------------------------------------------------------------------
    def prepare_tile(self, block: np.ndarray) -> np.ndarray:
        """A tile as the network takes it: checked for NaN (lazy images) and normalised."""
        if self.check_tiles:
            check_pixels(block)
        return self.stats.apply(block, 0)

    # -- the plane loop -----------------------------------------------------------------
    def _plane(self, layout: Layout, plane: int,
               stack_index: tuple[int, ...]) -> Generator[ProgressEvent, None, bool]:
        """Predict one plane; on a tile too big for the device, recover and start it again.

        Returns:
            False when cancelled before the plane finished.
        """
        while True:
            try:
                return (yield from self._plane_once(layout, plane, stack_index))
            except TileTooBig:
                yield from self._recover_from_oom()

    def _plane_once(self, layout: Layout, plane: int,
                    stack_index: tuple[int, ...]) -> Generator[ProgressEvent, None, bool]:
        t = self.config.tiling
        grid = self.grid if layout is self.layout else self.grid_for(self.tile_request, layout)
        resume = self.writer.rows_done(plane)  # a plane a killed run left half written
        emit_probs, emit_boundary = self.writer.plane_writers(layout, stack_index, plane,
                                                              self.use_boundary)
        # float32 accumulators: a 2048 x 2048 SASR-Net stitch (4096 x 4096 out) took 0.07 s
        # against 0.17-0.32 s in float64, and the probabilities differ by float32 rounding
        # (about 1e-7); the 3D band of a volume network is halved too.
        acc = np.float32
        channels = self.stitched + (1 if self.n_flips > 1 else 0)
        stitch_p = Stitcher(grid, channels, emit_probs, t.blend, t.sigma_scale, t.min_weight, acc,
                            resume_row=resume)
        stitch_b = Stitcher(grid, 1, emit_boundary, t.boundary_blend, t.sigma_scale,
                            t.min_weight, acc, resume_row=resume) if self.use_boundary else None
        loop = sliding_window_iter(
            layout.view(self.image, stack_index), grid, self.predictor, (stitch_p, stitch_b),
            batch_size=lambda: self.predictor.batch_size, padding=t.padding,
            prepare=self.prepare_tile, cancelled=lambda: self.cancel.cancelled,
            resume_row=resume)
        while True:
            try:
                tiles = next(loop)
            except StopIteration as stop:
                return stop.value
            yield from self._batch_done(tiles, plane, layout.n_planes)

    def _batch_done(self, tiles: int, plane: int,
                    planes: int) -> Generator[ProgressEvent, None, None]:
        """Events after a batch: the predictor's notices, the probed plan, the progress."""
        pred = self.predictor
        yield from self.predictor_notices()
        self.passes_done += tiles * self.n_flips
        if pred.measured is not None and not self.plan.probed:
            yield self.measured_plan()
        elif self.plan.probed and not self.steady_timing and (
                self.passes_done > pred.probe_passes):
            # the probe batch carries one-off warm-up costs (the first batch on CPU took
            # 15x a later one): the plan's time per pass is re-measured without it
            yield self.measured_plan()
        elapsed = time.perf_counter() - self.t_start
        total = self.plan.forward_passes
        rate = pred.forward_seconds / max(1, self.passes_done - pred.probe_passes) if (
            self.passes_done > pred.probe_passes) else self.plan.seconds_per_pass
        eta = None if rate is None else rate * max(0, total - self.passes_done)
        yield TilesEvent(done=self.passes_done, total=total, plane=plane, planes=planes,
                         elapsed_s=elapsed, eta_s=eta)

    def _recover_from_oom(self) -> Generator[ProgressEvent, None, None]:
        """A batch of one did not fit: a smaller tile, else the CPU, else give up."""
        pred = self.predictor
        pred.empty_cache()
        yield from self.predictor_notices()
        tile = self.grid.tile
        smaller = tuple(max(self.spec.min_size, t // 2) for t in tile)
        smaller = tuple(self.spec.valid_size(s) if s % self.spec.divisor else s for s in smaller)
        floor = max(self.spec.min_size, MIN_OOM_TILE)
        if self.config.oom_fallback and smaller != tile and min(smaller) >= floor:
            self._set_grid(smaller)
            yield self.notice(f"Out of memory on {pred.device} with one tile: tile reduced to "
                              f"{'x'.join(map(str, self.grid.tile))}.", "warning")
            return
        if self.config.oom_fallback and pred.fall_back_to_cpu():
            yield from self.predictor_notices()
            return
        raise OutOfMemory(
            f"Out of memory on {pred.device} even with one tile of "
            f"{'x'.join(map(str, tile))}; free memory or choose a smaller tile.")

    def _planes(self) -> Generator[ProgressEvent, None, tuple[bool, list[int]]]:
        """Every plane of every layout (passes); returns (cancelled, planes done)."""
        done: list[int] = sorted(self.writer.finished)
        consensus = self.writer.consensus
        for p, layout in enumerate(self.layouts):
            if consensus is not None:
                consensus.index = p
            if self.zooms:  # each orthogonal pass its own zoom
                self.model.zoom = self.zooms[p]
            for plane, stack_index in enumerate(layout.plane_indices()):
                if consensus is None and plane in self.writer.finished:
                    yield PlaneEvent(plane=plane, planes=layout.n_planes, skipped=True)
                    continue
                if not (yield from self._plane(layout, plane, stack_index)):
                    return True, done
                if consensus is None:
                    self.writer.sink.mark_finished(plane)
                    done.append(plane)
                yield PlaneEvent(plane=plane, planes=layout.n_planes)
                if self.cancel.cancelled:
                    last = plane == layout.n_planes - 1 and p == len(self.layouts) - 1
                    return not last, done
        return False, done

    # -- the whole run --------------------------------------------------------------------
    def run(self) -> Generator[ProgressEvent, None, PredictionResult]:
        """Setup, plan, planes, post-processing; returns the result."""
        yield from self.setup()
        yield PlanEvent(message=self.plan.describe(), plan=self.plan, probed=False)
        self.t_start = time.perf_counter()
        yield StageEvent(message="Predicting.", stage="predicting")
        cancelled, done = yield from self._planes()
        stats: dict[str, Any] = {}
        if self.writer.consensus is not None and not cancelled:
            yield StageEvent(message="Averaging the three planes.", stage="consensus")
            stats["plane_agreement"] = self.writer.finish_consensus()
            done = list(range(self.layout.n_planes))
        if cancelled:
            yield self.notice(f"Cancelled; {len(done)} of {self.layout.n_planes} slice(s) "
                              "finished are kept.", "warning")
        else:
            yield from self.writer.postprocess(stats, self.has_boundary)
        result = self._result(stats, cancelled, done)
        self.writer.close(not cancelled, stats)
        if cancelled:
            yield CancelledEvent(message="Prediction cancelled.", planes_done=result.planes_done)
        return result

    def _result(self, stats: dict, cancelled: bool, done: list[int]) -> PredictionResult:
        pred = self.predictor
        stats.update({
            "seconds": round(time.perf_counter() - self.t_start, 4),
            "forward_seconds": round(pred.forward_seconds, 4),
            "forward_passes": self.passes_done, "device": str(pred.device),
            "precision": pred.policy.name, "batch_size": pred.batch_size,
            "tile": list(self.grid.tile), "tta_flips": self.n_flips,
            "normalization": {"config": self.norm_config.to_dict(),
                              "fitted": self.stats.to_dict()},
        })
        outputs, axes = self.writer.outputs()
        lay = self.layout
        return PredictionResult(
            outputs=outputs, axes=axes, plan=self.plan, stats=stats, cancelled=cancelled,
            planes_done=tuple(sorted(done)), notices=tuple(self.notices),
            store=str(self.config.store) if self.config.store else None, scale=self.scale,
            meta=output_meta(self.meta if isinstance(self.meta, ImageMeta) else None,
                             lay.axes, lay.shape, lay.out_axes, lay.out_shape(self.scale)),
        )

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
            else guessed (see :func:`~napari_medseg.io.axes.guess_axes`).
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
