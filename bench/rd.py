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

Sets are those of ``bench/datasets.py`` (he_test, he_test_2x, he_test_4x, cmu, tcga). JPEG-XL,
the anchor, is swept over distances 25 to 0.3 (its whole useful range); a codec whose curve ends
below JPEG-XL's top gets a BD-rate over the overlap only, and the report says which range that is
and the top PSNR each codec reaches.

Codecs come from the registry ``wsicodec.codecs.get_codec``; one that is not available here (e.g. the
learned codec before it has weights, or ``auto`` before it is registered) is skipped with the reason
printed and recorded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import struct
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
DEFAULT_SET = "he_test"
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
    #: code the image as a container does, in 256² tiles through the codec's encode_tiles /
    #: decode_tiles (:class:`TiledCodec`), not whole
    tiled: bool = False
    #: per point, options added to ``options`` (same length as ``qualities``), or None
    point_options: tuple[dict, ...] | None = None


SWEEPS: dict[str, Sweep] = {s.key: s for s in (
    Sweep("jpeg420", "jpeg", "JPEG 4:2:0 (libjpeg-turbo)", (5, 10, 20, 35, 55, 75, 90),
          {"subsampling": "420"}, knob_range=(1, 100)),
    Sweep("jpeg444", "jpeg", "JPEG 4:4:4 (libjpeg-turbo)", (5, 10, 20, 35, 55, 75, 90),
          {"subsampling": "444"}, knob_range=(1, 100)),
    # distances 25 .. 0.3: JPEG-XL's whole useful range, the span the BD-rates against it cover
    Sweep("jpegxl", "jpegxl", "JPEG XL (libjxl, effort 7)",
          (25.0, 18.0, 13.0, 9.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3),
          {"effort": 7}, direction=-1, knob="distance", knob_range=(0.1, 25)),
    Sweep("webp", "webp", "WebP lossy (libwebp, method 4)", (0, 15, 35, 55, 75, 88, 96)),
    Sweep("jpeg2000", "jpeg2000", "JPEG 2000 (OpenJPEG, 9/7)", (27, 30, 33, 36, 39, 42, 46),
          knob="target PSNR dB", knob_range=(10, 80)),
    Sweep("avif", "avif", "AVIF 4:4:4 (libavif/aom, speed 6)", (15, 30, 45, 58, 70, 80, 90)),
    Sweep("learned", "learned", "wsicodec learned", (1, 2, 3, 4, 5, 6, 7, 8), knob_range=(1, 8)),
    # the per-tile codec choice of issue #28 (the default codec), through wsicodec.encode /
    # decode as the learned codec: its rate knob 1..8 with a floor low enough to leave the
    # choice to bytes (a tile goes to JPEG-XL where that reaches the network's PSNR in fewer
    # bytes), then the floor raised at quality 8 to cover JPEG-XL's top
    Sweep("auto", "auto", "wsicodec auto (per-tile codec choice)",
          (1, 2, 3, 4, 5, 6, 7) + (8,) * 10,
          knob_range=(1, 8), tiled=True, against="jpegxl_tiled",
          point_options=tuple({"min_psnr": f} for f in (20,) * 8 + (30, 32, 34, 36, 38, 40, 42, 44, 46))),
    # JPEG-XL as a `--codec jpegxl` container stores it: 256² tiles, each its own codestream
    # (3-16 % more bytes than the whole image at equal PSNR on these sets): what `auto` is
    # also read against
    Sweep("jpegxl_tiled", "jpegxl", "JPEG XL in 256² tiles (libjxl, effort 7)",
          (25.0, 18.0, 13.0, 9.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3),
          {"effort": 7}, direction=-1, knob="distance", knob_range=(0.1, 25), tiled=True, default=False),
    # the encoder's latent search (LearnedCodec(refine=...)): ~100x the encode time, so only on request
    Sweep("learned_refine", "learned", "wsicodec learned, refine 40", (1, 3, 5, 8), {"refine": 40},
          knob_range=(1, 8), default=False, against="learned"),
)}

#: which panels the visual comparison shows, in order (after the original)
VISUAL_SERIES = ("jpeg420", "jpegxl", "webp", "learned")
PLOT_STYLE = {
    "jpeg420": ("tab:orange", "v"), "jpeg444": ("tab:red", "^"), "jpegxl": ("tab:blue", "s"),
    "webp": ("tab:green", "D"), "jpeg2000": ("tab:purple", "P"), "avif": ("tab:brown", "X"),
    "learned": ("black", "o"), "learned_refine": ("tab:gray", "*"), "auto": ("tab:olive", "h"),
    "jpegxl_tiled": ("tab:cyan", "s"),
}
#: series with a model that runs on torch's intra-op threads
TORCH_CODECS = ("learned", "auto")


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
    """The learned (or auto) codec as the product uses it: ``wsicodec.encode``/``decode``,
    i.e. 256² tiles, each coded with its context margin (the auto codec deciding each tile
    with its neighbours), plus the stream's tile table — every byte counted."""

    def __init__(self, codec) -> None:  # noqa: ANN001 - a LearnedCodec or AutoCodec
        self.codec = codec

    def encode(self, image: np.ndarray) -> bytes:
        from wsicodec.image import encode
        c = self.codec
        if c.name == "auto":
            return encode(image, quality=c.quality, model=str(c.learned.loaded.path), codec="auto",
                          min_psnr=c.min_psnr)
        return encode(image, quality=c.quality, model=str(c.loaded.path), refine=c.refine)

    def decode(self, data: bytes) -> np.ndarray:
        from wsicodec.image import decode
        loaded = self.codec.learned.loaded if self.codec.name == "auto" else self.codec.loaded
        return decode(data, model=str(loaded.path))

    def to_dict(self) -> dict:
        return self.codec.to_dict()


class TiledCodec:
    """Any registry codec as a container uses it: the image cut into ``tile``² tiles (edge
    tiles smaller) with :attr:`TileCodec.context` pixels of neighbours around each, coded by
    ``encode_tiles`` and decoded by ``decode_tiles`` (which may stitch neighbours, as the
    learned codec does). The stream is a 10-byte header (height, width, tile), a 4-byte length
    per tile and the tile streams: every byte counted."""

    HEAD = struct.Struct("<IIH")

    def __init__(self, codec, tile: int = 256) -> None:  # noqa: ANN001 - a TileCodec
        self.codec, self.tile = codec, tile

    def encode(self, image: np.ndarray) -> bytes:
        from wsicodec.image import context_region, tile_cells

        h, w = image.shape[:2]
        regions, boxes = [], []
        for _, _, ys, xs in tile_cells(h, w, self.tile):
            region, box = context_region(image, ys, xs, int(getattr(self.codec, "context", 0)))
            regions.append(region)
            boxes.append(box)
        streams = self.codec.encode_tiles(regions, boxes)
        return (self.HEAD.pack(h, w, self.tile) + struct.pack(f"<{len(streams)}I", *map(len, streams))
                + b"".join(streams))

    def decode(self, data: bytes) -> np.ndarray:
        from wsicodec.image import tile_cells

        h, w, tile = self.HEAD.unpack_from(data)
        cells = list(tile_cells(h, w, tile))
        lengths = struct.unpack_from(f"<{len(cells)}I", data, self.HEAD.size)
        pos, streams = self.HEAD.size + 4 * len(cells), {}
        for (r, c, _, _), n in zip(cells, lengths):
            streams[(c, r)] = data[pos:pos + n]
            pos += n
        grid = (-(-w // tile), -(-h // tile))
        keys = [(c, r) for r, c, _, _ in cells]
        tiles = self.codec.decode_tiles(keys, lambda c, r: streams[(c, r)], grid)
        out = np.empty((h, w, 3), np.uint8)
        for (_, _, ys, xs), t in zip(cells, tiles):
            if isinstance(t, BaseException):
                raise t
            out[ys, xs] = t
        return out

    def to_dict(self) -> dict:
        return self.codec.to_dict()


def build_series(sweep: Sweep, threads: int) -> SeriesRun:
    """Build one codec per quality; raises with the reason when the codec is unavailable."""
    from wsicodec.codecs import get_codec

    points = sweep.point_options or ({},) * len(sweep.qualities)
    codecs = [get_codec(sweep.codec, quality=q, **sweep.options, **extra)
              for q, extra in zip(sweep.qualities, points)]
    config = [c.to_dict() for c in codecs]
    if sweep.codec in ("learned", "auto"):
        codecs = [TiledLearned(c) for c in codecs]
    elif sweep.tiled:
        codecs = [TiledCodec(c) for c in codecs]
    if sweep.codec in TORCH_CODECS:
        used = threads  # a model runs its network on torch's intra-op threads
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
    sha = _find_sha256(s.config[0])
    if sha:
        entry["model_sha256"] = sha
    if s.sweep.codec in TORCH_CODECS:  # the packaged weight files, hashed here independently of the codec
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
                    lo, hi = metrics.bd_overlap(qa, qt)
                    a_lo, a_hi = float(np.nanmin(qa)), float(np.nanmax(qa))
                    row[f"{metric}_overlap"] = (lo, hi)
                    row[f"{metric}_anchor_range"] = (a_lo, a_hi)
                    # how much of the anchor's range the BD-rate covers (1: all of it)
                    row[f"{metric}_overlap_share"] = (max(hi - lo, 0.0) / (a_hi - a_lo)
                                                      if a_hi > a_lo else None)
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


def psnr_ranges(result: dict) -> dict:
    """Each measured series' PSNR span on its mean curve: ``top_psnr`` (the highest it reaches,
    with the setting and bpp there) and ``bottom_psnr``."""
    out = {}
    for key, entry in result["codecs"].items():
        if entry.get("status") not in ("ok", "partial"):
            continue
        pts = [p for p in entry.get("points", []) if p.get("mean")]
        if not pts:
            continue
        def psnr(p: dict) -> float:        # None: an exact (lossless) point, the top of any curve
            v = p["mean"]["psnr"]
            return math.inf if v is None else v

        top, low = max(pts, key=psnr), min(pts, key=psnr)
        out[key] = {"top_psnr": top["mean"]["psnr"], "top_setting": top["quality"],
                    "top_bpp": top["mean"]["bpp"], "bottom_psnr": low["mean"]["psnr"],
                    "bottom_setting": low["quality"], "bottom_bpp": low["mean"]["bpp"]}
    return out


def _floor_of(point: dict) -> float | None:
    """The ``auto`` codec's fidelity floor a point was coded with (None for other codecs)."""
    return (point.get("codec") or {}).get("configuration", {}).get("min_psnr")


def points_vs_anchors(result: dict) -> dict:
    """Every point of every series against each BD-rate anchor's mean curve at the same PSNR:
    the percent more (+) or fewer bits it takes there (issue #28's "never more than 1 % above
    JPEG-XL"), and per series the largest excess; points outside an anchor's range: None."""
    out: dict[str, Any] = {}
    codecs = {k: v for k, v in result["codecs"].items() if v.get("status") in ("ok", "partial")}
    for anchor in result.get("bd_rate", {}).get("anchors", {}):
        ra, qa = _curve(codecs[anchor], "psnr")
        rows = {}
        for key, entry in codecs.items():
            if key == anchor:
                continue
            pts = [p for p in entry.get("points", []) if p.get("mean")]
            pct = metrics.rate_at_equal_quality(ra, qa, [p["mean"]["bpp"] for p in pts],
                                                [p["mean"]["psnr"] for p in pts])
            known = [v for v in pct if v is not None]
            rows[key] = {"points": [{"setting": p["quality"], "min_psnr": _floor_of(p),
                                     "bpp": p["mean"]["bpp"], "psnr": p["mean"]["psnr"], "rate_pct": v}
                                    for p, v in zip(pts, pct)],
                         "max_rate_pct": max(known) if known else None}
        out[anchor] = rows
    return out


def derive(result: dict) -> None:
    """The numbers computed from the measured points (kept in step by --report-only too):
    BD-rates, each series' PSNR span and ``top_psnr`` per codec, every point against the anchors."""
    result["bd_rate"] = bd_rates(result)
    result["points_vs_anchor"] = points_vs_anchors(result)
    result["psnr_ranges"] = psnr_ranges(result)
    result["top_psnr"] = {k: v["top_psnr"] for k, v in result["psnr_ranges"].items()}
    for key, r in result["psnr_ranges"].items():
        result["codecs"][key]["top_psnr"] = r["top_psnr"]


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


def make_visual(result: dict, load: Callable[[str], np.ndarray], out: Path, target_bpp: float = 0.5,
                size: int = 256, image_name: str | None = None) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [im["name"] for im in result["images"]]
    name = image_name or names[0]
    img = load(name)
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


def _ranges_markdown(result: dict) -> list[str]:
    """Top PSNR per codec and the quality range each BD-rate against JPEG-XL integrates over."""
    ranges = result.get("psnr_ranges") or {}
    if not ranges:
        return []
    jxl = result.get("bd_rate", {}).get("anchors", {}).get("jpegxl", {})
    lines = ["## Top PSNR and the range each BD-rate covers", ""]
    if "jpegxl" in ranges:
        j = ranges["jpegxl"]
        lines += [f"JPEG-XL spans {j['bottom_psnr']:.2f}–{j['top_psnr']:.2f} dB PSNR (distance "
                  f"{j['bottom_setting']:g} to {j['top_setting']:g}). A BD-rate integrates over the "
                  "quality range both curves share: where a codec's curve stops short of JPEG-XL's, "
                  "its BD-rate covers only the overlap below (share = overlap / JPEG-XL's range).", ""]
    lines += ["| codec | PSNR span dB | top PSNR dB (setting, bpp) | vs jpegxl: PSNR overlap (share) | "
              "MS-SSIM dB overlap (share) | LPIPS dB overlap (share) |",
              "| --- | --- | ---: | --- | --- | --- |"]
    for key, r in ranges.items():
        row = jxl.get(key)

        def span(metric: str) -> str:
            if key == "jpegxl":
                return "(anchor)"
            if not row or row.get(f"{metric}_overlap") is None:
                return "–"
            lo, hi = row[f"{metric}_overlap"]
            share = row.get(f"{metric}_overlap_share")
            if not hi > lo:
                return "none"
            return f"{lo:.2f}–{hi:.2f} ({_f(None if share is None else 100 * share, '.0f')} %)"

        def db(v: Any) -> str:             # None: exact (lossless)
            return "exact" if v is None else f"{v:.2f}"

        lines.append(f"| {result['codecs'][key]['label']} | {db(r['bottom_psnr'])}–{db(r['top_psnr'])} | "
                     f"{db(r['top_psnr'])} ({result['codecs'][key]['knob']} {r['top_setting']:g}, "
                     f"{r['top_bpp']:.3f}) | {span('psnr')} | {span('ms_ssim_db')} | {span('lpips_db')} |")
    lines.append("")
    return lines


def _equal_psnr_markdown(result: dict) -> list[str]:
    """Each point of the wsicodec series against each anchor at equal PSNR."""
    vs = result.get("points_vs_anchor") or {}
    keys = [k for k in ("learned", "auto", "learned_refine") if any(k in rows for rows in vs.values())]
    if not keys:
        return []
    lines = ["## Each point against the anchors at equal PSNR", "",
             "Bits a point takes against the anchor's mean curve at the same PSNR (pchip in log-rate); "
             "+: more than the anchor. `jpegxl` codes each image whole; `jpegxl_tiled` codes it in "
             "the 256² tiles a `--codec jpegxl` container stores.", "",
             "| codec | setting | bpp | PSNR dB | " + " | ".join(f"vs {a}" for a in vs) + " |",
             "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in vs) + " |"]
    for key in keys:
        first = next(rows[key] for rows in vs.values() if key in rows)
        for i, p in enumerate(first["points"]):
            setting = f"{result['codecs'][key]['knob']} {p['setting']:g}" + (
                f", floor {p['min_psnr']:g} dB" if p.get("min_psnr") else "")
            cells = []
            for rows in vs.values():
                v = rows.get(key, {}).get("points", [{}] * (i + 1))[i].get("rate_pct")
                cells.append(_f(v, "+.1f") + (" %" if v is not None else ""))
            lines.append(f"| {result['codecs'][key]['label']} | {setting} | {p['bpp']:.3f} | "
                         f"{_f(p['psnr'], '.2f')} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def write_markdown(result: dict, path: Path, png: str) -> None:
    env = result["environment"]
    lines = [
        f"# Rate-distortion: {result['images_dir']}",
        "",
        *([f"Set `{result['set']['name']}` of `bench/datasets.py`: {result['set']['description']}.", ""]
          if result.get("set") else []),
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
    lines += _ranges_markdown(result)
    lines += _equal_psnr_markdown(result)
    lines += ["## Measured points (mean over images)", "",
              "| codec | setting | bpp | PSNR dB | MS-SSIM | MS-SSIM dB | LPIPS | enc MP/s | dec MP/s | threads |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, entry in result["codecs"].items():
        if entry.get("status") not in ("ok", "partial"):
            continue
        pts = sorted((p for p in entry["points"] if p.get("mean")), key=lambda p: p["mean"]["bpp"])
        for p in pts:
            m = p["mean"]
            floor = _floor_of(p)
            setting = f"{entry['knob']} {p['quality']:g}" + (f", floor {floor:g} dB" if floor else "")
            lines.append(
                f"| {entry['label']} | {setting} | {m['bpp']:.3f} | {_f(m['psnr'], '.2f')} | "
                f"{_f(m['ms_ssim'], '.4f')} | {_f(m['ms_ssim_db'], '.2f')} | {_f(m['lpips'], '.4f')} | "
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
                     help="evaluation set(s) of bench/datasets.py (he_test, he_test_2x, he_test_4x, cmu, "
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
            f"{k} {_f(_nan(r.get('psnr')), '+.1f')}% / {_f(_nan(r.get('ms_ssim_db')), '+.1f')}%"
            for k, r in rows.items()))
    log("top PSNR: " + ", ".join(f"{k} {_f(v, '.2f')} dB" for k, v in result["top_psnr"].items()))


if __name__ == "__main__":
    sys.exit(main())
