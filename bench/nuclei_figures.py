"""The figures of ``bench/nuclei.py``: F1 and area change against bpp per set (:func:`plot`,
nuclei.png) and the detector's outlines on the original, the learned codec and JPEG XL at the
same bpp where they disagree most (:func:`make_crop`, nuclei_crop.png).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bench.nuclei_compare import curve_by_bpp
from bench.nuclei_detect import MATCH_RADIUS_UM, compare, detect, match, otsu_threshold
from bench.nuclei_run import SWEEPS, build_codec, code
from bench.rd_sweeps import PLOT_STYLE


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
                x, y = curve_by_bpp(entry, key)
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


def bisect_jxl(rgb: np.ndarray, target_bpp: float, iters: int = 12) -> tuple[float, int, np.ndarray]:
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


def worst_window(errors: np.ndarray, size: int) -> tuple[int, int]:
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
    dist, nb_j, dec_j = bisect_jxl(rgb, target)
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
    top, left = worst_window(errors, size)
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
