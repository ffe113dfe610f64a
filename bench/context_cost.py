"""What a checkerboard context model would add to the decode of one tile.

    python bench/context_cost.py [--threads 1] [--out bench/results/context_cost.json]

A parallel context model (checkerboard, He et al. 2021; ELIC's channel groups build on
it) splits the latent into anchors and non-anchors: the anchors are coded with the
hyperprior alone, the non-anchors with a 5×5 context over the decoded anchors, and an
entropy-parameter network merges context and hyperprior.  In wsicodec everything that
decides symbols runs in float64 on the CPU, per tile (since tile format 2 on exact
integers, ``ExactHyperSynthesis``: that is how encoder and decoder agree across
machines), so those layers would run there too.  This measures their cost for one 256²
tile with its 8 px margin (latent 17×17, M = 128), beside the float64 h_s the
hyperprior already pays (the exact form costs the same float64 convolutions), with
random weights (the cost does not depend on them) and with the 1×1 layers as plain
matrix products (the cheapest float64 form).
It answers the decode-cost half of "does a context model pay for itself"; the
rate-distortion half needs a trained context model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]


def _p50_ms(fn, repeats: int = 15) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return round(sorted(ts)[len(ts) // 2] * 1e3, 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "context_cost.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from wsicodec.checkpoint import load_model

    model = load_model().model
    M, h, w = model.config.M, 17, 17
    g = torch.Generator().manual_seed(0)
    h_s64 = model.h_s_float64()
    z = torch.randn(1, model.config.N, 5, 5, generator=g, dtype=torch.float64).round()
    ctx = nn.Conv2d(M, 2 * M, 5, padding=2).double()
    widths = (4 * M, 640, 512, 2 * M)            # ELIC/He et al. entropy-parameter 1×1 stack
    ep = nn.Sequential(nn.Conv2d(widths[0], widths[1], 1), nn.LeakyReLU(),
                       nn.Conv2d(widths[1], widths[2], 1), nn.LeakyReLU(),
                       nn.Conv2d(widths[2], widths[3], 1)).double()
    mats = [(layer.weight[:, :, 0, 0].t().contiguous(), layer.bias) for layer in ep if isinstance(layer, nn.Conv2d)]
    y = torch.randn(1, M, h, w, generator=g, dtype=torch.float64)
    hyper = torch.randn(1, 2 * M, h, w, generator=g, dtype=torch.float64)

    def ep_mm(x: torch.Tensor) -> torch.Tensor:
        v = x[0].reshape(x.shape[1], -1).t()
        for i, (wt, b) in enumerate(mats):
            v = torch.addmm(b, v, wt)
            if i < len(mats) - 1:
                v = torch.nn.functional.leaky_relu(v)
        return v.t().reshape(1, -1, h, w)

    def checkerboard(ep_fn) -> None:
        ep_fn(torch.cat([torch.zeros_like(hyper), hyper], 1))   # pass 1: anchors, no context
        ep_fn(torch.cat([ctx(y), hyper], 1))                    # pass 2: non-anchors

    res = {
        "what": "float64 CPU cost per 256² tile (latent 17×17, M=128) of the symbol-deciding path",
        "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "hyperprior_h_s_ms": _p50_ms(lambda: h_s64(z)),
        "checkerboard_extra_ms_conv": _p50_ms(lambda: checkerboard(ep)),
        "checkerboard_extra_ms_matmul": _p50_ms(lambda: checkerboard(ep_mm)),
        "context_conv_5x5_ms": _p50_ms(lambda: ctx(y)),
    }
    for k, v in res.items():
        print(f"{k}: {v}")
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
