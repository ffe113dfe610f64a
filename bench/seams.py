"""Do independently coded tiles show seams?  PSNR near tile borders against the interior.

    python bench/seams.py [--images ../shared/data/he/test] [--max-images 4]
                          [--qualities 2 4 6] [--margins 0 8] [--out bench/results/seams.json]

Each image goes through ``wsicodec.encode``/``decode`` with 256² tiles.  "Border"
pixels are those within 4 px of an internal tile boundary (either side), "interior"
the rest; the gap is interior PSNR − border PSNR (MSE pooled over all images).  The
target is a gap under 0.5 dB.  Margin 0 codes each tile alone; margin 8 codes it with
8 px of its neighbours (the default).  bpp from the actual bytes.
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
sys.path.insert(0, str(ROOT))

import wsicodec  # noqa: E402
from wsicodec.checkpoint import load_model  # noqa: E402

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "he" / "test"))
    ap.add_argument("--max-images", type=int, default=4)
    ap.add_argument("--qualities", type=float, nargs="+", default=[2.0, 4.0, 6.0])
    ap.add_argument("--margins", type=int, nargs="+", default=[0, 8])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "seams.json"))
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    paths = sorted(Path(args.images).glob("*.png"))[: args.max_images]
    if not paths:
        raise SystemExit(f"no PNG images in {args.images}")
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    rows = []
    for q in args.qualities:
        for margin in args.margins:
            sse_b = sse_i = 0.0
            n_b = n_i = 0
            nbytes = 0
            t0 = time.perf_counter()
            for img in images:
                data = wsicodec.encode(img, quality=q, margin=margin)
                out = wsicodec.decode(data)
                nbytes += len(data)
                err = ((img.astype(np.float64) - out) ** 2).sum(2)
                m = border_mask(*img.shape[:2])
                sse_b += err[m].sum()
                n_b += int(m.sum()) * 3
                sse_i += err[~m].sum()
                n_i += int((~m).sum()) * 3
            pix = sum(i.shape[0] * i.shape[1] for i in images)
            row = {"quality": q, "margin": margin, "bpp": 8 * nbytes / pix,
                   "psnr_border": _psnr(sse_b, n_b), "psnr_interior": _psnr(sse_i, n_i),
                   "seconds": time.perf_counter() - t0}
            row["gap_db"] = row["psnr_interior"] - row["psnr_border"]
            rows.append(row)
            print(f"q={q:g} margin={margin}: {row['bpp']:.3f} bpp, interior {row['psnr_interior']:.2f} dB, "
                  f"border {row['psnr_border']:.2f} dB, gap {row['gap_db']:.2f} dB", flush=True)
    result = {
        "what": f"PSNR within {BAND} px of internal {TILE}px tile borders vs interior, wsicodec.encode/decode",
        "images": [p.name for p in paths], "model_sha256": load_model().model_id,
        "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
