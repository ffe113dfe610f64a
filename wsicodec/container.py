"""The wsicodec container: a zarr v3 group of per-tile bitstreams, and its reader.

Layout (directory store ``OUT.zarr`` or the same tree in a single zip ``OUT.zarr.zip``)::

    zarr.json                  group; attrs["wsicodec"] = metadata (see ContainerMetadata)
    levels/<i>/tiles           (rows, cols) variable-length bytes, one tile per chunk
    levels/<i>/crc32           (rows, cols) uint32, CRC32 of each tile's bytes
    levels/<i>/digest          (rows, cols, 16) uint8, each tile's digest (format 3, 4)
    levels/<i>/kind|psnr|nbytes  (rows, cols) the fidelity map (format 4, wsicodec.fidelity)
    associated/<name>          1-D uint8: the label / macro / thumbnail, coded as PNG
                               (lossless) or JPEG-XL (see ASSOCIATED_POLICIES in
                               :mod:`wsicodec.associated`)

Tiles are stored padded to ``tile_size`` squares (edge replication); readers crop.
A finished container is complete or absent: :mod:`wsicodec.writer` writes it atomically
(and resumes an interrupted write).

Reading (:func:`open_container`, :class:`Container`) checks the metadata before anything
is sized from it, each store file before zarr reads it (:mod:`wsicodec.store`), and each
tile against its CRC32 and digest (and, in format 4, its size against the fidelity map).
"""

from __future__ import annotations

import json
import os
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from wsicodec.associated import ASSOCIATED_FORMATS
from wsicodec.codecs import READER_OPTIONS, Run, TileCodec, codec_from_dict
from wsicodec.errors import (ClosedError, CorruptDataError, CorruptTileError, InvalidSettingError,
                             ModelMismatchError, UnsupportedFormatError, WsiCodecError,
                             as_tile_error)
from wsicodec import fidelity
from wsicodec.heap import release_freed_memory
from wsicodec.integrity import DIGEST_BYTES, blob_digest, level_digest, tile_digest
from wsicodec.metadata import (ATTRS_KEY, MAX_ASSOCIATED_BYTES, MAX_JSON_BYTES, ContainerMetadata,
                               check_image_header, max_tile_bytes, missing_guarantees)
from wsicodec.store import (StoreGuard, container_files, is_zip_path, path_size, plain_array,
                            quiet_zarr, read_tile_chunk)
from wsicodec.tiling.geometry import TileGrid, check_decoded_tile, tile_shape

class _GridMismatch(Exception):
    """A level's tile array does not have the metadata's grid (reported as such)."""


class Container:
    """A container opened for reading. Thread-safe for tile reads.

    Use :func:`open_container` to get one.
    """

    def __init__(self, path: Path, group: Any, store: Any, metadata: ContainerMetadata,
                 guard: StoreGuard | None = None, codec_options: dict[str, Any] | None = None) -> None:
        self.path = path
        self.metadata = metadata
        self._group = group
        self._store = store
        self._guard = guard or StoreGuard(path, None)
        self._codec: TileCodec | None = None
        self._local = dict(codec_options or {})   # the reader's choices for the codec
        self._tiles: dict[int, Any] = {}
        self._crc: dict[int, np.ndarray] = {}
        self._digest: dict[int, np.ndarray] = {}
        self._records: dict[int, fidelity.TileRecords] = {}
        self._cache: Any = None       # the codec's decode cache (new_cache), made on first use
        self._cache_made = False
        self._cache_lock = threading.Lock()
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
            digest = records = None
            try:
                for key, cap in self._level_files(level, g):
                    if not self._guard.check(key, cap):
                        raise CorruptDataError(f"{key} is missing")
                quiet_zarr()
                tiles = self._group[f"levels/{level}/tiles"]
                if tuple(tiles.shape) != (g.rows, g.cols):
                    raise _GridMismatch()
                crc = np.asarray(plain_array(self._group, f"levels/{level}/crc32",
                                              (g.rows, g.cols), np.uint32)[...], np.uint32)
                if self.metadata.has_digests:
                    digest = np.asarray(plain_array(
                        self._group, f"levels/{level}/digest", (g.rows, g.cols, DIGEST_BYTES),
                        np.uint8)[...], np.uint8)
                if self.metadata.has_tile_records:
                    records = fidelity.read_arrays(self._group, level, (g.rows, g.cols))
            except _GridMismatch:
                raise CorruptDataError(f"{self.path}: level {level} arrays do not match the "
                                       "metadata's tile grid") from None
            except Exception as e:  # zarr/zip errors of many kinds: damaged store
                raise CorruptDataError(f"{self.path}: level {level} arrays unreadable: {e}") from e
            if digest is not None:
                if level_digest(self.metadata.container_id, level, digest, records) != \
                        self.metadata.level_digests[level]:  # type: ignore[arg-type]
                    raise CorruptDataError(
                        f"{self.path}: level {level}'s tile digests"
                        f"{' or fidelity map' if records is not None else ''} do not "
                        "match the metadata (damaged or replaced)")
                self._digest[level] = digest
            if records is not None:
                lb = self.metadata.level_bytes
                self._records[level] = fidelity.TileRecords.checked(
                    level, self.metadata.tile_kinds, records, max_tile_bytes(self.tile_size),
                    lb[level] if level < len(lb) else None, str(self.path))
            self._tiles[level], self._crc[level] = tiles, crc
        return self._tiles[level], self._crc[level]

    def check_level(self, level: int) -> None:
        """Read and check a level's CRC and digest arrays and fidelity map (what every
        tile read of the level needs).  Raises CorruptDataError when they are damaged or do not match the
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
        if self.metadata.has_tile_records:
            files += fidelity.record_files(level, n)
        return files

    def tile_records(self, level: int) -> "fidelity.TileRecords | None":
        """The fidelity map of a level (:class:`wsicodec.fidelity.TileRecords`), or None
        for a container without one (format 1-3).  Read with the level's other arrays
        and checked against the level digest.

        Raises RegionOutOfBoundsError for a bad level, CorruptDataError (naming the
        level) for a damaged, forged or inconsistent map."""
        self.grid(level)
        if not self.metadata.has_tile_records:
            return None
        self._level_arrays(level)
        return self._records[level]

    def read_encoded_tile(self, level: int, col: int, row: int) -> bytes:
        """The stored bytes of one tile, checked, not decoded: against its CRC32 and, in
        a format-3/4 container, against its digest, which binds it to this container and to
        (level, col, row); in format 4 its size against the fidelity map's ``nbytes`` and its
        stream against the map's kind (:meth:`wsicodec.fidelity.TileRecords.stream_mismatch`).

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
            data = read_tile_chunk(tiles, row, col, self._guard,
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
        records = self._records.get(level)
        if records is not None and len(data) != int(records.nbytes[row, col]):
            raise CorruptTileError(f"{self.path}: tile {where} holds {len(data)} bytes, its "
                                   f"fidelity record {int(records.nbytes[row, col])}",
                                   level=level, col=col, row=row)
        problem = None if records is None else records.stream_mismatch(
            col, row, data, mixed=self.metadata.codec.get("name") == "auto")
        if problem:
            raise CorruptTileError(f"{self.path}: tile {where} {problem}",
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
        out = self.decode_tiles(level, keys, self.codec, self._shared_cache(), run)
        for t in out:
            if isinstance(t, BaseException):
                raise t
        return out

    def prefetch_tiles(self, level: int, keys: Sequence[tuple[int, int]], *, run: Run | None = None) -> None:
        """Decode into the cache :meth:`read_tiles` uses what the codec shares between
        calls for tiles ``keys`` (:meth:`~wsicodec.codecs.TileCodec.prefetch_tiles`: the
        learned codec's latents), so that a later :meth:`read_tiles` beside them waits
        less; called on another thread, it overlaps that call's own work.  Never raises
        for a damaged tile (reading it does); the tiles read are the same either way."""
        g = self.grid(level)
        keys = [k for k in keys if 0 <= k[0] < g.cols and 0 <= k[1] < g.rows]
        args, kw = self._grid_call(level)
        self.codec.prefetch_tiles(keys, *args, **kw, cache=self._shared_cache(), run=run)

    def _grid_call(self, level: int) -> tuple[tuple, dict[str, Any]]:
        """What :meth:`decode_tiles` and :meth:`prefetch_tiles` tell the codec of a level, as
        the protocol's positional arguments after the keys (how to fetch its tiles' checked
        bytes, its grid, the tile shape) and keywords (the tiles' names, the cache tag,
        whether its tiles were all written by the container's codec)."""
        g = self.grid(level)
        return ((lambda c, r: self.read_encoded_tile(level, c, r), (g.cols, g.rows), tile_shape(self.tile_size)),
                {"names": lambda c, r: f"tile level={level} col={c} row={r}", "cache_tag": level,
                 "as_written": self.metadata.has_digests})

    def _shared_cache(self) -> Any:
        """The codec's cache shared by :meth:`read_tiles` callers, made on first use with room
        for four rows of the widest level (a row-by-row reader's row, the rows around it,
        and the row it prefetches)."""
        with self._cache_lock:      # concurrent first readers share one cache
            if not self._cache_made:
                widest = max(self.grid(lv).cols for lv in range(self.level_count))
                self._cache = self.codec.new_cache(self.metadata.tile_size, 4 * widest + 8)
                self._cache_made = True
        return self._cache

    def decode_tiles(self, level: int, keys: Sequence[tuple[int, int]], codec: TileCodec,
                     cache: Any = None, run: Run | None = None) -> list[Any]:
        """Tiles (col, row) of one level (inside its grid: callers check) decoded by ``codec``
        (this container's :attr:`codec` or one built by :meth:`build_codec`) with
        ``cache`` (from its ``new_cache``): one entry per key, the (tile_size, tile_size,
        3) uint8 tile, checked, or the exception that tile raised (a CorruptTileError
        naming it for damage).  The one place a container's tiles are decoded; afterwards
        the heap's freed memory goes back to the system now and then
        (:func:`~wsicodec.heap.release_freed_memory`)."""
        args, kw = self._grid_call(level)
        out = codec.decode_tiles(list(keys), *args, **kw, cache=cache, run=run)
        for i, ((col, row), t) in enumerate(zip(keys, out)):
            try:
                if isinstance(t, BaseException):
                    raise t
                out[i] = check_decoded_tile(t, self.metadata.tile_size)
            except BaseException as e:  # noqa: BLE001 - kept per tile
                out[i] = as_tile_error(e, level, col, row, self.path)
        release_freed_memory()
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
            data = bytes(np.asarray(plain_array(self._group, f"associated/{name}",
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
        """A JSON-able summary (what ``wsicodec info --json`` prints): the metadata's
        attributes and, in format 4, ``fidelity``: :func:`wsicodec.fidelity.summarize` of
        the fidelity map (``{"error": message}`` when it is damaged)."""
        attrs = self.metadata.to_attrs()
        stored = self._group.attrs.get(ATTRS_KEY, {})
        attrs["software"] = stored.get("software")
        attrs["format_version"] = stored.get("format_version")   # the file's, not this wsicodec's
        attrs["missing_guarantees"] = missing_guarantees(self.metadata.format_version)
        icc = attrs.pop("icc_profile", None)          # its size, not a page of base64
        attrs["icc_profile_bytes"] = len(self.metadata.icc_profile) if icc else None
        attrs["path"] = str(self.path)
        attrs["container_bytes"] = self.nbytes()
        if self.metadata.has_tile_records:
            attrs["fidelity"] = fidelity.container_summary(self)
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
    store: Any
    infos = container_files(p)
    guard = StoreGuard(p, infos)
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


# ASSOCIATED_FORMATS (wsicodec.associated), is_zip_path, path_size, quiet_zarr, read_tile_chunk
# (wsicodec.store) moved; re-exported
__all__ = ["ASSOCIATED_FORMATS", "Container", "open_container", "is_zip_path", "path_size",
           "quiet_zarr", "read_tile_chunk"]
