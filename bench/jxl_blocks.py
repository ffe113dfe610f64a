"""JPEG-XL per 256² tile against one codestream per 2×2 block, both held to a per-tile floor.

    python bench/jxl_blocks.py [--sets he_test:3,cmu:1,tcga:1] [--floors 32,36,40]
                               [--effort 5] [--out bench/results/jxl_blocks.json]

Tiled JPEG-XL costs 3-16 % more than whole-image JPEG-XL (docs/results.md), about a
kilobyte per codestream.  A tile kind holding one codestream for 2×2 tiles would pay it
once per four.  But the ``auto`` codec holds *every tile* to the floor, and one
codestream has one distance.  This measures what that does, on the evaluation sets
(``bench/datasets.py``; the images cropped to a multiple of 512, sets whose images are
smaller left out):

- ``tiles``: each 256² tile fitted alone with :func:`wsicodec.learned.jxlfit.fit_jpegxl`
  (what ``auto`` stores today);
- ``blocks``: each 512² block coded whole at the largest distance (bisection in log2
  distance, 9 codings) whose decode keeps each of its four tiles at the floor.

Per set and floor: bytes of each, the PSNR of the whole crop, and blocks against tiles.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.datasets import DATASETS  # noqa: E402
from bench.report import log, run_environment, write_json  # noqa: E402

TILE, BLOCK = 256, 512


def _code(img: np.ndarray, distance: float, effort: int) -> tuple[bytes, np.ndarray]:
    import imagecodecs

    data = imagecodecs.jpegxl_encode(np.ascontiguousarray(img), effort=effort, distance=distance)
    return data, imagecodecs.jpegxl_decode(data)[..., :3]


def block_fit(block: np.ndarray, floor: float, effort: int) -> tuple[bytes, np.ndarray]:
    """The coding of a 512² ``block`` at the largest distance found whose decode keeps each
    of its 256² tiles at ``floor`` dB (distance 0.1 when none does)."""
    from wsicodec.learned.jxlfit import MAX_DISTANCE, MIN_DISTANCE, tile_psnr

    corners = [(r, c) for r in range(0, BLOCK, TILE) for c in range(0, BLOCK, TILE)]

    def coding(d: float):
        data, px = _code(block, d, effort)
        low = min(tile_psnr(px[r:r + TILE, c:c + TILE], block[r:r + TILE, c:c + TILE], (TILE, TILE))
                  for r, c in corners)
        return low >= floor, data, px

    ok, data, px = coding(MAX_DISTANCE)
    if ok:
        return data, px
    lo, hi, best = math.log2(MIN_DISTANCE), math.log2(MAX_DISTANCE), None
    for _ in range(9):
        mid = (lo + hi) / 2
        ok, data, px = coding(2.0 ** mid)
        if ok:
            lo, best = mid, (data, px)
        else:
            hi = mid
    return best if best is not None else coding(MIN_DISTANCE)[1:]


def measure(img: np.ndarray, floor: float, effort: int) -> dict:
    from wsicodec.learned.jxlfit import fit_jpegxl

    h, w = img.shape[0] // BLOCK * BLOCK, img.shape[1] // BLOCK * BLOCK
    img = np.ascontiguousarray(img[:h, :w])
    out = {}
    for how, size in (("tiles", TILE), ("blocks", BLOCK)):
        nbytes, sq = 0, 0.0
        for r in range(0, h, size):
            for c in range(0, w, size):
                part = np.ascontiguousarray(img[r:r + size, c:c + size])
                if how == "tiles":
                    fit = fit_jpegxl(part, floor, effort=effort)
                    data, px = fit.data, fit.pixels[..., :3]
                else:
                    data, px = block_fit(part, floor, effort)
                nbytes += len(data)
                sq += float(np.sum((px.astype(np.float64) - part) ** 2))
        mse = sq / (h * w * 3)
        out[how] = {"bytes": nbytes, "psnr": round(10 * math.log10(255.0 ** 2 / mse), 3) if mse else None}
    out["blocks_over_tiles"] = round(out["blocks"]["bytes"] / out["tiles"]["bytes"], 4)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="he_test:3,cmu:1,tcga:1", help="SET:IMAGES,...")
    ap.add_argument("--floors", default="32,36,40")
    ap.add_argument("--effort", type=int, default=5, help="auto's default JPEG-XL effort")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "jxl_blocks.json")
    args = ap.parse_args(argv)
    floors = [float(f) for f in args.floors.split(",")]
    results: dict = {}
    for spec in args.sets.split(","):
        name, n = spec.split(":")
        for image, img in DATASETS[name].images(int(n)):
            if min(img.shape[:2]) < BLOCK:
                log(f"{name} {image}: smaller than {BLOCK}², left out")
                continue
            for floor in floors:
                row = measure(img, floor, args.effort)
                log(f"{name} {image} floor {floor:g}: {row}")
                results.setdefault(name, {}).setdefault(f"{floor:g}", []).append({"image": image, **row})
    summary = {name: {f: round(sum(r["blocks"]["bytes"] for r in rows) / sum(r["tiles"]["bytes"] for r in rows), 4)
                      for f, rows in per.items()} for name, per in results.items()}
    log(f"blocks / tiles bytes: {summary}")
    write_json(args.out, {"what": __doc__.split("\n\n")[0], "effort": args.effort,
                          "environment": {**run_environment(REPO, ("imagecodecs", "numpy")),
                                          "loadavg_end": os.getloadavg()},
                          "blocks_over_tiles": summary, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
