"""The offline sample images shipped inside the package (``napari_medseg/_samples``).

Each sample is an OME-TIFF image with its geometry, plus a label image; the sources,
licences and citations are in ``_samples/ATTRIBUTION.md``. ``scripts/make_samples.py``
rebuilds them from the shared datasets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImageReadError
from ..resources import samples_dir
from .metadata import ImageMeta

__all__ = ["Sample", "SAMPLES", "list_samples", "sample_path", "load_sample"]


@dataclass(frozen=True)
class Sample:
    """One shipped sample.

    Attributes:
        name: key used by :func:`sample_path` and the napari sample menu.
        title: what the napari menu shows.
        image: file name of the image in ``_samples``.
        mask: file name of its label image in ``_samples``.
        dataset: the dataset it was cut from (see ATTRIBUTION.md).
        description: one line on what it is (axes, size, spacing).
        modality: what kind of image it is, stored in ``meta.extra["modality"]`` when it is
            read (the model cards' ``intended_for`` is matched against it).
    """

    name: str
    title: str
    image: str
    mask: str
    dataset: str
    description: str
    modality: str = ""


def _sample(name: str, title: str, dataset: str, description: str, modality: str) -> Sample:
    """A sample whose files are ``<name>.tif`` and ``<name>_mask.tif``."""
    return Sample(name, title, f"{name}.tif", f"{name}_mask.tif", dataset, description,
                  modality)


SAMPLES: dict[str, Sample] = {
    s.name: s
    for s in (
        _sample("nuclei", "Nuclei, fluorescence (DSB2018)", "DSB2018 / BBBC038",
                "YX uint8 256x256 grey nuclear stain; 82 labelled nuclei", "fluorescence"),
        _sample("nuclei_he", "Nuclei, stained tissue (DSB2018)", "DSB2018 / BBBC038",
                "YXC uint8 256x320 RGB H&E-like tissue; 82 labelled nuclei", "H&E"),
        _sample("em_stack", "EM stack, 4x4x50 nm (ISBI 2012)", "ISBI 2012 EM",
                "ZYX uint8 5x256x256 ssTEM crop, 4x4x50 nm voxels; membrane mask", "ssTEM"),
        _sample("dermoscopy", "Dermoscopy (PH2)", "PH2",
                "YXC uint8 RGB melanoma image at half resolution; lesion mask", "dermoscopy"),
        _sample("ct_patches", "CT lung patches, 2 mm (MSD Task06)", "MSD Task06 Lung",
                "IYX float32 6x48x48 CT patches (2 mm pixels, Hounsfield units); tumour masks",
                "CT"),
    )
}


def list_samples() -> list[str]:
    """Names of the shipped samples."""
    return list(SAMPLES)


def sample_path(name: str, mask: bool = False) -> Path:
    """The file of a shipped sample image (or of its label image with ``mask=True``).

    Args:
        name: one of :func:`list_samples`, e.g. ``"nuclei"``.
        mask: return the label image instead of the image.

    Raises:
        ImageReadError: unknown name, or the file is missing from this installation.
    """
    sample = SAMPLES.get(name)
    if sample is None:
        raise ImageReadError(f"There is no sample called {name!r}; choose one of {', '.join(SAMPLES)}.")
    path = samples_dir() / (sample.mask if mask else sample.image)
    if not path.is_file():
        raise ImageReadError(
            f"The sample file {path} is missing from this installation; reinstall napari-medseg."
        )
    return path


def load_sample(name: str) -> tuple[Any, ImageMeta, Any]:
    """Read a shipped sample: ``(image, meta, labels)`` with the labels on the same grid.

    Args:
        name: one of :func:`list_samples`.

    Returns:
        The image (axes ``meta.axes``), its metadata, and the label image (the spatial
        axes of ``meta``).
    """
    from .api import read_image

    image, meta = read_image(sample_path(name))
    labels, _ = read_image(sample_path(name, mask=True))
    modality = SAMPLES[name].modality
    if modality and not meta.extra.get("modality"):
        meta = meta.replace(extra={**meta.extra, "modality": modality})
    return image, meta, labels
