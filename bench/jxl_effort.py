"""JPEG-XL's effort for the ``auto`` codec: bytes of the fitted coding at each effort, at
equal PSNR, on tissue tiles of the shared slides and of he/test.

    python bench/jxl_effort.py [--efforts 5,7] [--targets 32,35] [--per-slide 40]
                               [--he-images 6] [--out bench/results/jxl_effort.json]

Every tile is fitted with :func:`wsicodec.learned.jxlfit.fit_jpegxl` (what the auto codec
stores where JPEG-XL wins) at each effort and target: the bytes of the coding kept, its
``equal_bytes`` (its size scaled to exactly the target along the tile's own slope: what
the auto codec compares with the network), its PSNR above the target, and the time of the
fits.  Tiles: up to ``--per-slide`` tiles of level 0 of each slide that are not glass (a
fixed random sample), and the 256² crops on a 512-px stride of the first ``--he-images``
he/test images.  Totals per set are reported as ratios to the first effort.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.datasets import DATASETS  # noqa: E402
from bench.report import log, run_environment, write_json  # noqa: E402
from bench.slides import SLIDE_FILES, SLIDES  # noqa: E402

TILE = 256


def grown(image: np.ndarray, x: int, y: int, margin: int) -> np.ndarray:
    """The tile at (x, y) of ``image`` with ``margin`` px around it, as the auto codec
    codes a JPEG 2000 tile (:func:`wsicodec.learned.j2kfit.with_margin`)."""
    from wsicodec.learned.j2kfit import with_margin

    y0, x0 = max(y - margin, 0), max(x - margin, 0)
    return with_margin(image[y0:y + TILE + margin, x0:x + TILE + margin], (y - y0, x - x0, TILE, TILE), margin)


def slide_tiles(key: str, n: int, seed: int = 0, margin: int = 0) -> list[np.ndarray]:
    """Up to ``n`` non-glass level-0 tiles of a shared slide (a fixed random sample), each
    with ``margin`` px of the slide around it (the same tiles whatever the margin)."""
    import openslide

    from wsicodec.learned.glass import uniform_fit

    s = openslide.OpenSlide(str(SLIDES / SLIDE_FILES[key]))
    w, h = s.level_dimensions[0]
    cells = [(x, y) for y in range(0, h - TILE + 1, TILE) for x in range(0, w - TILE + 1, TILE)]
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.permutation(len(cells)):
        x, y = cells[i]
        x0, y0 = max(x - margin, 0), max(y - margin, 0)
        x1, y1 = min(x + TILE + margin, w), min(y + TILE + margin, h)
        part = np.ascontiguousarray(np.asarray(s.read_region((x0, y0), 0, (x1 - x0, y1 - y0)))[..., :3])
        tile = grown(part, x - x0, y - y0, margin)
        if uniform_fit(tile[margin:margin + TILE, margin:margin + TILE]) is None:
            out.append(tile)
        if len(out) == n:
            break
    return out


def he_tiles(images: int, margin: int = 0) -> list[np.ndarray]:
    """256² crops of the first ``images`` he/test images (``bench/datasets.py``), every
    other cell of each, each with ``margin`` px of the image around it."""
    out = []
    for _, im in DATASETS["he_test"].images(images):
        for y in range(0, im.shape[0] - TILE + 1, 2 * TILE):
            for x in range(0, im.shape[1] - TILE + 1, 2 * TILE):
                out.append(grown(im, x, y, margin))
    return out


def tile_sets(per_slide: int, he_images: int, margin: int = 0) -> dict[str, list[np.ndarray]]:
    """The sampled tiles by set: cmu and tcga (:func:`slide_tiles`), he_test (:func:`he_tiles`),
    each with ``margin`` px around it."""
    return {"cmu": slide_tiles("svs-jpeg", per_slide, margin=margin),
            "tcga": slide_tiles("svs-jpeg2000", per_slide, margin=margin),
            "he_test": he_tiles(he_images, margin)}


def write_results(out: Path, what: str, results: dict, **fields: object) -> None:
    """``results`` (by "set@target") written to ``out`` as JSON with ``what`` (a module's
    first docstring paragraph), the environment and the load at the end, and ``fields``."""
    write_json(out, {"what": what,
                     "environment": {**run_environment(REPO, ("imagecodecs", "numpy")),
                                     "loadavg_end": os.getloadavg()},
                     **fields, "results": results})


def main(argv: list[str] | None = None) -> int:
    from wsicodec.learned.jxlfit import fit_jpegxl

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--efforts", default="5,7")
    ap.add_argument("--targets", default="32,35")
    ap.add_argument("--per-slide", type=int, default=40)
    ap.add_argument("--he-images", type=int, default=6)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "jxl_effort.json")
    args = ap.parse_args(argv)
    efforts = [int(e) for e in args.efforts.split(",")]
    targets = [float(t) for t in args.targets.split(",")]
    sets = tile_sets(args.per_slide, args.he_images)
    results = {}
    for name, tiles in sets.items():
        for target in targets:
            row: dict = {"tiles": len(tiles), "target_db": target}
            for e in efforts:
                t0 = time.perf_counter()
                fits = [fit_jpegxl(t, target, effort=e) for t in tiles]
                row[f"effort{e}"] = {"fit_s": round(time.perf_counter() - t0, 3),
                                     "bytes": sum(len(f.data) for f in fits),
                                     "equal_bytes": round(sum(f.equal_bytes for f in fits)),
                                     "mean_psnr_above_target_db": round(float(np.mean(
                                         [f.psnr - target for f in fits if np.isfinite(f.psnr)])), 3),
                                     "lossless": sum(f.lossless for f in fits)}
            first = row[f"effort{efforts[0]}"]
            for e in efforts[1:]:
                r = row[f"effort{e}"]
                row[f"effort{e}_over_effort{efforts[0]}"] = {
                    k: round(r[k] / first[k], 4) for k in ("bytes", "equal_bytes", "fit_s")}
            log(f"{name} {target:g} dB: {json.dumps(row)}")
            results[f"{name}@{target:g}"] = row
    write_results(args.out, __doc__.split("\n\n")[0], results, efforts=efforts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
