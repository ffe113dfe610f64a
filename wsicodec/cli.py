"""Command line: ``wsicodec compress | decompress | info | codecs | serve``.

The only module that prints or exits. Every expected error becomes one line
``wsicodec: error: ...`` on stderr and a non-zero exit status (1; 2 for usage errors;
130 when interrupted: Ctrl-C or SIGTERM), with no traceback and no partial output at
the output path (an interrupted ``compress`` keeps its finished tile rows in a hidden
sibling for ``--resume`` and says where).
``--debug`` re-raises unexpected exceptions with their traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any, Sequence

from wsicodec.codecs import DEFAULT_CODEC, PRECISIONS
from wsicodec.errors import CompressInterrupted, PartialKeptError, WsiCodecError, error_text
from wsicodec.tiff import DEFAULT_TIFF_COMPRESSION, DEFAULT_TIFF_QUALITY, TIFF_COMPRESSIONS
from wsicodec.writer import ASSOCIATED_POLICIES

PROG = "wsicodec"
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool its reader left


class _UsageError(Exception):
    pass


class _VersionAction(argparse.Action):
    """``--version``: print ``wsicodec VERSION`` on stdout; :func:`main` returns 0 (argparse's
    own version action would ``sys.exit`` from inside the parser)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version of wsicodec and exit")

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise _VersionRequested


class _VersionRequested(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see '{self.prog} --help')")


_ASSOCIATED_LABELS = {"png": "PNG", "jxl": "JPEG-XL"}
PRECISION_HELP = ("how the learned decoder runs g_s: float32 (default, the reference) or "
                  "bfloat16 (its inner layers; faster on a CPU with AVX512-BF16/AMX or a recent "
                  "GPU, slower elsewhere; pixels slightly different, the same streams)")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _min_psnr(text: str) -> float:
    """``--min-psnr``: a number of dB above 0 and at most 99 (argparse turns the
    ValueError into a usage error naming the option)."""
    v = float(text)
    if not 0 < v <= 99:                      # NaN fails too
        raise ValueError(text)
    return v


_min_psnr.__name__ = "floor in dB (a number above 0, at most 99)"


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise _UsageError(f"--option expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show a traceback for unexpected errors")
    parser = _Parser(prog=PROG, parents=[common],
                     description="Compress whole-slide images into a zarr v3 container and "
                                 "back out to a pyramidal TIFF.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_compress(sub, common)
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
    p.add_argument("--codec", default=DEFAULT_CODEC,
                   help=f"tile codec (default {DEFAULT_CODEC}; see 'wsicodec codecs')")
    p.add_argument("--quality", type=float, default=None,
                   help="the codec's quality knob (codec default if omitted; jpegxl: "
                        "distance, lower is better)")
    p.add_argument("--min-psnr", type=_min_psnr, default=None, metavar="DB",
                   help="auto codec: every tile's decoded PSNR against the slide's pixels is at "
                        "least DB (the network's quality raised, then JPEG-XL, lossless as the "
                        "last resort); default: the auto codec's floor ('wsicodec codecs')")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra codec option, e.g. effort=5 or subsampling=420, or for learned "
                        "refine=40 (encoder latent search: fewer bits, much slower encode) or "
                        "precision=bfloat16 (g_a's inner layers in bfloat16: faster on a CPU "
                        "with AVX512-BF16/AMX, the same rate-distortion) (repeatable)")
    p.add_argument("--tile-size", type=int, default=256,
                   help="tile edge in pixels, a multiple of 16 in 16..4096 (default 256); a "
                        "slide smaller than that gets tiles just large enough for it")
    p.add_argument("--workers", type=int, default=None,
                   help="encoder threads (default: CPU count, at most 8)")
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
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted compress of the same slide to the same OUT "
                        "with the same settings (an interrupt keeps the finished tile rows in "
                        "a hidden .OUT.partial-* beside OUT); starts afresh if there is none")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary: only errors (stderr) and the exit status")


def _add_decompress(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``decompress`` command's arguments."""
    d = sub.add_parser("decompress", parents=[common], help="container -> pyramidal TIFF or SVS",
                       description="Write a container as an Aperio-compatible SVS (OpenSlide and "
                                   "tiffslide read it as aperio, with the label, macro and "
                                   "thumbnail) or a tiled pyramidal BigTIFF (OpenSlide's "
                                   "generic-tiff, QuPath, libvips), with mpp and ICC profile.")
    d.add_argument("input", help="container (.zarr or .zarr.zip)")
    d.add_argument("output", help="output .svs or .tiff")
    d.add_argument("--format", choices=("svs", "tiff"), default=None,
                   help="svs (Aperio-compatible) or tiff (generic pyramidal TIFF); default: "
                        "svs for an OUTPUT ending in .svs, tiff otherwise")
    d.add_argument("--tiff-compression", choices=TIFF_COMPRESSIONS,
                   default=DEFAULT_TIFF_COMPRESSION,
                   help=f"tile compression in the TIFF (default {DEFAULT_TIFF_COMPRESSION}; "
                        "zlib is lossless)")
    d.add_argument("--tiff-quality", type=int, default=DEFAULT_TIFF_QUALITY,
                   help=f"JPEG quality 1-100 (default {DEFAULT_TIFF_QUALITY})")
    d.add_argument("--workers", type=int, default=None, help="decoder threads")
    d.add_argument("--precision", choices=PRECISIONS, default="float32", help=PRECISION_HELP)
    d.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    d.add_argument("--deidentify", action="store_true",
                   help="leave the source file name out of the TIFF's ImageDescription, and "
                        "out of an SVS the label, the macro and the properties 'compress "
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


def _progress_bar(total: int | None, quiet: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tile", file=sys.stderr,
                disable=quiet or not sys.stderr.isatty(), leave=False)


def _cmd_compress(args: argparse.Namespace) -> int:
    from wsicodec.codecs import get_codec
    from wsicodec.paths import check_output_against_inputs, slide_inputs
    from wsicodec.pipeline import check_tile_size, compress, plan_tile_count

    check_output_against_inputs(args.output, slide_inputs(args.input))   # before anything
    check_tile_size(args.tile_size)
    options = dict(_parse_option(o) for o in args.option)
    if args.min_psnr is not None:
        if args.codec != "auto":
            raise _UsageError(f"--min-psnr sets the auto codec's floor; --codec {args.codec} has "
                              "none (use --codec auto, the default)")
        if "min_psnr" in options:
            raise _UsageError("min_psnr given twice (--min-psnr and --option)")
        options["min_psnr"] = args.min_psnr
    codec = get_codec(args.codec, args.quality, **options)
    show = not args.quiet and sys.stderr.isatty()
    total = plan_tile_count(args.input, args.tile_size) if show else None
    with _progress_bar(total, not show, "compress") as bar:
        result = compress(args.input, args.output, codec, tile_size=args.tile_size,
                          workers=args.workers, overwrite=args.overwrite, progress=bar.update,
                          associated=args.associated, resume=args.resume,
                          deidentify=args.deidentify)
    if args.quiet:
        return 0
    w, h = result.dimensions
    mp = w * h / 1e6
    conf = ", ".join(f"{k}={v}" for k, v in codec.to_dict()["configuration"].items())
    print(f"compressed {result.source} -> {result.output} with {codec.name} ({conf})")
    if result.resumed_tiles:
        print(f"  resumed: {result.resumed_tiles} of {result.tiles} tiles taken over from the "
              "interrupted run, the rest coded now")
    elif args.resume:
        print("  --resume: no interrupted run of this slide to this output with these "
              "settings was found; coded from the beginning")
    speed = ("" if result.resumed_tiles else
             f" ({mp / max(result.seconds, 1e-9):.2f} MP/s level 0)")   # a resumed run's is not
    print(f"  {w} x {h} px, {result.levels} levels, {result.tiles} tiles, "
          f"{result.seconds:.1f} s{speed}")
    if result.tile_size and result.tile_size != args.tile_size:
        print(f"  tile size {result.tile_size}: --tile-size {args.tile_size} is more than "
              f"this {w} x {h} px slide needs")
    if result.deidentified:
        print(f"  {_deidentified_line(result.deidentified)}")
    print(f"  source {_mb(result.source_bytes)}, container {_mb(result.container_bytes)} "
          f"(tiles {_mb(result.tile_bytes)}, associated images {_mb(result.associated_bytes)}); "
          f"ratio {result.ratio_vs_source:.2f}:1 vs source file, {result.ratio_vs_raw:.1f}:1 vs "
          "raw RGB level 0")
    return 0


def _cmd_decompress(args: argparse.Namespace) -> int:
    from wsicodec.paths import check_output_against_inputs
    from wsicodec.readback import container_tile_count, decompress
    from wsicodec.tiff import TiffSettings

    check_output_against_inputs(args.output, [args.input])   # before anything
    settings = TiffSettings(args.tiff_compression, args.tiff_quality)
    show = not args.quiet and sys.stderr.isatty()
    total = container_tile_count(args.input) if show else None
    with _progress_bar(total, not show, "decompress") as bar:
        result = decompress(args.input, args.output, settings=settings, workers=args.workers,
                            overwrite=args.overwrite, progress=bar.update,
                            precision=args.precision, deidentify=args.deidentify,
                            format=args.format)
    if args.quiet:
        return 0
    w, h = result.dimensions
    print(f"decompressed {result.source} -> {result.output}: {w} x {h} px, {result.levels} "
          f"levels, {result.format.upper()} {_mb(result.output_bytes)} "
          f"({args.tiff_compression}), {result.seconds:.1f} s")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from wsicodec.container import open_container

    with open_container(args.input) as c:
        info = c.info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    codec = info["codec"]
    conf = ", ".join(f"{k}={v}" for k, v in codec.get("configuration", {}).items()
                     if k != "model_id")   # the model's sha256 follows on the same line
    src = info["source"]
    print(f"{info['path']}: {info['format']} container v{info['format_version']} "
          f"({info.get('software')})")
    print(f"  codec: {codec.get('name')} ({conf})"
          + (f", model sha256 {info['model_sha256']}" if info.get("model_sha256") else ""))
    name = src.get("name") or ("name left out" if info.get("deidentified") else "name not recorded")
    print(f"  source: {name} ({src.get('vendor')}), "
          f"{_mb(src['bytes']) if src.get('bytes') else '? MB'}")
    mpp, power = info.get("mpp"), info.get("objective_power")
    print(f"  mpp: {f'{mpp[0]:g} x {mpp[1]:g} um/px' if mpp else 'not recorded'}, objective power: "
          f"{f'{power:g}x' if power else 'not recorded'}")
    formats = info.get("associated_formats") or {}
    sizes = info.get("associated_bytes") or {}
    assoc = [f"{n} ({_ASSOCIATED_LABELS.get(formats.get(n, 'png'), formats.get(n))}"
             + (f", {_mb(sizes[n])})" if n in sizes else ")") for n in info["associated_images"]]
    print(f"  tile size: {info['tile_size']}, associated images: {', '.join(assoc) or 'none'}")
    for n, lv in enumerate(info["levels"]):
        nbytes = info["level_bytes"][n] if n < len(info["level_bytes"]) else 0
        print(f"  level {n}: {lv['width']} x {lv['height']} (downsample {lv['downsample']:.3f}), "
              f"{lv['cols']} x {lv['rows']} tiles, {_mb(nbytes)}")
    ratio = f", ratio {src['bytes'] / info['container_bytes']:.2f}:1 vs source" \
        if src.get("bytes") else ""
    print(f"  container: {_mb(info['container_bytes'])}{ratio}")
    print("  integrity: " + ("tiles, associated images and metadata carry digests"
                             if not info.get("missing_guarantees") else
                             "CRC32 per tile only (written before format 3: no digests)"))
    if info.get("deidentified"):
        print(f"  {_deidentified_line(info['deidentified'])}")
    if info.get("fidelity") is not None:        # format 4: the per-tile fidelity map
        from wsicodec.fidelity import summary_lines
        print("\n".join(f"  {line}" for line in summary_lines(info["fidelity"])))
    return 0


def _printable(name: object) -> str:
    """A name from a slide as one printable line: control characters escaped (an NDPI
    property name holds carriage returns)."""
    text = str(name)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _deidentified_line(record: dict[str, Any]) -> str:
    """"de-identified: removed 9 properties (aperio.Date, ...), the label, macro images
    and the source file name; 2 DICOM UIDs replaced" from a container's record."""
    props = [_printable(n) for n in record.get("removed_properties") or []]
    images = [_printable(n) for n in record.get("removed_associated_images") or []]
    uids = list(record.get("replaced_uids") or [])
    parts = [f"{len(props)} propert{'y' if len(props) == 1 else 'ies'}"
             + (f" ({', '.join(props)})" if props else "")]
    if images:
        parts.append(f"the {', '.join(images)} image{'s' if len(images) > 1 else ''}")
    if record.get("removed_source_name"):
        parts.append("the source file name")
    text = "de-identified: removed " + (", ".join(parts[:-1]) + " and " + parts[-1]
                                        if len(parts) > 1 else parts[0])
    if uids:
        text += f"; {len(uids)} DICOM UID{'s' if len(uids) > 1 else ''} replaced by new ones"
    return text


def _cmd_verify(args: argparse.Namespace) -> int:
    from wsicodec.readback import container_tile_count, verify

    show = not args.quiet and not args.json and sys.stderr.isatty()
    total = container_tile_count(args.input) if show else None
    with _progress_bar(total, not show, "verify") as bar:
        result = verify(args.input, decode=args.decode, progress=bar.update)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif not args.quiet:
        for *_, message in result.damaged_levels + result.damaged_tiles + result.damaged_associated:
            print(message)   # each names the tile (level, col, row) or the image
        what = "decoded" if result.decoded else (
            "CRC-checked" if result.missing_guarantees else "checked (CRC32, digest"
            + (", fidelity map)" if result.format_version >= 4 else ")"))
        print(f"{result.path}: {result.tiles} tiles {what}, {result.associated} associated images "
              f"decoded: {result.damage if not result.ok else 'all intact'} "
              f"({result.seconds:.1f} s)")
        for gap in result.missing_guarantees:
            print(f"  note: a format-{result.format_version} container cannot prove this: {gap}")
    if result.ok:
        return 0
    raise WsiCodecError(f"{args.input}: {result.damage}" + ("" if args.quiet else " (listed above)"))


def _cmd_codecs(args: argparse.Namespace) -> int:
    from wsicodec.codecs import SUMMARIES, available_codecs, known_codecs

    usable = set(available_codecs())
    for name in known_codecs():
        mark = "" if name in usable else "  (not available here)"
        default = "  [default]" if name == DEFAULT_CODEC else ""
        about = f"\n    {SUMMARIES[name]}" if name in SUMMARIES else ""
        print(f"{name}{default}{mark}{about}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from wsicodec.batch import DecoderSettings
    from wsicodec.server import ServerSettings, make_server

    if args.cache_mb < 0:
        raise _UsageError(f"--cache-mb must be >= 0, got {args.cache_mb}")
    if args.threads is not None:
        if not 1 <= args.threads <= 256:
            raise _UsageError(f"--threads must be in 1..256, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    settings = ServerSettings(
        jpeg_quality=args.jpeg_quality,
        decoder=DecoderSettings(cache_bytes=args.cache_mb * 1024 * 1024,
                                workers=args.workers, device=args.device,
                                precision=args.precision),
        timeout=args.timeout, max_connections=args.max_connections,
        allow_hosts=tuple(args.allow_host), deidentify=args.deidentify,
        cors_origins=tuple(args.cors))
    server = make_server(args.slides, args.host, args.port, settings)
    try:
        if not server.loopback_only:
            print(f"{PROG}: warning: listening on {server.server_address[0]}, not a loopback "
                  "address, and the server has no authentication: anyone who reaches this "
                  "port reads every slide"
                  + (" (de-identified)" if settings.deidentify else ", its label and its properties")
                  + " (put it behind an authenticating proxy, see docs/server-security.md)",
                  file=sys.stderr,
                  flush=True)
        print(f"serving {len(server.slides.slides)} slide(s)"
              f"{', de-identified,' if settings.deidentify else ''} at {server.url} "
              f"(Ctrl-C to stop)", flush=True)
        for name in server.slides.slides:
            print(f"  {server.url}slides/{name}.dzi", flush=True)
        if not server.viewer_available:
            print("  note: OpenSeadragon not installed, the viewer page will say so "
                  "(npm ci --prefix wsicodec/static)", file=sys.stderr, flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


_COMMANDS = {"compress": _cmd_compress, "decompress": _cmd_decompress, "info": _cmd_info,
             "verify": _cmd_verify, "codecs": _cmd_codecs, "serve": _cmd_serve}


def _one_line(error: BaseException) -> str:
    return " ".join(error_text(error).split())


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _sigterm_interrupts() -> Any:
    """Make SIGTERM (``kill``, a batch scheduler's time limit) stop like Ctrl-C: cleanup
    runs, an interrupted compress keeps its finished rows. Main thread only; returns the
    handler it replaced (None where it did nothing)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (never raises, except with --debug)."""
    args_list: Sequence[str] = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args_list
    previous = _sigterm_interrupts()
    try:
        return _main(args_list, debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args_list: Sequence[str], debug: bool) -> int:
    try:
        args = build_parser().parse_args(list(args_list))
        return _COMMANDS[args.command](args)
    except _VersionRequested:
        from wsicodec import __version__

        print(f"{PROG} {__version__}")
        return 0
    except _UsageError as e:
        return _fail(str(e), EXIT_USAGE)
    except CompressInterrupted as e:
        return _fail(f"interrupted: {e}; the same command with --resume continues from there "
                     "(or delete it)", EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except PartialKeptError as e:
        if debug:
            raise
        return _fail(f"{_one_line(e)}; fix that and run the same command with --resume to "
                     "continue (or delete it)", EXIT_ERROR)
    except BrokenPipeError:
        # the reader of our output went away (`wsicodec info x | head`): stop quietly,
        # as Unix tools do, and keep Python from complaining when it flushes stdout
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_BROKEN_PIPE
    except (WsiCodecError, OSError) as e:
        if debug:
            raise
        return _fail(_one_line(e), EXIT_ERROR)
    except Exception as e:
        if type(e).__module__.startswith("openslide"):
            if debug:
                raise
            return _fail(_one_line(e), EXIT_ERROR)
        if debug:
            raise
        return _fail(f"unexpected {type(e).__name__}: {_one_line(e)} "
                     "(run with --debug for a traceback)", EXIT_ERROR)


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
