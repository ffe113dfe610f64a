"""Rate-distortion benchmark: every codec swept over its quality range on a folder of images.

::

    images (PNG, whole) ──► codec.encode ──► bytes ──► codec.decode ──► pixels
        │                      (timed)        │ bpp       (timed)        │
        └──────────────── reference ──────────┴──── PSNR, MS-SSIM, LPIPS-alex
                                                         │
        mean over images per quality point ──► BD-rate vs JPEG-XL and JPEG 4:4:4 (PSNR, MS-SSIM dB)
                                                         │
        bench/results/rd_<tag>.json  (every number, per image, environment)
        bench/results/rd_<tag>.md    (table)      rd_<tag>.png (RD plots)      visual.png (crops)

Run from the repository root (the whole sweep, ~20-30 min on 2 CPU cores)::

    .venv/bin/python bench/rd.py
    .venv/bin/python bench/rd.py --update learned     # re-run only these, merge into the JSON
    .venv/bin/python bench/rd.py --codecs jpeg444,webp --max-images 2 --tag dev   # a quick look

Codecs come from the registry ``wsicodec.codecs.get_codec``; one that is not available here (e.g. the
learned codec before it has weights) is skipped with the reason printed and recorded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: import wsicodec and bench from the repo
    sys.path.insert(0, str(REPO))

from bench import metrics  # noqa: E402
from bench.report import (cpu_model, git_state, imagecodecs_versions, json_safe, log,  # noqa: E402
                          package_versions)
from bench.metrics import center_crop  # noqa: E402
from wsicodec.checkpoint import sha256_file  # noqa: E402  (plain file hash; imports no torch)

SCHEMA = "wsicodec-rd/1"
DEFAULT_IMAGES = "../shared/data/he/test"
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
ANCHORS = ("jpegxl", "jpeg444")


@dataclass(frozen=True)
class Sweep:
    """One curve: a registry codec with fixed options, swept over ``qualities``."""

    key: str
    codec: str
    label: str
    qualities: tuple[float, ...]
    options: dict = field(default_factory=dict)
    #: direction of the knob: +1 when a larger quality value means more bits, -1 otherwise
    direction: int = 1
    knob: str = "quality"
    #: the knob's full range in the registry (the visual comparison searches all of it)
    knob_range: tuple[float, float] = (0, 100)
    #: part of a run that names no codecs (and of a codec name such as ``learned``)
    default: bool = True
    #: a series this one is also read against (BD-rates with it as anchor, when both were run)
    against: str | None = None


SWEEPS: dict[str, Sweep] = {s.key: s for s in (
    Sweep("jpeg420", "jpeg", "JPEG 4:2:0 (libjpeg-turbo)", (5, 10, 20, 35, 55, 75, 90),
          {"subsampling": "420"}, knob_range=(1, 100)),
    Sweep("jpeg444", "jpeg", "JPEG 4:4:4 (libjpeg-turbo)", (5, 10, 20, 35, 55, 75, 90),
          {"subsampling": "444"}, knob_range=(1, 100)),
    Sweep("jpegxl", "jpegxl", "JPEG XL (libjxl, effort 7)", (25.0, 15.0, 10.0, 6.0, 4.0, 2.5, 1.6, 1.0, 0.6),
          {"effort": 7}, direction=-1, knob="distance", knob_range=(0.1, 25)),
    Sweep("webp", "webp", "WebP lossy (libwebp, method 4)", (0, 15, 35, 55, 75, 88, 96)),
    Sweep("jpeg2000", "jpeg2000", "JPEG 2000 (OpenJPEG, 9/7)", (27, 30, 33, 36, 39, 42, 46),
          knob="target PSNR dB", knob_range=(10, 80)),
    Sweep("avif", "avif", "AVIF 4:4:4 (libavif/aom, speed 6)", (15, 30, 45, 58, 70, 80, 90)),
    Sweep("learned", "learned", "wsicodec learned", (1, 2, 3, 4, 5, 6, 7, 8), knob_range=(1, 8)),
    # the encoder's latent search (LearnedCodec(refine=...)): ~100x the encode time, so only on request
    Sweep("learned_refine", "learned", "wsicodec learned, refine 40", (1, 3, 5, 8), {"refine": 40},
          knob_range=(1, 8), default=False, against="learned"),
)}

#: which panels the visual comparison shows, in order (after the original)
VISUAL_SERIES = ("jpeg420", "jpegxl", "webp", "learned")
PLOT_STYLE = {
    "jpeg420": ("tab:orange", "v"), "jpeg444": ("tab:red", "^"), "jpegxl": ("tab:blue", "s"),
    "webp": ("tab:green", "D"), "jpeg2000": ("tab:purple", "P"), "avif": ("tab:brown", "X"),
    "learned": ("black", "o"), "learned_refine": ("tab:gray", "*"),
}


# ------------------------------------------------------------------------------------ small helpers


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def _timed(fn: Callable[[], Any], min_total: float = 0.3, max_runs: int = 3) -> tuple[Any, float]:
    """Run ``fn`` once; repeat (up to ``max_runs``) while the total stays under ``min_total`` s.
    Returns the last result and the fastest run's seconds."""
    best, total, runs, out = math.inf, 0.0, 0, None
    while runs < max_runs and (runs == 0 or total < min_total):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best, total, runs = min(best, dt), total + dt, runs + 1
    return out, best


def resolve_images(folder: str) -> Path:
    p = Path(folder)
    if not p.is_absolute() and not p.exists():
        p = REPO / folder
    if not p.is_dir():
        raise SystemExit(f"rd.py: image folder {folder!r} not found (looked at {p})")
    return p


def load_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _find_sha256(obj: Any) -> str | None:
    """The model id in a codec's to_dict(): a value under a key mentioning sha256 or ``model_id``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if ("sha256" in str(k).lower() or str(k) == "model_id") and isinstance(v, str):
                return v
        for v in obj.values():
            found = _find_sha256(v)
            if found:
                return found
    return None


# ------------------------------------------------------------------------------------- environment

def environment(threads: int) -> dict:
    import torch

    versions = package_versions(("numpy", "torch", "imagecodecs", "lpips", "pytorch-msssim",
                                 "scipy", "matplotlib", "pillow", "compressai"))
    libs = imagecodecs_versions(("jpeg8", "jpegxl", "webp", "jpeg2k", "avif"))
    commit, dirty = git_state(REPO, ("wsicodec", "bench"))
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "torch_threads": threads,
        "loadavg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "libraries": libs,
        "git_commit": commit,
        "codecs_py_sha256": (sha256_file(REPO / "wsicodec" / "codecs.py")
                             if (REPO / "wsicodec" / "codecs.py").is_file() else None),
        "classical_py_sha256": (sha256_file(REPO / "wsicodec" / "classical.py")
                                if (REPO / "wsicodec" / "classical.py").is_file() else None),
        "git_dirty_wsicodec_or_bench": dirty,
        "torch_flush_denormal": True,
        "torch_device": "cpu",
        "torch_cuda_available": bool(torch.cuda.is_available()),
    }


# ---------------------------------------------------------------------------------------- the sweep

@dataclass
class SeriesRun:
    sweep: Sweep
    codecs: list  # one built codec per quality
    threads: int
    config: list[dict]
    per_point: list[list[dict]] = field(default_factory=list)  # [quality][image]


class TiledLearned:
    """The learned codec as the product uses it: ``wsicodec.encode``/``decode``, i.e.
    independent 256² tiles, each coded with its 8 px context margin, plus the stream's
    tile table — every byte counted."""

    def __init__(self, codec) -> None:  # noqa: ANN001 - a LearnedCodec
        self.codec = codec

    def encode(self, image: np.ndarray) -> bytes:
        from wsicodec.image import encode
        return encode(image, quality=self.codec.quality, model=str(self.codec.loaded.path),
                      refine=self.codec.refine)

    def decode(self, data: bytes) -> np.ndarray:
        from wsicodec.image import decode
        return decode(data, model=str(self.codec.loaded.path))

    def to_dict(self) -> dict:
        return self.codec.to_dict()


def build_series(sweep: Sweep, threads: int) -> SeriesRun:
    """Build one codec per quality; raises with the reason when the codec is unavailable."""
    from wsicodec.codecs import get_codec

    codecs = [get_codec(sweep.codec, quality=q, **sweep.options) for q in sweep.qualities]
    config = [c.to_dict() for c in codecs]
    if sweep.codec == "learned":
        codecs = [TiledLearned(c) for c in codecs]
    if sweep.codec == "learned":
        used = threads  # the learned codec runs its network on torch's intra-op threads
    else:
        cfg = config[0].get("configuration", {})
        used = int(cfg.get("numthreads", cfg.get("threads", 1)))  # the registry pins numthreads=1
    return SeriesRun(sweep, codecs, used, config, [[] for _ in sweep.qualities])


def code_one(codec, image: np.ndarray) -> tuple[bytes, np.ndarray, float, float]:
    data, enc_s = _timed(lambda: codec.encode(image))
    decoded, dec_s = _timed(lambda: codec.decode(data))
    decoded = np.asarray(decoded)
    if decoded.shape != image.shape or decoded.dtype != np.uint8:
        raise RuntimeError(f"decoded {decoded.shape} {decoded.dtype}, expected {image.shape} uint8")
    return data, decoded, enc_s, dec_s


def run_sweeps(series: list[SeriesRun], files: list[Path], lp: metrics.Lpips,
               crop: int | None = None) -> list[dict]:
    """Code every image with every (series, quality); fill ``per_point``; return image records."""
    images = []
    t_start = time.perf_counter()
    for i, path in enumerate(files):
        img = center_crop(load_image(path), crop)
        h, w = img.shape[:2]
        plan = metrics.ms_ssim_plan(h, w)
        if not plan.standard:
            log(f"  note: {path.name} is {w}x{h}: {plan.describe()}")
        images.append({"name": path.name, "width": w, "height": h, "sha256": sha256_file(path),
                       "ms_ssim_scales": plan.scales, "ms_ssim_win_size": plan.win_size})
        ref_feats = lp.reference(img)
        ref_ms = metrics.MsSsimReference(img)
        for s in series:
            for qi, codec in enumerate(s.codecs):
                rec: dict[str, Any] = {"image": path.name}
                try:
                    data, decoded, enc_s, dec_s = code_one(codec, img)
                except Exception as exc:  # one failing point must not lose the whole run
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                    log(f"  {s.sweep.key} q={s.sweep.qualities[qi]} on {path.name}: {rec['error']}")
                    s.per_point[qi].append(rec)
                    continue
                ms = ref_ms.against(decoded)
                rec.update({
                    "bytes": len(data),
                    "bpp": 8.0 * len(data) / (h * w),
                    "psnr": metrics.psnr(img, decoded),
                    "ms_ssim": ms,
                    "lpips": lp.against(ref_feats, img, decoded),
                    "encode_s": enc_s,
                    "decode_s": dec_s,
                })
                s.per_point[qi].append(rec)
        elapsed = time.perf_counter() - t_start
        log(f"[{i + 1}/{len(files)}] {path.name} done, {elapsed / 60:.1f} min elapsed, "
            f"~{elapsed / (i + 1) * (len(files) - i - 1) / 60:.1f} min left")
    return images


def summarise(s: SeriesRun, n_images: int, env: dict) -> dict:
    points = []
    for qi, recs in enumerate(s.per_point):
        ok = [r for r in recs if "error" not in r]
        point: dict[str, Any] = {"quality": s.sweep.qualities[qi], "codec": s.config[qi],
                                 "per_image": recs}
        if len(ok) == n_images and ok:
            pixels = sum(r["bytes"] * 8 / r["bpp"] for r in ok)
            mean_ms = float(np.mean([r["ms_ssim"] for r in ok]))
            point["mean"] = {
                "bpp": float(np.mean([r["bpp"] for r in ok])),
                "psnr": float(np.mean([r["psnr"] for r in ok])),
                "ms_ssim": mean_ms,
                "ms_ssim_db": metrics.msssim_db(mean_ms),
                "lpips": float(np.mean([r["lpips"] for r in ok])),
                "encode_mp_s": pixels / 1e6 / sum(r["encode_s"] for r in ok),
                "decode_mp_s": pixels / 1e6 / sum(r["decode_s"] for r in ok),
            }
        else:
            point["mean"] = None
            point["errors"] = sorted({r["error"] for r in recs if "error" in r})
        points.append(point)
    entry = {
        "status": "ok" if all(p["mean"] for p in points) else "partial",
        "codec": s.sweep.codec, "options": s.sweep.options, "label": s.sweep.label,
        "knob": s.sweep.knob, "threads": s.threads, "environment": env, "points": points,
    }
    sha = _find_sha256(s.config[0])
    if sha:
        entry["model_sha256"] = sha
    if s.sweep.codec == "learned":  # the packaged weight files, hashed here independently of the codec
        entry["weight_files"] = {p.name: sha256_file(p)
                                 for p in sorted((REPO / "wsicodec" / "weights").glob("*.pt"))}
    return entry


# ------------------------------------------------------------------------------------------ BD-rate

def _curve(entry: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(bpp, quality) of the mean points; ``lpips_db`` is derived from the stored LPIPS."""
    pts = [p["mean"] for p in entry.get("points", []) if p.get("mean")]
    if key == "lpips_db":
        return np.array([p["bpp"] for p in pts]), metrics.lpips_db(np.array([p["lpips"] for p in pts]))
    return np.array([p["bpp"] for p in pts]), np.array([p[key] for p in pts])


def _image_curve(entry: dict, image: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bpp, ps, ms = [], [], []
    for p in entry.get("points", []):
        for r in p["per_image"]:
            if r["image"] == image and "error" not in r:
                bpp.append(r["bpp"]), ps.append(r["psnr"]), ms.append(r["ms_ssim"])
    return np.array(bpp), np.array(ps), metrics.msssim_db(np.array(ms))


def bd_rates(result: dict) -> dict:
    """BD-rate (pchip) of every ok series against each anchor, on mean curves and per image."""
    codecs = {k: v for k, v in result["codecs"].items() if v.get("status") in ("ok", "partial")}
    out: dict[str, Any] = {"method": "pchip in log-rate (scipy PchipInterpolator), mean curves",
                           "anchors": {}}
    names = [im["name"] for im in result["images"]]
    extra = (SWEEPS[k].against for k in codecs if k in SWEEPS)
    anchors = ANCHORS + tuple(dict.fromkeys(a for a in extra if a in codecs and a not in ANCHORS))
    for anchor in anchors:
        if anchor not in codecs:
            continue
        rows = {}
        for key, entry in codecs.items():
            if key == anchor:
                continue
            row: dict[str, Any] = {}
            for metric in ("psnr", "ms_ssim_db", "lpips_db"):
                ra, qa = _curve(codecs[anchor], metric)
                rt, qt = _curve(entry, metric)
                row[metric] = metrics.bd_rate(ra, qa, rt, qt)
                if len(qa) and len(qt):
                    row[f"{metric}_overlap"] = metrics.bd_overlap(qa, qt)
            per_image = []
            for name in names:
                ra, pa, ma = _image_curve(codecs[anchor], name)
                rt, pt, mt = _image_curve(entry, name)
                per_image.append({"image": name, "psnr": metrics.bd_rate(ra, pa, rt, pt),
                                  "ms_ssim_db": metrics.bd_rate(ra, ma, rt, mt)})
            row["per_image"] = per_image
            for metric in ("psnr", "ms_ssim_db"):
                vals = np.array([_nan(r[metric]) for r in per_image])
                vals = vals[np.isfinite(vals)]
                if len(vals):
                    row[f"{metric}_per_image_median"] = float(np.median(vals))
                    row[f"{metric}_per_image_min"] = float(vals.min())
                    row[f"{metric}_per_image_max"] = float(vals.max())
            rows[key] = row
        out["anchors"][anchor] = rows
    return out


# -------------------------------------------------------------------------------------------- plots

def plot_rd(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    panels = (("psnr", "PSNR RGB (dB) ↑"), ("ms_ssim_db", "MS-SSIM (dB) = -10 log10(1-MS-SSIM) ↑"),
              ("lpips", "LPIPS-alex ↓"))
    xmax = 0.0
    for key, entry in result["codecs"].items():
        if entry.get("status") not in ("ok", "partial"):
            continue
        color, marker = PLOT_STYLE.get(key, (None, "o"))
        for ax, (m, _) in zip(axes, panels):
            x, y = _curve(entry, m)
            order = np.argsort(x)
            ax.plot(x[order], y[order], marker=marker, color=color, label=entry["label"],
                    linewidth=2.2 if key == "learned" else 1.4, markersize=5)
            xmax = max(xmax, float(x.max()) if len(x) else 0.0)
    for ax, (_, ylabel) in zip(axes, panels):
        ax.set_xlabel("bits per pixel (actual bytes)")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, min(xmax * 1.02, 3.0) if xmax else 3.0)
        ax.grid(True, alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8, loc="lower right")
    n = len(result["images"])
    crop = f", central {result['crop']}² of each" if result.get("crop") else ""
    fig.suptitle(f"Rate-distortion on {result['images_dir']} ({n} images{crop}, mean over images)\n"
                 f"classical codecs code each image whole; the learned codec codes 256² tiles with context, as in a container", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- visual

def _pick_crop(img: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left of the ``size`` crop with the most texture (std of luminance), on a size/2 grid."""
    gray = img.astype(np.float32).mean(axis=2)
    best, where = -1.0, (0, 0)
    step = max(size // 2, 1)
    for y in range(0, max(img.shape[0] - size, 0) + 1, step):
        for x in range(0, max(img.shape[1] - size, 0) + 1, step):
            v = float(gray[y:y + size, x:x + size].std())
            if v > best:
                best, where = v, (y, x)
    return where


def _match_bpp(sweep: Sweep, crop: np.ndarray, target: float, iters: int = 14) -> dict:
    """Bisect the codec's knob so the crop, coded alone, lands closest to ``target`` bpp."""
    from wsicodec.codecs import get_codec

    lo, hi = sweep.knob_range
    integer = sweep.codec in ("jpeg", "avif")
    best = None

    def trial(q: float) -> dict:
        q = int(round(q)) if integer else round(float(q), 2)
        codec = get_codec(sweep.codec, quality=q, **sweep.options)
        data = codec.encode(crop)
        dec = np.asarray(codec.decode(data))
        return {"quality": q,
                "bpp": 8.0 * len(data) / (crop.shape[0] * crop.shape[1]),
                "psnr": metrics.psnr(crop, dec), "decoded": dec}

    a, b = lo, hi  # bits grow from the "low-bits" end to the "high-bits" end
    if sweep.direction < 0:
        a, b = hi, lo
    for _ in range(iters):
        mid = (a + b) / 2
        t = trial(mid)
        if best is None or abs(t["bpp"] - target) < abs(best["bpp"] - target):
            best = t
        if t["bpp"] > target:
            b = mid
        else:
            a = mid
        if integer and abs(a - b) < 0.5:
            break
    for q in (a, b):  # the bracket ends too (integer knobs stop early)
        t = trial(q)
        if abs(t["bpp"] - target) < abs(best["bpp"] - target):
            best = t
    return best


def make_visual(result: dict, images_dir: Path, out: Path, target_bpp: float = 0.5,
                size: int = 256, image_name: str | None = None) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [im["name"] for im in result["images"]]
    name = image_name or names[0]
    img = load_image(images_dir / name)
    y, x = _pick_crop(img, size)
    crop = np.ascontiguousarray(img[y:y + size, x:x + size])
    panels = [{"key": "original", "label": "original", "image": crop}]
    for key in VISUAL_SERIES:
        entry = result["codecs"].get(key)
        if not entry or entry.get("status") not in ("ok", "partial"):
            continue
        try:
            t = _match_bpp(SWEEPS[key], crop, target_bpp)
        except Exception as exc:
            log(f"  visual: {key} skipped: {type(exc).__name__}: {exc}")
            continue
        panels.append({"key": key, "label": entry["label"], "image": t.pop("decoded"), **t})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.9))
    for ax, p in zip(np.atleast_1d(axes), panels):
        ax.imshow(p["image"], interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        title = p["label"] if p["key"] == "original" else (
            f"{p['label']}\n{p['bpp']:.3f} bpp, PSNR {p['psnr']:.2f} dB")
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"{name}, crop {size}x{size} at (x={x}, y={y}), each codec's knob set for "
                 f"~{target_bpp} bpp on this crop coded alone", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return {"file": out.name, "image": name, "crop": {"x": x, "y": y, "size": size},
            "target_bpp": target_bpp,
            "panels": [{k: v for k, v in p.items() if k != "image"} for p in panels]}


# ----------------------------------------------------------------------------------------- markdown

def _f(v: Any, fmt: str) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def write_markdown(result: dict, path: Path, png: str) -> None:
    env = result["environment"]
    lines = [
        f"# Rate-distortion: {result['images_dir']}",
        "",
        f"{len(result['images'])} images, each coded "
        + (f"as its central {result['crop']}² crop" if result.get("crop") else "whole")
        + " by every codec; bpp from the actual bytes; "
        "PSNR over RGB, MS-SSIM (5 scales, mean over R,G,B), LPIPS-alex v0.1 (ImageNet trunk from "
        "`../shared/weights`); mean over images at each setting. \"Original\" means the decoded pixels of "
        "files that the scanner had already lossy-coded once (JPEG or JPEG 2000), which favours re-coding "
        "with the same family; see bench/README.md for what that means for the JPEG 2000 row on `he/test`.",
        "",
        f"Regenerate: `{result['command']}` (from the repository root). Plot: `{png}`. "
        f"Every number per image: `{path.with_suffix('.json').name}`.",
        "",
        f"Machine: {env['cpu']}, {env['cpus_usable']} usable cores, load {_f(env['loadavg_1min_at_start'], '.1f')} "
        f"(1-minute average) at start, torch {env['packages'].get('torch')}, imagecodecs "
        f"{env['packages'].get('imagecodecs')}; date {env['date']}. Throughput is single-image wall time "
        "(best of up to 3 runs for fast codecs) with the thread count listed.",
        "",
    ]
    skipped = {k: v for k, v in result["codecs"].items() if v.get("status") not in ("ok", "partial")}
    if skipped:
        lines += ["Not measured here: " + "; ".join(f"`{k}` ({v.get('reason')})"
                                                   for k, v in skipped.items()), ""]
    bd = result.get("bd_rate", {}).get("anchors", {})
    if bd:
        lines += ["## BD-rate (negative = fewer bits for the same quality)", "",
                  "Bjøntegaard delta rate, pchip fit of log-rate over the shared quality range of the "
                  "mean curves; LPIPS as -10 log10(LPIPS). Per-image: median [min, max] over images "
                  "of the per-image BD-rate (PSNR). "
                  "\"–\": the two curves share no quality range, so no BD-rate exists (compare the "
                  "points below).", ""]
        header = "| codec |"
        sep = "| --- |"
        for anchor in bd:
            header += f" vs {anchor}: PSNR | vs {anchor}: MS-SSIM dB | vs {anchor}: LPIPS |"
            sep += " ---: | ---: | ---: |"
        header += " vs jpegxl PSNR, per image |" if "jpegxl" in bd else ""
        sep += " --- |" if "jpegxl" in bd else ""
        lines += [header, sep]
        keys = [k for k in result["codecs"] if result["codecs"][k].get("status") in ("ok", "partial")]
        for key in keys:
            row = f"| {result['codecs'][key]['label']} |"
            for anchor, rows in bd.items():
                r = rows.get(key)
                if r is None:
                    row += " (anchor) | (anchor) | (anchor) |"
                else:
                    row += "".join(f" {_f(r.get(m), '+.1f')} % |" for m in ("psnr", "ms_ssim_db", "lpips_db"))
            if "jpegxl" in bd:
                r = bd["jpegxl"].get(key)
                row += (" (anchor) |" if r is None else
                        f" {_f(r.get('psnr_per_image_median'), '+.1f')} % "
                        f"[{_f(r.get('psnr_per_image_min'), '+.1f')}, "
                        f"{_f(r.get('psnr_per_image_max'), '+.1f')}] |")
            lines.append(row)
        lines.append("")
    lines += ["## Measured points (mean over images)", "",
              "| codec | setting | bpp | PSNR dB | MS-SSIM | MS-SSIM dB | LPIPS | enc MP/s | dec MP/s | threads |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, entry in result["codecs"].items():
        if entry.get("status") not in ("ok", "partial"):
            continue
        pts = sorted((p for p in entry["points"] if p.get("mean")), key=lambda p: p["mean"]["bpp"])
        for p in pts:
            m = p["mean"]
            lines.append(
                f"| {entry['label']} | {entry['knob']} {p['quality']:g} | {m['bpp']:.3f} | {m['psnr']:.2f} | "
                f"{m['ms_ssim']:.4f} | {m['ms_ssim_db']:.2f} | {m['lpips']:.4f} | "
                f"{m['encode_mp_s']:.1f} | {m['decode_mp_s']:.1f} | {entry['threads']} |")
    lines.append("")
    if result.get("visual"):
        v = result["visual"]
        lines += ["## Visual comparison", "",
                  f"`{v['file']}`: {v['image']}, {v['crop']['size']}² crop at x={v['crop']['x']}, "
                  f"y={v['crop']['y']}, each codec set for ~{v['target_bpp']} bpp on the crop coded alone:", ""]
        for p in v["panels"][1:]:
            lines.append(f"- {p['label']}: quality {p['quality']}, {p['bpp']:.3f} bpp, PSNR {p['psnr']:.2f} dB")
        lines.append("")
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------- main

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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=DEFAULT_IMAGES,
                   help=f"folder of images, relative to the repo root or cwd (default {DEFAULT_IMAGES})")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="results folder")
    p.add_argument("--tag", default=None,
                   help="results name rd_<tag>.* (default from the folder, e.g. he_test)")
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
    p.add_argument("--no-visual", action="store_true", help="skip visual.png")
    p.add_argument("--report-only", action="store_true",
                   help="no coding: recompute the BD-rates in the existing rd_<tag>.json, rebuild the table and plot")
    p.add_argument("--visual-bpp", type=float, default=0.5, help="target bpp of the visual crops")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import warnings

    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    # numpy notices flushed subnormals when it first builds finfo; harmless here
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal")
    images_dir = resolve_images(args.images)
    tag = args.tag or "_".join(Path(args.images).parts[-2:]).replace("-", "_")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"rd_{tag}.json"
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if args.max_images:
        files = files[:args.max_images]
    if not files:
        raise SystemExit(f"rd.py: no images in {images_dir}")

    if args.report_only:
        if not json_path.is_file():
            raise SystemExit(f"rd.py: --report-only needs an existing {json_path}")
        result = json.loads(json_path.read_text())
        result["bd_rate"] = bd_rates(result)      # derived: kept in step with the report
        json_path.write_text(json.dumps(json_safe(result), indent=1) + "\n")
        png = out_dir / f"rd_{tag}.png"
        plot_rd(result, png)
        write_markdown(result, out_dir / f"rd_{tag}.md", png.name)
        log(f"rebuilt the BD-rates in {json_path}, {png} and {out_dir / f'rd_{tag}.md'} from it")
        return 0

    previous = None
    if args.update:
        if not json_path.is_file():
            raise SystemExit(f"rd.py: --update needs an existing {json_path}; run without it first")
        previous = json.loads(json_path.read_text())
        if [im["name"] for im in previous["images"]] != [p.name for p in files]:
            raise SystemExit(f"rd.py: {json_path} was made on other images; rerun without --update")
        if previous.get("crop") != args.crop:
            raise SystemExit(f"rd.py: {json_path} was made with --crop {previous.get('crop')}; "
                             "rerun without --update or with that crop")
    keys = select(args.update or args.codecs)

    env = environment(args.threads)
    log(f"rd.py: {len(files)} images from {images_dir}, series {', '.join(keys)}, "
        f"{args.threads} torch threads, {env['cpu']}")
    lp = metrics.load_lpips(args.weights)
    log(f"LPIPS-alex trunk: {lp.trunk_path}")

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
    images = run_sweeps(series, files, lp, args.crop) if series else [
        {"name": p.name} for p in files]
    minutes = (time.perf_counter() - t0) / 60
    env["loadavg_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    env["sweep_minutes"] = round(minutes, 2)

    command = "bench/rd.py" + ("" if argv is None and len(sys.argv) == 1 else
                               " " + " ".join(sys.argv[1:] if argv is None else argv))
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
            "images_dir": args.images,
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
            },
            "codecs": {},
            "environment": env,
        }
        result["codecs"].update(skipped)
    for s in series:
        result["codecs"][s.sweep.key] = summarise(s, len(files), env)
    result["codecs"] = {k: result["codecs"][k] for k in SWEEPS if k in result["codecs"]}
    result["bd_rate"] = bd_rates(result)

    png = out_dir / f"rd_{tag}.png"
    plot_rd(result, png)
    if not args.no_visual:
        try:
            result["visual"] = make_visual(result, images_dir, out_dir / "visual.png",
                                           target_bpp=args.visual_bpp)
        except Exception as exc:
            log(f"visual comparison failed: {type(exc).__name__}: {exc}")
    json_path.write_text(json.dumps(json_safe(result), indent=1) + "\n")
    write_markdown(result, out_dir / f"rd_{tag}.md", png.name)
    log(f"sweep {minutes:.1f} min; wrote {json_path}, {png}, {out_dir / f'rd_{tag}.md'}"
        + ("" if args.no_visual else f", {out_dir / 'visual.png'}"))
    for anchor, rows in result["bd_rate"].get("anchors", {}).items():
        log(f"BD-rate vs {anchor} (PSNR / MS-SSIM dB): " + ", ".join(
            f"{k} {_f(_nan(r.get('psnr')), '+.1f')}% / {_f(_nan(r.get('ms_ssim_db')), '+.1f')}%"
            for k, r in rows.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
