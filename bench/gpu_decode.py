"""The learned codec on a GPU: do CPU-made tiles decode there as on the CPU, and how fast?

    python bench/gpu_decode.py [--images ../shared/data/he/test] [--tiles 256] [--device cuda]
                               [--batch-sizes 1,4,16,64,256] [--out bench/results/gpu_decode.json]

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

Symbols (issue #31): the exact h_s runs on DEVICE in float64 when the decoder does; for
every tile, μ and the CDF-table indexes from DEVICE (one tile, and all tiles in one
batch) against the CPU's, to the bit, and the gained ŷ of the whole entropy path
(``entropy_decode_many``) on both; then the entropy path alone (rANS on the CPU threads,
h_s on DEVICE) in MP/s by batch size.

Sized for one call of the lent GPU of at most five minutes (the previous version, 64
tiles and batches up to 64, took under two on an H200; this one has not run on a GPU
yet): it needs torch, compressai, numba, numpy and Pillow, not zarr or imagecodecs.
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


def _network(data: list[bytes]) -> list:
    from wsicodec.learned import parse_header
    items = [(d, parse_header(d), f"tile {i}") for i, d in enumerate(data)]
    return [it for it in items if it[1].kind == 0]


def _symbols(cpu: LearnedCodec, dev: LearnedCodec, data: list[bytes], device: str) -> dict:
    """The exact h_s on DEVICE against the CPU's, to the bit: μ and table indexes of each
    network tile alone and of all in one batch; and the gained ŷ of the whole entropy
    path of each codec (symbols, checksums, κ)."""
    items = _network(data)
    zs = [cpu.decoder.decode_z(d, hd) for d, hd, _ in items]
    ref = [cpu.decoder.hyper_parameters(z, hd, device="cpu") for z, (_, hd, _) in zip(zs, items)]
    one = sum(all(torch.equal(a, b) for a, b in zip(r, dev.decoder.hyper_parameters(z, hd, device=device)))
              for r, z, (_, hd, _) in zip(ref, zs, items))
    mu, index = dev.decoder.hyper_parameters(np.stack(zs), items[0][1], device=device)
    batch = sum(torch.equal(r[0], mu[i:i + 1]) and torch.equal(r[1], index[i:i + 1])
                for i, r in enumerate(ref))
    ya, yb = cpu.decoder.entropy_decode_many(items), dev.decoder.entropy_decode_many(items)
    fails = sum(isinstance(y, BaseException) for y in ya + yb)
    same_y = sum(isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
                 for a, b in zip(ya, yb))
    return {"tiles": len(items), "h_s_device": str(dev.decoder.entropy_device),
            "h_s_identical_one_tile": int(one), "h_s_identical_batched": int(batch),
            "y_hat_identical": int(same_y), "entropy_failures": int(fails)}


def _entropy_speed(dev: LearnedCodec, data: list[bytes], sizes: list[int],
                   pool: ThreadPoolExecutor, repeats: int) -> list[dict]:
    """The entropy path alone (rANS on the pool's CPU threads, the exact h_s on the
    codec's device), all network tiles in chunks of B, the chunks on the pool."""
    items = _network(data)
    mp = len(items) * TILE * TILE / 1e6
    rows = []
    for b in sizes:
        b = min(b, len(items))
        chunks = [items[i:i + b] for i in range(0, len(items), b)]
        s = _best(lambda: list(pool.map(dev.decoder.entropy_decode_many, chunks)), repeats)
        rows.append({"batch": b, "entropy_mp_s": round(mp / s, 2)})
        print(f"batch {b:3d}: entropy decode + exact h_s {mp / s:7.2f} MP/s")
    return rows


def _finite(v: float) -> float | None:
    """JSON has no infinity: identical images (PSNR ∞) are written as null."""
    return round(v, 2) if np.isfinite(v) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "he" / "test"))
    ap.add_argument("--tiles", type=int, default=256)
    ap.add_argument("--quality", type=float, default=4.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-sizes", default="1,4,16,64,256")
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
    symbols = _symbols(cpu, dev, data, args.device)
    print(json.dumps({"symbols": symbols}))
    with ThreadPoolExecutor(args.workers) as pool:
        entropy = _entropy_speed(dev, data, [int(s) for s in args.batch_sizes.split(",")], pool,
                                 args.repeats)

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
        "symbols_cpu_vs_device": symbols,
        "entropy_decode_on_device": entropy,
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
