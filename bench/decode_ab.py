"""Interleaved A/B of whole-slide ``wsicodec decompress`` (issue #31): wall seconds of CLI
processes (imports and model load counted), variants alternating within each round.

Variants: ``f32`` (float32, the default) and ``bf16`` (``--precision bfloat16``), each on
every container given::

    PYTHONPATH=$PWD .venv/bin/python bench/decode_ab.py A.zarr.zip B.zarr.zip --rounds 3 \\
        --out bench/results/decode_ab.json

Each output TIFF's sha256 is recorded (a variant that changes no pixels must write the
same bytes as ``f32``).
The load average before and after goes in the JSON: on a shared machine only the ratios
within a round mean anything; CPU seconds (user + system of the child) say what the work
cost whatever the machine's load, not what the wall time would be on an idle one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.report import cpu_model, git_state, log  # noqa: E402

VARIANTS = {"f32": "float32", "bf16": "bfloat16"}


def once(container: str, out: Path, variant: str) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds: user + system, the TIFF's sha256) of one run."""
    precision = VARIANTS[variant]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "wsicodec", "decompress", container,
                    str(out), "--overwrite", "--quiet", "--precision", precision], check=True,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return wall, cpu, hashlib.sha256(out.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("containers", nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(REPO / "bench/results/decode_ab.json"))
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    walls = {c: {v: [] for v in variants} for c in args.containers}
    cpus = {c: {v: [] for v in variants} for c in args.containers}
    hashes = {c: {v: set() for v in variants} for c in args.containers}
    before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.rounds):
            for c in args.containers:
                for v in (variants if n % 2 == 0 else variants[::-1]):
                    w, cpu, h = once(c, Path(tmp) / "out.tiff", v)
                    walls[c][v].append(round(w, 3))
                    cpus[c][v].append(round(cpu, 3))
                    hashes[c][v].add(h)
                    log(f"round {n}: {Path(c).name} {v} {w:.2f} s wall, {cpu:.2f} s CPU, "
                        f"load {os.getloadavg()[0]:.1f}")
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu_model(),
              "cpu_count": os.cpu_count(), "git": git_state(REPO, ("wsicodec", "bench")),
              "load_average_before": before, "load_average_after": os.getloadavg(),
              "rounds": args.rounds, "containers": {}}
    for c in args.containers:
        row = {v: {"walls_s": walls[c][v], "median_s": float(np.median(walls[c][v])),
                   "best_s": min(walls[c][v]), "cpu_s": cpus[c][v],
                   "median_cpu_s": float(np.median(cpus[c][v])),
                   "tiff_sha256": sorted(hashes[c][v])}
               for v in variants}
        if "bf16" in row and "f32" in row:
            row["bf16_speedup_median"] = row["f32"]["median_s"] / row["bf16"]["median_s"]
            row["bf16_cpu_ratio_median"] = row["f32"]["median_cpu_s"] / row["bf16"]["median_cpu_s"]
        result["containers"][c] = row
        log(f"{Path(c).name}: " + ", ".join(f"{v} {row[v]['median_s']:.2f} s" for v in variants)
            + "".join(f", {k} {row[k]:.3f}" for k in ("bf16_speedup_median", "bf16_cpu_ratio_median")
                      if k in row))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
