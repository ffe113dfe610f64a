"""Compress every shared slide with every classical codec through the CLI, one
subprocess per run, and record size, ratio, time, throughput and peak memory.

    python bench/slides.py [--codecs jpeg,jpegxl,...] [--out bench/results/slides_classical.json]

Peak RSS comes from os.wait4() on the child, i.e. the compress process alone.
Ratios are against the source file(s) on disk (a DICOM slide = all .dcm files of its
folder); the sources were lossy-compressed by the scanner already.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLIDES = REPO.parent / "shared" / "data" / "slides"
SLIDE_FILES = {
    "svs-jpeg2000": "tcga-cr-7395-01a-01-ts1.svs",
    "svs-jpeg": "cmu_small_region.svs",
    "ndpi": "test3-DAPI-2-387.ndpi",
    "dicom": "dicom-cmu1-small/level-0-frames-0-30.dcm",
    "generic-tiff": "small_HE_levels.tiff",
}
CLASSICAL = ["jpeg", "jpegxl", "webp", "jpeg2000", "avif"]


def compile_package() -> None:
    """Write the package's bytecode (``__pycache__``), as ``pip install`` does and as a
    user's first run does: under ``PYTHONDONTWRITEBYTECODE`` (this machine sets it) each
    timed CLI child would otherwise compile every module it imports, on every run."""
    import compileall
    compileall.compile_dir(REPO / "wsicodec", quiet=1)


def environment() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("wsicodec", "imagecodecs", "zarr", "tifffile", "openslide-python",
                "openslide-bin", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "packages": versions,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_one(slide: Path, codec: str, workers: int, tile_size: int, out_dir: Path) -> dict:
    out = out_dir / f"{slide.stem}.{codec}.zarr.zip"
    cmd = [sys.executable, "-m", "wsicodec", "compress", str(slide), str(out), "--codec", codec,
           "--workers", str(workers), "--tile-size", str(tile_size), "--quiet", "--overwrite"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()  # type: ignore
    proc.stdout.close(), proc.stderr.close()  # type: ignore
    code = os.waitstatus_to_exitcode(status)
    row = {"codec": codec, "exit_code": code, "wall_s": round(wall, 3),
           "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
    if code != 0:
        row["error"] = stderr.strip()
        return row
    sys.path.insert(0, str(REPO))
    from wsicodec.container import open_container

    with open_container(out) as c:
        info = c.info()
    w, h = info["levels"][0]["width"], info["levels"][0]["height"]
    src_bytes = info["source"]["bytes"]
    pixels = sum(lv["width"] * lv["height"] for lv in info["levels"])
    row.update({
        "codec_config": info["codec"]["configuration"],
        "container_bytes": info["container_bytes"],
        "tile_bytes": sum(info["level_bytes"]),
        "associated_bytes": {n: int(b) for n, b in (info.get("associated_bytes") or {}).items()},
        "associated_formats": info.get("associated_formats") or {},
        "source_bytes": src_bytes,
        "ratio_vs_source": round(src_bytes / info["container_bytes"], 4),
        "ratio_vs_raw_level0": round(w * h * 3 / info["container_bytes"], 3),
        "level0_megapixels": round(w * h / 1e6, 3),
        "mp_per_s_level0": round(w * h / 1e6 / wall, 3),
        "mp_per_s_all_levels": round(pixels / 1e6 / wall, 3),
    })
    out.unlink()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codecs", default=",".join(CLASSICAL),
                    help="comma-separated codec names (default: the classical ones)")
    ap.add_argument("--slides", default=",".join(SLIDE_FILES), help="comma-separated slide keys")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--tile-size", type=int, default=256)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" /
                    "slides_classical.json")
    args = ap.parse_args(argv)
    compile_package()
    if not SLIDES.is_dir():
        print(f"bench: shared slides not found at {SLIDES}", file=sys.stderr)
        return 1
    results = []
    with tempfile.TemporaryDirectory(prefix="wsicodec-bench-") as tmp:
        for key in args.slides.split(","):
            slide = SLIDES / SLIDE_FILES[key]
            for codec in args.codecs.split(","):
                row = {"slide": key, "file": SLIDE_FILES[key],
                       **run_one(slide, codec, args.workers, args.tile_size, Path(tmp))}
                results.append(row)
                print(json.dumps(row), flush=True)
    doc = {"environment": environment(), "workers": args.workers, "tile_size": args.tile_size,
           "note": "ratios vs source files that were already lossy (scanner JPEG/JPEG 2000); "
                   "container bytes include the associated images as compress stores them by "
                   "default (--associated auto: label PNG, thumbnail/macro JPEG-XL distance 0.5)",
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
