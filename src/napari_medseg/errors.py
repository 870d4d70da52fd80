"""Project exceptions. Each carries one sentence a person can act on.

The CLI prints ``str(error)`` and exits non-zero; the napari widgets show it as a
notification. Nothing below the interfaces catches these to print a traceback.
"""

from __future__ import annotations

__all__ = [
    "MedsegError",
    "ImageReadError",
    "ImageWriteError",
    "UnsupportedFormatError",
    "ModelNotFoundError",
    "WeightsNotFoundError",
    "CheckpointError",
    "InputShapeError",
    "CancelledError",
    "ConfigError",
]


class MedsegError(Exception):
    """Base class of every error napari-medseg raises on purpose."""


class ImageReadError(MedsegError):
    """A file or folder could not be read as an image."""


class ImageWriteError(MedsegError):
    """An array could not be written to the requested file."""


class UnsupportedFormatError(ImageReadError):
    """The file's format is not one napari-medseg reads or writes."""


class ModelNotFoundError(MedsegError, KeyError):
    """An unknown network or variant name was asked for."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsNotFoundError(MedsegError):
    """A weights tag or checkpoint path does not exist."""


class CheckpointError(MedsegError):
    """A checkpoint is malformed or does not fit the network it claims to be for."""


class InputShapeError(MedsegError, ValueError):
    """An image does not fit what the network or operation expects."""


class CancelledError(MedsegError):
    """A long operation was cancelled by the user."""


class ConfigError(MedsegError, ValueError):
    """A setting (CLI flag, widget value, TOML key) is unknown or has an invalid value."""
