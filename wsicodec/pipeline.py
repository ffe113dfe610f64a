"""Compression end to end: slide -> container.  (Reading it back, verify and decompress:
:mod:`wsicodec.readback`.)

compress::

    open_source ─► plan_pyramid ─► iter_strips (tile rows) ─► iter_tiles (padded)
        ─► thread pool: codec.encode (bounded in-flight) ─► ContainerWriter.write_row
        ─► commit (atomic rename)

A codec that asks for neighbour ``context`` (:attr:`~wsicodec.codecs.TileCodec.context`:
the learned codec) gets each tile together with that many pixels of its neighbours,
taken from the strips above and below (:mod:`wsicodec.tiling.context`), so its tile borders
sit inside the coded area and stitched tiles show no seams; its tiles of one row are
coded in batches (``encode_tiles``).

Library code: raises, never prints; progress is reported through a callback.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import dataclasses

from wsicodec.associated import associated_format
from wsicodec.codecs import TileCodec
from wsicodec.errors import (CompressInterrupted, InvalidSettingError, PartialKeptError,
                             WsiCodecError)
from wsicodec.iccprofile import source_icc_profile
from wsicodec.metadata import ContainerMetadata
from wsicodec.paths import check_output_against_inputs, check_output_path, slide_inputs
from wsicodec.scannertiles import ScannedRows
from wsicodec.store import path_size
from wsicodec.tiling import iter_strips, iter_tiles, open_source, plan_pyramid
from wsicodec.tiling.context import ContextTile, iter_context_strips, iter_context_tiles
from wsicodec.tiling.geometry import MIN_TILE_SIZE, validate_tile_size
from wsicodec.tiling.pyramid import PyramidPlan
from wsicodec.tiling.sources import SlideSource
from wsicodec.writer import ContainerWriter

#: tiles per network pass for codecs that batch (the learned codec)
BATCH_SIZE = 8

Progress = Callable[[int], None]
"""Called with the number of tiles just finished."""

EncodeRows = Callable[[ContainerWriter, SlideSource, PyramidPlan, TileCodec,
                       "set[tuple[int, int]]", "Progress | None"], None]
"""How compress codes the tile rows: ``encode_rows(writer, source, plan, codec, done,
progress)`` codes every (level, row) of ``plan`` not in ``done`` and stores it with
``writer.write_row`` (with :func:`row_records`), reporting tiles to ``progress``; it
raises what coding raised.  The default codes them in this process; :mod:`wsicodec.cluster`
codes them on a Dask cluster."""


#: the largest tile size compress writes (a 4096 px tile is 48 MiB of RGB, and codecs
#: need several times that to code it)
MAX_TILE_SIZE = 4096


def check_tile_size(tile_size: int) -> int:
    """``tile_size`` if compress accepts it (a multiple of 16 in [16, MAX_TILE_SIZE]).

    Raises InvalidSettingError, before anything is opened or allocated."""
    return validate_tile_size(tile_size, MAX_TILE_SIZE)


def fitted_tile_size(tile_size: int, level_dimensions: Sequence[tuple[int, int]]) -> int:
    """The tile size compress uses for a slide: ``tile_size``, but never more than the
    slide's largest level needs (its longer side rounded up to 16): a 512 x 512 image with
    tile size 8192 is one 512 px tile, not one 8192 px tile of padding."""
    w, h = level_dimensions[0]
    needed = max(MIN_TILE_SIZE, -(-max(int(w), int(h)) // 16) * 16)
    return min(tile_size, needed)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def check_workers(workers: int | None) -> int:
    """``workers`` if it is a thread count compress and decompress accept (an integer in
    [1, 256]); None: :func:`default_workers`.  Raises InvalidSettingError."""
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 256:
        raise InvalidSettingError(f"workers must be an integer in [1, 256], got {workers!r}")
    return workers


def source_file_bytes(path: Path, vendor: str) -> int:
    """Bytes of the source on disk. A DICOM slide is its folder's .dcm files together
    (OpenSlide reads all of them from any one)."""
    if vendor == "dicom":
        return sum(f.stat().st_size for f in path.parent.glob("*.dcm") if f.is_file())
    return path.stat().st_size


@dataclass(frozen=True)
class CompressResult:
    """What a compress run produced."""

    source: Path
    output: Path
    dimensions: tuple[int, int]
    levels: int
    tiles: int
    source_bytes: int
    container_bytes: int
    tile_bytes: int
    associated_bytes: int
    seconds: float
    #: tiles taken over from an interrupted run (``resume``), not encoded again
    resumed_tiles: int = 0
    #: the tile size used (less than asked when the slide is smaller: fitted_tile_size)
    tile_size: int = 0
    #: what ``deidentify`` left out (names only; see wsicodec.deidentify), or None
    deidentified: dict | None = None

    @property
    def raw_bytes(self) -> int:
        """Level 0 as raw 8-bit RGB."""
        return self.dimensions[0] * self.dimensions[1] * 3

    @property
    def ratio_vs_source(self) -> float:
        return self.source_bytes / max(self.container_bytes, 1)

    @property
    def ratio_vs_raw(self) -> float:
        return self.raw_bytes / max(self.container_bytes, 1)


class _RowCollector:
    """Keeps encoded tile futures in submission order, writes each tile row when all its
    tiles are done, and bounds how many tiles are in flight."""

    def __init__(self, writer: ContainerWriter, limit: int, progress: Progress | None) -> None:
        self._writer, self._limit, self._progress = writer, limit, progress
        self._rows: deque[tuple[int, int, list[Future[bytes]], int]] = deque()
        self._inflight = 0
        self._collected = 0  # futures of the oldest row already waited for

    def start_row(self, level: int, row: int, cols: int) -> list[Future[bytes]]:
        futures: list[Future[bytes]] = []
        self._rows.append((level, row, futures, cols))
        return futures

    def added(self) -> None:
        self._inflight += 1
        self.drain(self._limit)

    def drain(self, limit: int) -> None:
        """Wait for the oldest tiles until at most ``limit`` are in flight; write the
        rows that are complete. Re-raises an encoder's exception."""
        while self._rows:
            level, row, futures, cols = self._rows[0]
            if self._collected == cols:
                self._writer.write_row(level, row, [f.result() for f in futures])
                self._rows.popleft()
                self._collected = 0
                continue
            if self._inflight <= limit or self._collected >= len(futures):
                return
            futures[self._collected].result()
            self._collected += 1
            self._inflight -= 1
            if self._progress:
                self._progress(1)


def encode_context_row(codec: TileCodec, tiles: list[ContextTile], batch: int = BATCH_SIZE
                       ) -> list[bytes]:
    """One tile row of a codec that wants neighbour context (and no level encoder), coded
    in batches of ``batch`` tiles, as compress codes it."""
    out: list[bytes] = []
    for i in range(0, len(tiles), batch):
        chunk = tiles[i:i + batch]
        out += codec.encode_tiles([c.region for c in chunk], [c.box for c in chunk])
    return out


def _done_future(f: Future, futures: list[Future[bytes]]) -> None:
    try:
        results = f.result()
    except BaseException as exc:  # noqa: BLE001 - handed on to whoever waits
        for g in futures:
            g.set_exception(exc)
        return
    for g, r in zip(futures, results):
        g.set_result(r)


def compress_source(source: SlideSource, output: str | os.PathLike[str], codec: TileCodec, *,
                    tile_size: int = 256, workers: int | None = None, overwrite: bool = False,
                    progress: Progress | None = None, source_name: str | None = None,
                    source_bytes: int | None = None, associated: str = "auto",
                    resume: bool = False, resume_key: dict[str, Any] | None = None,
                    deidentify: bool = False, encode_rows: EncodeRows | None = None
                    ) -> ContainerMetadata:
    """Compress an open source into a container at ``output`` (atomic).

    ``tile_size``: a multiple of 16 in [16, 4096]; a slide smaller than that gets tiles
    as large as its largest level needs (:func:`fitted_tile_size`).

    ``deidentify``: leave out the associated images but the thumbnail, the source's name
    and the properties that carry people, dates, file names and identifiers, and replace
    DICOM instance UIDs by new ones (:mod:`wsicodec.deidentify`); the container records
    what was left out (names only) in its metadata's ``deidentified``.

    ``associated``: how the label / macro / thumbnail are kept, one of
    :data:`wsicodec.associated.ASSOCIATED_POLICIES` ("auto": label lossless, the rest
    JPEG-XL; "lossless"; "none": left out).

    ``encode_rows``: how the tile rows are coded (:data:`EncodeRows`; default: in this
    process, on ``workers`` threads).

    ``resume``: continue what an interrupted compress of the same source to the same
    output with the same settings (codec, quality, tile size, ...; and ``resume_key``,
    which :func:`compress` fills with the source file's size and mtime) left behind:
    its finished tile rows are checked against their CRCs and not encoded again. With
    nothing to continue, it starts from the beginning. ``progress`` gets the taken-over
    tiles first, in one call.

    Raises OutputPathError (``output`` would replace or go inside the source, see
    :func:`wsicodec.paths.check_output_against_inputs`; only for a source with a
    ``path``), InvalidSettingError (tile size, workers, associated), OutputExistsError,
    the source's read errors and the codec's errors; on any error nothing is left at
    ``output``. An interrupt (KeyboardInterrupt) after at least one tile row was finished
    raises :class:`CompressInterrupted`, an OSError (a full disk, an I/O error)
    :class:`PartialKeptError` (an OSError too): the finished rows are kept in a hidden
    sibling for ``resume``. Any other error removes that too.
    """
    src_path = getattr(source, "path", None)
    if src_path is not None:
        check_output_against_inputs(output, slide_inputs(src_path))
    return _compress_source(source, output, codec, tile_size=tile_size, workers=workers,
                            overwrite=overwrite, progress=progress, source_name=source_name,
                            source_bytes=source_bytes, associated=associated, resume=resume,
                            resume_key=resume_key, deidentify=deidentify,
                            encode_rows=encode_rows)[0]


def _compress_source(source: SlideSource, output: str | os.PathLike[str], codec: TileCodec, *,
                     tile_size: int, workers: int | None, overwrite: bool,
                     progress: Progress | None, source_name: str | None,
                     source_bytes: int | None, associated: str, resume: bool,
                     resume_key: dict[str, Any] | None, deidentify: bool = False,
                     encode_rows: EncodeRows | None = None) -> tuple[ContainerMetadata, int]:
    """:func:`compress_source`, also returning how many tiles were taken over."""
    check_tile_size(tile_size)
    n_workers = check_workers(workers)
    associated_format("label", associated)   # an unknown policy fails before any work
    tile_size = fitted_tile_size(tile_size, source.level_dimensions)
    plan = plan_pyramid(source.level_dimensions, source.level_downsamples, tile_size)
    properties = dict(source.properties)
    dropped: tuple[str, ...] = ()
    extra: dict[str, Any] = {}
    if deidentify:
        from wsicodec.deidentify import deidentify as _deidentify

        d = _deidentify(properties, source.vendor, source.associated_image_names())
        properties, dropped, source_name = d.properties, d.removed_associated_images, None
        extra = _deidentified_field(d.record())
    meta = ContainerMetadata(
        codec=codec.to_dict(), tile_size=tile_size,
        levels=tuple(lv.info for lv in plan.levels),
        model_id=codec.model_id,
        mpp=source.mpp, objective_power=source.objective_power,
        source_vendor=source.vendor, source_name=source_name, source_bytes=source_bytes,
        properties=properties, tile_kinds=tuple(codec.tile_kinds), **extra,
        icc_profile=source_icc_profile(getattr(source, "icc_profile", None),
                                       source_name or "source"))
    writer = ContainerWriter(output, meta, overwrite=overwrite, resume=resume,
                             resume_key=resume_key)
    total = plan.tile_count
    try:
        with writer:
            _write_all(writer, source, plan, codec, associated, n_workers, progress,
                       drop_associated=dropped, encode_rows=encode_rows)
            return writer.commit(), writer.resumed_tiles
    except KeyboardInterrupt as e:
        if writer.kept is not None:
            raise CompressInterrupted(writer.kept, writer.written_tiles, total) from e
        raise
    except OSError as e:
        if writer.kept is not None:
            raise PartialKeptError(e, writer.kept, writer.written_tiles, total) from e
        raise


def _deidentified_field(record: dict[str, Any]) -> dict[str, Any]:
    """``{"deidentified": record}`` for ContainerMetadata: the optional field that carries
    what ``deidentify`` left out (serialised as the attrs key "deidentified")."""
    if "deidentified" not in {f.name for f in dataclasses.fields(ContainerMetadata)}:
        raise WsiCodecError("this wsicodec's container cannot record de-identification "
                            "(ContainerMetadata has no 'deidentified' field)")
    return {"deidentified": record}


def _write_all(writer: ContainerWriter, source: SlideSource, plan: PyramidPlan,
               codec: TileCodec, associated: str, n_workers: int,
               progress: Progress | None, drop_associated: Sequence[str] = (),
               encode_rows: EncodeRows | None = None) -> None:
    """Encode every tile row ``writer`` does not hold yet (with ``encode_rows`` if given),
    and the associated images (but those in ``drop_associated``)."""
    tile_size = plan.tile_size
    done = writer.done_rows()
    if done and progress:
        progress(writer.written_tiles)
    for name in source.associated_image_names():
        if name in drop_associated:
            continue
        fmt = associated_format(name, associated)
        if fmt is not None:
            writer.write_associated(name, source.read_associated_image(name), fmt)
    if encode_rows is not None:
        encode_rows(writer, source, plan, codec, done, progress)
        return
    if codec.level_encoder(0) is not None:
        _write_streamed(writer, source, plan, codec, done, progress)
        return
    margin = codec.context
    batched = margin > 0
    if batched:
        n_workers = 1  # the network parallelises inside; one batch at a time
    pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="wsicodec-encode")
    try:
        rows = _RowCollector(writer, limit=4 * n_workers if not batched else 64, progress=progress)
        if batched:
            # rows already held are still read: their pixels are the next rows' context
            for strip, ext, top in iter_context_strips(iter_strips(source, plan), plan, margin):
                if (strip.level, strip.row) in done:
                    continue
                cols = plan.levels[strip.level].grid.cols
                futures = rows.start_row(strip.level, strip.row, cols)
                tiles = list(iter_context_tiles(ext, top, tile_size, margin))
                futures.extend(Future() for _ in tiles)
                job = pool.submit(encode_context_row, codec, tiles, BATCH_SIZE)
                job.add_done_callback(lambda f, fs=list(futures): _done_future(f, fs))
                for _ in tiles:
                    rows.added()
        else:
            for strip in iter_strips(source, plan):
                if (strip.level, strip.row) in done:
                    continue
                cols = plan.levels[strip.level].grid.cols
                futures = rows.start_row(strip.level, strip.row, cols)
                for _col, tile in iter_tiles(strip, tile_size):
                    futures.append(pool.submit(codec.encode, tile))
                    rows.added()
        rows.drain(0)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_streamed(writer: ContainerWriter, source: SlideSource, plan: PyramidPlan,
                    codec: TileCodec, done: set[tuple[int, int]], progress: Progress | None) -> None:
    """The tile rows of a codec that decides each tile with its neighbours
    (:meth:`~wsicodec.codecs.TileCodec.level_encoder`): each level's rows pushed in order,
    in one background thread (the network parallelises inside it) while the next strip
    is read; finished rows written with their records.  A resumed run pushes the rows it
    holds only where they border a row still to code, as their stored bytes."""
    margin, t = codec.context, plan.tile_size
    encoders: dict[int, Any] = {}
    scanned = ScannedRows(source, plan)
    last_pushed: dict[int, int] = {}
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsicodec-encode")
    pending: deque[Future] = deque()

    def write(level: int, rows: list) -> None:
        for er in rows:
            writer.write_row(level, er.row, er.tiles, **row_records(codec, er.records))
            if progress:
                progress(len(er.tiles))

    try:
        for strip, ext, top in iter_context_strips(iter_strips(source, plan), plan, margin):
            lv, r = strip.level, strip.row
            grid, info = plan.levels[lv].grid, plan.levels[lv].info
            todo = [(lv, k) not in done for k in (r - 1, r, r + 1)]
            if not any(todo):
                continue                 # held, and no neighbour of a row to code
            if lv not in encoders:
                encoders[lv] = codec.level_encoder(lv)
            enc = encoders[lv]
            gap = lv in last_pushed and last_pushed[lv] != r - 1
            last_pushed[lv] = r
            tiles = list(iter_context_tiles(ext, top, t, margin))
            valid = valid_sizes(info, t, r, tiles)
            stored = None if todo[1] else writer.stored_row(lv, r)
            pending.append(pool.submit(_push_row, enc, lv, r, tiles, valid, stored, gap,
                                       r == grid.rows - 1, scanned.row(enc, lv, r)))
            while len(pending) > 1:         # one row coding while the next strip is read
                write(*pending.popleft().result())
        while pending:
            write(*pending.popleft().result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        scanned.close()


def _push_row(enc: Any, level: int, row: int, tiles: list[ContextTile], valid: list, stored: Any,
              gap: bool, last: bool, scanned: list | None = None) -> tuple[int, list]:
    out = enc.finish() if gap else []            # a resumed run skipped rows: start afresh
    out += enc.push(row, [c.region for c in tiles], [c.box for c in tiles], valid=valid, stored=stored,
                    scanned=scanned)
    if last:
        out += enc.finish()
    return level, out


def valid_sizes(info: Any, tile_size: int, row: int, tiles: Sequence[ContextTile]
                ) -> list[tuple[int, int]]:
    """Each tile's (height, width) inside its level (``info``: a LevelInfo), for
    :meth:`~wsicodec.codecs.LevelEncoder.push`."""
    t = tile_size
    return [(min(t, info.height - row * t), min(t, info.width - c.col * t)) for c in tiles]


def row_records(codec: TileCodec, records: Sequence[tuple[str, float]] | None) -> dict[str, Any]:
    """``write_row``'s ``records`` keyword for a row's (kind, psnr) pairs
    (:class:`~wsicodec.codecs.EncodedRow`'s), from a codec that records its tiles."""
    if not codec.tile_kinds or records is None:
        return {}
    from wsicodec.fidelity import TileRecord

    return {"records": [TileRecord(kind, float(psnr)) for kind, psnr in records]}


def compress(source: str | os.PathLike[str], output: str | os.PathLike[str], codec: TileCodec, *,
             tile_size: int = 256, workers: int | None = None, overwrite: bool = False,
             progress: Progress | None = None, associated: str = "auto",
             resume: bool = False, deidentify: bool = False,
             encode_rows: EncodeRows | None = None) -> CompressResult:
    """Compress a slide or image file into a container (``.zarr`` dir or ``.zarr.zip``).

    ``associated``: how associated images are kept (see :func:`compress_source`).
    ``tile_size``: a multiple of 16 in [16, 4096], fitted to a smaller slide
    (:func:`fitted_tile_size`; the result says what was used).
    ``deidentify``: a de-identified copy (see :func:`compress_source`).
    ``encode_rows``: how the tile rows are coded (:data:`EncodeRows`; default: here).
    ``resume``: continue an interrupted compress of this source to this output with the
    same settings, if one left its finished rows (the source file must be unchanged:
    same size and modification time); otherwise start from the beginning.

    Raises:
        OutputPathError: ``output`` is the slide, lies in its folder (a DICOM slide) or
            holds it (:func:`wsicodec.paths.check_output_against_inputs`; whatever
            ``overwrite``), or the folder ``output`` would go in does not exist.
        SlideNotFoundError, UnsupportedFormatError, CorruptDataError: the input.
        InvalidSettingError: tile size / workers out of range, unknown ``associated``.
        OutputExistsError: ``output`` exists and ``overwrite`` is false.
        CompressInterrupted: interrupted after finishing tile rows, which were kept.
    """
    t0 = time.perf_counter()
    src_path = Path(source)
    out_path = Path(output)
    check_output_against_inputs(out_path, slide_inputs(src_path))
    check_tile_size(tile_size)
    check_output_path(out_path, overwrite)
    with open_source(src_path) as src:
        nbytes = source_file_bytes(src_path, src.vendor)
        key = {"path": str(src_path.resolve()), "bytes": nbytes,
               "mtime_ns": src_path.stat().st_mtime_ns}
        meta, resumed = _compress_source(
            src, out_path, codec, tile_size=tile_size, workers=workers, overwrite=overwrite,
            progress=progress, source_name=src_path.name, source_bytes=nbytes,
            associated=associated, resume=resume, resume_key=key, deidentify=deidentify,
            encode_rows=encode_rows)
    return CompressResult(
        source=src_path, output=out_path, dimensions=meta.levels[0].dimensions,
        levels=len(meta.levels),
        tiles=sum(lv.grid(meta.tile_size).tile_count for lv in meta.levels),
        source_bytes=nbytes, container_bytes=path_size(out_path),
        tile_bytes=sum(meta.level_bytes), associated_bytes=sum(meta.associated_bytes.values()),
        seconds=time.perf_counter() - t0, resumed_tiles=resumed, tile_size=meta.tile_size,
        deidentified=getattr(meta, "deidentified", None))


def plan_tile_count(source: str | os.PathLike[str], tile_size: int) -> int:
    """Total tiles compress will encode for ``source`` (opens it briefly).

    Raises InvalidSettingError (tile size) and as :func:`wsicodec.tiling.open_source`.
    """
    check_tile_size(tile_size)
    with open_source(source) as src:
        tile_size = fitted_tile_size(tile_size, src.level_dimensions)
        return plan_pyramid(src.level_dimensions, src.level_downsamples, tile_size).tile_count


# ContextTile, iter_context_strips, iter_context_tiles live in wsicodec.tiling.context;
# re-exported
__all__ = ["BATCH_SIZE", "MAX_TILE_SIZE", "CompressResult", "ContextTile", "EncodeRows", "Progress",
           "check_tile_size", "check_workers", "compress", "compress_source", "default_workers",
           "encode_context_row", "fitted_tile_size", "iter_context_strips", "iter_context_tiles",
           "plan_tile_count", "row_records", "source_file_bytes", "valid_sizes"]
