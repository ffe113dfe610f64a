"""The coding side of ``bench/nuclei.py``: the series it sweeps (:data:`SWEEPS`), the codecs
through wsicodec's public API (:func:`build_codec`, :func:`code`), the environment it records,
and :func:`run_set`: every image of one set through every (codec, rate), the detector run on
the original and on each decoded image, per-image numbers and their means.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.nuclei_detect import compare, detect, otsu_threshold
from bench.rd_sweeps import Sweep
from bench.report import cpu_model, git_state, imagecodecs_versions, log, package_versions
from wsicodec.checkpoint import sha256_file  # (a file's hash; imports no torch)

REPO = Path(__file__).resolve().parent.parent

#: the series this benchmark sweeps (``Sweep.qualities``: the rates; the other fields of
#: :class:`~bench.rd_sweeps.Sweep` say what the knob is, as for bench/rd.py)
SWEEPS: dict[str, Sweep] = {s.key: s for s in (
    Sweep("learned", "learned", "wsicodec learned (256² tiles)", (1, 2, 3, 4, 5, 6, 7, 8), knob_range=(1, 8)),
    Sweep("jpegxl", "jpegxl", "JPEG XL (libjxl, effort 7)", (25.0, 15.0, 10.0, 6.0, 4.0, 2.5, 1.6, 1.0, 0.6, 0.3),
          {"effort": 7}, direction=-1, knob="distance", knob_range=(0.1, 25)),
    Sweep("jpeg420", "jpeg", "JPEG 4:2:0", (10, 25, 50, 75, 90), {"subsampling": "420"}, knob_range=(1, 100)),
    Sweep("jpeg444", "jpeg", "JPEG 4:4:4", (10, 25, 50, 75, 90), {"subsampling": "444"}, knob_range=(1, 100)),
    Sweep("webp", "webp", "WebP lossy", (15, 35, 55, 75, 90)),
)}
LEARNED_TILE = 256


class LearnedPublic:
    """The learned codec through the package's public API only."""

    def __init__(self, quality: float) -> None:
        self.quality = quality

    def encode(self, rgb: np.ndarray) -> bytes:
        import wsicodec
        return wsicodec.encode(rgb, quality=self.quality, tile_size=LEARNED_TILE)

    def decode(self, data: bytes) -> np.ndarray:
        import wsicodec
        return wsicodec.decode(data)

    def to_dict(self) -> dict:
        return {"api": "wsicodec.encode/decode", "quality": self.quality, "tile_size": LEARNED_TILE}


def build_codec(sweep: Sweep, rate: float):
    """The codec of one point: the learned one through :class:`LearnedPublic`, the others from
    the registry with the sweep's options."""
    if sweep.codec == "learned":
        return LearnedPublic(rate)
    from wsicodec.codecs import get_codec
    return get_codec(sweep.codec, quality=rate, **sweep.options)


def code(codec, rgb: np.ndarray) -> tuple[int, np.ndarray]:
    """(bytes, decoded pixels) of ``rgb`` through ``codec``; raises if the decode is not ``rgb``'s shape."""
    data = codec.encode(rgb)
    dec = np.asarray(codec.decode(data))
    if dec.shape != rgb.shape or dec.dtype != np.uint8:
        raise RuntimeError(f"decoded {dec.shape} {dec.dtype}, expected {rgb.shape} uint8")
    return len(data), dec


def environment(threads: int) -> dict:
    versions = package_versions(("numpy", "scipy", "scikit-image", "torch", "imagecodecs",
                                 "pytorch-msssim", "matplotlib", "pillow", "openslide-python",
                                 "openslide-bin", "compressai"))
    libs = imagecodecs_versions(("jpeg8", "jpegxl", "webp"))
    commit, dirty = git_state(REPO, ("wsicodec", "bench", ":(exclude)bench/results"))
    cpu = cpu_model()
    # the packaged weight files (the learned codec's shipped model), hashed here as files
    import wsicodec
    weights = {p.name: sha256_file(p) for p in sorted(Path(wsicodec.__file__).parent.rglob("*.pt"))}
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "loadavg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "platform": platform.platform(),
        "packages": versions, "libraries": libs, "git_commit": commit,
        "git_dirty_wsicodec_or_bench": dirty, "wsicodec_weight_files": weights,
    }


# ------------------------------------------------------------------------------------------ the run

def run_set(ds, keys: list[str], limit: int | None) -> dict:
    """Every image of one set through every (codec, rate)."""
    from bench import metrics
    per: dict[str, list[list[dict]]] = {k: [[] for _ in SWEEPS[k].qualities] for k in keys}
    images = []
    t0 = time.perf_counter()
    for name, rgb in ds.images(limit=limit):
        h, w = rgb.shape[:2]
        thr = otsu_threshold(rgb, ds.mpp)
        ref = detect(rgb, ds.mpp, thr)
        ms_ref = metrics.MsSsimReference(rgb)
        areas_um2 = ref.areas * ds.mpp ** 2
        images.append({"name": name, "width": w, "height": h, "threshold": thr, "n_nuclei": ref.n,
                       "median_area_um2": float(np.median(areas_um2)) if ref.n else None,
                       "nuclear_fraction": float(ref.mask.mean()),
                       "sha256_rgb": hashlib.sha256(rgb.tobytes()).hexdigest()})
        for k in keys:
            s = SWEEPS[k]
            for ri, rate in enumerate(s.qualities):
                rec: dict[str, Any] = {"image": name}
                try:
                    nbytes, dec = code(build_codec(s, rate), rgb)
                except Exception as exc:  # one failing point must not lose the run
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                    log(f"  {ds.name} {k} {rate} {name}: {rec['error']}")
                    per[k][ri].append(rec)
                    continue
                rec.update({"bytes": nbytes, "bpp": 8.0 * nbytes / (h * w),
                            "psnr": metrics.psnr(rgb, dec), "ms_ssim": ms_ref.against(dec)})
                rec.update(compare(ref, detect(dec, ds.mpp, thr), ds.mpp))
                per[k][ri].append(rec)
        log(f"  {ds.name} {name}: {ref.n} nuclei, {time.perf_counter() - t0:.0f} s so far")
    codecs = {}
    n_img = len(images)
    for k in keys:
        s = SWEEPS[k]
        points = []
        for ri, rate in enumerate(s.qualities):
            recs = per[k][ri]
            ok = [r for r in recs if "error" not in r]
            p: dict[str, Any] = {s.knob: rate, "per_image": recs}
            if ok and len(ok) == n_img:
                p["mean"] = {m: float(np.nanmean([r[m] for r in ok])) for m in (
                    "bpp", "psnr", "ms_ssim", "f1", "precision", "recall", "area_change",
                    "area_bias", "mask_dice", "n_dec")}
                p["mean"]["n_orig"] = float(np.mean([r["n_orig"] for r in ok]))
                tp, no, nd = (sum(r[m] for r in ok) for m in ("tp", "n_orig", "n_dec"))
                p["mean"]["f1_pooled"] = 2.0 * tp / (no + nd) if no + nd else 1.0
            else:
                p["mean"] = None
            points.append(p)
        codecs[k] = {"label": s.label, "codec": s.codec, "options": s.options, "knob": s.knob,
                     "config": build_codec(s, s.qualities[0]).to_dict(), "points": points}
    return {**ds.to_dict(), "images": images, "limit": limit, "codecs": codecs,
            "seconds": round(time.perf_counter() - t0, 1)}
