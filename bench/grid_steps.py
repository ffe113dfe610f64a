"""Does the tile grid show on the glass?  Grey steps across tile borders in flat, bright areas.

    python bench/grid_steps.py CONTAINER [CONTAINER ...] [--out bench/results/grid_steps.json]

A viewer at low zoom shows the background (glass) of a slide; where a tile stored as a
flat colour meets a textured or differently coloured neighbour, the border shows as a
faint grid that PSNR near borders misses (it is a few grey levels over large flat
areas).  For every level of each container this reads the whole level through
``wsicodec.open_slide`` and compares, between horizontally and vertically adjacent
pixels, the mean absolute grey step (grey = mean of R, G, B) across tile borders with
the same step between pixel pairs inside tiles, both only where the pair lies in a
bright, flat area (grey >= ``--bright`` on both sides and a local 5x5 standard deviation
<= ``--flat`` levels away from the border itself).  A step ratio (border / inside) near
1 means no visible grid.  The tile size is the container's.  Each level also reports its
tiles' bytes and, for the learned codec, its glass tiles (kinds 1, 3 and 4) and their bytes.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def grid_steps(rgb: np.ndarray, tile: int, bright: float = 200.0, flat: float = 3.0) -> dict:
    """Mean absolute grey step across tile borders and inside tiles, in flat bright areas.

    ``rgb``: (H, W, 3) or (H, W, 4) uint8 (alpha ignored).  Pairs (x-1, x) with x a
    multiple of ``tile`` are border pairs (and the same for rows).  A pair counts when
    both pixels are >= ``bright`` and the local standard deviation of grey, measured
    two pixels away from the pair on each side (so that the step itself does not make
    the area look textured), is <= ``flat``.
    """
    from wsicodec.learned.j2kfit import local_std

    g = rgb[..., :3].astype(np.float64).mean(axis=2)
    sd = local_std(g)
    out = {"border_sum": 0.0, "border_n": 0, "inside_sum": 0.0, "inside_n": 0}
    for axis in (1, 0):
        a = g if axis == 1 else g.T
        s = sd if axis == 1 else sd.T
        if a.shape[1] < 6:
            continue
        x = np.arange(3, a.shape[1] - 2)               # pairs (x-1, x)
        step = np.abs(a[:, x] - a[:, x - 1])
        ok = ((a[:, x] >= bright) & (a[:, x - 1] >= bright)
              & (s[:, x + 2] <= flat) & (s[:, x - 3] <= flat))
        border = (x % tile) == 0
        out["border_sum"] += float(step[:, border][ok[:, border]].sum())
        out["border_n"] += int(ok[:, border].sum())
        out["inside_sum"] += float(step[:, ~border][ok[:, ~border]].sum())
        out["inside_n"] += int(ok[:, ~border].sum())
    out["border_step"] = out["border_sum"] / out["border_n"] if out["border_n"] else None
    out["inside_step"] = out["inside_sum"] / out["inside_n"] if out["inside_n"] else None
    out["ratio"] = (out["border_step"] / out["inside_step"]
                    if out["border_step"] is not None and out["inside_step"] else None)
    return out


def tile_bytes(container: Path, level: int) -> dict:
    """Bytes of a level's tiles, and for the learned codec how many are glass (kinds 1,
    3 and 4) and their bytes: what the glass costs."""
    from wsicodec.container import open_container

    out = {"tiles": 0, "tile_bytes": 0, "glass_tiles": 0, "glass_bytes": 0, "glass_kinds": {}}
    with open_container(container) as c:
        for _, _, data in c.iter_encoded_tiles(level):
            out["tiles"] += 1
            out["tile_bytes"] += len(data)
            if data[:4] == b"WSLT" and len(data) > 5 and data[5] in (1, 3, 4):
                out["glass_tiles"] += 1
                out["glass_bytes"] += len(data)
                out["glass_kinds"][str(data[5])] = out["glass_kinds"].get(str(data[5]), 0) + 1
    out["glass_bytes_per_tile"] = out["glass_bytes"] / out["glass_tiles"] if out["glass_tiles"] else None
    return out


def measure(container: Path, bright: float, flat: float) -> dict:
    import wsicodec

    rows = []
    with wsicodec.open_slide(container) as slide:
        tile = int(slide.properties.get("openslide.level[0].tile-width", 256))
        for level, (w, h) in enumerate(slide.level_dimensions):
            t0 = time.perf_counter()
            ds = slide.level_downsamples[level]
            rgb = np.asarray(slide.read_region((0, 0), level, (w, h)))
            r = grid_steps(rgb, tile, bright, flat)
            r.update(level=level, width=w, height=h, downsample=ds,
                     seconds=round(time.perf_counter() - t0, 2))
            r.update(tile_bytes(container, level))
            rows.append(r)
            print(f"{container.name} level {level}: border step {r['border_step']} "
                  f"inside {r['inside_step']} (n {r['border_n']} / {r['inside_n']})", flush=True)
    return {"container": container.name, "tile_size": tile, "container_bytes": container.stat().st_size
            if container.is_file() else None, "levels": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("containers", nargs="+", type=Path)
    ap.add_argument("--bright", type=float, default=200.0, help="grey level of glass (0-255)")
    ap.add_argument("--flat", type=float, default=3.0, help="max local std of grey, levels")
    ap.add_argument("--out", type=Path, default=Path("bench/results/grid_steps.json"))
    ap.add_argument("--note", default="", help="a line on what the containers are, kept in the output")
    args = ap.parse_args(argv)
    result = {"what": __doc__.split("\n")[0], "note": args.note, "bright": args.bright, "flat": args.flat,
              "cpu": platform.processor() or platform.machine(),
              "results": [measure(c, args.bright, args.flat) for c in args.containers]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
