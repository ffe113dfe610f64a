"""Do independently coded tiles show seams?  PSNR near tile borders against the interior.

    python bench/seams.py [--images ../shared/data/he/test] [--max-images 4]
                          [--qualities 1 4 8] [--margins 0 16] [--out bench/results/seams.json]
                          [--slides ../shared/data/slides/cmu_small_region.svs]
                          [--slide-codecs learned:4 jpegxl:1]

Each image goes through ``wsicodec.encode`` with 256² tiles, then is decoded two ways:
``stitched`` (``wsicodec.decode``: each tile's latents joined with its neighbours'
before g_s, what every reader does) and ``alone`` (each tile's stream decoded on its
own, :meth:`LearnedCodec.decode_alone`: what stitching is for).  "Border" pixels are
those within 4 px of an internal tile boundary (either side), "interior" the rest; the
gap is interior PSNR − border PSNR (MSE pooled over all images).  The target is a gap
under 0.5 dB.  ``--margins``: pixels of the neighbours g_a sees around each tile (16,
the default; 0: the tile alone).  bpp from the actual bytes.

PSNR near borders misses a grid on the glass: a few grey levels of step over large flat
areas.  So every row also reports the grid step of ``bench/grid_steps.py`` (mean absolute
grey step across tile borders against inside tiles, in flat bright areas; ratio near 1:
no grid), and each of ``--slides`` is compressed with each of ``--slide-codecs``
(``codec:quality``) and measured the same way at every level of its pyramid
(``grid_steps`` in the output; ``--slides`` with no value skips them).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import grid_steps  # noqa: E402  (bench/, beside this script)
import wsicodec
from wsicodec.checkpoint import load_model
from wsicodec.image import read_stream, tile_cells
from wsicodec.learned import LearnedCodec

TILE, BAND = 256, 4


def border_mask(h: int, w: int, tile: int = TILE, band: int = BAND) -> np.ndarray:
    """True within ``band`` px of an internal tile boundary."""
    m = np.zeros((h, w), bool)
    for b in range(tile, h, tile):
        m[max(b - band, 0):b + band, :] = True
    for b in range(tile, w, tile):
        m[:, max(b - band, 0):b + band] = True
    return m


def _psnr(sse: float, n: int) -> float:
    return float(10 * np.log10(255.0 ** 2 / (sse / n)))


def _grid_row(g: dict) -> dict:
    """Pooled grid-step sums (:func:`grid_steps.grid_steps`) → the row's grid columns."""
    b = g["border_sum"] / g["border_n"] if g["border_n"] else None
    i = g["inside_sum"] / g["inside_n"] if g["inside_n"] else None
    return {"grid_border_step": b, "grid_inside_step": i, "grid_border_n": g["border_n"],
            "grid_ratio": b / i if b is not None and i else None}


def _slide_grid(slide: Path, spec: str) -> dict:
    """``slide`` compressed with ``spec`` ("codec:quality", 256² tiles) into a scratch
    container, then :func:`grid_steps.measure` at every level."""
    import tempfile
    from wsicodec.codecs import get_codec
    from wsicodec.pipeline import compress

    name, _, q = spec.partition(":")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{slide.stem}_{name}_{q or 'default'}.zarr.zip"
        res = compress(slide, out, get_codec(name, float(q) if q else None), tile_size=TILE,
                       associated="none")
        r = grid_steps.measure(out, 200.0, 3.0)
    r.update(slide=slide.name, codec=name, quality=float(q) if q else None,
             tile_bytes=res.tile_bytes, container_bytes=res.container_bytes)
    for lv in r["levels"]:
        print(f"grid {slide.name} {spec} level {lv['level']}: border {lv['border_step']} inside "
              f"{lv['inside_step']} ratio {lv['ratio']}", flush=True)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "he" / "test"))
    ap.add_argument("--max-images", type=int, default=4)
    ap.add_argument("--qualities", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    ap.add_argument("--margins", type=int, nargs="+", default=[0, 16])
    ap.add_argument("--slides", nargs="*", default=[str(ROOT.parent / "shared" / "data" / "slides" /
                                                        "cmu_small_region.svs")],
                    help="slides whose pyramids get the grid-step measure (none: skip)")
    ap.add_argument("--slide-codecs", nargs="+", default=["learned:4", "jpegxl:1"],
                    help="codec:quality each slide is compressed with for the grid-step measure")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "seams.json"))
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    paths = sorted(Path(args.images).glob("*.png"))[: args.max_images]
    if not paths:
        raise SystemExit(f"no PNG images in {args.images}")
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    rows = []
    codec = LearnedCodec(4.0)
    for q in args.qualities:
        for margin in args.margins:
            acc = {"stitched": [0.0, 0, 0.0, 0], "alone": [0.0, 0, 0.0, 0]}
            grid = {how: dict.fromkeys(("border_sum", "border_n", "inside_sum", "inside_n"), 0)
                    for how in acc}
            nbytes = 0
            t0 = time.perf_counter()
            for img in images:
                data = wsicodec.encode(img, quality=q, margin=margin)
                nbytes += len(data)
                alone = np.empty_like(img)
                for (_, _, ys, xs), t in zip(tile_cells(*img.shape[:2], TILE),
                                             codec.decode_alone(read_stream(data).tiles)):
                    alone[ys, xs] = t
                m = border_mask(*img.shape[:2])
                for how, out in (("stitched", wsicodec.decode(data)), ("alone", alone)):
                    err = ((img.astype(np.float64) - out) ** 2).sum(2)
                    a = acc[how]
                    a[0] += err[m].sum()
                    a[1] += int(m.sum()) * 3
                    a[2] += err[~m].sum()
                    a[3] += int((~m).sum()) * 3
                    g = grid_steps.grid_steps(out, TILE)
                    for k in grid[how]:
                        grid[how][k] += g[k]
            pix = sum(i.shape[0] * i.shape[1] for i in images)
            for how, (sse_b, n_b, sse_i, n_i) in acc.items():
                row = {"quality": q, "margin": margin, "decode": how, "bpp": 8 * nbytes / pix,
                       "psnr": _psnr(sse_b + sse_i, n_b + n_i),
                       "psnr_border": _psnr(sse_b, n_b), "psnr_interior": _psnr(sse_i, n_i),
                       "seconds": time.perf_counter() - t0}
                row["gap_db"] = row["psnr_interior"] - row["psnr_border"]
                row.update(_grid_row(grid[how]))
                rows.append(row)
                print(f"q={q:g} margin={margin} {how}: {row['bpp']:.3f} bpp, {row['psnr']:.2f} dB, interior "
                      f"{row['psnr_interior']:.2f} dB, border {row['psnr_border']:.2f} dB, gap "
                      f"{row['gap_db']:.2f} dB, grid ratio {row['grid_ratio']}", flush=True)
    result = {
        "what": f"PSNR within {BAND} px of internal {TILE}px tile borders vs interior, wsicodec.encode, "
                "decoded stitched (wsicodec.decode) and tile by tile (decode_alone)",
        "images": [p.name for p in paths], "model_sha256": load_model().model_id,
        "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "grid_steps": [_slide_grid(Path(s), spec) for s in args.slides for spec in args.slide_codecs],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
