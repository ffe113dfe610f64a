"""JPEG 2000 beside JPEG-XL for the ``auto`` codec: bytes of each codec's fit at a PSNR
target, tile by tile, on tissue tiles of the shared slides and of he/test.

    python bench/j2k_tiles.py [--targets 32,36,40] [--per-slide 40] [--he-images 6]
                              [--out bench/results/j2k_tiles.json]

Every tile is fitted with :func:`wsicodec.learned.jxlfit.fit_jpegxl` (the auto codec's
default effort) and :func:`wsicodec.learned.j2kfit.fit_jpeg2000` coded with the auto
codec's margin (``--margin``) and held to the JPEG-XL coding's glass and ring at the
tile's edges, the two classical codings the auto codec compares,
each without a budget: per set and target the
``equal_bytes`` of each (its size scaled to exactly the target along the tile's own slope:
what the auto codec compares), how many tiles JPEG 2000 gives way on (the target out of
its reach, or the glass at the tile's edges not held), how many tiles each wins, the bytes the auto codec keeps
(the smaller) against JPEG-XL alone, the PSNR above the target, the codings per JPEG 2000
fit and the time of the fits, and how far the :data:`BAND` px along the tiles' edges lie
under their interior, in PSNR (median over the tiles each codec wins: the wavelet's
symmetric extension at a JPEG 2000 tile's edge).  Tiles as ``bench/jxl_effort.py``
samples them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.jxl_effort import tile_sets, write_results  # noqa: E402
from bench.report import log  # noqa: E402

#: the band along a tile's edges compared with its interior, px (what bench/seams.py
#: measures a border over)
BAND = 4


def fit_set(grown: list[np.ndarray], target: float, effort: int, margin: int) -> dict:
    """Both fits of every tile at ``target`` (``grown``: the tiles with ``margin`` px around
    them): the totals of one row of the results."""
    from wsicodec.learned import j2kfit
    from wsicodec.learned.jxlfit import fit_jpegxl

    tiles = [np.ascontiguousarray(g[margin:g.shape[0] - margin, margin:g.shape[1] - margin]) for g in grown]
    t0 = time.perf_counter()
    jxl = [fit_jpegxl(t, target, effort=effort) for t in tiles]
    t_jxl = time.perf_counter() - t0
    codings = 0
    real = j2kfit.encode_at

    def counted(*a, **k):
        nonlocal codings
        codings += 1
        return real(*a, **k)

    j2kfit.encode_at = counted
    try:
        t0 = time.perf_counter()
        j2k = [j2kfit.fit_jpeg2000_tile(t, target, reference=x.pixels, around=g if margin else None)
               for t, g, x in zip(tiles, grown, jxl)]
        t_j2k = time.perf_counter() - t0
    finally:
        j2kfit.encode_at = real
    kept = [min((f for f in (a, b) if f is not None), key=lambda f: f.equal_bytes) for a, b in zip(j2k, jxl)]
    reached = [a for a in j2k if a is not None]

    def band_gap(codec: str) -> float | None:
        """Median over the tiles ``codec`` wins of interior PSNR − band PSNR, dB."""
        gaps = []
        for f, t in zip(kept, tiles):
            if f.codec != codec:
                continue
            h, w = t.shape[:2]
            d = ((f.pixels[:h, :w, :3].astype(np.float64) - t) ** 2).mean(axis=2)
            inner = np.zeros((h, w), bool)
            inner[BAND:h - BAND, BAND:w - BAND] = True
            gaps.append(10 * np.log10(d[~inner].mean() / max(d[inner].mean(), 1e-12)))
        return round(float(np.median(gaps)), 2) if gaps else None

    return {
        "tiles": len(tiles), "target_db": target,
        "jpegxl_equal_bytes": round(sum(f.equal_bytes for f in jxl)),
        "jpeg2000_equal_bytes_where_reached": round(sum(f.equal_bytes for f in reached)),
        "jpeg2000_given_way": len(tiles) - len(reached),
        "jpeg2000_wins": sum(f.codec == "jpeg2000" for f in kept),
        "kept_equal_bytes": round(sum(f.equal_bytes for f in kept)),
        "kept_bytes": sum(len(f.data) for f in kept),
        "kept_over_jpegxl": round(sum(f.equal_bytes for f in kept) / sum(f.equal_bytes for f in jxl), 4),
        "jpeg2000_psnr_above_target_db": round(float(np.mean([f.psnr - target for f in reached])), 3)
        if reached else None,
        "jpegxl_psnr_above_target_db": round(float(np.mean(
            [f.psnr - target for f in jxl if np.isfinite(f.psnr)])), 3),
        "jpeg2000_codings_per_tile": round(codings / len(tiles), 2),
        "jpeg2000_fit_ms_per_tile": round(1e3 * t_j2k / len(tiles), 1),
        "jpegxl_fit_ms_per_tile": round(1e3 * t_jxl / len(tiles), 1),
        "jpeg2000_band_gap_db_median": band_gap("jpeg2000"),
        "jpegxl_band_gap_db_median": band_gap("jpegxl"),
    }


def main(argv: list[str] | None = None) -> int:
    from wsicodec.learned.auto import DEFAULT_EFFORT
    from wsicodec.learned.j2kfit import MARGIN

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="32,36,40")
    ap.add_argument("--per-slide", type=int, default=40)
    ap.add_argument("--he-images", type=int, default=6)
    ap.add_argument("--margin", type=int, default=MARGIN,
                    help=f"px around each tile its JPEG 2000 codings are coded with (default {MARGIN}, the auto codec's)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "j2k_tiles.json")
    args = ap.parse_args(argv)
    targets = [float(t) for t in args.targets.split(",")]
    sets = tile_sets(args.per_slide, args.he_images, args.margin)
    results = {}
    for name, tiles in sets.items():
        for target in targets:
            row = fit_set(tiles, target, DEFAULT_EFFORT, args.margin)
            log(f"{name} {target:g} dB: {json.dumps(row)}")
            results[f"{name}@{target:g}"] = row
    write_results(args.out, __doc__.split("\n\n")[0], results, jpegxl_effort=DEFAULT_EFFORT,
                  jpeg2000_margin=args.margin)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
