"""Fit the decoder's reconstruction κ (``ModelConfig.reconstruction``) on training images.

    python train/tune_reconstruction.py WEIGHTS.pt [--images ../shared/data/he/train]
                                       [--count 4] [--crop 512] [--qualities 1 .. 8]
                                       [--kappas ...] [--json OUT.json]

The decoder turns each y symbol s into μ + s + κ·(centroid − s): κ of the way from its
bin's centre to the bin's mean under the Gaussian it was coded with
(:meth:`wsicodec.learned.network.WsiHyperprior.reconstruct`).  The stream does not change, so
neither do the bytes: κ only moves the pixels.  For each integer quality 1..8 this codes
the central ``--crop``² of ``--count`` images the way the codec does (256² tiles with
their context margin, glass tiles as the codec codes them) and decodes the symbols with
every κ of a grid (negative κ moves latents away from μ, past their bin's centre); it
prints PSNR and LPIPS per (quality, κ), the κ per quality that improves PSNR and LPIPS
the most together (the sum of both gains in dB, LPIPS as −10·log10 LPIPS, the scale its
BD-rate uses) among those that make neither worse than κ = 0 (``--psnr-slack`` dB and
``--lpips-slack`` relative allow some), and the argument for
``train/export.py --reconstruction``.  Low qualities want κ > 0 (the bin means, smoother:
PSNR up), the top ones κ < 0 (g_s wants its high-rate latents larger than their bin
centres: LPIPS down by a fifth at quality 8, PSNR up too).  Fit it on training images (``he/train``,
the default), never on ``he/test``, which the benchmarks score.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import metrics  # noqa: E402  (bench/metrics.py: LPIPS from the local trunk)
import tilecode  # noqa: E402  (bench/tilecode.py: the codec's encoder path up to y's symbols)
from wsicodec.checkpoint import load_model  # noqa: E402

KAPPAS = (-3.0, -2.5, -2.0, -1.6, -1.2, -0.8, -0.4, -0.2, 0.0, 0.2, 0.3, 0.4, 0.5, 0.6)


@torch.inference_mode()
def decode_per_kappa(model, tables, img: np.ndarray, quality: int, kappas) -> dict[float, np.ndarray]:
    """``img`` coded at ``quality`` as the codec codes it, decoded with each κ (float64 0..255)."""
    tiles = list(tilecode.tiles(model, tables, img, quality))
    out = {}
    for k in kappas:
        parts = [(t, None) if isinstance(t, tilecode.Glass) else
                 (t, model.reconstruct(torch.round(t.y - t.mu), t.mu, t.index, quality, kappa=k))
                 for t in tiles]
        out[k] = tilecode.image_pixels(model, img.shape, parts)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights")
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "he" / "train"))
    ap.add_argument("--count", type=int, default=4, help="images (the first, sorted by name)")
    ap.add_argument("--crop", type=int, default=512, help="central square coded per image")
    ap.add_argument("--kappas", type=float, nargs="+", default=list(KAPPAS))
    ap.add_argument("--lpips-slack", type=float, default=0.0,
                    help="relative LPIPS loss allowed (default 0: LPIPS must not get worse)")
    ap.add_argument("--psnr-slack", type=float, default=0.0,
                    help="PSNR loss in dB allowed (default 0: PSNR must not get worse)")
    ap.add_argument("--qualities", type=int, nargs="+", default=list(range(1, 9)),
                    help="integer qualities to fit (the export needs all eight)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="write every number here")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "he/test" in Path(args.images).as_posix():
        print("note: fitting on he/test, the benchmark's images; fit on training images instead",
              file=sys.stderr)
    loaded = load_model(args.weights)
    model, tables = loaded.model.eval(), loaded.model.coding_tables()
    files = sorted(p for p in Path(args.images).iterdir()
                   if p.suffix.lower() in (".png", ".tif", ".tiff", ".jpg", ".webp"))[:args.count]
    imgs = [metrics.center_crop(np.asarray(Image.open(p).convert("RGB")), args.crop) for p in files]
    px = sum(i.shape[0] * i.shape[1] for i in imgs)
    kappas = sorted(set(args.kappas) | {0.0})
    lp = metrics.load_lpips()
    t0 = time.perf_counter()
    rows = []
    for q in args.qualities:
        sse = dict.fromkeys(kappas, 0.0)
        lpips = dict.fromkeys(kappas, 0.0)
        for img in imgs:
            ref = lp.reference(img)
            for k, dec in decode_per_kappa(model, tables, img, q, kappas).items():
                sse[k] += float(((dec - img) ** 2).sum())
                lpips[k] += lp.against(ref, img, dec.astype(np.uint8)) / len(imgs)
        psnr = {k: 10 * math.log10(255 ** 2 * px * 3 / max(v, 1e-9)) for k, v in sse.items()}
        allowed = [k for k in kappas if lpips[k] <= lpips[0.0] * (1 + args.lpips_slack)
                   and psnr[k] >= psnr[0.0] - args.psnr_slack]
        best = max(allowed, key=lambda k: psnr[k] - psnr[0.0] + 10 * math.log10(lpips[0.0] / lpips[k]))
        rows.append({"quality": q, "psnr": {f"{k:g}": round(v, 4) for k, v in psnr.items()},
                     "lpips": {f"{k:g}": round(v, 5) for k, v in lpips.items()},
                     "best_kappa": best, "psnr_gain_db": round(psnr[best] - psnr[0.0], 4),
                     "lpips_change": round(lpips[best] / lpips[0.0] - 1, 5)})
        print(f"q{q}: " + "  ".join(f"κ{k:g} {psnr[k]:.3f} dB {lpips[k]:.4f}" for k in kappas)
              + f"  -> κ {best:g} ({psnr[best] - psnr[0.0]:+.3f} dB, LPIPS "
              f"{100 * (lpips[best] / lpips[0.0] - 1):+.2f} %)  [{time.perf_counter() - t0:.0f} s]",
              flush=True)
    arg = " ".join(f"{r['best_kappa']:g}" for r in rows)
    print(f"train/export.py ... --reconstruction {arg}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "weights": loaded.model_id, "images": [p.name for p in files], "crop": args.crop,
            "kappas": kappas, "lpips_slack": args.lpips_slack, "psnr_slack": args.psnr_slack,
            "rows": rows, "reconstruction": [r["best_kappa"] for r in rows],
            "seconds": round(time.perf_counter() - t0, 1)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
