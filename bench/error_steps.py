"""Does the tile grid show in the coding error?  Error steps across tile borders in tissue.

    python bench/error_steps.py [--sets he_test:3,he_test_2x:3,tcga:1,cmu:1] [--floors 36,40]
                                [--out bench/results/error_steps.json]
    python bench/error_steps.py --figure bench/results/error_steps.png [--figure-image he_test:1]

``bench/grid_steps.py`` looks at the glass; this looks everywhere.  Each image is coded
with the ``auto`` codec at quality 8 and each floor, with and without JPEG 2000 tiles
(``jpeg2000=False``: JPEG-XL its only classical codec), and decoded.  With the coding
error e = decoded − source (RGB), the *error step* of two horizontally or vertically
adjacent pixels is the mean over R, G, B of |e(x) − e(x−1)|: how much the error jumps
between them.  Where two independently coded tiles meet, the step across the border
holds each side's error at its edge; inside a tile it holds how the error varies from
pixel to pixel.  Their ratio (border / inside) near 1 means the tile grid does not stand
out of the coding noise; a codec whose error is smooth inside a tile and large at its
edge (JPEG 2000's symmetric extension) shows the grid in an error map even where the
tissue's texture hides it in the pixels.  bpp from the container's bytes, PSNR over the
image.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.report import log, run_environment, write_json  # noqa: E402

TILE = 256


def error_steps(decoded: np.ndarray, source: np.ndarray, tile: int = TILE) -> dict:
    """Mean error step across tile borders and inside tiles (module docstring)."""
    e = decoded[..., :3].astype(np.float64) - source[..., :3]
    border, inside = [], []
    for a in (e, e.transpose(1, 0, 2)):
        step = np.abs(a[:, 1:] - a[:, :-1]).mean(axis=2)      # pairs (x-1, x), x = 1..W-1
        on = (np.arange(1, a.shape[1]) % tile) == 0
        border.append(step[:, on].ravel())
        inside.append(step[:, ~on].ravel())
    b, i = float(np.concatenate(border).mean()), float(np.concatenate(inside).mean())
    return {"border_step": round(b, 3), "inside_step": round(i, 3), "ratio": round(b / i, 3)}


def measure(image: np.ndarray, floor: float, jpeg2000: bool) -> dict:
    import wsicodec
    from bench.metrics import psnr

    t0 = time.perf_counter()
    data = wsicodec.encode(image, 8, codec="auto", min_psnr=floor, jpeg2000=jpeg2000)
    decoded = wsicodec.decode(data)
    return {"bpp": round(len(data) * 8 / (image.shape[0] * image.shape[1]), 4),
            "psnr_db": round(psnr(image, decoded), 3),
            **error_steps(decoded, image), "seconds": round(time.perf_counter() - t0, 1)}


def figure(path: Path, spec: str, floor: float = 36.0, corner: int = TILE, half: int = 40,
           zoom: int = 4) -> None:
    """A PNG of the ``half``·2 px around the tile corner (``corner``, ``corner``) of image
    ``spec`` (SET:INDEX), ``zoom``× each way, coded by auto at quality 8 and ``floor``:
    JPEG 2000 tiles coded without a margin and without the ring hold (as auto kept them on
    2026-12-05 from 16:42 to 20:00 UTC), auto as it is (a margin, held), JPEG-XL alone, and
    the source; below each coding its error, ×6 around mid grey."""
    from PIL import Image

    import wsicodec
    from bench.datasets import get_dataset
    from wsicodec.learned import j2kfit

    name, index = spec.split(":")
    image = list(get_dataset(name).images(int(index) + 1))[int(index)][1]
    held = j2kfit.RING_TOLERANCE
    decoded = []
    for ring, margin, jpeg2000 in ((float("inf"), 0, True), (held, None, True), (held, None, False)):
        j2kfit.RING_TOLERANCE = ring
        try:
            decoded.append(wsicodec.decode(wsicodec.encode(image, 8, codec="auto", min_psnr=floor,
                                                           jpeg2000=jpeg2000, jpeg2000_margin=margin)))
        finally:
            j2kfit.RING_TOLERANCE = held
    box = (slice(corner - half, corner + half), slice(corner - half, corner + half))
    src = image[box].astype(np.int16)

    def big(a: np.ndarray) -> np.ndarray:
        return np.pad(np.kron(a, np.ones((zoom, zoom, 1), np.uint8)), ((2, 2), (2, 2), (0, 0)),
                      constant_values=255)

    top = [big(d[box]) for d in decoded] + [big(image[box])]
    errors = [big(np.clip(128 + 6 * (d[box].astype(np.int16) - src), 0, 255).astype(np.uint8))
              for d in decoded] + [big(np.full_like(image[box], 255))]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([np.concatenate(top, 1), np.concatenate(errors, 1)], 0)).save(path)
    log(f"wrote {path}: {spec} at {floor:g} dB, columns: no margin, no ring hold / auto / JPEG-XL alone / source")


def main(argv: list[str] | None = None) -> int:
    from bench.datasets import get_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="he_test:3,he_test_2x:3,tcga:1,cmu:1", help="SET:IMAGES,... (bench/datasets.py)")
    ap.add_argument("--floors", default="36,40")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "error_steps.json")
    ap.add_argument("--figure", type=Path, default=None,
                    help="write only a PNG of one tile corner (figure()) to this path")
    ap.add_argument("--figure-image", default="he_test:1", help="SET:INDEX of the figure's image")
    args = ap.parse_args(argv)
    import torch
    torch.set_flush_denormal(True)
    if args.figure is not None:
        figure(args.figure, args.figure_image)
        return 0
    rows = []
    for spec in args.sets.split(","):
        name, count = spec.split(":")
        for image_name, image in get_dataset(name).images(int(count)):
            for floor in (float(f) for f in args.floors.split(",")):
                for jpeg2000 in (True, False):
                    r = {"set": name, "image": image_name, "floor_db": floor, "jpeg2000": jpeg2000,
                         **measure(image, floor, jpeg2000)}
                    log(" ".join(f"{k}={v}" for k, v in r.items()))
                    rows.append(r)
    write_json(args.out, {"what": __doc__.split("\n\n")[0].strip(), "quality": 8, "tile": TILE,
                          "environment": run_environment(REPO, ("imagecodecs", "numpy", "torch")),
                          "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
