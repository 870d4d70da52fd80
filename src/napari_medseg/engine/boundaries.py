"""Boundary maps from masks, and instances from mask + boundary.

Two definitions live here:

* :func:`boundary_target` (torch): BA-Net's training target, a morphological gradient
  ``|y - avgpool3x3(y)| > 0`` (a band two pixels thick across each contour). The official code
  zero-pads, which marks foreground touching the image border as boundary; on tiles that border
  is not a real contour, so ``border="replicate"`` (the default) does not mark it.
* :func:`boundary_from_labels` (numpy): the same band for a label image (instances or classes),
  so that touching nuclei get a boundary between them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["boundary_target", "boundary_from_labels", "instances_from_mask"]


def boundary_target(mask, border: str = "replicate"):
    """BA-Net's boundary target for a binary mask.

    Args:
        mask: torch tensor N x H x W or N x 1 x H x W (0/1 or class indices; > 0 is foreground).
        border: ``"replicate"`` (no boundary at the image edge) or ``"zeros"`` (the official
            code's zero padding, which marks foreground on the border).

    Returns:
        float tensor N x H x W with 1 on boundary pixels.
    """
    import torch
    import torch.nn.functional as F

    y = (mask > 0).float()
    if y.dim() == 3:
        y = y[:, None]
    if border == "replicate":
        padded = F.pad(y, (1, 1, 1, 1), mode="replicate")
        pooled = F.avg_pool2d(padded, 3, stride=1)
    elif border == "zeros":
        pooled = F.avg_pool2d(y, 3, stride=1, padding=1, count_include_pad=True)
    else:
        raise ValueError(f"border must be 'replicate' or 'zeros', not {border!r}")
    return ((y - pooled).abs() > 1e-6).to(torch.float32)[:, 0]


def boundary_from_labels(labels: np.ndarray, mode: str = "thick") -> np.ndarray:
    """A boundary band (uint8, 1 = boundary) for a label image of any dimension.

    With ``mode="thick"`` (the training target) a pixel is boundary when its 4-neighbourhood
    (6 in 3D) holds another label: a band two pixels wide across each contour. With
    ``"inner"`` only the object's own edge pixels are: a one-pixel line, what a person draws
    as an outline. The image edge is not a boundary; touching instances get one between them.

    Args:
        labels: integer array, YX or ZYX.
        mode: ``"thick"`` or ``"inner"``.
    """
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    return find_boundaries(labels, connectivity=1, mode=mode).astype(np.uint8)


def instances_from_mask(
    mask: np.ndarray,
    boundary: np.ndarray | None = None,
    min_size: int = 8,
) -> np.ndarray:
    """Instance labels from a foreground mask, split by a boundary map where given.

    Seeds are the connected components of ``mask & ~boundary``; a watershed on the distance
    transform of the mask grows them back to the full mask, so every foreground pixel gets
    the label of its nearest seed. Seeds smaller than ``min_size`` pixels are dropped.

    Args:
        mask: foreground (> 0), YX or ZYX.
        boundary: boundary probability or binary map of the same shape (> 0.5 is boundary).
        min_size: smallest seed kept, in pixels.

    Returns:
        int32 labels, 0 = background.
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    fg = np.asarray(mask) > 0
    if not fg.any():
        return np.zeros(fg.shape, np.int32)
    seeds_fg = fg.copy()
    if boundary is not None:
        seeds_fg &= ~(np.asarray(boundary) > 0.5)
    seeds, _ = ndi.label(seeds_fg)
    if min_size > 1 and seeds.max() > 0:
        # Seeds smaller than min_size pixels go (counted with numpy: scikit-image changed
        # this argument's name and meaning between 0.25 and 0.26).
        sizes = np.bincount(seeds.ravel())
        seeds[(sizes < min_size)[seeds] & (seeds > 0)] = 0
    if seeds.max() == 0:
        seeds, _ = ndi.label(fg)
    distance = ndi.distance_transform_edt(fg)
    labels = watershed(-distance, markers=seeds, mask=fg)
    return labels.astype(np.int32)
