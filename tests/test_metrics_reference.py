"""Issue #20, point 8: every metric napari-medseg shows is checked against a reference.

On the package's real sample masks (nuclei, H&E nuclei, EM membranes, dermoscopy lesion, CT
patches) against a perturbed copy (eroded, dilated, shifted, objects dropped and added):

- Dice, IoU, HD95 against MONAI (``monai.metrics``), HD95 also with anisotropic spacing and in
  3D (the EM stack's 50 x 4 x 4 nm voxels);
- boundary F1 against MONAI's surface extraction and surface distances (MONAI has no boundary
  F-score with a tolerance), and against a brute-force version of its definition;
- F1 at IoU > 0.5 and AJI, which MONAI does not have, against brute-force implementations of
  their definitions written here (every pair of objects compared mask by mask).

The empty-mask conventions differ on purpose from MONAI's (which returns NaN): both empty is a
perfect match (HD95 0), one empty gives HD95 inf; they are checked in ``test_metrics.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_medseg.engine import metrics
from napari_medseg.io import read_image
from napari_medseg.io.samples import sample_path

try:  # MONAI (the bench extra) is needed by the comparisons with it, not by the others
    import monai.metrics as monai_metrics
    import torch
except ImportError:  # pragma: no cover - scripts/setup_env.sh installs it
    monai_metrics = torch = None
needs_monai = pytest.mark.skipif(monai_metrics is None, reason="MONAI is not installed")


def _mask(name: str) -> np.ndarray:
    return np.asarray(read_image(sample_path(name, mask=True))[0])


def _shift(a: np.ndarray, offsets) -> np.ndarray:
    return ndi.shift(a, offsets, order=0, mode="constant", cval=0)


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray, tuple[float, ...]]]:
    """(prediction, reference, anisotropic spacing) pairs of binary masks from the samples."""
    nuclei = _mask("nuclei") > 0
    he = _mask("nuclei_he") > 0
    em = _mask("em_stack") > 0
    lesion = _mask("dermoscopy") > 0
    ct = _mask("ct_patches")[2] > 0
    return {
        "nuclei eroded": (ndi.binary_erosion(nuclei, iterations=2), nuclei, (0.5, 1.3)),
        "nuclei shifted": (_shift(nuclei, (3, -2)), nuclei, (1.0, 0.25)),
        "H&E nuclei dilated": (ndi.binary_dilation(he, iterations=3), he, (2.0, 0.7)),
        "EM shifted, 3D": (_shift(em, (1, 2, -3)), em, (50.0, 4.0, 4.0)),
        "lesion shifted and eroded": (ndi.binary_erosion(_shift(lesion, (20, 35)), iterations=9),
                                      lesion, (0.8, 1.1)),
        "CT patch dilated": (ndi.binary_dilation(ct, iterations=2), ct, (2.0, 2.0)),
    }


CASES = _cases()


def _t(a: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]


@needs_monai
@pytest.mark.parametrize("case", sorted(CASES))
def test_dice_and_iou_equal_monai(case):
    pred, ref, _ = CASES[case]
    want_dice = float(monai_metrics.compute_dice(_t(pred), _t(ref), include_background=True))
    want_iou = float(monai_metrics.compute_iou(_t(pred), _t(ref), include_background=True))
    assert metrics.dice(pred, ref) == pytest.approx(want_dice, rel=1e-6)
    assert metrics.iou(pred, ref) == pytest.approx(want_iou, rel=1e-6)


@needs_monai
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("anisotropic", [False, True])
def test_hd95_equals_monai(case, anisotropic):
    pred, ref, spacing = CASES[case]
    spacing = spacing if anisotropic else (1.0,) * ref.ndim
    want = float(monai_metrics.compute_hausdorff_distance(
        _t(pred), _t(ref), include_background=True, percentile=95, spacing=list(spacing)))
    got = metrics.hd95(pred, ref, spacing)
    assert got == pytest.approx(want, rel=1e-5), (case, spacing)
    assert metrics.hd95(ref, pred, spacing) == pytest.approx(got)  # symmetric


@needs_monai
def test_hd95_is_not_the_pooled_percentile():
    """A prediction that misses 8 of 82 nuclei: the reference-to-prediction distances carry the
    miss; pooled with the prediction's (all 0) they fell under the 95th percentile (7.8 px)."""
    ref = _mask("nuclei")
    pred = np.isin(ref, np.unique(ref)[1:9], invert=True) & (ref > 0)
    want = float(monai_metrics.compute_hausdorff_distance(
        _t(pred), _t(ref > 0), include_background=True, percentile=95))
    assert want > 14.0
    assert metrics.hd95(pred, ref > 0) == pytest.approx(want, rel=1e-5)


def _edges(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a face neighbour outside the mask (or on the image border)."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[tuple(slice(1, -1) for _ in mask.shape)]
    return mask & ~inner


def _brute_boundary_f1(pred: np.ndarray, ref: np.ndarray, tol: float) -> float:
    from scipy.spatial.distance import cdist

    ep, er = np.argwhere(_edges(pred)), np.argwhere(_edges(ref))
    d = cdist(ep, er)
    precision = float((d.min(axis=1) <= tol).mean())
    recall = float((d.min(axis=0) <= tol).mean())
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


@needs_monai
@pytest.mark.parametrize("case", ["nuclei eroded", "nuclei shifted", "H&E nuclei dilated",
                                  "CT patch dilated"])
@pytest.mark.parametrize("tol", [1.0, 2.0, 3.0])
def test_boundary_f1_against_monai_surfaces_and_brute_force(case, tol):
    from monai.metrics.utils import get_mask_edges, get_surface_distance

    pred, ref, _ = CASES[case]
    ep, er = get_mask_edges(pred, ref, crop=True)
    precision = float((get_surface_distance(ep, er) <= tol).mean())
    recall = float((get_surface_distance(er, ep) <= tol).mean())
    want = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    got = metrics.boundary_f1(pred, ref, tolerance=tol)
    assert got == pytest.approx(want, rel=1e-6)
    assert got == pytest.approx(_brute_boundary_f1(pred, ref, tol), rel=1e-9)


def _perturbed_instances(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The nuclei instances, and a prediction: some dropped, some shifted or eroded, two merged,
    one false positive, labels shuffled."""
    ref = _mask("nuclei").astype(np.int32)
    rng = np.random.default_rng(seed)
    pred = np.zeros_like(ref)
    ids = [i for i in np.unique(ref) if i]
    for k, i in enumerate(ids):
        obj = ref == i
        kind = rng.integers(5)
        if kind == 0:
            continue  # missed
        if kind == 1:
            obj = _shift(obj, tuple(rng.integers(-4, 5, size=2)))
        elif kind == 2:
            obj = ndi.binary_erosion(obj, iterations=int(rng.integers(1, 4)))
        pred[obj & (pred == 0)] = k + 1
    pred[ref == ids[1]] = ids[0] + 1  # two nuclei merged into one prediction
    pred[100:112, 5:15] = len(ids) + 5  # a false positive (or a split)
    perm = np.concatenate([[0], rng.permutation(np.arange(1, pred.max() + 1)) + 1])
    return perm[pred], ref


def _objects(labels: np.ndarray) -> list[np.ndarray]:
    return [labels == i for i in np.unique(labels) if i]


def _brute_f1(pred: np.ndarray, ref: np.ndarray) -> float:
    """Matches are (reference, prediction) pairs with IoU > 0.5: unique, since IoU > 0.5 leaves
    no room for a second such partner; F1 = 2 TP / (2 TP + FP + FN)."""
    gs, ps = _objects(ref), _objects(pred)
    tp = sum(1 for g in gs for p in ps if (g & p).sum() / (g | p).sum() > 0.5)
    return 2 * tp / (len(gs) + len(ps))


def _brute_aji(pred: np.ndarray, ref: np.ndarray) -> float:
    """Kumar et al.: each reference object with its best-IoU prediction (first on a tie; none
    when nothing overlaps it); unused predictions join the union."""
    gs, ps = _objects(ref), _objects(pred)
    inter = union = 0
    used = set()
    for g in gs:
        best, best_iou = None, 0.0
        for j, p in enumerate(ps):
            overlap = (g & p).sum() / (g | p).sum()
            if overlap > best_iou:
                best, best_iou = j, overlap
        if best is None:
            union += g.sum()
        else:
            inter += (g & ps[best]).sum()
            union += (g | ps[best]).sum()
            used.add(best)
    union += sum(p.sum() for j, p in enumerate(ps) if j not in used)
    return inter / union


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instance_f1_and_aji_against_brute_force(seed):
    pred, ref = _perturbed_instances(seed)
    assert metrics.instance_f1(pred, ref, 0.5) == pytest.approx(_brute_f1(pred, ref))
    assert metrics.aggregated_jaccard(pred, ref) == pytest.approx(_brute_aji(pred, ref))


def test_aji_does_not_depend_on_label_numbers():
    """A missed nucleus is not charged the area of whichever prediction has the lowest label."""
    pred, ref = _perturbed_instances(0)
    ids = np.unique(pred)[1:]
    relabelled = np.zeros_like(pred)
    for new, old in enumerate(ids[::-1], start=1):
        relabelled[pred == old] = new
    assert metrics.aggregated_jaccard(relabelled, ref) == pytest.approx(
        metrics.aggregated_jaccard(pred, ref))
