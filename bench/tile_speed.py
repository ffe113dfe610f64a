"""Learned-codec speed on 256² tiles: encode and decode MP/s, eager and torch.compile.

    python bench/tile_speed.py [--threads 2] [--batch 8] [--repeats 3]
                               [--out bench/results/tile_speed.json]

Tiles are cut from ``../shared/data/he/test`` (tissue, so every tile takes the
network path) and coded as in a container: g_a over the tile and 16 px of its
neighbours (288²), the tile's 16×16 latents coded.  Reported: whole-codec encode MP/s
and decode MP/s of tiles decoded on their own (``decode_alone``), entropy coding
included; ``decode_stitched_mp_s``: ``wsicodec.decode`` of a whole he/test image, every
tile decoded once and g_s run over its latents joined with 2 latent rows/columns of
each neighbour (20×20, what readers do), and ``decode_stitched_bf16_mp_s`` the same with
``precision="bfloat16"`` (``encode_bf16_mp_s``: encoding with it); and, separately, g_a (288² regions) and g_s (20×20 stitched
windows) alone: eager (the training modules), fast (the channels-last copies with frozen
GDN weights that the codec runs, ``WsiHyperprior.fast_transform``; ``*_fast_bf16``: with their
inner layers in bfloat16) and compiled (``torch.compile`` of the eager modules; compile
time excluded, reported apart).  MP counts the 256² tiles, not the context.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

import wsicodec
from wsicodec.image import context_region
from wsicodec.learned import LearnedCodec
from wsicodec.learned.codec import native_bfloat16


def _tiles(folder: Path, n: int, margin: int):
    regions, boxes = [], []
    for p in sorted(folder.glob("*.png")):
        img = np.asarray(Image.open(p).convert("RGB"))
        for y in range(256, img.shape[0] - 256, 256):
            for x in range(256, img.shape[1] - 256, 256):
                r, b = context_region(img, slice(y, y + 256), slice(x, x + 256), margin)
                regions.append(r)
                boxes.append(b)
                if len(regions) == n:
                    return regions, boxes
    return regions, boxes


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "he" / "test"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quality", type=float, default=4.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tile_speed.json"))
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    codec = LearnedCodec(args.quality)
    regions, boxes = _tiles(Path(args.images), args.batch, codec.context)
    mp = len(regions) * 256 * 256 / 1e6
    codec.encode_tiles(regions, boxes)  # warm-up
    streams = codec.encode_tiles(regions, boxes)
    codec.decode_alone(streams)
    res = {"tiles": len(regions), "tile": 256, "margin": codec.context, "quality": args.quality,
           "threads": args.threads, "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__, "model_sha256": codec.model_id,
           "bytes_per_tile": float(np.mean([len(s) for s in streams]))}
    res["encode_mp_s"] = mp / _best(lambda: codec.encode_tiles(regions, boxes), args.repeats)
    codec16 = LearnedCodec(args.quality, precision="bfloat16")
    codec16.encode_tiles(regions, boxes)
    res["encode_bf16_mp_s"] = mp / _best(lambda: codec16.encode_tiles(regions, boxes), args.repeats)
    res["decode_mp_s"] = mp / _best(lambda: codec.decode_alone(streams), args.repeats)
    img = np.asarray(Image.open(sorted(Path(args.images).glob("*.png"))[0]).convert("RGB"))
    data = wsicodec.encode(img, quality=args.quality)
    wsicodec.decode(data)
    res["decode_stitched_mp_s"] = img.shape[0] * img.shape[1] / 1e6 / _best(
        lambda: wsicodec.decode(data), args.repeats)
    wsicodec.decode(data, precision="bfloat16")
    res["decode_stitched_bf16_mp_s"] = img.shape[0] * img.shape[1] / 1e6 / _best(
        lambda: wsicodec.decode(data, precision="bfloat16"), args.repeats)
    res["cpu_bf16_native"] = native_bfloat16(torch.device("cpu"))

    m = codec.loaded.model
    x = torch.from_numpy(np.stack(regions)).permute(0, 3, 1, 2).float().div(255)
    x = torch.nn.functional.pad(x, (0, (-x.shape[-1]) % 16, 0, (-x.shape[-2]) % 16), mode="replicate")
    with torch.inference_mode():
        y = torch.nn.functional.pad(m.g_a(x)[..., 1:-1, 1:-1], (2, 2, 2, 2), mode="replicate")  # 20×20
        # eager: the training modules; fast: the channels-last frozen-GDN copies the codec runs
        for label, g_a, g_s in (("eager", m.g_a, m.g_s),
                                ("fast", m.fast_transform("g_a", x.device, x.dtype), m.fast_transform("g_s", y.device, y.dtype))):
            res[f"g_a_{label}_mp_s"] = mp / _best(lambda: g_a(x), args.repeats)
            res[f"g_s_{label}_mp_s"] = mp / _best(lambda: g_s(y), args.repeats)
        g_a16 = m.fast_transform("g_a", x.device, x.dtype, bf16_body=True)   # precision="bfloat16"
        g_s16 = m.fast_transform("g_s", y.device, y.dtype, bf16_body=True)
        g_a16(x)
        g_s16(y)
        res["g_a_fast_bf16_mp_s"] = mp / _best(lambda: g_a16(x), args.repeats)
        res["g_s_fast_bf16_mp_s"] = mp / _best(lambda: g_s16(y), args.repeats)
    try:
        t0 = time.perf_counter()
        g_a_c, g_s_c = torch.compile(m.g_a), torch.compile(m.g_s)
        with torch.inference_mode():
            g_a_c(x)
            g_s_c(y)
            res["compile_seconds"] = time.perf_counter() - t0
            res["g_a_compiled_mp_s"] = mp / _best(lambda: g_a_c(x), args.repeats)
            res["g_s_compiled_mp_s"] = mp / _best(lambda: g_s_c(y), args.repeats)
    except Exception as exc:  # report, don't hide: compile depends on a C++ toolchain
        res["compile_error"] = f"{exc.__class__.__name__}: {exc}"[:300]
    for k, v in res.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
