"""The command line's grammar: :func:`build_parser` (every command's arguments and help)
and the argument types it checks.

A usage error raises :class:`UsageError` and ``--version`` raises
:class:`VersionRequested` (argparse would print and ``sys.exit`` from inside the
parser); :mod:`wsicodec.cli`, which runs the commands, turns both into output and an
exit status.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

from wsicodec.associated import ASSOCIATED_POLICIES
from wsicodec.codecs import DEFAULT_CODEC, PRECISIONS
from wsicodec.dicom import DEFAULT_DICOM_SYNTAX, DICOM_QUALITY, DICOM_SYNTAXES
from wsicodec.readback import OUTPUT_FORMATS
from wsicodec.tiff import DEFAULT_TIFF_COMPRESSION, DEFAULT_TIFF_QUALITY, TIFF_COMPRESSIONS

PROG = "wsicodec"


class UsageError(Exception):
    """A command line that the parser or a command refuses (exit status 2)."""


class _VersionAction(argparse.Action):
    """``--version``: print ``wsicodec VERSION`` on stdout; :func:`wsicodec.cli.main`
    returns 0 (argparse's own version action would ``sys.exit`` from inside the parser)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version of wsicodec and exit")

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise VersionRequested


class VersionRequested(Exception):
    """``--version`` was given: print the version, exit status 0."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


PRECISION_HELP = ("how the learned decoder runs g_s: float32 (default, the reference) or "
                  "bfloat16 (its inner layers; faster on a CPU with AVX512-BF16/AMX or a recent "
                  "GPU, slower elsewhere; pixels slightly different, the same streams)")


def _min_psnr(text: str) -> float:
    """``--min-psnr``: a number of dB above 0 and at most 99 (argparse turns the
    ValueError into a usage error naming the option)."""
    v = float(text)
    if not 0 < v <= 99:                      # NaN fails too
        raise ValueError(text)
    return v


_min_psnr.__name__ = "floor in dB (a number above 0, at most 99)"


def parse_option(text: str) -> tuple[str, Any]:
    """``--option KEY=VALUE`` as (KEY, VALUE read as JSON, or the text when it is not
    JSON).  Raises UsageError without ``=`` or a key."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--option expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    """The ``wsicodec`` parser with every command; it raises UsageError and
    VersionRequested instead of printing and exiting."""
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show a traceback for unexpected errors")
    parser = _Parser(prog=PROG, parents=[common],
                     description="Compress whole-slide images into a zarr v3 container and "
                                 "back out to a pyramidal TIFF.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_compress(sub, common)
    _add_compress_many(sub, common)
    _add_decompress(sub, common)

    i = sub.add_parser("info", parents=[common], help="describe a container")
    i.add_argument("input", help="container (.zarr or .zarr.zip)")
    i.add_argument("--json", action="store_true", help="print the metadata as JSON")

    _add_verify(sub, common)
    sub.add_parser("codecs", parents=[common], help="list the codecs usable here")
    _add_serve(sub, common)
    return parser


def _add_compress(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``compress`` command's arguments."""
    p = sub.add_parser("compress", parents=[common], help="slide or image -> container",
                       description="Compress any slide OpenSlide opens (or a PNG/TIFF image) "
                                   "into OUT (.zarr directory or single-file .zarr.zip).")
    p.add_argument("input", help="slide or image file")
    p.add_argument("output", help="container path: OUT.zarr or OUT.zarr.zip")
    add_coding_options(p, resume_help=(
        "continue an interrupted compress of the same slide to the same OUT with the same "
        "settings (an interrupt keeps the finished tile rows in a hidden .OUT.partial-* "
        "beside OUT); starts afresh if there is none"))
    p.add_argument("--workers", type=int, default=None,
                   help="encoder threads (default: CPU count, at most 8)")


def _add_compress_many(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``compress-many`` command's arguments: compress's, and where the work runs."""
    from wsicodec.cluster.bands import DEFAULT_TASK_TILES

    p = sub.add_parser("compress-many", parents=[common],
                       help="many slides -> containers, on a Dask cluster",
                       description="Compress every slide SOURCE names into DIR/<name>.zarr.zip "
                                   "on a Dask cluster: a local one by default, or a running "
                                   "scheduler (--scheduler). Large slides are split into bands "
                                   "of tile rows; the tiles equal 'compress' of the same slide. "
                                   "Writes DIR/report.csv (docs/cluster.md).")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="slide file, folder (searched recursively) or manifest (.txt/.lst: one "
                        "path a line; .csv: a 'path' column)")
    p.add_argument("--out-dir", required=True, metavar="DIR",
                   help="folder for the containers and report.csv (made if missing)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="a running Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: a "
                            "local cluster on this machine)")
    where.add_argument("--scheduler-file", metavar="FILE",
                       help="the file 'dask scheduler --scheduler-file' (or dask-jobqueue) wrote")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes of the local cluster (default: CPU count); not "
                        "with --scheduler")
    p.add_argument("--task-tiles", type=int, default=DEFAULT_TASK_TILES, metavar="N",
                   help=f"tiles per task (default {DEFAULT_TASK_TILES}); a slide with fewer "
                        "is one task")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON on stdout (report.csv is written anyway)")
    add_coding_options(p, resume_help=(
        "skip the slides whose output exists (finished by an earlier run) and continue "
        "the interrupted ones from their finished tile rows; the rest start afresh"))


def add_coding_options(p: argparse.ArgumentParser, *, resume_help: str) -> None:
    """The options of ``compress`` that ``compress-many`` takes too (codec, quality, tile
    size, associated images, de-identification, overwrite, resume, quiet)."""
    p.add_argument("--codec", default=DEFAULT_CODEC,
                   help=f"tile codec (default {DEFAULT_CODEC}; see 'wsicodec codecs')")
    p.add_argument("--quality", type=float, default=None,
                   help="the codec's quality knob (codec default if omitted; jpegxl: "
                        "distance, lower is better)")
    p.add_argument("--min-psnr", type=_min_psnr, default=None, metavar="DB",
                   help="auto codec: every tile's decoded PSNR against the slide's pixels is at "
                        "least DB (the network's quality raised, then JPEG 2000 or JPEG-XL, lossless JPEG-XL as the "
                        "last resort); default: the auto codec's floor ('wsicodec codecs')")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra codec option, e.g. effort=5 or subsampling=420, for auto "
                        "seam_search=40 (latent search of network tiles beside bare JPEG 2000 / JPEG-XL ones: "
                        "smaller seams, much slower encode), jpeg2000=false (JPEG-XL the only "
                        "classical codec) or jpeg2000_margin=PX (JPEG 2000 tiles coded with PX px of "
                        "their surroundings, 0..16, default 8), or for learned "
                        "refine=40 (encoder latent search: fewer bits, much slower encode) or "
                        "precision=bfloat16 (g_a's inner layers in bfloat16: faster on a CPU "
                        "with AVX512-BF16/AMX, the same rate-distortion) (repeatable)")
    p.add_argument("--tile-size", type=int, default=256,
                   help="tile edge in pixels, a multiple of 16 in 16..4096 (default 256); a "
                        "slide smaller than that gets tiles just large enough for it")
    p.add_argument("--associated", choices=ASSOCIATED_POLICIES, default="auto",
                   help="label / macro / thumbnail: auto (default) keeps the label lossless and "
                        "codes the overviews as JPEG-XL (distance 0.5), lossless keeps all as "
                        "PNG, none leaves them out (e.g. a label with the patient's name: "
                        "only the images; the slide's properties, dates, file name and "
                        "user included, stay: see --deidentify)")
    p.add_argument("--deidentify", action="store_true",
                   help="a copy to share: leave out the label, the macro (every associated "
                        "image but the thumbnail), the source file name and the properties "
                        "that carry people, dates, file names and identifiers; new DICOM "
                        "UIDs (docs/deidentify.md). 'wsicodec info' lists what was left out")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary: only errors (stderr) and the exit status")


def _add_decompress(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``decompress`` command's arguments."""
    d = sub.add_parser("decompress", parents=[common],
                       help="container -> pyramidal TIFF, SVS or DICOM WSI",
                       description="Write a container as an Aperio-compatible SVS (OpenSlide and "
                                   "tiffslide read it as aperio, with the label, macro and "
                                   "thumbnail), a tiled pyramidal BigTIFF (OpenSlide's "
                                   "generic-tiff, QuPath, libvips) or a DICOM WSI series "
                                   "(a folder; OpenSlide's DICOM driver, wsidicom, PACS), "
                                   "with mpp and ICC profile.")
    d.add_argument("input", help="container (.zarr or .zarr.zip)")
    d.add_argument("output", help="output .svs or .tiff file, or the folder of a DICOM series")
    d.add_argument("--format", choices=OUTPUT_FORMATS, default=None,
                   help="svs (Aperio-compatible), tiff (generic pyramidal TIFF) or dicom (a "
                        "DICOM WSI series in the folder OUTPUT; needs wsidicom, pip install "
                        "'wsicodec[dicom]'); default: svs for an OUTPUT ending in .svs, tiff "
                        "otherwise")
    d.add_argument("--tiff-compression", choices=TIFF_COMPRESSIONS,
                   default=DEFAULT_TIFF_COMPRESSION,
                   help=f"tile compression in the TIFF (default {DEFAULT_TIFF_COMPRESSION}; "
                        "zlib is lossless)")
    d.add_argument("--tiff-quality", type=int, default=DEFAULT_TIFF_QUALITY,
                   help=f"JPEG quality 1-100 (default {DEFAULT_TIFF_QUALITY})")
    d.add_argument("--transfer-syntax", choices=DICOM_SYNTAXES, default=None,
                   help=f"dicom: how frames are coded: {DEFAULT_DICOM_SYNTAX} (baseline, 4:4:4; the default) "
                        "re-codes every tile; jpeg2000 writes the container's JPEG 2000 tiles as "
                        "they are and codes the others as JPEG 2000, and OpenSlide reads both; "
                        "jpegxl does the same with JPEG-XL (wsidicom reads it, OpenSlide 4.0 does not)")
    d.add_argument("--dicom-quality", type=float, default=None,
                   help="dicom: " + "; ".join(f"{s}: {what} {lo:g}-{hi:g} (default {q:g})"
                                              for s, (q, lo, hi, what) in DICOM_QUALITY.items()))
    d.add_argument("--mpp", type=float, default=None, metavar="MICRONS",
                   help="dicom: level 0's pixel size in µm to state instead of the container's "
                        "(DICOM WSI requires one; for slides whose source did not say)")
    d.add_argument("--workers", type=int, default=None, help="decoder threads")
    d.add_argument("--precision", choices=PRECISIONS, default="float32", help=PRECISION_HELP)
    d.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    d.add_argument("--deidentify", action="store_true",
                   help="leave the source file name out of the TIFF's ImageDescription and "
                        "the DICOM series description, out of an SVS or DICOM series the "
                        "label and the macro, and out of an SVS the properties 'compress "
                        "--deidentify' removes")
    d.add_argument("--quiet", action="store_true", help="no progress bar and no summary: only errors (stderr) and the exit status")


def _add_verify(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``verify`` command's arguments."""
    v = sub.add_parser("verify", parents=[common], help="check a container for damage",
                       description="Check every tile's CRC32 and every associated image of a "
                                   "container (with --decode, decode every tile too). Lists "
                                   "what is damaged; exit status 1 if anything is.")
    v.add_argument("input", help="container (.zarr or .zarr.zip)")
    v.add_argument("--decode", action="store_true",
                   help="decode every tile as well (slower; the learned codec also checks "
                        "each tile's symbol checksum)")
    v.add_argument("--workers", type=int, default=None, help="decoder threads (with --decode)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--quiet", action="store_true",
                   help="no progress bar and no report: only the exit status (and errors)")


def _add_serve(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``serve`` command's arguments."""
    s = sub.add_parser("serve", parents=[common], help="DeepZoom tile server and viewer",
                       description="Serve containers as DeepZoom tiles over HTTP, with an "
                                   "OpenSeadragon viewer page at /. Ctrl-C stops it.")
    s.add_argument("slides", nargs="+", metavar="SLIDE", help="containers (.zarr or .zarr.zip)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
    s.add_argument("--jpeg-quality", type=int, default=90,
                   help="quality of .jpeg DeepZoom tiles, 1-100 (default 90)")
    s.add_argument("--cache-mb", type=int, default=256,
                   help="decoded-tile cache per slide in MiB (default 256)")
    s.add_argument("--workers", type=int, default=None, help="decoder threads per slide")
    s.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for decoding (default: torch's, the core "
                        "count); fewer than the free cores avoids contention")
    s.add_argument("--device", default="auto",
                   help="where the learned decoder's g_s runs: auto (CUDA when present), "
                        "cpu, cuda (default auto)")
    s.add_argument("--precision", choices=PRECISIONS, default="float32", help=PRECISION_HELP)
    s.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a connection that takes longer to send a request's line and headers, "
                        "or stays idle between requests that long, is closed (default 30)")
    s.add_argument("--max-connections", type=int, default=64, metavar="N",
                   help="connections served at once, one thread each; N more wait, further "
                        "ones get 503 with Retry-After (default 64)")
    s.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests addressed (Host header) to NAME, e.g. the name "
                        "a proxy forwards; repeatable. Bound to loopback, only loopback names "
                        "(localhost, 127.0.0.1, [::1]) are answered otherwise (DNS rebinding); "
                        "bound elsewhere, any name is answered unless some are given")
    s.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (scheme://host[:port], e.g. "
                        "https://viewer.example.org) read the responses "
                        "(Access-Control-Allow-Origin); repeatable; '*' lets every site do "
                        "so. Default: none")
    s.add_argument("--deidentify", action="store_true",
                   help="serve each slide as 'compress --deidentify' would keep it: no label "
                        "or macro, no identifying properties (dates, names, file names, "
                        "serial numbers...), new DICOM UIDs (docs/deidentify.md)")
