"""The learned codec on a GPU: do CPU-made tiles decode there as on the CPU, and how fast?

    python bench/gpu_decode.py [--images ../shared/data/he/test] [--tiles 64] [--device cuda]
                               [--out bench/results/gpu_decode.json]

Tiles are 256² tissue tiles cut from the images with the container's 8 px context margin.
They are encoded on the CPU (what ``wsicodec compress`` writes on a machine without a GPU)
and decoded three ways: ``LearnedCodec(device="cpu")``, ``LearnedCodec(device=DEVICE)``
and the tile server's batched path (``wsicodec.batch._LearnedBatch`` with a thread pool
for the entropy decoding, g_s on DEVICE).  Reported: how far the DEVICE pixels are from
the CPU ones (the symbols must be identical — the per-tile symbol checksum raises
otherwise — and only g_s's float arithmetic may differ), the PSNR of each against the
source, tiles encoded on DEVICE (their size against the CPU's, and that the CPU decodes
them), and encode/decode MP/s by batch size, entropy coding included.

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
from wsicodec.batch import _LearnedBatch  # noqa: E402
from wsicodec.image import context_region  # noqa: E402
from wsicodec.learned import LearnedCodec  # noqa: E402

TILE, MARGIN = 256, 8


def _tiles(folder: Path, n: int):
    tiles, regions, boxes = [], [], []
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".webp", ".tif", ".tiff"))
    if not paths:
        raise SystemExit(f"no images in {folder}")
    for p in paths:
        img = np.asarray(Image.open(p).convert("RGB"))
        for y in range(0, img.shape[0] - TILE + 1, TILE):
            for x in range(0, img.shape[1] - TILE + 1, TILE):
                r, b = context_region(img, slice(y, y + TILE), slice(x, x + TILE), MARGIN)
                tiles.append(img[y:y + TILE, x:x + TILE])
                regions.append(r)
                boxes.append(b)
                if len(tiles) == n:
                    return tiles, regions, boxes
    return tiles, regions, boxes


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

    tiles, regions, boxes = _tiles(Path(args.images), args.tiles)
    n = len(tiles)
    cpu = LearnedCodec(quality=args.quality, device="cpu")
    dev = LearnedCodec(quality=args.quality, device=args.device)
    names = [f"tile {i}" for i in range(n)]

    t = time.perf_counter()
    data = cpu.encode_batch(regions, boxes)
    enc_cpu_s = time.perf_counter() - t
    dec_cpu = cpu.decode_batch(data, names)
    dec_dev = dev.decode_batch(data, names)
    diff = np.stack([np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(dec_cpu, dec_dev)])

    backend = _LearnedBatch(dev, args.device, None)
    with ThreadPoolExecutor(args.workers) as pool:
        served = backend.decode(data, names, pool)
        bad = [r for r in served if isinstance(r, Exception)]
        if bad:
            raise SystemExit(f"batched path failed: {bad[0]}")
        served_same = all(np.array_equal(a, b) for a, b in zip(served, dec_dev))
        served_s = _best(lambda: backend.decode(data, names, pool), args.repeats)

    data_dev = dev.encode_batch(regions, boxes)
    dec_cross = cpu.decode_batch(data_dev, names)     # made on DEVICE, decoded on the CPU

    mp = n * TILE * TILE / 1e6
    speed = []
    for b in (int(s) for s in args.batch_sizes.split(",")):
        b = min(b, n)
        chunks = [slice(i, i + b) for i in range(0, n, b)]
        dev.decode_batch(data[:b], names[:b])                 # warm this shape
        dec_s = _best(lambda: [dev.decode_batch(data[c], names[c]) for c in chunks], args.repeats)
        enc_s = _best(lambda: [dev.encode_batch(regions[c], boxes[c]) for c in chunks], args.repeats)
        speed.append({"batch": b, "decode_mp_s": round(mp / dec_s, 2), "encode_mp_s": round(mp / enc_s, 2)})
        print(f"batch {b:3d}: decode {mp / dec_s:6.2f} MP/s  encode {mp / enc_s:6.2f} MP/s ({args.device})")
    cpu_dec_s = _best(lambda: cpu.decode_batch(data, names), 1)

    result = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else platform.processor(),
        "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
        "model_id": cpu.model_id,
        "images": str(args.images), "tiles": n, "tile": TILE, "margin": MARGIN, "quality": args.quality,
        "bpp": round(8 * sum(map(len, data)) / (n * TILE * TILE), 4),
        "cpu_vs_device": {
            "max_abs_diff": int(diff.max()), "mean_abs_diff": round(float(diff.mean()), 5),
            "pixels_differing": round(float((diff > 0).mean()), 5),
            "psnr_device_vs_cpu_db": _finite(min(_psnr(a, b) for a, b in zip(dec_cpu, dec_dev))),
            "psnr_cpu_db": round(float(np.mean([_psnr(a, s) for a, s in zip(dec_cpu, tiles)])), 3),
            "psnr_device_db": round(float(np.mean([_psnr(a, s) for a, s in zip(dec_dev, tiles)])), 3),
        },
        "batched_path_same_as_codec": served_same,
        "batched_path_mp_s": round(mp / served_s, 2),
        "device_encoded": {
            "bytes_vs_cpu": round(sum(map(len, data_dev)) / sum(map(len, data)), 4),
            "identical_streams": sum(a == b for a, b in zip(data, data_dev)),
            "psnr_decoded_on_cpu_db": round(float(np.mean([_psnr(a, s) for a, s in zip(dec_cross, tiles)])), 3),
        },
        "speed": speed,
        "cpu_decode_mp_s": round(mp / cpu_dec_s, 2),
        "cpu_encode_mp_s": round(mp / enc_cpu_s, 2),
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
