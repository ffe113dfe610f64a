"""Whole-slide compress and decompress with the learned codec against JPEG-XL, in one run.

    python bench/vs_jpegxl.py [--slides svs-jpeg,svs-jpeg2000] [--repeat 1]
                              [--out bench/results/vs_jpegxl.json]

``--slides`` takes the shared slides' keys (``bench/slides.py``) and ``synthetic:WxH``:
``bench/memory_scaling.py``'s seeded mosaic slide of that size, built in the run's
scratch folder (the shared slides are 6-16 MP, real ones 1-10 GP: a wide slide shows
whether the ratios hold where the CLI's fixed start is a small part of the time).

Each step is the CLI in its own process (``wsicodec compress SLIDE OUT --codec C``, then
``wsicodec decompress OUT OUT.tiff``), default settings otherwise, so import and model
load are counted as a user sees them (the package's bytecode written first, as an
install writes it: :func:`bench.slides.compile_package`); wall time and peak RSS
(``os.wait4`` on the child) per step, and the learned codec's time as a multiple of
JPEG-XL's on the same slide in the same run (absolute times drift 10-30 % on a shared
machine; the ratios less).  The JSON records the load averages before and after.
``--repeat N``: the best of N runs of each step, taken alternately.  The learned container
is also decompressed with ``--precision bfloat16`` right after the float32 run
(``decompress_bf16``; the opt-in, not the default: ``bench/README.md``, "Precision").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.slides import REPO, SLIDE_FILES, SLIDES, compile_package, environment  # noqa: E402

CODECS = ("learned", "jpegxl")


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` (a wsicodec CLI call) as a child: exit code, wall seconds, peak RSS MB."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        err.seek(0)
        message = err.read().decode(errors="replace").strip()
    code = os.waitstatus_to_exitcode(status)
    row = {"exit_code": code, "wall_s": round(wall, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
    if code:
        row["error"] = message[-500:]
    return row


def best(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["exit_code"] == 0]
    return min(ok, key=lambda r: r["wall_s"]) if ok else rows[-1]


def _slide(key: str, tmp: Path) -> Path:
    """The slide a ``--slides`` entry names: a shared slide's key or ``synthetic:WxH``."""
    if not key.startswith("synthetic:"):
        return SLIDES / SLIDE_FILES[key]
    from bench.memory_scaling import build_slide     # it imports timed from here

    w, h = (int(v) for v in key.split(":", 1)[1].split("x"))
    path = tmp / f"synthetic_{w}x{h}.tiff"
    build_slide(path, w, h)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", default="svs-jpeg,svs-jpeg2000",
                    help="comma-separated shared slide keys or synthetic:WxH")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "vs_jpegxl.json")
    args = ap.parse_args(argv)
    compile_package()
    cli = [sys.executable, "-m", "wsicodec"]
    result = {"environment": environment(), "load_before": os.getloadavg(), "slides": []}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.slides.split(","):
            slide = _slide(key, Path(tmp))
            runs: dict = {c: {"compress": [], "decompress": []} for c in CODECS}
            runs["learned"]["decompress_bf16"] = []
            for _ in range(args.repeat):
                for codec in CODECS:
                    box = Path(tmp) / f"{key}.{codec}.zarr.zip"
                    runs[codec]["compress"].append(timed(cli + ["compress", str(slide), str(box),
                                                                "--codec", codec, "--quiet", "--overwrite"]))
                    runs[codec]["decompress"].append(timed(cli + ["decompress", str(box),
                                                                  str(Path(tmp) / f"{key}.{codec}.tiff"),
                                                                  "--overwrite"]))
                    if codec == "learned":
                        runs[codec]["decompress_bf16"].append(timed(
                            cli + ["decompress", str(box), str(Path(tmp) / f"{key}.bf16.tiff"),
                                   "--overwrite", "--precision", "bfloat16"]))
            row = {"slide": key, "file": slide.name}
            for codec in CODECS:
                row[codec] = {step: best(r) for step, r in runs[codec].items()}
                row[codec]["container_bytes"] = (Path(tmp) / f"{key}.{codec}.zarr.zip").stat().st_size
            for step in ("compress", "decompress"):
                a, b = row["learned"][step], row["jpegxl"][step]
                if a["exit_code"] == 0 and b["exit_code"] == 0:
                    row[f"{step}_time_ratio"] = round(a["wall_s"] / b["wall_s"], 2)
            a, b = row["learned"]["decompress_bf16"], row["jpegxl"]["decompress"]
            if a["exit_code"] == 0 and b["exit_code"] == 0:
                row["decompress_bf16_time_ratio"] = round(a["wall_s"] / b["wall_s"], 2)
            result["slides"].append(row)
            print(json.dumps(row), flush=True)
    result["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
