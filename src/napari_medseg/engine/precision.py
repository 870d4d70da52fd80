"""The dtype policy: which autocast precision a device runs inference in.

``auto`` picks:

* **bf16** on CPUs with native bf16 instructions (AVX512-BF16 or AMX; on this project's
  reference CPU bf16 autocast with channels-last ran a U-Net 5x faster than fp32) and on CUDA
  GPUs of compute capability 8.0 or newer (Ampere, Hopper, ...);
* **fp16** on older CUDA GPUs with tensor cores (compute capability 7.x);
* **fp32** everywhere else: CPUs without native bf16 (emulated bf16 is slower than fp32),
  Apple MPS (bf16 there fails or falls back silently on some macOS versions), older GPUs.

An explicit ``bf16``/``fp16`` is honoured on any device, with a notice when it is emulated.
Autocast keeps numerically sensitive ops (softmax, reductions) in fp32; the engine also applies
the final activation in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = [
    "PRECISIONS",
    "PrecisionPolicy",
    "cpu_has_native_bf16",
    "cuda_capability",
    "resolve_precision",
    "autocast",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class PrecisionPolicy:
    """The precision chosen for a device.

    Attributes:
        name: ``fp32``, ``bf16`` or ``fp16``.
        reason: one line on why (shown in the plan).
        notice: a warning to show the user, or None.
    """

    name: str
    reason: str
    notice: str | None = None

    @property
    def dtype(self):
        """The autocast ``torch.dtype``, or None for fp32 (no autocast)."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (x86 AVX512-BF16 / AMX-BF16)."""
    if platform.system() == "Linux":
        try:
            text = Path("/proc/cpuinfo").read_text(errors="ignore")
        except OSError:
            return False
        for line in text.splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return bool({"avx512_bf16", "amx_bf16"} & flags)
        return False
    return False


def cuda_capability(device) -> tuple[int, int] | None:
    """Compute capability of a CUDA device, None for other devices."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def resolve_precision(requested: str, device) -> PrecisionPolicy:
    """The precision for ``device`` under the policy of this module.

    Args:
        requested: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        device: a ``torch.device``.

    Raises:
        ConfigError: an unknown precision name.
    """
    requested = str(requested).strip().lower()
    if requested not in PRECISIONS:
        raise ConfigError(
            f"Precision {requested!r} is unknown; choose one of {', '.join(PRECISIONS)}."
        )
    kind = getattr(device, "type", str(device))
    native_bf16 = False
    if kind == "cpu":
        native_bf16 = cpu_has_native_bf16()
    cap = cuda_capability(device) if kind == "cuda" else None
    if kind == "cuda" and cap is not None:
        native_bf16 = cap >= (8, 0)
    if requested == "fp32":
        return PrecisionPolicy("fp32", "fp32 as asked")
    if requested == "bf16":
        notice = None if native_bf16 else (
            f"bf16 is emulated on this {kind.upper()}; it will likely be slower than fp32.")
        return PrecisionPolicy("bf16", "bf16 as asked", notice)
    if requested == "fp16":
        notice = None
        if kind == "cpu":
            notice = "fp16 on the CPU is emulated and slow; bf16 or fp32 suit a CPU better."
        return PrecisionPolicy("fp16", "fp16 as asked", notice)
    # auto
    if kind == "cpu":
        if native_bf16:
            return PrecisionPolicy("bf16", "the CPU has native bf16 (AVX512-BF16/AMX)")
        return PrecisionPolicy("fp32", "the CPU lacks native bf16")
    if kind == "cuda":
        if cap is not None and cap >= (8, 0):
            return PrecisionPolicy("bf16", f"CUDA compute capability {cap[0]}.{cap[1]} runs bf16")
        if cap is not None and cap >= (7, 0):
            return PrecisionPolicy("fp16", f"CUDA compute capability {cap[0]}.{cap[1]}: fp16")
        return PrecisionPolicy("fp32", "an older CUDA GPU")
    return PrecisionPolicy("fp32", f"{kind} runs fp32 by default")


def autocast(device, policy: PrecisionPolicy) -> Any:
    """A context manager running the forward pass in ``policy``'s precision on ``device``."""
    import torch

    dtype = policy.dtype
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
