"""g_s computed only where a tile's pixels depend on it, against the whole window, in one run.

A stitched 256² tile is decoded from a 20×20 latent window (its own 16×16 and a 2-latent
ring of its neighbours') whose g_s output is 320² px, of which the tile keeps the middle
256².  ``FastTransform.forward(y, box)`` (wsicodec/learned/fast.py) computes each layer
only where that box depends on it.  This script times both ways, alternated round by
round in one process (absolute times drift between runs on a shared machine; the ratios
within a run are the result):

- ``g_s``: one g_s pass over 20×20 windows at batch 1 and 16 (random latents at g_a's
  scale), ms per tile, and how many of the output values the two ways differ in;
- ``cold_tile``: ``read_region`` of a 256² tile with both caches off (its 8 neighbours
  entropy-decoded too), p50 over the container's first network tiles;
- ``level0``: every tile of level 0 decoded by ``BatchDecoder`` (caches off), MP/s.

The whole-window way is the same code with :func:`wsicodec.learned.fast.crop_plan`
answering None (what the decoder did before), so only the cropping differs.

    PYTHONPATH=$PWD .venv/bin/python bench/gs_crop.py CONTAINER --out bench/results/gs_crop.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import log, run_environment, write_json  # noqa: E402

WAYS = ("whole", "box")


@contextmanager
def whole_window(on: bool) -> Iterator[None]:
    """g_s over the whole window (``on``) or only the box (the decoder's way)."""
    from wsicodec.learned import fast
    plan = fast.crop_plan
    if on:
        fast.crop_plan = lambda *a, **k: None
    try:
        yield
    finally:
        fast.crop_plan = plan


def alternated(rounds: int, once: Callable[[str], list[float]]) -> dict[str, float]:
    """``once(way)`` (the times it measured) for both ways each round, the way that goes
    first alternating; the median time of each way."""
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for r in range(rounds):
        for way in (WAYS if r % 2 == 0 else WAYS[::-1]):
            with whole_window(way == "whole"):
                times[way] += once(way)
    return {way: statistics.median(v) for way, v in times.items()}


def time_g_s(model: Any, batch: int, rounds: int) -> dict[str, Any]:
    import torch
    g_s = model.fast_transform("g_s", torch.device("cpu"), torch.float32)
    y = torch.randn(batch, model.config.M, 20, 20, generator=torch.Generator().manual_seed(batch)) * 2
    box = (32, 32, 256, 256)
    outs = {}

    def once(way: str) -> list[float]:
        t0 = time.perf_counter()
        outs[way] = g_s(y, box)
        return [(time.perf_counter() - t0) / batch * 1e3]

    with torch.inference_mode():
        alternated(1, once)                                 # warm both up
        med = alternated(rounds, once)
        pixels = {k: v.clamp(0, 1).mul(255).round() for k, v in outs.items()}
    return {"batch": batch, "rounds": rounds, "ms_per_tile_whole": round(med["whole"], 2),
            "ms_per_tile_box": round(med["box"], 2), "speedup": round(med["whole"] / med["box"], 3),
            "values_differing": int((outs["whole"] != outs["box"]).sum()),
            "pixel_levels_differing": int((pixels["whole"] != pixels["box"]).sum()),
            "values": int(outs["box"].numel())}


def time_cold(path: Path, tiles: int, rounds: int) -> dict[str, Any]:
    from bench.serve import network_tiles
    from wsicodec.batch import DecoderSettings
    from wsicodec.container import open_container
    from wsicodec.slide import WsiSlide

    c = open_container(path)
    keys = network_tiles(c)[:tiles]
    t = c.tile_size
    slide = WsiSlide(c, DecoderSettings(cache_bytes=0, latent_cache_bytes=0))
    slide.read_region((keys[0][0] * t, keys[0][1] * t), 0, (t, t))    # load the model
    first: dict[tuple[int, int], np.ndarray] = {}
    same = [True]

    def once(way: str) -> list[float]:
        times = []
        for col, row in keys:
            t0 = time.perf_counter()
            px = np.asarray(slide.read_region((col * t, row * t), 0, (t, t)))
            times.append((time.perf_counter() - t0) * 1e3)
            same[0] = same[0] and np.array_equal(first.setdefault((col, row), px), px)
        return times

    med = alternated(rounds, once)
    slide.close()
    return {"tiles": len(keys), "rounds": rounds, "p50_ms_whole": round(med["whole"], 1),
            "p50_ms_box": round(med["box"], 1), "speedup": round(med["whole"] / med["box"], 3),
            "pixels_identical": same[0]}


def time_level0(path: Path, rounds: int) -> dict[str, Any]:
    from bench.serve import network_tiles
    from wsicodec.batch import BatchDecoder, DecoderSettings
    from wsicodec.container import open_container

    c = open_container(path)
    grid = c.grid(0)
    keys = [(col, row) for row in range(grid.rows) for col in range(grid.cols)]
    mp = grid.width * grid.height / 1e6
    network = len(network_tiles(c))
    dec = BatchDecoder(c, DecoderSettings(cache_bytes=0, latent_cache_bytes=0))
    dec.decode(0, keys[:1])

    def once(way: str) -> list[float]:
        t0 = time.perf_counter()
        dec.decode(0, keys)
        return [time.perf_counter() - t0]

    med = alternated(rounds, once)
    dec.close()
    c.close()
    return {"tiles": len(keys), "network_tiles": network, "megapixels": round(mp, 3),
            "rounds": rounds, "s_whole": round(med["whole"], 2), "s_box": round(med["box"], 2),
            "mp_s_whole": round(mp / med["whole"], 3), "mp_s_box": round(mp / med["box"], 3),
            "speedup": round(med["whole"] / med["box"], 3)}


def main(argv: list[str] | None = None) -> int:
    import os

    import torch
    torch.set_flush_denormal(True)
    from wsicodec.checkpoint import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("container", type=Path, help="a --codec learned container (e.g. of cmu_small_region.svs)")
    ap.add_argument("--tiles", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gs_crop.json")
    args = ap.parse_args(argv)
    loaded = load_model()
    env = {**run_environment(REPO, ("torch", "numpy")), "torch_threads": torch.get_num_threads(),
           "loadavg_start": os.getloadavg(), "model_id": loaded.model_id}
    out = {"what": __doc__.split("\n")[0], "container": str(args.container), "environment": env,
           "g_s": [time_g_s(loaded.model, b, args.rounds) for b in (1, 16)],
           "cold_tile": time_cold(args.container, args.tiles, args.rounds),
           "level0": time_level0(args.container, max(2, args.rounds // 2))}
    env["loadavg_end"] = os.getloadavg()
    write_json(args.out, out, indent=1)
    for part in ("g_s", "cold_tile", "level0"):
        log(f"{part}: {out[part]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
