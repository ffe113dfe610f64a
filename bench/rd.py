"""Rate-distortion benchmark: every codec swept over its quality range on each evaluation set.

::

    images (bench/datasets.py set, whole) ──► codec.encode ──► bytes ──► codec.decode ──► pixels
        │                                       (timed)        │ bpp       (timed)        │
        └──────────────── reference ───────────────────────────┴──── PSNR, MS-SSIM, LPIPS-alex
                                                                          │
        mean over images per quality point ──► BD-rate vs JPEG-XL and JPEG 4:4:4 (PSNR, MS-SSIM dB,
                                               LPIPS dB) over the range both curves share; top PSNR
                                                                          │
        bench/results/rd_<set>.json  (every number, per image, environment)
        bench/results/rd_<set>.md    (table)      rd_<set>.png (RD plots)      visual.png (crops)

Run from the repository root (he_test, the whole sweep: ~20-30 min on 2 CPU cores)::

    .venv/bin/python bench/rd.py                      # --set he_test: rd_he_test.*
    .venv/bin/python bench/rd.py --set he_test_2x,he_test_4x --set cmu --set tcga   # rd_<set>.* each
    .venv/bin/python bench/rd.py --update learned     # re-run only these, merge into the JSON
    .venv/bin/python bench/rd.py --codecs jpeg444,webp --max-images 2 --tag dev   # a quick look
    .venv/bin/python bench/rd.py --images FOLDER      # any folder of images instead of a set

Sets are those of ``bench/datasets.py`` (he_test, he_test_2x, he_test_4x, cmu, cmu_grid, tcga). JPEG-XL,
the anchor, is swept over distances 25 to 0.3 (its whole useful range); a codec whose curve ends
below JPEG-XL's top gets a BD-rate over the overlap only, and the report says which range that is
and the top PSNR each codec reaches.

Codecs come from the registry ``wsicodec.codecs.get_codec``; one that is not available here (e.g. the
learned codec before it has weights, or ``auto`` before it is registered) is skipped with the reason
printed and recorded.

The work is split by concern: ``bench/rd_sweeps.py`` (the series and codecs),
``bench/rd_coding.py`` (images, environment, the coding loop), ``bench/rd_derive.py`` (BD-rates
and the other derived numbers), ``bench/rd_markdown.py`` (the table), ``bench/rd_plots.py`` (the
RD plot and the visual comparison); this file is the command line and the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: import wsicodec and bench from the repo
    sys.path.insert(0, str(REPO))

from bench import metrics  # noqa: E402
from bench.metrics import center_crop  # noqa: E402
from bench.rd_coding import (ImageSource, environment, folder_source, run_sweeps,  # noqa: E402
                             set_source, summarise)
from bench.rd_derive import derive  # noqa: E402
from bench.rd_markdown import write_markdown  # noqa: E402
from bench.rd_plots import make_visual, plot_rd  # noqa: E402
from bench.rd_sweeps import SWEEPS, build_series  # noqa: E402
from bench.report import float_or_nan, fmt_value, json_safe, log  # noqa: E402
from wsicodec.checkpoint import sha256_file  # noqa: E402  (plain file hash; imports no torch)

SCHEMA = "wsicodec-rd/1"
DEFAULT_SET = "he_test"


def select(spec: str | None) -> list[str]:
    """Series keys from a comma list of series keys or codec names (``jpeg`` means both JPEGs)."""
    if not spec:
        return [k for k, s in SWEEPS.items() if s.default]
    keys = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        matched = [token] if token in SWEEPS else [k for k, s in SWEEPS.items() if s.codec == token and s.default]
        if not matched:
            raise SystemExit(f"rd.py: unknown codec {token!r}; choose from {', '.join(SWEEPS)} "
                             f"(or a codec name: {', '.join(sorted({s.codec for s in SWEEPS.values()}))})")
        keys += [k for k in matched if k not in keys]
    return keys


def parse_sets(specs: list[str] | None) -> list[str]:
    """Set names from repeated ``--set`` values, each a name or a comma list (default he_test)."""
    from bench.datasets import DATASETS

    names: list[str] = []
    for spec in specs or [DEFAULT_SET]:
        for name in (t.strip() for t in spec.split(",") if t.strip()):
            if name not in DATASETS:
                raise SystemExit(f"rd.py: unknown set {name!r}; bench/datasets.py has "
                                 f"{', '.join(DATASETS)}")
            if name not in names:
                names.append(name)
    if not names:
        raise SystemExit("rd.py: --set names no set")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--set", action="append", dest="sets", metavar="NAME",
                     help="evaluation set(s) of bench/datasets.py (he_test, he_test_2x, he_test_4x, cmu, cmu_grid, "
                          f"tcga): repeat it or give a comma list; each writes rd_<set>.* "
                          f"(default {DEFAULT_SET})")
    src.add_argument("--images", default=None, metavar="FOLDER",
                     help="a folder of images instead, relative to the repo root or cwd "
                          "(results rd_<last two folder names>.*)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="results folder")
    p.add_argument("--tag", default=None,
                   help="results name rd_<tag>.* (default the set's name, or from the folder); with "
                        "several sets rd_<tag>_<set>.*")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--codecs", default=None,
                     help="comma list of series to run (default all but learned_refine: "
                          f"{','.join(select(None))})")
    sel.add_argument("--update", default=None, metavar="CODECS",
                     help="re-run only these series and merge them into the existing rd_<tag>.json")
    p.add_argument("--max-images", type=int, default=None, help="only the first N images (quick look)")
    p.add_argument("--crop", type=int, default=None, metavar="PX",
                   help="code the central PX² of each image instead of all of it (slow series)")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                   help="torch intra-op threads for metrics and the learned codec (default min(4, cores))")
    p.add_argument("--weights", default=None,
                   help="AlexNet trunk for LPIPS: file or directory (default $WSICODEC_WEIGHTS, then "
                        "../shared/weights)")
    p.add_argument("--no-visual", action="store_true",
                   help="skip the visual comparison (visual.png for he_test, visual_<tag>.png otherwise)")
    p.add_argument("--report-only", action="store_true",
                   help="no coding: recompute the BD-rates in the existing rd_<tag>.json, rebuild the table and plot")
    p.add_argument("--visual-bpp", type=float, default=0.5, help="target bpp of the visual crops")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Run:
    """One results file to make: a folder (``set_name`` None) or a set, and its tag."""

    tag: str
    set_name: str | None = None
    folder: str | None = None

    def source(self, max_images: int | None) -> ImageSource:
        if self.set_name:
            return set_source(self.set_name, max_images)
        return folder_source(self.folder, max_images)


def plan_runs(args: argparse.Namespace) -> list[Run]:
    if args.images:
        return [Run(args.tag or "_".join(Path(args.images).parts[-2:]).replace("-", "_"),
                    folder=args.images)]
    names = parse_sets(args.sets)
    if args.tag:
        return [Run(args.tag if len(names) == 1 else f"{args.tag}_{n}", n) for n in names]
    return [Run(n, n) for n in names]


def run_command(argv: list[str], run: Run, n_runs: int) -> str:
    """The command that regenerates ``run`` alone: with several sets, this set and tag only."""
    if n_runs == 1:
        return "bench/rd.py" + ("" if not argv else " " + " ".join(argv))
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        if tok in ("--set", "--tag"):
            skip = True
            continue
        if tok.startswith(("--set=", "--tag=")):
            continue
        out.append(tok)
    out += ["--set", run.set_name] + (["--tag", run.tag] if run.tag != run.set_name else [])
    return "bench/rd.py " + " ".join(out)


def visual_name(tag: str) -> str:
    """visual.png for he_test (the README's figure), visual_<tag>.png for any other run, so a
    quick look or another set never overwrites it."""
    return "visual.png" if tag == DEFAULT_SET else f"visual_{tag}.png"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import warnings

    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    # numpy notices flushed subnormals when it first builds finfo; harmless here
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal")
    runs = plan_runs(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    given = list(sys.argv[1:] if argv is None else argv)

    if args.report_only:
        for run in runs:
            json_path = out_dir / f"rd_{run.tag}.json"
            if not json_path.is_file():
                raise SystemExit(f"rd.py: --report-only needs an existing {json_path}")
            result = json.loads(json_path.read_text())
            derive(result)      # derived: kept in step with the report
            json_path.write_text(json.dumps(json_safe(result), indent=1) + "\n")
            png = out_dir / f"rd_{run.tag}.png"
            plot_rd(result, png)
            write_markdown(result, out_dir / f"rd_{run.tag}.md", png.name)
            log(f"rebuilt the BD-rates in {json_path}, {png} and {out_dir / f'rd_{run.tag}.md'} from it")
        return 0

    keys = select(args.update or args.codecs)
    lp = None
    for run in runs:
        source = run.source(args.max_images)
        json_path = out_dir / f"rd_{run.tag}.json"
        previous = None
        if args.update:
            if not json_path.is_file():
                raise SystemExit(f"rd.py: --update needs an existing {json_path}; run without it first")
            previous = json.loads(json_path.read_text())
            check_same_images(previous, source, run, args.crop, json_path)
        if lp is None:
            lp = metrics.load_lpips(args.weights)
            log(f"LPIPS-alex trunk: {lp.trunk_path}")
        run_one(args, run, source, keys, lp, previous, out_dir,
                run_command(given, run, len(runs)))
    return 0


def check_same_images(previous: dict, source: ImageSource, run: Run, crop: int | None,
                      json_path: Path) -> None:
    """``--update`` merges only into results made on the same images, set and crop."""
    before = (previous.get("set") or {}).get("name")
    if run.set_name and before and before != run.set_name:
        raise SystemExit(f"rd.py: {json_path} was made on set {before}, not {run.set_name}; "
                         "rerun without --update")
    if [im["name"] for im in previous["images"]] != [it.name for it in source.items]:
        raise SystemExit(f"rd.py: {json_path} was made on other images; rerun without --update")
    if previous.get("crop") != crop:
        raise SystemExit(f"rd.py: {json_path} was made with --crop {previous.get('crop')}; "
                         "rerun without --update or with that crop")
    for im, item in zip(previous["images"], source.items):
        h, w = center_crop(item.load(), crop).shape[:2]
        if (im.get("width"), im.get("height")) not in ((w, h), (None, None)):
            raise SystemExit(f"rd.py: {json_path} has {im['name']} at {im.get('width')}x"
                             f"{im.get('height')}, this run at {w}x{h}: other images; rerun without --update")


def run_one(args: argparse.Namespace, run: Run, source: ImageSource, keys: list[str],
            lp: metrics.Lpips, previous: dict | None, out_dir: Path, command: str) -> None:
    """Sweep one set (or folder), write rd_<tag>.json / .md / .png (and the visual)."""
    env = environment(args.threads)
    log(f"rd.py: {len(source.items)} images from {source.label}, series {', '.join(keys)}, "
        f"{args.threads} torch threads, {env['cpu']}")
    series, skipped = [], {}
    for key in keys:
        try:
            series.append(build_series(SWEEPS[key], args.threads))
        except Exception as exc:  # unavailable codec, missing registry, missing weights ...
            reason = f"{type(exc).__name__}: {exc}"
            log(f"skipping {key}: {reason}")
            skipped[key] = {"status": "skipped", "codec": SWEEPS[key].codec, "label": SWEEPS[key].label,
                            "reason": reason}
    t0 = time.perf_counter()
    images = run_sweeps(series, source.items, lp, args.crop) if series else [
        {"name": it.name} for it in source.items]
    minutes = (time.perf_counter() - t0) / 60
    env["loadavg_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    env["sweep_minutes"] = round(minutes, 2)

    if previous:
        result = previous
        result["environment"] = env
        result.setdefault("updates", []).append({"date": env["date"], "series": keys,
                                                 "command": ".venv/bin/python " + command})
        for key, entry in skipped.items():
            if result["codecs"].get(key, {}).get("status") in ("ok", "partial"):
                log(f"keeping the earlier {key} results ({entry['reason']})")
            else:
                result["codecs"][key] = entry
    else:
        result = {
            "schema": SCHEMA,
            "command": ".venv/bin/python " + command,
            "images_dir": source.label,
            **({"set": source.dataset} if source.dataset else {}),
            "crop": args.crop,
            "images_note": "decoded pixels of source files that were lossy-coded once by the scanner "
                           "(JPEG / JPEG 2000); see ../shared/data/README.md",
            "images": images,
            "metrics": {
                "bpp": "8 * len(bytes) / (height * width), the codec's whole output for the whole image",
                "psnr": "10 log10(255^2 / MSE) over all RGB samples, per image; mean of per-image values",
                "ms_ssim": "pytorch_msssim, 5 scales, 11-px Gaussian window, data range 255, mean over "
                           "R,G,B, float32; fewer scales with renormalised weights for images < 161 px "
                           "(ms_ssim_scales per image); mean of per-image values",
                "ms_ssim_db": "-10 log10(1 - mean MS-SSIM)",
                "lpips": {"net": "alex", "version": "0.1", "trunk": lp.trunk_path.name,
                          "trunk_sha256": sha256_file(lp.trunk_path),
                          "note": "lpips 0.1.4 linear heads; mean of per-image values"},
                "encode_mp_s": "total pixels / total encode seconds over images (best of up to 3 runs "
                               "each for sub-0.3 s codecs)",
                "decode_mp_s": "same for decode",
                "image_sha256": "images[].sha256: the source file's; images[].pixels_sha256 (sets): the "
                                "pixels coded (for he_test_2x / 4x an area average of the file)",
                "top_psnr": "the highest mean PSNR on the codec's curve (psnr_ranges: where and at "
                            "what bpp)",
            },
            "codecs": {},
            "environment": env,
        }
        result["codecs"].update(skipped)
    for s in series:
        result["codecs"][s.sweep.key] = summarise(s, len(source.items), env)
    result["codecs"] = {k: result["codecs"][k] for k in SWEEPS if k in result["codecs"]}
    derive(result)

    png = out_dir / f"rd_{run.tag}.png"
    plot_rd(result, png)
    visual = out_dir / visual_name(run.tag)
    if not args.no_visual:
        try:
            result["visual"] = make_visual(result, source.load, visual, target_bpp=args.visual_bpp)
        except Exception as exc:
            log(f"visual comparison failed: {type(exc).__name__}: {exc}")
    json_path = out_dir / f"rd_{run.tag}.json"
    json_path.write_text(json.dumps(json_safe(result), indent=1) + "\n")
    write_markdown(result, out_dir / f"rd_{run.tag}.md", png.name)
    log(f"sweep {minutes:.1f} min; wrote {json_path}, {png}, {out_dir / f'rd_{run.tag}.md'}"
        + ("" if args.no_visual else f", {visual}"))
    for anchor, rows in result["bd_rate"].get("anchors", {}).items():
        log(f"BD-rate vs {anchor} (PSNR / MS-SSIM dB): " + ", ".join(
            f"{k} {fmt_value(float_or_nan(r.get('psnr')), '+.1f')}% / {fmt_value(float_or_nan(r.get('ms_ssim_db')), '+.1f')}%"
            for k, r in rows.items()))
    log("top PSNR: " + ", ".join(f"{k} {fmt_value(v, '.2f')} dB" for k, v in result["top_psnr"].items()))


if __name__ == "__main__":
    sys.exit(main())
