"""Command line: ``wsicodec compress | decompress | info | codecs | serve``.

The only module that prints or exits. Every expected error becomes one line
``wsicodec: error: ...`` on stderr and a non-zero exit status (1; 2 for usage errors;
130 when interrupted: Ctrl-C or SIGTERM), with no traceback and no partial output at
the output path (an interrupted ``compress`` keeps its finished tile rows in a hidden
sibling for ``--resume`` and says where).
``--debug`` re-raises unexpected exceptions with their traceback.

Here: running the commands; their arguments and help: :mod:`wsicodec.cliargs`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any, Sequence

from wsicodec.cliargs import PROG, UsageError, VersionRequested, build_parser, parse_option
from wsicodec.codecs import DEFAULT_CODEC
from wsicodec.errors import CompressInterrupted, PartialKeptError, WsiCodecError, error_text

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool its reader left

_ASSOCIATED_LABELS = {"png": "PNG", "jxl": "JPEG-XL"}


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _progress_bar(total: int | None, quiet: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tile", file=sys.stderr,
                disable=quiet or not sys.stderr.isatty(), leave=False)


def _codec_options(args: argparse.Namespace) -> dict[str, Any]:
    """The codec options of ``compress`` / ``compress-many``: ``--option``s and ``--min-psnr``.
    Raises UsageError for a floor without the auto codec, or given twice."""
    options = dict(parse_option(o) for o in args.option)
    if args.min_psnr is not None:
        if args.codec != "auto":
            raise UsageError(f"--min-psnr sets the auto codec's floor; --codec {args.codec} has "
                              "none (use --codec auto, the default)")
        if "min_psnr" in options:
            raise UsageError("min_psnr given twice (--min-psnr and --option)")
        options["min_psnr"] = args.min_psnr
    return options


def _cmd_compress(args: argparse.Namespace) -> int:
    from wsicodec.codecs import get_codec
    from wsicodec.paths import check_output_against_inputs, slide_inputs
    from wsicodec.pipeline import check_tile_size, compress, plan_tile_count

    check_output_against_inputs(args.output, slide_inputs(args.input))   # before anything
    check_tile_size(args.tile_size)
    codec = get_codec(args.codec, args.quality, **_codec_options(args))
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
    if getattr(codec, "scanner_tiles", False):
        from wsicodec.scannertiles import scanner_tiling
        tiling = scanner_tiling(args.input)
        # a JPEG scan's blocks are recovered on any grid of 16 px (docs/auto-codec.md: on
        # cmu the default grid then took fewer bytes than the scanner's at 32 and 36 dB)
        recovered = tiling is not None and tiling[1] == "jpeg" and getattr(codec, "recovered_jpeg", False)
        if tiling is not None and tiling[0] != result.tile_size and not recovered:
            print(f"  the source's level 0 is scanner tiles of {tiling[0]} px: with --tile-size {tiling[0]} "
                  "auto can keep each as the scanner stored it (losslessly), where that is smaller")
    print(f"  source {_mb(result.source_bytes)}, container {_mb(result.container_bytes)} "
          f"(tiles {_mb(result.tile_bytes)}, associated images {_mb(result.associated_bytes)}); "
          f"ratio {result.ratio_vs_source:.2f}:1 vs source file, {result.ratio_vs_raw:.1f}:1 vs "
          "raw RGB level 0")
    return 0


def _cmd_decompress(args: argparse.Namespace) -> int:
    from wsicodec.dicom import DEFAULT_DICOM_SYNTAX, DicomSettings
    from wsicodec.paths import check_output_against_inputs
    from wsicodec.readback import container_tile_count, decompress, output_format
    from wsicodec.tiff import TiffSettings

    check_output_against_inputs(args.output, [args.input])   # before anything
    settings = TiffSettings(args.tiff_compression, args.tiff_quality)
    quality = args.dicom_quality
    if output_format(args.output, args.format) != "dicom":
        if args.transfer_syntax is not None or quality is not None or args.mpp is not None:
            raise UsageError("--transfer-syntax, --dicom-quality and --mpp are for --format dicom")
    elif quality is not None and quality == int(quality):
        quality = int(quality)
    dicom = DicomSettings(args.transfer_syntax or DEFAULT_DICOM_SYNTAX, quality, args.mpp)
    show = not args.quiet and sys.stderr.isatty()
    total = container_tile_count(args.input) if show else None
    with _progress_bar(total, not show, "decompress") as bar:
        result = decompress(args.input, args.output, settings=settings, workers=args.workers,
                            overwrite=args.overwrite, progress=bar.update,
                            precision=args.precision, deidentify=args.deidentify,
                            format=args.format, dicom=dicom)
    if args.quiet:
        return 0
    w, h = result.dimensions
    coding = dicom.describe() if result.format == "dicom" else args.tiff_compression
    files = f"{len(result.files)} files, " if result.files else ""
    print(f"decompressed {result.source} -> {result.output}: {w} x {h} px, {result.levels} "
          f"levels, {result.format.upper()} {files}{_mb(result.output_bytes)} "
          f"({coding}), {result.seconds:.1f} s")
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
        result = verify(args.input, decode=args.decode, workers=args.workers, progress=bar.update)
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
        raise UsageError(f"--cache-mb must be >= 0, got {args.cache_mb}")
    if args.threads is not None:
        if not 1 <= args.threads <= 256:
            raise UsageError(f"--threads must be in 1..256, got {args.threads}")
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


def _cmd_compress_many(args: argparse.Namespace) -> int:
    from pathlib import Path

    from wsicodec.cluster import (ClusterSettings, CodecSpec, Run, assign_names, connect,
                                  dashboard_link, expand_sources, report_csv, report_json,
                                  write_text_atomic)
    from wsicodec.codecs import get_codec
    from wsicodec.pipeline import check_tile_size
    check_tile_size(args.tile_size)
    if args.workers is not None and (args.scheduler or args.scheduler_file):
        raise UsageError("--workers sizes the local cluster; a running scheduler has its own workers")
    if args.task_tiles < 1:
        raise UsageError(f"--task-tiles must be at least 1, got {args.task_tiles}")
    options = _codec_options(args)
    codec = get_codec(args.codec, args.quality, **options)      # bad settings fail here
    out_dir = Path(args.out_dir)
    jobs = assign_names(expand_sources(args.sources, skip=[out_dir]), out_dir)
    if not jobs:
        raise WsiCodecError(f"no slides found in {' '.join(args.sources)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    talk = not args.quiet and not args.json
    for j in jobs:
        if talk and j.name != j.wanted:
            print(f"name clash: {j.source} -> {j.output.name} ({j.wanted} is taken)")
    spec = CodecSpec(args.codec, args.quality, tuple(sorted(options.items())))
    kwargs = {"tile_size": args.tile_size, "overwrite": args.overwrite, "resume": args.resume,
              "associated": args.associated, "deidentify": args.deidentify}
    settings = ClusterSettings(args.scheduler, args.scheduler_file, args.workers)
    interrupted = False
    with connect(settings) as client:
        link = dashboard_link(client)
        if talk:
            workers = client.scheduler_info().get("workers", {})
            print(f"{len(jobs)} slide(s) -> {out_dir} on {len(workers)} Dask worker(s) at "
                  f"{client.scheduler.address}; dashboard: {link or 'none (pip install bokeh)'}",
                  flush=True)
        show = talk and sys.stderr.isatty()
        with _progress_bar(len(jobs), not show, "slides") as slides, \
                _progress_bar(0, not show, "tiles") as tiles:
            def on_slide(rep: Any) -> None:
                slides.update(1)
                if talk:
                    tiles.write(_slide_line(rep), file=sys.stdout)

            def on_total(n: int) -> None:
                tiles.total = (tiles.total or 0) + n
                tiles.refresh()

            run = Run(client, jobs, spec, codec, compress_kwargs=kwargs, task_tiles=args.task_tiles,
                      on_tiles=tiles.update, on_slide=on_slide, on_total=on_total)
            try:
                reports = run.run()
            except KeyboardInterrupt:
                interrupted, reports = True, run.reports
    write_text_atomic(out_dir / "report.csv", report_csv(reports))
    if args.json:
        print(report_json(reports, out_dir=str(out_dir), dashboard=link))
    failed = [r for r in reports if r.status == "failed"]
    kept = [r for r in reports if r.status == "interrupted"]
    if talk:
        ok = [r for r in reports if r.ok]
        print(f"{len(ok)} of {len(reports)} slide(s) complete, {len(failed)} failed, "
              f"{len(kept)} interrupted; report: {out_dir / 'report.csv'}")
    if interrupted or (run.stopped and not run.cluster_lost):
        return _fail(f"interrupted: {len(kept)} slide(s) kept their finished rows; the same "
                     "command with --resume continues", EXIT_INTERRUPTED)
    if run.cluster_lost:
        return _fail(f"{run.cluster_lost}; {len(kept)} slide(s) kept their finished rows, the "
                     "same command with --resume continues", EXIT_ERROR)
    if failed:
        return _fail(f"{len(failed)} of {len(reports)} slide(s) failed (listed in "
                     f"{out_dir / 'report.csv'}): " + "; ".join(f"{r.name}: {r.error}" for r in failed[:3])
                     + (" ..." if len(failed) > 3 else ""), EXIT_ERROR)
    return 0


def _slide_line(rep: Any) -> str:
    """One line for a finished slide of ``compress-many``."""
    if not rep.ok:
        return f"{rep.status:11s} {rep.name}: {rep.error}"
    speed = f", {rep.level0_mp / max(rep.seconds, 1e-9):.2f} MP/s" if rep.status == "done" else ""
    return (f"{rep.status:11s} {rep.name}: {rep.level0_mp:.1f} MP, {_mb(rep.container_bytes)}, "
            f"ratio {rep.ratio:.2f}:1, {rep.seconds:.1f} s{speed}")


_COMMANDS = {"compress": _cmd_compress, "compress-many": _cmd_compress_many,
             "decompress": _cmd_decompress, "info": _cmd_info,
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
    except VersionRequested:
        from wsicodec import __version__

        print(f"{PROG} {__version__}")
        return 0
    except UsageError as e:
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


# PROG and build_parser live in wsicodec.cliargs; re-exported
__all__ = ["EXIT_BROKEN_PIPE", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_USAGE", "PROG",
           "build_parser", "entry", "main"]
