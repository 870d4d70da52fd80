"""Which shipped weights suit an image: the model card's ``intended_for`` against the image.

Each model card declares what its weights were trained for::

    intended_for:
      kind: electron microscopy        # what a user would call the images
      modality: [EM, ssTEM, TEM]       # spellings an image's metadata may carry
      channels: [1]                    # image channels the weights expect (1 grey, 3 RGB)
      dims: 2D planes of stacks        # how the network sees the data
      pixel_size: {value: 4.0, unit: nanometer}   # null when the source does not record it
      intensity: raw uint8, percentile-normalised

:func:`rank_weights` scores every card against an image's :class:`ImageTraits` (read from its
metadata and dtype, never its pixels, so it is instant on any size) and says why in one line.
Evidence counts in this order: a declared modality, the pixel unit's family (nanometres:
electron microscopy; micrometres: light microscopy; millimetres: radiology) and size, the
channel count, floating-point intensities; the card's validation figure breaks ties: for
weights that give objects (the instance task) their AP@0.5, on the image's declared
acquisition type (fluorescence, bright-field, H&E) where the card reports one, since that is
what a user counting nuclei judges; Dice for the others. A match with no evidence beyond the
channel count is a guess, and says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .pixel_size import TO_NM

__all__ = ["ImageTraits", "Match", "traits_from_meta", "rank_weights", "installed_cards",
           "best_weights"]

#: Unit -> family: the physical scale a pixel unit tells about the image.
_UNIT_FAMILY = {"nanometer": "nm", "angstrom": "nm", "micrometer": "um",
                "millimeter": "mm", "centimeter": "mm", "meter": "mm"}
_FAMILY_TEXT = {"nm": "nanometre pixels", "um": "micrometre pixels", "mm": "millimetre pixels"}
#: A kind of image -> the pixel family its images have when they carry one.
_KIND_FAMILY = {"electron microscopy": "nm", "microscopy": "um", "light microscopy": "um",
                "radiology": "mm", "ct": "mm", "mri": "mm"}


@dataclass(frozen=True)
class ImageTraits:
    """What the metadata of an image tells about its kind (no pixel is read).

    Attributes:
        channels: colour channels (3 for RGB, 1 for grey).
        volume: the image has a Z axis (a stack or volume).
        unit: the in-plane pixel unit (NGFF name) or None.
        pixel_size: the in-plane pixel size in ``unit``, or None.
        modality: the modality the file or sample declares (``"CT"``, ``"fluorescence"``,
            ``"dermoscopy"`` ...), or None.
        floating: the pixels are floating point.
    """

    channels: int = 1
    volume: bool = False
    unit: str | None = None
    pixel_size: float | None = None
    modality: str | None = None
    floating: bool = False

    def describe(self) -> str:
        """The facts in a few words: ``"RGB, no pixel size"``."""
        parts = [self.modality] if self.modality else []
        parts.append("RGB" if self.channels == 3 else "grey" if self.channels == 1
                     else f"{self.channels} channels")
        if self.volume:
            parts.append("a stack")
        if self.unit and self.pixel_size:
            parts.append(f"{self.pixel_size:g} {self.unit} pixels")
        else:
            parts.append("no pixel size")
        return ", ".join(parts)


@dataclass(frozen=True)
class Match:
    """One card's fit to an image.

    Attributes:
        tag: the card's tag.
        network: its network.
        score: higher is better; <= 0 when something contradicts the image.
        guess: no evidence beyond the channel count supports it.
        reason: one sentence saying why.
    """

    tag: str
    network: str
    score: float
    guess: bool
    reason: str


def traits_from_meta(meta: Any, dtype: Any = None) -> ImageTraits:
    """The traits of an image from its ``ImageMeta`` (and dtype, when known)."""
    import numpy as np

    axes = str(meta.axes)
    channels = 3 if getattr(meta, "rgb", False) else 1
    unit = pixel = None
    units = tuple(getattr(meta, "units", ()) or ())
    spacing = tuple(getattr(meta, "spacing", ()) or ())
    if units and units[-1] is not None:
        unit = str(units[-1])
        pixel = float(spacing[-1]) if spacing else None
    extra = getattr(meta, "extra", None) or {}
    modality = str(extra.get("modality") or "").strip() or None
    floating = dtype is not None and np.issubdtype(np.dtype(dtype), np.floating)
    return ImageTraits(channels=channels, volume="Z" in axes, unit=unit, pixel_size=pixel,
                       modality=modality, floating=floating)


def _words(values: Iterable[Any]) -> set[str]:
    return {str(v).strip().lower() for v in values if str(v).strip()}


def _card_facts(card: Any) -> dict[str, Any]:
    data = getattr(card, "data", None) or {}
    facts = dict(data.get("intended_for") or {})
    modality = facts.get("modality") or []
    facts["modality"] = _words([modality] if isinstance(modality, str) else modality)
    facts["channels"] = {int(c) for c in (facts.get("channels") or [card.in_channels])}
    size = facts.get("pixel_size") or {}
    facts["unit"] = str(size.get("unit")) if size.get("unit") else None
    facts["pixel_value"] = float(size["value"]) if size.get("value") else None
    kind = str(facts.get("kind") or "").lower()
    facts["family"] = _UNIT_FAMILY.get(facts["unit"] or "", _KIND_FAMILY.get(kind))
    facts["floating"] = bool(facts.get("floating_point", False))
    return facts


def _score(card: Any, facts: dict[str, Any],
           traits: ImageTraits) -> tuple[float, bool, list[str], list[str]]:
    """(score, guess, facts that match, facts that contradict) of one card."""
    score, evidence = 0.0, False
    good: list[str] = []
    bad: list[str] = []
    if traits.modality:
        if traits.modality.lower() in facts["modality"]:
            score, evidence = score + 8, True
            good.append(traits.modality)
        elif facts["modality"]:
            score -= 8
            bad.append(f"{traits.modality} (trained on {facts.get('kind') or 'other images'})")
    family = _UNIT_FAMILY.get(traits.unit or "")
    if family and facts["family"]:
        if family == facts["family"]:
            score, evidence = score + 4, True
            good.append(_FAMILY_TEXT[family])
            if facts["unit"] and facts["pixel_value"] and traits.pixel_size:
                ratio = (traits.pixel_size * TO_NM.get(traits.unit or "", 1.0)) / (
                    facts["pixel_value"] * TO_NM.get(facts["unit"], 1.0))
                if abs(math.log2(max(ratio, 1e-9))) <= 1:
                    score += 1
                else:  # the engine resamples the image to the weights' pixel size
                    good.append(f"{traits.pixel_size:g} {traits.unit} pixels, resampled to "
                                f"the weights' {facts['pixel_value']:g} {facts['unit']}")
        else:
            score -= 4
            bad.append(_FAMILY_TEXT[family])
    elif family and not facts["family"]:
        score -= 1  # the card records no pixel scale; the image has one
    if traits.channels in facts["channels"]:
        score += 1
        good.append("RGB" if traits.channels == 3 else "grey")
    else:
        score -= 2
        bad.append("RGB" if traits.channels == 3 else "grey")
    if traits.floating and facts["floating"]:
        score, evidence = score + 2, True
        good.append("floating-point intensities")
    return score + 0.5 * _validation_figure(card, traits), not evidence, good, bad


def _validation_figure(card: Any, traits: ImageTraits) -> float:
    """What breaks ties between cards (0-1): AP@0.5 for weights with the instance task (the
    card's ``task``), of the image's declared acquisition type where the card reports it;
    validation Dice otherwise."""
    metrics = card.metrics or {}
    if getattr(card, "task", None) and metrics.get("ap_iou50"):
        by_type = {_spelling(k): v for k, v in (metrics.get("by_type") or {}).items()}
        row = by_type.get(_spelling(traits.modality or "")) or {}
        return float(row.get("ap_iou50") or metrics["ap_iou50"])
    return float(metrics.get("dice", 0.0) or 0.0)


def _spelling(name: str) -> str:
    """A type's name as compared: ``Bright-field`` and ``brightfield`` are one."""
    return name.lower().replace("-", "").replace(" ", "")


def _reason(card: Any, facts: dict[str, Any], guess: bool, good: Sequence[str],
            bad: Sequence[str], traits: ImageTraits) -> str:
    kind = facts.get("kind") or card.dataset
    if bad:
        return (f"{card.tag} is the closest shipped weights, but it was trained on {kind} "
                f"and this image is {', '.join(bad)}: check the result.")
    if guess:
        return (f"{card.tag} is a guess: the image's metadata ({traits.describe()}) does not "
                f"tell its kind; it was trained on {kind} - choose other weights if that is "
                "not what this is.")
    good = sorted(good, key=lambda fact: fact.startswith("but "))  # the caveat last
    return f"{card.tag}: trained on {kind}, matching this image ({', '.join(good)})."


def rank_weights(traits: ImageTraits, cards: Iterable[Any]) -> list[Match]:
    """Every card's :class:`Match` with the image, best first.

    Args:
        traits: the image's traits (:func:`traits_from_meta`).
        cards: model cards (``engine.checkpoints.ModelCard``), e.g. the installed ones.
    """
    matches = []
    for card in cards:
        facts = _card_facts(card)
        score, guess, good, bad = _score(card, facts, traits)
        matches.append(Match(card.tag, card.network, score, guess or bool(bad),
                             _reason(card, facts, guess, good, bad, traits)))
    return sorted(matches, key=lambda m: -m.score)


def installed_cards() -> list[Any]:
    """The model cards whose weights are installed (read from disk: call once, then reuse)."""
    import warnings

    from .cards import list_model_cards

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [c for c in list_model_cards() if c.weights_path() is not None]


def best_weights(traits: ImageTraits, cards: Iterable[Any] | None = None) -> Match | None:
    """The best-matching shipped weights for an image among ``cards`` (default: the
    installed ones); None when there is none."""
    ranked = rank_weights(traits, installed_cards() if cards is None else cards)
    return ranked[0] if ranked else None
