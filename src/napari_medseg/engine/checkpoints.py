"""Self-describing checkpoints and the weights resolver.

A checkpoint is two files with one stem:

* ``<name>.safetensors``: the state dict (fp16 for shipped weights, fp32 on request; a tensor
  fp16 cannot hold stays fp32). The JSON description is also embedded in the safetensors
  header, so a lone weights file still says what it is.
* ``<name>.json``: ``format``, ``format_version``, ``network``, ``variant``, ``config`` (the
  network's full config), ``in_channels``, ``num_classes``, ``classes``, ``normalization``,
  ``training_data`` (dataset, images, split), ``settings``, ``metrics``, ``parent`` (sha256 of
  the parent checkpoint's weights), ``plugin_version``, ``torch_version``, ``created``,
  ``weights`` (the file name), ``dtype``, ``sha256`` (of the weights file) and
  ``description_sha256`` (of this description, also in the header: :mod:`.descriptions`).

Loading never unpickles (safetensors holds only tensors); the network is rebuilt from the
registry with the stored config, and any missing, unexpected or mis-shaped tensor is a
:class:`~napari_medseg.errors.CheckpointError`, not a warning.

Model cards (:mod:`.cards`, re-exported here) describe the shipped weights;
:func:`resolve_weights` takes a card's tag, a checkpoint path or a package ``export`` wrote and
returns the loaded network with its :class:`CheckpointInfo`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..config import NormalizationConfig
from ..errors import CheckpointError, ConfigError, ModelNotFoundError, WeightsNotFoundError
from .cards import (CARD_FIELDS, ModelCard, default_weights, list_model_cards,
                    list_shipped_weights)
from .descriptions import (HEADER_HASH_KEY, HEADER_KEY, check_description, description_sha256,
                           read_header, sha256_file)

__all__ = [
    "CHECKPOINT_FORMAT",
    "FORMAT_VERSION",
    "CARD_FIELDS",
    "CheckpointInfo",
    "ModelCard",
    "sha256_file",
    "checkpoint_paths",
    "save_checkpoint",
    "read_checkpoint_info",
    "load_checkpoint",
    "with_tile",
    "tile_side",
    "list_model_cards",
    "list_shipped_weights",
    "default_weights",
    "resolve_weights",
]

CHECKPOINT_FORMAT = "napari-medseg-checkpoint"
FORMAT_VERSION = 1
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself (the JSON file, as a dataclass).

    Attributes:
        network: registry name.
        variant: ``tiny``, ``lite`` or ``paper``.
        config: the network's full config (``dataclasses.asdict``).
        in_channels: image channels the network takes.
        num_classes: K (1 = one sigmoid logit).
        classes: class names, background first (may be empty).
        normalization: a :class:`~napari_medseg.config.NormalizationConfig` as a dict, or None.
        input_downsample: the network runs on the image average-pooled by this factor
            (:mod:`~napari_medseg.models.working_resolution`); 1 = full resolution.
        task: what the network predicts (:class:`~.seg_task.SegTask` as a dict); None is
            the ``classes`` task (weights written before tasks existed).
        pixel_size: the in-plane pixel size the weights were trained at (``{"value",
            "unit"}``, :class:`~.pixel_size.PixelSize`); images whose metadata give another
            are resampled to it. None: the weights do not depend on one.
        tile: the tile side (image pixels) prediction uses when none is asked, where the
            weights need more of an image at once than their network's preferred tile (a
            whole dermoscopy photograph: one lesion judged in its surroundings); measured,
            see the model card. None: the network's preferred tile.
        training_data: ``dataset`` (folder name), ``images``, ``split`` ... (free form).
        settings: training settings (epochs, optimizer, device, wall time ...).
        metrics: validation metrics, e.g. ``{"dice": 0.91, "split": "val"}``.
        parent: sha256 of the weights this one was fine-tuned from, or None.
        plugin_version: napari-medseg version that wrote it.
        torch_version: torch version that wrote it.
        created: ISO 8601 time stamp.
        weights: the weights file name.
        dtype: ``float16`` or ``float32``.
        sha256: sha256 of the weights file (None inside the safetensors header).
        tag: the model card's tag when loaded through one.
        description_sha256: hash of this description (:mod:`~.descriptions`), None before.
        extra: anything else (kept on a round trip).
    """

    network: str
    variant: str
    config: dict
    in_channels: int
    num_classes: int
    classes: tuple[str, ...] = ()
    normalization: dict | None = None
    input_downsample: int = 1
    task: dict | None = None
    pixel_size: dict | None = None
    tile: int | None = None
    training_data: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    parent: str | None = None
    plugin_version: str = __version__
    torch_version: str | None = None
    created: str | None = None
    weights: str | None = None
    dtype: str = "float16"
    sha256: str | None = None
    tag: str | None = None
    description_sha256: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, with ``format`` and ``format_version`` first."""
        out: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("task", "pixel_size", "tile") and value is None:
                continue  # weights without them keep the description (and hash) they had
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return json.loads(json.dumps(out, default=_json_default))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "checkpoint") -> CheckpointInfo:
        """Parse the JSON form; unknown keys go to ``extra``.

        Raises:
            CheckpointError: not a napari-medseg checkpoint, or a required key is missing.
        """
        if not isinstance(data, dict):
            raise CheckpointError(f"The {source} does not hold a checkpoint description.")
        fmt = data.get("format", CHECKPOINT_FORMAT)
        if fmt != CHECKPOINT_FORMAT:
            raise CheckpointError(f"The {source} is not a napari-medseg checkpoint ({fmt!r}).")
        if int(data.get("format_version", 1)) > FORMAT_VERSION:
            raise CheckpointError(
                f"The {source} was written by a newer napari-medseg (format "
                f"{data.get('format_version')}); update the plugin to load it."
            )
        missing = [k for k in ("network", "variant", "in_channels", "num_classes") if k not in data]
        if missing:
            raise CheckpointError(f"The {source} lacks the key {missing[0]!r}.")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        extra = dict(kwargs.pop("extra", None) or {})
        extra.update({k: v for k, v in data.items()
                      if k not in names and k not in ("format", "format_version")})
        kwargs["config"] = dict(kwargs.get("config") or {})
        kwargs["classes"] = tuple(kwargs.get("classes") or ())
        kwargs["in_channels"] = int(kwargs["in_channels"])
        kwargs["num_classes"] = int(kwargs["num_classes"])
        kwargs["input_downsample"] = int(kwargs.get("input_downsample") or 1)
        if kwargs.get("task") is not None:
            from .seg_task import SegTask

            try:
                kwargs["task"] = SegTask.from_dict(kwargs["task"]).to_dict()
            except ConfigError as exc:
                raise CheckpointError(f"The {source} has an invalid task: {exc}") from None
        if kwargs.get("pixel_size") is not None:
            from .pixel_size import PixelSize

            size = PixelSize.from_mapping(kwargs["pixel_size"], source)
            kwargs["pixel_size"] = size.to_dict() if size else None
        if kwargs.get("tile") is not None:
            kwargs["tile"] = tile_side(kwargs["tile"], source)
        if kwargs["input_downsample"] < 1:
            raise CheckpointError(f"The {source} has an invalid input_downsample "
                                  f"({kwargs['input_downsample']}).")
        for key in ("training_data", "settings", "metrics"):
            kwargs[key] = dict(kwargs.get(key) or {})
        return cls(**kwargs, extra=extra)

    def normalization_config(self) -> NormalizationConfig | None:
        """The stored normalization as a config, or None when the checkpoint has none."""
        if not self.normalization:
            return None
        try:
            return NormalizationConfig.from_mapping(self.normalization)
        except ConfigError as exc:
            raise CheckpointError(f"The checkpoint's normalization is invalid: {exc}") from None


def tile_side(value: Any, source: str) -> int:
    """A recorded tile side as an int (>= 16 pixels).

    Raises:
        CheckpointError: it is not a whole number of at least 16.
    """
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not float(value).is_integer() or value < 16):  # inf and NaN are no integers
        raise CheckpointError(f"The {source} has an invalid tile ({value!r}); it is a side in "
                              "pixels, at least 16.")
    return int(value)


def with_tile(model, tile: int | None):
    """``model`` predicting with tiles of ``tile`` pixels when none is asked (its spec's
    ``preferred_tile``), the side recorded in ``extra["tile"]`` for saving; None keeps the
    network's own. A working-resolution wrapper's network gets the same tile at its own
    scale (what ``super_resolved`` and a bare save see). Returns ``model``."""
    if tile is None:
        return model
    tile = int(tile)
    inner = getattr(model, "net", None)
    if inner is not None and hasattr(inner, "spec"):
        side = max(int(inner.spec.divisor), tile // int(getattr(model, "factor", 1)))
        inner.spec = dataclasses.replace(inner.spec, preferred_tile=side,
                                         extra={**inner.spec.extra, "tile": tile})
    model.spec = dataclasses.replace(model.spec, preferred_tile=tile,
                                     extra={**model.spec.extra, "tile": tile})
    return model


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """The ``(weights, json)`` paths of a checkpoint given either file or their common stem."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        stem = path.with_suffix("")
    else:
        stem = path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_checkpoint(
    model,
    path: str | Path,
    *,
    normalization: NormalizationConfig | dict | None = None,
    classes: tuple[str, ...] | list[str] = (),
    training_data: dict | None = None,
    settings: dict | None = None,
    metrics: dict | None = None,
    parent: str | None = None,
    dtype: str = "float16",
    extra: dict | None = None,
) -> CheckpointInfo:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` for a registered network.

    Args:
        model: a network built by ``create_model`` (has ``config`` and ``spec``).
        path: the stem, or either file's path.
        normalization: the normalization the network was trained with.
        classes: class names, background first.
        training_data: dataset folder name, images and split.
        settings: training settings.
        metrics: validation metrics.
        parent: sha256 of the parent checkpoint's weights.
        dtype: ``float16`` (shipped weights) or ``float32``.
        extra: anything else to keep.

    Returns:
        The written description (with the weights' sha256).
    """
    import torch
    from safetensors.torch import save

    from ..models import config_to_dict
    from ..models.working_resolution import input_downsample, unwrap
    from .seg_task import stored_task

    if dtype not in ("float16", "float32"):
        raise ConfigError(f"Checkpoint dtype must be float16 or float32, not {dtype!r}.")
    weights_path, json_path = checkpoint_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(normalization, NormalizationConfig):
        normalization = normalization.to_dict()
    factor = input_downsample(model)
    pixel_size = model.spec.extra.get("pixel_size")
    tile = model.spec.extra.get("tile")
    model = unwrap(model)  # the file holds the network's own tensors
    spec = model.spec
    info = CheckpointInfo(
        network=spec.network,
        variant=spec.variant,
        config=config_to_dict(model.config),
        in_channels=int(spec.in_channels),
        num_classes=int(spec.num_classes),
        classes=tuple(classes),
        normalization=dict(normalization) if normalization else None,
        input_downsample=factor,
        task=stored_task(spec.extra.get("task")),
        pixel_size=dict(pixel_size) if pixel_size else None,
        tile=int(tile) if tile else None,
        training_data=dict(training_data or {}),
        settings=dict(settings or {}),
        metrics=dict(metrics or {}),
        parent=parent,
        torch_version=torch.__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        weights=weights_path.name,
        dtype=dtype,
        extra=dict(extra or {}),
    )
    target = torch.float16 if dtype == "float16" else torch.float32
    tensors = {}
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu")
        if t.is_floating_point():
            too_big = (target == torch.float16 and t.numel() > 0
                       and t.abs().max().item() > _FP16_MAX)
            # A tensor out of fp16's range stays fp32 rather than turning into inf.
            t = t.to(torch.float32 if too_big else target)
        tensors[key] = t.contiguous().clone()
    digest = description_sha256(info.to_dict())
    info = dataclasses.replace(info, description_sha256=digest)
    # Written with open(), not safetensors' own writer (mode 0600): the umask applies.
    weights_path.write_bytes(save(tensors, metadata={
        HEADER_KEY: json.dumps(info.to_dict()), HEADER_HASH_KEY: digest}))
    info = dataclasses.replace(info, sha256=sha256_file(weights_path))
    json_path.write_text(json.dumps(info.to_dict(), indent=2) + "\n", encoding="utf-8")
    return info


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """The description of a checkpoint without loading its weights.

    Reads ``<stem>.json``, or the description embedded in the safetensors header when the
    JSON is missing.

    Raises:
        WeightsNotFoundError: neither file exists.
        CheckpointError: the files are not a napari-medseg checkpoint.
    """
    if _package(path):  # a bioimage.io package napari-medseg exported
        return _package(path).read_package_info(path)
    weights_path, json_path = checkpoint_paths(path)
    if json_path.is_file():
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except ValueError:
            raise CheckpointError(
                f"The checkpoint description {json_path} is not valid JSON.") from None
        info = CheckpointInfo.from_dict(data, source=f"checkpoint {json_path.name}")
        if info.weights and (json_path.parent / info.weights).is_file():
            return info
        if weights_path.is_file():
            return dataclasses.replace(info, weights=weights_path.name)
        raise WeightsNotFoundError(
            f"The weights file of checkpoint {json_path} ({info.weights}) is missing."
        )
    if weights_path.is_file():
        meta = read_header(weights_path)
        if HEADER_KEY not in meta:
            raise CheckpointError(
                f"The file {weights_path} has no napari-medseg description (no {json_path.name})."
            )
        info = CheckpointInfo.from_dict(
            json.loads(meta[HEADER_KEY]), source=f"file {weights_path.name}")
        return dataclasses.replace(info, weights=weights_path.name)
    raise WeightsNotFoundError(f"No checkpoint at {path} (looked for {weights_path.name}).")


def _package(path):
    """:mod:`.packages` when ``path`` is a package (a ``.zip`` file), else None."""
    from . import packages

    return packages if packages.is_package(path) else None


def _build(info: CheckpointInfo, source: str):
    from ..models import get_entry, make_config

    try:
        entry = get_entry(info.network)
        overrides = {k: v for k, v in info.config.items()
                     if k not in ("variant", "in_channels", "num_classes")}
        config = make_config(info.network, info.variant, info.in_channels, info.num_classes,
                             **overrides)
    except ModelNotFoundError as exc:
        raise CheckpointError(f"The {source} cannot be rebuilt here: {exc}") from None
    return entry.build(config)


def _load_state(model, weights_path: Path, source: str) -> None:
    import torch
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception:  # safetensors raises its own error types
        raise CheckpointError(f"The {source} weights file {weights_path.name} is not readable "
                              "safetensors.") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s) such as {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) such as {unexpected[0]!r}")
        raise CheckpointError(
            f"The {source} does not fit network {model.spec.network!r} "
            f"({model.spec.variant}): {' and '.join(parts)}."
        )
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"The {source} does not fit network {model.spec.network!r}: tensor {key!r} has "
                f"shape {tuple(state[key].shape)}, the network needs {tuple(value.shape)}."
            )
        state[key] = state[key].to(value.dtype)
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


def load_checkpoint(path: str | Path, device: str | Any = "cpu", verify: bool = True):
    """Rebuild a network from a checkpoint.

    Args:
        path: the stem, the ``.safetensors`` or the ``.json`` file, or a bioimage.io
            package napari-medseg exported (:mod:`.packages`).
        device: where to put the network.
        verify: check the weights' sha256 against the description.

    Returns:
        ``(model, info)``; the model is in eval mode and carries ``model.checkpoint_info``.

    Raises:
        WeightsNotFoundError: no checkpoint at ``path``.
        CheckpointError: malformed files, a hash mismatch, or weights that do not fit.
    """
    if _package(path):  # a bioimage.io package napari-medseg exported
        return _package(path).load_package(path, device=device, verify=verify)
    info = read_checkpoint_info(path)
    weights_path, json_path = checkpoint_paths(path)
    weights_path = json_path.parent / info.weights if info.weights else weights_path
    return _load(info, weights_path, device, verify, f"checkpoint {weights_path.stem}")


def _verify_description(info: CheckpointInfo, weights_path: Path, source: str,
                        card: bool) -> None:
    """Refuse a description edited after saving (see :mod:`~.descriptions`)."""
    meta = read_header(weights_path)
    try:
        header = CheckpointInfo.from_dict(json.loads(meta[HEADER_KEY])).to_dict()
    except (KeyError, ValueError, CheckpointError):
        header = {}  # a weights file without its own description: nothing to compare
    check_description(info.to_dict(), header, meta, source, card=card)


def _load(info: CheckpointInfo, weights_path: Path, device, verify: bool, source: str,
          card: bool = False):
    if verify and info.sha256 and sha256_file(weights_path) != info.sha256:
        raise CheckpointError(f"The {source} weights do not match their recorded sha256; the "
                              "file is corrupt or was replaced.")
    if verify:
        _verify_description(info, weights_path, source, card)
    if info.sha256 is None:
        info = dataclasses.replace(info, sha256=sha256_file(weights_path))
    from ..models.working_resolution import input_downsample, on_input_grid, with_downsample
    from .pixel_size import with_pixel_size
    from .seg_task import with_task

    model = _build(info, source)
    _load_state(model, weights_path, source)
    # a super-resolution network works on the image's grid (older checkpoints recorded 1)
    model = with_task(on_input_grid(with_downsample(model, info.input_downsample)), info.task)
    model = with_tile(with_pixel_size(model, info.pixel_size), info.tile)
    info = dataclasses.replace(info, input_downsample=input_downsample(model))
    model.eval()
    model.to(device)
    model.checkpoint_info = info
    return model, info


# --- model cards --------------------------------------------------------------------------


def resolve_weights(tag_or_path: str | Path, device: str | Any = "cpu", verify: bool = True):
    """Load shipped weights by tag, or a checkpoint by path.

    Args:
        tag_or_path: a model card's tag (see ``napari-medseg models``) or a checkpoint path
            (stem, ``.safetensors`` or ``.json``).
        device: where to put the network.
        verify: check the sha256 of the weights.

    Returns:
        ``(model, info)`` as :func:`load_checkpoint`.

    Raises:
        WeightsNotFoundError: neither a path nor a known tag; the message lists the tags.
        CheckpointError: the weights are corrupt or do not fit.
    """
    text = str(tag_or_path)
    weights_path, json_path = checkpoint_paths(text)
    if weights_path.is_file() or json_path.is_file() or _package(text):
        return load_checkpoint(text, device=device, verify=verify)
    cards = {c.tag: c for c in list_model_cards()}
    card = cards.get(text)
    if card is None:
        shipped = [w["tag"] for w in list_shipped_weights()]
        valid = f"valid tags: {', '.join(shipped)}" if shipped else "no weights are installed yet"
        raise WeightsNotFoundError(
            f"Unknown weights {text!r} ({valid}); or give the path of a .safetensors checkpoint "
            "or of a .zip package napari-medseg exported."
        )
    path = card.weights_path()
    if path is None:
        raise WeightsNotFoundError(
            f"The weights file {card.weights} of model card {card.tag!r} is not installed."
        )
    info = card.info()
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        described = read_checkpoint_info(sidecar)
        info = dataclasses.replace(described, tag=card.tag, sha256=card.sha256,
                                   weights=path.name)
    return _load(info, path, device, verify, f"weights {card.tag!r}",
                 card=not sidecar.is_file())
