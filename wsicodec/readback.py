"""Reading a container back: checking it (verify) and writing it out as a TIFF (decompress).

verify::

    open_container ─► per level: check_level (CRC / digest arrays, format 4's fidelity map)
        ─► per tile row: read_encoded_tile (CRC32, digest) or read_tiles (decode too)
        ─► every associated image ─► VerifyResult (damage listed, never raised)

decompress::

    open_container ─► per level, row-major: Container.read_tiles on a thread pool
        ─► write_pyramidal_tiff (generic TIFF) or write_svs (Aperio SVS, with the
           associated images) to a temp sibling ─► atomic rename
    or ─► wsidicom writes a DICOM WSI series (wsicodec.dicom) into a temp sibling
           folder ─► atomic rename

Library code: raises, never prints; progress is reported through a callback
(:data:`wsicodec.pipeline.Progress`).
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from wsicodec.codecs import check_precision
from wsicodec.container import open_container
from wsicodec.dicom import DicomSettings
from wsicodec.errors import (CorruptDataError, CorruptTileError, InvalidSettingError,
                             UnsupportedFormatError)
from wsicodec.metadata import ContainerMetadata, missing_guarantees
from wsicodec.paths import check_output_against_inputs, check_output_path
from wsicodec.pipeline import Progress, check_workers
from wsicodec.tiff import TiffSettings, write_pyramidal_tiff


#: what ``decompress`` writes: a generic pyramidal TIFF, an Aperio-compatible SVS, or a
#: folder holding a DICOM WSI series
OUTPUT_FORMATS = ("tiff", "svs", "dicom")


def output_format(output: str | os.PathLike[str], fmt: str | None) -> str:
    """``fmt``, or when None the format ``output``'s name asks for: ``svs`` for a ``.svs``
    file, ``tiff`` otherwise (``dicom`` is asked for by name only). Raises InvalidSettingError for an unknown ``fmt``."""
    if fmt is None:
        return "svs" if str(output).lower().endswith(".svs") else "tiff"
    if fmt not in OUTPUT_FORMATS:
        raise InvalidSettingError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, "
                                  f"got {fmt!r}")
    return fmt


def container_tile_count(path: str | os.PathLike[str]) -> int:
    """Total tiles of a container, all levels (opens it briefly): what decompress and
    verify go through. Raises as :func:`wsicodec.container.open_container`."""
    with open_container(path) as c:
        return sum(c.grid(level).tile_count for level in range(c.level_count))


@dataclass(frozen=True)
class DecompressResult:
    source: Path
    output: Path
    dimensions: tuple[int, int]
    levels: int
    output_bytes: int
    seconds: float
    #: what was written: "tiff", "svs" or "dicom" (:data:`OUTPUT_FORMATS`)
    format: str = "tiff"
    #: ``dicom``: the files of the series, in the output folder
    files: tuple[Path, ...] = ()


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify` found: every damaged tile and associated image, by name."""

    path: Path
    tiles: int
    associated: int
    decoded: bool
    damaged_tiles: tuple[tuple[int, int, int, str], ...]   # (level, col, row, message)
    damaged_associated: tuple[tuple[str, str], ...]         # (name, message)
    seconds: float
    #: the container's format version, and what that version cannot prove
    #: (:func:`wsicodec.metadata.missing_guarantees`; empty for format 3)
    format_version: int = 3
    missing_guarantees: tuple[str, ...] = ()
    #: (level, message) of each level whose CRC or digest array (or, in format 4, its
    #: fidelity map) is damaged: none of its tiles can be checked (they count as damaged)
    damaged_levels: tuple[tuple[int, int, str], ...] = ()   # (level, tiles, message)

    @property
    def ok(self) -> bool:
        return not self.damaged_tiles and not self.damaged_associated and not self.damaged_levels

    @property
    def damage(self) -> str:
        """"2 of 29 tiles and 1 of 1 associated images damaged"."""
        tiles = len(self.damaged_tiles) + sum(n for _, n, _ in self.damaged_levels)
        return (f"{tiles} of {self.tiles} tiles and "
                f"{len(self.damaged_associated)} of {self.associated} associated images damaged")

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "ok": self.ok, "tiles": self.tiles,
                "associated_images": self.associated, "decoded": self.decoded,
                "damaged_tiles": [{"level": lv, "col": c, "row": r, "error": m}
                                  for lv, c, r, m in self.damaged_tiles],
                "damaged_associated_images": [{"name": n, "error": m}
                                              for n, m in self.damaged_associated],
                "damaged_levels": [{"level": lv, "tiles": n, "error": m}
                                   for lv, n, m in self.damaged_levels],
                "format_version": self.format_version,
                "missing_guarantees": list(self.missing_guarantees),
                "seconds": round(self.seconds, 3)}


def verify(path: str | os.PathLike[str], *, decode: bool = False, workers: int | None = None,
           progress: Progress | None = None) -> VerifyResult:
    """Check every tile of a container against its CRC32 and, in format 3, its digest
    (which binds it to its level, column, row and container: a tile moved or spliced in
    fails); ``decode``: decode it too, checking its geometry and, for the learned codec,
    its symbols' checksum (row by row on ``workers`` threads, as ``decompress``:
    :func:`decoded_rows`).  In format 4, each level's fidelity map is checked against
    the level digest and for consistency (kinds, PSNR ranges, sizes summing to the
    level's bytes; a damaged map makes its level a damaged level), and each tile's size
    against its record.  Decode every associated image (checking its digest).  The
    metadata (and, in format 3, its digest) is checked when the container opens.
    Damage is reported in the result, never raised.

    Raises as :func:`wsicodec.container.open_container` (not a container, unsupported
    version, damaged metadata), ModelMismatchError (``decode``, other weights),
    WsiCodecError (``decode``, the codec cannot be built here) and InvalidSettingError
    (``workers``).
    """
    t0 = time.perf_counter()
    workers = check_workers(workers)
    bad_tiles: list[tuple[int, int, int, str]] = []
    bad_assoc: list[tuple[str, str]] = []
    bad_levels: list[tuple[int, int, str]] = []
    tiles = 0
    with open_container(path) as c:
        for level in range(c.level_count):
            grid = c.grid(level)
            try:
                c.check_level(level)
            except CorruptDataError as e:     # its CRC / digest arrays: no tile checkable
                bad_levels.append((level, grid.tile_count, str(e)))
                tiles += grid.tile_count
                if progress:
                    progress(grid.tile_count)
                continue
            rows = decoded_rows(c, level, workers) if decode else ((r, None) for r in range(grid.rows))
            for row, got in rows:
                # a damaged row: which tiles, one by one
                keys = [] if isinstance(got, list) else [(col, row) for col in range(grid.cols)]
                for col, _ in keys:
                    try:
                        if decode:
                            c.read_tile(level, col, row)
                        else:
                            c.read_encoded_tile(level, col, row)
                    except CorruptTileError as e:
                        bad_tiles.append((level, col, row, str(e)))
                tiles += grid.cols
                if progress:
                    progress(grid.cols)
        for name in c.associated_image_names():
            try:
                c.read_associated_image(name)
            except (CorruptDataError, UnsupportedFormatError) as e:
                bad_assoc.append((name, str(e)))
        n_assoc = len(c.associated_image_names())
        version = c.metadata.format_version
    return VerifyResult(Path(path), tiles, n_assoc, decode, tuple(bad_tiles), tuple(bad_assoc),
                        time.perf_counter() - t0, version, tuple(missing_guarantees(version)),
                        tuple(bad_levels))


#: a row-by-row decode prefetches the row this many rows on (:func:`decoded_rows`): a
#: row's read decodes the row after it itself, since its tiles read that row's latents
PREFETCH_ROWS = 2


def _ordered_decode(container, level: int, workers: int,  # type: ignore[no-untyped-def]
                    progress: Progress | None) -> Iterator[np.ndarray]:
    """Decode a level's tiles row-major (:func:`decoded_rows`); raises the first damaged
    tile's CorruptTileError."""
    for _, tiles in decoded_rows(container, level, workers):
        if isinstance(tiles, BaseException):
            raise tiles
        for tile in tiles:
            if progress:
                progress(1)
            yield tile


def decoded_rows(container, level: int, workers: int  # type: ignore[no-untyped-def]
                 ) -> Iterator[tuple[int, list[np.ndarray] | CorruptTileError]]:
    """A level's tile rows in order, each decoded by one
    :meth:`~wsicodec.container.Container.read_tiles` call, its work on a pool of
    ``workers`` threads (the learned codec stitches each tile with its neighbours):
    (row, its tiles), or (row, the CorruptTileError its first damaged tile raised).
    While a row is decoded, the row after the next is prefetched
    (:meth:`~wsicodec.container.Container.prefetch_tiles`: the learned codec's latents,
    on the same pool), so that its entropy decoding overlaps this row's g_s."""
    grid = container.grid(level)
    try:
        container.check_level(level)     # read once here, not by two threads at once
    except CorruptDataError:
        pass                             # the row reads say which tiles it costs
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsicodec-decode") as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsicodec-prefetch") as ahead:
        def run(fn, items: list) -> list:  # noqa: ANN001
            return [_outcome(f) for f in [pool.submit(fn, it) for it in items]]

        def prefetch(row: int) -> None:
            try:
                container.prefetch_tiles(level, [(col, row) for col in range(grid.cols)], run=run)
            except Exception:  # noqa: BLE001 - advisory: reading the row says what is wrong
                pass

        for row in range(grid.rows):
            if row + PREFETCH_ROWS < grid.rows:
                ahead.submit(prefetch, row + PREFETCH_ROWS)
            try:
                tiles: list[np.ndarray] | CorruptTileError = container.read_tiles(
                    level, [(col, row) for col in range(grid.cols)], run=run)
            except CorruptTileError as e:
                tiles = e
            yield row, tiles


def _outcome(f: Future) -> Any:
    try:
        return f.result()
    except Exception as e:  # noqa: BLE001 - kept per item, raised by the reader
        return e


def _tiff_description(meta: ContainerMetadata, deidentify: bool) -> str:
    name = None if deidentify else meta.source_name
    return f"wsicodec pyramid from {name or 'a container'} ({meta.codec.get('name')})"


def decompress(source: str | os.PathLike[str], output: str | os.PathLike[str], *,
               settings: TiffSettings = TiffSettings(), workers: int | None = None,
               overwrite: bool = False, progress: Progress | None = None,
               precision: str = "float32", deidentify: bool = False,
               format: str | None = None,  # noqa: A002 - the CLI's name
               dicom: "DicomSettings | None" = None) -> DecompressResult:
    """Write a container out as a pyramidal TIFF, an SVS or a DICOM WSI series
    (atomically: temp sibling + rename), with its mpp and ICC profile.

    ``format``: ``tiff`` (a generic pyramidal TIFF: pages of levels, mpp as resolution
    tags; no properties or associated images; its ImageDescription names the source
    file), ``svs`` (:mod:`wsicodec.svs`: an Aperio-compatible SVS with the objective
    power, the ``aperio.*`` properties and the label, macro and thumbnail), ``dicom``
    (:mod:`wsicodec.dicom`: ``output`` is a folder, written by wsidicom, holding one
    DICOM WSI file per level and per associated image, its frames coded as ``dicom``
    says; needs the container's mpp), or None: svs for a ``.svs`` output, tiff
    otherwise.  ``settings`` is the TIFF's and SVS's tile coding.  ``deidentify``: leave
    out the source file name, and in an SVS or DICOM the label, the macro and (SVS) the
    properties ``compress --deidentify`` removes.  ``precision``: how the learned codec runs g_s
    (:data:`wsicodec.codecs.PRECISIONS`).

    Raises:
        OutputPathError: ``output`` is the container or lies inside it (a ``.zarr``
            directory), whatever ``overwrite``; or its folder does not exist.
        SlideNotFoundError, UnsupportedFormatError, CorruptDataError: the container.
        CorruptTileError: a damaged tile (nothing is left at ``output``).
        OutputExistsError: ``output`` exists and ``overwrite`` is false (or, for
            ``dicom``, is a folder holding other files than DICOM ones).
        InvalidSettingError: an unknown ``format``; ``dicom`` without an mpp.
        CodecUnavailableError: ``dicom`` without wsidicom installed.
    """
    t0 = time.perf_counter()
    out_path = Path(output)
    fmt = output_format(out_path, format)
    check_output_against_inputs(out_path, [source])
    n_workers = check_workers(workers)
    check_precision(precision)
    check_output_path(out_path, overwrite)
    if fmt == "dicom":
        return _decompress_dicom(source, out_path, dicom or DicomSettings(), n_workers,
                                 progress, precision, deidentify, t0)
    tmp = out_path.parent / f".{out_path.name}.partial-{uuid.uuid4().hex[:8]}"
    with open_container(source, precision=precision) as c:
        meta = c.metadata
        _ = c.codec  # build (and check) the codec before creating any file
        dims = [lv.dimensions for lv in meta.levels]
        tiles = lambda level: _ordered_decode(c, level, n_workers, progress)  # noqa: E731
        try:
            if fmt == "svs":
                from wsicodec.svs import write_container_svs

                write_container_svs(c, tmp, tiles, settings=settings, deidentify=deidentify)
            else:
                write_pyramidal_tiff(tmp, dims, meta.tile_size, tiles, mpp=meta.mpp,
                                     settings=settings,
                                     description=_tiff_description(meta, deidentify),
                                     icc_profile=meta.icc_profile)
            os.replace(tmp, out_path)
        finally:
            tmp.unlink(missing_ok=True)
    return DecompressResult(Path(source), out_path, meta.levels[0].dimensions, len(meta.levels),
                            out_path.stat().st_size, time.perf_counter() - t0, fmt)


def _decompress_dicom(source: str | os.PathLike[str], out_path: Path, dicom: DicomSettings,
                      workers: int, progress: Progress | None, precision: str,
                      deidentify: bool, t0: float) -> DecompressResult:
    """:func:`decompress`'s ``dicom`` branch (the checks on ``out_path`` are done)."""
    from wsicodec.dicom import write_container_dicom

    with open_container(source, precision=precision) as c:
        meta = c.metadata
        _ = c.codec  # build (and check) the codec before creating any file
        files = write_container_dicom(c, out_path, dicom, workers=workers,
                                      deidentify=deidentify, progress=progress)
    return DecompressResult(Path(source), out_path, meta.levels[0].dimensions, len(meta.levels),
                            sum(f.stat().st_size for f in files), time.perf_counter() - t0,
                            "dicom", tuple(files))
