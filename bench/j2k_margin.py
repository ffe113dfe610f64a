"""JPEG 2000 tiles with a margin: bytes and the error step across tile borders, per margin.

    python bench/j2k_margin.py [--sets he_test:4,tcga:1,cmu:1] [--targets 36,40]
                               [--margins 0,4,8,16] [--out bench/results/j2k_margin.json]

The first 768² of each image (``bench/datasets.py``; the slides' sets are their central
1024²), cut into 3×3 tiles of 256², each tile coded on its own at the same PSNR target:
JPEG 2000 (OpenJPEG 9/7, fixed quality, the lowest level whose tile reaches the target, by
bisection) from the tile grown by each margin (``wsicodec.learned.j2kfit.with_margin``:
the image's pixels, its edge repeated outside it; the decoded margin cropped), and
JPEG-XL (``wsicodec.learned.jxlfit.fit_jpegxl``, effort 5) for comparison.  No holds: this
is what a margin does to the codestream, not what the auto codec keeps.  Per image, target
and coding: bpp from the bytes, PSNR over the image, and ``bench/error_steps.py``'s border
and inside error steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.error_steps import error_steps  # noqa: E402
from bench.jxl_effort import grown  # noqa: E402
from bench.report import log, run_environment, write_json  # noqa: E402

TILE, CELLS = 256, 3
SIDE = TILE * CELLS


def fit_margin(image: np.ndarray, y: int, x: int, margin: int, target: float) -> tuple[bytes, np.ndarray]:
    """The tile at (y, x) coded from itself and ``margin`` px around it at the lowest level
    (of 9 bisection steps over target − 3 .. target + 12 dB) whose tile reaches ``target``."""
    from wsicodec.learned.j2kfit import encode_at

    around = grown(image, x, y, margin)
    src = np.ascontiguousarray(image[y:y + TILE, x:x + TILE])
    lo, hi, best = target - 3.0, target + 12.0, None
    for _ in range(9):
        level = (lo + hi) / 2
        fit = encode_at(src, level, (TILE, TILE), around)
        if fit.psnr >= target:
            best, hi = fit, level
        else:
            lo = level
    best = best or encode_at(src, hi, (TILE, TILE), around)
    return best.data, best.pixels


def measure(image: np.ndarray, target: float, margin: int | None) -> dict:
    """The 3×3 tiles of ``image`` coded at ``target``: JPEG 2000 with ``margin`` (None: JPEG-XL)."""
    from bench.metrics import psnr
    from wsicodec.learned.jxlfit import fit_jpegxl

    out, size = np.zeros_like(image), 0
    for y in range(0, SIDE, TILE):
        for x in range(0, SIDE, TILE):
            if margin is None:
                fit = fit_jpegxl(np.ascontiguousarray(image[y:y + TILE, x:x + TILE]), target, effort=5)
                data, px = fit.data, fit.pixels[:TILE, :TILE]
            else:
                data, px = fit_margin(image, y, x, margin, target)
            out[y:y + TILE, x:x + TILE] = px
            size += len(data)
    return {"bpp": round(size * 8 / SIDE ** 2, 4), "psnr_db": round(psnr(image, out), 3), **error_steps(out, image)}


def main(argv: list[str] | None = None) -> int:
    from bench.datasets import get_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="he_test:4,tcga:1,cmu:1", help="SET:IMAGES,... (bench/datasets.py)")
    ap.add_argument("--targets", default="36,40")
    ap.add_argument("--margins", default="0,4,8,16")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "j2k_margin.json")
    args = ap.parse_args(argv)
    rows = []
    for spec in args.sets.split(","):
        name, count = spec.split(":")
        for image_name, image in get_dataset(name).images(int(count)):
            image = np.ascontiguousarray(image[:SIDE, :SIDE, :3])
            if image.shape[:2] != (SIDE, SIDE):
                log(f"{name} {image_name}: under {SIDE}² px, left out")
                continue
            for target in (float(t) for t in args.targets.split(",")):
                for margin in [int(m) for m in args.margins.split(",")] + [None]:
                    r = {"set": name, "image": image_name, "target_db": target,
                         "codec": "jpegxl" if margin is None else "jpeg2000", "margin": margin,
                         **measure(image, target, margin)}
                    log(" ".join(f"{k}={v}" for k, v in r.items()))
                    rows.append(r)
    write_json(args.out, {"what": __doc__.split("\n\n")[0].strip(), "tile": TILE,
                          "environment": run_environment(REPO, ("imagecodecs", "numpy")), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
