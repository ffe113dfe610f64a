"""The wsicodec container: a zarr v3 group of per-tile bitstreams.

Layout (directory store ``OUT.zarr`` or the same tree in a single zip ``OUT.zarr.zip``)::

    zarr.json                  group; attrs["wsicodec"] = metadata (see ContainerMetadata)
    levels/<i>/tiles           (rows, cols) variable-length bytes, one tile per chunk
    levels/<i>/crc32           (rows, cols) uint32, CRC32 of each tile's bytes
    associated/<name>          1-D uint8: the label / macro / thumbnail, coded as PNG
                               (lossless) or JPEG-XL (see ASSOCIATED_POLICIES)

Tiles are stored padded to ``tile_size`` squares (edge replication); readers crop.
Writing is atomic: everything goes to a hidden sibling path, the root metadata is
written last, and the result is renamed onto ``OUT`` only when complete, so a failed
or interrupted write leaves nothing at ``OUT`` and nothing that opens as a container.

Resuming: the hidden sibling (``.OUT.partial-XXXXXXXX``, ``….d`` for a zip) keeps a
journal (:data:`JOURNAL`) of the tile rows it holds: the settings on its first line,
then one line per finished row with its tiles' CRC32s. An interrupted write
(KeyboardInterrupt: Ctrl-C, or SIGTERM through the CLI) or an OSError (a full disk, an
I/O error) after it finished a row keeps the sibling; a writer made with ``resume=True``
for the same output and identical settings takes it over, checks each journalled row
against its CRCs and keeps the rows that pass. A writer holds an exclusive lock on its
journal, so a live write is never taken over. Any other failure removes the sibling.
A writer killed after its output was moved into place, before it removed what it had
set aside (the zip's directory store, an overwritten output), leaves those behind; the
next writer of that output removes them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import struct
import uuid
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from wsicodec.codecs import READER_OPTIONS, Run, TileCodec, codec_from_dict
from wsicodec.errors import (ClosedError, CorruptDataError, CorruptTileError, InvalidSettingError,
                             ModelMismatchError, OutputExistsError, OutputPathError,
                             RegionOutOfBoundsError, SlideNotFoundError, UnsupportedFormatError,
                             WsiCodecError, as_tile_error)
from wsicodec.integrity import (DIGEST_BYTES, blob_digest, level_digest, new_container_id,
                                tile_digest)
from wsicodec.metadata import (ASSOCIATED_NAME, ATTRS_KEY, FORMAT_NAME, FORMAT_VERSION,
                               MAX_ASSOCIATED_BYTES, MAX_JSON_BYTES, SUPPORTED_VERSIONS,
                               ContainerMetadata, check_image_header, max_tile_bytes,
                               missing_guarantees)
from wsicodec.tiling.geometry import TileGrid, check_decoded_tile, tile_shape

log = logging.getLogger(__name__)

#: the resume journal inside a container being written (never in a finished container)
JOURNAL = "wsicodec-journal.jsonl"
#: the journal's last line once its rows were packed into the zip that became the output
PACKED = "packed_into"

#: What ``compress --associated`` may ask for:
#: ``auto``: the label lossless (PNG: barcodes and handwriting are read by machines and
#: people, exactly), every other associated image (thumbnail, macro: overviews the source
#: itself usually stores as JPEG) JPEG-XL at distance ASSOCIATED_JXL_DISTANCE;
#: ``lossless``: all PNG; ``none``: no associated images at all (e.g. to leave the label,
#: which often carries the patient's name, out of a shared copy).
ASSOCIATED_POLICIES = ("auto", "lossless", "none")
ASSOCIATED_LOSSLESS_NAMES = ("label",)
#: JPEG-XL distance for overview images: half of libjxl's "visually lossless" 1.0.
#: Measured on the sample slides' thumbnails/macros: 3.3-4.5x smaller than PNG at
#: 35.2-50.6 dB PSNR against the pixels OpenSlide returns (README, ``--associated``).
ASSOCIATED_JXL_DISTANCE = 0.5
ASSOCIATED_JXL_EFFORT = 7
ASSOCIATED_FORMATS = ("png", "jxl")


def associated_format(name: str, policy: str) -> str | None:
    """How ``compress`` stores the associated image ``name`` under ``policy``:
    "png", "jxl", or None (left out). Raises InvalidSettingError for an unknown policy."""
    if policy not in ASSOCIATED_POLICIES:
        raise InvalidSettingError(f"associated images: {policy!r} is not one of "
                                  f"{', '.join(ASSOCIATED_POLICIES)}")
    if policy == "none":
        return None
    if policy == "lossless" or name.lower() in ASSOCIATED_LOSSLESS_NAMES:
        return "png"
    return "jxl"


def is_zip_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a single-file (zip) container (suffix ``.zip``)."""
    return str(path).lower().endswith(".zip")


def check_output_path(path: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse an output that exists (unless ``overwrite``) or whose folder does not.

    Outputs are written as a hidden temporary sibling and renamed into place, so the
    folder must exist; a mistyped folder is reported, never created.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists (use --overwrite to replace it)")
    parent = path.absolute().parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise OutputPathError(f"{path}: cannot write there: {parent} {what}")


def path_size(path: str | os.PathLike[str]) -> int:
    """Bytes of a file, or of all files under a directory."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _vlen_bytes_dtype() -> Any:
    import zarr

    return zarr.dtype.VariableLengthBytes()


def _read_tile_chunk(array: Any, row: int, col: int, guard: "_StoreGuard | None" = None,
                     max_bytes: int = 0) -> bytes:
    """The bytes of tile (row, col) of a one-tile-per-chunk vlen-bytes array; b"" if its
    chunk is missing. The chunk's framing (item count 1, then the length of the
    one item) is checked here instead of by zarr's vlen-bytes codec: numcodecs trusts the
    item count in a chunk's first four bytes, so a chunk with damaged framing made one
    tile read allocate an object array of up to 4 G items (~30 s and gigabytes) before
    failing. Raises CorruptDataError for bad framing; store errors pass through."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    key = f"{array.path}/{array.metadata.encode_chunk_key((row, col))}"
    if guard is not None and not guard.check(key, max_bytes + 8):
        return b""
    buf = sync(array.store_path.store.get(key, prototype=default_buffer_prototype()))
    if buf is None:
        return b""
    raw = buf.to_bytes()
    if len(raw) < 8:
        raise CorruptDataError(f"chunk {key} is truncated ({len(raw)} bytes)")
    count, length = struct.unpack_from("<II", raw)
    if count != 1 or length != len(raw) - 8:
        raise CorruptDataError(f"chunk {key} has damaged framing")
    return raw[8:]


def _quiet_zarr() -> warnings.catch_warnings:
    """zarr warns that variable-length bytes have no final v3 spec yet; we pin zarr>=3.1
    and read what we write, so the warning is noise for our users."""
    cw = warnings.catch_warnings()
    cw.__enter__()
    warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
    return cw


def _encode_png(rgb: np.ndarray) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.png_encode(np.ascontiguousarray(rgb)))


def _encode_jxl(rgb: np.ndarray) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpegxl_encode(np.ascontiguousarray(rgb),
                                           distance=ASSOCIATED_JXL_DISTANCE,
                                           effort=ASSOCIATED_JXL_EFFORT))


class ContainerWriter:
    """Writes a container atomically. Use as a context manager and call :meth:`commit`;
    leaving the block without committing (or with an exception) removes everything.

    Tiles are written a whole tile row at a time (:meth:`write_row`), in any order.
    """

    def __init__(self, path: str | os.PathLike[str], metadata: ContainerMetadata, *,
                 overwrite: bool = False, resume: bool = False,
                 resume_key: dict[str, Any] | None = None) -> None:
        """Raises OutputExistsError if ``path`` exists and ``overwrite`` is false.

        ``resume``: continue the partial write an interrupted writer left for ``path``
        with identical ``metadata`` and ``resume_key`` (e.g. the source file's size and
        mtime), if there is one; :meth:`done_rows` then lists the rows it already holds.
        """
        import zarr
        import zarr.storage

        from dataclasses import replace

        self.path = Path(path)
        self.overwrite = overwrite
        _sweep_leftovers(self.path)
        self._check_target()
        # a fresh id for every container written (a resumed one too: its digests are
        # computed again from the stored bytes), left out of the settings resume compares
        self.metadata = replace(metadata, container_id=new_container_id(), level_digests=(),
                                associated_digests={})
        self._zip = is_zip_path(self.path)
        self._done = False
        self._grids = [lv.grid(metadata.tile_size) for lv in metadata.levels]
        self._crc = [np.zeros((g.rows, g.cols), np.uint32) for g in self._grids]
        self._digest = [np.zeros((g.rows, g.cols, DIGEST_BYTES), np.uint8) for g in self._grids]
        self._written = [np.zeros((g.rows, g.cols), bool) for g in self._grids]
        self._bytes = [0] * len(self._grids)
        self._associated: list[str] = []
        self._associated_formats: dict[str, str] = {}
        self._associated_bytes: dict[str, int] = {}
        self._associated_digests: dict[str, str] = {}
        settings = replace(metadata, container_id=None, level_digests=(), associated_digests={})
        self._key = json.loads(json.dumps({"wsicodec_journal": 1, "metadata": settings.to_attrs(),
                                           "source": resume_key or {}}, sort_keys=True))
        self._journal: Any = None
        self._adopted = False   # continuing an earlier writer's partial write
        #: where the partial write was kept after an interrupt (None: removed or committed)
        self.kept: Path | None = None
        #: tiles taken over from an interrupted write (``resume=True``)
        self.resumed_tiles = 0
        try:
            found = self._take_over() if resume else None
            if found is None:
                tag = uuid.uuid4().hex[:8]
                self._tmp = self.path.parent / f".{self.path.name}.partial-{tag}"
                self._tmp_dir = self._tmp.with_name(self._tmp.name + ".d") if self._zip else self._tmp
                self._group = zarr.open_group(zarr.storage.LocalStore(self._tmp_dir), mode="w",
                                              zarr_format=3)
                self._tiles = []
                cw = _quiet_zarr()
                try:
                    for i, g in enumerate(self._grids):
                        self._tiles.append(self._group.create_array(
                            f"levels/{i}/tiles", shape=(g.rows, g.cols), chunks=(1, 1),
                            dtype=_vlen_bytes_dtype(), fill_value=b"", compressors=None))
                finally:
                    cw.__exit__(None, None, None)
                self._journal = _locked_journal(self._tmp_dir / JOURNAL)
                if self._journal is None:   # cannot happen for a fresh random name
                    raise WsiCodecError(f"{self._tmp_dir}: journal is locked by another writer")
                self._journal_line(self._key)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                self.keep()      # an adopted partial stays as it was
            else:
                self.abort()
            raise

    def _take_over(self) -> Path | None:
        """Adopt the newest unlocked partial write of this output with the same settings;
        load and check its journalled rows. Returns its directory, or None."""
        import zarr
        import zarr.storage

        candidates = sorted((p for p in self.path.parent.glob(f".{self.path.name}.partial-*")
                             if p.is_dir() and p.name.endswith(".d") == self._zip
                             and (p / JOURNAL).is_file()),
                            key=lambda p: (p / JOURNAL).stat().st_mtime, reverse=True)
        for d in candidates:
            journal = _locked_journal(d / JOURNAL)
            if journal is None:        # a live writer holds it
                continue
            try:
                lines = (d / JOURNAL).read_text(encoding="utf-8").splitlines()
                if not lines or json.loads(lines[0]) != self._key:
                    journal.close()
                    continue
                group = zarr.open_group(zarr.storage.LocalStore(d), mode="r+", zarr_format=3)
                tiles = [group[f"levels/{i}/tiles"] for i in range(len(self._grids))]
            except (OSError, ValueError, KeyError):
                journal.close()
                continue
            self._journal, self._group, self._tiles = journal, group, tiles
            self._tmp_dir = d
            self._tmp = d.with_name(d.name[:-2]) if self._zip else d
            self._adopted = True
            for line in lines[1:]:
                self._check_journalled_row(line)
            self.resumed_tiles = self.written_tiles
            return d
        return None

    def _check_journalled_row(self, line: str) -> None:
        """Keep a journalled row if its stored tiles match the CRC32s journalled for them."""
        try:
            entry = json.loads(line)
            level, row, crcs = int(entry["level"]), int(entry["row"]), list(entry["crc"])
            grid = self._grids[level]
            if not 0 <= row < grid.rows or len(crcs) != grid.cols:
                return
            stored = [_read_tile_chunk(self._tiles[level], row, c) for c in range(grid.cols)]
        except (ValueError, KeyError, TypeError, IndexError, OSError):
            return      # a torn last line, or a damaged row: encode it again
        if [zlib.crc32(b) for b in stored] != crcs:
            return
        self._crc[level][row, :] = crcs
        for col, data in enumerate(stored):
            self._digest[level][row, col] = np.frombuffer(self._tile_digest(level, col, row, data),
                                                          np.uint8)
        self._bytes[level] += sum(len(b) for b in stored)
        self._written[level][row, :] = True

    def _tile_digest(self, level: int, col: int, row: int, data: bytes) -> bytes:
        return tile_digest(self.metadata.container_id, level, col, row, data)  # type: ignore[arg-type]

    def _journal_line(self, obj: dict[str, Any]) -> None:
        self._journal.write(json.dumps(obj, sort_keys=True) + "\n")
        self._journal.flush()

    def done_rows(self) -> set[tuple[int, int]]:
        """(level, row) of every tile row already stored (taken over by ``resume``)."""
        return {(level, int(r)) for level, w in enumerate(self._written)
                for r in np.flatnonzero(w.all(axis=1))}

    @property
    def written_tiles(self) -> int:
        """Tiles stored so far (taken over or written)."""
        return int(sum(w.sum() for w in self._written))

    def _check_target(self) -> None:
        check_output_path(self.path, self.overwrite)

    def write_row(self, level: int, row: int, tiles: Sequence[bytes]) -> None:
        """Store the encoded tiles of one tile row (left to right).

        Raises RegionOutOfBoundsError for a bad level/row or the wrong tile count.
        """
        grid = self._grids[level] if 0 <= level < len(self._grids) else None
        if grid is None or not 0 <= row < grid.rows or len(tiles) != grid.cols:
            raise RegionOutOfBoundsError(f"row {row} of level {level} with {len(tiles)} tiles "
                                         "does not fit the pyramid")
        values = np.empty((1, grid.cols), dtype=object)
        for col, data in enumerate(tiles):
            data = bytes(data)
            values[0, col] = data
            self._crc[level][row, col] = zlib.crc32(data)
            self._digest[level][row, col] = np.frombuffer(self._tile_digest(level, col, row, data),
                                                          np.uint8)
            self._bytes[level] += len(data)
        cw = _quiet_zarr()
        try:
            self._tiles[level][row:row + 1, :] = values
        finally:
            cw.__exit__(None, None, None)
        self._written[level][row, :] = True
        self._journal_line({"level": level, "row": row,
                            "crc": [int(c) for c in self._crc[level][row]]})

    def write_associated(self, name: str, rgb: np.ndarray, fmt: str = "png") -> None:
        """Store an associated image as PNG (lossless) or JPEG-XL (``fmt`` "jxl", distance
        ASSOCIATED_JXL_DISTANCE). Names outside [A-Za-z0-9_.-] are skipped with a log
        message. Raises InvalidSettingError for another ``fmt``."""
        if fmt not in ASSOCIATED_FORMATS:
            raise InvalidSettingError(f"associated image format {fmt!r} is not one of "
                                      f"{', '.join(ASSOCIATED_FORMATS)}")
        if not ASSOCIATED_NAME.match(name):
            log.warning("skipping associated image with unusable name %r", name)
            return
        data = _encode_png(rgb) if fmt == "png" else _encode_jxl(rgb)
        arr = self._group.create_array(f"associated/{name}", shape=(len(data),),
                                       chunks=(len(data),), dtype="uint8", compressors=None,
                                       fill_value=0, overwrite=True)   # again when resuming
        arr[:] = np.frombuffer(data, dtype=np.uint8)
        self._associated.append(name)
        self._associated_formats[name] = fmt
        self._associated_bytes[name] = len(data)
        self._associated_digests[name] = blob_digest(self.metadata.container_id, name, data)  # type: ignore[arg-type]

    def commit(self) -> ContainerMetadata:
        """Write CRCs and metadata, then move the container onto its path.

        Returns the final metadata (with per-level byte counts).
        Raises WsiCodecError if a tile was never written, OutputExistsError if the path
        appeared meanwhile (without overwrite).
        """
        for level, mask in enumerate(self._written):
            if not mask.all():
                row, col = np.argwhere(~mask)[0]
                raise WsiCodecError(f"internal error: tile level={level} col={col} row={row} "
                                    "was never written")
        # The journal stays until the container is complete: a full disk or Ctrl-C while a
        # zip is packed (it needs the container's size again in free space) keeps every row
        # for --resume, as it does while tiles are coded.  It never goes into the output.
        level_digests = []
        for level, (crc, digest) in enumerate(zip(self._crc, self._digest)):
            arr = self._group.create_array(f"levels/{level}/crc32", shape=crc.shape,
                                           chunks=crc.shape, dtype="uint32", fill_value=0,
                                           compressors=None, overwrite=True)
            arr[:] = crc
            arr = self._group.create_array(f"levels/{level}/digest", shape=digest.shape,
                                           chunks=digest.shape, dtype="uint8", fill_value=0,
                                           compressors=None, overwrite=True)
            arr[:] = digest
            level_digests.append(level_digest(self.metadata.container_id, level, digest))  # type: ignore[arg-type]
        from dataclasses import replace

        meta = replace(self.metadata, associated_images=tuple(self._associated),
                       associated_formats=dict(self._associated_formats),
                       associated_bytes=dict(self._associated_bytes),
                       associated_digests=dict(self._associated_digests),
                       level_bytes=tuple(self._bytes), level_digests=tuple(level_digests))
        self._group.attrs.update({ATTRS_KEY: meta.to_attrs()})
        if self._zip:
            try:
                _zip_directory(self._tmp_dir, self._tmp, skip=JOURNAL)
            except BaseException:
                self._tmp.unlink(missing_ok=True)    # a torn zip is never left behind
                raise
            # if the process dies once the zip is on OUT, before the directory is removed,
            # the next writer of OUT knows the directory for what it is (_sweep_leftovers)
            self._journal_line({PACKED: self._tmp.name})
        self._check_target()
        self._close_journal()
        if not self._zip:       # the directory itself becomes the output
            (self._tmp_dir / JOURNAL).unlink(missing_ok=True)
        _replace(self._tmp, self.path)
        self._done = True
        if self._zip:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
        _sweep_stale_partials(self.path)
        return meta

    def _close_journal(self) -> None:
        if self._journal is not None:
            with contextlib.suppress(OSError):
                self._journal.close()     # releases the lock
            self._journal = None

    def abort(self) -> None:
        """Remove every temporary file. Safe to call twice."""
        self._close_journal()
        if self._done or self.kept is not None or not hasattr(self, "_tmp"):
            return
        for p in {self._tmp, self._tmp_dir}:
            _remove(p)

    def keep(self) -> Path | None:
        """Leave the partial write for a later ``resume=True`` writer (if it holds a tile
        row, or was itself taken over; otherwise remove it). Returns where it is kept,
        or None."""
        if self._done or not hasattr(self, "_tmp"):
            return None
        self._close_journal()
        # no journal: commit was moving the container onto its path
        if (self.written_tiles or self._adopted) and (self._tmp_dir / JOURNAL).is_file():
            self.kept = self._tmp_dir
        else:
            self.abort()
        return self.kept

    def __enter__(self) -> "ContainerWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """An interrupt or an OSError (a full disk, an I/O error: worth another try) keeps
        the finished rows (:meth:`keep`); any other error removes everything."""
        if exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, OSError)):
            self.keep()
        else:
            self.abort()


def _sweep_leftovers(path: Path) -> None:
    """Remove what a writer of ``path`` killed at the very end left beside it: the
    directory of a zip it had packed and moved onto ``path`` (its journal's last line says
    :data:`PACKED`; the zip is gone from beside it), and the old output an overwrite had
    set aside (only once ``path`` exists again: until then it is the only copy)."""
    parent, name = path.parent, path.name
    with contextlib.suppress(OSError):
        for d in parent.glob(f".{name}.partial-*.d"):
            zip_sibling = d.with_name(d.name[:-2])
            if not d.is_dir() or zip_sibling.exists() or not (d / JOURNAL).is_file():
                continue
            journal = _locked_journal(d / JOURNAL)
            if journal is None:             # a live writer
                continue
            try:
                lines = (d / JOURNAL).read_text(encoding="utf-8").splitlines()
                packed = bool(lines) and PACKED in json.loads(lines[-1])
            except (OSError, ValueError, TypeError):
                packed = False
            finally:
                journal.close()
            if packed:
                shutil.rmtree(d, ignore_errors=True)
        if path.exists():
            for old in parent.glob(f".{name}.old-*"):
                _remove(old)


def _sweep_stale_partials(path: Path) -> None:
    """Once ``path`` is complete, remove the partial writes of it that no writer holds
    (left by a run killed with ``kill -9`` or a crash and never resumed): the output they
    were for now exists, so they are only hidden copies of its size.  A partial that a
    live writer holds (its journal locked) stays."""
    parent, name = path.parent, path.name
    with contextlib.suppress(OSError):
        for d in parent.glob(f".{name}.partial-*"):
            if not d.is_dir() or not (d / JOURNAL).is_file():
                continue
            journal = _locked_journal(d / JOURNAL)
            if journal is None:             # a live writer
                continue
            journal.close()
            log.info("removing %s, an unfinished earlier write of %s", d, path)
            if d.name.endswith(".d"):
                _remove(d.with_name(d.name[:-2]))   # a zip torn while it was packed
            _remove(d)


def _remove(p: Path) -> None:
    """Remove a file, a link (not what it points to) or a directory tree, if it is there."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _locked_journal(path: Path) -> Any:
    """Open ``path`` for appending under an exclusive lock; None if another writer holds
    it. Without ``fcntl`` (Windows) there is no lock."""
    f = open(path, "a", encoding="utf-8")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def _zip_directory(src: Path, dest: Path, skip: str = "") -> None:
    """Pack a directory store into a zip (stored, not deflated: tiles are compressed),
    leaving out the top-level file ``skip``."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for f in sorted(src.rglob("*")):
            name = f.relative_to(src).as_posix()
            if f.is_file() and name != skip:
                zf.write(f, name)


def _replace(tmp: Path, final: Path) -> None:
    """Move ``tmp`` onto ``final``; an existing ``final`` is removed only after."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(tmp, final)
        _remove(old)
    else:
        os.rename(tmp, final)


class _GridMismatch(Exception):
    """A level's tile array does not have the metadata's grid (reported as such)."""


def _plain_array(group: Any, key: str, shape: tuple[int, ...], dtype: Any) -> Any:
    """``group[key]`` if its own zarr.json declares what the writer made: ``shape`` in a
    single chunk, of ``dtype``, with no codec but "bytes" (no compressor); else
    CorruptDataError.  Checked before zarr reads a byte of the array: zarr allocates the
    shape a zarr.json declares and runs the codecs it names, so an edited one (outside
    the metadata digest) could ask for exabytes, or inflate a small chunk without bound,
    or have numcodecs trust a count read from the data, before any size check."""
    arr = group[key]
    try:
        ok = (tuple(arr.shape) == shape and tuple(arr.chunks) == shape
              and arr.dtype == np.dtype(dtype)
              and [type(c).__name__ for c in arr.metadata.codecs] == ["BytesCodec"])
    except Exception:  # noqa: BLE001 - an irregular chunk grid, an odd data type
        ok = False
    if not ok:
        raise CorruptDataError(f"{key}/zarr.json declares {_describe_array(arr)}, not the "
                               f"{'x'.join(map(str, shape))} {np.dtype(dtype)} array in one "
                               "uncompressed chunk that the metadata calls for")
    return arr


def _describe_array(arr: Any) -> str:
    try:
        return f"shape {tuple(arr.shape)} in chunks of {tuple(arr.chunks)}, {arr.dtype}"
    except Exception:  # noqa: BLE001
        return "an array of another layout"


class _StoreGuard:
    """What a reader checks of a store's files before zarr reads one: that it is a
    regular file (a named pipe or device would hang or never end; a link could point
    anywhere) and that its size is within the bound given, from the zip's central
    directory or the file system, before a byte of it is read or inflated."""

    #: the most a zip member may inflate relative to its stored size (tiles and images
    #: are stored uncompressed; zarr.json compresses ~10x)
    MAX_RATIO = 100

    def __init__(self, path: Path, infos: "dict[str, zipfile.ZipInfo] | None") -> None:
        self.path, self.infos = path, infos

    def check(self, key: str, max_bytes: int) -> bool:
        """True when ``key`` is present and fit to read; False when it is missing.

        Raises CorruptDataError for a non-regular file or one over ``max_bytes``."""
        if self.infos is not None:
            info = self.infos.get(key)
            if info is None:
                return False
            size = info.file_size
            if info.compress_type != zipfile.ZIP_STORED and size > self.MAX_RATIO * max(info.compress_size, 1):
                raise CorruptDataError(f"{self.path}: zip member {key} would inflate "
                                       f"{size // max(info.compress_size, 1)}x: refused")
        else:
            try:
                st = os.lstat(self.path / key)
            except FileNotFoundError:
                return False
            except OSError as e:
                raise CorruptDataError(f"{self.path}: {key} is unreadable: {e}") from e
            if not stat.S_ISREG(st.st_mode):
                raise CorruptDataError(f"{self.path}: {key} is not a regular file: refused")
            size = st.st_size
        if size > max_bytes:
            raise CorruptDataError(f"{self.path}: {key} holds {size} bytes, more than the "
                                   f"{max_bytes} it may: refused")
        return True


class Container:
    """A container opened for reading. Thread-safe for tile reads.

    Use :func:`open_container` to get one.
    """

    def __init__(self, path: Path, group: Any, store: Any, metadata: ContainerMetadata,
                 guard: _StoreGuard | None = None, codec_options: dict[str, Any] | None = None) -> None:
        self.path = path
        self.metadata = metadata
        self._group = group
        self._store = store
        self._guard = guard or _StoreGuard(path, None)
        self._codec: TileCodec | None = None
        self._local = dict(codec_options or {})   # the reader's choices for the codec
        self._tiles: dict[int, Any] = {}
        self._crc: dict[int, np.ndarray] = {}
        self._digest: dict[int, np.ndarray] = {}
        self._cache: Any = None       # the codec's decode cache (new_cache), made on first use
        self._cache_made = False
        self.closed = False

    def _check_open(self) -> None:
        if self.closed:
            raise ClosedError(f"{self.path}: read after close()")

    # -- geometry
    @property
    def level_count(self) -> int:
        return len(self.metadata.levels)

    @property
    def tile_size(self) -> int:
        return self.metadata.tile_size

    def grid(self, level: int) -> TileGrid:
        """Raises RegionOutOfBoundsError for a bad level."""
        return self.metadata.grid(level)

    # -- codec
    @property
    def codec(self) -> TileCodec:
        """The codec that wrote the tiles, built on first use (the learned codec imports
        torch only here).

        Raises InvalidSettingError / CodecUnavailableError from the registry, and
        ModelMismatchError if the codec's model cannot decode what the stored
        ``model_id`` made (another id, and not one whose decoder it holds).
        """
        if self._codec is None:
            self._codec = self.build_codec(**self._local)
        return self._codec

    def build_codec(self, **local: Any) -> TileCodec:
        """A codec for these tiles, with the reader's own ``local`` choices of how to run
        (:data:`wsicodec.codecs.READER_OPTIONS`: ``device``, ``precision``, ``max_batch``).
        Raises as :attr:`codec`."""
        codec = codec_from_dict(self.metadata.codec, **local)
        stored = self.metadata.model_id
        if stored and not codec.decodes(stored):
            raise ModelMismatchError(
                f"{self.path}: tiles were made with model {stored}, but the loaded "
                f"{codec.name} model is {codec.model_id}")
        return codec

    # -- tiles
    def _level_arrays(self, level: int) -> tuple[Any, np.ndarray]:
        self._check_open()
        if level not in self._tiles:
            g = self.grid(level)
            digest = None
            try:
                for key, cap in self._level_files(level, g):
                    if not self._guard.check(key, cap):
                        raise CorruptDataError(f"{key} is missing")
                cw = _quiet_zarr()
                try:
                    tiles = self._group[f"levels/{level}/tiles"]
                    if tuple(tiles.shape) != (g.rows, g.cols):
                        raise _GridMismatch()
                    crc = np.asarray(_plain_array(self._group, f"levels/{level}/crc32",
                                                  (g.rows, g.cols), np.uint32)[...], np.uint32)
                    if self.metadata.has_digests:
                        digest = np.asarray(_plain_array(
                            self._group, f"levels/{level}/digest", (g.rows, g.cols, DIGEST_BYTES),
                            np.uint8)[...], np.uint8)
                finally:
                    cw.__exit__(None, None, None)
            except _GridMismatch:
                raise CorruptDataError(f"{self.path}: level {level} arrays do not match the "
                                       "metadata's tile grid") from None
            except Exception as e:  # zarr/zip errors of many kinds: damaged store
                raise CorruptDataError(f"{self.path}: level {level} arrays unreadable: {e}") from e
            if crc.shape != (g.rows, g.cols) or (
                    digest is not None and digest.shape != (g.rows, g.cols, DIGEST_BYTES)):
                raise CorruptDataError(f"{self.path}: level {level} arrays do not match the "
                                       "metadata's tile grid")
            if digest is not None:
                if level_digest(self.metadata.container_id, level, digest) != \
                        self.metadata.level_digests[level]:  # type: ignore[arg-type]
                    raise CorruptDataError(f"{self.path}: level {level}'s tile digests do not "
                                           "match the metadata (damaged or replaced)")
                self._digest[level] = digest
            self._tiles[level], self._crc[level] = tiles, crc
        return self._tiles[level], self._crc[level]

    def check_level(self, level: int) -> None:
        """Read and check a level's CRC and digest arrays (what every tile read of the
        level needs).  Raises CorruptDataError when they are damaged or do not match the
        metadata, RegionOutOfBoundsError for a bad level."""
        self._level_arrays(level)

    def _level_files(self, level: int, g: TileGrid) -> list[tuple[str, int]]:
        """The files zarr reads whole to open a level's arrays, each with its size bound."""
        n = g.rows * g.cols
        files = [(f"levels/{level}/tiles/zarr.json", 1 << 16),
                 (f"levels/{level}/crc32/zarr.json", 1 << 16),
                 (f"levels/{level}/crc32/c/0/0", 4 * n)]
        if self.metadata.has_digests:
            files += [(f"levels/{level}/digest/zarr.json", 1 << 16),
                      (f"levels/{level}/digest/c/0/0/0", DIGEST_BYTES * n)]
        return files

    def read_encoded_tile(self, level: int, col: int, row: int) -> bytes:
        """The stored bytes of one tile, checked, not decoded: against its CRC32 and, in
        a format-3 container, against its digest, which binds it to this container and to
        (level, col, row).

        Raises:
            RegionOutOfBoundsError: level/col/row outside the pyramid.
            CorruptTileError: bytes missing, oversized, or failing their CRC or digest
                (names level/col/row).
        """
        self._check_open()
        self.grid(level).check_tile(col, row)
        tiles, crc = self._level_arrays(level)
        where = f"level={level} col={col} row={row}"
        try:
            data = _read_tile_chunk(tiles, row, col, self._guard,
                                    max_tile_bytes(self.metadata.tile_size))
        except Exception as e:  # damaged chunk framing, zip member CRC, I/O, oversized
            raise CorruptTileError(f"{self.path}: tile {where} is unreadable: {e}",
                                   level=level, col=col, row=row) from e
        if not data or zlib.crc32(data) != int(crc[row, col]):
            raise CorruptTileError(f"{self.path}: tile {where} is damaged (CRC32 mismatch)",
                                   level=level, col=col, row=row)
        digest = self._digest.get(level)
        if digest is not None and tile_digest(self.metadata.container_id, level, col, row,  # type: ignore[arg-type]
                                              data) != digest[row, col].tobytes():
            raise CorruptTileError(f"{self.path}: tile {where} is not the tile written there "
                                   "(digest mismatch: moved, replaced or damaged)",
                                   level=level, col=col, row=row)
        return data

    def read_tile(self, level: int, col: int, row: int) -> np.ndarray:
        """Decode one tile: (tile_size, tile_size, 3) uint8, padded at the slide's edges.

        Raises as :meth:`read_encoded_tile`; a tile the codec cannot decode raises
        CorruptTileError too.
        """
        return self.read_tiles(level, [(col, row)])[0]

    def read_tiles(self, level: int, keys: Sequence[tuple[int, int]], *,
                   run: Run | None = None) -> list[np.ndarray]:
        """Decode tiles (col, row) of one level, in order, as :meth:`read_tile` does, in
        one :meth:`~wsicodec.codecs.TileCodec.decode_tiles` call (``run``: the caller's
        thread pool's map for the work, default this thread).

        The learned codec decodes each with its neighbours' latents (read from the
        container as needed, kept in its cache, sized for three rows of the widest level,
        so a row-by-row reader decodes each tile once); a damaged neighbour only costs a
        tile its stitching on that side.  Raises as :meth:`read_tile`: the first failed
        tile, in the order asked.
        """
        g = self.grid(level)
        for col, row in keys:
            g.check_tile(col, row)
        codec = self.codec
        if not self._cache_made:
            widest = max(self.grid(lv).cols for lv in range(self.level_count))
            self._cache = codec.new_cache(self.metadata.tile_size, 3 * widest + 8)
            self._cache_made = True
        out = codec.decode_tiles(list(keys), lambda c, r: self.read_encoded_tile(level, c, r),
                                 (g.cols, g.rows), tile_shape(self.tile_size),
                                 names=lambda c, r: f"tile level={level} col={c} row={r}",
                                 cache=self._cache, cache_tag=level, run=run,
                                 as_written=self.metadata.has_digests)
        for i, ((col, row), t) in enumerate(zip(keys, out)):
            try:
                if isinstance(t, BaseException):
                    raise t
                out[i] = check_decoded_tile(t, self.metadata.tile_size)
            except BaseException as e:
                raise as_tile_error(e, level, col, row, self.path)
        return out

    def iter_encoded_tiles(self, level: int) -> Iterator[tuple[int, int, bytes]]:
        """(col, row, bytes) of every tile of a level, row-major."""
        for col, row in self.grid(level):
            yield col, row, self.read_encoded_tile(level, col, row)

    # -- associated images
    def associated_image_names(self) -> list[str]:
        return list(self.metadata.associated_images)

    def read_associated_image(self, name: str) -> np.ndarray:
        """(h, w, 3) uint8. Raises KeyError for an unknown name, CorruptDataError if damaged,
        UnsupportedFormatError if stored in a format this wsicodec does not know."""
        self._check_open()
        if name not in self.metadata.associated_images:
            raise KeyError(name)
        import imagecodecs

        fmt = self.metadata.associated_formats.get(name, "png")
        if fmt not in ASSOCIATED_FORMATS:
            raise UnsupportedFormatError(f"{self.path}: associated image {name!r} is stored as "
                                         f"{fmt!r}, which this wsicodec cannot decode")
        try:
            for key, cap in ((f"associated/{name}/zarr.json", 1 << 16),
                             (f"associated/{name}/c/0", MAX_ASSOCIATED_BYTES)):
                if not self._guard.check(key, cap):
                    raise CorruptDataError(f"{key} is missing")
            size = self.metadata.associated_bytes.get(name)
            arr = self._group[f"associated/{name}"]
            if size is None and len(arr.shape) == 1 and arr.shape[0] <= MAX_ASSOCIATED_BYTES:
                size = arr.shape[0]      # a container that did not record its size
            data = bytes(np.asarray(_plain_array(self._group, f"associated/{name}",
                                                 (size if size is not None else -1,),
                                                 np.uint8)[...], np.uint8))
            digest = self.metadata.associated_digests.get(name)
            if self.metadata.has_digests and blob_digest(self.metadata.container_id, name,  # type: ignore[arg-type]
                                                         data) != digest:
                raise CorruptDataError("digest mismatch")
            check_image_header(data, fmt)
            rgb = imagecodecs.png_decode(data) if fmt == "png" else imagecodecs.jpegxl_decode(data)
        except Exception as e:
            raise CorruptDataError(f"{self.path}: associated image {name!r} damaged: {e}") from e
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=2)
        elif rgb.shape[2] < 3:   # grey (+ alpha)
            rgb = np.repeat(rgb[..., :1], 3, axis=2)
        return np.ascontiguousarray(rgb[..., :3])

    # -- misc
    def nbytes(self) -> int:
        """Size of the container on disk."""
        return path_size(self.path)

    def info(self) -> dict[str, Any]:
        """A JSON-able summary (what ``wsicodec info --json`` prints)."""
        attrs = self.metadata.to_attrs()
        stored = self._group.attrs.get(ATTRS_KEY, {})
        attrs["software"] = stored.get("software")
        attrs["format_version"] = stored.get("format_version")   # the file's, not this wsicodec's
        attrs["missing_guarantees"] = missing_guarantees(self.metadata.format_version)
        attrs["path"] = str(self.path)
        attrs["container_bytes"] = self.nbytes()
        return attrs

    def close(self) -> None:
        """Close the store; later reads raise ClosedError. Safe to call twice."""
        self.closed = True
        try:
            if self._store is not None:
                self._store.close()
        except Exception:  # closing a read-only store cannot lose data
            pass

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_container(path: str | os.PathLike[str], **codec_options: Any) -> Container:
    """Open a container (directory or ``.zip``) for reading and validate its metadata
    (:meth:`ContainerMetadata.from_attrs`: the whole schema, its bounds, and in format 3
    its digest) before anything is sized from it.

    ``codec_options``: the reader's choices of how its codec runs, among
    :data:`wsicodec.codecs.READER_OPTIONS` (``device``, ``precision``, ``max_batch``),
    used when :attr:`Container.codec` is built; never a weights file.

    Only regular files are read, each within a size bound checked before it is read;
    a zip must name each member once (a second ``zarr.json`` appended to a zip is
    refused, not shadowed) and no member may inflate past its bound.

    Raises:
        SlideNotFoundError: no such path.
        CorruptDataError: a truncated/damaged zip, oversized or irregular files, damaged
            or inconsistent metadata.
        UnsupportedFormatError: not a wsicodec container, or an unknown format version.
        InvalidSettingError: a codec option outside READER_OPTIONS.
    """
    import zarr

    other = sorted(set(codec_options) - set(READER_OPTIONS))
    if other:
        raise InvalidSettingError(f"a reader's codec options are {', '.join(READER_OPTIONS)}, "
                                  f"got {', '.join(other)}")
    import zarr.storage

    p = Path(path)
    if not p.exists():
        raise SlideNotFoundError(f"{p}: no such file or directory")
    store: Any
    infos: dict[str, zipfile.ZipInfo] | None = None
    if p.is_file():
        if not zipfile.is_zipfile(p):
            if is_zip_path(p):
                raise CorruptDataError(f"{p}: not a complete zip file (truncated or damaged)")
            raise UnsupportedFormatError(f"{p}: not a wsicodec container (.zarr directory "
                                         "or .zarr.zip file)")
        try:
            with zipfile.ZipFile(p) as zf:
                members = zf.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise CorruptDataError(f"{p}: damaged zip file: {e}") from e
        infos = {}
        for info in members:
            if info.filename in infos:
                raise CorruptDataError(f"{p}: the zip holds {info.filename} more than once "
                                       "(appended to after it was written): refused")
            infos[info.filename] = info
        if "zarr.json" not in infos:
            raise UnsupportedFormatError(f"{p}: zip file without zarr.json: not a wsicodec "
                                         "container")
    elif p.is_dir():
        if not (p / "zarr.json").exists():
            raise UnsupportedFormatError(f"{p}: directory without zarr.json: not a wsicodec "
                                         "container")
    else:
        raise UnsupportedFormatError(f"{p}: not a regular file or directory: refused")
    guard = _StoreGuard(p, infos)
    guard.check("zarr.json", MAX_JSON_BYTES)
    try:
        store = (zarr.storage.ZipStore(p, mode="r") if infos is not None
                 else zarr.storage.LocalStore(p, read_only=True))
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CorruptDataError(f"{p}: damaged zip file: {e}") from e
    try:
        group = zarr.open_group(store, mode="r")
        attrs = dict(group.attrs).get(ATTRS_KEY)
    except (json.JSONDecodeError, UnicodeDecodeError, zipfile.BadZipFile, RecursionError) as e:
        store.close()
        raise CorruptDataError(f"{p}: damaged container metadata: {e}") from e
    except Exception as e:  # zarr raises several types for "not a group"
        store.close()
        raise UnsupportedFormatError(f"{p}: not a wsicodec container ({e})") from e
    try:
        meta = ContainerMetadata.from_attrs(attrs, where=str(p))
    except WsiCodecError:
        store.close()
        raise
    return Container(p, group, store, meta, guard, codec_options)
