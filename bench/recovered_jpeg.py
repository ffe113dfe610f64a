"""The ``auto`` codec's recovered JPEGs on JPEG scans of the kinds scanners write, made here
from he/test: what they gain, and how faithful they are.

    python bench/recovered_jpeg.py [--images 4] [--floors 32,36,40] [--out bench/results/recovered_jpeg.json]

The shared slides hold one JPEG scan only (cmu: Aperio's R, G, B components at quality 30,
``bench/scanner_tiles.py``); most scanners write YCbCr with 4:2:0 chroma.  So the first
``--images`` he/test images, tiled 2 × 2 into one image, are written as tiled TIFF slides
the way scanners write them (240-px JPEG tiles: YCbCr 4:2:0 at quality 70 and 90, and R, G,
B components at quality 30) and compressed from the TIFF, as any slide is, on the default
256-px grid (across the scanner's tile borders) at each floor, with ``recovered_jpeg`` on and
off.  Per run: level 0's tile bytes, its minimum and median recorded PSNR, how many tiles
decode exactly, each kind's count, the compress seconds.  he/test is evaluation data only.

Times drift by 10-30 % on the shared 2-core machine: compare them within one run only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.report import log, run_environment, write_json  # noqa: E402

HE_TEST = REPO.parent / "shared" / "data" / "he" / "test"
#: the scans: name, imagecodecs' JPEG arguments
SCANS = (
    ("ycbcr420_q70", {"level": 70, "outcolorspace": "YCBCR", "subsampling": "420"}),
    ("ycbcr420_q90", {"level": 90, "outcolorspace": "YCBCR", "subsampling": "420"}),
    ("rgb_q30", {"level": 30, "colorspace": "RGB", "outcolorspace": "RGB"}),
)
TILE = 240


def mosaic(n: int) -> np.ndarray:
    """The first ``n`` he/test images (a multiple of 2), 2 to a row, cropped to whole rows."""
    from PIL import Image

    ims = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(HE_TEST.glob("*.png"))[:n]]
    rows = [np.concatenate(ims[i:i + 2], axis=1) for i in range(0, len(ims) - 1, 2)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def write_scan(path: Path, image: np.ndarray, args: dict) -> float:
    """``image`` as a tiled JPEG TIFF; the PSNR of what OpenSlide reads from it."""
    import openslide
    import tifffile

    tifffile.imwrite(path, image, tile=(TILE, TILE), compression="jpeg", compressionargs=args,
                     photometric="rgb")
    with openslide.OpenSlide(str(path)) as s:
        read = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    mse = np.mean((read.astype(np.float64) - image) ** 2)
    return round(float(10 * np.log10(255.0 ** 2 / mse)), 2)


def run(tif: Path, out: Path, floor: float, recovered: bool) -> dict:
    from wsicodec import open_slide
    from wsicodec.codecs import get_codec
    from wsicodec.pipeline import compress

    t0 = time.perf_counter()
    compress(tif, out, get_codec("auto", min_psnr=floor, recovered_jpeg=recovered))
    wall = time.perf_counter() - t0
    with open_slide(out) as s:
        rec = s.tile_records(0)
        kinds = {rec.kind_names[k]: int((rec.kind == k).sum()) for k in np.unique(rec.kind)}
        psnr = rec.psnr.astype(np.float64)
        return {"floor": floor, "recovered_jpeg": recovered, "level0_bytes": int(rec.nbytes.sum()),
                "tiles": int(psnr.size), "min_psnr": round(float(psnr.min()), 3),
                "median_psnr": round(float(np.median(psnr)), 3), "exact_tiles": int(np.isinf(psnr).sum()),
                "kinds": kinds, "compress_s": round(wall, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--floors", default="32,36,40")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "recovered_jpeg.json"))
    args = ap.parse_args(argv)
    import torch

    torch.set_flush_denormal(True)
    env = run_environment(REPO, ("torch", "imagecodecs", "numpy", "tifffile", "openslide-python"))
    image = mosaic(args.images)
    scans = []
    with tempfile.TemporaryDirectory() as d:
        for name, jpeg in SCANS:
            tif = Path(d) / f"{name}.tif"
            scan_psnr = write_scan(tif, image, jpeg)
            runs = []
            for floor in (float(f) for f in args.floors.split(",")):
                for recovered in (True, False):
                    r = run(tif, Path(d) / f"{name}_{floor:g}_{int(recovered)}.zarr", floor, recovered)
                    log(f"{name} floor {floor:g} recovered_jpeg={recovered}: level 0 {r['level0_bytes']} B, "
                        f"median {r['median_psnr']} dB, {r['exact_tiles']} exact, {r['kinds']}, {r['compress_s']} s")
                    runs.append(r)
            scans.append({"scan": name, "jpeg": jpeg, "tile": TILE, "scan_psnr_vs_image": scan_psnr,
                          "size": list(image.shape[:2]), "runs": runs})
    write_json(args.out, {"what": __doc__.splitlines()[0], "images": args.images,
                          "environment": env, "scans": scans})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
