"""Which torch device runs a job: ``auto`` (cuda > mps > cpu) or an explicit name.

A device that is asked for but absent is an error naming the ones there are; nothing falls
back silently. :func:`list_devices` gives each device with its free memory for a picker.
"""

from __future__ import annotations

import platform
import re
from typing import Any

from ..errors import MedsegError

__all__ = ["DeviceError", "available_devices", "list_devices", "resolve_device", "free_memory"]


class DeviceError(MedsegError, ValueError):
    """A device name is not valid or not present on this machine."""


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """Names of the usable devices: ``cpu``, ``cuda:0``..., ``mps``."""
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return names


def list_devices() -> list[dict[str, Any]]:
    """Each device with a description and, for CUDA, total and free memory in MiB."""
    import torch

    devices: list[dict[str, Any]] = [{
        "name": "cpu",
        "description": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append({
                "name": f"cuda:{i}",
                "description": torch.cuda.get_device_name(i),
                "total_memory_mb": total // 2**20,
                "free_memory_mb": free // 2**20,
            })
    if _mps_available():
        devices.append({"name": "mps", "description": "Apple Metal"})
    return devices


def resolve_device(name: str | Any = "auto"):
    """A ``torch.device`` for ``name``.

    Args:
        name: ``auto`` (cuda:0 > mps > cpu), ``cpu``, ``cuda``, ``cuda:N``, ``mps``, or a
            ``torch.device``.

    Raises:
        DeviceError: the name is malformed or the device is not present.
    """
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    text = str(name or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "gpu":
        text = "cuda"
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", text)
    if match is None:
        raise DeviceError(
            f"Device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps."
        )
    kind, index = match.group(1), match.group(2)
    present = available_devices()
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if "mps" not in present:
            raise DeviceError(
                f"Device 'mps' is not available here; available devices: {', '.join(present)}."
            )
        return torch.device("mps")
    i = int(index or 0)
    if f"cuda:{i}" not in present:
        raise DeviceError(
            f"Device {text!r} is not available here; available devices: {', '.join(present)}."
        )
    return torch.device("cuda", i)


def free_memory(device) -> int | None:
    """Free bytes on a CUDA device; None for the CPU and MPS (not measurable cheaply)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return None
