"""Writing a container: atomically, and resumably after an interrupt.

:class:`ContainerWriter` makes the layout :mod:`wsicodec.container` describes (and reads).
Writing is atomic: everything goes to a hidden sibling path, the root metadata is
written last, and the result is renamed onto ``OUT`` only when complete, so a failed
or interrupted write leaves nothing at ``OUT`` and nothing that opens as a container.

Resuming: the hidden sibling (``.OUT.partial-XXXXXXXX``, ``….d`` for a zip) keeps a
journal (:data:`JOURNAL`) of the tile rows it holds: the settings on its first line,
then one line per finished row with its tiles' CRC32s (and, for a container with a
fidelity map, its tiles' records: :mod:`wsicodec.fidelity`). An interrupted write
(KeyboardInterrupt: Ctrl-C, or SIGTERM through the CLI) or an OSError (a full disk, an
I/O error) after it finished a row keeps the sibling; a writer made with ``resume=True``
for the same output and identical settings takes it over, checks each journalled row
against its CRCs and keeps the rows that pass. A writer holds an exclusive lock on its
journal, so a live write is never taken over. Any other failure removes the sibling.
A writer killed after its output was moved into place, before it removed what it had
set aside (the zip's directory store, an overwritten output), leaves those behind; the
next writer of that output removes them.

Associated images are coded by the policy ``compress --associated`` names
(:mod:`wsicodec.associated`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from wsicodec import fidelity
from wsicodec.associated import (ASSOCIATED_FORMATS, ASSOCIATED_POLICIES, associated_format,
                                 encode_jxl, encode_png)
from wsicodec.errors import InvalidSettingError, RegionOutOfBoundsError, WsiCodecError
from wsicodec.heap import release_freed_memory
from wsicodec.integrity import (DIGEST_BYTES, blob_digest, level_digest, new_container_id,
                                tile_digest)
from wsicodec.metadata import ASSOCIATED_NAME, ATTRS_KEY, ContainerMetadata
from wsicodec.paths import check_output_path
from wsicodec.store import is_zip_path, quiet_zarr, read_tile_chunk

log = logging.getLogger(__name__)

#: the resume journal inside a container being written (never in a finished container)
JOURNAL = "wsicodec-journal.jsonl"
#: the journal's last line once its rows were packed into the zip that became the output
PACKED = "packed_into"


def _vlen_bytes_dtype() -> Any:
    import zarr

    return zarr.dtype.VariableLengthBytes()


class ContainerWriter:
    """Writes a container atomically. Use as a context manager and call :meth:`commit`;
    leaving the block without committing (or with an exception) removes everything.

    Tiles are written a whole tile row at a time (:meth:`write_row`), in any order.
    With ``metadata.tile_kinds`` set, every row comes with its tiles' records
    (:class:`wsicodec.fidelity.TileRecord`) and the container is written as format 4
    with a fidelity map; without, as format 3.
    """

    def __init__(self, path: str | os.PathLike[str], metadata: ContainerMetadata, *,
                 overwrite: bool = False, resume: bool = False,
                 resume_key: dict[str, Any] | None = None) -> None:
        """Raises OutputExistsError if ``path`` exists and ``overwrite`` is false,
        InvalidSettingError for ``metadata.tile_kinds`` that are not 1 to 16 distinct
        short lower-case names (:func:`wsicodec.metadata.check_tile_kinds`).

        ``resume``: continue the partial write an interrupted writer left for ``path``
        with identical ``metadata`` and ``resume_key`` (e.g. the source file's size and
        mtime), if there is one; :meth:`done_rows` then lists the rows it already holds.
        """
        import zarr
        import zarr.storage

        from dataclasses import replace

        self.path = Path(path)
        self.overwrite = overwrite
        fidelity.check_writer_kinds(metadata.tile_kinds)
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
        # the fidelity map (kind, psnr only written with tile_kinds; nbytes give level_bytes)
        self._kind = [np.zeros((g.rows, g.cols), np.uint8) for g in self._grids]
        self._psnr = [np.zeros((g.rows, g.cols), np.float32) for g in self._grids]
        self._nbytes = [np.zeros((g.rows, g.cols), np.uint32) for g in self._grids]
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
                quiet_zarr()
                for i, g in enumerate(self._grids):
                    self._tiles.append(self._group.create_array(
                        f"levels/{i}/tiles", shape=(g.rows, g.cols), chunks=(1, 1),
                        dtype=_vlen_bytes_dtype(), fill_value=b"", compressors=None))
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
                quiet_zarr()
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
        """Keep a journalled row if its stored tiles match the CRC32s journalled for them
        (and, with a fidelity map, its line holds valid records for them)."""
        kinds = self.metadata.tile_kinds
        try:
            entry = json.loads(line)
            level, row, crcs = int(entry["level"]), int(entry["row"]), list(entry["crc"])
            grid = self._grids[level]
            if not 0 <= level < len(self._grids) or not 0 <= row < grid.rows \
                    or len(crcs) != grid.cols:
                return
            if kinds:
                kind, psnr = fidelity.from_journal(entry["records"], kinds, grid.cols)
            stored = [read_tile_chunk(self._tiles[level], row, c) for c in range(grid.cols)]
        except (ValueError, KeyError, TypeError, IndexError, OSError):
            return      # a torn last line, or a damaged row: encode it again
        if [zlib.crc32(b) for b in stored] != crcs:
            return
        if kinds:
            self._kind[level][row, :], self._psnr[level][row, :] = kind, psnr
        self._nbytes[level][row, :] = [len(b) for b in stored]
        self._crc[level][row, :] = crcs
        for col, data in enumerate(stored):
            self._digest[level][row, col] = np.frombuffer(self._tile_digest(level, col, row, data),
                                                          np.uint8)
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

    def stored_row(self, level: int, row: int) -> list[bytes]:
        """The tiles of a row this writer holds (written, or taken over by ``resume``),
        left to right.  Raises WsiCodecError for a row it does not hold."""
        if not self._written[level][row].all():
            raise WsiCodecError(f"internal error: row {row} of level {level} is not written")
        return [read_tile_chunk(self._tiles[level], row, c) for c in range(self._grids[level].cols)]

    @property
    def written_tiles(self) -> int:
        """Tiles stored so far (taken over or written)."""
        return int(sum(w.sum() for w in self._written))

    def _check_target(self) -> None:
        check_output_path(self.path, self.overwrite)

    def write_row(self, level: int, row: int, tiles: Sequence[bytes],
                  records: Sequence[fidelity.TileRecord] | None = None) -> None:
        """Store the encoded tiles of one tile row (left to right), in any order of rows
        (a row may come before the row above it; writing a row again replaces it).

        ``records``: one :class:`~wsicodec.fidelity.TileRecord` per tile, left to right,
        required iff ``metadata.tile_kinds`` is set (each kind one of them, each psnr a
        number in 0..:data:`~wsicodec.fidelity.MAX_PSNR` dB or ``math.inf``, never NaN).

        Raises RegionOutOfBoundsError for a bad level/row or the wrong tile count,
        InvalidSettingError for missing, unwanted or invalid records (nothing of the row
        is stored then).
        """
        grid = self._grids[level] if 0 <= level < len(self._grids) else None
        if grid is None or not 0 <= row < grid.rows or len(tiles) != grid.cols:
            raise RegionOutOfBoundsError(f"row {row} of level {level} with {len(tiles)} tiles "
                                         "does not fit the pyramid")
        kinds = self.metadata.tile_kinds
        kind, psnr = fidelity.record_row(records, kinds, grid.cols, f"level {level} row {row}")
        values = np.empty((1, grid.cols), dtype=object)
        for col, data in enumerate(tiles):
            data = bytes(data)
            values[0, col] = data
            self._crc[level][row, col] = zlib.crc32(data)
            self._digest[level][row, col] = np.frombuffer(self._tile_digest(level, col, row, data),
                                                          np.uint8)
        self._tiles[level][row:row + 1, :] = values
        self._nbytes[level][row, :] = [len(v) for v in values[0]]
        self._written[level][row, :] = True
        line: dict[str, Any] = {"level": level, "row": row,
                                "crc": [int(c) for c in self._crc[level][row]]}
        if kinds:
            self._kind[level][row, :], self._psnr[level][row, :] = kind, psnr
            line["records"] = fidelity.journal_entry(kind, psnr)
        self._journal_line(line)
        release_freed_memory()      # a row's encoding freed much; hand it back now and then

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
        data = encode_png(rgb) if fmt == "png" else encode_jxl(rgb)
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
            records = None
            if self.metadata.tile_kinds:
                records = (self._kind[level], self._psnr[level], self._nbytes[level])
                fidelity.write_arrays(self._group, level, *records)
            level_digests.append(level_digest(self.metadata.container_id, level, digest,  # type: ignore[arg-type]
                                              records))
        from dataclasses import replace

        meta = replace(self.metadata, associated_images=tuple(self._associated),
                       associated_formats=dict(self._associated_formats),
                       associated_bytes=dict(self._associated_bytes),
                       associated_digests=dict(self._associated_digests),
                       level_bytes=tuple(int(n.sum(dtype=np.uint64)) for n in self._nbytes),
                       level_digests=tuple(level_digests))
        self._group.attrs.update({ATTRS_KEY: meta.to_attrs()})
        if self._zip:
            try:
                zip_directory(self._tmp_dir, self._tmp, skip=JOURNAL)
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
        move_into_place(self._tmp, self.path)
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


def zip_directory(src: Path, dest: Path, skip: str = "") -> None:
    """Pack a directory store into a zip (stored, not deflated: tiles are compressed),
    leaving out the top-level file ``skip``."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for f in sorted(src.rglob("*")):
            name = f.relative_to(src).as_posix()
            if f.is_file() and name != skip:
                zf.write(f, name)


def move_into_place(tmp: Path, final: Path) -> None:
    """Move ``tmp`` onto ``final``; an existing ``final`` is removed only after."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(tmp, final)
        _remove(old)
    else:
        os.rename(tmp, final)


# ASSOCIATED_POLICIES and associated_format live in wsicodec.associated; re-exported
__all__ = ["ASSOCIATED_POLICIES", "JOURNAL", "PACKED", "ContainerWriter", "associated_format",
           "move_into_place", "zip_directory"]
