"""PNG, JPEG and BMP images through Pillow (2-D only; no physical pixel size).

Grey images come back as ``YX``; colour as ``YXC`` with ``meta.rgb``. Palette images (mode
``P``, common for label masks) keep their palette indices as ``YX``. Writing is for 2-D
label images and grey/RGB uint8 images, to PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageReadError, ImageWriteError
from .metadata import ImageMeta
from .messages import brief

__all__ = ["read_raster", "write_raster"]


def read_raster(path: str | os.PathLike) -> tuple[np.ndarray, ImageMeta]:
    """Read a PNG, JPEG or BMP image.

    Args:
        path: the image file.

    Returns:
        ``(array, meta)``: ``YX`` (grey, 16-bit grey, palette indices) or ``YXC`` (RGB, RGBA).

    Raises:
        ImageReadError: the file is truncated or not decodable.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    try:
        with Image.open(p) as img:
            img.load()
            mode = img.mode
            fmt = img.format
            if mode in ("LA", "PA"):
                img = img.convert("L" if mode == "LA" else "P")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
                img = img.convert("RGB")
            data = np.array(img)
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{p} is not a readable PNG/JPEG/BMP image.") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{p} is truncated or damaged and cannot be decoded ({brief(exc)}).") from exc
    if data.dtype == bool:
        data = data.astype(np.uint8)
    extra: dict[str, Any] = {"format": "raster", "pil_mode": mode, "pil_format": fmt}
    if data.ndim == 2:
        axes, rgb = "YX", False
        if mode in ("P", "PA"):
            extra["palette_indices"] = True
    elif data.ndim == 3 and data.shape[-1] in (3, 4):
        axes, rgb = "YXC", True
    else:
        raise ImageReadError(f"{p} decodes to an unexpected shape {data.shape}.")
    return data, ImageMeta(axes=axes, source=str(p), rgb=rgb, extra=extra)


def write_raster(path: str | os.PathLike, array: Any, meta: ImageMeta) -> Path:
    """Write a 2-D image or label image as PNG.

    Args:
        path: target ``.png``.
        array: ``YX`` uint8/uint16 (labels up to 65535; other integer types are converted
            when their values fit) or ``YXC`` uint8 RGB/RGBA.
        meta: its metadata (PNG keeps no spacing, so only the axes are used).

    Returns:
        The path written.

    Raises:
        ImageWriteError: the array is not 2-D or its values do not fit 16 bits.
    """
    from PIL import Image

    p = Path(path)
    data = np.asarray(array)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if meta.spatial_dims != 2 or data.ndim not in (2, 3) or "T" in meta.axes or "I" in meta.axes:
        raise ImageWriteError(f"Cannot write {p}: PNG holds one 2-D image, not axes {meta.axes!r}.")
    if data.ndim == 3 and not (data.shape[-1] in (3, 4) and data.dtype == np.uint8):
        raise ImageWriteError(
            f"Cannot write {p}: colour PNGs need uint8 RGB or RGBA, got {data.dtype} {data.shape}."
        )
    if data.ndim == 2 and data.dtype not in (np.uint8, np.uint16):
        if not np.issubdtype(data.dtype, np.integer):
            raise ImageWriteError(
                f"Cannot write {p}: PNG holds integers, got {data.dtype}; use TIFF instead."
            )
        lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageWriteError(
                f"Cannot write {p}: its values span {lo}..{hi}, beyond PNG's 16-bit range; use TIFF instead."
            )
        data = data.astype(np.uint8 if hi <= 255 else np.uint16)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(data)).save(p, format="PNG")
    except Exception as exc:  # noqa: BLE001
        raise ImageWriteError(f"Cannot write {p}: {brief(exc)}.") from exc
    return p
