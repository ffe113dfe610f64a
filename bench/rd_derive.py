"""The numbers ``bench/rd.py`` derives from the measured points (and ``--report-only``
recomputes): BD-rates against the anchors, each series' PSNR span, every point against the
anchors' curves at equal PSNR. Everything here reads and fills a results dict; nothing codes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bench import metrics
from bench.rd_sweeps import SWEEPS
from bench.report import float_or_nan

#: the series every other is read against, where run (plus each series' ``Sweep.against``);
#: JPEG 2000 since the auto codec stores JPEG 2000 tiles too (2026-12-05)
ANCHORS = ("jpegxl", "jpeg444", "jpeg2000")


def mean_curve(entry: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(bpp, quality) of the mean points; ``lpips_db`` is derived from the stored LPIPS."""
    pts = [p["mean"] for p in entry.get("points", []) if p.get("mean")]
    if key == "lpips_db":
        return np.array([p["bpp"] for p in pts]), metrics.lpips_db(np.array([p["lpips"] for p in pts]))
    return np.array([p["bpp"] for p in pts]), np.array([p[key] for p in pts])


def image_curve(entry: dict, image: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bpp, ps, ms = [], [], []
    for p in entry.get("points", []):
        for r in p["per_image"]:
            if r["image"] == image and "error" not in r:
                bpp.append(r["bpp"]), ps.append(r["psnr"]), ms.append(r["ms_ssim"])
    return np.array(bpp), np.array(ps), metrics.msssim_db(np.array(ms))


def bd_rates(result: dict) -> dict:
    """BD-rate (pchip) of every ok series against each anchor, on mean curves and per image."""
    codecs = {k: v for k, v in result["codecs"].items() if v.get("status") in ("ok", "partial")}
    out: dict[str, Any] = {"method": "pchip in log-rate (scipy PchipInterpolator), mean curves",
                           "anchors": {}}
    names = [im["name"] for im in result["images"]]
    extra = (SWEEPS[k].against for k in codecs if k in SWEEPS)
    anchors = ANCHORS + tuple(dict.fromkeys(a for a in extra if a in codecs and a not in ANCHORS))
    for anchor in anchors:
        if anchor not in codecs:
            continue
        rows = {}
        for key, entry in codecs.items():
            if key == anchor:
                continue
            row: dict[str, Any] = {}
            for metric in ("psnr", "ms_ssim_db", "lpips_db"):
                ra, qa = mean_curve(codecs[anchor], metric)
                rt, qt = mean_curve(entry, metric)
                row[metric] = metrics.bd_rate(ra, qa, rt, qt)
                if len(qa) and len(qt):
                    lo, hi = metrics.bd_overlap(qa, qt)
                    a_lo, a_hi = float(np.nanmin(qa)), float(np.nanmax(qa))
                    row[f"{metric}_overlap"] = (lo, hi)
                    row[f"{metric}_anchor_range"] = (a_lo, a_hi)
                    # how much of the anchor's range the BD-rate covers (1: all of it)
                    row[f"{metric}_overlap_share"] = (max(hi - lo, 0.0) / (a_hi - a_lo)
                                                      if a_hi > a_lo else None)
            per_image = []
            for name in names:
                ra, pa, ma = image_curve(codecs[anchor], name)
                rt, pt, mt = image_curve(entry, name)
                per_image.append({"image": name, "psnr": metrics.bd_rate(ra, pa, rt, pt),
                                  "ms_ssim_db": metrics.bd_rate(ra, ma, rt, mt)})
            row["per_image"] = per_image
            for metric in ("psnr", "ms_ssim_db"):
                vals = np.array([float_or_nan(r[metric]) for r in per_image])
                vals = vals[np.isfinite(vals)]
                if len(vals):
                    row[f"{metric}_per_image_median"] = float(np.median(vals))
                    row[f"{metric}_per_image_min"] = float(vals.min())
                    row[f"{metric}_per_image_max"] = float(vals.max())
            rows[key] = row
        out["anchors"][anchor] = rows
    return out


def psnr_ranges(result: dict) -> dict:
    """Each measured series' PSNR span on its mean curve: ``top_psnr`` (the highest it reaches,
    with the setting and bpp there) and ``bottom_psnr``."""
    out = {}
    for key, entry in result["codecs"].items():
        if entry.get("status") not in ("ok", "partial"):
            continue
        pts = [p for p in entry.get("points", []) if p.get("mean")]
        if not pts:
            continue
        def psnr(p: dict) -> float:        # None: an exact (lossless) point, the top of any curve
            v = p["mean"]["psnr"]
            return math.inf if v is None else v

        top, low = max(pts, key=psnr), min(pts, key=psnr)
        out[key] = {"top_psnr": top["mean"]["psnr"], "top_setting": top["quality"],
                    "top_bpp": top["mean"]["bpp"], "bottom_psnr": low["mean"]["psnr"],
                    "bottom_setting": low["quality"], "bottom_bpp": low["mean"]["bpp"]}
    return out


def floor_of(point: dict) -> float | None:
    """The ``auto`` codec's fidelity floor a point was coded with (None for other codecs)."""
    return (point.get("codec") or {}).get("configuration", {}).get("min_psnr")


def points_vs_anchors(result: dict) -> dict:
    """Every point of every series against each BD-rate anchor's mean curve at the same PSNR:
    the percent more (+) or fewer bits it takes there (issue #28's "never more than 1 % above
    JPEG-XL"), and per series the largest excess; points outside an anchor's range: None."""
    out: dict[str, Any] = {}
    codecs = {k: v for k, v in result["codecs"].items() if v.get("status") in ("ok", "partial")}
    for anchor in result.get("bd_rate", {}).get("anchors", {}):
        ra, qa = mean_curve(codecs[anchor], "psnr")
        rows = {}
        for key, entry in codecs.items():
            if key == anchor:
                continue
            pts = [p for p in entry.get("points", []) if p.get("mean")]
            pct = metrics.rate_at_equal_quality(ra, qa, [p["mean"]["bpp"] for p in pts],
                                                [p["mean"]["psnr"] for p in pts])
            known = [v for v in pct if v is not None]
            rows[key] = {"points": [{"setting": p["quality"], "min_psnr": floor_of(p),
                                     "bpp": p["mean"]["bpp"], "psnr": p["mean"]["psnr"], "rate_pct": v}
                                    for p, v in zip(pts, pct)],
                         "max_rate_pct": max(known) if known else None}
        out[anchor] = rows
    return out


def derive(result: dict) -> None:
    """The numbers computed from the measured points (kept in step by --report-only too):
    BD-rates, each series' PSNR span and ``top_psnr`` per codec, every point against the anchors."""
    result["bd_rate"] = bd_rates(result)
    result["points_vs_anchor"] = points_vs_anchors(result)
    result["psnr_ranges"] = psnr_ranges(result)
    result["top_psnr"] = {k: v["top_psnr"] for k, v in result["psnr_ranges"].items()}
    for key, r in result["psnr_ranges"].items():
        result["codecs"][key]["top_psnr"] = r["top_psnr"]

