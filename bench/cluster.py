"""compress-many's throughput on this machine: one process, a local Dask cluster of 1 and of 2
workers (one thread each), the scheduler's per-task overhead and the client's assembly
cost, all in one run -> bench/results/cluster.json (the N-node projection in
bench/README.md and docs/cluster.md is computed from these numbers).

    PYTHONPATH=$PWD .venv/bin/python bench/cluster.py [--slide ../shared/data/slides/cmu_small_region.svs]

Each codec's run: ``compress`` in this process (its default threads), then the same slide
through :class:`wsicodec.cluster.Run` on a LocalCluster of 1 and 2 workers, each warmed
first (the codec built on every worker) on the small slide.  Outputs are checked tile for
tile against the single-process one.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLIDES = ROOT.parent / "shared" / "data" / "slides"


def tiles_of(path: Path) -> list[bytes]:
    from wsicodec.container import open_container

    with open_container(path) as c:
        return [c.read_encoded_tile(lv, col, row) for lv in range(len(c.metadata.levels))
                for row in range(c.grid(lv).rows) for col in range(c.grid(lv).cols)]


def cluster_run(client, slide: Path, out: Path, name: str, quality, options: dict,
                task_tiles: int):
    """Seconds of one compress-many run of ``slide`` on ``client``, and its report."""
    from wsicodec import get_codec
    from wsicodec.cluster import CodecSpec, Run, assign_names

    spec = CodecSpec(name, quality, tuple(sorted(options.items())))
    codec = get_codec(name, quality, **options)
    out.mkdir(parents=True, exist_ok=True)
    jobs = assign_names([slide], out)
    t0 = time.perf_counter()
    reports = Run(client, jobs, spec, codec, task_tiles=task_tiles,
                  compress_kwargs={"tile_size": 256, "overwrite": True}).run()
    dt = time.perf_counter() - t0
    assert reports[0].status == "done", reports[0]
    return dt, reports[0]


def task_overhead(client, n: int = 400) -> dict:
    """Round trip of ``n`` empty tasks submitted at once: per-task cost and tasks/s."""
    from operator import add

    client.gather(client.map(add, range(20), range(20), pure=False))    # warm
    t0 = time.perf_counter()
    client.gather(client.map(add, range(n), range(n), pure=False))
    dt = time.perf_counter() - t0
    return {"tasks": n, "seconds": dt, "ms_per_task": 1000 * dt / n, "tasks_per_s": n / dt}


def assembly_cost(container: Path, slide: Path, out: Path, codec) -> dict:
    """The client's part alone: ``compress`` of ``slide`` whose rows are the stored rows of
    ``container`` (no coding, no associated images): opening the slide, write_row (zarr
    chunks, CRCs, digests, journal), commit (zip, rename)."""
    from wsicodec.container import open_container
    from wsicodec.pipeline import compress, row_records

    with open_container(container) as c:
        rows = {(lv, r): [c.read_encoded_tile(lv, col, r) for col in range(c.grid(lv).cols)]
                for lv in range(len(c.metadata.levels)) for r in range(c.grid(lv).rows)}
        recs = {lv: c.tile_records(lv) for lv in range(len(c.metadata.levels))}

    spent = {"write_rows_s": 0.0}

    def replay(writer, source, plan, codec, done, progress):
        t = time.perf_counter()
        for (lv, r), tiles in rows.items():
            rec = None
            if recs[lv] is not None:
                m = recs[lv]
                rec = [(m.kind_names[m.kind[r, col]], float(m.psnr[r, col]))
                       for col in range(len(tiles))]
            writer.write_row(lv, r, tiles, **row_records(codec, rec))
        spent["write_rows_s"] = time.perf_counter() - t

    t0 = time.perf_counter()
    res = compress(slide, out, codec, overwrite=True, encode_rows=replay, associated="none")
    dt = time.perf_counter() - t0
    return {"tiles": res.tiles, "seconds": dt, "ms_per_tile": 1000 * dt / res.tiles,
            "write_rows_ms_per_tile": 1000 * spent["write_rows_s"] / res.tiles,
            "tile_mb": res.tile_bytes / 1e6, "note": "associated images left out"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slide", type=Path, default=SLIDES / "cmu_small_region.svs")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cluster.json")
    args = ap.parse_args()

    import os

    import torch
    from distributed import Client, LocalCluster

    from wsicodec import compress, get_codec
    from wsicodec.cluster.bands import DEFAULT_TASK_TILES, plan_tasks
    from wsicodec.tiling import open_source, plan_pyramid

    warm = SLIDES / "small_HE_levels.tiff"
    codecs = [("jpegxl", None, {}), ("auto", None, {})]
    result: dict = {"slide": args.slide.name, "task_tiles": DEFAULT_TASK_TILES,
                    "cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch_threads_single_process": torch.get_num_threads(), "codecs": {}}
    with open_source(args.slide) as src:
        w, h = src.level_dimensions[0]
        plan = plan_pyramid(src.level_dimensions, src.level_downsamples, 256)
    mp = w * h / 1e6
    result["level0_mp"], result["tiles"] = mp, plan.tile_count
    result["load_average_before"] = os.getloadavg()   # other jobs share these cores
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, quality, options in codecs:
            codec = get_codec(name, quality, **options)
            rows = {(lv.index, r) for lv in plan.levels for r in range(lv.grid.rows)}
            tasks = plan_tasks(plan, rows, DEFAULT_TASK_TILES, codec.level_encoder(0) is not None)
            coded_rows = sum(min(s.hi + 1, plan.levels[s.level].grid.rows) - max(s.lo - 1, 0)
                             for t in tasks for s in t) if codec.level_encoder(0) else len(rows)
            entry: dict = {"tasks": len(tasks), "rows": len(rows), "rows_coded_with_halo": coded_rows}
            single = tmp / f"single-{name}.zarr.zip"
            t0, c0 = time.perf_counter(), time.process_time()
            compress(args.slide, single, codec, overwrite=True)
            entry["single_process_s"] = time.perf_counter() - t0
            entry["single_process_cpu_s"] = time.process_time() - c0
            ref = tiles_of(single)
            for n in (1, 2):
                with LocalCluster(n_workers=n, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address=None) as lc, Client(lc) as client:
                    cluster_run(client, warm, tmp / f"warm{n}", name, quality, options, DEFAULT_TASK_TILES)
                    out = tmp / f"w{n}-{name}"
                    entry[f"workers_{n}_s"], rep = cluster_run(client, args.slide, out, name,
                                                               quality, options, DEFAULT_TASK_TILES)
                    entry[f"workers_{n}_cpu_s"] = rep.cpu_seconds
                    entry[f"workers_{n}_cpu_s_per_tile"] = rep.cpu_seconds / plan.tile_count
                    assert tiles_of(out / f"{args.slide.stem}.zarr.zip") == ref, "tiles differ"
                    if n == 2 and name == "jpegxl":
                        result["scheduler"] = task_overhead(client)
            for key in ("single_process_s", "workers_1_s", "workers_2_s"):
                entry[key.replace("_s", "_mp_per_s")] = mp / entry[key]
            entry["scaling_2_over_1"] = entry["workers_1_s"] / entry["workers_2_s"]
            entry["s_per_tile_one_worker"] = entry["workers_1_s"] / plan.tile_count
            entry["halo_extra_rows_fraction"] = coded_rows / len(rows) - 1
            entry["tiles_identical_to_single_process"] = True
            entry["assembly"] = assembly_cost(single, args.slide, tmp / f"asm-{name}.zarr.zip", codec)
            result["codecs"][name] = entry
            print(name, json.dumps(entry, indent=1), flush=True)
    result["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["scheduler"], indent=1))


if __name__ == "__main__":
    main()
