"""Turning a library's exception into a short, one-line fragment of our error sentences."""

from __future__ import annotations

__all__ = ["brief"]

_MAX_CHARS = 200


def brief(exc: BaseException) -> str:
    """``"TypeName: message"`` on one line, cut to 200 characters.

    Library messages often span lines or end with advice that does not fit a user; this
    keeps them as the parenthesised detail of a sentence of our own.
    """
    text = " ".join(str(exc).split()).rstrip(".")
    if len(text) > _MAX_CHARS:
        text = text[: _MAX_CHARS - 3].rstrip() + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
