"""The scanner's own tiles: JPEG carried losslessly in JPEG-XL, JPEG 2000 as it is.

Most slides were scanned to JPEG tiles (Aperio SVS, generic tiled TIFF), some to JPEG 2000
(Aperio SVS, compression 33005).  Where a container's tile is exactly one of the source's
tiles (same level, same size, same grid), it can be stored with no loss at all:

* a JPEG through JPEG-XL's lossless JPEG recompression (libjxl's ``jbrd`` reconstruction
  data), in fewer bytes; a reader gets back the scanner's JPEG byte for byte and decodes it
  with libjpeg-turbo, as OpenSlide does (or the JPEG itself, where that is smaller);
* a JPEG 2000 codestream as it is: readers decode it with OpenJPEG, as OpenSlide does.

The ``auto`` codec takes such a tile where it is the fewest bytes that meet its floor.
Two halves, no torch:

* the source side: :func:`open_scanned` maps a TIFF's levels to their tiles,
  :meth:`ScannedTiles.tile` gives one (a JPEG completed: the page's shared tables merged
  in, an Adobe marker added where the TIFF says RGB, as libtiff decodes it);
* the stream: :func:`carry` (the JPEG recompressed into a JPEG-XL container with its
  reconstruction data, or the JPEG as it is where that is smaller: small tiles, or a
  JPEG libjxl cannot recompress; a JPEG 2000 codestream as it is), :func:`is_carried`
  (what tells a carried JPEG from a plain JPEG-XL codestream: a JPEG-XL container with a
  ``jbrd`` box, or a JPEG) and :func:`decode_carried` (checked to declare the tile's size
  before anything is decoded).  A JPEG 2000 tile is a bare JPEG 2000 tile to readers.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsicodec.classical import J2K_SIGNATURE, JPEG_SIGNATURE, JXL_SIGNATURES
from wsicodec.errors import CorruptDataError
from wsicodec.jpegwrite import ADOBE_RGB

#: the first bytes of a carried stream: a JPEG-XL container, or the JPEG itself
CARRIED_SIGNATURES = (JXL_SIGNATURES[1], JPEG_SIGNATURE)
#: the most pixels a carried JPEG may declare where no tile shape is given (a tile's most)
MAX_CARRIED_PIXELS = 4096 * 4096
#: the box that holds the JPEG's reconstruction data
_JBRD = b"jbrd"
#: TIFF tags' values this reads: JPEG compression, Aperio's JPEG 2000 in RGB (33005; its
#: 33003 is YCbCr, which OpenSlide converts after OpenJPEG and readers here would not),
#: RGB and YCbCr photometrics
_TIFF_JPEG, _APERIO_J2K_RGB, _RGB, _YCBCR = 7, 33005, 2, 6
#: the fidelity record's kind of a scanner tile, by the first bytes of what is stored
KIND_JPEG, KIND_JPEG2000 = "scanner-jpeg", "scanner-jpeg2000"
#: the SOF markers of the JPEGs libjpeg-turbo decodes (baseline, extended, progressive)
_SOF = (0xC0, 0xC1, 0xC2)


def _boxes(data: bytes):
    """(type, payload start, end) of each box of a JPEG-XL container, in order; stops
    quietly at a box header cut short or a size smaller than its header."""
    i, n = 0, len(data)
    while i + 8 <= n:
        size, kind = struct.unpack_from(">I4s", data, i)
        head = 8
        if size == 1:                                   # a 64-bit size follows
            if i + 16 > n:
                return
            size, head = struct.unpack_from(">Q", data, i + 8)[0], 16
        if size == 0:                                   # to the end
            yield kind, i + head, n
            return
        if size < head:
            return
        yield kind, i + head, i + size
        i += size


def is_carried(data: bytes) -> bool:
    """Whether ``data`` is a JPEG (:data:`~wsicodec.classical.JPEG_SIGNATURE`) or a
    JPEG-XL container that holds a JPEG's reconstruction data (a ``jbrd`` box): read from
    the first bytes and the box headers only."""
    if data.startswith(JPEG_SIGNATURE):
        return True
    return data.startswith(JXL_SIGNATURES[1]) and any(kind == _JBRD for kind, _, _ in _boxes(data))


def _segments(jpeg: bytes):
    """(marker, payload offset, payload length) of each marker segment of a JPEG's header,
    up to its first scan; stops quietly at anything malformed."""
    i, n = 2, len(jpeg)
    while i + 4 <= n:
        if jpeg[i] != 0xFF:
            return
        marker = jpeg[i + 1]
        if marker == 0xFF:                              # fill byte
            i += 1
            continue
        if marker in (0xD9, 0xDA):                      # EOI, or the scan data begins
            return
        length = struct.unpack_from(">H", jpeg, i + 2)[0]
        if length < 2 or i + 2 + length > n:
            return
        yield marker, i + 4, length - 2
        i += 2 + length


def jpeg_frame_size(jpeg: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) a JPEG's first SOF marker declares, or None where
    ``jpeg`` is no JPEG with a baseline, extended or progressive frame header."""
    if not jpeg.startswith(b"\xff\xd8"):
        return None
    for marker, at, length in _segments(jpeg):
        if marker in _SOF and length >= 6:
            _, h, w, comps = struct.unpack_from(">BHHB", jpeg, at)
            return h, w, comps
    return None


def _names_colour_space(jpeg: bytes) -> bool:
    """Whether a JPEG's header holds a JFIF (APP0) or Adobe (APP14) marker, which tell
    libjpeg its colour space."""
    return any((m == 0xE0 and jpeg[at:at + 5] == b"JFIF\x00") or (m == 0xEE and jpeg[at:at + 5] == b"Adobe")
               for m, at, _ in _segments(jpeg))


def _codestream_head(data: bytes, need: int = 16) -> bytes | None:
    """The first ``need`` bytes of the codestream in a JPEG-XL container (its ``jxlc`` box,
    or its first ``jxlp`` box after that box's 4-byte index), or None."""
    for kind, start, end in _boxes(data):
        if kind == b"jxlc":
            return data[start:min(end, start + need)]
        if kind == b"jxlp":
            return data[start + 4:min(end, start + 4 + need)]
    return None


def jpegxl_declared_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) the SizeHeader of a JPEG-XL container's codestream declares, read
    from its first bytes only (nothing decoded), or None where there is none to read."""
    head = _codestream_head(data)
    if head is None or len(head) < 2 or head[:2] != b"\xff\x0a":
        return None
    bits = int.from_bytes(head[2:], "little")
    avail = 8 * (len(head) - 2)
    pos = 0

    def u(k: int) -> int:
        nonlocal pos
        if pos + k > avail:
            raise ValueError("short")
        v = (bits >> pos) & ((1 << k) - 1)
        pos += k
        return v

    def dim() -> int:
        return 1 + u((9, 13, 18, 30)[u(2)])

    try:
        small = u(1)
        h = 8 * (1 + u(5)) if small else dim()
        ratio = u(3)
        if ratio:
            num, den = ((1, 1), (12, 10), (4, 3), (3, 2), (16, 9), (5, 4), (2, 1))[ratio - 1]
            return h, h * num // den
        return h, (8 * (1 + u(5)) if small else dim())
    except ValueError:
        return None


def carry(jpeg: bytes) -> bytes:
    """``jpeg`` recompressed losslessly into a JPEG-XL container (libjxl), or ``jpeg``
    itself where that is no larger or libjxl cannot recompress it (an arithmetic-coded
    or odd JPEG); a JPEG 2000 codestream as it is.  Raises CorruptDataError where
    ``jpeg`` is neither."""
    import imagecodecs

    if jpeg.startswith(J2K_SIGNATURE):
        return jpeg
    if not jpeg.startswith(JPEG_SIGNATURE):
        raise CorruptDataError(f"a {len(jpeg)}-byte stream that is no JPEG cannot be carried")
    try:
        data = bytes(imagecodecs.jpegxl_encode_jpeg(jpeg, numthreads=1))
    except Exception:  # imagecodecs' JpegxlError: libjxl does not take this JPEG
        return jpeg
    return data if len(data) < len(jpeg) else jpeg


def decode_carried(data: bytes, shape: tuple[int, int] | None, name: str = "tile") -> np.ndarray:
    """The pixels of a carried stream: its JPEG reconstructed byte for byte and decoded
    by libjpeg-turbo, (h, w, 3) uint8.  With ``shape`` = (h, w) the JPEG-XL codestream
    must declare exactly that size (read from its header before libjxl sees it; without
    a shape, at most :data:`MAX_CARRIED_PIXELS`), and so must the JPEG, with three
    components.  Raises CorruptDataError with ``name`` in the message."""
    import imagecodecs

    if data.startswith(JPEG_SIGNATURE):
        return _decode_jpeg(data, shape, name)
    declared = jpegxl_declared_size(data) if is_carried(data) else None
    if declared is None or (shape is not None and declared != tuple(shape[:2])) \
            or declared[0] * declared[1] > MAX_CARRIED_PIXELS:
        raise CorruptDataError(f"{name}: not a carried JPEG of the tile's size ({declared} declared, "
                               f"{tuple(shape[:2]) if shape else 'at most 4096 x 4096'} expected)")
    try:
        jpeg = bytes(imagecodecs.jpegxl_decode_jpeg(data, numthreads=1))
    except Exception as e:
        raise CorruptDataError(f"{name}: cannot reconstruct the scanner's JPEG from {len(data)} "
                               f"bytes: {e}") from e
    return _decode_jpeg(jpeg, shape, name)


def _decode_jpeg(jpeg: bytes, shape: tuple[int, int] | None, name: str) -> np.ndarray:
    """A carried JPEG's pixels, its frame checked against ``shape`` before it decodes."""
    import imagecodecs

    frame = jpeg_frame_size(jpeg)
    if frame is None or frame[2] != 3 or (shape is not None and frame[:2] != tuple(shape[:2])) \
            or frame[0] * frame[1] > MAX_CARRIED_PIXELS:
        raise CorruptDataError(f"{name}: the carried JPEG declares {frame} (height, width, "
                               f"components), not the tile's {tuple(shape[:2]) if shape else '?'} x 3")
    try:
        px = imagecodecs.jpeg8_decode(jpeg, out=np.empty((frame[0], frame[1], 3), np.uint8))
    except Exception as e:
        raise CorruptDataError(f"{name}: cannot decode the carried JPEG: {e}") from e
    return px


def complete_jpeg(tables: bytes | None, tile: bytes, photometric: int) -> bytes | None:
    """One TIFF JPEG tile as a JPEG a plain decoder reads as libtiff does: the page's
    ``JPEGTables`` (its SOI .. EOI) merged in after the tile's SOI, and an Adobe RGB
    marker where ``photometric`` is RGB and the stream names no colour space.  None
    where ``tile`` is no JPEG."""
    if not tile.startswith(b"\xff\xd8"):
        return None
    body = tile[2:]
    if tables:
        if not (tables.startswith(b"\xff\xd8") and tables.endswith(b"\xff\xd9")):
            return None
        body = tables[2:-2] + body
    jpeg = b"\xff\xd8" + body
    if photometric == _RGB and not _names_colour_space(jpeg):
        jpeg = b"\xff\xd8" + ADOBE_RGB + body
    return jpeg


@dataclass
class _Page:
    page: Any                    # tifffile.TiffPage
    cols: int


class ScannedTiles:
    """The tiles of a TIFF's levels that a container's grid of ``tile_size`` can carry: a
    level whose page is tiled in ``tile_size`` squares, 8-bit, 3 samples, chunky, and
    JPEG-coded (RGB or YCbCr) or Aperio JPEG 2000 in RGB.  :meth:`tile` reads one;
    thread-safe."""

    def __init__(self, path: str | os.PathLike[str], level_dimensions: list[tuple[int, int]],
                 tile_size: int) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(path)
        self._lock = threading.Lock()
        self.pages: dict[int, _Page] = {}
        try:
            series = self._tif.series[0]
            pages = [lv.keyframe for lv in series.levels]
        except Exception:
            pages = []
        for level, (w, h) in enumerate(level_dimensions):
            for p in pages:
                if (p.imagewidth, p.imagelength) == (w, h) and _carriable(p, tile_size):
                    self.pages[level] = _Page(p, -(-w // tile_size))
                    break

    def levels(self) -> list[int]:
        """The source levels whose tiles this carries."""
        return sorted(self.pages)

    def tile(self, level: int, col: int, row: int) -> bytes | None:
        """Tile (col, row) of source ``level``: a complete JPEG, or a JPEG 2000 codestream;
        None where the level is not carried, or the tile is neither (a JPEG the page's
        tables do not complete, a JPEG 2000 file rather than a codestream)."""
        pg = self.pages.get(level)
        if pg is None:
            return None
        index = row * pg.cols + col
        p = pg.page
        if not 0 <= index < len(p.dataoffsets):
            return None
        offset, count = p.dataoffsets[index], p.databytecounts[index]
        if count <= 0:
            return None
        with self._lock:
            fh = self._tif.filehandle
            fh.seek(offset)
            raw = fh.read(count)
        if int(p.compression) == _APERIO_J2K_RGB:
            return raw if raw.startswith(J2K_SIGNATURE) else None
        return complete_jpeg(getattr(p, "jpegtables", None), raw, int(p.photometric))

    def row(self, level: int, row: int, cols: int) -> list[bytes | None] | None:
        """:meth:`tile` for each of a row's ``cols`` tiles, or None: the level has none."""
        if level not in self.pages:
            return None
        return [self.tile(level, c, row) for c in range(cols)]

    def close(self) -> None:
        self._tif.close()


def _carriable(p: Any, tile_size: int) -> bool:
    coded = ((int(p.compression) == _TIFF_JPEG and int(p.photometric) in (_RGB, _YCBCR))
             or (int(p.compression) == _APERIO_J2K_RGB and int(p.photometric) == _RGB))
    return (coded and p.is_tiled and p.tilewidth == p.tilelength == tile_size
            and getattr(p, "tiledepth", 1) == 1 and p.samplesperpixel == 3 and p.bitspersample == 8
            and int(p.planarconfig) == 1)


def scanner_tiling(path: str | os.PathLike[str]) -> tuple[int, str] | None:
    """(tile size, "jpeg" or "jpeg2000") of the first page of the TIFF at ``path`` where it
    is tiled in JPEG or JPEG 2000 squares a container's grid can take (a multiple of 16),
    else None."""
    import tifffile

    if not os.path.isfile(path):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            p = tif.pages[0]
            if not (_carriable(p, p.tilewidth) and p.tilewidth % 16 == 0):
                return None
            return int(p.tilewidth), "jpeg" if int(p.compression) == _TIFF_JPEG else "jpeg2000"
    except Exception:  # not a TIFF tifffile reads
        return None


def scanner_tile_size(path: str | os.PathLike[str]) -> int | None:
    """The tile size of :func:`scanner_tiling`, or None."""
    tiling = scanner_tiling(path)
    return None if tiling is None else tiling[0]


def open_scanned(path: str | os.PathLike[str] | None, level_dimensions: list[tuple[int, int]],
                 tile_size: int) -> ScannedTiles | None:
    """The carriable tiles of the TIFF at ``path`` for a grid of ``tile_size``, or
    None (no path, a folder, not a TIFF tifffile reads, or no level tiled that way)."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        tiles = ScannedTiles(path, list(level_dimensions), tile_size)
    except Exception:  # not a TIFF (DICOM folder, NDPI tifffile refuses, PNG): nothing to carry
        return None
    if not tiles.pages:
        tiles.close()
        return None
    return tiles


class ScannedRows:
    """The source's own tiles, row by row, for the level encoders that take them
    (:attr:`~wsicodec.codecs.LevelEncoder.takes_scanned`): read where a level of the plan
    (:class:`~wsicodec.tiling.pyramid.PyramidPlan`) is a level of the source
    (:class:`~wsicodec.tiling.sources.SlideSource` with a ``path``) tiled in the plan's
    tile size; the TIFF is opened on the first row asked for."""

    def __init__(self, source: Any, plan: Any) -> None:
        self.source, self.plan = source, plan
        self.tiles: Any = None
        self.opened = False

    def row(self, enc: Any, level: int, row: int) -> list[bytes | None] | None:
        """Each tile's stream of ``level``'s row ``row`` (None where a tile has none), or
        None: ``enc`` takes none, or the level has none."""
        lv = self.plan.levels[level]
        if not enc.takes_scanned or lv.source_level is None:
            return None
        if not self.opened:
            self.opened = True
            self.tiles = open_scanned(getattr(self.source, "path", None), list(self.source.level_dimensions),
                                      self.plan.tile_size)
        return None if self.tiles is None else self.tiles.row(lv.source_level, row, lv.grid.cols)

    def close(self) -> None:
        if self.tiles is not None:
            self.tiles.close()
        self.tiles = None
