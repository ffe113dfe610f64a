"""Peak memory of whole-slide compress and decompress against the slide's size.

    python bench/memory_scaling.py [--sizes 4096x4096,49152x6144] [--codecs learned,auto]
                                   [--work DIR] [--out bench/results/memory_scaling.json]

Issue #31 asks that whole-slide encode and decode stay under ~1.5 GB RSS *whatever the
slide's size*; the shared slides are 6-16 MP, real ones 1-10 GP.  This builds synthetic
slides of each size (``WIDTHxHEIGHT``): a single-level tiled TIFF, JPEG q90 tiles of 256²
(a scanner's kind of source; OpenSlide opens it as generic-tiff, so the pyramid's lower
levels are made by the strip downsampler), its content a mosaic of 1000² tissue images
(``../shared/data/he/test``, each placed with a random flip and rotation; seeded) with a
quarter of the cells glass (a near-white plane with sensor-like noise).  Then, each in its
own process as a user runs them, ``wsicodec compress SLIDE OUT --codec C`` and
``wsicodec decompress OUT OUT.tiff`` per codec: exit code, wall seconds and peak RSS
(``os.wait4`` on the child, :func:`bench.vs_jpegxl.timed`), MP/s over all levels.

What it shows: whether peak RSS grows with the slide's area (it should not: sources are
read a tile-row strip at a time, levels are made strip by strip, tiles are written row by
row and decoded in bounded batches) or with its width (strips are full width, so some
growth is by design).  The wide default size (49152 px) is a 20x slide's width.  The
tissue is MoNuSeg's, only as realistic pixels for memory and speed: no quality is
measured here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import log, run_environment, write_json  # noqa: E402
from bench.vs_jpegxl import timed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TISSUE = REPO.parent / "shared" / "data" / "he" / "test"
CELL, TILE, GLASS_SHARE, SEED = 1000, 256, 0.25, 2026


class Mosaic:
    """A seeded mosaic of ``CELL``² cells, each a tissue image (flipped / rotated) or glass."""

    def __init__(self, width: int, height: int, seed: int = SEED) -> None:
        from PIL import Image

        self.images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(TISSUE.glob("*.png"))]
        if not self.images:
            raise SystemExit(f"no tissue images in {TISSUE}")
        self.width, self.height = width, height
        rng = np.random.default_rng(seed)
        rows, cols = -(-height // CELL), -(-width // CELL)
        self.pick = rng.integers(0, len(self.images), (rows, cols))
        self.turn = rng.integers(0, 8, (rows, cols))
        self.glass = rng.random((rows, cols)) < GLASS_SHARE
        self.rng = rng
        noise = rng.normal(0.0, 1.5, (CELL, CELL, 3))
        self.plane = np.clip(np.array([236.0, 234.0, 240.0]) + noise, 0, 255).astype(np.uint8)

    def cell(self, r: int, c: int) -> np.ndarray:
        if self.glass[r, c]:
            return self.plane
        img = self.images[self.pick[r, c]][:CELL, :CELL]
        t = int(self.turn[r, c])
        img = np.rot90(img, t % 4)
        return img[:, ::-1] if t >= 4 else img

    def tile(self, y0: int, x0: int) -> np.ndarray:
        """The TILE² pixels at (y0, x0) (past the slide's edge: zeros, as TIFF pads)."""
        out = np.zeros((TILE, TILE, 3), np.uint8)
        y1, x1 = min(y0 + TILE, self.height), min(x0 + TILE, self.width)
        for cy in range(y0 // CELL, (y1 - 1) // CELL + 1):
            for cx in range(x0 // CELL, (x1 - 1) // CELL + 1):
                a0, a1 = max(y0, cy * CELL), min(y1, (cy + 1) * CELL)
                b0, b1 = max(x0, cx * CELL), min(x1, (cx + 1) * CELL)
                out[a0 - y0:a1 - y0, b0 - x0:b1 - x0] = self.cell(cy, cx)[a0 - cy * CELL:a1 - cy * CELL,
                                                                         b0 - cx * CELL:b1 - cx * CELL]
        return out

    def tiles(self):
        for y0 in range(0, self.height, TILE):
            for x0 in range(0, self.width, TILE):
                yield self.tile(y0, x0)


def build_slide(path: Path, width: int, height: int) -> None:
    """The synthetic slide of ``width`` × ``height`` at ``path`` (JPEG q90 tiles, 0.5 µm/px)."""
    import tifffile

    mosaic = Mosaic(width, height)
    tifffile.imwrite(path, mosaic.tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(TILE, TILE),
                     photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                     resolution=(20000, 20000), resolutionunit="CENTIMETER", metadata=None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4096x4096,49152x6144", help="comma-separated WIDTHxHEIGHT")
    ap.add_argument("--codecs", default="learned,auto")
    ap.add_argument("--work", type=Path, default=Path("/tmp/wsicodec-memory-scaling"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "memory_scaling.json")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "wsicodec"]
    rows = []
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.lower().split("x"))
        slide = args.work / f"slide_{width}x{height}.tiff"
        if not slide.exists():
            t0 = time.perf_counter()
            build_slide(slide, width, height)
            log(f"built {slide} ({slide.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f} s")
        for codec in args.codecs.split(","):
            out = args.work / f"{slide.stem}.{codec}.zarr.zip"
            tiff = args.work / f"{slide.stem}.{codec}.decoded.tiff"
            row = {"width": width, "height": height, "megapixels_level0": round(width * height / 1e6, 2),
                   "source_bytes": slide.stat().st_size, "codec": codec}
            log(f"{size} {codec}: compress")
            row["compress"] = timed(exe + ["compress", str(slide), str(out), "--codec", codec, "--overwrite"])
            if row["compress"]["exit_code"] == 0:
                row["container_bytes"] = out.stat().st_size
                log(f"{size} {codec}: decompress")
                row["decompress"] = timed(exe + ["decompress", str(out), str(tiff), "--overwrite"])
                from wsicodec import open_slide
                with open_slide(out) as s:
                    mp = sum(w * h for w, h in s.level_dimensions) / 1e6
                row["megapixels_all_levels"] = round(mp, 2)
                for step in ("compress", "decompress"):
                    r = row.get(step, {})
                    if r.get("exit_code") == 0:
                        r["mp_s_all_levels"] = round(mp / r["wall_s"], 3)
                tiff.unlink(missing_ok=True)
                out.unlink(missing_ok=True)
            log(f"  {row}")
            rows.append(row)
    doc = {"what": "peak RSS of whole-slide compress and decompress against slide size (issue #31)",
           "command": "python bench/memory_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "environment": run_environment(REPO, ("wsicodec", "torch", "tifffile", "imagecodecs", "zarr")),
           "rows": rows}
    write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
