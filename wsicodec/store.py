"""The hardening of a container's store: what a reader checks of its files before zarr
reads them, and the store helpers the reader and the writer share.

- :func:`container_files`, :func:`zip_members`: what kind of store a path is (a zip's
  members, each named once, or a directory with a ``zarr.json``), before any of it is read.
- :class:`StoreGuard`: each file regular and within a size bound known in advance (and a
  zip member within an inflation ratio) before a byte of it is read.
- :func:`plain_array`: an array's own ``zarr.json`` declares the one uncompressed chunk
  the writer makes, before zarr sizes anything from it.
- :func:`read_tile_chunk`: a tile's bytes with the chunk's framing checked here, not by
  numcodecs.

:mod:`wsicodec.container` opens containers with these; :mod:`wsicodec.writer` shares
:func:`read_tile_chunk`, :func:`quiet_zarr` and :func:`is_zip_path`.
"""

from __future__ import annotations

import os
import stat
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from wsicodec.errors import CorruptDataError, SlideNotFoundError, UnsupportedFormatError


def is_zip_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a single-file (zip) container (suffix ``.zip``)."""
    return str(path).lower().endswith(".zip")


def path_size(path: str | os.PathLike[str]) -> int:
    """Bytes of a file, or of all files under a directory."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def read_tile_chunk(array: Any, row: int, col: int, guard: "StoreGuard | None" = None,
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


#: zarr's warning that variable-length bytes have no final v3 spec yet
ZARR_SPEC_NOISE = ".*does not have a Zarr V3 specification.*"


def quiet_zarr() -> None:
    """zarr warns that variable-length bytes have no final v3 spec yet; we pin zarr>=3.1
    and read what we write, so the warning is noise for our users.  Called before zarr
    touches a tiles array: ignores that one message for the whole process, once.  (Not a
    ``catch_warnings`` around each call: those save and restore the process's filters, so
    on threads writing several containers at once, as ``compress-many`` does, one call
    restored the filters while another was writing and the warning got through.)"""
    if not any(f[0] == "ignore" and getattr(f[1], "pattern", None) == ZARR_SPEC_NOISE
               for f in warnings.filters):
        warnings.filterwarnings("ignore", message=ZARR_SPEC_NOISE)


def plain_array(group: Any, key: str, shape: tuple[int, ...], dtype: Any) -> Any:
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


class StoreGuard:
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


def container_files(p: Path) -> "dict[str, zipfile.ZipInfo] | None":
    """What kind of container ``p`` is, before any of it is read: the members of a zip
    (:func:`zip_members`), or None for a directory store with a ``zarr.json``.
    Raises as :func:`~wsicodec.container.open_container`."""
    if not p.exists():
        raise SlideNotFoundError(f"{p}: no such file or directory")
    if p.is_file():
        return zip_members(p)
    if p.is_dir():
        if not (p / "zarr.json").exists():
            raise UnsupportedFormatError(f"{p}: directory without zarr.json: not a wsicodec "
                                         "container")
        return None
    raise UnsupportedFormatError(f"{p}: not a regular file or directory: refused")


def zip_members(p: Path) -> "dict[str, zipfile.ZipInfo]":
    """The members of the zip container ``p`` by name: each named once, ``zarr.json``
    among them. Raises as :func:`~wsicodec.container.open_container`."""
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
    infos: dict[str, zipfile.ZipInfo] = {}
    for info in members:
        if info.filename in infos:
            raise CorruptDataError(f"{p}: the zip holds {info.filename} more than once "
                                   "(appended to after it was written): refused")
        infos[info.filename] = info
    if "zarr.json" not in infos:
        raise UnsupportedFormatError(f"{p}: zip file without zarr.json: not a wsicodec "
                                     "container")
    return infos
