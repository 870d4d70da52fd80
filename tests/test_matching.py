"""Which shipped weights suit an image: model cards' ``intended_for`` against image metadata."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from napari_medseg.engine.matching import ImageTraits, rank_weights, traits_from_meta
from napari_medseg.io.samples import load_sample


def _card(tag, dataset="d", channels=(1,), dice=0.9, **intended):
    data = {"intended_for": {"channels": list(channels), **intended}}
    return SimpleNamespace(tag=tag, network="net", dataset=dataset, in_channels=channels[0],
                           metrics={"dice": dice}, data=data)


CARDS = [
    _card("nuclei", channels=(1, 3), dice=0.92, kind="nuclei in light microscopy",
          modality=["fluorescence", "H&E"], pixel_size={"value": None, "unit": "micrometer"}),
    _card("em", kind="electron microscopy", modality=["EM", "ssTEM"],
          pixel_size={"value": 4.0, "unit": "nanometer"}, dice=0.83),
    _card("skin", channels=(3,), kind="dermoscopy photographs", modality=["dermoscopy"],
          pixel_size=None, dice=0.95),
    _card("ct", kind="CT", modality=["CT"], pixel_size={"value": 2.0, "unit": "millimeter"},
          floating_point=True, dice=0.85),
]


@pytest.mark.parametrize("traits, best", [
    (ImageTraits(1, modality="fluorescence"), "nuclei"),
    (ImageTraits(3, modality="H&E"), "nuclei"),
    (ImageTraits(3, modality="dermoscopy"), "skin"),
    (ImageTraits(1, True, "nanometer", 4.0), "em"),  # no modality: the pixel unit tells
    (ImageTraits(1, True, "millimeter", 0.7), "ct"),
    (ImageTraits(1, False, "micrometer", 0.3), "nuclei"),
    (ImageTraits(1, modality="ct", floating=True), "ct"),  # case does not matter
])
def test_the_evidence_picks_the_card(traits, best):
    ranked = rank_weights(traits, CARDS)
    assert ranked[0].tag == best and not ranked[0].guess, ranked[0]
    assert best in ranked[0].reason and "matching this image" in ranked[0].reason


def test_a_pixel_size_far_from_the_weights_says_it_is_resampled():
    best = rank_weights(ImageTraits(1, True, "millimeter", 0.7), CARDS)[0]
    assert best.tag == "ct" and "0.7 millimeter pixels, resampled to the weights' 2" in \
        best.reason
    near = rank_weights(ImageTraits(1, True, "millimeter", 1.5), CARDS)[0]
    assert "resampled" not in near.reason and near.score > best.score


def test_without_metadata_the_choice_is_a_guess_and_says_so():
    ranked = rank_weights(ImageTraits(3), CARDS)
    assert ranked[0].tag == "skin"  # RGB, then the best validation Dice breaks the tie
    assert ranked[0].guess and "guess" in ranked[0].reason and "RGB, no pixel size" in \
        ranked[0].reason


def _nuclei(tag, dice, ap, by_type):
    card = _card(tag, channels=(1, 3), dice=dice, kind="nuclei", modality=["fluorescence", "H&E"])
    card.task = {"kind": "instances"}  # as ModelCard.task gives the instance task
    card.metrics = {"dice": dice, "ap_iou50": ap,
                    "by_type": {k: {"ap_iou50": v} for k, v in by_type.items()}}
    return card


def test_between_nuclei_weights_the_objects_score_of_the_image_type_decides():
    """Object weights are judged by AP@0.5 (not foreground Dice), on the image's declared
    acquisition type where the cards report one."""
    cards = [_nuclei("best_dice", 0.93, 0.75, {"fluorescence": 0.82, "H&E": 0.42}),
             _nuclei("best_overall", 0.92, 0.78, {"fluorescence": 0.84, "H&E": 0.44}),
             _nuclei("best_fluo", 0.91, 0.76, {"fluorescence": 0.86, "H&E": 0.23})]
    assert rank_weights(ImageTraits(1, modality="fluorescence"), cards)[0].tag == "best_fluo"
    assert rank_weights(ImageTraits(3, modality="H&E"), cards)[0].tag == "best_overall"
    assert rank_weights(ImageTraits(1, False, "micrometer", 0.3), cards)[0].tag == \
        "best_overall"  # no type declared: the overall AP@0.5
    assert rank_weights(ImageTraits(1, modality="bright-field"), cards)[0].tag == \
        "best_overall"  # a type no card reports: the overall AP@0.5


def test_a_contradicted_card_says_check_the_result():
    ranked = rank_weights(ImageTraits(1, modality="MRI"), CARDS)
    assert all(m.score < 1 for m in ranked)
    assert ranked[0].guess and "check the result" in ranked[0].reason
    ct = next(m for m in rank_weights(ImageTraits(3, modality="dermoscopy"), CARDS)
              if m.tag == "ct")
    assert ct.score < 0 and "RGB" in ct.reason


def test_a_card_without_intended_for_still_ranks():
    bare = SimpleNamespace(tag="bare", network="n", dataset="x", in_channels=1, metrics={},
                           data={})
    ranked = rank_weights(ImageTraits(1, modality="EM"), [bare])
    assert ranked[0].tag == "bare" and ranked[0].guess


@pytest.mark.parametrize("sample, tag", [
    ("nuclei", "dsb2018"), ("nuclei_he", "dsb2018"), ("em_stack", "sa2net_lite_isbi2012"),
    ("dermoscopy", "sa2net_lite_ph2"), ("ct_patches", "sa2net_lite_msd")])
def test_each_shipped_sample_matches_its_shipped_weights(sample, tag):
    """The samples carry the metadata (modality, pixel units) that the cards declare."""
    from napari_medseg.engine.checkpoints import list_model_cards

    image, meta, _labels = load_sample(sample)
    traits = traits_from_meta(meta, image.dtype)
    assert traits.modality
    best = rank_weights(traits, list_model_cards())[0]
    assert tag in best.tag and not best.guess, best
