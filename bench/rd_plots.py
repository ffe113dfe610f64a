"""The figures of ``bench/rd.py``: the rate-distortion curves (:func:`plot_rd`, rd_<tag>.png)
and the visual comparison (:func:`make_visual`: one textured crop, each codec's knob bisected to
about the same bpp on it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from bench import metrics
from bench.rd_derive import mean_curve
from bench.rd_sweeps import PLOT_STYLE, SWEEPS, TORCH_CODECS, Sweep
from bench.report import log

#: which panels the visual comparison shows, in order (after the original)
VISUAL_SERIES = ("jpeg420", "jpegxl", "webp", "learned")


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
            x, y = mean_curve(entry, m)
            order = np.argsort(x)
            ax.plot(x[order], y[order], marker=marker, color=color, label=entry["label"],
                    linewidth=2.2 if key in TORCH_CODECS else 1.4, markersize=5)
            xmax = max(xmax, float(x.max()) if len(x) else 0.0)
    for ax, (_, ylabel) in zip(axes, panels):
        ax.set_xlabel("bits per pixel (actual bytes)")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, min(xmax * 1.02, 6.0) if xmax else 3.0)   # JPEG-XL d0.3 reaches ~5.5 bpp
        ax.grid(True, alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8, loc="lower right")
    n = len(result["images"])
    crop = f", central {result['crop']}² of each" if result.get("crop") else ""
    fig.suptitle(f"Rate-distortion on {result['images_dir']} ({n} images{crop}, mean over images)\n"
                 f"classical codecs code each image whole; learned (and auto) code 256² tiles with context, as in a container", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- visual

def pick_crop(img: np.ndarray, size: int) -> tuple[int, int]:
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


def match_bpp(sweep: Sweep, crop: np.ndarray, target: float, iters: int = 14) -> dict:
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


def make_visual(result: dict, load: Callable[[str], np.ndarray], out: Path, target_bpp: float = 0.5,
                size: int = 256, image_name: str | None = None) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [im["name"] for im in result["images"]]
    name = image_name or names[0]
    img = load(name)
    y, x = pick_crop(img, size)
    crop = np.ascontiguousarray(img[y:y + size, x:x + size])
    panels = [{"key": "original", "label": "original", "image": crop}]
    for key in VISUAL_SERIES:
        entry = result["codecs"].get(key)
        if not entry or entry.get("status") not in ("ok", "partial"):
            continue
        try:
            t = match_bpp(SWEEPS[key], crop, target_bpp)
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
