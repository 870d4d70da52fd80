"""Frozen configuration dataclasses (filled in by the engine work)."""

__all__: list[str] = []
