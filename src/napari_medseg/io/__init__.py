"""Reading and writing images with their geometry: ``(array, ImageMeta)`` in, and out.

Formats: TIFF/OME-TIFF, zarr/OME-Zarr (lazy dask arrays, pyramids), NIfTI, DICOM series
(folders), PNG/JPEG/BMP. Importing this package is cheap: tifffile, zarr, nibabel and
pydicom are imported by the function that needs them, and torch never.

Example::

    from napari_medseg.io import read_image, write_labels
    image, meta = read_image("ct.nii.gz")          # ZYX, meta.spacing in mm, meta.affine
    write_labels("ct_mask.nii.gz", mask, meta)      # same affine as the CT
"""

from __future__ import annotations

from .api import read_image, read_levels, write_image, write_labels
from .detect import detect_format, is_supported, supported_suffixes
from .metadata import ImageMeta

__all__ = [
    "ImageMeta",
    "read_image",
    "read_levels",
    "write_labels",
    "write_image",
    "supported_suffixes",
    "is_supported",
    "detect_format",
]
