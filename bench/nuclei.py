"""Diagnostic fidelity: does compression change the nuclei a classical detector finds? (issue #29)

PSNR, MS-SSIM and LPIPS say how far the decoded pixels are from the original ones, not whether
what is *found* in the tissue changes. This script runs one documented, classical nuclei
detector on the original and on every decoded version and compares what it finds: detection F1
against the original's detections, and the change in area of the nuclei found in both.

The detector and the matching are described step by step in ``bench/nuclei_detect.py``: the
haematoxylin channel (colour deconvolution), smoothed, cut at the *original's* Otsu threshold
(reused unchanged on every decoded version), cleaned and split by a distance-transform watershed,
every length in µm; nuclei paired by centroid within 3 µm (Hungarian assignment). Reported per
image: ``f1``, ``area_change`` / ``area_bias`` of matched nuclei, ``mask_dice``, ``n_orig``,
``n_dec``, ``tp``.

Codecs and rates (``SWEEPS``): the learned codec through ``wsicodec.encode(rgb, q, tile_size=256)``
/ ``wsicodec.decode`` (qualities 1-8; bytes = the whole stream), the classical codecs through
``wsicodec.codecs.get_codec(...).encode`` on the whole image (bytes = the whole output). bpp =
8·bytes / pixels. PSNR and MS-SSIM from ``bench/metrics.py``. Only public wsicodec APIs are used.

Outputs (``bench/results/``): ``nuclei.json`` (per set, per codec, per rate: the per-image numbers
and their means; the equal-bpp comparison of the learned codec against JPEG XL; environment),
``nuclei.png`` (F1 and area change against bpp, one column per set) and ``nuclei_crop.png`` (the
detector's outlines on the original, the learned codec and JPEG XL at about the same bpp).

    PYTHONPATH=$PWD .venv/bin/python bench/nuclei.py                    # every set, every image
    PYTHONPATH=$PWD .venv/bin/python bench/nuclei.py --limit 4          # 4 he/test images per he set
    PYTHONPATH=$PWD .venv/bin/python bench/nuclei.py --report-only      # plot + summary from the JSON

What this does **not** measure: it is no pathologist study and no validated diagnostic
algorithm; a learned (deep) detector may react differently; the originals were already lossy.
See bench/README.md, "Diagnostic fidelity".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: import bench and wsicodec from this checkout
    sys.path.insert(0, str(REPO))

from bench.nuclei_compare import summarise  # noqa: E402
from bench.nuclei_detect import (HOLE_AREA_UM2, MATCH_RADIUS_UM, MIN_AREA_UM2,  # noqa: E402
                                 PEAK_MIN_DISTANCE_UM, SMOOTH_SIGMA_UM)
from bench.nuclei_figures import make_crop, plot  # noqa: E402
from bench.nuclei_run import SWEEPS, environment, run_set  # noqa: E402
from bench.report import json_safe, log  # noqa: E402

SCHEMA = "wsicodec-nuclei/1"


def report(result: dict) -> None:
    for name, row in result["summary"].items():
        f1 = row.get("f1")
        if not f1:
            log(f"{name}: no shared bpp range")
            continue
        pts = ", ".join(f"{p['bpp']:.3f}:{p['diff']:+.4f}" for p in f1["at_test_points"])
        log(f"{name}: shared {f1['bpp_range'][0]:.3f}-{f1['bpp_range'][1]:.3f} bpp; F1 learned − "
            f"JPEG XL mean {f1['mean_diff']:+.4f} (min {f1['min_diff']:+.4f}, max "
            f"{f1['max_diff']:+.4f}); at learned points {pts}; claim "
            f"{'HOLDS' if row['claim_f1_learned_ge_jpegxl'] else 'FAILS'} "
            f"(per image {row['claim_holds_per_image']}; per-image mean difference "
            f"{row['per_image_mean_diff']['mean']:+.4f}, sd {row['per_image_mean_diff']['sd'] or 0:.4f}, "
            f"positive {row['per_image_mean_diff']['positive']})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from bench.datasets import DATASETS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=",".join(DATASETS), help="comma-separated dataset names")
    ap.add_argument("--codecs", default=",".join(SWEEPS), help="comma-separated series keys")
    ap.add_argument("--limit", type=int, default=None,
                    help="at most this many images per set (the he/test sets take the first N)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                    help="torch threads for the learned codec")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--tag", default="nuclei", help="output file stem")
    ap.add_argument("--crop-set", default="he_test")
    ap.add_argument("--crop-image", default=None, help="image name (default: the set's first)")
    ap.add_argument("--crop-quality", type=float, default=3)
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the summary and plot from the JSON, code nothing")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import warnings

    import torch
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal")
    from bench.datasets import get_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png = out / f"{args.tag}.json", out / f"{args.tag}.png"
    if args.report_only:
        result = json.loads(json_path.read_text())
        result["summary"] = json_safe(summarise(result))
        json_path.write_text(json.dumps(json_safe(result), indent=1) + "\n")
        plot(result, png)
        report(result)
        return 0

    keys = [k.strip() for k in args.codecs.split(",") if k.strip()]
    for k in keys:
        if k not in SWEEPS:
            raise SystemExit(f"nuclei.py: unknown series {k!r}; known: {', '.join(SWEEPS)}")
    env = environment(args.threads)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "command": "bench/nuclei.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "note": ("every 'original' is the decoded pixels of a file its scanner had already "
                 "lossy-coded (JPEG / JPEG 2000); see bench/datasets.py"),
        "detector": {
            "steps": "rgb2hed haematoxylin -> Gaussian -> threshold -> fill holes, drop small "
                     "objects -> distance-transform watershed -> drop small pieces",
            "smooth_sigma_um": SMOOTH_SIGMA_UM, "min_area_um2": MIN_AREA_UM2,
            "hole_area_um2": HOLE_AREA_UM2, "peak_min_distance_um": PEAK_MIN_DISTANCE_UM,
            "threshold": "Otsu of the original's smoothed haematoxylin, reused unchanged on every "
                         "decoded version of that image",
        },
        "matching": {"method": "Hungarian (linear_sum_assignment) per connected group of "
                               "candidate pairs: most pairs within the radius, then least total "
                               "distance", "radius_um": MATCH_RADIUS_UM},
        "metrics": {
            "bpp": "8 * bytes / pixels, the whole output for the whole image (learned: the "
                   "wsicodec.encode stream, 256² tiles)",
            "f1": "2 TP / (n_orig + n_dec) per image; mean over images (f1_pooled: summed counts)",
            "area_change": "mean over matched nuclei of |A_dec - A_orig| / A_orig; mean over images",
            "area_bias": "the same, signed",
            "mask_dice": "Dice of the thresholded nuclear masks",
            "psnr": "bench.metrics.psnr, mean over images", "ms_ssim": "bench.metrics.ms_ssim",
        },
        "limit": args.limit,
        "limit_note": (f"at most {args.limit} images per set (the first {args.limit} of he/test, "
                       "sorted by name, for he_test, he_test_2x and he_test_4x)")
        if args.limit else "every image of every set",
        "environment": env,
        "sets": {},
    }
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        ds = get_dataset(name)
        if not ds.available():
            log(f"skipping {name}: data not found ({', '.join(map(str, ds.paths()))})")
            result["sets"][name] = {**ds.to_dict(), "status": "skipped: data not found"}
            continue
        log(f"{name}: {ds.description}")
        result["sets"][name] = run_set(ds, keys, args.limit)
        json_path.write_text(json.dumps(json_safe(result), indent=1) + "\n")  # partial results
    result["sets"] = {k: v for k, v in result["sets"].items() if "codecs" in v} | {
        k: v for k, v in result["sets"].items() if "codecs" not in v}
    if args.crop_set and "learned" in keys:
        try:
            result["crop"] = make_crop(get_dataset(args.crop_set), args.crop_image,
                                       args.crop_quality, out / f"{args.tag}_crop.png")
        except Exception as exc:
            log(f"crop figure failed: {type(exc).__name__}: {exc}")
    env["loadavg_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    env["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    result["summary"] = summarise(result)
    json_path.write_text(json.dumps(json_safe(result), indent=1) + "\n")
    plot(result, png)
    report(result)
    log(f"{env['minutes']:.1f} min; wrote {json_path}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
