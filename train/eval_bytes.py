"""Quick check of a weights file on held-out images, from the real bytes.

    python train/eval_bytes.py WEIGHTS.pt [--images ../shared/data/he/test]
                               [--qualities 1 2 4 6 8] [--max-images 14] [--device cpu]
                               [--json OUT.json] [--lpips] [--ms-ssim]

Codes every image with ``wsicodec.encode`` (256² tiles with their context margin and
the stream's tile table: every byte the product writes), decodes it, and prints bpp
and PSNR per quality, then the BD-rate (PSNR) against the JPEG-XL and JPEG 4:4:4
curves committed in ``bench/results/rd_he_test.json`` (same images), and against the learned
codec's committed curve there (the weights shipped now, as last benchmarked).  Use it to
decide whether new weights are worth shipping; ``bench/rd.py --update learned`` is
the full measurement (MS-SSIM, LPIPS, speed) once they are.  ``--lpips`` adds LPIPS-alex
and a BD-rate on it (quality = −10·log10 LPIPS), for weights trained with the feature loss;
``--ms-ssim`` adds MS-SSIM and its BD-rate (in dB, −10·log10(1 − MS-SSIM), as ``bench/rd.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import metrics  # noqa: E402  (bench/metrics.py: PSNR and BD-rate)

RD_JSON = ROOT / "bench" / "results" / "rd_he_test.json"


def non_monotonic_steps(rows: list[dict]) -> list[str]:
    """Steps between consecutive qualities that fail to cost more bytes *and* give more PSNR.

    ``rows`` carry ``per_image_bpp`` / ``per_image_psnr``; one text per failing step,
    e.g. "q1 -> q2: 11 of 14 images not bigger, 0 not better".
    """
    out = []
    rows = sorted(rows, key=lambda r: r["quality"])
    for a, b in zip(rows, rows[1:]):
        n = len(a["per_image_bpp"])
        bigger = sum(y <= x for x, y in zip(a["per_image_bpp"], b["per_image_bpp"]))
        better = sum(y <= x for x, y in zip(a["per_image_psnr"], b["per_image_psnr"]))
        if bigger or better:
            out.append(f"q{a['quality']:g} -> q{b['quality']:g}: {bigger} of {n} images not bigger, "
                       f"{better} not better")
    return out


def anchor_curves(path: Path, images: list[str], key_metric: str = "psnr"
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(bpp, metric) mean curves of the committed anchors, over the images evaluated here.

    ``learned`` is the learned codec as last benchmarked (``bench/rd.py --update learned``,
    normally the shipped weights): new weights are worth shipping when they beat it.
    """
    if not path.is_file():
        return {}
    result = json.loads(path.read_text())
    out = {}
    for key in ("jpegxl", "jpeg444", "learned"):
        entry = result.get("codecs", {}).get(key)
        if not entry:
            continue
        bpp, ps = [], []
        for p in entry.get("points", []):
            rows = [r for r in p.get("per_image", []) if r.get("image") in images and "error" not in r]
            if len(rows) == len(images):
                bpp.append(np.mean([r["bpp"] for r in rows]))
                ps.append(np.mean([r[key_metric] for r in rows]))
        if bpp:
            out[key] = (np.array(bpp), np.array(ps))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights")
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "he" / "test"))
    ap.add_argument("--qualities", type=float, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8])
    ap.add_argument("--max-images", type=int, default=14)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--lpips", action="store_true", help="also LPIPS-alex, and its BD-rate")
    ap.add_argument("--ms-ssim", action="store_true", help="also MS-SSIM, and its BD-rate (in dB)")
    ap.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                    help="how the codec runs g_a and g_s (LearnedCodec's precision; bfloat16: "
                         "what it costs)")
    args = ap.parse_args(argv)

    import torch
    torch.set_flush_denormal(True)
    from wsicodec.checkpoint import load_model
    from wsicodec.image import decode, encode

    files = sorted(Path(args.images).glob("*.png"))[: args.max_images]
    if not files:
        print(f"no .png images in {args.images}", file=sys.stderr)
        return 1
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    names = [f.name for f in files]
    lp = metrics.load_lpips() if args.lpips else None
    loaded = load_model(args.weights)
    print(f"model {loaded.model_id[:16]}... step {loaded.provenance.get('train_step')}, "
          f"{len(files)} images from {args.images}, g_a and g_s in {args.precision}")
    rows = []
    t0 = time.time()
    for q in args.qualities:
        bpp, ps, lps, mss = [], [], [], []
        for img in images:
            data = encode(img, quality=q, model=args.weights, precision=args.precision)
            rec = decode(data, model=args.weights, precision=args.precision)
            bpp.append(8 * len(data) / (img.shape[0] * img.shape[1]))
            ps.append(metrics.psnr(img, rec))
            if lp is not None:
                lps.append(lp(img, rec))
            if args.ms_ssim:
                mss.append(metrics.ms_ssim(img, rec))
        rows.append({"quality": q, "bpp": float(np.mean(bpp)), "psnr": float(np.mean(ps)),
                     "per_image_bpp": bpp, "per_image_psnr": ps})
        if lp is not None:
            rows[-1]["lpips"] = float(np.mean(lps))
        if args.ms_ssim:
            rows[-1]["ms_ssim"] = float(np.mean(mss))
        print(f"  q{q:g}: {rows[-1]['bpp']:.3f} bpp  {rows[-1]['psnr']:.2f} dB"
              + (f"  MS-SSIM {rows[-1]['ms_ssim']:.4f}" if args.ms_ssim else "")
              + (f"  LPIPS {rows[-1]['lpips']:.4f}" if lp is not None else "")
              + f"  ({time.time() - t0:.0f} s)", flush=True)
    broken = non_monotonic_steps(rows)
    for text in broken:
        print(f"  NOT SHIPPABLE: {text}")
    if len(rows) > 1 and not broken:
        print("  every quality step costs more bytes and gives more PSNR on every image")
    rate = np.array([r["bpp"] for r in rows])
    quality = np.array([r["psnr"] for r in rows])
    bd = {}
    benchmarked = json.loads(RD_JSON.read_text()).get("codecs", {}).get("learned", {}) if RD_JSON.is_file() else {}
    label = {"learned": f"learned as benchmarked ({str(benchmarked.get('model_sha256'))[:8]}...)"}
    for key, (ra, qa) in anchor_curves(RD_JSON, names).items():
        bd[key] = metrics.bd_rate(ra, qa, rate, quality)
        print(f"  BD-rate (PSNR) vs {label.get(key, key)}: {bd[key]:+.2f} %")
    for metric, name, to_db in (("ms_ssim", "MS-SSIM dB", metrics.msssim_db),
                                ("lpips", "LPIPS", metrics.lpips_db)):
        if metric not in rows[0]:
            continue
        ours = to_db(np.array([r[metric] for r in rows]))
        for key, (ra, va) in anchor_curves(RD_JSON, names, metric).items():
            bd[f"{key}_{metric}"] = metrics.bd_rate(ra, to_db(va), rate, ours)
            print(f"  BD-rate ({name}) vs {label.get(key, key)}: {bd[f'{key}_{metric}']:+.2f} %")
    if args.json:
        Path(args.json).write_text(json.dumps({"model_id": loaded.model_id, "precision": args.precision,
                                               "images": names,
                                               "points": rows, "bd_rate": bd,
                                               "non_monotonic": broken}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
