"""The napari reader, writers, sample data and layer conversion (GUI tests under the gui marker)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_medseg._napari import samples as napari_samples
from napari_medseg._napari.layers import META_KEY, layer_data, layer_kwargs, meta_from_attributes
from napari_medseg._napari.reader import get_reader, read_layers
from napari_medseg._napari.writer import (
    write_image_nifti,
    write_labels_nifti,
    write_labels_tiff,
    write_labels_zarr,
)
from napari_medseg.errors import ImageReadError
from napari_medseg.io import ImageMeta, read_image, write_image, write_labels

CT_SPACING = (2.5, 0.7, 0.7)  # as in conftest.py


# -- get_reader ------------------------------------------------------------------------------
def test_get_reader_accepts_what_io_reads(tmp_path, nifti_path, dicom_dir):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((4, 4), np.uint8))
    assert get_reader(str(nifti_path)) is read_layers
    assert get_reader(str(dicom_dir)) is read_layers
    assert get_reader(str(tmp_path / "a.tif")) is read_layers
    assert get_reader([str(tmp_path / "a.tif"), str(nifti_path)]) is read_layers


@pytest.mark.parametrize("bad", [None, 3, [], "", "notes.txt", ["a.tif", "b.txt"], object()])
def test_get_reader_returns_none_and_never_raises(tmp_path, bad):
    (tmp_path / "plain").mkdir()
    assert get_reader(bad) is None
    assert get_reader(str(tmp_path / "plain")) is None


def test_reader_function_raises_one_sentence_for_a_damaged_file(tmp_path, nifti_path):
    cut = tmp_path / "cut.nii.gz"
    data = nifti_path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    reader = get_reader(str(cut))
    assert reader is not None  # the name is fine; the content is checked when reading
    with pytest.raises(ImageReadError, match=r"cut\.nii\.gz is truncated"):
        reader(str(cut))


# -- layers from files -----------------------------------------------------------------------
def test_nifti_and_dicom_layers_carry_physical_scale(nifti_path, dicom_dir):
    [(data, kwargs, kind)] = read_layers(str(nifti_path))
    assert kind == "image" and data.shape == (8, 40, 48)
    assert kwargs["scale"] == CT_SPACING and kwargs["translate"] == (5.0, -3.0, 2.0)
    assert kwargs["units"] == ("millimeter",) * 3 and kwargs["axis_labels"] == ("z", "y", "x")
    assert kwargs["name"] == "ct"
    assert isinstance(kwargs["metadata"][META_KEY], ImageMeta)
    [(data, kwargs, kind)] = read_layers(str(dicom_dir))
    assert kwargs["scale"] == pytest.approx(CT_SPACING)
    assert kwargs["contrast_limits"] == (-160.0, 240.0)  # the DICOM window 40 / 400


def test_multiscale_rgb_channels_and_labels(tmp_path):
    meta = ImageMeta(axes="ZYX", spacing=(2.0, 0.5, 0.5), units=("um",) * 3)
    path = write_image(tmp_path / "pyr.zarr", np.zeros((2, 32, 32), np.uint16), meta, n_levels=3)
    [(data, kwargs, kind)] = read_layers(str(path))
    assert kwargs["multiscale"] is True and [d.shape for d in data] == [(2, 32, 32), (2, 16, 16), (2, 8, 8)]
    assert kwargs["scale"] == (2.0, 0.5, 0.5)

    from PIL import Image

    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    [(data, kwargs, kind)] = read_layers(str(tmp_path / "rgb.png"))
    assert kwargs["rgb"] is True and kwargs["scale"] == (1.0, 1.0) and "units" not in kwargs

    channels = np.zeros((2, 3, 8, 8), np.uint16)
    write_image(tmp_path / "c.tif", channels, ImageMeta(axes="CZYX", spacing=(1.0, 0.2, 0.2), units=("um",) * 3))
    [(data, kwargs, kind)] = read_layers(str(tmp_path / "c.tif"))
    assert kwargs["channel_axis"] == 0 and kwargs["scale"] == (1.0, 0.2, 0.2)
    assert kwargs["name"] == ["c [0]", "c [1]"] and len(kwargs["metadata"]) == 2
    assert kwargs["metadata"][0][META_KEY].axes == "ZYX"

    write_labels(tmp_path / "m.tif", np.ones((3, 8, 8), np.uint8), meta)
    [(data, kwargs, kind)] = read_layers(str(tmp_path / "m.tif"))
    assert kind == "labels" and kwargs["scale"] == (2.0, 0.5, 0.5) and "rgb" not in kwargs


def test_ome_zarr_labels_group_opens_as_extra_layers(tmp_path):
    meta = ImageMeta(axes="YX", spacing=(0.5, 0.5), units=("um", "um"))
    path = write_image(tmp_path / "cells.zarr", np.zeros((16, 16), np.uint8), meta)
    write_labels(path / "labels" / "nuclei", np.ones((16, 16), np.uint8), meta)
    layers = read_layers(str(path))
    assert [(kw["name"], kind) for _, kw, kind in layers] == [("cells", "image"), ("nuclei", "labels")]
    assert layers[1][1]["scale"] == (0.5, 0.5)


# -- layer <-> meta --------------------------------------------------------------------------
def test_layer_kwargs_for_labels_drop_the_channel_axis():
    meta = ImageMeta(axes="CZYX", spacing=(3.0, 0.4, 0.4))
    kwargs = layer_kwargs(meta, name="mask", layer_type="labels")
    assert kwargs["scale"] == (3.0, 0.4, 0.4) and "channel_axis" not in kwargs
    assert kwargs["metadata"][META_KEY].axes == "ZYX"


def test_meta_from_attributes_prefers_what_the_user_changed():
    affine = np.diag([-0.7, -0.7, 2.5, 1.0])
    meta = ImageMeta(axes="ZYX", spacing=CT_SPACING, units=("mm",) * 3, affine=affine)
    data = np.zeros((2, 3, 4), np.uint8)
    _, kwargs, _ = layer_data(data, meta, "labels")
    assert np.array_equal(meta_from_attributes(data, kwargs).affine, affine)
    moved = dict(kwargs, scale=(5.0, 0.7, 0.7))
    changed = meta_from_attributes(data, moved)
    assert changed.spacing == (5.0, 0.7, 0.7) and changed.affine is None
    bare = meta_from_attributes(data, {"scale": (2.0, 1.0, 1.0), "translate": (0, 0, 0), "units": ("mm", "mm", "mm")})
    assert bare.axes == "ZYX" and bare.spacing == (2.0, 1.0, 1.0) and bare.units == ("millimeter",) * 3
    rgb = meta_from_attributes(np.zeros((4, 5, 3), np.uint8), {"rgb": True, "scale": (0.5, 0.5)})
    assert rgb.axes == "YXC" and rgb.rgb and rgb.spacing == (0.5, 0.5)


# -- writers ---------------------------------------------------------------------------------
def test_writers_round_trip_a_labels_layer(tmp_path, nifti_path, ct_volume):
    [(_, image_kwargs, _)] = read_layers(str(nifti_path))
    image_meta = image_kwargs["metadata"][META_KEY]
    mask = ct_volume[1]
    _, attributes, _ = layer_data(mask, image_meta, "labels", name="lesion")
    [out] = write_labels_nifti(str(tmp_path / "lesion.nii.gz"), mask, attributes)
    assert np.array_equal(nib.load(out).affine, nib.load(str(nifti_path)).affine)
    assert np.array_equal(read_image(out)[0], mask)
    [out] = write_labels_tiff(str(tmp_path / "lesion.tif"), mask, attributes)
    back, back_meta = read_image(out)
    assert np.array_equal(back, mask) and back_meta.spacing == CT_SPACING
    [out] = write_labels_zarr(str(tmp_path / "lesion.zarr"), [mask, mask[:, ::2, ::2]], attributes)
    back, back_meta = read_image(out)
    assert np.array_equal(np.asarray(back), mask) and back_meta.origin == (5.0, -3.0, 2.0)
    [out] = write_image_nifti(str(tmp_path / "copy.nii.gz"), ct_volume[0], image_kwargs)
    assert np.array_equal(read_image(out)[0], ct_volume[0])


def test_samples_give_an_image_and_its_labels():
    layers = napari_samples.em_stack()
    assert [kind for _, _, kind in layers] == ["image", "labels"]
    assert layers[0][1]["scale"] == (50.0, 4.0, 4.0) and layers[1][1]["scale"] == (50.0, 4.0, 4.0)
    assert layers[0][1]["units"] == ("nanometer",) * 3
    image, kwargs, _ = napari_samples.dermoscopy()[0]
    assert kwargs["rgb"] is True and image.shape[-1] == 3
    image, kwargs, _ = napari_samples.ct_patches()[0]
    assert kwargs["scale"] == (1.0, 2.0, 2.0) and kwargs["axis_labels"] == ("i", "y", "x")
    assert napari_samples.nuclei()[1][0].max() > 10


# -- in a real viewer --------------------------------------------------------------------------
def test_viewer_opens_nifti_and_dicom_with_their_scale(make_napari_viewer, nifti_path, dicom_dir):
    viewer = make_napari_viewer()
    [ct] = viewer.open(str(nifti_path), plugin="napari-medseg")
    assert np.allclose(ct.scale, CT_SPACING) and np.allclose(ct.translate, (5.0, -3.0, 2.0))
    [dcm] = viewer.open(str(dicom_dir), plugin="napari-medseg")
    assert np.allclose(dcm.scale, CT_SPACING)
    # physical extent: 8 slices of 2.5 mm span 17.5 mm between first and last centre
    assert np.allclose(dcm.extent.world[1] - dcm.extent.world[0], [7 * 2.5, 39 * 0.7, 47 * 0.7])


def test_viewer_shows_our_sentence_for_a_damaged_file(make_napari_viewer, tmp_path, nifti_path, monkeypatch):
    from napari.errors import ReaderPluginError
    from napari.settings import get_settings

    viewer = make_napari_viewer()
    cut = tmp_path / "cut.nii.gz"
    data = nifti_path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    # a user who chose napari-medseg for *.nii.gz (napari's builtins claim every file too):
    # napari wraps our error, and its message ends with our sentence
    settings = get_settings()
    monkeypatch.setattr(settings.plugins, "extension2reader", {"*.nii.gz": "napari-medseg"})
    with pytest.raises(ReaderPluginError) as info:
        viewer.open(str(cut), plugin=None)
    assert isinstance(info.value.original_error, ImageReadError)
    assert str(info.value).endswith(str(info.value.original_error))
    assert "cut.nii.gz is truncated" in str(info.value)
    # ... and passes it through unchanged when the plugin is named
    with pytest.raises(ImageReadError, match=r"cut\.nii\.gz is truncated"):
        viewer.open(str(cut), plugin="napari-medseg")
    assert len(viewer.layers) == 0


def test_napari_made_labels_layer_saves_with_the_image_affine(make_napari_viewer, tmp_path, dicom_dir):
    viewer = make_napari_viewer(show=True)
    [image] = viewer.open(str(dicom_dir), plugin="napari-medseg")
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), scale=image.scale, translate=image.translate)
    labels.data[2, 5:9, 5:9] = 1
    assert META_KEY not in labels.metadata  # a layer napari made, no geometry of ours
    viewer.layers.selection = {labels}
    [out] = viewer.layers.save(str(tmp_path / "drawn.nii.gz"), selected=True, plugin="napari-medseg")
    written = nib.load(out)
    assert np.allclose(written.affine, image.metadata[META_KEY].affine, atol=1e-4)
    assert np.asanyarray(written.dataobj)[5:9, 5:9, 2].all()
