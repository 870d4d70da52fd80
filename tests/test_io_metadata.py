"""ImageMeta: validation, derived values, equality and the affine helpers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from napari_medseg.io.metadata import (
    ImageMeta,
    affine_from_geometry,
    geometry_from_affine,
    normalize_unit,
    output_meta,
)


def test_defaults_fill_one_entry_per_spatial_axis():
    meta = ImageMeta(axes="czyx")
    assert meta.axes == "CZYX"
    assert meta.spacing == (1.0, 1.0, 1.0)
    assert meta.origin == (0.0, 0.0, 0.0)
    assert meta.units == (None, None, None)
    assert meta.channel_axis == 0
    assert meta.spatial_axes == "ZYX" and meta.spatial_dims == 3
    assert meta.axis_spacing() == (1.0, 1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"axes": "ZYXQ"},
        {"axes": "ZZX"},
        {"axes": "TCZYX"},
        {"axes": "ZYX", "spacing": (1.0, 2.0)},
        {"axes": "YX", "spacing": (0.0, 1.0)},
        {"axes": "YX", "spacing": (float("nan"), 1.0)},
        {"axes": "CYX", "rgb": True},
        {"axes": "YX", "affine": np.eye(3)},
    ],
)
def test_invalid_metadata_is_refused(kwargs):
    with pytest.raises(ValueError):
        ImageMeta(**kwargs)


def test_units_are_normalised_to_ngff_names():
    meta = ImageMeta(axes="ZYX", units=("mm", "µm", "pixel"))
    assert meta.units == ("millimeter", "micrometer", None)
    assert normalize_unit("micron") == "micrometer"
    assert normalize_unit("nm") == "nanometer"
    assert normalize_unit(None) is None
    assert ImageMeta(axes="YX", units=("mm", "mm")).unit == "millimeter"
    assert meta.unit is None


def test_per_axis_values_skip_non_spatial_axes():
    meta = ImageMeta(axes="TZYX", spacing=(2.5, 0.7, 0.6), origin=(1, 2, 3))
    assert meta.axis_spacing() == (1.0, 2.5, 0.7, 0.6)
    assert meta.axis_origin() == (0.0, 1.0, 2.0, 3.0)


def test_without_channels_and_replace():
    meta = ImageMeta(axes="YXC", spacing=(0.5, 0.25), rgb=True)
    labels = meta.without_channels()
    assert labels.axes == "YX" and labels.channel_axis is None and not labels.rgb
    assert labels.spacing == (0.5, 0.25)
    moved = ImageMeta(axes="CZYX").replace(axes="ZYXC")
    assert moved.channel_axis == 3


def test_equality_compares_affines_by_value_and_meta_is_immutable():
    a = ImageMeta(axes="ZYX", affine=np.diag([0.7, 0.7, 2.5, 1.0]))
    b = ImageMeta(axes="ZYX", affine=np.diag([0.7, 0.7, 2.5, 1.0]))
    c = ImageMeta(axes="ZYX", affine=np.diag([0.7, 0.7, 2.0, 1.0]))
    assert a == b and a != c and a != ImageMeta(axes="ZYX")
    with pytest.raises(ValueError):
        a.affine[0, 0] = 3.0  # read-only
    with pytest.raises(AttributeError):
        a.axes = "YX"  # type: ignore[misc]


def test_dict_and_pickle_round_trip():
    meta = ImageMeta(
        axes="ZYX", spacing=(2.5, 0.7, 0.7), origin=(1, 2, 3), units=("mm",) * 3,
        affine=np.diag([-0.7, -0.7, 2.5, 1.0]), source="/x/ct.nii.gz",
        extra={"modality": "CT", "not_json": object()},
    )
    back = ImageMeta.from_dict(meta.to_dict())
    assert back.extra == {"modality": "CT"}
    assert back.replace(extra=meta.extra) == meta
    assert pickle.loads(pickle.dumps(meta)) .spacing == meta.spacing


def test_affine_helpers_invert_each_other():
    affine = affine_from_geometry((2.5, 0.7, 0.6), (10.0, 20.0, 30.0), "ZYX")
    assert np.allclose(np.diag(affine), [0.6, 0.7, 2.5, 1.0])
    assert np.allclose(affine[:3, 3], [30.0, 20.0, 10.0])
    spacing, origin = geometry_from_affine(affine, "ZYX")
    assert spacing == pytest.approx((2.5, 0.7, 0.6))
    assert origin == pytest.approx((10.0, 20.0, 30.0))
    # a rotation keeps the column norms as spacing
    theta = np.deg2rad(30)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    spacing, _ = geometry_from_affine(rot @ affine, "ZYX")
    assert spacing == pytest.approx((2.5, 0.7, 0.6))
    assert ImageMeta(axes="YX", spacing=(0.5, 0.25)).world_affine()[0, 0] == 0.25


def test_output_meta_follows_a_super_resolved_output():
    meta = ImageMeta(axes="ZYX", spacing=(2.0, 1.0, 1.0), origin=(0.0, 10.0, 20.0),
                     affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    out = output_meta(meta, "ZYX", (4, 8, 8), "ZYX", (4, 16, 16))
    assert out.spacing == (2.0, 0.5, 0.5)
    assert out.origin == (0.0, 9.75, 19.75)
    # voxel (0, 0, 0) of the output sits a quarter input voxel before the input's first
    np.testing.assert_allclose(out.affine @ [0, 0, 0, 1], [-0.25, -0.25, 0, 1])
    np.testing.assert_allclose(out.affine @ [2, 2, 1, 1], [0.75, 0.75, 2, 1])
    same = output_meta(ImageMeta(axes="YXC", rgb=True), "YXC", (8, 8, 3), "YX", (8, 8))
    assert same.axes == "YX" and same.spacing == (1.0, 1.0)


# --- parallel runs --------------------------------------------------------------------------
