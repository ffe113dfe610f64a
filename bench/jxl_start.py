"""Where the auto codec's JPEG-XL search starts: the distance a tile reaches a PSNR target
at, predicted from the tile's texture, fitted on training crops and checked on the
evaluation sets.

    python bench/jxl_start.py [--train-tiles 240] [--per-slide 40] [--he-images 6]
                              [--out bench/results/jxl_start.json]

Each tile is coded at effort 5 (:data:`wsicodec.learned.jxlfit.SEARCH_EFFORT`) on a grid of
distances (log2 steps of 0.25 over libjxl's range); for every target on a 1-dB grid the
tile's curve crosses, the log2 distance where it crosses (interpolated from the low-distance
side) is the truth a start guesses.  The prediction is linear in the target and in the log
of the tile's mean absolute grey gradient (:func:`wsicodec.learned.jxlfit.texture`).  Its
coefficients are fitted by least squares on augmented crops of ``he/train``
(``train/augment.py``: 1x / 2x / 4x scales, stain jitter, JPEG and JPEG 2000 source
artifacts) and never on an evaluation set; the evaluation sets (the tiles of
``bench/jxl_effort.py``: cmu, tcga, he/test) report the error of the fitted start and of the
target-only start before it (:func:`wsicodec.learned.jxlfit.start_distance` without a tile).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.jxl_effort import tile_sets, write_results  # noqa: E402
from bench.report import log  # noqa: E402

OUT = REPO / "bench" / "results" / "jxl_start.json"
TRAIN = REPO.parent / "shared" / "data" / "he" / "train"
#: the distance grid, log2 (libjxl's 0.1 .. 25)
GRID = np.arange(math.log2(0.1), math.log2(25.0) + 1e-9, 0.25)
#: the targets a tile is measured at (dB); the auto codec's floors and network estimates
TARGETS = np.arange(28.0, 47.0, 1.0)


def training_tiles(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` non-glass 256² crops of ``he/train`` through ``train/augment.py``'s sampler."""
    from PIL import Image

    from wsicodec.learned.glass import uniform_fit

    sys.path.insert(0, str(REPO / "train"))
    from augment import AugmentedSampler, check_training_folders  # noqa: E402

    check_training_folders([TRAIN])
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(TRAIN.glob("*.png"))]
    sampler = AugmentedSampler(images, 256, np.random.default_rng(seed))
    out: list[np.ndarray] = []
    while len(out) < n:
        c = np.ascontiguousarray(sampler.sample())
        if uniform_fit(c) is None:
            out.append(c)
    return out


def crossings(tile: np.ndarray) -> list[tuple[float, float]]:
    """(target, log2 distance where the tile's effort-5 PSNR falls to it) for each of
    :data:`TARGETS` its curve crosses, interpolated between the grid's codings from the
    low-distance side (the first crossing: the curve is not monotone at large distances)."""
    from wsicodec.learned.jxlfit import SEARCH_EFFORT, encode_at

    valid = tile.shape[:2]
    psnr = np.array([encode_at(tile, 2.0 ** x, valid, SEARCH_EFFORT).psnr for x in GRID])
    out = []
    for t in TARGETS:
        below = np.nonzero(psnr < t)[0]
        if len(below) == 0 or below[0] == 0:
            continue
        i = below[0]
        a, b = psnr[i - 1], psnr[i]
        out.append((float(t), float(GRID[i - 1] + (GRID[i] - GRID[i - 1]) * (a - t) / (a - b))))
    return out


def rows(tiles: list[np.ndarray]) -> np.ndarray:
    """(target, log texture, true log2 distance) for every crossing of every tile."""
    from wsicodec.learned.jxlfit import texture

    out = []
    for tile in tiles:
        g = math.log(texture(tile, tile.shape[:2]))
        out += [(t, g, x) for t, x in crossings(tile)]
    return np.array(out, np.float64).reshape(-1, 3)


def errors(r: np.ndarray, coef: np.ndarray | None) -> dict:
    """How far a start lands from the truth, in log2 distance and in dB (at the prior
    :data:`~wsicodec.learned.jxlfit.DB_PER_DOUBLING`): the fitted one (``coef``) or the
    target-only one (None)."""
    from wsicodec.learned.jxlfit import DB_PER_DOUBLING, MAX_DISTANCE, MIN_DISTANCE

    if coef is None:
        x = np.log2(np.clip(1.6 * 2.0 ** ((33.0 - r[:, 0]) / DB_PER_DOUBLING), MIN_DISTANCE, MAX_DISTANCE))
    else:
        x = np.clip(coef[0] + coef[1] * r[:, 1] + coef[2] * r[:, 0], math.log2(MIN_DISTANCE),
                    math.log2(MAX_DISTANCE))
    e = x - r[:, 2]
    return {"crossings": int(len(r)), "mean_log2": round(float(e.mean()), 3),
            "rms_log2": round(float(np.sqrt(np.mean(e * e))), 3),
            "p90_abs_db": round(float(np.percentile(np.abs(e), 90) * DB_PER_DOUBLING), 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-tiles", type=int, default=240)
    ap.add_argument("--per-slide", type=int, default=40)
    ap.add_argument("--he-images", type=int, default=6)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    t0 = time.time()
    train = rows(training_tiles(a.train_tiles))
    A = np.c_[np.ones(len(train)), train[:, 1], train[:, 0]]
    coef = np.linalg.lstsq(A, train[:, 2], rcond=None)[0]
    log(f"fitted on {len(train)} crossings of {a.train_tiles} he/train crops: "
        f"log2 distance = {coef[0]:.4f} + {coef[1]:.4f} ln(texture) + {coef[2]:.4f} target")
    results = {"he_train (fit)": {"fitted": errors(train, coef), "target_only": errors(train, None)}}
    for name, tiles in tile_sets(a.per_slide, a.he_images).items():
        r = rows(tiles)
        results[name] = {"fitted": errors(r, coef), "target_only": errors(r, None)}
        log(f"{name}: {results[name]}")
    write_results(a.out, __doc__.split("\n\n")[0], results,
                  coefficients={"intercept": float(coef[0]), "ln_texture": float(coef[1]), "target": float(coef[2])},
                  train_tiles=a.train_tiles, seconds=round(time.time() - t0, 1))
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
