"""What the per-tile choice costs: compress and decompress times of the auto codec against
the learned network alone (and JPEG-XL), whole shared slides, through the CLI, one run.

    python bench/auto_speed.py [--slides svs-jpeg,svs-jpeg2000] [--rounds 2]
                               [--also KEY=VALUE[,KEY=VALUE...]]... [--out bench/results/auto_speed.json]

Each round compresses every slide with ``learned`` (quality 4), ``auto`` (its defaults)
and ``jpegxl`` (distance 1), then decompresses each container to a TIFF, every command a
subprocess of its own, timed by wall clock; the rounds interleave the codecs so that a
drifting load on a shared machine falls on all of them.  Times on this machine drift by
10-30 % between runs, so the JSON reports ratios between codecs measured in the same
round (the targets of issue #28: auto's compress ≤ 2x the learned network's, its
decompress the same within noise), their median over rounds, the load average at the end
of each round, and the auto containers' tile kinds (``wsicodec info --json``).  Each
``--also`` adds auto with those options (``--option KEY=VALUE`` each) to every round, named
``auto[OPTIONS]``, with its time and container bytes against the default auto's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.report import log, run_environment, write_json  # noqa: E402
from bench.slides import SLIDE_FILES, SLIDES, compile_package  # noqa: E402

CODECS = {"learned": ["--codec", "learned", "--quality", "4"],
          "auto": ["--codec", "auto"],
          "jpegxl": ["--codec", "jpegxl", "--quality", "1"]}


def _run(args: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "wsicodec", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"wsicodec {' '.join(args)} failed: {proc.stderr.strip()}")
    return wall


def _info(path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "wsicodec", "info", str(path), "--json"], cwd=REPO,
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", default="svs-jpeg,svs-jpeg2000")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--also", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE...]",
                    help="auto with these options too (repeatable)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "auto_speed.json")
    args = ap.parse_args(argv)
    codecs = dict(CODECS)
    for opts in args.also:
        codecs[f"auto[{opts}]"] = ["--codec", "auto"] + [a for kv in opts.split(",") for a in ("--option", kv)]
    compile_package()
    rows, infos = [], {}
    with tempfile.TemporaryDirectory(prefix="wsicodec-auto-speed-") as tmp:
        for rnd in range(args.rounds):
            for key in args.slides.split(","):
                slide = SLIDES / SLIDE_FILES[key]
                row = {"round": rnd, "slide": key}
                for name, opts in codecs.items():
                    c = Path(tmp) / f"{key}.{name}.zarr.zip"
                    row[f"{name}_compress_s"] = round(_run(["compress", str(slide), str(c), *opts,
                                                            "--quiet", "--overwrite"]), 3)
                    row[f"{name}_decompress_s"] = round(_run(["decompress", str(c), str(c) + ".tiff",
                                                              "--overwrite"]), 3)
                    row[f"{name}_container_bytes"] = c.stat().st_size
                    if name.startswith("auto"):
                        info = _info(c)
                        row[f"{name}_tile_bytes"] = sum(info["level_bytes"])
                        if name == "auto":
                            infos.setdefault(key, info)
                row["loadavg_1min"] = round(os.getloadavg()[0], 2)     # the machine is shared
                for what in ("compress", "decompress"):
                    row[f"auto_vs_learned_{what}"] = round(row[f"auto_{what}_s"] / row[f"learned_{what}_s"], 3)
                    row[f"auto_vs_jpegxl_{what}"] = round(row[f"auto_{what}_s"] / row[f"jpegxl_{what}_s"], 3)
                for name in (n for n in codecs if n.startswith("auto[")):
                    for what in ("compress", "decompress"):
                        row[f"{name}_vs_auto_{what}"] = round(row[f"{name}_{what}_s"] / row[f"auto_{what}_s"], 3)
                        row[f"{name}_vs_learned_{what}"] = round(row[f"{name}_{what}_s"] / row[f"learned_{what}_s"], 3)
                    row[f"{name}_vs_auto_tile_bytes"] = round(row[f"{name}_tile_bytes"] / row["auto_tile_bytes"], 4)
                log(json.dumps(row))
                rows.append(row)
    summary = {}
    for key in args.slides.split(","):
        mine = [r for r in rows if r["slide"] == key]
        summary[key] = {k: statistics.median(r[k] for r in mine)
                        for k in mine[0] if k.startswith("auto_vs_") or ("_vs_" in k and k.startswith("auto["))}
        summary[key]["auto_fidelity"] = infos[key].get("fidelity")
    doc = {"what": __doc__.split("\n\n")[0],
           "environment": run_environment(REPO, ("torch", "imagecodecs", "numpy")),
           "codecs": codecs, "rounds": rows, "median_ratios": summary}
    write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
