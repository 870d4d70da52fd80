"""A mend for bioimageio.spec releases before 0.5.14 under a newer pydantic (2.14 here).

Those releases call pydantic's serializer handler as ``handler(value, info)`` in three wrap
serializers (a packaged file, the weights, a validated string); newer pydantic reads the
second argument as an index key and refuses a ``SerializationInfo``, so no model with weights
can be described, written or re-read. bioimageio.core pins such a release (0.11.0 pins
bioimageio.spec 0.5.12.0); bioimageio.spec 0.5.14 calls ``handler(value)``.

:func:`mend_spec` leaves each of those functions' own code in place and only hands it a
handler that drops a ``SerializationInfo`` given as index key, once per process. Where the
installed release does not have the functions, or pydantic still takes the old call, it
changes nothing that matters (the handler passes every other call through).
"""

from __future__ import annotations

import types

__all__ = ["mend_spec"]

_TARGETS = (
    ("bioimageio.spec._internal.io_packaging", "package_file_descr_serializer"),
    ("bioimageio.spec.model.v0_4", "package_weights"),
    ("bioimageio.spec._internal.validated_string_with_inner_node",
     "ValidatedStringWithInnerNode._serialize"),
)
_MENDED = False


class _Handler:
    """pydantic's wrap-serializer handler, called as ``handler(value)`` when given
    ``handler(value, info)``."""

    def __init__(self, handler) -> None:
        self._handler = handler

    def __call__(self, value, *rest):
        if rest and type(rest[0]).__name__ == "SerializationInfo":
            rest = rest[1:]
        return self._handler(value, *rest)

    def __getattr__(self, name):
        return getattr(self._handler, name)


def _mend(module, path: str) -> None:
    owner, _, name = path.rpartition(".")
    holder = getattr(module, owner) if owner else module
    function = getattr(holder, name, None)
    code = getattr(function, "__code__", None)
    if code is None or code.co_argcount != 3 or code.co_varnames[1] != "handler":
        return
    key = f"_medseg_unmended_{name.strip('_')}"
    function.__globals__[key] = types.FunctionType(
        code, function.__globals__, function.__name__, function.__defaults__,
        function.__closure__)
    function.__globals__["_medseg_handler"] = _Handler
    first, _, third = code.co_varnames[:3]
    source = (f"def wrapper({first}, handler, {third}):\n"
              f"    return {key}({first}, _medseg_handler(handler), {third})\n")
    namespace: dict = {}
    exec(compile(source, f"<mend of {path}>", "exec"), namespace)  # noqa: S102 - our own text
    function.__code__ = namespace["wrapper"].__code__


def mend_spec() -> None:
    """Make the installed bioimageio.spec (de)serialize model descriptions under this
    pydantic (see the module's docstring)."""
    global _MENDED
    if _MENDED:
        return
    _MENDED = True
    import importlib

    for module_name, path in _TARGETS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        _mend(module, path)
