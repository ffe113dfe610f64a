"""The scanner's own tiles kept by the ``auto`` codec (a JPEG carried in JPEG-XL, a JPEG 2000
codestream as it is), and a JPEG scan's JPEG recovered from the pixels on any grid: what they
gain on slides scanned to tiles, against re-coding them.

    python bench/scanner_tiles.py [--slides cmu_small_region.svs,tcga-cr-7395-01a-01-ts1.svs]
                                  [--floors 32,36,40] [--out bench/results/scanner_tiles.json]

One process, one run.  Per slide (under ``../shared/data/slides``):

* per level the scanner tiled in a size a container can take: its tiles' bytes as stored
  (JPEG tables counted once) and as ``auto`` would keep them (JPEG recompressed
  losslessly in JPEG-XL, or as it is where smaller; JPEG 2000 as it is), and how many
  decode to exactly the pixels compress reads from the slide (OpenSlide's);
* the ``auto`` codec at each floor (its default quality): on the scanner's tile grid with
  ``scanner_tiles`` and ``recovered_jpeg`` both on (the default), both off (the codec
  before them) and only ``recovered_jpeg`` off, and on the default 256-px grid where the
  scanner's is another, ``recovered_jpeg`` on and off; per run: every tile's bytes, level 0's, each level's minimum recorded PSNR,
  how many tiles decode exactly, the share of tiles and bytes per kind, and the compress
  wall time.

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
    """The scanner's tiles of every level a grid of its tile size carries (all of them)."""
    from wsicodec.classical import J2K_SIGNATURE, Jpeg2000Codec
    from wsicodec.scannertiles import carry, decode_carried, open_scanned, scanner_tile_size
    from wsicodec.tiling import Rect, open_source

    size = scanner_tile_size(path)
    if size is None:
        raise SystemExit(f"{path.name}: level 0 is not tiled in JPEG or JPEG 2000: nothing to keep")
    src = open_source(path)
    tiles = open_scanned(path, src.level_dimensions, size)
    levels = []
    for level in tiles.levels():
        w, h = src.level_dimensions[level]
        page = tiles.pages[level].page
        stored = int(sum(page.databytecounts)) + len(getattr(page, "jpegtables", None) or b"")
        kept, exact, n = 0, 0, 0
        t0 = time.perf_counter()
        for row in range(-(-h // size)):
            for col, stream in enumerate(tiles.row(level, row, -(-w // size))):
                data = carry(stream)
                px = Jpeg2000Codec().decode(data) if data.startswith(J2K_SIGNATURE) else \
                    decode_carried(data, (size, size))
                vw, vh = min(size, w - col * size), min(size, h - row * size)
                ref = src.read_region(level, Rect(col * size, row * size, vw, vh))
                exact += bool(np.array_equal(px[:vh, :vw], ref))
                kept += len(data)
                n += 1
        levels.append({"level": level, "compression": int(page.compression), "tiles": n,
                       "stored_bytes": stored, "kept_bytes": kept, "kept_vs_stored": round(kept / stored, 4),
                       "tiles_exact_vs_source_reader": exact,
                       "keep_and_decode_s": round(time.perf_counter() - t0, 3)})
    tiles.close()
    src.close()
    return {"tile_size": size, "levels": levels}


def auto_run(path: Path, floor: float, tile_size: int, scanner_tiles: bool, recovered_jpeg: bool,
             tmp: Path) -> dict:
    from wsicodec import open_slide
    from wsicodec.codecs import get_codec
    from wsicodec.pipeline import compress

    out = tmp / f"{path.stem}_{floor:g}_{tile_size}_{int(scanner_tiles)}{int(recovered_jpeg)}.zarr.zip"
    codec = get_codec("auto", min_psnr=floor, scanner_tiles=scanner_tiles, recovered_jpeg=recovered_jpeg)
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
    return {"floor": floor, "tile_size": tile_size, "scanner_tiles": scanner_tiles,
            "recovered_jpeg": recovered_jpeg, "compress_s": round(wall, 2),
            "tile_bytes": total, "level0_bytes": levels[0]["bytes"], "levels": levels,
            "kinds": {k: {"tile_share": round(v[0] / n, 4), "byte_share": round(v[1] / max(total, 1), 4)}
                      for k, v in kinds.items() if v[0]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", default="cmu_small_region.svs,tcga-cr-7395-01a-01-ts1.svs")
    ap.add_argument("--floors", default="32,36,40")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scanner_tiles.json"))
    args = ap.parse_args(argv)
    import torch

    torch.set_flush_denormal(True)
    env = run_environment(REPO, ("torch", "imagecodecs", "numpy", "tifffile", "openslide-python"))
    slides = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.slides.split(","):
            path = SLIDES / name
            scanner = scanner_tiles(path)
            log(f"{name}: scanner tiles {scanner}")
            size = scanner["tile_size"]
            ways = [(size, True, True), (size, False, False), (size, True, False)] \
                + ([(256, True, True), (256, True, False)] if size != 256 else [])
            runs = []
            for floor in (float(f) for f in args.floors.split(",")):
                for tile_size, on, rec in ways:
                    r = auto_run(path, floor, tile_size, on, rec, Path(d))
                    log(f"{name} floor {floor:g} tile {tile_size} scanner_tiles={on} recovered_jpeg={rec}: "
                        f"{r['tile_bytes']} B (level 0 {r['level0_bytes']}), {r['compress_s']} s")
                    runs.append(r)
            slides.append({"slide": name, "scanner": scanner, "auto": runs})
    write_json(args.out, {"environment": env, "slides": slides})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
