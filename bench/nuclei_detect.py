"""The nuclei detector and the matching of ``bench/nuclei.py`` (issue #29): what a classical
pipeline finds in an H&E image, and how the detections in a decoded image are compared with the
original's.

The detector (:func:`detect`), with every length in µm converted by the set's pixel size (so the
same physical settings run at 40x, 20x and 10x; see ``bench/datasets.py``):

1. **Haematoxylin**: ``skimage.color.rgb2hed`` (Ruifrok & Johnston colour deconvolution, the
   standard H&E-DAB stain vectors), channel 0 (haematoxylin optical density).
2. **Smoothing**: Gaussian, σ = 0.5 µm.
3. **Threshold**: Otsu's threshold of the *original's* smoothed haematoxylin, reused unchanged on
   every decoded version of that image. A threshold recomputed on each decoded image would move
   with the codec (a codec that shifts the stain histogram shifts Otsu's cut) and mix two
   effects; a deployed pipeline calibrates its threshold once and keeps it. So what changes
   between original and decoded is the pixels only. (``detect(..., threshold=None)`` computes
   Otsu on the image itself, for other uses.)
4. **Clean-up**: holes under 30 µm² filled, objects under 12 µm² (a disc of 3.9 µm across)
   removed.
5. **Splitting touching nuclei**: Euclidean distance transform of the mask; its local maxima at
   least 3 µm apart (one per connected object at least) seed a watershed of the negated distance
   within the mask; pieces under 12 µm² are dropped again.

Matching (:func:`match`): each nucleus is its centroid; original and decoded nuclei are paired by a
minimum-cost assignment (Hungarian, ``scipy.optimize.linear_sum_assignment``) that first
maximises the number of pairs closer than **3 µm** (about half a typical nuclear diameter: a
nucleus merged with or split from its neighbour moves its centroid further than that, and counts
as an error), then minimises their total distance. The assignment is solved per connected group
of candidate pairs (exact, and small). Reported per image:

- ``f1`` = 2·TP / (n_original + n_decoded), TP the matched pairs: the original's detections are
  the reference. Symmetric in the two images.
- ``area_change``: mean over matched pairs of |A_decoded − A_original| / A_original;
  ``area_bias`` the same signed (positive: nuclei grow).
- ``mask_dice``: Dice of the two nuclear masks (pixel level, before splitting).
- ``n_orig``, ``n_dec``, ``tp``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: detector settings in µm / µm² (converted to pixels with the set's µm per pixel)
SMOOTH_SIGMA_UM = 0.5
MIN_AREA_UM2 = 12.0
HOLE_AREA_UM2 = 30.0
PEAK_MIN_DISTANCE_UM = 3.0
MATCH_RADIUS_UM = 3.0


@dataclass
class Nuclei:
    """What :func:`detect` finds in one image."""

    labels: np.ndarray          # (h, w) int32, 0 = background, 1..n nuclei
    centroids: np.ndarray       # (n, 2) float64, (row, col) in pixels
    areas: np.ndarray           # (n,) float64, pixels
    mask: np.ndarray            # (h, w) bool, the thresholded and cleaned mask before splitting
    threshold: float            # the haematoxylin threshold that was applied

    @property
    def n(self) -> int:
        return len(self.areas)


def haematoxylin(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """The smoothed haematoxylin optical density (steps 1-2)."""
    from skimage import color, filters
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (h, w, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    h = color.rgb2hed(rgb)[..., 0]
    return filters.gaussian(h, sigma=SMOOTH_SIGMA_UM / mpp, preserve_range=True)


def otsu_threshold(rgb: np.ndarray, mpp: float) -> float:
    """Otsu's threshold of the smoothed haematoxylin channel: computed once, on the original."""
    from skimage import filters
    return float(filters.threshold_otsu(haematoxylin(rgb, mpp)))


def _keep_large(mask: np.ndarray, min_area: int) -> np.ndarray:
    """The 4-connected components of ``mask`` with at least ``min_area`` pixels."""
    from scipy import ndimage as ndi
    lab, _ = ndi.label(mask)
    keep = np.bincount(lab.ravel()) >= min_area
    keep[0] = False
    return keep[lab]


def detect(rgb: np.ndarray, mpp: float, threshold: float | None = None) -> Nuclei:
    """Nuclei in an H&E image with ``mpp`` µm per pixel; ``threshold``: the haematoxylin cut (the
    original's :func:`otsu_threshold` when comparing; None: Otsu on this image)."""
    from scipy import ndimage as ndi
    from skimage import feature, segmentation

    hem = haematoxylin(rgb, mpp)
    if threshold is None:
        from skimage import filters
        threshold = float(filters.threshold_otsu(hem))
    px2 = mpp * mpp
    min_area = max(1, int(round(MIN_AREA_UM2 / px2)))
    mask = hem > threshold
    mask |= ~_keep_large(~mask, int(round(HOLE_AREA_UM2 / px2)))   # fill holes under 30 µm²
    mask = _keep_large(mask, min_area)

    dist = ndi.distance_transform_edt(mask)
    objects, n_obj = ndi.label(mask)
    min_dist = max(1, int(round(PEAK_MIN_DISTANCE_UM / mpp)))
    peaks = feature.peak_local_max(dist, min_distance=min_dist, labels=objects, exclude_border=False,
                                   num_peaks_per_label=np.inf)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    labels = segmentation.watershed(-dist, markers, mask=mask).astype(np.int32)

    # areas and centroids by bincount (faster than regionprops), dropping small pieces
    n = int(labels.max())
    idx = labels.ravel()
    area = np.bincount(idx, minlength=n + 1).astype(np.float64)
    rows, cols = np.indices(labels.shape)
    sr = np.bincount(idx, weights=rows.ravel(), minlength=n + 1)
    sc = np.bincount(idx, weights=cols.ravel(), minlength=n + 1)
    keep = np.flatnonzero(area >= min_area)
    keep = keep[keep > 0]
    relabel = np.zeros(n + 1, np.int32)
    relabel[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    labels = relabel[labels]
    centroids = np.stack([sr[keep] / area[keep], sc[keep] / area[keep]], axis=1) if len(keep) \
        else np.zeros((0, 2))
    return Nuclei(labels, centroids, area[keep], mask, float(threshold))


# ------------------------------------------------------------------------------------- matching

def match(a: np.ndarray, b: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Pair points ``a`` (n, 2) with points ``b`` (m, 2): the most pairs closer than ``radius``
    (≤), then the least total distance among those. Returns index arrays ``(ia, ib)`` of equal
    length. Solved exactly per connected group of candidate pairs."""
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    a, b = np.asarray(a, np.float64).reshape(-1, 2), np.asarray(b, np.float64).reshape(-1, 2)
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    pairs = cKDTree(a).sparse_distance_matrix(cKDTree(b), radius, output_type="ndarray")
    if len(pairs) == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    pi, pj, pd = pairs["i"].astype(np.intp), pairs["j"].astype(np.intp), pairs["v"]
    n, m = len(a), len(b)
    # bipartite graph: nodes 0..n-1 are a, n..n+m-1 are b
    graph = coo_matrix((np.ones(len(pi)), (pi, pj + n)), shape=(n + m, n + m))
    _, comp = connected_components(graph, directed=False)
    order = np.argsort(comp[pi], kind="stable")
    pi, pj, pd = pi[order], pj[order], pd[order]
    bounds = np.flatnonzero(np.diff(comp[pi])) + 1
    out_a, out_b = [], []
    for sl in np.split(np.arange(len(pi)), bounds):
        ia, ja = np.unique(pi[sl]), np.unique(pj[sl])
        if len(ia) == 1 and len(ja) == 1:
            out_a.append(ia)
            out_b.append(ja)
            continue
        # forbidden pairs cost more than every allowed assignment together: the optimum first
        # maximises the number of allowed pairs, then minimises their summed distance
        big = radius * (min(len(ia), len(ja)) + 1) + 1.0
        cost = np.full((len(ia), len(ja)), big)
        cost[np.searchsorted(ia, pi[sl]), np.searchsorted(ja, pj[sl])] = pd[sl]
        r, c = linear_sum_assignment(cost)
        ok = cost[r, c] <= radius
        out_a.append(ia[r[ok]])
        out_b.append(ja[c[ok]])
    return np.concatenate(out_a), np.concatenate(out_b)


def compare(orig: Nuclei, dec: Nuclei, mpp: float) -> dict:
    """F1 of ``dec``'s detections against ``orig``'s, and the area change of matched nuclei."""
    ia, ib = match(orig.centroids, dec.centroids, MATCH_RADIUS_UM / mpp)
    tp = len(ia)
    denom = orig.n + dec.n
    f1 = 1.0 if denom == 0 else 2.0 * tp / denom
    if tp:
        rel = (dec.areas[ib] - orig.areas[ia]) / orig.areas[ia]
        area_change, area_bias = float(np.mean(np.abs(rel))), float(np.mean(rel))
    else:
        area_change = area_bias = math.nan
    inter = np.count_nonzero(orig.mask & dec.mask)
    msum = np.count_nonzero(orig.mask) + np.count_nonzero(dec.mask)
    return {"f1": f1, "tp": tp, "n_orig": orig.n, "n_dec": dec.n,
            "precision": tp / dec.n if dec.n else math.nan,
            "recall": tp / orig.n if orig.n else math.nan,
            "area_change": area_change, "area_bias": area_bias,
            "mask_dice": 1.0 if msum == 0 else 2.0 * inter / msum}
