"""Sizes of ``decompress --format dicom`` against the container, on every shared slide.

    python bench/dicom_sizes.py [--codecs jpegxl,auto] [--out bench/results/dicom_sizes.json]

Each slide is compressed (default settings, one codec at a time) and the container
written out as a DICOM WSI series with each transfer syntax below; for each series:
its bytes (every .dcm file) against the container's, the seconds ``decompress`` took,
whether OpenSlide's DICOM driver opens it, the PSNR of level 0 read back by wsidicom
against the container's own pixels, and how many tiles a ``jpegxl`` or ``jpeg2000``
series writes as stored (its codestreams: :func:`wsicodec.dicom.source.stored_codestream`)
rather than re-coded.  A slide whose container has no mpp cannot be written (DICOM requires
the pixel spacing) and is recorded as refused.  Also writes a Markdown table beside
the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.metrics import psnr  # noqa: E402
from bench.report import git_state, package_versions  # noqa: E402
from bench.slides import SLIDE_FILES, SLIDES, environment  # noqa: E402

#: (name, transfer syntax, quality) of each export measured
EXPORTS = [("jpeg q95", "jpeg", 95), ("jpeg q90", "jpeg", 90),
           ("jpeg2000 40 dB", "jpeg2000", 40.0), ("jpeg2000 50 dB", "jpeg2000", 50.0),
           ("jpegxl", "jpegxl", 1.0)]


def _psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """:func:`bench.metrics.psnr` rounded for the table; None when the two are identical."""
    v = psnr(a, b)
    return None if math.isinf(v) else round(v, 2)


def _stored_counts(box: Path) -> tuple[int, int, int]:
    """(tiles held as JPEG-XL codestreams, as JPEG 2000 ones, all tiles) of a container."""
    from wsicodec.container import open_container
    from wsicodec.dicom.source import stored_codestream

    jxl = j2k = total = 0
    with open_container(box) as c:
        for level in range(c.level_count):
            for col, row, data in c.iter_encoded_tiles(level):
                jxl += stored_codestream(data, "jpegxl") is not None
                j2k += stored_codestream(data, "jpeg2000") is not None
                total += 1
    return jxl, j2k, total


def _export(box: Path, out: Path, syntax: str, quality: float | None) -> dict:
    import openslide
    import wsidicom

    from wsicodec.dicom import DicomSettings
    from wsicodec.readback import decompress
    from wsicodec.slide import open_slide

    settings = DicomSettings(syntax, quality)
    t0 = time.perf_counter()
    result = decompress(box, out, format="dicom", dicom=settings, workers=2)
    row = {"transfer_syntax": syntax, "quality": settings.quality,
           "bytes": result.output_bytes, "files": len(result.files),
           "seconds": round(time.perf_counter() - t0, 2)}
    try:
        with openslide.OpenSlide(result.files[0]) as s:
            row["openslide"] = s.properties["openslide.vendor"]
    except openslide.OpenSlideError as e:
        row["openslide"] = f"refused: {e}".replace(str(result.files[0]), "FILE")
    with wsidicom.WsiDicom.open(out) as w, open_slide(box) as ours:
        size = w.levels[0].size.to_tuple()
        a = np.asarray(w.read_region((0, 0), 0, size))[..., :3]
        row["psnr_level0_vs_container"] = _psnr(a, ours.read_region((0, 0), 0, size,
                                                                     as_array=True))
    return row


def run(codecs: list[str], out_json: Path) -> dict:
    rows: list[dict] = []
    commit, dirty = git_state(REPO, ("wsicodec", "bench/dicom_sizes.py"))
    result = {"environment": environment(), "git_commit": commit, "git_dirty": dirty,
              "packages": package_versions(("wsidicom", "pydicom", "openslide-bin")),
              "exports": [e[0] for e in EXPORTS], "rows": rows}
    with tempfile.TemporaryDirectory(prefix="wsicodec-dicom-bench-") as tmp:
        for codec in codecs:                  # every slide with one codec, then the next
            for name, rel in SLIDE_FILES.items():
                slide = SLIDES / rel
                if not slide.exists():
                    print(f"{name}: missing, skipped", file=sys.stderr)
                    continue
                rows.append(_measure(slide, name, codec, Path(tmp)))
                _write(result, out_json)      # what is done so far, if stopped
    return result


def _measure(slide: Path, name: str, codec: str, tmp: Path) -> dict:
    import wsicodec
    from wsicodec.codecs import get_codec
    from wsicodec.errors import InvalidSettingError

    box = tmp / f"{name}.{codec}.zarr.zip"
    t0 = time.perf_counter()
    wsicodec.compress(slide, box, get_codec(codec), workers=2)
    jxl, j2k, total = _stored_counts(box)
    entry = {"slide": name, "codec": codec, "container_bytes": box.stat().st_size,
             "compress_seconds": round(time.perf_counter() - t0, 1),
             "tiles": total, "tiles_stored_as_jpegxl": jxl, "tiles_stored_as_jpeg2000": j2k,
             "exports": []}
    for label, syntax, quality in EXPORTS:
        out = tmp / f"{name}.{codec}.{syntax}.{quality}"
        try:
            row = _export(box, out, syntax, quality)
        except InvalidSettingError as e:
            row = {"transfer_syntax": syntax, "quality": quality, "refused": str(e)}
        row["name"] = label
        if "bytes" in row:
            row["ratio_to_container"] = round(row["bytes"] / entry["container_bytes"], 3)
        entry["exports"].append(row)
        print(json.dumps({"slide": name, "codec": codec, **row}), flush=True)
    box.unlink()
    return entry


def _write(result: dict, out_json: Path) -> None:
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    out_json.with_suffix(".md").write_text(markdown(result))


def markdown(result: dict) -> str:
    """The README's table: DICOM bytes / container bytes per slide, codec and export."""
    names = result["exports"]
    lines = ["| slide | codec | container | " + " | ".join(names) + " |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in names) + " |"]
    for e in result["rows"]:
        cells = []
        for x in e["exports"]:
            if "refused" in x:
                cells.append("no mpp")
                continue
            mark = "" if x["openslide"] == "dicom" else " †"
            cells.append(f"{x['ratio_to_container']:.2f}x ({x['psnr_level0_vs_container'] or 'exact'}"
                         f"{'' if x['psnr_level0_vs_container'] is None else ' dB'}){mark}")
        lines.append(f"| {e['slide']} | {e['codec']} | {e['container_bytes'] / 1e6:.2f} MB | "
                     + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Ratio = DICOM series bytes / container bytes; in brackets the PSNR of level 0 "
                 "as wsidicom reads it against the container's pixels. † OpenSlide 4.0 "
                 "does not open it (JPEG-XL transfer syntax).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codecs", default="jpegxl,auto")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dicom_sizes.json")
    args = ap.parse_args()
    run(args.codecs.split(","), args.out)


if __name__ == "__main__":
    main()
