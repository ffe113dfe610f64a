"""The rate-distortion benchmark's coding loop (``bench/rd.py``): the images a run codes, the
machine it runs on, and every image through every (series, quality).

- :func:`folder_source` / :func:`set_source`: a run's images (:class:`ImageSource`), from a
  folder or a ``bench/datasets.py`` set, each with its provenance (file and pixel hashes).
- :func:`environment`: the machine, packages, libraries and checkout a run records.
- :func:`run_sweeps`: code, decode (timed) and measure (bpp, PSNR, MS-SSIM, LPIPS) each
  image with each point of each :class:`~bench.rd_sweeps.SeriesRun`; :func:`summarise` turns
  one series' records into its results entry (per-point means over images).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench import metrics
from bench.metrics import center_crop
from bench.rd_sweeps import TORCH_CODECS, SeriesRun
from bench.report import cpu_model, git_state, imagecodecs_versions, log, package_versions
from wsicodec.checkpoint import sha256_file  # (plain file hash; imports no torch)

REPO = Path(__file__).resolve().parent.parent
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")


def timed(fn: Callable[[], Any], min_total: float = 0.3, max_runs: int = 3) -> tuple[Any, float]:
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


@dataclass(frozen=True)
class ImageItem:
    """One image of a run: its name in the results, its pixels, and where they came from."""

    name: str
    load: Callable[[], np.ndarray]
    provenance: Callable[[], dict]


@dataclass
class ImageSource:
    """A run's images: a folder of files (``--images``) or a set of ``bench/datasets.py``
    (``--set``). ``label`` is what the results call it (``images_dir``)."""

    label: str
    items: list[ImageItem]
    dataset: dict | None = None

    def load(self, name: str) -> np.ndarray:
        for item in self.items:
            if item.name == name:
                return item.load()
        raise KeyError(name)


def folder_source(folder: str, max_images: int | None = None) -> ImageSource:
    images_dir = resolve_images(folder)
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if max_images:
        files = files[:max_images]
    if not files:
        raise SystemExit(f"rd.py: no images in {images_dir}")
    return ImageSource(folder, [ImageItem(p.name, lambda p=p: load_image(p),
                                          lambda p=p: {"sha256": sha256_file(p)}) for p in files])


def set_source(name: str, max_images: int | None = None) -> ImageSource:
    """The images of one ``bench/datasets.py`` set, loaded now. An image made from one PNG of
    the set's folder is named by that file (``TCGA-….png``, as rd.py has always named he/test
    images, so ``rd_he_test.json`` and its readers keep their names); ``sha256`` is the source
    file's, ``pixels_sha256`` that of the pixels coded (they differ for he_test_2x / 4x)."""
    import hashlib

    from bench.datasets import data_root, get_dataset

    try:
        ds = get_dataset(name)
    except KeyError as exc:
        raise SystemExit(f"rd.py: {exc.args[0]}") from None
    if not ds.available():
        raise SystemExit(f"rd.py: set {name}: data not found ({', '.join(map(str, ds.paths()))})")
    root = data_root()
    items = []
    for image_name, rgb in ds.images(max_images):
        rgb = np.ascontiguousarray(rgb)
        source, shown = None, image_name
        for rel in ds.files:
            if (root / rel / f"{image_name}.png").is_file():
                source, shown = root / rel / f"{image_name}.png", f"{image_name}.png"
            elif len(ds.files) == 1 and (root / rel).is_file():
                source = root / rel
        prov = {"sha256": sha256_file(source) if source else None,
                "source": str(source.relative_to(root)) if source else None,
                "pixels_sha256": hashlib.sha256(rgb.tobytes()).hexdigest()}
        items.append(ImageItem(shown, lambda rgb=rgb: rgb, lambda prov=prov: dict(prov)))
    if not items:
        raise SystemExit(f"rd.py: set {name} gave no images")
    return ImageSource(f"{name} (bench/datasets.py)", items, ds.to_dict())


def find_sha256(obj: Any) -> str | None:
    """The model id in a codec's to_dict(): a value under a key mentioning sha256 or ``model_id``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if ("sha256" in str(k).lower() or str(k) == "model_id") and isinstance(v, str):
                return v
        for v in obj.values():
            found = find_sha256(v)
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


def code_one(codec, image: np.ndarray) -> tuple[bytes, np.ndarray, float, float]:
    data, enc_s = timed(lambda: codec.encode(image))
    decoded, dec_s = timed(lambda: codec.decode(data))
    decoded = np.asarray(decoded)
    if decoded.shape != image.shape or decoded.dtype != np.uint8:
        raise RuntimeError(f"decoded {decoded.shape} {decoded.dtype}, expected {image.shape} uint8")
    return data, decoded, enc_s, dec_s


def run_sweeps(series: list[SeriesRun], items: list[ImageItem], lp: metrics.Lpips,
               crop: int | None = None) -> list[dict]:
    """Code every image with every (series, quality); fill ``per_point``; return image records."""
    images = []
    t_start = time.perf_counter()
    for i, item in enumerate(items):
        img = center_crop(item.load(), crop)
        h, w = img.shape[:2]
        plan = metrics.ms_ssim_plan(h, w)
        if not plan.standard:
            log(f"  note: {item.name} is {w}x{h}: {plan.describe()}")
        images.append({"name": item.name, "width": w, "height": h, **item.provenance(),
                       "ms_ssim_scales": plan.scales, "ms_ssim_win_size": plan.win_size})
        ref_feats = lp.reference(img)
        ref_ms = metrics.MsSsimReference(img)
        for s in series:
            for qi, codec in enumerate(s.codecs):
                rec: dict[str, Any] = {"image": item.name}
                try:
                    data, decoded, enc_s, dec_s = code_one(codec, img)
                except Exception as exc:  # one failing point must not lose the whole run
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                    log(f"  {s.sweep.key} q={s.sweep.qualities[qi]} on {item.name}: {rec['error']}")
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
        log(f"[{i + 1}/{len(items)}] {item.name} done, {elapsed / 60:.1f} min elapsed, "
            f"~{elapsed / (i + 1) * (len(items) - i - 1) / 60:.1f} min left")
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
    sha = find_sha256(s.config[0])
    if sha:
        entry["model_sha256"] = sha
    if s.sweep.codec in TORCH_CODECS:  # the packaged weight files, hashed here independently of the codec
        entry["weight_files"] = {p.name: sha256_file(p)
                                 for p in sorted((REPO / "wsicodec" / "weights").glob("*.pt"))}
    return entry

