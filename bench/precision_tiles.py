"""Per-tile PSNR of whole containers decoded in float32 and in bfloat16, and the auto floor.

Issue #31 asks whether a CPU with native bfloat16 should decode in bfloat16 by default.
``bench/README.md`` ("Precision") measured bfloat16 on he/test images; this measures it on
whole containers as readers decode them (every level, stitched, ``Container.read_tiles``
row by row) and checks the ``auto`` codec's promise: each tile's recorded PSNR is what a
reader shows, and at least ``--min-psnr``::

    slide ─► plan_pyramid / iter_strips (the pixels compress coded) ─► source tiles
    container ─► open_container(precision=P).read_tiles, P = float32, bfloat16 ─► PSNR
        per tile against its source tile (over its part inside the level)
    ─► per container: max |ΔPSNR| (bfloat16 − float32), tiles moved > 0.02 dB, and for an
       auto container: tiles whose bfloat16 PSNR falls under the floor or under their
       recorded PSNR − READER_SLACK_DB, float32's agreement with the records

Run from the repository root (containers as ``wsicodec compress SLIDE OUT --codec C`` makes
them; a container and its slide alternate on the command line)::

    PYTHONPATH=$PWD .venv/bin/python bench/precision_tiles.py \\
        /tmp/cmu_learned.zarr.zip ../shared/data/slides/cmu_small_region.svs \\
        /tmp/cmu_auto.zarr.zip ../shared/data/slides/cmu_small_region.svs \\
        --out bench/results/precision_tiles.json

Speed: ``bench/decode_ab.py`` (interleaved ``wsicodec decompress`` in both precisions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.report import cpu_model, git_state, log, write_json  # noqa: E402

SCHEMA = "wsicodec-precision-tiles/1"
PRECISIONS = ("float32", "bfloat16")
MOVED_DB = 0.02


def source_tiles(slide: str, tile_size: int) -> dict[tuple[int, int, int], np.ndarray]:
    """(level, col, row) → the source pixels compress coded for that tile (unpadded)."""
    from wsicodec.tiling import iter_strips, open_source, plan_pyramid

    out = {}
    with open_source(slide) as src:
        plan = plan_pyramid(src.level_dimensions, src.level_downsamples, tile_size)
        for strip in iter_strips(src, plan):
            w = strip.pixels.shape[1]
            for col in range(-(-w // tile_size)):
                x = col * tile_size
                out[(strip.level, col, strip.row)] = np.ascontiguousarray(
                    strip.pixels[:, x:x + tile_size, :3])
    return out


def decoded_psnrs(container: str, sources: dict, precision: str) -> dict[tuple[int, int, int], float]:
    """(level, col, row) → PSNR of the tile as ``open_container(precision=...)`` decodes it."""
    from wsicodec.container import open_container
    from wsicodec.learned.jxlfit import tile_psnr

    out = {}
    with open_container(container, precision=precision) as c:
        for level in range(c.level_count):
            g = c.grid(level)
            for row in range(g.rows):
                keys = [(col, row) for col in range(g.cols)]
                for (col, _), px in zip(keys, c.read_tiles(level, keys)):
                    ref = sources[(level, col, row)]
                    out[(level, col, row)] = tile_psnr(px, ref, ref.shape[:2])
    return out


def records(container: str) -> tuple[dict, float | None, dict]:
    """(recorded PSNR and kind by (level, col, row), the floor, the codec's config) of an
    auto container; empty and None for a container without a fidelity map."""
    from wsicodec.container import open_container

    rec = {}
    with open_container(container) as c:
        cfg = dict(c.metadata.codec.get("configuration") or {})
        for level in range(c.level_count):
            r = c.tile_records(level)
            if r is None:
                continue
            rows, cols = r.shape
            for row in range(rows):
                for col in range(cols):
                    rec[(level, col, row)] = (float(r.psnr[row, col]),
                                              r.kind_names[int(r.kind[row, col])])
    floor = cfg.get("min_psnr")
    return rec, (float(floor) if floor is not None and rec else None), cfg


def compare(container: str, slide: str) -> dict:
    from wsicodec.container import open_container

    with open_container(container) as c:
        tile_size, codec = c.metadata.tile_size, c.metadata.codec.get("name")
    sources = source_tiles(slide, tile_size)
    psnr = {}
    for p in PRECISIONS:
        t0 = time.perf_counter()
        psnr[p] = decoded_psnrs(container, sources, p)
        log(f"  {Path(container).name} {p}: {len(psnr[p])} tiles in {time.perf_counter() - t0:.1f} s")
    rec, floor, cfg = records(container)
    per_tile = {f"{lv}/{col}/{row}": {p: psnr[p][(lv, col, row)] for p in PRECISIONS}
                | ({"recorded": rec[(lv, col, row)][0], "kind": rec[(lv, col, row)][1]}
                   if (lv, col, row) in rec else {})
                for (lv, col, row) in sorted(psnr["float32"])}
    return {"container": str(container), "slide": str(slide), "codec": codec,
            "configuration": cfg} | summarise(per_tile, floor) | {"per_tile": per_tile}


def summarise(per_tile: dict, floor: float | None) -> dict:
    """What :func:`compare` reports of ``per_tile`` ("level/col/row" → PSNR in each
    precision, and for an auto container the recorded PSNR and kind); ``floor``: the auto
    container's ``min_psnr`` (None for another codec)."""
    from wsicodec.learned.choice import READER_SLACK_DB

    def ok(x: float | None) -> bool:
        return x is not None and bool(np.isfinite(x))

    finite = [k for k, v in per_tile.items() if ok(v["float32"]) and ok(v["bfloat16"])]
    delta = {k: per_tile[k]["bfloat16"] - per_tile[k]["float32"] for k in finite}
    changed = [k for k in finite if delta[k] != 0.0]
    out = {"tiles": len(per_tile), "tiles_finite": len(finite), "tiles_changed": len(changed),
           "max_abs_delta_db": max((abs(delta[k]) for k in finite), default=0.0),
           "min_delta_db": min((delta[k] for k in finite), default=0.0),
           "max_delta_db": max((delta[k] for k in finite), default=0.0),
           "mean_delta_changed_db": float(np.mean([delta[k] for k in changed])) if changed else 0.0,
           f"tiles_moved_over_{MOVED_DB}_db": sum(abs(delta[k]) > MOVED_DB for k in finite),
           "tiles_lowered": sum(delta[k] < 0 for k in finite),
           "tiles_raised": sum(delta[k] > 0 for k in finite),
           f"tiles_lowered_over_{MOVED_DB}_db": sum(delta[k] < -MOVED_DB for k in finite)}
    if floor is None:
        return out
    keys = [k for k in finite if ok(per_tile[k].get("recorded"))]
    rec = {k: per_tile[k]["recorded"] for k in keys}
    below = {p: [k for k in keys if per_tile[k][p] < floor] for p in PRECISIONS}
    kinds: dict[str, list[str]] = {}
    for k in keys:
        kinds.setdefault(per_tile[k]["kind"], []).append(k)
    out["auto"] = {
        "floor_db": floor, "reader_slack_db": READER_SLACK_DB,
        "float32_vs_recorded_max_abs_db": max((abs(per_tile[k]["float32"] - rec[k]) for k in keys),
                                              default=0.0),
        "tiles_under_floor": {p: len(below[p]) for p in PRECISIONS},
        "under_floor": below,
        "tiles_under_recorded_minus_slack": {
            p: sum(per_tile[k][p] < rec[k] - READER_SLACK_DB for k in keys) for p in PRECISIONS},
        "by_kind": {kind: {"tiles": len(ks),
                           "min_delta_db": min(delta[k] for k in ks),
                           "max_abs_delta_db": max(abs(delta[k]) for k in ks),
                           f"moved_over_{MOVED_DB}_db": sum(abs(delta[k]) > MOVED_DB for k in ks),
                           "min_margin_over_floor_db": {p: min(per_tile[k][p] - floor for k in ks)
                                                        for p in PRECISIONS}}
                    for kind, ks in sorted(kinds.items())},
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pairs", nargs="+", help="CONTAINER SLIDE [CONTAINER SLIDE ...]")
    ap.add_argument("--out", default=str(REPO / "bench/results/precision_tiles.json"))
    ap.add_argument("--summarise", action="store_true",
                    help="no decoding: recompute the summaries of an existing --out JSON")
    args = ap.parse_args(argv)
    if len(args.pairs) % 2:
        ap.error("give containers and slides in pairs")
    import torch

    pairs = list(zip(args.pairs[::2], args.pairs[1::2]))
    load_before = os.getloadavg()
    if args.summarise:
        result = json.loads(Path(args.out).read_text())
        for n, r in enumerate(result["containers"]):
            keep = {k: r[k] for k in ("container", "slide", "codec", "configuration")}
            floor = (r.get("auto") or {}).get("floor_db")
            result["containers"][n] = keep | summarise(r["per_tile"], floor) | {"per_tile": r["per_tile"]}
        write(result, Path(args.out))
        return 0
    result = {"schema": SCHEMA, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "cpu": cpu_model(), "cpu_count": os.cpu_count(), "git": git_state(REPO, ("wsicodec", "bench/precision_tiles.py")),

              "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "moved_threshold_db": MOVED_DB, "load_average_before": load_before,
              "containers": [compare(c, s) for c, s in pairs]}
    result["load_average_after"] = os.getloadavg()
    write(result, Path(args.out))
    return 0


def write(result: dict, out: Path) -> None:
    """``result`` to ``out``, and a line per container to stderr."""
    write_json(out, result, indent=1)
    for r in result["containers"]:
        line = (f"{Path(r['container']).name}: {r['tiles']} tiles, {r['tiles_changed']} changed, "
                f"max |Δ| {r['max_abs_delta_db']:.4f} dB, >{MOVED_DB} dB: "
                f"{r[f'tiles_moved_over_{MOVED_DB}_db']}")
        if "auto" in r:
            a = r["auto"]
            line += (f"; floor {a['floor_db']}: under it {a['tiles_under_floor']}, under recorded-slack "
                     f"{a['tiles_under_recorded_minus_slack']}, f32 vs recorded "
                     f"{a['float32_vs_recorded_max_abs_db']:.4f}; by kind {a['by_kind']}")
        log(line)


if __name__ == "__main__":
    raise SystemExit(main())
