"""What a package says about where its network and its training data come from.

The papers of the five networks (``models/<network>.md``), the data sets the shipped weights
were trained on (their licences and citations as ``_samples/ATTRIBUTION.md`` gives them), the
shipped sample an export takes its test tensors from, and the licence a package states for
weights trained on each data set. Plain data: no bioimage.io import.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Reference", "DataSource", "NETWORK_PAPERS", "DATA_SOURCES", "DEFAULT_LICENCE",
           "data_source"]

#: The licence of weights whose training data asks for nothing stricter: the project's own.
DEFAULT_LICENCE = "BSD-3-Clause"


@dataclass(frozen=True)
class Reference:
    """One citation: a line of text and its DOI."""

    text: str
    doi: str


@dataclass(frozen=True)
class DataSource:
    """A training data set as a package describes it.

    Attributes:
        name: what it is called.
        terms: its licence or terms of use, in words.
        licence: the SPDX licence the package gives weights trained on it.
        cite: the papers to cite for it.
        sample: the shipped sample (:mod:`napari_medseg.io.samples`) the test tensors come
            from; a grey sample feeds a 3-channel network as RGB, and the reverse.
    """

    name: str
    terms: str
    licence: str
    cite: tuple[Reference, ...]
    sample: str


NETWORK_PAPERS: dict[str, Reference] = {
    "sa2net": Reference(
        "Fiaz M. et al. SA2-Net: Scale-aware Attention Network for Microscopic Image "
        "Segmentation. BMVC 2023 (arXiv 2309.16661).", "10.48550/arXiv.2309.16661"),
    "msa2net": Reference(
        "Kolahi S.G. et al. MSA2Net: Multi-scale Adaptive Attention-guided Network for "
        "Medical Image Segmentation. BMVC 2024 (arXiv 2407.21640).",
        "10.48550/arXiv.2407.21640"),
    "banet": Reference(
        "Wang R., Chen S., Ji C., Fan J., Li Y. Boundary-aware context neural network for "
        "medical image segmentation. Medical Image Analysis 78:102395 (2022).",
        "10.1016/j.media.2022.102395"),
    "unet_sharp": Reference(
        "Qian L., Zhou X., Li Y., Hu Z. UNet#: A UNet-like Redesigning Skip Connections for "
        "Medical Image Segmentation. arXiv 2205.11759 (2022).", "10.48550/arXiv.2205.11759"),
    "sasrnet": Reference(
        "Luo et al. Scale-aware Super-resolution Network with Dual Affinity Learning for "
        "Lesion Segmentation from Medical Images. IEEE TNNLS (2024).",
        "10.1109/TNNLS.2024.3477947"),
}

_DSB = DataSource(
    "DSB2018 nuclei (BBBC038, Kaggle Data Science Bowl 2018)", "CC0 1.0", DEFAULT_LICENCE,
    (Reference("Caicedo J.C. et al. Nucleus segmentation across imaging experiments: the 2018 "
               "Data Science Bowl. Nature Methods 16, 1247-1253 (2019).",
               "10.1038/s41592-019-0612-7"),),
    "nuclei_he")

DATA_SOURCES: dict[str, DataSource] = {
    "dsb2018_nuclei": _DSB,
    "isbi2012_em": DataSource(
        "ISBI 2012 EM segmentation challenge (Drosophila VNC, ssTEM)",
        "research use; the data come from Cardona et al. 2010 (CC BY)", "CC-BY-4.0",
        (Reference("Arganda-Carreras I. et al. Crowdsourcing the creation of image "
                   "segmentation algorithms for connectomics. Front. Neuroanat. 9:142 (2015).",
                   "10.3389/fnana.2015.00142"),
         Reference("Cardona A. et al. An integrated micro- and macroarchitectural analysis of "
                   "the Drosophila brain by computer-assisted serial section electron "
                   "microscopy. PLoS Biol. 8(10):e1000502 (2010).",
                   "10.1371/journal.pbio.1000502")),
        "em_stack"),
    "ph2_dermoscopy": DataSource(
        "PH2 dermoscopic image database",
        "free for research and benchmarking; non-commercial", "CC-BY-NC-4.0",
        (Reference("Mendonca T. et al. PH2 - A dermoscopic image database for research and "
                   "benchmarking. 35th IEEE EMBC, 5437-5440 (2013).",
                   "10.1109/EMBC.2013.6610779"),),
        "dermoscopy"),
    "msd_lung_patches": DataSource(
        "Medical Segmentation Decathlon, Task06 Lung (2 mm CT patches)", "CC BY-SA 4.0",
        "CC-BY-SA-4.0",
        (Reference("Antonelli M. et al. The Medical Segmentation Decathlon. Nature "
                   "Communications 13, 4128 (2022).", "10.1038/s41467-022-30695-9"),),
        "ct_patches"),
}


def data_source(dataset: str | None) -> DataSource | None:
    """The known data set of that folder name, or None (a user's own data)."""
    return DATA_SOURCES.get(str(dataset or ""))
