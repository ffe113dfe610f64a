"""Judge candidate weights on he/test and the out-of-distribution sets, from real bytes.

    python train/eval_sets.py CANDIDATE.pt [--base wsicodec/weights/wsicodec-hyperprior.pt]
                              [--sets he_test he_test_2x he_test_4x cmu tcga] [--limit N]
                              [--qualities 1 2 4 6 8] [--json OUT.json]

Every image of each set (``bench/datasets.py``: evaluation data, never trained on) is
coded with ``wsicodec.encode`` (256² tiles, every byte the product writes) by the
candidate and by the base weights, decoded, and pooled per set (bytes over pixels; PSNR
of the pooled squared error).  Per set it prints both curves, the candidate's BD-rate
(PSNR) against the base's, and each against JPEG-XL where ``bench/results/nuclei.json``
holds JPEG-XL's curve for the same images.  The shipping rule of issue #29: ship only
when the out-of-distribution BD-rates improve and he_test gets at most 1 point worse.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # bench/ is a folder of scripts beside the package

from bench import metrics  # noqa: E402
from bench.datasets import get_dataset  # noqa: E402

NUCLEI_JSON = ROOT / "bench" / "results" / "nuclei.json"


def curve(weights: str, images: list[tuple[str, np.ndarray]], qualities: list[float]) -> list[dict]:
    """Pooled (bpp, psnr) per quality of ``weights`` over ``images``."""
    import wsicodec

    rows = []
    for q in qualities:
        nbytes = pixels = 0
        sse = 0.0
        for _, rgb in images:
            data = wsicodec.encode(rgb, q, model=weights)
            rec = wsicodec.decode(data, model=weights)
            nbytes += len(data)
            pixels += rgb.shape[0] * rgb.shape[1]
            sse += float(((rgb.astype(np.float64) - rec) ** 2).sum())
        mse = sse / (3 * pixels)
        rows.append({"quality": q, "bpp": 8 * nbytes / pixels,
                     "psnr": float(10 * np.log10(255.0 ** 2 / mse))})
    return rows


def jpegxl_curve(set_name: str, names: list[str]) -> list[dict] | None:
    """JPEG-XL's pooled curve on the same images from bench/results/nuclei.json, if there."""
    if not NUCLEI_JSON.exists():
        return None
    sets = json.loads(NUCLEI_JSON.read_text()).get("sets", {})
    points = sets.get(set_name, {}).get("codecs", {}).get("jpegxl", {}).get("points", [])
    rows = []
    for p in points:
        per = {r["image"]: r for r in p["per_image"]}
        if not all(n in per for n in names):
            return None
        nbits = sum(per[n]["bpp"] for n in names)
        mse = np.mean([255.0 ** 2 / 10 ** (per[n]["psnr"] / 10) for n in names])
        rows.append({"distance": p["distance"], "bpp": nbits / len(names),
                     "psnr": float(10 * np.log10(255.0 ** 2 / mse))})
    return rows or None


def bd(ref: list[dict], test: list[dict]) -> float:
    return metrics.bd_rate([r["bpp"] for r in ref], [r["psnr"] for r in ref],
                           [r["bpp"] for r in test], [r["psnr"] for r in test])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("candidate")
    ap.add_argument("--base", default=str(ROOT / "wsicodec" / "weights" / "wsicodec-hyperprior.pt"))
    ap.add_argument("--sets", nargs="+", default=["he_test", "he_test_2x", "he_test_4x", "cmu", "tcga"])
    ap.add_argument("--limit", type=int, default=None, help="images per set (default all)")
    ap.add_argument("--qualities", type=float, nargs="+", default=[1, 2, 4, 6, 8])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_flush_denormal(True)
    out = {"candidate": args.candidate, "base": args.base, "qualities": args.qualities, "sets": {}}
    for name in args.sets:
        t0 = time.perf_counter()
        images = list(get_dataset(name).images(args.limit))
        cand, base = curve(args.candidate, images, args.qualities), curve(args.base, images, args.qualities)
        res = {"images": [n for n, _ in images], "candidate": cand, "base": base,
               "bd_candidate_vs_base": bd(base, cand)}
        jxl = jpegxl_curve(name, res["images"])
        if jxl:
            res["jpegxl"] = jxl
            res["bd_candidate_vs_jpegxl"], res["bd_base_vs_jpegxl"] = bd(jxl, cand), bd(jxl, base)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        out["sets"][name] = res
        print(f"{name} ({len(images)} images, {res['seconds']} s): candidate vs base "
              f"{res['bd_candidate_vs_base']:+.2f} %"
              + (f"; vs JPEG-XL candidate {res['bd_candidate_vs_jpegxl']:+.2f} %, base "
                 f"{res['bd_base_vs_jpegxl']:+.2f} %" if jxl else ""), flush=True)
        for c, b in zip(cand, base):
            print(f"  q{c['quality']:g}: candidate {c['bpp']:.3f} bpp {c['psnr']:.2f} dB | "
                  f"base {b['bpp']:.3f} bpp {b['psnr']:.2f} dB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
