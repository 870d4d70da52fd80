"""The tile predictor: a batch of normalised tiles in, stitchable probabilities out.

:class:`TilePredictor` is the callable the tile loop (:func:`~.tiling.sliding_window_iter`)
runs: ``predictor(batch)`` takes an ``N x C x (tile)`` numpy batch and returns
``(probabilities, boundary)``: ``N x K' x (scale * tile)`` float32 probabilities (sigmoid for
one class, the foreground alone for two, softmax otherwise; plus one variance channel with
flip TTA) and ``N x 1 x (scale * tile)`` boundary probabilities, or None when the boundary
head is not read. It owns everything about the network's forward pass:

* flip TTA (every subset of the spatial axes, :func:`tta_flips`), averaged in fp32;
* autocast precision, ``torch.inference_mode`` and the channels-last memory format;
* NaN or infinite outputs in bf16/fp16: the batch, and the rest of the run, go again in
  fp32 (a warning); in fp32 they are an error;
* out-of-memory recovery inside a batch: the batch is split in halves and the batch size
  kept halved (a notice); a batch of one that does not fit raises :class:`TileTooBig` for
  the caller to shrink the tile or to call :meth:`TilePredictor.fall_back_to_cpu`;
* the probe: its first call (or :meth:`TilePredictor.probe`) measures the activation memory
  (:class:`ActivationMeter` hooks, or CUDA's peak statistics) and the time per pass into
  :attr:`TilePredictor.measured`, and fixes the batch size on a GPU when it is automatic.

Notices are collected in :attr:`TilePredictor.notices` (message, level) for the caller to
send on; the predictor yields no events itself.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from ...errors import MedsegError
from ...models.spec import HEAD_BOUNDARY, HEAD_MASK
from ..device import free_memory
from ..precision import PrecisionPolicy, autocast, resolve_precision
from .normalization import NonFiniteOutputError, check_network_batch

__all__ = [
    "MAX_AUTO_BATCH",
    "GPU_MEMORY_FRACTION",
    "OutOfMemory",
    "TileTooBig",
    "ActivationMeter",
    "Probe",
    "TilePredictor",
    "is_out_of_memory",
    "model_bytes",
    "tta_flips",
]

#: Largest number of tiles a GPU batch gets when the batch size is chosen automatically.
MAX_AUTO_BATCH = 32
#: Fraction of a GPU's free memory the automatic batch size may fill.
GPU_MEMORY_FRACTION = 0.6


class OutOfMemory(MedsegError, MemoryError):
    """Not even one tile of the smallest size fits on the device."""


class TileTooBig(Exception):
    """One tile does not fit on the device (a batch of one ran out of memory)."""


def tta_flips(spatial_dims: int) -> list[tuple[int, ...]]:
    """Flip TTA: every subset of the spatial axes (4 passes in 2D, 8 in 3D)."""
    axes = tuple(range(-spatial_dims, 0))
    flips: list[tuple[int, ...]] = [()]
    for r in range(1, spatial_dims + 1):
        flips.extend(combinations(axes, r))
    return flips


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch running out of device (or host) memory."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text.lower() or "can't allocate memory" in text)


def model_bytes(model) -> int:
    """Bytes of a module's parameters and buffers."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def _empty_cache(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()


class ActivationMeter:
    """Peak bytes of live module outputs during a forward pass, from hooks.

    Each module output tensor is counted once per storage while any tensor using that storage
    is alive (weak references tell when it is freed). It misses temporaries made inside a
    module's forward that are not any module's output, so it is an estimate.

    Args:
        model: the module whose submodules are hooked until :meth:`remove`.
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
        """Unhook the model."""
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclass(frozen=True)
class Probe:
    """What the probe batch measured.

    Attributes:
        bytes_per_sample: activation bytes of one tile (measured, not guessed).
        seconds_per_pass: forward seconds per tile and TTA flip.
    """

    bytes_per_sample: int
    seconds_per_pass: float


class TilePredictor:
    """The network's forward pass over batches of tiles, with TTA and OOM recovery.

    Args:
        model: a registered network (it has a ``spec``); moved to ``device`` here.
        device: the torch device.
        policy: the autocast precision.
        channels_last: run in the channels-last memory format.
        batch_size: tiles per batch (halved on out-of-memory).
        auto_batch: fix the batch size from the probe's measurement (GPU, not asked).
        tta: flip TTA (also gives a variance channel).
        use_boundary: read the boundary head.
        batch_limit: the most tiles one plane has (the automatic batch never exceeds it).
    """

    def __init__(self, model, device, policy: PrecisionPolicy, *, channels_last: bool,
                 batch_size: int, auto_batch: bool = False, tta: bool = False,
                 use_boundary: bool = False, batch_limit: int = MAX_AUTO_BATCH) -> None:
        spec = model.spec
        self.model = model
        self.spec = spec
        self.K = int(spec.num_classes)
        self.binary = self.K == 2
        self.use_boundary = use_boundary
        self.flips = tta_flips(spec.spatial_dims) if tta else [()]
        self.batch_size = int(batch_size)
        self.auto_batch = auto_batch
        self.batch_limit = int(batch_limit)
        self.device = device
        self.policy = policy
        self.channels_last = channels_last
        self.measured: Probe | None = None
        self.forward_seconds = 0.0
        self.probe_passes = 0
        self.notices: list[tuple[str, str]] = []
        self._prepare_model()

    def _prepare_model(self) -> None:
        import torch

        self.model.to(self.device)
        if self.channels_last:
            fmt = torch.channels_last if self.spec.spatial_dims == 2 else torch.channels_last_3d
            self.model.to(memory_format=fmt)

    def _notice(self, message: str, level: str = "info") -> None:
        self.notices.append((message, level))

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Predict a batch; the first call is the probe (measured, its output used)."""
        if self.measured is None:
            output = self.probe(batch)
            self.probe_passes = len(batch) * len(self.flips)
            return output
        t0 = time.perf_counter()
        output = self.forward(batch)
        self.forward_seconds += time.perf_counter() - t0
        return output

    def _forward_once(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities (N x K'(+1 variance) x out) and boundary (N x 1 x out), no split.

        Raises:
            TileTooBig: the batch ran out of memory.
        """
        import torch

        x = torch.from_numpy(batch).to(self.device)
        finite = torch.isfinite(x).all()  # read after the output came back: no extra sync
        if self.channels_last:
            fmt = torch.channels_last if self.spec.spatial_dims == 2 else torch.channels_last_3d
            x = x.contiguous(memory_format=fmt)
        n = x.shape[0]
        expected = (n, self.K) + tuple(int(s) * int(self.spec.output_scale)
                                       for s in batch.shape[2:])
        prob_sum = prob_sq = bnd_sum = None
        try:
            with torch.inference_mode(), autocast(self.device, self.policy):
                for flip in self.flips:
                    out = self.model(torch.flip(x, flip) if flip else x)
                    logits = out[HEAD_MASK]
                    if tuple(logits.shape) != expected:
                        raise RuntimeError(
                            f"The network returned a mask of shape {tuple(logits.shape)}, "
                            f"expected {expected}.")
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
            if is_out_of_memory(exc):
                raise TileTooBig() from exc
            raise
        m = float(len(self.flips))
        probs = prob_sum / m
        if prob_sq is not None:
            var = (prob_sq / m - probs * probs).clamp_min(0.0).mean(dim=1, keepdim=True)
            probs = torch.cat([probs, var], dim=1)
        finite_out = torch.isfinite(probs).all()
        if bnd_sum is not None:
            finite_out = finite_out & torch.isfinite(bnd_sum).all()
        bnd = None if bnd_sum is None else (bnd_sum / m).cpu().numpy()
        probs = probs.cpu().numpy()
        check_network_batch(bool(finite), bool(finite_out), self.policy.name)
        return probs, bnd

    def _forward_in_precision(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`_forward_once`; a batch with NaN or infinite outputs in bf16/fp16 runs again
        in fp32, and so does the rest of the run (with a warning): a lower precision that
        overflows on these weights would on other tiles too.

        Raises:
            NonFiniteOutputError: the outputs are not finite in fp32 either.
        """
        try:
            return self._forward_once(batch)
        except NonFiniteOutputError:
            if self.policy.name == "fp32":
                raise
            was = self.policy.name
            self.policy = PrecisionPolicy("fp32", f"{was} returned NaN or infinite values")
            self._notice(f"The network returned NaN or infinite values in {was} on "
                         f"{self.device}; the run continues in fp32 precision.", "warning")
            return self._forward_once(batch)

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and boundary of a batch (see the class); out of memory splits it.

        On out-of-memory the batch is split in halves and the batch size is halved for the
        batches to come, with a notice.

        Returns:
            ``(probabilities, boundary)``: N x K'(+1 variance) x out, and N x 1 x out or None.

        Raises:
            TileTooBig: a batch of one ran out of memory.
        """
        try:
            return self._forward_in_precision(batch)
        except TileTooBig:
            if len(batch) == 1:
                raise
            _empty_cache(self.device)
            half = len(batch) // 2
            if self.batch_size > half:
                self.batch_size = max(1, half)
                self._notice(f"Out of memory on {self.device}: batch size reduced to "
                             f"{self.batch_size}.", "warning")
            a = self.forward(batch[:half])
            b = self.forward(batch[half:])
            probs = np.concatenate([a[0], b[0]])
            bnd = None if a[1] is None else np.concatenate([a[1], b[1]])
            return probs, bnd

    def probe(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Run one batch measuring memory (hooks or CUDA stats) and time into :attr:`measured`.

        With ``auto_batch`` the batch size becomes what fits the device's free memory (at
        most :data:`MAX_AUTO_BATCH` and ``batch_limit``), with a notice.

        Returns:
            The batch's output (as :meth:`forward`).
        """
        import torch

        meter = ActivationMeter(self.model)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        t0 = time.perf_counter()
        try:
            output = self.forward(batch)
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
        if self.auto_batch:
            free = free_memory(self.device) or 0
            fit = int(free * GPU_MEMORY_FRACTION // per_sample)
            self.batch_size = max(1, min(MAX_AUTO_BATCH, fit, self.batch_limit))
            self._notice(f"Batch size {self.batch_size} fits the free memory of "
                         f"{self.device}.")
        self.measured = Probe(per_sample, seconds / (n * len(self.flips)))
        return output

    def empty_cache(self) -> None:
        """Release the device's cached memory (CUDA)."""
        _empty_cache(self.device)

    def fall_back_to_cpu(self) -> bool:
        """Move the run to the CPU (auto precision, channels-last), with a notice.

        Returns:
            False when it already runs on the CPU (nothing changed).
        """
        import torch

        if self.device.type == "cpu":
            return False
        old = self.device
        self.device = torch.device("cpu")
        self.policy = resolve_precision("auto", self.device)
        self.channels_last = True
        self._prepare_model()
        _empty_cache(old)
        self._notice(f"Out of memory on {old} even with one small tile; continuing on "
                     f"the CPU ({self.policy.name}).", "warning")
        return True
