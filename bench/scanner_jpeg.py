"""The scanner's own JPEG tiles carried in JPEG-XL: what the ``auto`` codec gains on a slide
scanned to JPEG tiles, against re-coding them and against keeping them.

    python bench/scanner_jpeg.py [--slide cmu_small_region.svs] [--floors 32,36,40]
                                 [--out bench/results/scanner_jpeg.json]

One process, one run.  For the slide (under ``../shared/data/slides``):

* the scanner's level-0 JPEG tiles as stored (bytes, the shared tables counted once), and
  all of them carried losslessly in JPEG-XL (libjxl's JPEG recompression: what ``cjxl``
  does to a JPEG), decoded back and compared with OpenSlide's pixels;
* the ``auto`` codec at each floor (its default quality) in three ways: the grid of the
  scanner's tiles with ``scanner_jpeg`` on, the same grid with it off, and the default
  256-px grid (which no scanner tile fits); per way: every tile's bytes, level 0's, each
  level's minimum recorded PSNR, how many tiles decode exactly, the share of tiles and
  bytes per kind, and the compress wall time.

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

SLIDES = REPO.parent / "shared" / "data" / "slides"


def scanner_tiles(path: Path) -> dict:
    """The level-0 JPEG tiles as stored and carried in JPEG-XL (all of them)."""
    import openslide
    import tifffile

    from wsicodec.scannerjpeg import carry, decode_carried, open_scanned

    slide = openslide.OpenSlide(str(path))
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        size, tables = page.tilewidth, len(page.jpegtables or b"")
        stored = int(sum(page.databytecounts))
    tiles = open_scanned(path, slide.level_dimensions, size)
    if tiles is None or 0 not in tiles.levels():
        raise SystemExit(f"{path.name}: level 0 is not tiled in JPEG: nothing to carry")
    w, h = slide.level_dimensions[0]
    carried, exact, n = 0, 0, 0
    t0 = time.perf_counter()
    for row in range(-(-h // size)):
        for col, jpeg in enumerate(tiles.row(0, row, -(-w // size))):
            data = carry(jpeg)
            px = decode_carried(data, (size, size))
            vw, vh = min(size, w - col * size), min(size, h - row * size)
            ref = np.asarray(slide.read_region((col * size, row * size), 0, (vw, vh)).convert("RGB"))
            exact += bool(np.array_equal(px[:vh, :vw], ref))
            carried += len(data)
            n += 1
    seconds = time.perf_counter() - t0
    tiles.close()
    return {"tile_size": size, "tiles": n, "stored_bytes": stored + tables, "tables_bytes": tables,
            "carried_bytes": carried, "carried_vs_stored": round(carried / (stored + tables), 4),
            "tiles_exact_vs_openslide": exact, "carry_and_decode_s": round(seconds, 3)}


def auto_run(path: Path, floor: float, tile_size: int, scanner_jpeg: bool, tmp: Path) -> dict:
    from wsicodec import open_slide
    from wsicodec.codecs import get_codec
    from wsicodec.pipeline import compress

    out = tmp / f"auto_{floor:g}_{tile_size}_{int(scanner_jpeg)}.zarr.zip"
    codec = get_codec("auto", min_psnr=floor, scanner_jpeg=scanner_jpeg)
    t0 = time.perf_counter()
    compress(path, out, codec, tile_size=tile_size)
    wall = time.perf_counter() - t0
    slide = open_slide(out)
    levels, kinds = [], {}
    total = 0
    for lv in range(slide.level_count):
        rec = slide.tile_records(lv)
        nb = rec.nbytes.astype(np.int64)
        total += int(nb.sum())
        for i, name in enumerate(rec.kind_names):
            sel = rec.kind == i
            k = kinds.setdefault(name, [0, 0])
            k[0] += int(sel.sum())
            k[1] += int(nb[sel].sum())
        levels.append({"level": lv, "tiles": int(nb.size), "bytes": int(nb.sum()),
                       "min_psnr": round(float(rec.psnr.min()), 3),
                       "exact_tiles": int(np.isinf(rec.psnr).sum())})
    slide.close()
    n = sum(v[0] for v in kinds.values())
    return {"floor": floor, "tile_size": tile_size, "scanner_jpeg": scanner_jpeg, "compress_s": round(wall, 2),
            "tile_bytes": total, "level0_bytes": levels[0]["bytes"], "levels": levels,
            "kinds": {k: {"tile_share": round(v[0] / n, 4), "byte_share": round(v[1] / max(total, 1), 4)}
                      for k, v in kinds.items() if v[0]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", default="cmu_small_region.svs")
    ap.add_argument("--floors", default="32,36,40")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scanner_jpeg.json"))
    args = ap.parse_args(argv)
    import torch

    torch.set_flush_denormal(True)
    path = SLIDES / args.slide
    env = run_environment(REPO, ("torch", "imagecodecs", "numpy", "tifffile", "openslide-python"))
    scanner = scanner_tiles(path)
    log(f"scanner tiles: {scanner}")
    runs = []
    with tempfile.TemporaryDirectory() as d:
        for floor in (float(f) for f in args.floors.split(",")):
            for tile_size, on in ((scanner["tile_size"], True), (scanner["tile_size"], False), (256, False)):
                r = auto_run(path, floor, tile_size, on, Path(d))
                log(f"floor {floor:g} tile {tile_size} scanner_jpeg={on}: {r['tile_bytes']} B "
                    f"(level 0 {r['level0_bytes']}), {r['compress_s']} s")
                runs.append(r)
    write_json(args.out, {"environment": env, "slide": args.slide, "scanner": scanner, "auto": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
