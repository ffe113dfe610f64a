"""Do independently coded tiles show seams?  PSNR near tile borders against the interior.

    python bench/seams.py [--images ../shared/data/he/test] [--max-images 4]
                          [--qualities 1 4 8] [--margins 0 16] [--out bench/results/seams.json]
                          [--slides ../shared/data/slides/cmu_small_region.svs]
                          [--slide-codecs learned:4 jpegxl:1]
                          [--mixed cmu:4:32:1] [--seam-search STEPS]

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
(``grid_steps`` in the output; ``--slides`` with no value skips them).  ``--seam-search
STEPS`` codes the ``--mixed`` sets with the auto codec's ``seam_search=STEPS``
(:mod:`wsicodec.learned.seamsearch`; default 0, off).
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
from metrics import psnr_from_sse  # noqa: E402  (bench/metrics.py)
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


def _tile_kind(data: bytes) -> str:
    """"learned", "glass", "fixup", "jpeg2000" or "jpegxl": what a tile of an auto stream is."""
    from wsicodec.classical import J2K_SIGNATURE
    from wsicodec.learned.tileformat import GLASS_KINDS, KIND_FIXUP, MAGIC, parse_header
    if data[:4] != MAGIC:
        return "jpeg2000" if data.startswith(J2K_SIGNATURE) else "jpegxl"
    kind = parse_header(data).kind
    return "glass" if kind in GLASS_KINDS else "fixup" if kind == KIND_FIXUP else "learned"


def mixed_seams(spec: str, seam_search: int = 0) -> dict:
    """Seams where tiles of different kinds meet, in the ``auto`` codec's streams.

    ``spec`` "SET:QUALITY:FLOOR[:IMAGES]" (a set of ``bench/datasets.py``): each image
    coded by ``wsicodec.encode(codec="auto")`` (256² tiles) and decoded by
    ``wsicodec.decode``; every internal border is classified by the kinds of the two
    tiles it joins, and the PSNR of the pixels within BAND px of it (both sides) is set
    against the interior PSNR (pixels at least BAND px from any internal border) of the
    tiles of those two kinds; gap = interior − border, pooled over the images.

    The gap mixes two things: what the seam costs, and that tissue near some tile borders is
    harder than inside (auto sends dense tissue to JPEG-XL, so its network tiles' JPEG-XL
    borders lie next to dense tissue).  So each image is also coded by the network alone
    (``wsicodec.encode(quality)``), and for every border the network side's BAND px are
    measured in both decodes, on network tiles auto kept at the asked quality (a tile raised
    to reach the floor has no counterpart): ``seam_cost_db`` = their PSNR with network
    neighbours (the network alone) − their PSNR beside the neighbour auto gave them, the
    seam's own cost.  ``seam_search``: the auto codec's option; ``auto_encode_seconds``:
    the auto codec's encoding time over the set."""
    sys.path.insert(0, str(ROOT))
    from bench.datasets import get_dataset

    from wsicodec.learned.tileformat import parse_header

    name, q, floor, *rest = spec.split(":")
    limit = int(rest[0]) if rest else 4
    band: dict[str, list] = {}
    inner: dict[str, list] = {}
    control: dict[str, list] = {}
    nbytes = pix = 0
    seconds = 0.0
    for _, img in get_dataset(name).images(limit):
        img = np.ascontiguousarray(img)
        t0 = time.perf_counter()
        data = wsicodec.encode(img, float(q), codec="auto", min_psnr=float(floor), seam_search=seam_search)
        seconds += time.perf_counter() - t0
        nbytes, pix = nbytes + len(data), pix + img.shape[0] * img.shape[1]
        out = wsicodec.decode(data)
        err = ((img.astype(np.float64) - out) ** 2).sum(2)
        alone = wsicodec.decode(wsicodec.encode(img, float(q)))
        err_alone = ((img.astype(np.float64) - alone) ** 2).sum(2)
        h, w = img.shape[:2]
        rows, cols = -(-h // TILE), -(-w // TILE)
        streams = read_stream(data).tiles
        kinds = [_tile_kind(t) for t in streams]
        # the network tiles auto coded at the asked quality (not raised to reach the floor):
        # only those have a like-for-like counterpart in the network-alone decode
        same_q = [k == "learned" and parse_header(t).quality == float(q) for k, t in zip(kinds, streams)]
        kind = lambda r, c: kinds[r * cols + c]   # noqa: E731
        m = border_mask(h, w)
        for r in range(rows):
            for c in range(cols):
                ys, xs = slice(r * TILE, (r + 1) * TILE), slice(c * TILE, (c + 1) * TILE)
                a = inner.setdefault(kind(r, c), [0.0, 0])
                a[0] += err[ys, xs][~m[ys, xs]].sum()
                a[1] += int((~m[ys, xs]).sum()) * 3
                for dr, dc in ((0, 1), (1, 0)):
                    if r + dr >= rows or c + dc >= cols:
                        continue
                    pair = "|".join(sorted((kind(r, c), kind(r + dr, c + dc))))
                    if dc:
                        x = (c + 1) * TILE
                        e = err[ys, max(x - BAND, 0):x + BAND]
                        sides = ((same_q[r * cols + c], (ys, slice(x - BAND, x))),
                                 (same_q[r * cols + c + 1], (ys, slice(x, x + BAND))))
                    else:
                        y = (r + 1) * TILE
                        e = err[max(y - BAND, 0):y + BAND, xs]
                        sides = ((same_q[r * cols + c], (slice(y - BAND, y), xs)),
                                 (same_q[(r + 1) * cols + c], (slice(y, y + BAND), xs)))
                    b = band.setdefault(pair, [0.0, 0])
                    b[0] += e.sum()
                    b[1] += e.size * 3
                    for like, box in sides:         # the network side, in both decodes
                        if like:
                            ctl = control.setdefault(pair, [0.0, 0.0, 0])
                            ctl[0] += err[box].sum()
                            ctl[1] += err_alone[box].sum()
                            ctl[2] += err[box].size * 3
    out = {"spec": spec, "set": name, "quality": float(q), "min_psnr": float(floor),
           "seam_search": seam_search, "bpp": 8 * nbytes / pix, "auto_encode_seconds": seconds, "pairs": {}}
    for pair, (sse, n) in sorted(band.items()):
        ka, kb = pair.split("|")
        si, ni = (inner.get(ka, [0.0, 0])[0] + (inner.get(kb, [0.0, 0])[0] if kb != ka else 0),
                  inner.get(ka, [0.0, 0])[1] + (inner.get(kb, [0.0, 0])[1] if kb != ka else 0))
        row = {"border_pixels": n // 3, "psnr_border": psnr_from_sse(sse, n),
               "psnr_interior": psnr_from_sse(si, ni) if ni else None}
        row["gap_db"] = row["psnr_interior"] - row["psnr_border"] if ni else None
        if pair in control:
            sse_auto, sse_alone, nc = control[pair]
            row["network_side_psnr"] = psnr_from_sse(sse_auto, nc)
            row["network_side_psnr_network_alone"] = psnr_from_sse(sse_alone, nc)
            row["seam_cost_db"] = row["network_side_psnr_network_alone"] - row["network_side_psnr"]
        out["pairs"][pair] = row
        print(f"mixed {spec} {pair}: border {row['psnr_border']:.2f} dB, interior "
              f"{row['psnr_interior']:.2f} dB, gap {row['gap_db']:.2f} dB ({n // 3} px)"
              + (f", seam cost {row['seam_cost_db']:.2f} dB" if "seam_cost_db" in row else ""), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "he" / "test"))
    ap.add_argument("--max-images", type=int, default=4)
    ap.add_argument("--qualities", type=float, nargs="*", default=[1.0, 4.0, 8.0],
                    help="learned qualities of the stitched/alone rows (none: keep the rows the "
                         "output file already has)")
    ap.add_argument("--margins", type=int, nargs="+", default=[0, 16])
    ap.add_argument("--slides", nargs="*", default=[str(ROOT.parent / "shared" / "data" / "slides" /
                                                        "cmu_small_region.svs")],
                    help="slides whose pyramids get the grid-step measure (none: skip)")
    ap.add_argument("--mixed", nargs="*", default=["he_test_2x:4:33", "he_test_2x:6:28", "cmu:4:32:1", "cmu:6:28:1"],
                    help="SET:QUALITY:FLOOR[:IMAGES]: seams between tile kinds of the auto codec")
    ap.add_argument("--seam-search", type=int, default=0, metavar="STEPS",
                    help="the auto codec's seam_search option for the --mixed sets (0: off)")
    ap.add_argument("--slide-codecs", nargs="+", default=["learned:4", "jpegxl:1", "auto:4"],
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
                       "psnr": psnr_from_sse(sse_b + sse_i, n_b + n_i),
                       "psnr_border": psnr_from_sse(sse_b, n_b), "psnr_interior": psnr_from_sse(sse_i, n_i),
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
        "mixed": [mixed_seams(spec, args.seam_search) for spec in args.mixed],
    }
    before = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    if not args.qualities:                                    # keep the rows measured before
        result["rows"], result["images"] = before.get("rows", []), before.get("images", [])
    if not args.slides:                                       # and the grid steps
        result["grid_steps"] = before.get("grid_steps", [])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
