"""Networks registered by name, built from a small frozen config.

Each network module calls :func:`register_network` at import time with its config class and
the keyword overrides of its variants. ``create_model`` is the only constructor callers use::

    model = create_model("unet_sharp", variant="lite", in_channels=1, num_classes=2)
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ModelNotFoundError

__all__ = [
    "NETWORK_MODULES",
    "NetworkEntry",
    "register_network",
    "list_models",
    "list_variants",
    "get_entry",
    "make_config",
    "create_model",
    "config_to_dict",
    "state_sha256",
]

#: Modules imported on first use of the registry, one per network.
NETWORK_MODULES = ("sa2net", "unet_sharp", "banet", "msa2net", "sasrnet")

VARIANTS = ("tiny", "lite", "paper")


@dataclass(frozen=True)
class NetworkEntry:
    """One registered network.

    Attributes:
        name: registry name.
        config_cls: frozen dataclass with at least ``variant``, ``in_channels``, ``num_classes``.
        variants: variant name -> keyword overrides of ``config_cls`` defaults.
        build: callable turning a config into a module.
        summary: one line for ``napari-medseg models``.
    """

    name: str
    config_cls: type
    variants: Mapping[str, Mapping[str, Any]]
    build: Callable[[Any], Any]
    summary: str


_REGISTRY: dict[str, NetworkEntry] = {}
_LOADED = False


def register_network(
    name: str,
    *,
    config_cls: type,
    variants: Mapping[str, Mapping[str, Any]],
    summary: str,
) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Decorator registering ``build(config) -> module`` under ``name``."""

    def decorator(build: Callable[[Any], Any]) -> Callable[[Any], Any]:
        missing = {"variant", "in_channels", "num_classes"} - {
            f.name for f in dataclasses.fields(config_cls)
        }
        if missing:
            raise TypeError(f"{config_cls.__name__} lacks the fields {sorted(missing)}")
        _REGISTRY[name] = NetworkEntry(name, config_cls, dict(variants), build, summary)
        return build

    return decorator


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for module in NETWORK_MODULES:
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as exc:  # a network not written yet
            if exc.name != f"{__package__}.{module}":
                raise
    _LOADED = True


def list_models() -> list[str]:
    """Names of the registered networks."""
    _load_all()
    return sorted(_REGISTRY)


def get_entry(name: str) -> NetworkEntry:
    """The registry entry of ``name``; a clear error lists the valid names.

    Only the named network's module is imported (MSA2-Net alone pulls in timm, about 200 MB
    of memory that predicting with any other network does not need).
    """
    if name not in _REGISTRY and name in NETWORK_MODULES:
        importlib.import_module(f"{__package__}.{name}")
    if name not in _REGISTRY:
        _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelNotFoundError(
            f"Unknown network {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}."
        ) from None


def list_variants(name: str) -> list[str]:
    """The variants of a network, smallest first."""
    entry = get_entry(name)
    return [v for v in VARIANTS if v in entry.variants] + sorted(
        v for v in entry.variants if v not in VARIANTS
    )


def _coerce(value: Any, like: Any) -> Any:
    if isinstance(like, tuple) and isinstance(value, list):
        return tuple(_coerce(v, like[0] if like else None) for v in value)
    return value


def make_config(
    name: str,
    variant: str = "lite",
    in_channels: int = 1,
    num_classes: int = 2,
    **overrides: Any,
) -> Any:
    """The frozen config of ``name``/``variant`` with the given overrides applied.

    Lists (as they come back from JSON) are turned into tuples where the default is a tuple.
    """
    entry = get_entry(name)
    if variant not in entry.variants:
        raise ModelNotFoundError(
            f"Network {name!r} has no variant {variant!r}; choose one of: "
            f"{', '.join(list_variants(name))}."
        )
    fields = {f.name: f for f in dataclasses.fields(entry.config_cls)}
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ModelNotFoundError(
            f"Network {name!r} has no setting {sorted(unknown)[0]!r}; its settings are: "
            f"{', '.join(sorted(fields))}."
        )
    kwargs: dict[str, Any] = dict(entry.variants[variant])
    kwargs.update(overrides)
    kwargs.update(variant=variant, in_channels=int(in_channels), num_classes=int(num_classes))
    base = entry.config_cls()
    kwargs = {k: _coerce(v, getattr(base, k)) for k, v in kwargs.items()}
    return dataclasses.replace(base, **kwargs)


def create_model(
    name: str,
    variant: str = "lite",
    in_channels: int = 1,
    num_classes: int = 2,
    *,
    seed: int | None = None,
    **overrides: Any,
) -> Any:
    """Build a randomly initialised network by registry name.

    Args:
        name: registry name (see :func:`list_models`).
        variant: ``"tiny"`` (tests), ``"lite"`` (CPU-friendly, shipped weights) or ``"paper"``.
        in_channels: image channels.
        num_classes: K output classes (1 = a single sigmoid logit).
        seed: when given, the weights are drawn from this seed (the same network every time)
            and the caller's random state is left as it was.
        **overrides: fields of the network's config dataclass.
    """
    config = make_config(name, variant, in_channels, num_classes, **overrides)
    if seed is None:
        return get_entry(name).build(config)
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return get_entry(name).build(config)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config dataclass."""
    return dataclasses.asdict(config)


def state_sha256(model: Any) -> str:
    """sha256 of a network's state dict: names and raw bytes, in name order.

    The identity of weights that have no checkpoint (an untrained network), used wherever a
    run records or compares which weights it used (batch manifests, resumable stores).
    """
    import torch

    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        raw = value.detach().to("cpu").contiguous().reshape(-1)
        if raw.dtype != torch.bool:
            raw = raw.view(torch.uint8)
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()
