"""Where the learned codec's bytes go, and how close its entropy coding is to the model.

    python bench/rate_budget.py [--images ../shared/data/he/test] [--max-images 14]
                                [--qualities 1 2 3 4 5 6 7 8] [--out bench/results/rate_budget.json]

Each image goes through ``wsicodec.encode`` (what ``bench/rd.py`` measures), and its
bytes are split, from the stream itself, into

* ``stream``: the image stream's header and tile table (52 bytes + 8 per tile);
* ``header``: the 36-byte headers of network-coded tiles;
* ``z`` and ``y``: their two rANS streams;
* ``glass``: whole background tiles (kinds 1 and 3).

Then, per network tile, the y symbols and their CDF-table indexes (``bench/tilecode.py``,
which gives the codec's exact streams: checked here byte for byte) are priced as ideal
code lengths, −log2 of the discretised Gaussian's mass: with the table's σ (what the coder
is given) and with h_s's own σ before it is rounded up to the 64-entry table. Their ratios
say what the coder loses against its model (``y_bytes / ideal_table``: rANS precision,
tails, flushes) and what the table loses against h_s (``ideal_table / ideal_exact``).
Rates from the actual bytes; mean over images.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import tilecode  # noqa: E402
import wsicodec  # noqa: E402
from wsicodec.checkpoint import load_model  # noqa: E402
from wsicodec.image import read_stream  # noqa: E402
from wsicodec.learned import GLASS_KINDS, NETWORK_HEADER_BYTES, parse_header  # noqa: E402
from wsicodec.learned.network import SCALES_MIN  # noqa: E402


def ideal_bits(symbols: torch.Tensor, sigma: torch.Tensor) -> float:
    """−log2 P(s) summed, under the zero-mean Gaussian of σ discretised to unit bins (float64)."""
    s, sig = symbols.to(torch.float64), sigma.to(torch.float64)
    r2 = math.sqrt(2.0)
    # mass of [|s| − ½, |s| + ½] from complementary error functions (keeps the tails)
    a, b = (s.abs() - 0.5).clamp_min(0) / sig, (s.abs() + 0.5) / sig
    mass = 0.5 * (torch.special.erfc(a / r2) - torch.special.erfc(b / r2))
    mass = torch.where(s == 0, 1 - torch.special.erfc(0.5 / sig / r2), mass)
    return float(-torch.log2(mass.clamp_min(1e-300)).sum())


def split_stream(data: bytes) -> dict[str, int]:
    """Bytes of one ``wsicodec.encode`` stream by part (see the module docstring)."""
    st = read_stream(data)
    out = {"stream": len(data) - sum(len(t) for t in st.tiles), "header": 0, "z": 0, "y": 0, "glass": 0,
           "network_tiles": 0, "glass_tiles": 0}
    for t in st.tiles:
        hd = parse_header(t)
        if hd.kind in GLASS_KINDS:
            out["glass"] += len(t)
            out["glass_tiles"] += 1
        else:
            out["header"] += hd.payload
            out["z"] += hd.z_len
            out["y"] += len(t) - hd.payload - hd.z_len
            out["network_tiles"] += 1
    return out


@torch.inference_mode()
def model_prices(model, tables, img: np.ndarray, quality: float) -> dict[str, float]:
    """y stream bytes (as coded) and ideal y bits with the table's and h_s's own σ."""
    h_s64 = model.h_s_float64()
    q = torch.tensor([float(quality)])
    _, hgain = model.gains(q, torch.float64)
    medians = model.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1).double()
    table = model.gaussian_conditional.scale_table.to(torch.float64)
    out = {"y": 0, "ideal_table_bits": 0.0, "ideal_exact_bits": 0.0}
    for t in tilecode.tiles(model, tables, img, quality):
        if isinstance(t, tilecode.Glass):
            continue
        s = torch.round(t.y - t.mu)
        out["y"] += tilecode.stream_bytes(s[0], t.index[0], tables[1])
        out["ideal_table_bits"] += ideal_bits(s, table[t.index.long()])
        z = model.hyper_analysis(t.y.float(), q, 4)
        z_hat = torch.round(z.double() - medians) + medians
        sigma = h_s64(z_hat / hgain)[..., :s.shape[-2], :s.shape[-1]].chunk(2, 1)[0]
        out["ideal_exact_bits"] += ideal_bits(s, sigma.clamp_min(SCALES_MIN))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "he" / "test"))
    ap.add_argument("--max-images", type=int, default=14)
    ap.add_argument("--qualities", type=float, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rate_budget.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    paths = sorted(Path(args.images).glob("*.png"))[:args.max_images]
    if not paths:
        print(f"rate_budget: no PNG images in {args.images}", file=sys.stderr)
        return 2
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    loaded = load_model()
    model, tables = loaded.model.eval(), loaded.model.coding_tables()
    t0 = time.time()
    rows = []
    for q in args.qualities:
        parts: dict[str, float] = {}
        pixels = 0
        for img in images:
            data = wsicodec.encode(img, quality=q)
            split = split_stream(data)
            priced = model_prices(model, tables, img, q)
            if priced["y"] != split["y"]:
                raise SystemExit(f"rate_budget: tilecode's y streams ({priced['y']} bytes) are not the "
                                 f"codec's ({split['y']}): the experiment path has drifted from the codec")
            assert sum(split[k] for k in ("stream", "header", "z", "y", "glass")) == len(data)
            for k, v in {**split, **priced, "bytes": len(data)}.items():
                parts[k] = parts.get(k, 0) + v
            pixels += img.shape[0] * img.shape[1]
        total = parts["bytes"]
        row = {"quality": q, "bpp": 8 * total / pixels,
               "share": {k: parts[k] / total for k in ("stream", "header", "z", "y", "glass")},
               "bytes": {k: int(parts[k]) for k in ("bytes", "stream", "header", "z", "y", "glass")},
               "network_tiles": int(parts["network_tiles"]), "glass_tiles": int(parts["glass_tiles"]),
               "y_bytes_over_ideal_table": 8 * parts["y"] / parts["ideal_table_bits"],
               "ideal_table_over_exact_sigma": parts["ideal_table_bits"] / parts["ideal_exact_bits"]}
        rows.append(row)
        s = row["share"]
        print(f"q{q:g}: {row['bpp']:.4f} bpp; stream table {100 * s['stream']:.2f} %, tile headers "
              f"{100 * s['header']:.2f} %, z {100 * s['z']:.2f} %, y {100 * s['y']:.2f} %, glass "
              f"{100 * s['glass']:.2f} %; y coded / ideal {row['y_bytes_over_ideal_table']:.4f}, "
              f"table σ / h_s σ {row['ideal_table_over_exact_sigma']:.4f}", flush=True)
    result = {"images": [p.name for p in paths], "folder": args.images, "model_id": loaded.model_id,
              "header_bytes_per_network_tile": NETWORK_HEADER_BYTES, "rows": rows,
              "environment": {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
                              "torch": torch.__version__, "threads": args.threads,
                              "seconds": round(time.time() - t0, 1)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
