"""The learned codec on a GPU: do CPU-made tiles decode there as on the CPU, and how fast?

    python bench/gpu_decode.py [--images ../shared/data/he/test] [--tiles 64] [--device cuda]
                               [--out bench/results/gpu_decode.json]

Whole images (cropped to whole 256² tiles, at least ``--tiles`` tiles in all) are cut
into tiles as a container's (g_a over each tile and its 16 px of context, the tile's own
latents coded: stitched tiles, tile format 3).  They are encoded on the CPU (what
``wsicodec compress`` writes on a machine without a GPU) and decoded, each tile with its
neighbours' latents, three ways: ``LearnedCodec(device="cpu").decode_tiles``, the same on
DEVICE, and the tile server's batched path (a codec built as ``wsicodec.batch.BatchDecoder``
builds it, ``max_batch`` by device, its ``decode_tiles`` with a latent cache and a thread
pool for the entropy decoding, g_s on DEVICE).  Reported: how far the DEVICE pixels are
from the CPU ones (the symbols must be identical — the per-tile symbol checksum raises
otherwise — and only g_s's float arithmetic may differ), the PSNR of each against the
source, tiles encoded on DEVICE (their size against the CPU's, and that the CPU decodes
them), stitched decode MP/s (each tile's stream decoded once, as ``decompress`` does),
and encode MP/s and tile-by-tile decode MP/s (``decode_alone``) by batch size; and, under
"bfloat16", the stitched and batched decode with ``precision="bfloat16"`` (MP/s, PSNR, and
how far from the float32 pixels).

Made to run in one short call of the lent GPU: it needs torch, compressai, numpy and
Pillow, not zarr or imagecodecs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.metrics import psnr as _psnr  # noqa: E402
from bench.tile_speed import _best  # noqa: E402
from wsicodec.image import context_region  # noqa: E402
from wsicodec.learned import DEFAULT_MARGIN, LearnedCodec  # noqa: E402
from wsicodec.tiling import TileGrid  # noqa: E402

TILE = 256


class _Image:
    """One image's tiles, as a container offers them to the batched decoder."""

    def __init__(self, img: np.ndarray, streams: list[bytes]) -> None:
        self.img, self.streams = img, streams
        self.cols, self.rows = img.shape[1] // TILE, img.shape[0] // TILE
        self.keys = [(c, r) for r in range(self.rows) for c in range(self.cols)]

    def grid(self, level: int) -> TileGrid:
        return TileGrid(self.img.shape[1], self.img.shape[0], TILE)

    def read_encoded_tile(self, level: int, col: int, row: int) -> bytes:
        return self.streams[row * self.cols + col]

    def tile(self, col: int, row: int) -> np.ndarray:
        return self.img[row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE]


def _images(folder: Path, n: int) -> list[np.ndarray]:
    """Images cropped to whole tiles, until they hold at least ``n`` tiles."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".webp", ".tif", ".tiff"))
    if not paths:
        raise SystemExit(f"no images in {folder}")
    out, count = [], 0
    for p in paths:
        img = np.asarray(Image.open(p).convert("RGB"))
        h, w = img.shape[0] // TILE * TILE, img.shape[1] // TILE * TILE
        if h and w:
            out.append(np.ascontiguousarray(img[:h, :w]))
            count += (h // TILE) * (w // TILE)
        if count >= n:
            break
    return out


def _cut(img: np.ndarray) -> tuple[list[np.ndarray], list[tuple[int, int, int, int]]]:
    regions, boxes = [], []
    for r in range(img.shape[0] // TILE):
        for c in range(img.shape[1] // TILE):
            reg, box = context_region(img, slice(r * TILE, (r + 1) * TILE),
                                      slice(c * TILE, (c + 1) * TILE), DEFAULT_MARGIN)
            regions.append(reg)
            boxes.append(box)
    return regions, boxes


def _stitched(codec: LearnedCodec, im: _Image) -> list[np.ndarray]:
    out = codec.decode_tiles(im.keys, lambda c, r: im.read_encoded_tile(0, c, r), (im.cols, im.rows),
                             cache=codec.new_cache(TILE, len(im.keys)))
    bad = [t for t in out if isinstance(t, BaseException)]
    if bad:
        raise SystemExit(f"stitched decode failed: {bad[0]}")
    return out


class _Served:
    """The tile server's path: a codec as :class:`wsicodec.batch.BatchDecoder` builds it
    (``max_batch`` by device), its latent cache, its work on a thread pool."""

    def __init__(self, quality: float, device: str, precision: str = "float32") -> None:
        self.codec = LearnedCodec(quality=quality, device=device, precision=precision, max_batch=None)
        self.cache = self.codec.new_cache(TILE, 0, max_bytes=256 * 1024 * 1024)
        self.codec.warm_up()

    def decode(self, im: "_Image", pool: ThreadPoolExecutor) -> list:
        def run(fn, items: list) -> list:  # noqa: ANN001
            return [f.exception() or f.result() for f in [pool.submit(fn, it) for it in items]]
        return self.codec.decode_tiles(im.keys, lambda c, r: im.read_encoded_tile(0, c, r),
                                       (im.cols, im.rows), cache=self.cache, run=run)


def _served_seconds(backend: _Served, ims: list[_Image], pool: ThreadPoolExecutor,
                    repeats: int) -> float:
    """Best time of the batched path over every tile, each tile's stream decoded once per pass."""
    def serve_all() -> None:
        backend.cache.clear()
        for im in ims:
            backend.decode(im, pool)
    return _best(serve_all, repeats)


def _finite(v: float) -> float | None:
    """JSON has no infinity: identical images (PSNR ∞) are written as null."""
    return round(v, 2) if np.isfinite(v) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "he" / "test"))
    ap.add_argument("--tiles", type=int, default=64)
    ap.add_argument("--quality", type=float, default=4.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-sizes", default="1,4,16,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=8, help="entropy-decoding threads of the batched path")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_decode.json"))
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)

    cpu = LearnedCodec(quality=args.quality, device="cpu")
    dev = LearnedCodec(quality=args.quality, device=args.device)
    images = _images(Path(args.images), args.tiles)
    cut = [_cut(img) for img in images]
    t = time.perf_counter()
    ims = [_Image(img, cpu.encode_tiles(regions, boxes)) for img, (regions, boxes) in zip(images, cut)]
    enc_cpu_s = time.perf_counter() - t
    n = sum(len(im.keys) for im in ims)
    tiles = [im.tile(c, r) for im in ims for c, r in im.keys]
    dec_cpu = [x for im in ims for x in _stitched(cpu, im)]
    dec_dev = [x for im in ims for x in _stitched(dev, im)]
    diff = np.stack([np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(dec_cpu, dec_dev)])

    backend = _Served(args.quality, args.device)
    with ThreadPoolExecutor(args.workers) as pool:
        served = [x for im in ims for x in backend.decode(im, pool)]
        bad = [r for r in served if isinstance(r, Exception)]
        if bad:
            raise SystemExit(f"batched path failed: {bad[0]}")
        served_diff = max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
                          for a, b in zip(served, dec_dev))
        served_s = _served_seconds(backend, ims, pool, args.repeats)

    # precision="bfloat16": g_s's inner layers in bfloat16, the codec's path and the batched one
    dev16 = LearnedCodec(quality=args.quality, device=args.device, precision="bfloat16")
    dec_dev16 = [x for im in ims for x in _stitched(dev16, im)]
    stitched16_s = _best(lambda: [_stitched(dev16, im) for im in ims], args.repeats)
    backend16 = _Served(args.quality, args.device, "bfloat16")
    with ThreadPoolExecutor(args.workers) as pool:
        served16_s = _served_seconds(backend16, ims, pool, args.repeats)

    ims_dev = [_Image(img, dev.encode_tiles(regions, boxes)) for img, (regions, boxes) in zip(images, cut)]
    dec_cross = [x for im in ims_dev for x in _stitched(cpu, im)]     # made on DEVICE, decoded on the CPU

    mp = n * TILE * TILE / 1e6
    data = [s for im in ims for s in im.streams]
    regions = [r for rs, _ in cut for r in rs]
    boxes = [b for _, bs in cut for b in bs]
    names = [f"tile {i}" for i in range(n)]
    stitched_s = _best(lambda: [_stitched(dev, im) for im in ims], args.repeats)
    speed = []
    for b in (int(s) for s in args.batch_sizes.split(",")):
        b = min(b, n)
        chunks = [slice(i, i + b) for i in range(0, n, b)]
        dev.decode_alone(data[:b], names[:b])                 # warm this shape
        dec_s = _best(lambda: [dev.decode_alone(data[c], names[c]) for c in chunks], args.repeats)
        enc_s = _best(lambda: [dev.encode_tiles(regions[c], boxes[c]) for c in chunks], args.repeats)
        speed.append({"batch": b, "decode_alone_mp_s": round(mp / dec_s, 2), "encode_mp_s": round(mp / enc_s, 2)})
        print(f"batch {b:3d}: decode (tiles alone) {mp / dec_s:6.2f} MP/s  encode {mp / enc_s:6.2f} MP/s ({args.device})")
    cpu_dec_s = _best(lambda: [_stitched(cpu, im) for im in ims], 1)

    result = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else platform.processor(),
        "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
        "model_id": cpu.model_id, "tile_format": 3,
        "images": str(args.images), "image_count": len(images), "tiles": n, "tile": TILE,
        "margin": DEFAULT_MARGIN, "quality": args.quality,
        "bpp": round(8 * sum(map(len, data)) / (n * TILE * TILE), 4),
        "cpu_vs_device": {
            "max_abs_diff": int(diff.max()), "mean_abs_diff": round(float(diff.mean()), 5),
            "pixels_differing": round(float((diff > 0).mean()), 5),
            "psnr_device_vs_cpu_db": _finite(min(_psnr(a, b) for a, b in zip(dec_cpu, dec_dev))),
            "psnr_cpu_db": round(float(np.mean([_psnr(a, s) for a, s in zip(dec_cpu, tiles)])), 3),
            "psnr_device_db": round(float(np.mean([_psnr(a, s) for a, s in zip(dec_dev, tiles)])), 3),
        },
        "batched_path_max_abs_diff_vs_codec": served_diff,
        "batched_path_mp_s": round(mp / served_s, 2),
        "device_encoded": {
            "bytes_vs_cpu": round(sum(len(s) for im in ims_dev for s in im.streams) / sum(map(len, data)), 4),
            "identical_streams": sum(a == b for a, b in zip(data, [s for im in ims_dev for s in im.streams])),
            "psnr_decoded_on_cpu_db": round(float(np.mean([_psnr(a, s) for a, s in zip(dec_cross, tiles)])), 3),
        },
        "stitched_decode_mp_s": round(mp / stitched_s, 2),
        "bfloat16": {
            "stitched_decode_mp_s": round(mp / stitched16_s, 2),
            "batched_path_mp_s": round(mp / served16_s, 2),
            "psnr_db": round(float(np.mean([_psnr(a, s) for a, s in zip(dec_dev16, tiles)])), 3),
            "psnr_vs_float32_db": _finite(min(_psnr(a, b) for a, b in zip(dec_dev16, dec_dev))),
        },
        "speed": speed,
        "cpu_stitched_decode_mp_s": round(mp / cpu_dec_s, 2),
        "cpu_encode_mp_s": round(mp / enc_cpu_s, 2),
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
