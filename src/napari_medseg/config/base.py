"""The one door of every setting: ``ConfigBase.from_mapping`` and its coercion rules.

CLI flags, widget values and TOML files all go through ``from_mapping()``:

    cfg = PredictConfig.from_mapping({"tile": "256", "overlap": 0.5, "outputs": "mask,boundary"})
    cfg = PredictConfig.from_mapping(load_toml("run.toml", section="predict"))

``from_mapping`` coerces strings (as they come from a command line or a text field) to the
field's type, routes flat keys to nested configs (``tile`` -> ``tiling.tile``), rejects unknown
keys and values outside a field's choices with one :class:`~napari_medseg.errors.ConfigError`
sentence. Values in a mapping equal to ``None`` mean "not given" and keep the default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ..errors import ConfigError

__all__ = ["ConfigBase", "choices", "config_from_mapping", "load_toml"]

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}
_NONE = {"none", "auto", "null", ""}

C = TypeVar("C", bound="ConfigBase")


def choices(*values: str) -> dict[str, Any]:
    """Field metadata that limits a text field to ``values`` (matched in any letter case).

    Use as ``field(default=..., metadata=choices("a", "b"))``.
    """
    return {"choices": tuple(values)}


class ConfigBase:
    """Mixin of the config dataclasses: ``from_mapping``, ``to_dict`` and ``replace``.

    Attributes:
        shorthand: the field a bare string stands for when a whole config is expected
            (``"zscore"`` for a normalization means ``{"mode": "zscore"}``); None: no
            shorthand.
    """

    shorthand: ClassVar[str | None] = None

    @classmethod
    def from_mapping(cls: type[C], mapping: Mapping[str, Any] | None = None, **extra: Any) -> C:
        """Build the config from a (possibly nested, possibly flat) mapping of settings.

        Args:
            mapping: settings by field name; strings are coerced to the field's type.
            **extra: more settings, applied after ``mapping``.

        Raises:
            ConfigError: an unknown key or an invalid value.
        """
        merged = dict(mapping or {})
        merged.update(extra)
        return config_from_mapping(cls, merged)

    def to_dict(self) -> dict[str, Any]:
        """A JSON/TOML-friendly dict (tuples become lists, nested configs dicts)."""
        return _plain(dataclasses.asdict(self))  # type: ignore[call-overload]

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (coerced and validated like ``from_mapping``)."""
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        current = {f.name: getattr(self, f.name) for f in fields}
        current.update(changes)
        return config_from_mapping(type(self), current)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp) and issubclass(tp, ConfigBase)


def _from_shorthand(hint: type[ConfigBase], text: str) -> ConfigBase:
    """The config ``hint`` built from a bare string for its ``shorthand`` field."""
    return hint.from_mapping({hint.shorthand: text.strip().lower()})


def _shorthand_choices(hint: type[ConfigBase]) -> tuple[str, ...]:
    """The values a bare string may take as ``hint``'s shorthand (its field's choices)."""
    if hint.shorthand is None:
        return ()
    field = next(f for f in dataclasses.fields(hint) if f.name == hint.shorthand)
    return tuple(field.metadata.get("choices", ()))


def _coerce_union(value: Any, members: tuple[Any, ...], where: str) -> Any:
    """Coerce ``value`` to the first member of a union (``X | None``...) that takes it."""
    if isinstance(value, str):
        for member in members:
            # A shorthand value ("none" for a normalization) is that config, not "not given".
            if _is_config(member) and value.strip().lower() in _shorthand_choices(member):
                return _from_shorthand(member, value)
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
        if type(None) in members:
            return None
    errors: list[ConfigError] = []
    # Try the most specific member first: a string "256,320" is a tuple, "256" an int.
    ordered = sorted(
        (m for m in members if m is not type(None)),
        key=lambda m: 0 if (isinstance(value, str) and "," in value) == (
            typing.get_origin(m) is tuple) else 1,
    )
    for member in ordered:
        try:
            return _coerce(value, member, where)
        except ConfigError as exc:
            errors.append(exc)
    raise errors[0]


def _coerce_config(value: Any, hint: type[ConfigBase], where: str) -> ConfigBase:
    """A nested config from itself, its shorthand string or a mapping of its settings."""
    if isinstance(value, hint):
        return value
    if isinstance(value, str) and hint.shorthand is not None:
        return _from_shorthand(hint, value)
    if isinstance(value, Mapping):
        return hint.from_mapping(value)
    raise ConfigError(f"{where} must be a table of settings, not {value!r}.")


def _coerce_tuple(value: Any, hint: Any, where: str) -> tuple[Any, ...]:
    """A tuple from a list, a comma-separated string or one number."""
    args = typing.get_args(hint)
    items = value
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [value]
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{where} must be a list, not {value!r}.")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], where) for v in items)
    if len(items) != len(args):
        raise ConfigError(f"{where} needs {len(args)} values, not {len(items)}.")
    return tuple(_coerce(v, a, where) for v, a in zip(items, args))


def _coerce_bool(value: Any, where: str) -> bool:
    """A flag from a bool, 0/1 or a word such as ``yes``/``off``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"{where} must be true or false, not {value!r}.")


def _coerce_number(value: Any, kind: type[int] | type[float], where: str) -> int | float:
    """An int (whole values only) or a float from a number or its text; never from a bool."""
    noun = "a whole number" if kind is int else "a number"
    if not isinstance(value, bool):
        if kind is int and isinstance(value, int):
            return value
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if kind is float and isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return kind(value.strip())
            except ValueError:
                pass
    raise ConfigError(f"{where} must be {noun}, not {value!r}.")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Turn ``value`` into something of type ``hint`` or raise a ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(hint), where)
    if _is_config(hint):
        return _coerce_config(value, hint, where)
    if origin is tuple:
        return _coerce_tuple(value, hint, where)
    if hint is bool:
        return _coerce_bool(value, where)
    if hint is int or hint is float:
        return _coerce_number(value, hint, where)
    if hint is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"{where} must be text, not {value!r}.")
    return value
def config_from_mapping(cls: type[C], mapping: Mapping[str, Any]) -> C:
    """Build the frozen dataclass ``cls`` from a mapping; see the module docstring.

    Keys that are not fields of ``cls`` but are fields of one of its nested configs are
    routed there (``tile`` -> ``tiling.tile``). Dashes in keys are read as underscores.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a value outside the
            field's choices.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    nested = {name: hints[name] for name in fields if _is_config(hints[name])}
    own: dict[str, Any] = {}
    routed: dict[str, dict[str, Any]] = {name: {} for name in nested}
    for raw_key, value in mapping.items():
        key = str(raw_key).replace("-", "_")
        if value is None and key not in fields:
            continue
        if key in fields:
            own[key] = value
            continue
        target = next(
            (n for n, tp in nested.items() if key in {f.name for f in dataclasses.fields(tp)}),
            None,
        )
        if target is None:
            valid = sorted(set(fields) | {
                f.name for tp in nested.values() for f in dataclasses.fields(tp)})
            raise ConfigError(
                f"Unknown setting {raw_key!r} for {cls.__name__}; valid settings: "
                f"{', '.join(valid)}."
            )
        routed[target][key] = value
    kwargs: dict[str, Any] = {}
    for name, value in own.items():
        if value is None and name in nested:
            continue
        if name in nested and isinstance(value, Mapping):
            # a nested mapping refines the field's own default (fine-tuning's augmentation
            # defaults are not AugmentConfig's), like the flat keys routed to it
            routed[name] = {**value, **routed[name]}
            continue
        where = f"{cls.__name__}.{name}"
        coerced = _coerce(value, hints[name], where) if value is not None else None
        if value is None and type(None) not in typing.get_args(hints[name]):
            continue  # None means "not given": keep the default
        allowed = fields[name].metadata.get("choices")
        if allowed and coerced is not None:
            if isinstance(coerced, str):
                # Accept any letter case; the choices are stored in their canonical case.
                match = {c.lower(): c for c in allowed}.get(coerced.strip().lower())
                if match is None:
                    raise ConfigError(
                        f"{where} must be one of {', '.join(allowed)}, not {value!r}."
                    )
                coerced = match
        kwargs[name] = coerced
    for name, sub in routed.items():
        if not sub:
            continue
        base = kwargs.get(name)
        if base is None:
            base = fields[name].default_factory() if fields[name].default_factory is not \
                dataclasses.MISSING else nested[name]()  # type: ignore[misc]
        kwargs[name] = base.replace(**sub)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - a programming error, not a user's
        raise ConfigError(f"Invalid settings for {cls.__name__}: {exc}.") from None


def load_toml(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """Read a TOML file (optionally one ``[section]`` of it) into a plain dict.

    Raises:
        ConfigError: the file is missing, not TOML, or lacks the section.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"The settings file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"The settings file {path} is not valid TOML ({exc}).") from None
    if section is None:
        return data
    if section not in data:
        raise ConfigError(f"The settings file {path} has no [{section}] table.")
    return dict(data[section])

