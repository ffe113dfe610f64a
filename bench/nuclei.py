"""Diagnostic fidelity: does compression change the nuclei a classical detector finds? (issue #29)

PSNR, MS-SSIM and LPIPS say how far the decoded pixels are from the original ones, not whether
what is *found* in the tissue changes. This script runs one documented, classical nuclei
detector on the original and on every decoded version and compares what it finds: detection F1
against the original's detections, and the change in area of the nuclei found in both.

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

Codecs and rates (``SWEEPS``): the learned codec through ``wsicodec.encode(rgb, q, tile_size=256)``
/ ``wsicodec.decode`` (qualities 1-8; bytes = the whole stream), the classical codecs through
``wsicodec.codecs.get_codec(...).encode`` on the whole image (bytes = the whole output). bpp =
8·bytes / pixels. PSNR and MS-SSIM from ``bench/metrics.py``. Only public wsicodec APIs are used.

Outputs (``bench/results/``): ``nuclei.json`` (per set, per codec, per rate: the per-image numbers
and their means; the equal-bpp comparison of the learned codec against JPEG XL; environment),
``nuclei.png`` (F1 and area change against bpp, one column per set) and ``nuclei_crop.png`` (the
detector's outlines on the original, the learned codec and JPEG XL at about the same bpp).

    PYTHONPATH=$PWD .venv/bin/python bench/nuclei.py                    # every set, every image
    PYTHONPATH=$PWD .venv/bin/python bench/nuclei.py --limit 4          # 4 he/test images per he set
    PYTHONPATH=$PWD .venv/bin/python bench/nuclei.py --report-only      # plot + summary from the JSON

What this does **not** measure: it is no pathologist study and no validated diagnostic
algorithm; a learned (deep) detector may react differently; the originals were already lossy.
See bench/README.md, "Diagnostic fidelity".
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: import bench and wsicodec from this checkout
    sys.path.insert(0, str(REPO))

from bench.report import (cpu_model, git_state, imagecodecs_versions, json_safe, log,  # noqa: E402
                          package_versions)
from wsicodec.checkpoint import sha256_file  # noqa: E402  (a file's hash; imports no torch)

SCHEMA = "wsicodec-nuclei/1"

# ------------------------------------------------------------------------------------ the detector

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


# ------------------------------------------------------------------------------------------ codecs

@dataclass(frozen=True)
class Sweep:
    key: str
    codec: str
    label: str
    rates: tuple[float, ...]
    options: dict = field(default_factory=dict)
    knob: str = "quality"


SWEEPS: dict[str, Sweep] = {s.key: s for s in (
    Sweep("learned", "learned", "wsicodec learned (256² tiles)", (1, 2, 3, 4, 5, 6, 7, 8)),
    Sweep("jpegxl", "jpegxl", "JPEG XL (libjxl, effort 7)", (25.0, 15.0, 10.0, 6.0, 4.0, 2.5, 1.6, 1.0, 0.6, 0.3),
          {"effort": 7}, knob="distance"),
    Sweep("jpeg420", "jpeg", "JPEG 4:2:0", (10, 25, 50, 75, 90), {"subsampling": "420"}),
    Sweep("jpeg444", "jpeg", "JPEG 4:4:4", (10, 25, 50, 75, 90), {"subsampling": "444"}),
    Sweep("webp", "webp", "WebP lossy", (15, 35, 55, 75, 90)),
)}
LEARNED_TILE = 256
PLOT_STYLE = {"learned": ("black", "o"), "jpegxl": ("tab:blue", "s"), "jpeg420": ("tab:orange", "v"),
              "jpeg444": ("tab:red", "^"), "webp": ("tab:green", "D")}


class LearnedPublic:
    """The learned codec through the package's public API only."""

    def __init__(self, quality: float) -> None:
        self.quality = quality

    def encode(self, rgb: np.ndarray) -> bytes:
        import wsicodec
        return wsicodec.encode(rgb, quality=self.quality, tile_size=LEARNED_TILE)

    def decode(self, data: bytes) -> np.ndarray:
        import wsicodec
        return wsicodec.decode(data)

    def to_dict(self) -> dict:
        return {"api": "wsicodec.encode/decode", "quality": self.quality, "tile_size": LEARNED_TILE}


def build_codec(sweep: Sweep, rate: float):
    if sweep.codec == "learned":
        return LearnedPublic(rate)
    from wsicodec.codecs import get_codec
    return get_codec(sweep.codec, quality=rate, **sweep.options)


def code(codec, rgb: np.ndarray) -> tuple[int, np.ndarray]:
    data = codec.encode(rgb)
    dec = np.asarray(codec.decode(data))
    if dec.shape != rgb.shape or dec.dtype != np.uint8:
        raise RuntimeError(f"decoded {dec.shape} {dec.dtype}, expected {rgb.shape} uint8")
    return len(data), dec


# ------------------------------------------------------------------------------------- small tools


def environment(threads: int) -> dict:
    versions = package_versions(("numpy", "scipy", "scikit-image", "torch", "imagecodecs",
                                 "pytorch-msssim", "matplotlib", "pillow", "openslide-python",
                                 "openslide-bin", "compressai"))
    libs = imagecodecs_versions(("jpeg8", "jpegxl", "webp"))
    commit, dirty = git_state(REPO, ("wsicodec", "bench", ":(exclude)bench/results"))
    cpu = cpu_model()
    # the packaged weight files (the learned codec's shipped model), hashed here as files
    import wsicodec
    weights = {p.name: sha256_file(p) for p in sorted(Path(wsicodec.__file__).parent.rglob("*.pt"))}
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "loadavg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "platform": platform.platform(),
        "packages": versions, "libraries": libs, "git_commit": commit,
        "git_dirty_wsicodec_or_bench": dirty, "wsicodec_weight_files": weights,
    }


# ------------------------------------------------------------------------------------------ the run

def run_set(ds, keys: list[str], limit: int | None) -> dict:
    """Every image of one set through every (codec, rate)."""
    from bench import metrics
    per: dict[str, list[list[dict]]] = {k: [[] for _ in SWEEPS[k].rates] for k in keys}
    images = []
    t0 = time.perf_counter()
    for name, rgb in ds.images(limit=limit):
        h, w = rgb.shape[:2]
        thr = otsu_threshold(rgb, ds.mpp)
        ref = detect(rgb, ds.mpp, thr)
        ms_ref = metrics.MsSsimReference(rgb)
        areas_um2 = ref.areas * ds.mpp ** 2
        images.append({"name": name, "width": w, "height": h, "threshold": thr, "n_nuclei": ref.n,
                       "median_area_um2": float(np.median(areas_um2)) if ref.n else None,
                       "nuclear_fraction": float(ref.mask.mean()),
                       "sha256_rgb": hashlib.sha256(rgb.tobytes()).hexdigest()})
        for k in keys:
            s = SWEEPS[k]
            for ri, rate in enumerate(s.rates):
                rec: dict[str, Any] = {"image": name}
                try:
                    nbytes, dec = code(build_codec(s, rate), rgb)
                except Exception as exc:  # one failing point must not lose the run
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                    log(f"  {ds.name} {k} {rate} {name}: {rec['error']}")
                    per[k][ri].append(rec)
                    continue
                rec.update({"bytes": nbytes, "bpp": 8.0 * nbytes / (h * w),
                            "psnr": metrics.psnr(rgb, dec), "ms_ssim": ms_ref.against(dec)})
                rec.update(compare(ref, detect(dec, ds.mpp, thr), ds.mpp))
                per[k][ri].append(rec)
        log(f"  {ds.name} {name}: {ref.n} nuclei, {time.perf_counter() - t0:.0f} s so far")
    codecs = {}
    n_img = len(images)
    for k in keys:
        s = SWEEPS[k]
        points = []
        for ri, rate in enumerate(s.rates):
            recs = per[k][ri]
            ok = [r for r in recs if "error" not in r]
            p: dict[str, Any] = {s.knob: rate, "per_image": recs}
            if ok and len(ok) == n_img:
                p["mean"] = {m: float(np.nanmean([r[m] for r in ok])) for m in (
                    "bpp", "psnr", "ms_ssim", "f1", "precision", "recall", "area_change",
                    "area_bias", "mask_dice", "n_dec")}
                p["mean"]["n_orig"] = float(np.mean([r["n_orig"] for r in ok]))
                tp, no, nd = (sum(r[m] for r in ok) for m in ("tp", "n_orig", "n_dec"))
                p["mean"]["f1_pooled"] = 2.0 * tp / (no + nd) if no + nd else 1.0
            else:
                p["mean"] = None
            points.append(p)
        codecs[k] = {"label": s.label, "codec": s.codec, "options": s.options, "knob": s.knob,
                     "config": build_codec(s, s.rates[0]).to_dict(), "points": points}
    return {**ds.to_dict(), "images": images, "limit": limit, "codecs": codecs,
            "seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------------- the comparison

def _curve(entry: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [p["mean"] for p in entry["points"] if p.get("mean")]
    pts.sort(key=lambda m: m["bpp"])
    return np.array([m["bpp"] for m in pts]), np.array([m[key] for m in pts])


def _image_curve(entry: dict, image: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    recs = [r for p in entry["points"] for r in p["per_image"]
            if r.get("image") == image and "error" not in r]
    recs.sort(key=lambda r: r["bpp"])
    return np.array([r["bpp"] for r in recs]), np.array([r[key] for r in recs])


def equal_bpp(x_test: np.ndarray, y_test: np.ndarray, x_ref: np.ndarray, y_ref: np.ndarray,
              grid: int = 64) -> dict | None:
    """``test − ref`` at equal bpp over the shared bpp range, both curves linear in log-bpp:
    at the test's own points inside the range, and on ``grid`` log-spaced points across it."""
    if len(x_test) < 2 or len(x_ref) < 2:
        return None
    lo, hi = max(x_test.min(), x_ref.min()), min(x_test.max(), x_ref.max())
    if not lo < hi:
        return None
    lt, lr = np.log(x_test), np.log(x_ref)
    inside = (x_test >= lo) & (x_test <= hi)
    at_points = y_test[inside] - np.interp(lt[inside], lr, y_ref)
    g = np.linspace(np.log(lo), np.log(hi), grid)
    on_grid = np.interp(g, lt, y_test) - np.interp(g, lr, y_ref)
    return {"bpp_range": [float(lo), float(hi)],
            "at_test_points": [{"bpp": float(b), "diff": float(d)}
                               for b, d in zip(x_test[inside], at_points)],
            "mean_diff": float(on_grid.mean()), "min_diff": float(on_grid.min()),
            "max_diff": float(on_grid.max()), "share_nonnegative": float(np.mean(on_grid >= 0))}


def summarise(result: dict, test: str = "learned", ref: str = "jpegxl") -> dict:
    """Per set: the learned codec against JPEG XL at equal bpp (F1, area change, PSNR)."""
    out = {}
    for name, s in result["sets"].items():
        c = s.get("codecs", {})
        if test not in c or ref not in c:
            continue
        row: dict[str, Any] = {}
        for key in ("f1", "area_change", "psnr"):
            row[key] = equal_bpp(*_curve(c[test], key), *_curve(c[ref], key))
        f1 = row["f1"]
        if f1 is not None:
            # the claim: F1 of the learned codec >= JPEG XL's at equal bpp over the shared range
            row["claim_f1_learned_ge_jpegxl"] = bool(f1["min_diff"] >= 0)
            holds, means = [], []
            for im in s["images"]:
                d = equal_bpp(*_image_curve(c[test], im["name"], "f1"),
                              *_image_curve(c[ref], im["name"], "f1"))
                if d is not None:
                    holds.append(d["min_diff"] >= 0)
                    means.append(d["mean_diff"])
            row["claim_holds_per_image"] = f"{sum(holds)}/{len(holds)}"
            # each image's own curves: its mean F1 difference over its shared range
            row["per_image_mean_diff"] = {
                "values": means, "mean": float(np.mean(means)) if means else None,
                "sd": float(np.std(means, ddof=1)) if len(means) > 1 else None,
                "positive": f"{sum(m > 0 for m in means)}/{len(means)}"}
        out[name] = row
    return out


# ---------------------------------------------------------------------------------------- figures

def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

    sets = [k for k, v in result["sets"].items() if "codecs" in v]
    fig, axes = plt.subplots(2, len(sets), figsize=(3.6 * len(sets), 6.6), squeeze=False)
    for j, name in enumerate(sets):
        s = result["sets"][name]
        for k, entry in s["codecs"].items():
            color, marker = PLOT_STYLE.get(k, ("gray", "."))
            for i, key in enumerate(("f1", "area_change")):
                x, y = _curve(entry, key)
                axes[i, j].plot(x, y if key == "f1" else 100 * y, color=color, marker=marker,
                                ms=4, lw=1.2, label=entry["label"])
        n = len(s["images"])
        axes[0, j].set_title(f"{name} ({n} image{'s' if n != 1 else ''}, {s['mpp']:g} µm/px)",
                             fontsize=9)
        for i in range(2):
            axes[i, j].set_xscale("log")
            axes[i, j].xaxis.set_major_locator(FixedLocator([0.1, 0.2, 0.5, 1, 2, 5]))
            axes[i, j].xaxis.set_major_formatter(FormatStrFormatter("%g"))
            axes[i, j].xaxis.set_minor_formatter(NullFormatter())
            axes[i, j].grid(True, which="both", alpha=0.3)
            axes[i, j].set_xlabel("bpp (real bytes)")
        axes[0, j].set_ylabel("nuclei F1 vs original")
        axes[1, j].set_ylabel("area change of matched nuclei, %")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Nuclei found in the decoded image against those found in the original "
                 "(classical HED + watershed detector; originals were scanner-coded)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bisect_jxl(rgb: np.ndarray, target_bpp: float, iters: int = 12) -> tuple[float, int, np.ndarray]:
    """The JPEG XL distance whose whole-image bpp is closest to ``target_bpp``."""
    s = SWEEPS["jpegxl"]
    lo, hi = math.log(0.1), math.log(25.0)     # bpp falls as the distance grows
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        d = round(math.exp(mid), 4)
        nbytes, dec = code(build_codec(s, d), rgb)
        bpp = 8.0 * nbytes / (rgb.shape[0] * rgb.shape[1])
        if best is None or abs(bpp - target_bpp) < abs(best[3] - target_bpp):
            best = (d, nbytes, dec, bpp)
        if bpp > target_bpp:
            lo = mid
        else:
            hi = mid
    return best[0], best[1], best[2]


def _worst_window(errors: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the ``size``² window (on a size/4 grid) holding the most error pixels."""
    h, w = errors.shape
    if h <= size or w <= size:
        return max(0, (h - size) // 2), max(0, (w - size) // 2)
    step = max(1, size // 4)
    integral = np.pad(errors.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best, where = -1, (0, 0)
    for top in range(0, h - size + 1, step):
        for left in range(0, w - size + 1, step):
            v = (integral[top + size, left + size] - integral[top, left + size]
                 - integral[top + size, left] + integral[top, left])
            if v > best:
                best, where = v, (top, left)
    return where


def make_crop(ds, image: str | None, quality: float, out: Path, size: int = 256) -> dict:
    """Outlines on the original, the learned codec at ``quality`` and JPEG XL at the same whole-image
    bpp (distance bisected), on the ``size``² window where the two decoded versions together have
    the most detection errors (missed + spurious nuclei, pixels of both codecs counted alike):
    where the detector's disagreements are, not a typical place. Decoded panels: green, a nucleus
    matched to one of the original's; orange, found only in the decoded image; red, the outline of
    an original nucleus the decoded image lost."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    from bench import metrics
    name, rgb = next((n, a) for n, a in ds.images() if image in (None, n))
    h, w = rgb.shape[:2]
    thr = otsu_threshold(rgb, ds.mpp)
    ref = detect(rgb, ds.mpp, thr)
    nb_l, dec_l = code(build_codec(SWEEPS["learned"], quality), rgb)
    target = 8.0 * nb_l / (h * w)
    dist, nb_j, dec_j = _bisect_jxl(rgb, target)
    r = MATCH_RADIUS_UM / ds.mpp
    panels, errors = [], np.zeros((h, w), bool)
    for label, nb, dec in ((f"learned q{quality:g}", nb_l, dec_l), (f"JPEG XL d{dist:g}", nb_j, dec_j)):
        det = detect(dec, ds.mpp, thr)
        ia, ib = match(ref.centroids, det.centroids, r)
        found = np.zeros(det.n + 1, bool)
        found[ib + 1] = True
        kept = np.zeros(ref.n + 1, bool)
        kept[ia + 1] = True
        lost = (ref.labels > 0) & ~kept[ref.labels]
        spurious = (det.labels > 0) & ~found[det.labels]
        errors |= lost | spurious
        panels.append({"label": label, "img": dec, "det": det, "found": found, "kept": kept,
                       "bpp": 8.0 * nb / (h * w), "psnr": metrics.psnr(rgb, dec),
                       "cmp": compare(ref, det, ds.mpp)})
    top, left = _worst_window(errors, size)
    sl = (slice(top, top + size), slice(left, left + size))
    info = {"set": ds.name, "image": name, "crop_top_left_size": [top, left, size], "threshold": thr,
            "window": "the size² window with the most missed + spurious nuclear pixels of both "
                      "decoded versions together", "panels": []}
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.9))
    ref_edge = find_boundaries(ref.labels[sl], mode="inner")
    over = rgb[sl].copy()
    over[ref_edge] = (0, 220, 0)
    axes[0].imshow(over, interpolation="nearest")
    axes[0].set_title(f"original: {ref.n} nuclei in the whole image\n(threshold {thr:.3f}, "
                      f"kept for the decoded ones)", fontsize=9)
    for ax, p in zip(axes[1:], panels):
        lab = p["det"].labels[sl]
        edge = find_boundaries(lab, mode="inner")
        lost_edge = ref_edge & ~p["kept"][ref.labels[sl]]
        over = p["img"][sl].copy()
        over[edge & p["found"][lab]] = (0, 220, 0)
        over[edge & ~p["found"][lab] & (lab > 0)] = (255, 150, 0)
        over[lost_edge] = (255, 0, 0)
        ax.imshow(over, interpolation="nearest")
        c = p["cmp"]
        ax.set_title(f"{p['label']}: {p['bpp']:.3f} bpp, {p['psnr']:.2f} dB\n"
                     f"whole image: F1 {c['f1']:.3f}, area change {100 * c['area_change']:.1f} %",
                     fontsize=9)
        info["panels"].append({"label": p["label"], "bpp": p["bpp"], "psnr": p["psnr"], **c})
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{ds.name} / {name}, {size}² at (row {top}, col {left}): the window with the most "
                 f"detection errors of the two codecs together\ngreen: matched to the original's "
                 f"nuclei; orange: found only in the decoded image; red: original nucleus lost",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return info


# -------------------------------------------------------------------------------------------- main

def report(result: dict) -> None:
    for name, row in result["summary"].items():
        f1 = row.get("f1")
        if not f1:
            log(f"{name}: no shared bpp range")
            continue
        pts = ", ".join(f"{p['bpp']:.3f}:{p['diff']:+.4f}" for p in f1["at_test_points"])
        log(f"{name}: shared {f1['bpp_range'][0]:.3f}-{f1['bpp_range'][1]:.3f} bpp; F1 learned − "
            f"JPEG XL mean {f1['mean_diff']:+.4f} (min {f1['min_diff']:+.4f}, max "
            f"{f1['max_diff']:+.4f}); at learned points {pts}; claim "
            f"{'HOLDS' if row['claim_f1_learned_ge_jpegxl'] else 'FAILS'} "
            f"(per image {row['claim_holds_per_image']}; per-image mean difference "
            f"{row['per_image_mean_diff']['mean']:+.4f}, sd {row['per_image_mean_diff']['sd'] or 0:.4f}, "
            f"positive {row['per_image_mean_diff']['positive']})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from bench.datasets import DATASETS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=",".join(DATASETS), help="comma-separated dataset names")
    ap.add_argument("--codecs", default=",".join(SWEEPS), help="comma-separated series keys")
    ap.add_argument("--limit", type=int, default=None,
                    help="at most this many images per set (the he/test sets take the first N)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                    help="torch threads for the learned codec")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--tag", default="nuclei", help="output file stem")
    ap.add_argument("--crop-set", default="he_test")
    ap.add_argument("--crop-image", default=None, help="image name (default: the set's first)")
    ap.add_argument("--crop-quality", type=float, default=3)
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the summary and plot from the JSON, code nothing")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import warnings

    import torch
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal")
    from bench.datasets import get_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png = out / f"{args.tag}.json", out / f"{args.tag}.png"
    if args.report_only:
        result = json.loads(json_path.read_text())
        result["summary"] = json_safe(summarise(result))
        json_path.write_text(json.dumps(json_safe(result), indent=1) + "\n")
        plot(result, png)
        report(result)
        return 0

    keys = [k.strip() for k in args.codecs.split(",") if k.strip()]
    for k in keys:
        if k not in SWEEPS:
            raise SystemExit(f"nuclei.py: unknown series {k!r}; known: {', '.join(SWEEPS)}")
    env = environment(args.threads)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "command": "bench/nuclei.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "note": ("every 'original' is the decoded pixels of a file its scanner had already "
                 "lossy-coded (JPEG / JPEG 2000); see bench/datasets.py"),
        "detector": {
            "steps": "rgb2hed haematoxylin -> Gaussian -> threshold -> fill holes, drop small "
                     "objects -> distance-transform watershed -> drop small pieces",
            "smooth_sigma_um": SMOOTH_SIGMA_UM, "min_area_um2": MIN_AREA_UM2,
            "hole_area_um2": HOLE_AREA_UM2, "peak_min_distance_um": PEAK_MIN_DISTANCE_UM,
            "threshold": "Otsu of the original's smoothed haematoxylin, reused unchanged on every "
                         "decoded version of that image",
        },
        "matching": {"method": "Hungarian (linear_sum_assignment) per connected group of "
                               "candidate pairs: most pairs within the radius, then least total "
                               "distance", "radius_um": MATCH_RADIUS_UM},
        "metrics": {
            "bpp": "8 * bytes / pixels, the whole output for the whole image (learned: the "
                   "wsicodec.encode stream, 256² tiles)",
            "f1": "2 TP / (n_orig + n_dec) per image; mean over images (f1_pooled: summed counts)",
            "area_change": "mean over matched nuclei of |A_dec - A_orig| / A_orig; mean over images",
            "area_bias": "the same, signed",
            "mask_dice": "Dice of the thresholded nuclear masks",
            "psnr": "bench.metrics.psnr, mean over images", "ms_ssim": "bench.metrics.ms_ssim",
        },
        "limit": args.limit,
        "limit_note": (f"at most {args.limit} images per set (the first {args.limit} of he/test, "
                       "sorted by name, for he_test, he_test_2x and he_test_4x)")
        if args.limit else "every image of every set",
        "environment": env,
        "sets": {},
    }
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        ds = get_dataset(name)
        if not ds.available():
            log(f"skipping {name}: data not found ({', '.join(map(str, ds.paths()))})")
            result["sets"][name] = {**ds.to_dict(), "status": "skipped: data not found"}
            continue
        log(f"{name}: {ds.description}")
        result["sets"][name] = run_set(ds, keys, args.limit)
        json_path.write_text(json.dumps(json_safe(result), indent=1) + "\n")  # partial results
    result["sets"] = {k: v for k, v in result["sets"].items() if "codecs" in v} | {
        k: v for k, v in result["sets"].items() if "codecs" not in v}
    if args.crop_set and "learned" in keys:
        try:
            result["crop"] = make_crop(get_dataset(args.crop_set), args.crop_image,
                                       args.crop_quality, out / f"{args.tag}_crop.png")
        except Exception as exc:
            log(f"crop figure failed: {type(exc).__name__}: {exc}")
    env["loadavg_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    env["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    result["summary"] = summarise(result)
    json_path.write_text(json.dumps(json_safe(result), indent=1) + "\n")
    plot(result, png)
    report(result)
    log(f"{env['minutes']:.1f} min; wrote {json_path}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
