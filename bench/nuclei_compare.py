"""The comparison of ``bench/nuclei.py``: the learned codec against JPEG XL at equal bpp, on the
mean curves and per image (:func:`summarise`, :func:`equal_bpp`). Reads a results dict; codes
nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def curve_by_bpp(entry: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [p["mean"] for p in entry["points"] if p.get("mean")]
    pts.sort(key=lambda m: m["bpp"])
    return np.array([m["bpp"] for m in pts]), np.array([m[key] for m in pts])


def image_curve_by_bpp(entry: dict, image: str, key: str) -> tuple[np.ndarray, np.ndarray]:
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
            row[key] = equal_bpp(*curve_by_bpp(c[test], key), *curve_by_bpp(c[ref], key))
        f1 = row["f1"]
        if f1 is not None:
            # the claim: F1 of the learned codec >= JPEG XL's at equal bpp over the shared range
            row["claim_f1_learned_ge_jpegxl"] = bool(f1["min_diff"] >= 0)
            holds, means = [], []
            for im in s["images"]:
                d = equal_bpp(*image_curve_by_bpp(c[test], im["name"], "f1"),
                              *image_curve_by_bpp(c[ref], im["name"], "f1"))
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
